"""The attention-control arithmetic of Video-P2P (VIDEO_P2P.md sections 6 and 8): pure
functions on attention probability maps, step windows and the local-blend mask.

A cross-attention map holds probabilities over the conditioning's L text tokens in its
last dimension ([..., L]); any leading dimensions (frames, heads, query tokens) pass
through. Mappers and alphas come from `tokens`.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

MODES = ("swap", "refine")
Window = tuple[float, float]   # [start, end) as fractions of the schedule


# ---------------------------------------------------------------- cross-attention
def swap_maps(source_probs: torch.Tensor, mapper: torch.Tensor) -> torch.Tensor:
    """Word swap: target token n's map = sum over source tokens w of source[w] * M[w, n]."""
    return source_probs @ mapper.to(source_probs)


def refine_maps(source_probs: torch.Tensor, target_probs: torch.Tensor, mapper: torch.Tensor,
                alphas: torch.Tensor) -> torch.Tensor:
    """Refine: target token n takes the source map of its aligned source token mapper[n]
    where alphas[n] is 1, and keeps its own map where it is 0 (mapper[n] = -1)."""
    idx = mapper.to(device=source_probs.device, dtype=torch.long).clamp(min=0)
    a = alphas.to(target_probs)
    return source_probs.index_select(-1, idx) * a + target_probs * (1 - a)


def reweight(probs: torch.Tensor, equalizer: torch.Tensor) -> torch.Tensor:
    """Multiply each token's map by its factor (1 = unchanged); no renormalisation."""
    return probs * equalizer.to(probs)


def cross_control(source_probs: torch.Tensor, target_probs: torch.Tensor, mapper: torch.Tensor,
                  alphas: torch.Tensor, mode: str, step_alpha, equalizer: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """The target's controlled cross-attention maps at one step.

    edited = swap (blended with the target's own maps by `alphas`: tokens no source token
    maps to keep their own) or refine; then the reweight factors (`equalizer`, inside the
    window only, as the reference applies them); then
    new = step_alpha * edited + (1 - step_alpha) * target, where step_alpha (scalar or [L])
    is the step's row of the cross alpha table (0 outside the window)."""
    if mode == "swap":
        a = alphas.to(target_probs)
        edited = swap_maps(source_probs, mapper) * a + target_probs * (1 - a)
    elif mode == "refine":
        edited = refine_maps(source_probs, target_probs, mapper, alphas)
    else:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if equalizer is not None:
        edited = reweight(edited, equalizer)
    s = torch.as_tensor(step_alpha).to(target_probs)
    return edited * s + target_probs * (1 - s)


def self_replace(source_probs: torch.Tensor, target_probs: torch.Tensor, active: bool) -> torch.Tensor:
    """Self/temporal replacement: inside its window the target's maps are the source's."""
    return source_probs if active else target_probs


# ---------------------------------------------------------------- step windows
def as_window(value, name: str = "window") -> Window:
    """A fraction s means [0, s); a pair (start, end) is taken as is. Both within 0..1."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{name}: a window is a fraction or a (start, end) pair, got {value!r}")
        start, end = float(value[0]), float(value[1])
    else:
        start, end = 0.0, float(value)
    if not 0.0 <= start <= end <= 1.0:
        raise ValueError(f"{name}: a window must satisfy 0 <= start <= end <= 1, got ({start}, {end})")
    return start, end


def window_rows(window: Window, rows: int) -> range:
    """The active rows of a table of `rows` rows (reference arithmetic: int(f * rows))."""
    return range(int(window[0] * rows), int(window[1] * rows))


def cross_alpha_table(steps: int, token_count: int, window, word_windows: Sequence = ()) -> torch.Tensor:
    """float64 [steps + 1, token_count]: 1 where the cross-attention control is active.

    `window` (a fraction s = (0, s), or (start, end)) sets rows int(start * (steps + 1))
    .. int(end * (steps + 1)) - 1 for every token; each (token indices, window) of
    `word_windows` then sets its own tokens' rows the same way. Row i is used at step i."""
    rows = steps + 1
    table = torch.zeros(rows, token_count, dtype=torch.float64)
    r = window_rows(as_window(window), rows)
    table[r.start:r.stop] = 1.0
    for tokens, w in word_windows:
        idx = torch.as_tensor(list(tokens), dtype=torch.long)
        r = window_rows(as_window(w), rows)
        table[:, idx] = 0.0
        table[r.start:r.stop, idx] = 1.0
    return table


def self_window_active(step: int, steps: int, window) -> bool:
    """Self/temporal replacement is active for int(start * steps) <= step < int(end * steps)."""
    r = window_rows(as_window(window), steps)
    return r.start <= step < r.stop


def blend_active(step: int, steps: int, start: float = 0.2) -> bool:
    """The local blend applies after each step from step int(start * steps) on."""
    return step >= int(start * steps)


# ---------------------------------------------------------------- local blend
def word_mask(maps: Sequence[torch.Tensor], tokens: Sequence[int], size: tuple[int, int],
              threshold: float = 0.3) -> torch.Tensor:
    """bool [F, H, W]: where a word attends, per frame.

    maps: one tensor per layer, [F, heads, h, w, L] (the cumulative cross-attention maps
    of the layers chosen; all at one h x w). Sum over the word's tokens, mean over heads
    and layers, 3x3 max-pool (stride 1), nearest upsample to `size` (the latent's H, W),
    divide by the frame's maximum, keep what is above `threshold`."""
    if not maps:
        raise ValueError("word_mask: no attention maps")
    idx = torch.as_tensor(list(tokens), dtype=torch.long, device=maps[0].device)
    per_head = torch.cat([m.index_select(-1, idx).sum(-1) for m in maps], dim=1)   # [F, N, h, w]
    m = per_head.mean(1, keepdim=True)                                             # [F, 1, h, w]
    m = F.max_pool2d(m, kernel_size=3, stride=1, padding=1)
    m = F.interpolate(m, size=tuple(size), mode="nearest")[:, 0]                   # [F, H, W]
    peak = m.amax(dim=(1, 2), keepdim=True)
    m = torch.where(peak > 0, m / torch.where(peak > 0, peak, torch.ones_like(peak)), torch.zeros_like(m))
    return m > threshold


def local_blend_mask(source_maps: Sequence[torch.Tensor] | None, target_maps: Sequence[torch.Tensor] | None,
                     source_tokens: Sequence[int], target_tokens: Sequence[int], size: tuple[int, int],
                     threshold: float = 0.3) -> torch.Tensor:
    """The union of the source word's mask (on the source branch's maps) and the target
    word's mask (on the target's); a side with no tokens adds nothing."""
    masks = [word_mask(m, t, size, threshold) for m, t in ((source_maps, source_tokens), (target_maps, target_tokens))
             if t]
    if not masks:
        raise ValueError("local_blend_mask: no blend word on either side")
    out = masks[0]
    for m in masks[1:]:
        out = out | m
    return out


def local_blend(x_source: torch.Tensor, x_target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x_target <- x_source + mask * (x_target - x_source); mask [F, H, W] broadcasts over channels."""
    m = mask.to(x_target.dtype)
    if m.ndim == x_target.ndim - 1:
        m = m.unsqueeze(1)
    return x_source + m * (x_target - x_source)


__all__ = ["MODES", "swap_maps", "refine_maps", "reweight", "cross_control", "self_replace", "as_window",
           "window_rows", "cross_alpha_table", "self_window_active", "blend_active", "word_mask",
           "local_blend_mask", "local_blend"]
