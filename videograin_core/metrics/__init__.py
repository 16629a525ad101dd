"""Quality metrics of an edited clip (METHOD.md section 11), for evaluation.

This subpackage owns
- `warp_error`: Warp-Err, the temporal consistency of an edit measured with the SOURCE
  clip's optical flow (forward-backward checked), as a raw mean on [0, 1].

Pure torch: the flows come from the caller (e.g. `videograin_core.trajectories.flow`).
Scores are returned raw; the paper's x100 is the caller's to apply. Import the
submodules directly; nothing loads here.
"""
