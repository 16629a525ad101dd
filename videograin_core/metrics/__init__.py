"""Quality metrics of an edited clip (METHOD.md section 11), for evaluation.

This subpackage owns
- `warp_error`: Warp-Err, the temporal consistency of an edit measured with the SOURCE
  clip's optical flow (forward-backward checked), as a raw mean on [0, 1];
- `clip_scores`: CLIP-T, CLIP-F, and all four scores of an edit on the paper's scale
  (x100; Q-edit = CLIP-T / Warp-Err) from the embeddings a caller's CLIP makes, the
  flows from `videograin_core.trajectories.flow`.

Pure torch: models and flows come from the caller.
warp_error returns raw values; clip_scores.score_edit applies the paper's x100. Import the
submodules directly; nothing loads here.
"""
