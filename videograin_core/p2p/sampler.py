"""The Video-P2P edit's sampler function (VIDEO_P2P.md sections 5 and 8), k-diffusion
style in the host's sigma space, for a stacked latent x = [source F; target F].

DDIM (eta 0) on both halves; the guider in front of the model gives each half its own
guidance. After every step:
- source replay ("direct" source mode): the source half is set to the stored inversion
  latent at the next sigma, and the target half is moved by the same correction
  (x_target += replay - x_source). The source then reconstructs exactly, and a target
  whose prompt equals the source's follows it exactly; an edit keeps the difference its
  prompt makes. (Replaying the source alone would leave the target with the DDIM
  reconstruction error the source no longer has.)
- local blend (from step int(blend_start * steps), when the control has blend words):
  x_target <- x_source + mask * (x_target - x_source), the mask built after the step's
  model call from the run's BlendStore (cumulative maps of the 16x16-equivalent layers).
"""
from __future__ import annotations

import torch

from .blend import STORE_KEY, BlendStore

__all__ = ["sample_p2p"]


@torch.no_grad()
def sample_p2p(model, x, sigmas, extra_args=None, callback=None, disable=None, frames=None, replay=None,
               store: BlendStore | None = None, blend_from: int | None = None, masks=None):
    """replay(j): the source latent at sigmas[j] (model space) or None (fast mode);
    blend_from: first step index after which the blend applies (None: no blend);
    masks (a list): receives each blend mask [F, h, w] as applied (for tests)."""
    extra_args = {} if extra_args is None else extra_args
    F = int(frames) if frames else x.shape[0] // 2
    if x.shape[0] != 2 * F:
        raise ValueError(f"P2P sampler: expected a latent of 2 x {F} frames [source; target], got {x.shape[0]}")
    if store is not None:
        # the run's own options (a per-run clone): the stages find the store there
        extra_args.setdefault("model_options", {}).setdefault("transformer_options", {})[STORE_KEY] = store
    s_in = x.new_ones([x.shape[0]])
    if replay is not None:
        x = torch.cat([replay(0).to(x), x[F:]])
    steps = len(sigmas) - 1
    for i in range(steps):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        eps = (x - denoised) / sigmas[i]
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        x = x + (sigmas[i + 1] - sigmas[i]) * eps
        if replay is not None:
            ref = replay(i + 1).to(x)
            x = torch.cat([ref, x[F:] + (ref - x[:F])])
        if store is not None and blend_from is not None and i >= blend_from and store.ready():
            mask = store.mask(tuple(x.shape[-2:])).to(x.device)
            if masks is not None:
                masks.append(mask.cpu())
            m = mask.to(x.dtype)[:, None]
            x = torch.cat([x[:F], x[:F] + m * (x[F:] - x[:F])])
    return x
