"""Layout Conditioning: the global prompt's conditioning with every local prompt's own
embeddings spliced in at its tokens (METHOD.md section 4), and the layout with the spans."""
from __future__ import annotations

import logging

import torch
from comfy_api.latest import io

from ..videograin_core.prompts.prompt_splice import interior_tokens, overlapping_spans, place_spans

from .wire_types import LAYOUT

log = logging.getLogger(__name__)


def _token_key(tok):
    # Textual-inversion embeddings come back from the tokenizer as tensors, not ids; key
    # them by content so the same embedding matches in the global and the local prompt.
    if isinstance(tok, torch.Tensor):
        return ("embedding", tuple(tok.shape), tuple(tok.flatten()[:16].tolist()))
    return tok


def _windows(clip, text: str, what: str):
    """The tokenizer's windows as lists of token keys (SD1.5: one text encoder, 'l')."""
    tokens = clip.tokenize(text)
    if not isinstance(tokens, dict) or len(tokens) != 1:
        names = ", ".join(sorted(tokens)) if isinstance(tokens, dict) else type(tokens).__name__
        raise ValueError(f"clip: VideoGrain needs an SD1.5 CLIP (one CLIP-L text encoder); this CLIP has "
                         f"text encoders {names}. Load an SD1.5 checkpoint.")
    (windows,) = tokens.values()
    return tokens, [[_token_key(t[0]) for t in w] for w in windows]


class VideoGrainLayoutConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="VideoGrainLayoutConditioning",
            display_name="VideoGrain Layout Conditioning",
            category="VideoGrain",
            description="Encodes the global prompt with the host's CLIP and overwrites each local prompt's tokens "
                        "with that local prompt encoded on its own. Use the output as the positive conditioning "
                        "and the layout for the ST-Layout Patch. Wire any negative conditioning as usual.",
            inputs=[
                io.Clip.Input("clip", tooltip="the SD1.5 CLIP (CLIP Set Last Layer is honoured)"),
                io.String.Input("global_prompt", multiline=True, default="",
                                tooltip="the whole edit; must contain every local prompt word for word"),
                LAYOUT.Input("layout", tooltip="regions from Local Prompt nodes"),
            ],
            outputs=[io.Conditioning.Output("positive"), LAYOUT.Output("encoded_layout", display_name="layout")],
        )

    @classmethod
    def execute(cls, clip, global_prompt, layout) -> io.NodeOutput:
        if clip is None:
            raise ValueError("clip: the CLIP input is empty (the checkpoint has no text encoder)")
        if not layout.regions:
            raise ValueError("layout: it has no regions; add at least one VideoGrain Local Prompt")
        if not (global_prompt or "").strip() and any(r.prompt for r in layout.regions):
            raise ValueError("global_prompt is empty: write the whole edit there; it must contain every local "
                             f"prompt word for word (local prompts: {', '.join(repr(p) for p in layout.prompts if p)})")
        g_tokens, g_windows = _windows(clip, global_prompt, "global_prompt")
        # Start, end and padding markers are whatever the tokenizer puts around an empty text.
        _, empty = _windows(clip, "", "marker")
        markers = set(empty[0])

        # Find every span before any encoding: a missing phrase is reported at once.
        locals_, inner_tokens = [], []
        for r in layout.regions:
            l_tokens, l_windows = _windows(clip, r.prompt, "local_prompt")
            inner = interior_tokens(l_windows, markers)
            inner_tokens.append([t for t, _ in inner])
            locals_.append((l_tokens, [p for _, p in inner]))
        spans = place_spans(g_windows, inner_tokens, markers, layout.prompts, global_prompt)
        for a, b in overlapping_spans(spans):
            log.warning("VideoGrain: local prompts %r and %r share words of the global prompt %r (one has no "
                        "occurrence of its own): the later one's embeddings overwrite the shared tokens. Write "
                        "each region's words separately in the global prompt.",
                        layout.prompts[a], layout.prompts[b], global_prompt)

        conds = clip.encode_from_tokens_scheduled(g_tokens)
        token_count = conds[0][0].shape[1]
        if conds[0][0].shape[-1] != 768:
            raise ValueError(f"clip: VideoGrain needs an SD1.5 CLIP (768-wide text embeddings), this one gives "
                             f"{conds[0][0].shape[-1]}")
        local_embeds = []
        for span, (l_tokens, positions) in zip(spans, locals_):
            if span is None:
                local_embeds.append(None)
                continue
            emb = clip.encode_from_tokens(l_tokens)  # the local prompt on its own, same clip_layer
            local_embeds.append(emb[0, positions])
        out = []
        for cond, extra in conds:
            cond = cond.clone()
            for span, emb in zip(spans, local_embeds):
                if span is not None:
                    cond[:, span[0]:span[1]] = emb.to(cond)
            # pooled_output stays the global prompt's.
            out.append([cond, dict(extra)])
        return io.NodeOutput(out, layout.with_spans(spans, token_count=token_count))


NODES = [VideoGrainLayoutConditioning]
