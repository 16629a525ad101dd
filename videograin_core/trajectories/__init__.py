"""Flow trajectories (METHOD.md section 8): the host-free core of temporal consistency.

This subpackage owns
- `flow`:       dense optical flow between consecutive frames of a clip, one pair at a time
                (OpenCV DIS by default, torchvision RAFT from a user's state dict);
- `chains`:     flow -> trajectories at a token grid: which cells of which frames lie on one
                flow path (every cell on exactly one path), with a digest for cache keys;
- `attention`:  trajectory attention: each token attends to the cells of its own path only,
                memory linear in the number of frames.

It never imports ComfyUI; OpenCV and torchvision are imported only inside the functions
that need them, so `import videograin_core.trajectories.chains` works without either.
Import the submodules directly; nothing loads here.
"""
