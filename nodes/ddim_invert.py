"""VideoGrainDDIMInvert: deterministic DDIM inversion of the source frames' latent, run
through the host's sampler machinery, cached on disk.

Cache folder: `<user directory>/__videograin_cache` (the host's "system user" folder for
internal data): the host wipes its temp folder at every start-up, the user directory it
keeps, and `__`-prefixed user folders are never served over HTTP. File names are sha256
keys; no part of the path comes from user input.
"""
from __future__ import annotations

import logging
import math

import torch
from comfy_api.latest import io

from ..videograin_core.pnp import plan as pnp_plan
from ..videograin_core.pnp.bank import BANK_FORMAT, FeatureBank
from ..videograin_core.pnp.hooks import PnPRun
from ..videograin_core.attention.runtime import stages_of
from ..videograin_core.capture.recorder import records_unet
from ..videograin_core.sampling import ddim
from ..videograin_core.sampling.inversion_cache import InversionCache, make_key, tensor_digest
from . import pnp_glue
from .host_glue import (cache_folder, cache_max_bytes, check_control_hints, ddim_sigmas, encode_frames,
                        host_fingerprint, run_sampler)
from .wire_types import INVERSION as Inversion

DISABLE_MODULATION_KEY = "videograin_disable_modulation"


# ---------------------------------------------------------------- the node
class VideoGrainDDIMInvert(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="VideoGrainDDIMInvert",
            display_name="VideoGrain DDIM Invert",
            category="VideoGrain",
            description="Deterministic DDIM inversion of the source frames (the reference's schedule: timesteps "
                        "1, 21, ..., 981 for 50 steps; no noise; the official VideoGrain scheme by default). "
                        "Full-frame attention applies if the model is patched, the layout modulation never. "
                        "Results are cached on disk.",
            inputs=[
                io.Model.Input("model"),
                io.Conditioning.Input("conditioning", tooltip="The source prompt (often empty); a ControlNet "
                                                               "applied to it is used during inversion."),
                io.Latent.Input("latent", optional=True, tooltip="The frames' latent (VAE Encode). Or give images + vae."),
                io.Image.Input("images", optional=True, tooltip="Frames to encode here (when no latent is given)."),
                io.Vae.Input("vae", optional=True, tooltip="Encodes `images` (distribution mean, deterministic)."),
                io.Int.Input("steps", default=50, min=2, max=999,
                             tooltip="DDIM steps (the reference: 50); Sample walks the same schedule back"),
                io.Float.Input("cfg", default=1.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Guidance during inversion; 1 = no guidance (reference). Other values "
                                       "need a negative conditioning."),
                io.Conditioning.Input("negative", optional=True,
                                      tooltip="Only used when cfg != 1, and as the uncond branch's prompt for PnP "
                                              "features (pnp_steps > 0; the reference: the empty prompt; not "
                                              "connected: the source conditioning)."),
                io.Boolean.Input("use_cache", default=True, tooltip="Reuse an identical earlier inversion from disk "
                                                                    "(never while the model carries an attention "
                                                                    "capture: that needs the UNet to run)."),
                io.Combo.Input("scheme", options=list(ddim.INVERSION_SCHEMES), default="official", optional=True,
                               tooltip="official: VideoGrain's (the UNet evaluated on the latent at its own "
                                       "timestep, steps - 1 UNet calls, the clean latent taken as the latent at "
                                       "t = 1); next-step: prompt-to-prompt / Video-P2P (each call at the next "
                                       "timestep on the current latent, steps calls)"),
                io.Int.Input("pnp_steps", default=0, min=0, max=999, optional=True,
                             tooltip="PnP feature injection: record the source's decoder features that the first "
                                     "pnp_steps sampling steps will inject (Sample's inject_step <= this); 0 = "
                                     "off. Kept in half precision with the inversion (and its cache entry)"),
                io.Combo.Input("pnp_alignment", options=list(pnp_plan.ALIGNMENTS), default="reference",
                               optional=True,
                               tooltip="which inversion call feeds sampling step i: reference (the official "
                                       "code): the call one schedule step below the step's timestep (981 gets "
                                       "961's); aligned: the call at the step's own timestep (official scheme: "
                                       "one extra UNet call at the top timestep)"),
            ],
            outputs=[
                io.Latent.Output(display_name="inverted_latent"),
                Inversion.Output(display_name="inversion"),
            ],
        )

    @classmethod
    def execute(cls, model, conditioning, steps, cfg, use_cache=True, latent=None, images=None, vae=None,
                negative=None, scheme="official", pnp_steps=0, pnp_alignment="reference") -> io.NodeOutput:
        sampler_fn = ddim.inversion_sampler(scheme)
        pnp_steps = int(pnp_steps or 0)
        pnp_plan.check_alignment(pnp_alignment)
        if steps < 2:
            # 1 step is [sigma(t=1), 0]: the "inverted" latent is the
            # source with almost no noise, and sampling gives the source back unedited.
            raise ValueError(f"steps is {steps}: DDIM inversion needs at least 2 steps (1 step only reaches "
                             "timestep 1, so nothing could be edited); use 50 (the reference) or at least 10")
        if not math.isclose(cfg, 1.0) and negative is None:
            raise ValueError(f"cfg is {cfg} but no negative conditioning is connected: connect one, or set cfg to 1")
        if latent is not None:
            samples = latent["samples"]
            if samples.ndim != 4:
                raise ValueError(f"latent must be [frames, channels, height, width], got shape {tuple(samples.shape)}")
            samples = samples.detach().to("cpu", torch.float32).contiguous()
            frames = samples.shape[0]
        elif images is not None:
            if vae is None:
                raise ValueError("images are connected but no vae: connect the VAE that encodes them, or give a latent")
            if images.ndim != 4:
                raise ValueError(f"images must be [frames, height, width, channels], got shape {tuple(images.shape)}")
            samples, frames = None, images.shape[0]
        else:
            raise ValueError("nothing to invert: connect a latent (VAE Encode of the frames), or images and a vae")
        check_control_hints(frames, conditioning=conditioning, negative=negative)
        if pnp_steps > pnp_plan.max_pnp_steps(steps, pnp_alignment):
            raise ValueError(f"pnp_steps is {pnp_steps} but {steps} steps with the {pnp_alignment} alignment have "
                             f"records for at most {pnp_plan.max_pnp_steps(steps, pnp_alignment)} sampling steps: "
                             f"lower pnp_steps (the reference injects 5 to 40 of 50)")
        targets = pnp_plan.targets_for(model.model.diffusion_model) if pnp_steps else ()
        if pnp_steps and not targets:
            raise ValueError("pnp_steps: this model has none of the decoder blocks PnP records (SD1.5's output "
                             "blocks 3-9): set pnp_steps to 0")
        # PnP's uncond branch: the negative (the reference: the empty prompt), else the source prompt
        pnp_uncond = conditioning if negative is None else negative
        pnp_shared = pnp_glue.same_conditioning(conditioning, pnp_uncond)

        m = model.clone()
        # Inversion reconstructs the source: full-frame attention yes, layout modulation never.
        m.model_options.setdefault("transformer_options", {})[DISABLE_MODULATION_KEY] = True
        sigmas = ddim_sigmas(m, steps).flip(0)  # ascending: 0, s_1, ..., s_max
        guided = not math.isclose(cfg, 1.0)

        cache = InversionCache(cache_folder(), max_bytes=cache_max_bytes())
        if use_cache and records_unet(stages_of(m.model_options.get("transformer_options", {}))):
            # An attention capture on the model records while the UNet runs: a cached result
            # would leave it empty (and an entry written now is keyed by the capture).
            logging.info("VideoGrain: DDIM Invert bypasses the inversion cache: the model carries an attention "
                         "capture, which needs the UNet to run")
            use_cache = False
        if use_cache:
            # Images are keyed by the pixels (every value hashed) and the VAE, so a hit skips the encode.
            source_key = ({"latent": samples} if samples is not None
                          else {"images": tensor_digest(images, sample=False), "vae": vae})
            key = make_key({**source_key, "model": m, "conditioning": conditioning, "steps": steps,
                            "cfg": cfg, "negative": negative if guided else None, "sigmas": sigmas,
                            "scheme": scheme,
                            # only with PnP on, so that entries without features keep their keys
                            **({"pnp": {"steps": pnp_steps, "alignment": pnp_alignment, "format": BANK_FORMAT,
                                        "layers": [t.name for t in targets], "dtype": str(FeatureBank.store_dtype()),
                                        "uncond": None if pnp_shared else pnp_uncond}} if pnp_steps else {})},
                           hook=host_fingerprint)
            inv, status = cache.load(key)
            if inv is not None and (inv.features is not None or not pnp_steps):
                return io.NodeOutput({"samples": inv.latent.clone()}, inv)
            if status.startswith("damaged"):
                logging.warning("VideoGrain: inversion cache entry %s was %s; recomputing", key[:12], status)
        if samples is None:
            samples = encode_frames(vae, images)

        trajectory: list[torch.Tensor] = []
        extra = {"trajectory": trajectory}
        bank, run_model, uncond = None, m, (negative if guided else conditioning)
        if pnp_steps:
            run_model, bank, options = _pnp_recorder(m, targets, samples.shape, sigmas, scheme, pnp_steps,
                                                     pnp_alignment, pnp_shared, guided)
            extra["call_options"] = options
            if pnp_plan.needs_top_call(scheme, pnp_alignment, pnp_steps):
                extra["top_call"] = True
            if not guided:
                uncond = pnp_uncond  # evaluated only in the recorded calls
        out = run_sampler(run_model, sampler_fn, extra, sigmas, conditioning, uncond, cfg, samples)
        if bank is not None and bank.missing():
            raise RuntimeError(f"PnP: {len(bank.missing())} feature records were not made (e.g. "
                               f"{bank.missing()[0]}): something else changed how the UNet runs")
        inv = ddim.Inversion(latent=out.detach().to("cpu", torch.float32), trajectory=torch.stack(trajectory),
                             sigmas=sigmas.float(), steps=len(sigmas) - 1, source=samples, scheme=scheme,
                             features=bank)
        if use_cache:
            try:
                cache.save(key, inv)
            except OSError as e:  # a full disk must not fail the run
                logging.warning("VideoGrain: could not write the inversion cache: %s", e)
        return io.NodeOutput({"samples": inv.latent.clone()}, inv)


def _pnp_recorder(m, targets, latent_shape, sigmas, scheme, pnp_steps, alignment, shared, guided):
    """A clone of the inversion model that records PnP features, its bank and call options."""
    steps = len(sigmas) - 1
    plan = pnp_plan.record_plan(steps, alignment, pnp_steps)
    bank = FeatureBank(steps=pnp_steps, alignment=alignment, scheme=scheme, sigmas=sigmas.float(),
                       frames=latent_shape[0], latent_hw=latent_shape[-2:], targets=targets, shared=shared,
                       source_index={step: k for k, step in plan.items()})
    recorder = m.clone()
    pnp_glue.install(recorder, PnPRun("record", bank), targets)
    branches = bank.branches
    # at cfg 1 the host runs no uncond branch: the recorded calls run it apart (pnp_glue.split_uncond)
    split = not guided and not shared
    return recorder, bank, pnp_glue.record_options(plan, branches, split)


NODES = [VideoGrainDDIMInvert]
