"""P2P Control: a Video-P2P prompt pair checked, aligned and encoded (VIDEO_P2P.md
sections 6-8). The alignment lives in videograin_core.p2p; this node hands it the host
CLIP's own tokenizer and encodes the two prompts as CLIPTextEncode would."""
from __future__ import annotations

import dataclasses

import torch
from comfy_api.latest import io

from ..videograin_core.p2p.control import build_control, conditioning_digest

from .wire_types import P2P

MODES = ("word swap", "refine")


def _sd15_windows(clip, text: str):
    tokens = clip.tokenize(text)
    if not isinstance(tokens, dict) or len(tokens) != 1:
        names = ", ".join(sorted(tokens)) if isinstance(tokens, dict) else type(tokens).__name__
        raise ValueError(f"clip: VideoGrain P2P needs an SD1.5 CLIP (one CLIP-L text encoder); this CLIP has text "
                         f"encoders {names}. Load an SD1.5 checkpoint.")
    (windows,) = tokens.values()
    return windows


def host_tokenizer(clip):
    """tokenize(text) -> [start, ids..., end] with the host CLIP's tokenizer: the token ids
    of every window without the start/end/padding markers, between one start and one end
    marker (a prompt longer than one window comes back longer than 77, which the core
    refuses). Embedding vectors are passed on as they are (the core refuses them)."""
    empty = [t[0] for t in _sd15_windows(clip, "")[0]]
    if len(empty) < 2:
        raise ValueError("clip: its tokenizer adds no start/end markers; VideoGrain P2P needs an SD1.5 CLIP")
    start, end = int(empty[0]), int(empty[1])
    markers = {int(t) for t in empty if not isinstance(t, torch.Tensor) or t.ndim == 0}

    def tokenize(text: str) -> list:
        ids = []
        for window in _sd15_windows(clip, text):
            for t in window:
                tok = t[0]
                if isinstance(tok, torch.Tensor) and tok.ndim > 0:
                    ids.append(tok)
                elif int(tok) not in markers:
                    ids.append(int(tok))
        return [start, *ids, end]
    return tokenize


class VideoGrainP2PControl(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="VideoGrainP2PControl",
            display_name="VideoGrain P2P Control",
            category="VideoGrain",
            description="Video-P2P: aligns a source prompt (what the video shows) with a target prompt (the edit) "
                        "token by token, encodes both, and outputs the attention control for a P2P sampler: the "
                        "target's cross-attention maps are taken from the source's for the words that did not "
                        "change. Prompts: plain words, at most 77 tokens, no (word:1.2) weights or embeddings.",
            inputs=[
                io.Clip.Input("clip", tooltip="the SD1.5 CLIP (CLIP Set Last Layer is honoured)"),
                io.String.Input("source_prompt", multiline=True, default="",
                                tooltip="describes the source video, e.g. 'a man is driving a motorbike'"),
                io.String.Input("target_prompt", multiline=True, default="",
                                tooltip="the edit, e.g. 'a Spider-Man is driving a motorbike' (word swap) or "
                                        "'an origami rabbit is jumping' (refine: words added)"),
                io.Combo.Input("mode", options=list(MODES), default="refine",
                               tooltip="word swap: same number of words, changed words swapped (their maps "
                                       "taken from the source word); refine: any change, the tokens the two "
                                       "prompts share keep the source's maps, added tokens their own"),
                io.Float.Input("cross_replace", default=0.2, min=0.0, max=1.0, step=0.01,
                               tooltip="cross-attention control during this first fraction of the steps"),
                io.Float.Input("self_replace", default=0.5, min=0.0, max=1.0, step=0.01,
                               tooltip="self/temporal attention replacement during this first fraction of the "
                                       "steps (used by the P2P sampler)"),
                io.String.Input("reweight", default="",
                                tooltip="'word: factor, word: factor' - multiplies the target words' attention "
                                        "maps (no renormalisation; negative allowed) inside the cross window, "
                                        "e.g. 'origami: 2'. Whole words of the target prompt."),
                io.String.Input("blend_source_word", default="", optional=True,
                                tooltip="local blend: word(s) of the source prompt whose attention marks the "
                                        "area to edit (empty = no local blend from the source side)"),
                io.String.Input("blend_target_word", default="", optional=True,
                                tooltip="local blend: word(s) of the target prompt whose attention marks the "
                                        "area to edit; the mask is the union of both sides"),
                io.Float.Input("blend_threshold", default=0.3, min=0.0, max=1.0, step=0.01, optional=True,
                               tooltip="local blend mask threshold (of the frame's maximum)"),
                io.Boolean.Input("parity_bug", default=False, optional=True,
                                 tooltip="word swap only: reproduce the reference implementation's mapper bug "
                                         "(after a swapped word that changes its token count, later target "
                                         "tokens read the wrong source token); off = fixed"),
            ],
            outputs=[io.Conditioning.Output("source", display_name="source"),
                     io.Conditioning.Output("target", display_name="target"),
                     P2P.Output("p2p", display_name="p2p")],
        )

    @classmethod
    def execute(cls, clip, source_prompt, target_prompt, mode="refine", cross_replace=0.2, self_replace=0.5,
                reweight="", blend_source_word="", blend_target_word="", blend_threshold=0.3,
                parity_bug=False) -> io.NodeOutput:
        if clip is None:
            raise ValueError("clip: the CLIP input is empty (the checkpoint has no text encoder)")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        # Every check (and the alignment) before anything is encoded.
        control = build_control(source_prompt, target_prompt, host_tokenizer(clip), mode=mode,
                                cross_replace=float(cross_replace), self_replace=float(self_replace),
                                reweight=reweight or "", blend_source_word=blend_source_word or "",
                                blend_target_word=blend_target_word or "", blend_threshold=float(blend_threshold),
                                parity_bug=bool(parity_bug))
        out = []
        for name, text in (("source_prompt", source_prompt), ("target_prompt", target_prompt)):
            conds = clip.encode_from_tokens_scheduled(clip.tokenize(text))
            cond = conds[0][0]
            if cond.shape[-1] != 768:
                raise ValueError(f"clip: VideoGrain P2P needs an SD1.5 CLIP (768-wide text embeddings), this one "
                                 f"gives {cond.shape[-1]}")
            if cond.shape[1] != control.token_count:
                raise ValueError(f"{name}: encoded to {cond.shape[1]} tokens, not the {control.token_count} of one "
                                 f"CLIP window the alignment assumes")
            out.append(conds)
        # the sampler checks that it gets these very conditionings (not another prompt pair's)
        control = dataclasses.replace(control, source_digest=conditioning_digest(out[0][0][0]),
                                      target_digest=conditioning_digest(out[1][0][0]))
        return io.NodeOutput(out[0], out[1], control)


NODES = [VideoGrainP2PControl]
