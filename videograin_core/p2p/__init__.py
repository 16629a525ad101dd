"""Video-P2P (VIDEO_P2P.md): prompt-to-prompt editing of a video by controlling the target
branch's attention with the source branch's. Host-free: plain torch, never imports ComfyUI.

This subpackage owns
- `tokens`   the prompts' tokens and words, the word-swap (replacement) and refinement
             (Needleman-Wunsch) mappers, word -> token lookup, every refusal of section 7;
- `maps`     the control arithmetic on probability maps: swap, refine, reweight, self
             replacement, the step windows, the local-blend mask and blend;
- `control`  `P2PControl`, the frozen object on VIDEOGRAIN_P2P wires, and `build_control`;
- `stage`    `P2PCrossStage`, the attn2 stage of the attention runtime for a stacked
             [source F; target F] batch.

Built in the P2P Sample node (nodes/p2p_sample.py): `blend` (the per-run local-blend store), `sampler`
(the stacked sampler function: source replay, blend), `P2PSelfStage`, `null_text` (the shared null
embedding's per-step optimisation). Still to come: T2S tuning (frame attention as a tuned module, temporal attention).
"""
