"""VideoGrainSample: deterministic DDIM from the inverted latent, on the inversion's schedule,
blending the latent outside the layout's regions back to the source at every step."""
from __future__ import annotations

import torch
from comfy_api.latest import io

from ..videograin_core.pnp import plan as pnp_plan
from ..videograin_core.pnp.hooks import PnPRun
from ..videograin_core.sampling import ddim
from . import pnp_glue
from .host_glue import check_control_hints, run_sampler
from .wire_types import INVERSION as Inversion

from .wire_types import LAYOUT as Layout

BLEND_TRAJECTORY = "inversion trajectory"
BLEND_RENOISED = "re-noised source"
BLEND_OFF = "off"


def _check_schedule(model, inv) -> None:
    """Every sigma of the inversion must be one of this model's (same noise schedule)."""
    table = model.get_model_object("model_sampling").sigmas.detach().float().cpu()
    s = inv.sigmas[1:].float()
    rel = ((table[None, :] - s[:, None]).abs() / s[:, None]).min(dim=1).values
    if s.numel() == 0 or bool((rel > 1e-4).any()):
        raise ValueError("the inversion was made with a model whose noise schedule differs from this model's: "
                         "invert with the same checkpoint you sample with")


def _blend_mask(layout, latent: torch.Tensor) -> torch.Tensor:
    frames, _, h, w = latent.shape
    union = layout.union_mask(frames)  # bool [F, H, W] at frame resolution
    mh, mw = union.shape[-2:]
    if abs(mh * w - mw * h) > 0.02 * mh * w:
        raise ValueError(f"layout masks are {mw}x{mh} but the latent is for {w * 8}x{h * 8} frames: build the "
                         "region masks with the Video Loader's transform so they match the frames")
    return ddim.latent_mask(union, frames, (h, w))


def _pnp_injector(model, inv, inject_step: int):
    """A clone of `model` that injects the inversion's PnP features in the first inject_step
    steps, and the sampler's call options; errors name the input, before any sampling."""
    bank = inv.features
    if bank is None:
        raise ValueError(f"inject_step is {inject_step} but the inversion has no PnP features: set pnp_steps to at "
                         f"least {inject_step} on VideoGrain DDIM Invert (or inject_step to 0)")
    if inject_step > bank.steps:
        raise ValueError(f"inject_step is {inject_step} but the inversion recorded PnP features for {bank.steps} "
                         f"steps only (pnp_steps on VideoGrain DDIM Invert): lower inject_step or raise pnp_steps")
    bank.check_for(inv.latent.shape, inv.sigmas, inv.scheme)
    have = set(pnp_plan.targets_for(model.model.diffusion_model))
    lacking = [t.name for t in bank.targets if t not in have]
    if lacking:
        raise ValueError(f"model: the inversion's PnP features include {', '.join(lacking)}, which this model "
                         f"does not have: sample with the model you inverted with")
    patched = model.clone()
    pnp_glue.install(patched, PnPRun("inject", bank), bank.targets)
    return patched, pnp_glue.inject_options(inject_step)


class VideoGrainSample(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="VideoGrainSample",
            display_name="VideoGrain Sample",
            category="VideoGrain",
            description="DDIM (eta 0) from the inversion on the same schedule, with latent blending outside the "
                        "layout's regions at every step.",
            inputs=[
                io.Model.Input("model", tooltip="The model, usually patched by ST-Layout Patch."),
                io.Conditioning.Input("positive"),
                io.Conditioning.Input("negative"),
                Inversion.Input("inversion"),
                io.Float.Input("cfg", default=7.5, min=0.0, max=100.0, step=0.1, round=0.01),
                Layout.Input("layout", optional=True, tooltip="Regions: outside their union the latent is "
                                                              "blended back to the source every step."),
                io.Combo.Input("blend", options=[BLEND_TRAJECTORY, BLEND_RENOISED, BLEND_OFF], default=BLEND_TRAJECTORY,
                               tooltip="inversion trajectory: the inverted latent at the same step (paper, "
                                       "deterministic); re-noised source: source + fresh seeded noise (reference "
                                       "code); off: no blending."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=False,
                             tooltip="Noise for the 're-noised source' blend only."),
                io.Int.Input("inject_step", default=0, min=0, max=999, optional=True,
                             tooltip="PnP feature injection: in the first inject_step steps the source's decoder "
                                     "features (recorded by DDIM Invert with pnp_steps >= this) replace the "
                                     "edit's own; 0 = off. The reference: off, or 5, 10, 12, 30 or 40 of 50"),
            ],
            outputs=[io.Latent.Output(display_name="latent")],
        )

    @classmethod
    def execute(cls, model, positive, negative, inversion, cfg, blend=BLEND_TRAJECTORY, seed=0,
                layout=None, inject_step=0) -> io.NodeOutput:
        inv = inversion
        _check_schedule(model, inv)
        extra = {}
        if inject_step:
            model, extra["call_options"] = _pnp_injector(model, inv, int(inject_step))
        check_control_hints(inv.latent.shape[0], positive=positive, negative=negative)
        sigmas = inv.sigmas.flip(0)  # descending, the inversion's schedule walked back
        mask = reference = None
        if layout is not None and blend != BLEND_OFF and layout.regions:
            mask = _blend_mask(layout, inv.latent)
            if blend == BLEND_TRAJECTORY:
                reference = ddim.trajectory_reference(inv.trajectory)
            else:
                reference = ddim.renoised_reference(inv.trajectory[0], sigmas, seed)
        out = run_sampler(model, ddim.sample_ddim_blend, {"mask": mask, "reference": reference, **extra}, sigmas,
                          positive, negative, cfg, inv.latent, seed=seed)
        return io.NodeOutput({"samples": out.detach().to("cpu", torch.float32)})


NODES = [VideoGrainSample]
