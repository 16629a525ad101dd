"""The T2S tuning loop and the clip loss (VIDEO_P2P.md section 2), host-free.

`eps_fn(x, sigma)` is the model's noise prediction for the clip's latents x (frames as
the batch, the source prompt as the condition) at noise level sigma, in the host's sigma
space (x = latent + sigma * noise for an eps model: the DDPM x_t divided by
sqrt(alpha_bar)). Each step draws ONE timestep uniformly from the model's table for the
whole clip and fresh Gaussian noise, and minimises the plain MSE between the predicted
and the drawn noise: AdamW (lr 3e-5, weight decay 1e-2 by default), constant learning
rate, gradients clipped to norm 1.0. Draws come from a CPU generator seeded by `seed`, so
a run is reproducible.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class TuneConfig:
    steps: int = 300
    learning_rate: float = 3e-5
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if int(self.steps) != self.steps or self.steps < 0:
            raise ValueError(f"steps must be a whole number >= 0, got {self.steps}")
        if not (self.learning_rate > 0 and self.learning_rate < float("inf")):
            raise ValueError(f"learning_rate must be a positive number, got {self.learning_rate}")
        if not (self.weight_decay >= 0 and self.weight_decay < float("inf")):
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0, got {self.max_grad_norm}")


def draws(latent_shape, sigma_table: torch.Tensor, generator: torch.Generator):
    """One step's (sigma, noise): a uniform timestep of the table, Gaussian noise (CPU)."""
    t = int(torch.randint(0, sigma_table.shape[0], (1,), generator=generator))
    noise = torch.randn(tuple(latent_shape), generator=generator, dtype=torch.float32)
    return t, noise


def step_loss(eps_fn: EpsFn, latent: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    noise = noise.to(latent.device, latent.dtype)
    x = latent + noise * sigma
    eps = eps_fn(x, sigma)
    return torch.nn.functional.mse_loss(eps.float(), noise.float())


def tune(eps_fn: EpsFn, latent: torch.Tensor, sigma_table: torch.Tensor, params: list[torch.Tensor],
         config: TuneConfig, on_step: Callable[[int, float], None] | None = None,
         grad_scaling: bool = False) -> list[float]:
    """Run `config.steps` tuning steps on `params` (tensors requiring grad); returns the
    losses. `on_step(step, loss)` runs after each step (progress, interruption).
    `grad_scaling`: dynamic loss scaling (for a float16 UNet on a GPU)."""
    losses: list[float] = []
    if config.steps == 0:
        return losses
    generator = torch.Generator().manual_seed(int(config.seed))
    opt = torch.optim.AdamW(params, lr=float(config.learning_rate), weight_decay=float(config.weight_decay))
    scaler = torch.amp.GradScaler(latent.device.type, enabled=bool(grad_scaling))
    table = sigma_table.to(latent.device, torch.float32)
    for step in range(int(config.steps)):
        t, noise = draws(latent.shape, sigma_table, generator)
        loss = step_loss(eps_fn, latent, table[t], noise)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, float(config.max_grad_norm))
        scaler.step(opt)
        scaler.update()
        value = float(loss.detach())
        losses.append(value)
        if on_step is not None:
            on_step(step, value)
    opt.zero_grad(set_to_none=True)
    return losses


@torch.no_grad()
def clip_loss(eps_fn: EpsFn, latent: torch.Tensor, sigma_table: torch.Tensor, timesteps, seed: int = 0) -> float:
    """The mean eps MSE over fixed timesteps with fixed noise (seeded): the quantity tuning
    lowers, measured the same way before and after."""
    generator = torch.Generator().manual_seed(int(seed))
    table = sigma_table.to(latent.device, torch.float32)
    total = 0.0
    for t in timesteps:
        noise = torch.randn(tuple(latent.shape), generator=generator, dtype=torch.float32)
        total += float(step_loss(eps_fn, latent, table[int(t)], noise))
    return total / max(1, len(timesteps))


@contextlib.contextmanager
def inference_escape(module: torch.nn.Module):
    """Inside: every parameter and buffer of `module` that is an inference tensor (a host
    loads weights under torch.inference_mode, and autograd cannot save those for
    backward) is replaced by a normal clone without gradients, and the others stop
    requiring gradients; all restored on exit. Enter it
    outside inference mode. Costs one copy of those tensors."""
    if torch.is_inference_mode_enabled():
        raise RuntimeError("inference_escape must be entered outside torch.inference_mode")
    swapped, thawed = [], []
    try:
        for sub in module.modules():
            for name, p in list(sub._parameters.items()):
                if p is not None and p.is_inference():
                    sub._parameters[name] = torch.nn.Parameter(p.detach().clone(), requires_grad=False)
                    swapped.append((sub._parameters, name, p))
                elif p is not None and p.requires_grad:  # frozen: no gradients for the model's weights
                    p.requires_grad_(False)
                    thawed.append(p)
            for name, b in list(sub._buffers.items()):
                if b is not None and b.is_inference():
                    sub._buffers[name] = b.detach().clone()
                    swapped.append((sub._buffers, name, b))
        yield len(swapped)
    finally:
        for table, name, original in reversed(swapped):
            table[name] = original
        for p in thawed:
            p.requires_grad_(True)


__all__ = ["TuneConfig", "tune", "clip_loss", "step_loss", "draws", "inference_escape"]
