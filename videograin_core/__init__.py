"""VideoGrain core: plain torch, never imports ComfyUI. Cut by concern, one subpackage each:

- `video`      reading and writing clips, the frame selection/resize/crop, region masks
               aligned with the frames, and the check that file inputs stay in the input folder;
- `prompts`    local prompts inside the global prompt (token spans) and the Layout wire type;
- `attention`  the attention kernels (modulated, all-frames, CPU C kernel), the region terms
               per token grid, and the per-layer attention runtime the nodes register;
- `sampling`   DDIM inversion and sampling in the host's sigma space, and the inversion cache;
- `p2p`        Video-P2P: token alignment of a prompt pair, the attention-control arithmetic,
               the control object and its attention-runtime stage;
- `metrics`    the paper's quality metrics (Warp-Err, CLIP-T, CLIP-F, Q-edit);
- `capture`    attention capture as a runtime stage, heatmaps, and mask-free regions.

Import the submodules directly (e.g. `from videograin_core.attention.st_layout import
layout_attention`); nothing heavy loads here."""
