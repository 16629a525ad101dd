"""Frame attention variants for self-attention (attn1), as an attention-runtime stage
(VIDEO_P2P.md section 3; Tune-A-Video's sparse-causal attention):

- "all frames":        left to the kernel (the pack's full-frame attention over each
                       sequence, when the model's runtime has it on);
- "first frame":       each frame's queries attend to the keys and values of frame 0 of
                       their own sequence (Video-P2P's T2S frame attention); frame 0 is
                       plain per-frame self-attention;
- "first + previous":  frame 0 and frame t-1 of their own sequence (Tune-A-Video); frame 0
                       attends to itself (its keys twice, which softmax does not notice).

The two variants compute every row themselves with the host's attention function and do
not call the rest of the chain, so the layout modulation of self-attention and a foreign
attention replace do not apply to them. Sequences are those of the published batch
layout (a stacked [source; target] batch: each branch its own frame 0).
"""
from __future__ import annotations

import torch

from .runtime import AttentionCall, AttnFn, Stage

FRAME_MODES = ("all frames", "first frame", "first + previous")


def frame_keys(x: torch.Tensor, sequences: int, frames: int, mode: str) -> torch.Tensor:
    """[sequences*F, L, C] keys (or values) -> the keys each frame attends to under `mode`."""
    lk, c = x.shape[1], x.shape[2]
    xs = x.reshape(sequences, frames, lk, c)
    first = xs[:, :1].expand(sequences, frames, lk, c)
    if mode == "first frame":
        out = first
    elif mode == "first + previous":
        prev = torch.clamp(torch.arange(frames, device=x.device) - 1, min=0)
        out = torch.cat([first, xs[:, prev]], dim=2)
    else:
        raise ValueError(f"frame_attention must be one of {', '.join(FRAME_MODES)}, got {mode!r}")
    return out.reshape(sequences * frames, out.shape[2], c)


class FrameAttentionStage(Stage):
    def __init__(self, mode: str, attention: AttnFn):
        if mode not in FRAME_MODES:
            raise ValueError(f"frame_attention must be one of {', '.join(FRAME_MODES)}, got {mode!r}")
        self.mode = mode
        self.attention = attention

    def videograin_fingerprint(self) -> dict:
        return {"frame_attention": self.mode}

    def around(self, call: AttentionCall, next) -> torch.Tensor:
        batch = call.batch
        if (self.mode == "all frames" or call.kind != "self" or batch is None or batch.frames < 2
                or call.k.shape[1] != call.q.shape[1]):
            return next(call)
        k = frame_keys(call.k, batch.sequences, batch.frames, self.mode)
        v = frame_keys(call.v, batch.sequences, batch.frames, self.mode)
        return self.attention(call.q, k, v, call.extra_options)


__all__ = ["FRAME_MODES", "FrameAttentionStage", "frame_keys"]
