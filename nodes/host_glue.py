"""Host glue the sampling nodes share (DDIM Invert, Sample, and every later node that runs
the host's sampler): the pack's DDIM schedule from the model's sigmas, the sampler runner
with progress bar, preview and interruption, the inversion cache's folder and bound, the
cache key's view of host objects, the ControlNet hint check and the chunked VAE encode.
Nodes stay thin; what is host-free lives in videograin_core."""
from __future__ import annotations

import logging
import math
import os
import sys

import comfy.model_management
import comfy.model_patcher
import comfy.sample
import comfy.samplers
import comfy.utils
import folder_paths
import latent_preview
import torch

from ..videograin_core.sampling.inversion_cache import DEFAULT_MAX_BYTES, tensor_digest

CACHE_NAME = "videograin_cache"


def cache_folder() -> str:
    if hasattr(folder_paths, "get_system_user_directory"):
        return folder_paths.get_system_user_directory(CACHE_NAME)
    return os.path.join(folder_paths.get_user_directory(), "__" + CACHE_NAME)


def cache_max_bytes() -> int:
    """The cache folder's bound: VIDEOGRAIN_CACHE_MAX_GB (GiB, default 10; 0 or inf: no
    bound); the least recently used inversions are deleted beyond it."""
    raw = os.environ.get("VIDEOGRAIN_CACHE_MAX_GB", "").strip()
    if not raw:
        return DEFAULT_MAX_BYTES
    try:
        gib = float(raw)
    except ValueError:
        logging.warning("VideoGrain: VIDEOGRAIN_CACHE_MAX_GB=%r is not a number; using the default", raw)
        return DEFAULT_MAX_BYTES
    if not math.isfinite(gib) or gib <= 0 or gib * 2**30 >= sys.maxsize:
        return sys.maxsize  # unbounded
    return int(gib * 2**30)


def ddim_sigmas(model, steps: int) -> torch.Tensor:
    """The reference's DDIM schedule, descending: the sigmas of timesteps 1 + i * (T // steps),
    i < steps, highest first (981, 961, ..., 1 for 50 steps of T = 1000), then 0 (the clean
    end). The host's `ddim_uniform` has the same timesteps when `steps` of them fill the range
    (50, 25, 10, 4, 3, ...) and one step more otherwise (30 asked, 31 run, from t = 991)."""
    table = model.get_model_object("model_sampling").sigmas.detach().float().cpu()
    if steps > table.shape[0] - 1:
        raise ValueError(f"steps is {steps} but the model has {table.shape[0]} timesteps: use at most "
                         f"{table.shape[0] - 1} (the reference uses 50)")
    timesteps = torch.arange(steps) * (table.shape[0] // steps) + 1
    return torch.cat([table[timesteps].flip(0), table.new_zeros(1)])


def step_callback(model, steps: int):
    """Progress bar + preview, and a stop at every step when the user interrupts."""
    preview = latent_preview.prepare_callback(model, steps)

    def callback(step, x0, x, total_steps, *args, **kwargs):
        comfy.model_management.throw_exception_if_processing_interrupted()
        preview(step, x0, x, total_steps, *args, **kwargs)
    return callback


def run_sampler(model, sampler_fn, extra_options, sigmas, positive, negative, cfg, latent, seed=0):
    """Run a k-diffusion style sampler function through comfy.sample.sample_custom with zero
    noise: x starts at `latent` (noise_scaling adds sigma * 0)."""
    sampler = comfy.samplers.KSAMPLER(sampler_fn, extra_options=extra_options)
    noise = torch.zeros(latent.shape, dtype=torch.float32, device="cpu")
    comfy.model_management.throw_exception_if_processing_interrupted()
    return comfy.sample.sample_custom(model, noise, cfg, sampler, sigmas, positive, negative, latent,
                                      callback=step_callback(model, len(sigmas) - 1),
                                      disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)


def run_guider(guider, sampler_fn, extra_options, sigmas, latent, seed=0):
    """Run a k-diffusion style sampler function through a guider (as SamplerCustomAdvanced
    does) with zero noise, with run_sampler's progress bar, preview and interruption."""
    sampler = comfy.samplers.KSAMPLER(sampler_fn, extra_options=extra_options)
    noise = torch.zeros(latent.shape, dtype=torch.float32, device="cpu")
    comfy.model_management.throw_exception_if_processing_interrupted()
    out = guider.sample(noise, latent, sampler, sigmas, callback=step_callback(guider.model_patcher, len(sigmas) - 1),
                        disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
    return out.to(comfy.model_management.intermediate_device())


def host_fingerprint(obj):
    """Descriptions of host objects for the cache key (see inversion_cache.fingerprint)."""
    import comfy.controlnet
    import comfy.sd
    if isinstance(obj, comfy.sd.VAE):
        # the network is an nn.Module: fingerprinted by type and sampled weight digests
        return {"vae": obj.first_stage_model, "dtype": str(obj.vae_dtype),
                "latent_channels": obj.latent_channels, "downscale": obj.downscale_ratio,
                "patches": obj.patcher.patches if getattr(obj, "patcher", None) is not None else None}
    if isinstance(obj, comfy.model_patcher.ModelPatcher):
        sd = obj.model.state_dict()
        # Patched weights are written into the model while it is loaded: hash the originals.
        weights = [[k, tensor_digest(obj.backup[k].weight if k in obj.backup else sd[k], sample=True)]
                   for k in sorted(sd)]
        return {"model": type(obj.model).__qualname__, "model_type": str(getattr(obj.model, "model_type", None)),
                "weights": weights,
                "patches": {"dict": sorted([k, repr([(p[0], p[2], p[3]) for p in v]),
                                            [tensor_digest(t, sample=True) for t in tensors_in(v)]]
                                           for k, v in obj.patches.items())},
                # the patched objects themselves (ModelSamplingDiscrete swaps "model_sampling"
                # for another prediction type with the same sigmas), not just their names
                "object_patches": obj.object_patches, "options": obj.model_options}
    if isinstance(obj, comfy.controlnet.ControlBase):
        net = getattr(obj, "control_model", None) or getattr(obj, "t2i_model", None)
        return {"control": type(obj).__qualname__, "hint": obj.cond_hint_original, "strength": obj.strength,
                "range": list(obj.timestep_percent_range), "strength_type": str(obj.strength_type),
                "pooling": obj.global_average_pooling, "extra": obj.extra_concat_orig,
                # a Control-LoRA has no network until it runs: its weights are what it is
                "net": net, "lora_weights": getattr(obj, "control_weights", None),
                "previous": obj.previous_controlnet}
    return None


def tensors_in(v):
    if isinstance(v, torch.Tensor):
        yield v
    elif isinstance(v, (list, tuple)):
        for x in v:
            yield from tensors_in(x)
    elif isinstance(v, dict):
        for x in v.values():
            yield from tensors_in(x)
    elif hasattr(v, "weights"):  # weight adapters (LoRA, LoHa, ...)
        yield from tensors_in(v.weights)


def has_context_windows(model) -> bool:
    """Whether the model carries another pack's context windows (core's context handler,
    AnimateDiff's options), which slice a batch into windows of frames."""
    opts = model.model_options
    to = opts.get("transformer_options", {})
    return (opts.get("context_handler") is not None or to.get("ad_params") is not None
            or to.get("context_window") is not None)


def check_control_hints(frames: int, **conditionings) -> None:
    """Every ControlNet hint on these conditionings has one image per video frame (or a
    single image for all): the host silently repeats or cuts a batch of another length,
    which would pair hints with the wrong frames."""
    for what, conds in conditionings.items():
        for c in conds or []:
            extra = c[1] if isinstance(c, (list, tuple)) and len(c) > 1 and isinstance(c[1], dict) else {}
            control, seen = extra.get("control"), set()
            while control is not None and id(control) not in seen:
                seen.add(id(control))
                hint = getattr(control, "cond_hint_original", None)
                if isinstance(hint, torch.Tensor) and hint.ndim == 4 and hint.shape[0] not in (1, frames):
                    raise ValueError(f"{what}: the ControlNet hint has {hint.shape[0]} images but the video has "
                                     f"{frames} frames: give one hint image per frame (the preprocessor run on the "
                                     "Video Loader's images) or a single image for all frames")
                control = getattr(control, "previous_controlnet", None)


def encode_frames(vae, images: torch.Tensor) -> torch.Tensor:
    """IMAGE [F, H, W, C] -> latent, a chunk of frames at a time (the host's VAE returns the
    distribution's mean for SD1.5: deterministic)."""
    per_frame = 0
    try:
        per_frame = vae.memory_used_encode((1, 3) + tuple(images.shape[1:3]), vae.vae_dtype)
    except Exception:
        pass
    free = comfy.model_management.get_free_memory(vae.device)
    chunk = max(1, min(16, int(free * 0.8 // per_frame) if per_frame else 4))
    out = []
    for i in range(0, images.shape[0], chunk):
        comfy.model_management.throw_exception_if_processing_interrupted()
        out.append(vae.encode(images[i:i + chunk, :, :, :3]).cpu().float())
    return torch.cat(out)
