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
Null-text mode (section 4): the shared null embeddings are optimised first (or read from
the cache) by p2p_null_text, and P2PGuider gives the source rows' uncond the step's one.
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
from ..videograin_core.p2p.null_text import INNER_STEPS
from ..videograin_core.p2p.sampler import sample_p2p
from ..videograin_core.p2p.stage import P2PCrossStage, P2PSelfStage, P2PTemporalReplace
from ..videograin_core.tuning.temporal import TEMPORAL_REPLACE_KEY, TemporalBlockPatch
from ..videograin_core.sampling import ddim
from . import p2p_null_text
from .host_glue import check_control_hints, has_context_windows, run_guider
from .sample import _check_schedule
from .st_layout_patch import (_check_sd15, _frames_attention, _host_attention, add_batch_layout_publisher,
                              install_runtime, pack_runtime)
from .wire_types import INVERSION, P2P

SELF_REPLACE_MAPS = ("spatial", "temporal", "spatial + temporal")
SOURCE_MODES = ("direct", "fast", "null-text")


class P2PGuider(comfy.samplers.CFGGuider):
    """CFG with one scale per half of a stacked [source F; target F] latent; in null-text
    mode the source half's uncond takes the optimised embedding of the step."""

    def __init__(self, model_patcher, frames: int, cfg_source: float, cfg_target: float,
                 null_embeddings: torch.Tensor | None = None, sigmas: torch.Tensor | None = None):
        super().__init__(model_patcher)
        self.frames = int(frames)
        self.cfg = float(cfg_target)
        self.cfg_source = float(cfg_source)
        self.null_embeddings = null_embeddings    # [steps, 1, tokens, 768] or None
        self.null_sigmas = None if sigmas is None else sigmas.detach().float().cpu()

    def _negative(self, timestep):
        """The negative conds of this call. In null-text mode the source rows' uncond is the
        step's optimised embedding and the target rows' the plain negative (VIDEO_P2P.md
        section 5). The host processes conds once per run, so a per-step, per-row negative
        cannot go through set_conds: it is a copy of the processed entry with a stacked
        [null_i x F; negative x F] cross-attention tensor, made here for each call."""
        negative = self.conds.get("negative")
        if self.null_embeddings is None:
            return negative
        sigma = torch.as_tensor(timestep).detach().flatten()[0].float().cpu()
        i = min(int(torch.argmin((self.null_sigmas - sigma).abs())), self.null_embeddings.shape[0] - 1)
        neg = negative[0]["model_conds"]["c_crossattn"].cond
        f = self.frames
        null = self.null_embeddings[i].to(neg)
        return p2p_null_text.with_crossattn(negative, torch.cat([null.expand(f, -1, -1), neg.expand(f, -1, -1)]))

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        positive, negative = self.conds.get("positive"), self._negative(timestep)
        if self.cfg == 1.0 and self.cfg_source == 1.0:
            (cond,) = comfy.samplers.calc_cond_batch(self.inner_model, [positive], x, timestep, model_options)
            return cond
        cond, uncond = comfy.samplers.calc_cond_batch(self.inner_model, [positive, negative], x, timestep,
                                                      model_options)
        f = self.frames
        scale = x.new_tensor([self.cfg_source] * f + [self.cfg] * (x.shape[0] - f)).view(-1, *[1] * (x.ndim - 1))
        return uncond + (cond - uncond) * scale


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
    if has_context_windows(model):
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
                               tooltip="guidance of the target (and of the source in direct and null-text modes)"),
                io.Combo.Input("source_mode", options=list(SOURCE_MODES), default="direct",
                               tooltip="direct: the source branch replays the inversion (exact reconstruction; "
                                       "the target gets the same per-step correction, so unchanged prompts give "
                                       "the source back); fast: the reference's --fast, the source sampled at "
                                       "guidance 1; null-text: the paper's, the source sampled at cfg with one "
                                       "unconditional embedding per step optimised to re-trace the inversion "
                                       "(gradients through the UNet: slow, cached on disk)"),
                io.Combo.Input("frame_attention", options=list(FRAME_MODES), default="all frames",
                               tooltip="self-attention keys of each frame: all frames of its branch (full-frame "
                                       "attention), frame 0 (Video-P2P), or frame 0 and the previous frame "
                                       "(Tune-A-Video)"),
                io.Combo.Input("self_replace_maps", options=list(SELF_REPLACE_MAPS), default="spatial", optional=True,
                               tooltip="which maps the self replacement (P2P Control's self_replace window) sets to "
                                       "the source's: spatial self-attention at grids up to 32x32 (image "
                                       "prompt-to-prompt; works on any model), the T2S temporal attention (the "
                                       "Video-P2P reference's; needs a model from T2S Tune / T2S Load), or both"),
                io.Int.Input("inner_steps", default=INNER_STEPS, min=1, max=1000, optional=True,
                             tooltip="null-text mode: at most this many Adam steps per denoising step (the "
                                     "reference: 10; it stops early once the step's loss is small)"),
                io.Boolean.Input("use_cache", default=True, optional=True,
                                 tooltip="null-text mode: reuse identical earlier optimised embeddings from disk"),
            ],
            outputs=[io.Latent.Output("target_latent", display_name="latent"),
                     io.Latent.Output("source_latent", display_name="source_latent")],
        )

    @classmethod
    def execute(cls, model, source, target, p2p, negative, inversion, cfg=7.5, source_mode="direct",
                frame_attention="all frames", inner_steps=INNER_STEPS, use_cache=True,
                self_replace_maps="spatial") -> io.NodeOutput:
        if source_mode not in SOURCE_MODES:
            raise ValueError(f"source_mode must be one of {', '.join(SOURCE_MODES)}, got {source_mode!r}")
        null_mode = source_mode == "null-text"
        if null_mode:
            if isinstance(inner_steps, bool) or not isinstance(inner_steps, int) or inner_steps < 1:
                raise ValueError(f"inner_steps must be a whole number of at least 1 in null-text mode (the "
                                 f"reference: 10), got {inner_steps!r}")
            if float(cfg) == 1.0:
                raise ValueError("cfg is 1 but null-text mode optimises the unconditional embedding, which guidance "
                                 "1 ignores: use cfg 7.5 (the reference), or source_mode fast / direct")
        if frame_attention not in FRAME_MODES:
            raise ValueError(f"frame_attention must be one of {', '.join(FRAME_MODES)}, got {frame_attention!r}")
        if self_replace_maps not in SELF_REPLACE_MAPS:
            raise ValueError(f"self_replace_maps must be one of {', '.join(SELF_REPLACE_MAPS)}, got "
                             f"{self_replace_maps!r}")
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
        nulls = None
        if null_mode:
            # the source branch as sampling runs it (one sequence per chunk; the P2P stages only
            # ever touch the target rows), so the optimisation does not depend on the target
            src_model = m.clone()
            if frame_attention != "all frames":
                with_stage(src_model.model_options.setdefault("transformer_options", {}),
                           FrameAttentionStage(frame_attention, _host_attention))
            nulls = p2p_null_text.null_embeddings(src_model, source, negative, inv, float(cfg), inner_steps,
                                                  use_cache=bool(use_cache))
        to = m.model_options.setdefault("transformer_options", {})
        to[GROUPS_KEY] = 2
        # outermost first: self replacement hands the source's q/k to the frame attention
        if "spatial" in self_replace_maps:
            with_stage(to, P2PSelfStage(control))
        if "temporal" in self_replace_maps:
            if not any(isinstance(p, TemporalBlockPatch) for p in m.object_patches.values()):
                logging.warning("VideoGrain P2P: self_replace_maps includes temporal but the model has no T2S "
                                "temporal attention (T2S Tune / T2S Load): only spatial maps can be replaced")
            to[TEMPORAL_REPLACE_KEY] = P2PTemporalReplace(control)
        if frame_attention != "all frames":
            with_stage(to, FrameAttentionStage(frame_attention, _host_attention))
        with_stage(to, P2PCrossStage(control))

        src_ca, tgt_ca = source[0][0], target[0][0]
        extra = {k: v for k, v in source[0][1].items() if k != "pooled_output"}
        positive = [[torch.cat([src_ca.expand(frames, -1, -1), tgt_ca.expand(frames, -1, -1)]), extra]]
        direct = source_mode == "direct"
        sigmas = inv.sigmas.flip(0)
        guider = P2PGuider(m, frames, cfg_source=1.0 if source_mode == "fast" else float(cfg), cfg_target=float(cfg),
                           null_embeddings=nulls, sigmas=sigmas)
        guider.set_conds(positive, negative)

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
