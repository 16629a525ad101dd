"""Seeing what the attention does (METHOD.md section 10): capture while a sampler runs,
views of the captured maps, and regions found without masks.

This subpackage owns
- `recorder`: the capture stage of the attention runtime and its recorder (cross-attention
  maps per word / local prompt, self-attention features), one take per sampling run;
- `render`:   heatmaps of captured maps over the frames, labelled with their word;
- `clusters`: deterministic k-means over the self-attention features of all frames, the
  masks at frame resolution and names for the clusters from the cross-attention maps.

Plain torch / numpy / Pillow; import the submodules directly.
"""
