"""Null-text optimisation of Video-P2P (VIDEO_P2P.md section 4): the shared unconditional
embedding. Host-free: plain torch, never imports ComfyUI.

This module owns the optimisation and its schedule, nothing else: ONE unconditional
embedding for the whole clip (every frame sees the same [1, 77, 768] tensor), optimised
per denoising step i = 0 .. steps - 1 so that the guided DDIM step from the source latent
lands on the inverted latent of the next level:

    eps   = eps_u(x_i, null) + g * (eps_c(x_i) - eps_u(x_i, null))
    x'    = x_i + (sigma_{i+1} - sigma_i) * eps                 (DDIM, eta 0, sigma space)
    loss  = mse(x' / sqrt(1 + sigma_{i+1}^2), z*_{i+1})         (the reference's latent scale)

starting from the "" embedding, warm-started from step i - 1's result, a fresh Adam per
step with lr 1e-2 * (1 - i / 100), up to `inner_steps` inner steps, stopping early when
the loss (computed before the Adam step, as the reference does) is below
1e-5 + 2e-5 * i. The source latent is then advanced with the guided step using the stored
embedding, in fp32. Only the embedding requires grad.

The model comes in as two callables (the caller wires them to its UNet):
- eps_cond(x, i): the conditional eps at step i's sigma (no gradient needed);
- eps_uncond(x, i, null): the unconditional eps with the embedding `null` [1, 77, 768]
  (differentiable in `null`).
The host runs nodes under torch.inference_mode(): this function leaves it for its own
work and clones every tensor it is given into normal tensors before autograd sees them.
The caller must make sure the model's own weights are not inference tensors.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["NullTextResult", "optimize_null_text", "step_lr", "stop_loss", "latent_scale", "INNER_STEPS",
           "GUIDANCE"]

INNER_STEPS = 10   # the reference's num_inner_steps
GUIDANCE = 7.5     # the reference's guidance scale
LR = 1e-2
EPSILON = 1e-5
EPSILON_PER_STEP = 2e-5


def step_lr(i: int) -> float:
    """Adam learning rate of denoising step i (fresh optimiser per step)."""
    return LR * (1.0 - i / 100.0)


def stop_loss(i: int) -> float:
    """Early-stop threshold of step i: stop once an inner step's loss is below it."""
    return EPSILON + EPSILON_PER_STEP * i


def latent_scale(sigma) -> float:
    """x (sigma space) -> the diffusers latent the reference's loss is measured on."""
    return float((1.0 + float(sigma) ** 2) ** -0.5)


@dataclass
class NullTextResult:
    embeddings: torch.Tensor                         # [steps, 1, 77, 768] float32, CPU
    inner_steps_run: list = field(default_factory=list)   # inner steps taken per denoising step
    losses: list = field(default_factory=list)            # last loss computed per denoising step
    latent: torch.Tensor | None = None               # the source latent after the last step (sigma space)


def _plain(t: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """A normal (non-inference) fp32 copy, detached."""
    return t.detach().to(dtype=dtype).clone()


def optimize_null_text(eps_cond, eps_uncond, trajectory: torch.Tensor, sigmas: torch.Tensor, null_init: torch.Tensor,
                       guidance: float = GUIDANCE, inner_steps: int = INNER_STEPS, on_inner=None,
                       device=None) -> NullTextResult:
    """Optimise the shared null embedding (see the module docstring).

    trajectory: [steps + 1, F, C, h, w] the inversion's latents in sigma space, ASCENDING
    (trajectory[0] the clean latent, trajectory[-1] the inverted one); sigmas: the
    sampling sigmas, DESCENDING (sigmas[0] = the top sigma, sigmas[-1] = 0). Step i goes
    from sigmas[i] to sigmas[i + 1] and aims at trajectory[steps - 1 - i].
    on_inner(i, j, loss): called after every inner step (progress, interruption); after an
    early stop it is called with j = None once, for the inner steps left out.
    """
    inner_steps = int(inner_steps)
    if inner_steps < 1:
        raise ValueError(f"inner_steps: must be at least 1, got {inner_steps}")
    steps = len(sigmas) - 1
    if trajectory.shape[0] != steps + 1:
        raise ValueError(f"null-text: the inversion has {trajectory.shape[0] - 1} steps but the schedule {steps}")
    g = float(guidance)
    with torch.inference_mode(False), torch.enable_grad():
        dev = trajectory.device if device is None else device
        ref = _plain(trajectory.flip(0)).to(dev)           # ref[j]: the inverted latent at sigmas[j]
        sig = [float(s) for s in sigmas]
        null = _plain(null_init).to(dev)
        if null.ndim == 2:
            null = null[None]
        x = ref[0].clone()
        result = NullTextResult(embeddings=torch.empty((steps,) + tuple(null.shape), dtype=torch.float32))
        for i in range(steps):
            s, s_next = sig[i], sig[i + 1]
            with torch.no_grad():
                e_c = _plain(eps_cond(x, i))
            target = ref[i + 1] * latent_scale(s_next)
            null = null.detach().clone().requires_grad_(True)
            opt = torch.optim.Adam([null], lr=step_lr(i))
            taken, last = 0, float("nan")
            for j in range(inner_steps):
                e_u = eps_uncond(x, i, null).float()
                x_next = x + (s_next - s) * (e_u + g * (e_c - e_u))
                loss = torch.nn.functional.mse_loss(x_next * latent_scale(s_next), target)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                taken, last = j + 1, float(loss.detach())
                if on_inner is not None:
                    on_inner(i, j, last)
                if last < stop_loss(i):
                    if taken < inner_steps and on_inner is not None:
                        on_inner(i, None, last)
                    break
            null = null.detach()
            result.embeddings[i] = null.to("cpu")
            result.inner_steps_run.append(taken)
            result.losses.append(last)
            with torch.no_grad():   # advance the source with the stored embedding
                e_u = _plain(eps_uncond(x, i, null))
                x = x + (s_next - s) * (e_u + g * (e_c - e_u))
        result.latent = x.detach().to("cpu")
    return result
