"""VideoGrainAttentionCapture: records cross-attention maps and self-attention features
while a sampler runs the model it returns (videograin_core.capture.recorder).

Caching. The node clones the model, adds a capture stage holding a NEW recorder, and
returns the recorder as its own output. Readers (Attention View, Auto Regions) take that
recorder AND the sampler's LATENT: the latent orders them after the sampler and makes the
host re-run them whenever the sampler re-runs, and the recorder hands out only the take
whose run returned that very latent. So: the sampler cached -> readers cached with it
(their maps were read from that run); the sampler re-run on the same recorder (e.g. a
new cfg) -> a new take, read by the re-run readers; a latent no recorded run produced ->
a clear error, never another run's maps.

No layout needed: on a model the ST-Layout Patch has not patched, the node installs the
pack's bare attention runtime (the host's attention, plus the stages), so the source can
be captured while it is inverted, before any mask exists. DDIM Invert never loads (or
stores) a cached inversion for a model that carries a capture: the UNet must run to be
seen.
"""
from __future__ import annotations

import logging

from comfy_api.latest import io

from ..videograin_core.attention.runtime import StageRuntime, with_stage
from ..videograin_core.capture.recorder import AttentionRecorder, CaptureSpec, CaptureStage, parse_levels
from ..videograin_core.prompts.prompt_splice import SpanError, find_span, interior_tokens
from .layout_conditioning import _windows
from .st_layout_patch import _check_sd15, _host_attention
from .wire_types import CAPTURE, LAYOUT

WRAPPER_KEY = "videograin_capture"
CROSS_GRIDS = ["1/2+1/4", "1/4", "1/2", "1/8", "1/2+1/4+1/8", "1/1+1/2+1/4", "off"]
SELF_GRIDS = ["1/2", "1/4", "1/8", "1/1", "off"]


def _raw_replace(model_options: dict, which: str, key: tuple):
    table = model_options.get("transformer_options", {}).get("patches_replace", {}).get(which, {})
    return table.get(key) or table.get(key[:2])


def install_stage_runtime(patched, blocks) -> int:
    """Give every transformer block the pack's attention pipeline unless it has one (the
    ST-Layout Patch's, or this function's from an earlier capture). Returns the number of
    blocks that got the bare runtime."""
    runtime = StageRuntime(_host_attention)
    added = 0
    for key in blocks:
        for which, make, setter in (("attn1", runtime.make_attn1, patched.set_model_attn1_replace),
                                    ("attn2", runtime.make_attn2, patched.set_model_attn2_replace)):
            current = _raw_replace(patched.model_options, which, key)
            if getattr(current, "videograin_runtime", None) is None:
                setter(make(current), *key)
                added += which == "attn1"
    return added


def word_spans(clip, prompt: str, words: list[str]) -> tuple[list[tuple[str, tuple[int, ...]]], int]:
    """(word, token positions) for each word, and the prompt's token count."""
    if clip is None:
        raise ValueError("clip: words are given, so connect the CLIP that encodes the prompt (to find their tokens)")
    if not (prompt or "").strip():
        raise ValueError("prompt is empty: give the text of the conditioning the sampler gets, so the words' tokens "
                         "can be found in it")
    _, g_windows = _windows(clip, prompt, "prompt")
    _, empty = _windows(clip, "", "marker")
    markers = set(empty[0])
    out = []
    for word in words:
        _, w_windows = _windows(clip, word, "words")
        local = [t for t, _ in interior_tokens(w_windows, markers)]
        try:
            span = find_span(g_windows, local, markers, phrase=word, global_text=prompt)
        except SpanError:
            span = None
        if span is None:
            raise ValueError(f"words: {word!r} is not in the prompt {prompt!r} as whole words (or it crosses a 77-token "
                             f"window); give words that appear in the prompt, separated by commas")
        out.append((word, tuple(range(span[0], span[1]))))
    return out, sum(len(w) for w in g_windows)


class VideoGrainAttentionCapture(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="VideoGrainAttentionCapture",
            display_name="VideoGrain Attention Capture",
            category="VideoGrain",
            description="Records, while a sampler runs the returned model, each word's (and each local prompt's) "
                        "cross-attention map per frame and the self-attention features per frame (positive branch; "
                        "averaged over heads, layers at the chosen grids and steps). Wire the capture output and "
                        "the sampler's latent into Attention View or Auto Regions. Changes no result.",
            inputs=[
                io.Model.Input("model", tooltip="the model (ST-Layout patched or not) for DDIM Invert or Sample"),
                io.String.Input("words", default="", tooltip="comma-separated words of the prompt to map, e.g. "
                                                             "'man, dog'"),
                io.String.Input("prompt", default="", multiline=True,
                                tooltip="the text of the conditioning the sampler gets (the source prompt for DDIM "
                                        "Invert, the global prompt for Sample): where the words are looked up"),
                io.Combo.Input("cross_grid", options=CROSS_GRIDS, default=CROSS_GRIDS[0],
                               tooltip="token grids whose cross-attention is averaged, as fractions of the latent "
                                       "(1/2 is 32x32 at 512x512); maps come at the finest"),
                io.Combo.Input("self_grid", options=SELF_GRIDS, default=SELF_GRIDS[0],
                               tooltip="grid of the self-attention features for Auto Regions (the decoder's layers "
                                       "there; the reference clusters at 32x32 for 512x512), or off"),
                io.Clip.Input("clip", optional=True, tooltip="the CLIP that encodes the prompt (needed for words)"),
                LAYOUT.Input("layout", optional=True, tooltip="Layout Conditioning's layout: also one map per local "
                                                              "prompt"),
            ],
            outputs=[io.Model.Output("captured_model", display_name="model"),
                     CAPTURE.Output("capture", display_name="capture")],
        )

    @classmethod
    def execute(cls, model, words, prompt, cross_grid, self_grid, clip=None, layout=None) -> io.NodeOutput:
        import comfy.patcher_extension

        blocks = _check_sd15(model)
        cross_levels = parse_levels(cross_grid)
        self_levels = parse_levels(self_grid)
        named: list[tuple[str, tuple[int, ...]]] = []
        token_count = None
        wanted = [w.strip() for w in (words or "").split(",") if w.strip()]
        if wanted:
            named, token_count = word_spans(clip, prompt, list(dict.fromkeys(wanted)))
        if layout is not None:
            if getattr(layout, "regions", None) is None:
                raise ValueError("layout: expected a VIDEOGRAIN_LAYOUT from VideoGrain Layout Conditioning")
            if not layout.encoded:
                raise ValueError("layout: it has no token spans; wire Layout Conditioning's layout output")
            if token_count is not None and layout.token_count != token_count:
                raise ValueError(f"layout: it was encoded for {layout.token_count} tokens but the prompt has "
                                 f"{token_count}: give the global prompt of that Layout Conditioning as the prompt")
            token_count = layout.token_count
            have = {n for n, _ in named}
            for region, span in zip(layout.regions, layout.spans):
                if span is not None and region.prompt not in have:
                    named.append((region.prompt, tuple(range(span[0], span[1]))))
                    have.add(region.prompt)
        if (not named or not cross_levels) and not self_levels:
            raise ValueError("nothing to capture: give words (with clip and prompt) or a layout, with a cross_grid, "
                             "or choose a self_grid")
        spec = CaptureSpec(words=tuple(named) if cross_levels else (),
                           token_count=token_count if cross_levels else None,
                           cross_levels=cross_levels, self_level=min(self_levels) if self_levels else None)
        recorder = AttentionRecorder(spec)

        patched = model.clone()
        added = install_stage_runtime(patched, blocks)
        if added:
            logging.info("VideoGrain: attention capture installed the pack's attention runtime on %d blocks (the "
                         "model was not ST-Layout patched)", added)
        with_stage(patched.model_options.setdefault("transformer_options", {}), CaptureStage(recorder))

        def capture_run(executor, noise, *args, **kwargs):
            recorder.begin()
            try:
                out = executor(noise, *args, **kwargs)
            except BaseException:
                recorder.abort()
                raise
            recorder.end(out)
            return out

        patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, capture_run)
        return io.NodeOutput(patched, recorder)


NODES = [VideoGrainAttentionCapture]
