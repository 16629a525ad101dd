"""VideoGrain P2P Sample: the Video-P2P edit (VIDEO_P2P.md sections 5, 6 and 8).

One sampling run over the stacked latent [source F; target F] from the inversion, with
per-row conditioning (source rows the source prompt, target rows the target prompt, the
negative shared), through `P2PGuider` (a CFGGuider with decoupled guidance: each half its
own scale), announcing two sequences per chunk so that every part of the pack that
regroups frames (full-frame attention, ST-Layout modulation, trajectory attention, pooled
norms, the frame-attention variants) keeps the branches apart. The attention control runs
as stages on a clone of the model's options: frame attention (attn1), spatial self
replacement (attn1), the P2P cross stage (attn2). The core (videograin_core.p2p) does the
arithmetic; this node wires it into the host and refuses bad inputs before sampling.
"""
from __future__ import annotations

import logging

import comfy.samplers
import torch
from comfy_api.latest import io

from ..videograin_core.attention.batch_layout import GROUPS_KEY, BatchLayoutSlot
from ..videograin_core.attention.frame_attention import FRAME_MODES, FrameAttentionStage
from ..videograin_core.attention.runtime import STLayoutRuntime, with_stage
from ..videograin_core.p2p.blend import BlendStore
from ..videograin_core.p2p.control import P2PControl, conditioning_digest
from ..videograin_core.p2p.sampler import sample_p2p
from ..videograin_core.p2p.stage import P2PCrossStage, P2PSelfStage
from ..videograin_core.sampling import ddim
from .host_glue import check_control_hints, run_guider
from .sample import _check_schedule
from .st_layout_patch import (_check_sd15, _frames_attention, _host_attention, add_batch_layout_publisher,
                              install_runtime)
from .wire_types import INVERSION, P2P

SOURCE_MODES = ("direct", "fast")


class P2PGuider(comfy.samplers.CFGGuider):
    """CFG with one scale per half of a stacked [source F; target F] latent."""

    def __init__(self, model_patcher, frames: int, cfg_source: float, cfg_target: float):
        super().__init__(model_patcher)
        self.frames = int(frames)
        self.cfg = float(cfg_target)
        self.cfg_source = float(cfg_source)

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        positive, negative = self.conds.get("positive"), self.conds.get("negative")
        if self.cfg == 1.0 and self.cfg_source == 1.0:
            (cond,) = comfy.samplers.calc_cond_batch(self.inner_model, [positive], x, timestep, model_options)
            return cond
        cond, uncond = comfy.samplers.calc_cond_batch(self.inner_model, [positive, negative], x, timestep,
                                                      model_options)
        f = self.frames
        scale = x.new_tensor([self.cfg_source] * f + [self.cfg] * (x.shape[0] - f)).view(-1, *[1] * (x.ndim - 1))
        return uncond + (cond - uncond) * scale


def pack_runtime(model):
    """The pack's attention runtime the model's attn1 replaces belong to, or None."""
    table = model.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn1", {})
    for fn in table.values():
        rt = getattr(fn, "videograin_runtime", None)
        if rt is not None:
            return rt
    return None


def _single(conditioning, name: str) -> torch.Tensor:
    if not isinstance(conditioning, list) or len(conditioning) != 1 or not isinstance(conditioning[0], (list, tuple)):
        n = len(conditioning) if isinstance(conditioning, list) else type(conditioning).__name__
        raise ValueError(f"{name}: expected the P2P Control node's {name} conditioning (one entry), got {n} entries: "
                         f"wire it unaltered (no Conditioning Combine / Concat)")
    ca = conditioning[0][0]
    if not isinstance(ca, torch.Tensor) or ca.ndim != 3 or ca.shape[0] != 1:
        raise ValueError(f"{name}: expected one encoded prompt [1, tokens, 768], got "
                         f"{tuple(getattr(ca, 'shape', ()))}")
    return ca


def check_inputs(model, source, target, control, negative, inversion) -> int:
    """Every refusal before sampling, each naming its input. Returns the frame count."""
    if not isinstance(control, P2PControl):
        raise ValueError("p2p: expected a VIDEOGRAIN_P2P control from VideoGrain P2P Control")
    if not isinstance(inversion, ddim.Inversion):
        raise ValueError("inversion: expected a VIDEOGRAIN_INVERSION from VideoGrain DDIM Invert")
    if negative is None:
        raise ValueError("negative: connect a negative conditioning (the empty prompt \"\")")
    _check_sd15(model)
    opts = model.model_options
    to = opts.get("transformer_options", {})
    if opts.get("context_handler") is not None or to.get("ad_params") is not None or \
            to.get("context_window") is not None:
        raise ValueError("model: context windows (another pack's context options, e.g. AnimateDiff's or core's "
                         "context windows) cannot be used with P2P Sample: they slice the stacked [source; target] "
                         "batch across both branches. Remove them from the model")
    for name, cond, digest, tokens in (("source", source, control.source_digest, control.source_tokens),
                                       ("target", target, control.target_digest, control.target_tokens)):
        ca = _single(cond, name)
        if ca.shape[1] != control.token_count:
            raise ValueError(f"{name}: the conditioning has {ca.shape[1]} tokens but the P2P control was made for "
                             f"{control.token_count}: wire the P2P Control node's {name} output with its p2p output")
        if digest and conditioning_digest(ca) != digest:
            other = control.target_digest if name == "source" else control.source_digest
            hint = (" (source and target are swapped)" if other and conditioning_digest(ca) == other else "")
            raise ValueError(f"{name}: this is not the conditioning the P2P control was made for{hint}: wire the "
                             f"{name} and p2p outputs of the same VideoGrain P2P Control node (its {name} prompt "
                             f"is {control.source_prompt if name == 'source' else control.target_prompt!r})")
    _single(negative, "negative")
    frames = int(inversion.latent.shape[0])
    _check_schedule(model, inversion)
    rt = pack_runtime(model)
    layout = getattr(rt, "layout", None)
    if layout is not None and layout.frame_count not in (1, frames):
        raise ValueError(f"inversion: it holds {frames} frames but the model's ST-Layout layout has "
                         f"{layout.frame_count}: invert the same frames the layout was drawn for")
    check_control_hints(frames, source=source, target=target, negative=negative)
    return frames


class VideoGrainP2PSample(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="VideoGrainP2PSample",
            display_name="VideoGrain P2P Sample",
            category="VideoGrain",
            description="Video-P2P edit: denoises the source and the target side by side from the inversion in one "
                        "run (DDIM on the inversion's schedule); the target's cross-attention maps are taken from "
                        "the source's for the unchanged words, its self-attention maps from the source's early on, "
                        "and the local blend keeps everything outside the blend words' area. Outputs the edited "
                        "latent and the source's reconstruction.",
            inputs=[
                io.Model.Input("model", tooltip="SD1.5 model (plain, or patched by VideoGrain ST-Layout Patch / "
                                                "Trajectory Attention)"),
                io.Conditioning.Input("source", tooltip="the source output of VideoGrain P2P Control"),
                io.Conditioning.Input("target", tooltip="the target output of VideoGrain P2P Control"),
                P2P.Input("p2p", tooltip="the p2p output of the same VideoGrain P2P Control"),
                io.Conditioning.Input("negative", tooltip="the empty prompt \"\" (CLIP Text Encode)"),
                INVERSION.Input("inversion", tooltip="VideoGrain DDIM Invert of the clip with the source prompt; "
                                                    "scheme next-step is Video-P2P's"),
                io.Float.Input("cfg", default=7.5, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="guidance of the target (and of the source in direct mode)"),
                io.Combo.Input("source_mode", options=list(SOURCE_MODES), default="direct",
                               tooltip="direct: the source branch replays the inversion (exact reconstruction; "
                                       "the target gets the same per-step correction, so unchanged prompts give "
                                       "the source back); fast: the reference's --fast, the source sampled at "
                                       "guidance 1"),
                io.Combo.Input("frame_attention", options=list(FRAME_MODES), default="all frames",
                               tooltip="self-attention keys of each frame: all frames of its branch (full-frame "
                                       "attention), frame 0 (Video-P2P), or frame 0 and the previous frame "
                                       "(Tune-A-Video)"),
            ],
            outputs=[io.Latent.Output("target_latent", display_name="latent"),
                     io.Latent.Output("source_latent", display_name="source_latent")],
        )

    @classmethod
    def execute(cls, model, source, target, p2p, negative, inversion, cfg=7.5, source_mode="direct",
                frame_attention="all frames") -> io.NodeOutput:
        if source_mode not in SOURCE_MODES:
            raise ValueError(f"source_mode must be one of {', '.join(SOURCE_MODES)}, got {source_mode!r}")
        if frame_attention not in FRAME_MODES:
            raise ValueError(f"frame_attention must be one of {', '.join(FRAME_MODES)}, got {frame_attention!r}")
        control, inv = p2p, inversion
        frames = check_inputs(model, source, target, control, negative, inversion)
        if inv.scheme != "next-step":
            logging.info("VideoGrain P2P: the inversion used the %s scheme; Video-P2P's is next-step", inv.scheme)

        m = model.clone()
        rt = pack_runtime(model)
        if rt is None:
            # a plain model: the pack's runtime without a layout (full-frame attention when asked)
            rt = STLayoutRuntime.unmodulated(_host_attention, full_frame_attention=frame_attention == "all frames",
                                             frames_attention=_frames_attention)
            add_batch_layout_publisher(m, BatchLayoutSlot())
            install_runtime(m, rt, model.model_options)
        elif frame_attention == "all frames" and not rt.options.full_frame_attention:
            logging.warning("VideoGrain P2P: frame_attention is 'all frames' but the model's ST-Layout Patch has "
                            "full_frame_attention off: self-attention stays per frame")
        to = m.model_options.setdefault("transformer_options", {})
        to[GROUPS_KEY] = 2
        # outermost first: self replacement hands the source's q/k to the frame attention
        with_stage(to, P2PSelfStage(control))
        if frame_attention != "all frames":
            with_stage(to, FrameAttentionStage(frame_attention, _host_attention))
        with_stage(to, P2PCrossStage(control))

        src_ca, tgt_ca = source[0][0], target[0][0]
        extra = {k: v for k, v in source[0][1].items() if k != "pooled_output"}
        positive = [[torch.cat([src_ca.expand(frames, -1, -1), tgt_ca.expand(frames, -1, -1)]), extra]]
        direct = source_mode == "direct"
        guider = P2PGuider(m, frames, cfg_source=float(cfg) if direct else 1.0, cfg_target=float(cfg))
        guider.set_conds(positive, negative)

        sigmas = inv.sigmas.flip(0)
        steps = len(sigmas) - 1
        store = BlendStore(control.blend_source, control.blend_target, control.blend_threshold) \
            if control.has_blend else None
        blend_from = int(control.blend_start * steps) if store is not None else None
        replay = ddim.trajectory_reference(inv.trajectory) if direct else None
        latent = torch.cat([inv.latent, inv.latent]).float()
        out = run_guider(guider, sample_p2p, {"frames": frames, "replay": replay, "store": store,
                                              "blend_from": blend_from}, sigmas, latent)
        if store is not None and store.calls == 0:
            logging.warning("VideoGrain P2P: no cross-attention layer at 1/4 of the latent's size was found, so the "
                            "local blend had no maps and was not applied")
        out = out.detach().to("cpu", torch.float32)
        return io.NodeOutput({"samples": out[frames:].clone()}, {"samples": out[:frames].clone()})


NODES = [VideoGrainP2PSample]
