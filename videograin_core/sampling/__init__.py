"""Sampling: DDIM inversion (the official and the next-step schemes) and DDIM sampling
with latent blending, as k-diffusion style sampler functions in the host's sigma space,
and the on-disk cache of inversion results."""
