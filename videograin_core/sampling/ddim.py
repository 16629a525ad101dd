"""Deterministic DDIM inversion and DDIM sampling with latent blending, as k-diffusion
style sampler functions in the host's sigma space.

In sigma space (x = x0 + sigma * eps, the model sees x / sqrt(1 + sigma^2), which is the
diffusers latent z = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps) DDIM with eta 0 is
exactly the Euler step x' = x + (sigma' - sigma) * eps. Sampling evaluates eps at the
current sigma. Inversion walks the same schedule upwards, in one of two schemes
(METHOD.md section 5 step 3):

- "official" (VideoGrain's, its pinned diffusers inverse DDIM scheduler): the clean latent
  is taken as the diffusers latent at the lowest timestep (z_1 = x0), and each UNet call
  evaluates eps on the latent AT its own level and moves it one step up: steps - 1 calls
  for `steps` steps (t = 1, 21, ..., 961 for 50), ending at the top timestep (981).
- "next-step" (prompt-to-prompt's null-text inversion, Video-P2P): each call evaluates eps
  at the TARGET timestep on the latent of the current one, from the clean latent: `steps`
  calls (t = 1, 21, ..., 981 for 50).

Both run through the host's sampler machinery (its `model(x, sigma)` returns the denoised
x0), so ControlNet, cfg and attention patches apply as in any sampler.

`call_options(k, model_options)` (optional, every sampler here): the model options for the
UNet call that evaluates the schedule's sigma number k (inversion: k indexes the ascending
schedule; sampling: the descending one, i.e. the step), or None for the run's own. PnP
feature injection tags the calls it records or injects with it.

Every sampler function takes `**_host_extras`: the host hands a KSAMPLER function its own
keyword arguments (today extra_args, callback, disable), and a newer host may add one; an
argument these samplers do not use must not stop them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

INVERSION_SCHEMES = ("official", "next-step")

__all__ = ["Inversion", "INVERSION_SCHEMES", "inversion_sampler", "sample_ddim_inversion", "sample_ddim_inversion_official", "sample_ddim_blend", "trajectory_reference",
           "renoised_reference", "latent_mask"]


@dataclass(frozen=True)
class Inversion:
    """What travels on VIDEOGRAIN_INVERSION wires (all tensors on the CPU, float32)."""
    latent: torch.Tensor      # the inverted latent at sigmas[-1], LATENT space (as a LATENT's "samples")
    trajectory: torch.Tensor  # [steps + 1, F, C, h, w]: x at every sigma, in the model's internal space
    sigmas: torch.Tensor      # [steps + 1] ascending: 0, s_1, ..., s_max (the inversion's order)
    steps: int
    source: torch.Tensor      # the source latent, LATENT space
    scheme: str = "official"  # the inversion scheme that made it (INVERSION_SCHEMES)
    features: object = None   # PnP: a pnp.bank.FeatureBank recorded during this inversion, or None

    def __post_init__(self):
        if self.scheme not in INVERSION_SCHEMES:
            raise ValueError(f"inversion scheme must be one of {', '.join(INVERSION_SCHEMES)}, got {self.scheme!r}")
        if self.trajectory.shape[0] != self.steps + 1 or self.sigmas.shape[0] != self.steps + 1:
            raise ValueError(f"inversion of {self.steps} steps needs {self.steps + 1} trajectory latents and sigmas, "
                             f"got {self.trajectory.shape[0]} and {self.sigmas.shape[0]}")
        if tuple(self.trajectory.shape[1:]) != tuple(self.latent.shape) or tuple(self.source.shape) != tuple(self.latent.shape):
            raise ValueError(f"inversion shapes disagree: trajectory {tuple(self.trajectory.shape)}, "
                             f"latent {tuple(self.latent.shape)}, source {tuple(self.source.shape)}")


def _to_cpu(x):
    return x.detach().to("cpu", torch.float32, copy=True)


def _args_for(extra_args: dict, call_options, k: int) -> dict:
    """extra_args with the model options `call_options` gives for call k (see the module docstring)."""
    if call_options is None:
        return extra_args
    options = call_options(k, extra_args.get("model_options", {}))
    return extra_args if options is None else {**extra_args, "model_options": options}


@torch.no_grad()
def sample_ddim_inversion(model, x, sigmas, extra_args=None, callback=None, disable=None, trajectory=None,
                          call_options=None, **_host_extras):
    """DDIM inversion along ascending `sigmas` (0, s_1, ..., s_max), the next-step scheme.

    x_{i+1} = x_i + (s_{i+1} - s_i) * eps(x_i, s_{i+1}). The model is handed x_i as the
    reference hands it to the UNet (normalised for its own level s_i: x_i / sqrt(1 + s_i^2))
    at the timestep of s_{i+1}; the host divides its input by sqrt(1 + s_{i+1}^2), hence
    the rescale. `trajectory` (a list) receives x at every sigma, on the CPU.
    """
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    if trajectory is not None:
        trajectory.append(_to_cpu(x))
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x_in = x * ((1 + sigma_next ** 2) / (1 + sigma ** 2)) ** 0.5
        denoised = model(x_in, sigma_next * s_in, **_args_for(extra_args, call_options, i + 1))
        eps = (x_in - denoised) / sigma_next
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma_next, "sigma_hat": sigma_next, "denoised": denoised})
        x = x + (sigma_next - sigma) * eps
        if trajectory is not None:
            trajectory.append(_to_cpu(x))
    return x


@torch.no_grad()
def sample_ddim_inversion_official(model, x, sigmas, extra_args=None, callback=None, disable=None, trajectory=None,
                                   call_options=None, top_call=False, **_host_extras):
    """DDIM inversion along ascending `sigmas` (0, s_1, ..., s_max), the official scheme.

    x_1 = x0 * sqrt(1 + s_1^2) (the clean latent as the diffusers latent at s_1), then
    x_{i+1} = x_i + (s_{i+1} - s_i) * eps(x_i, s_i) for i = 1 .. steps - 1: each UNet call
    at the latent's own level. `trajectory` (a list) receives x at every sigma, on the
    CPU: x0 itself at sigma 0, then x_1 .. x_max. Callbacks report i = 1 .. steps - 1
    (the move from 0 to s_1 costs no UNet call). `top_call`: one more UNet call, on the
    inverted latent at the top sigma (k = steps), whose output is not used: it exists for
    what `call_options` records there (PnP's aligned records)."""
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    if trajectory is not None:
        trajectory.append(_to_cpu(x))
    x = x * (1 + sigmas[1] ** 2) ** 0.5
    if trajectory is not None:
        trajectory.append(_to_cpu(x))
    for i in range(1, len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * s_in, **_args_for(extra_args, call_options, i))
        eps = (x - denoised) / sigma
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
        x = x + (sigma_next - sigma) * eps
        if trajectory is not None:
            trajectory.append(_to_cpu(x))
    if top_call:
        model(x, sigmas[-1] * s_in, **_args_for(extra_args, call_options, len(sigmas) - 1))
    return x


def inversion_sampler(scheme: str):
    """The sampler function of an inversion scheme (see the module docstring)."""
    if scheme not in INVERSION_SCHEMES:
        raise ValueError(f"scheme: must be one of {', '.join(INVERSION_SCHEMES)}, got {scheme!r}")
    return sample_ddim_inversion_official if scheme == "official" else sample_ddim_inversion


@torch.no_grad()
def sample_ddim_blend(model, x, sigmas, extra_args=None, callback=None, disable=None, mask=None, reference=None,
                      call_options=None, **_host_extras):
    """DDIM (eta 0) along descending `sigmas`, blending after every step:
    x = x * mask + reference(i + 1) * (1 - mask), reference(j) = a latent at sigmas[j].

    mask: [F, 1, h, w] in 0..1 (1 = edited). Without mask/reference this is the host's
    "ddim" (Euler) sampler exactly.
    """
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    blend = mask is not None and reference is not None and not bool((mask >= 1).all())  # all-ones: no-op
    if blend:
        mask = mask.to(x)
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **_args_for(extra_args, call_options, i))
        eps = (x - denoised) / sigmas[i]
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        x = x + (sigmas[i + 1] - sigmas[i]) * eps
        if blend:
            x = x * mask + reference(i + 1).to(x) * (1 - mask)
    return x


def trajectory_reference(inversion_trajectory: torch.Tensor):
    """reference(j) for descending sampling sigmas: the inversion's latent at the same sigma."""
    desc = inversion_trajectory.flip(0)
    return lambda j: desc[j]


def renoised_reference(source: torch.Tensor, sigmas_desc: torch.Tensor, seed: int):
    """reference(j) = source + sigmas[j] * fresh noise (the reference implementation's blend):
    `source` in the model's internal space; noise drawn from a generator seeded once."""
    g = torch.Generator(device="cpu").manual_seed(int(seed) & 0xFFFFFFFFFFFFFFFF)
    src = source.to("cpu", torch.float32)

    def reference(j):
        noise = torch.randn(src.shape, generator=g, dtype=torch.float32)
        return src + float(sigmas_desc[j]) * noise
    return reference


def latent_mask(union: torch.Tensor, frames: int, latent_hw: tuple[int, int]) -> torch.Tensor:
    """Union mask bool [F or 1, H, W] at frame resolution -> float [frames, 1, h, w] on the
    latent grid (nearest: stays binary)."""
    m = union.float()
    if m.ndim == 2:
        m = m[None]
    if m.shape[0] == 1 and frames != 1:
        m = m.expand(frames, -1, -1)
    if m.shape[0] != frames:
        raise ValueError(f"the layout's masks have {m.shape[0]} frames but the latent has {frames}: "
                         "give one mask per frame, or a single mask for all")
    return torch.nn.functional.interpolate(m[:, None], size=tuple(latent_hw), mode="nearest-exact")
