"""CLIP-T, CLIP-F, Warp-Err and Q-edit of an edited clip (METHOD.md section 11).

With e_t the CLIP image embedding of edited frame t (t = 0..F-1), s the CLIP text
embedding of the edit prompt (both projected into CLIP's joint space) and cos the cosine
similarity:
    CLIP-T   = 100 * mean_t cos(s, e_t)
    CLIP-F   = 100 * mean_t cos(e_t, e_{t+1})           (t = 0..F-2; NaN for one frame)
    Warp-Err = 100 * warp_error.warp_error(edited, SOURCE flows)   (mean absolute
               difference on [0, 1] over the pixels that pass the forward-backward check;
               see metrics.warp_error)
    Q-edit   = CLIP-T / Warp-Err
All four are on the paper's scale: the first three are x100, and Q-edit is the ratio of
two x100 figures, which is the ratio of the raw ones (the paper's 36.56 / 1.42 = 25.75).
Cosines are computed in float64.

Host-free: the caller hands in the embeddings, or callables that make them, and the flow
estimator (default: trajectories.flow's DIS).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from ..trajectories.flow import PairFlow, clip_flows
from .warp_error import warp_error_pairs

SCALE = 100.0


def cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """float64 [N]: row-wise cosine similarity of a [N, D] and b [N, D] (b may be [1, D])."""
    a = torch.as_tensor(a).to(torch.float64)
    b = torch.as_tensor(b).to(torch.float64)
    return torch.nn.functional.cosine_similarity(a, b.expand_as(a), dim=-1, eps=1e-12)


def clip_t(text_embed: torch.Tensor, frame_embeds: torch.Tensor) -> float:
    """Raw mean cosine of the text embedding [D] (or [1, D]) with each frame's [F, D]."""
    e = torch.as_tensor(frame_embeds)
    s = torch.as_tensor(text_embed).reshape(1, -1)
    _check_dims(s, e)
    return float(cosines(e, s).mean())


def clip_f(frame_embeds: torch.Tensor) -> float:
    """Raw mean cosine of consecutive frames' embeddings [F, D]; NaN for a single frame."""
    e = torch.as_tensor(frame_embeds)
    if e.shape[0] < 2:
        return math.nan
    return float(cosines(e[:-1], e[1:]).mean())


def _check_dims(s: torch.Tensor, e: torch.Tensor) -> None:
    if e.ndim != 2 or s.shape[-1] != e.shape[-1]:
        raise ValueError(f"clip: the text embedding has {s.shape[-1]} dimensions but the frames' image embeddings "
                         f"{tuple(e.shape)}: use a text encoder and an image encoder of the same CLIP model "
                         f"(e.g. both from openai clip-vit-large-patch14)")


@dataclass(frozen=True)
class EditScores:
    """The four scores on the paper's scale (module docstring)."""
    clip_t: float
    clip_f: float
    warp_err: float
    q_edit: float
    frames: int
    counted_fraction: float   # share of pixel pairs that passed the occlusion check

    def table(self) -> str:
        def f(x):
            return "n/a" if math.isnan(x) else f"{x:.2f}"
        rows = [("CLIP-T (x100)", f(self.clip_t), "text-frame cosine, mean over frames (higher: closer to the prompt)"),
                ("CLIP-F (x100)", f(self.clip_f), "consecutive-frame cosine (higher: steadier)"),
                ("Warp-Err (x100)", f(self.warp_err), "mean |warped - next| on [0,1] under the source's flow (lower)"),
                ("Q-edit", f(self.q_edit), "CLIP-T / Warp-Err (higher)")]
        w0 = max(len(r[0]) for r in rows)
        w1 = max(len(r[1]) for r in rows)
        lines = [f"{a.ljust(w0)}  {b.rjust(w1)}  {c}" for a, b, c in rows]
        lines.append(f"{self.frames} frames; {100 * self.counted_fraction:.1f}% of pixel pairs passed the "
                     f"forward-backward flow check")
        return "\n".join(lines)


def q_edit(clip_t_scaled: float, warp_err_scaled: float) -> float:
    if math.isnan(clip_t_scaled) or math.isnan(warp_err_scaled):
        return math.nan
    if warp_err_scaled == 0:
        return math.inf
    return clip_t_scaled / warp_err_scaled


def check_clips(edited: torch.Tensor, source: torch.Tensor) -> None:
    for name, x in (("edited", edited), ("source", source)):
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[-1] < 3 or x.shape[0] < 1:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{name} must be an IMAGE batch [frames, height, width, 3], got {shape}")
    if source.shape[:3] != edited.shape[:3]:
        raise ValueError(f"source is {source.shape[0]} frames of {source.shape[2]}x{source.shape[1]} but edited is "
                         f"{edited.shape[0]} frames of {edited.shape[2]}x{edited.shape[1]}: connect the frames the "
                         f"edit was made from (the Video Loader's images) and the decoded edit")


def score_edit(edited: torch.Tensor, source: torch.Tensor, text_embed: torch.Tensor,
               encode_images: Callable[[torch.Tensor], torch.Tensor], *, estimator: PairFlow | None = None,
               chunk: int = 16, on_progress: Callable[[str], None] | None = None) -> EditScores:
    """The four scores of `edited` [F, H, W, 3] (0..1) against the edit prompt's text
    embedding, with the SOURCE clip [F, H, W, 3]'s flows for Warp-Err. `encode_images`
    maps an IMAGE batch to its projected image embeddings [n, D]; it gets `chunk` frames
    at a time."""
    check_clips(edited, source)
    edited = edited[..., :3].float()
    source = source[..., :3].float()
    embeds = []
    for i in range(0, edited.shape[0], chunk):
        embeds.append(torch.as_tensor(encode_images(edited[i:i + chunk])).detach().to("cpu", torch.float64))
        if on_progress:
            on_progress("clip")
    e = torch.cat(embeds)
    ct = clip_t(text_embed, e) * SCALE
    cf = clip_f(e) * SCALE
    if edited.shape[0] > 1:
        flows = clip_flows(source, estimator, backward=True,
                           on_pair=(lambda d, t: on_progress("flow")) if on_progress else None)
        # warp_error.warp_error's mean, with the per-pair counts kept for the table
        errs, counted = warp_error_pairs(edited, flows.forward, flows.backward)
        used = errs[counted > 0]
        we = float(used.mean()) * SCALE if used.numel() else math.nan
        frac = float(counted.sum()) / (counted.numel() * edited.shape[1] * edited.shape[2])
    else:
        we, frac = math.nan, 0.0
    return EditScores(clip_t=ct, clip_f=cf, warp_err=we, q_edit=q_edit(ct, we), frames=int(edited.shape[0]),
                      counted_fraction=frac)


__all__ = ["cosines", "clip_t", "clip_f", "q_edit", "EditScores", "score_edit", "check_clips", "SCALE"]
