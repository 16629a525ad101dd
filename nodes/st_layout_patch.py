"""ST-Layout Patch: the method's attention inside the host's UNet, through the public
attention-replace patch points only. The runtime lives in
videograin_core.attention.runtime; this node finds the transformer blocks, chains any
replace already registered, and checks inputs before sampling starts."""
from __future__ import annotations

import logging
import os
import re

import torch
from comfy_api.latest import io

from ..videograin_core.attention.st_layout import layout_attention
from ..videograin_core.attention.batch_layout import GROUPS_KEY, BatchLayoutSlot, publish_call
from ..videograin_core.attention.frame_norm import FramePooledGroupNorm
from ..videograin_core.attention.runtime import SELF_BRANCHES, SIZE_TERMS, PatchOptions, StageRuntime, STLayoutRuntime

from .wire_types import LAYOUT
WRAPPER_KEY = "videograin_st_layout"
BATCH_LAYOUT_KEY = "videograin_batch_layout"

# The GroupNorms the reference pools over frames: both of every ResBlock (in_layers.0,
# out_layers.0) and the UNet's output norm (out.0); the transformer blocks' own norms stay per frame.
_POOLED_NORM = re.compile(r"^((input_blocks|output_blocks)\.\d+\.0|middle_block\.\d+)\.(in_layers|out_layers)\.0$|^out\.0$")

# input_blocks.N.<i>.transformer_blocks.K, middle_block.<i>.transformer_blocks.K, output_blocks.N...
_BLOCK = re.compile(r"^(input_blocks|middle_block|output_blocks)\.(?:(\d+)\.)?\d+\.transformer_blocks\.(\d+)$")
_BLOCK_NAME = {"input_blocks": "input", "middle_block": "middle", "output_blocks": "output"}


def transformer_blocks(diffusion_model) -> list[tuple[str, int, int]]:
    """(block name, block number, transformer index) of every transformer block, the keys
    the host's attention replace patches are looked up by."""
    out = []
    for name, module in diffusion_model.named_modules():
        m = _BLOCK.match(name)
        if m is None or getattr(module, "attn2", None) is None:
            continue
        kind, number, index = m.group(1), m.group(2), int(m.group(3))
        out.append((_BLOCK_NAME[kind], int(number) if number is not None else 0, index))
    return out


def pooled_norm_names(diffusion_model) -> list[str]:
    """Names (under diffusion_model) of the GroupNorm modules the frame-pooled norm replaces."""
    return [name for name, module in diffusion_model.named_modules()
            if isinstance(module, torch.nn.GroupNorm) and _POOLED_NORM.match(name)]


def add_batch_layout_publisher(patched, slot: BatchLayoutSlot) -> None:
    """A DIFFUSION_MODEL wrapper that describes each UNet call's batch (chunks x frames)
    once, for the attention runtime (transformer_options) and the pooled norms (the slot),
    and clears the slot after the call so that nothing reading it acts outside it."""
    import comfy.patcher_extension

    def publish_batch_layout(executor, x, *args, **kwargs):
        options = args[4] if len(args) > 4 else kwargs.get("transformer_options")
        publish_call(slot, x.shape[0], options)
        try:
            return executor(x, *args, **kwargs)
        finally:
            slot.current = None

    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, BATCH_LAYOUT_KEY,
                                 publish_batch_layout)


def add_frame_pooled_norms(patched, slot: BatchLayoutSlot) -> int:
    """Object patches on the forward of every pooled GroupNorm (never a module replacement,
    so LoRA weight patches keep applying); each calls the forward it replaces."""
    diffusion_model = patched.model.diffusion_model
    names = pooled_norm_names(diffusion_model)
    for name in names:
        key = f"diffusion_model.{name}.forward"
        current = patched.get_model_object(key)
        if isinstance(current, FramePooledGroupNorm):  # already pooled by an earlier patch: once is enough
            continue
        patched.add_object_patch(key, FramePooledGroupNorm(current, slot))
    return len(names)


def per_sequence_shape(shape, transformer_options) -> tuple:
    """The latent shape of one sequence: a sampler that stacks branches (P2P: [source;
    target]) announces how many with GROUPS_KEY, each of shape[0] // groups frames."""
    groups = int((transformer_options or {}).get(GROUPS_KEY, 1) or 1)
    shape = tuple(shape)
    if groups > 1 and shape and shape[0] % groups == 0:
        return (shape[0] // groups,) + shape[1:]
    return shape


def install_runtime(patched, runtime, previous_options: dict) -> None:
    """The runtime's attn1/attn2 functions on every transformer block of `patched` (a
    clone), each chaining the replace `previous_options` had for its layer."""
    for key in transformer_blocks(patched.model.diffusion_model):
        patched.set_model_attn1_replace(runtime.make_attn1(_existing(previous_options, "attn1", key)), *key)
        patched.set_model_attn2_replace(runtime.make_attn2(_existing(previous_options, "attn2", key)), *key)


def _run(fn, q, k, v, extra_options, *args, **kwargs):
    """A host attention function called as the host's transformer blocks call it; arguments
    a host passes an attention replace beyond (q, k, v, extra_options) go on to it."""
    kwargs = {"attn_precision": extra_options.get("attn_precision"), "transformer_options": extra_options, **kwargs}
    return fn(q, k, v, extra_options["n_heads"], *args, **kwargs)


def _host_attention(q, k, v, extra_options, *args, **kwargs):
    # Resolved at call time: the host picks its attention implementation at start-up.
    import comfy.ldm.modules.attention as attention
    return _run(attention.optimized_attention, q, k, v, extra_options, *args, **kwargs)


FRAMES_ATTENTION_ENV = "VIDEOGRAIN_FULL_FRAME_ATTENTION"
_announced: set = set()


def _torch_version() -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", torch.__version__)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


# torch's fused CPU kernel for scaled_dot_product_attention; read once, not per attention call
_CPU_SDPA_FUSED = _torch_version() >= (2, 3)


def frames_attention_kernel(device: torch.device):
    """The host attention function that runs the unmodulated self-attention over all frames.

    On the CPU the host uses its sub-quadratic fallback unless told otherwise. That
    function sizes its query chunks to free memory and holds [chunk x all keys] logits per
    head: right for one frame's keys, but with F frames' keys its memory grows with F
    squared (about 2 GiB for 64 frames of 8x8 tokens) and it runs 3-4x slower than torch's
    fused CPU kernel. There the host's own SDPA function (registered as "pytorch") takes
    its place. A choice the user made (--use-quad/split-cross-attention, any GPU setup) is
    kept, and so is everything when VIDEOGRAIN_FULL_FRAME_ATTENTION=host."""
    import comfy.ldm.modules.attention as attention
    from comfy.cli_args import args

    chosen = attention.optimized_attention
    if os.environ.get(FRAMES_ATTENTION_ENV, "").strip().lower() == "host":
        return chosen
    registry = getattr(attention, "get_attention_function", None)  # older hosts: the module's functions
    sub_quad = registry("sub_quad", None) if registry else getattr(attention, "attention_sub_quad", None)
    sdpa = registry("pytorch", None) if registry else getattr(attention, "attention_pytorch", None)
    if (device.type == "cpu" and chosen is sub_quad and sdpa is not None and _CPU_SDPA_FUSED
            and not args.use_quad_cross_attention and not args.use_split_cross_attention):
        if "cpu" not in _announced:
            _announced.add("cpu")
            logging.info("VideoGrain: self-attention over all frames uses the host's pytorch (SDPA) attention on "
                         "the CPU instead of sub-quadratic attention (memory linear in the frame count); "
                         "%s=host keeps the host's choice", FRAMES_ATTENTION_ENV)
        return sdpa
    return chosen


def _frames_attention(q, k, v, extra_options, *args, **kwargs):
    return _run(frames_attention_kernel(q.device), q, k, v, extra_options, *args, **kwargs)


def _existing(model_options: dict, which: str, key: tuple):
    """The replace the host would have called for this layer: the (block, number, index)
    entry, else the (block, number) entry, as BasicTransformerBlock looks them up. The
    pack's bare stage runtime (a capture node applied before this patch) is looked
    through: this patch's runtime runs the same stages, and chaining it would run them
    twice per call."""
    table = model_options.get("transformer_options", {}).get("patches_replace", {}).get(which, {})
    fn = table.get(key) or table.get(key[:2])
    while fn is not None and type(getattr(fn, "videograin_runtime", None)) is StageRuntime:
        fn = fn.videograin_previous
    return fn


def pack_runtime(model):
    """The pack's attention runtime the model's attn1 replaces belong to (the ST-Layout
    Patch's, or the bare one a stage node installed), or None."""
    table = model.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn1", {})
    for fn in table.values():
        rt = getattr(fn, "videograin_runtime", None)
        if rt is not None:
            return rt
    return None


def _check_sd15(model) -> list:
    diffusion_model = getattr(model.model, "diffusion_model", None)
    config = getattr(getattr(model.model, "model_config", None), "unet_config", {}) or {}
    context_dim = config.get("context_dim")
    if diffusion_model is None or context_dim != 768:
        raise ValueError(f"model: VideoGrain needs a Stable Diffusion 1.5 family UNet (768-wide text context); "
                         f"this model has context_dim {context_dim}. Load an SD1.5 checkpoint.")
    blocks = transformer_blocks(diffusion_model)
    if not blocks:
        raise ValueError("model: no transformer blocks with cross-attention found in the UNet; VideoGrain needs an "
                         "SD1.5 family model")
    return blocks


class VideoGrainSTLayoutPatch(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="VideoGrainSTLayoutPatch",
            display_name="VideoGrain ST-Layout Patch",
            category="VideoGrain",
            description="Patches the model's attention: full space-time self-attention over all frames, and "
                        "region-aware modulation of self- and cross-attention (ST-Layout Attn) in the first "
                        "steps. Returns a patched copy; the input model is unchanged.",
            inputs=[
                io.Model.Input("model"),
                LAYOUT.Input("layout", tooltip="the layout output of VideoGrain Layout Conditioning"),
                io.Boolean.Input("full_frame_attention", default=True,
                                 tooltip="self-attention queries attend to every frame's keys (all layers)"),
                io.Float.Input("self_strength", default=0.3, min=0.0, max=1.0, step=0.01,
                               tooltip="self-attention modulation strength (0 = off)"),
                io.Float.Input("cross_strength", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="cross-attention modulation strength (0 = off)"),
                io.Float.Input("end_percent", default=0.3, min=0.0, max=1.0, step=0.01,
                               tooltip="modulate during this fraction of the steps (the first ones)"),
                io.Combo.Input("self_branch", options=list(SELF_BRANCHES), default="uncond",
                               tooltip="CFG branch whose self-attention is modulated (the reference: uncond). "
                                       "At cfg 1 the host runs no uncond branch, so 'uncond' modulates no "
                                       "self-attention there (cross-attention still is)"),
                io.Combo.Input("size_term", options=list(SIZE_TERMS), default="reference",
                               tooltip="self-attention size term: reference (/F*F*h*w) or paper (/F*h*w)"),
                io.Boolean.Input("modulate_full_resolution", default=False,
                                 tooltip="also modulate the layers at the latent's own resolution"),
                io.Boolean.Input("frame_pooled_group_norm", default=True, optional=True,
                                 tooltip="ResNet and output GroupNorms take their statistics over all frames of "
                                         "a branch, as the official (pseudo-3D) UNet does; off = per frame, as "
                                         "an image UNet"),
            ],
            outputs=[io.Model.Output("patched_model", display_name="model")],
        )

    @classmethod
    def execute(cls, model, layout, full_frame_attention=True, self_strength=0.3, cross_strength=1.0,
                end_percent=0.3, self_branch="uncond", size_term="reference",
                modulate_full_resolution=False, frame_pooled_group_norm=True) -> io.NodeOutput:
        import comfy.model_sampling
        import comfy.patcher_extension

        blocks = _check_sd15(model)
        options = PatchOptions(full_frame_attention=bool(full_frame_attention), self_strength=float(self_strength),
                               cross_strength=float(cross_strength), end_percent=float(end_percent),
                               self_branch=self_branch, size_term=size_term,
                               modulate_full_resolution=bool(modulate_full_resolution))
        if getattr(layout, "regions", None) is None:
            raise ValueError("layout: expected a VIDEOGRAIN_LAYOUT from VideoGrain Layout Conditioning")
        model_sampling = model.get_model_object("model_sampling")
        if not isinstance(model_sampling, comfy.model_sampling.ModelSamplingDiscrete):
            # treg reads the 0..999 timestep of discrete sampling; other samplings map sigma elsewhere
            logging.warning("VideoGrain: the model's sampling is %s, not SD1.5's discrete schedule: treg(t) expects "
                        "timesteps 0..999, so the layout modulation will be about 0. Remove the model sampling "
                        "patch (e.g. ModelSamplingContinuousEDM) before the ST-Layout Patch.",
                        type(model_sampling).__name__)
        runtime = STLayoutRuntime(layout, options, _host_attention, model_sampling.timestep, layout_attention,
                                  frames_attention=_frames_attention)

        patched = model.clone()
        slot = BatchLayoutSlot()
        add_batch_layout_publisher(patched, slot)
        if frame_pooled_group_norm:
            add_frame_pooled_norms(patched, slot)
        for key in blocks:
            patched.set_model_attn1_replace(runtime.make_attn1(_existing(model.model_options, "attn1", key)), *key)
            patched.set_model_attn2_replace(runtime.make_attn2(_existing(model.model_options, "attn2", key)), *key)

        def check_before_sampling(executor, noise, *args, **kwargs):
            # Runs once per sampling call, before the first step: clear errors instead of
            # a failure deep inside the UNet.
            guider = executor.class_obj
            to = getattr(guider, "model_options", {}).get("transformer_options", {})
            runtime.check_latent(per_sequence_shape(noise.shape, to))
            if not to.get("videograin_disable_modulation"):
                for c in getattr(guider, "original_conds", {}).get("positive", []) or []:
                    ca = c.get("cross_attn") if isinstance(c, dict) else None
                    if ca is not None:
                        runtime.check_positive(ca.shape[1])
            return executor(noise, *args, **kwargs)

        patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY,
                                     check_before_sampling)
        return io.NodeOutput(patched)


NODES = [VideoGrainSTLayoutPatch]
