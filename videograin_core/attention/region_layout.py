"""Region layout at the attention layers' token grids (METHOD.md section 3).

`RegionLayout(masks, spans, token_count)` holds the region masks of a clip at frame
resolution and, once prompts are encoded, each region's token span in the positive
conditioning. It answers, per token grid (h, w) and cached per grid:

    layout.grid(h, w) -> GridLayout
        .clip_regions   bool [F*h*w, S]  self-attention over all frames: token t of frame f
                                         is row f*h*w + t (row-major in the frame), the
                                         order of the host's [F, h*w, C] reshaped to
                                         [1, F*h*w, C]
        .frame_regions  bool [F, h*w, S] cross-attention queries, per frame
        .cross_size     float [F, h*w]   1 - |pixels of the frame sharing a region with x| / (h*w)
        .self_size(term) float [F*h*w]   1 - |positive keys| / (F*h*w)        ("paper")
                                         1 - sum_s m_s(q) |region s| / (F*F*h*w)  ("reference")
    layout.text_regions(key_length) -> bool [Lk, S]   text token p is in region s iff
                                         p % token_count lies in s's span

Rules chosen where the method leaves room:
- Masks go to the grid by nearest-neighbour sampling (F.interpolate mode="nearest"), then
  a value > 0.5 is inside. Any grid works, odd ones included (the UNet's stride-2 convs
  give ceil(prev / 2): a 9x13 latent has grids 9x13, 5x7, 3x4, 2x2).
- A pixel in several regions: the "paper" self-attention term and the cross-attention
  term count the pixels / keys that share at least one region with it (the union of its
  regions), the same set the positive map P marks, so size = 1 - (share of P that is
  positive). The "reference" self-attention term counts as the official code does: a key
  once per region it shares with the query, sum over regions s of m_s(q) * m_s(k), so a
  key in two of the query's regions counts twice (METHOD.md section 6b). Without overlaps
  the two counts are equal.
- A token in no region has no positive key (P is all false). Its count is 0, so its
  size is 1 and c = strength * treg: the rule then pushes every key toward the row
  minimum by the same factor, which is a pure temperature (1 - c) on that row. That is
  what the reference does for such tokens, and it keeps one formula for every token.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

Span = tuple[int, int]  # [start, end) token positions in the positive conditioning
SIZE_TERMS = ("reference", "paper")


def treg(t: float) -> float:
    """Timestep weight of the modulation, ((t - 1) / 1000) ** 5: ~0.90 at t=981, ~0 late."""
    return ((float(t) - 1.0) / 1000.0) ** 5


def masks_at_grid(masks: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """bool [F, S, h, w]: region masks [F, S, H, W] (bool or float) sampled nearest-neighbour."""
    f, s = masks.shape[:2]
    if s == 0 or masks.shape[-2:] == (h, w):
        small = masks
    else:
        # uint8 keeps a bool mask 4x smaller than float; nearest sampling is exact either way
        src = masks.to(torch.uint8) if masks.dtype == torch.bool else masks.float()
        small = F.interpolate(src, size=(h, w), mode="nearest")
    if small.dtype == torch.bool:
        return small.clone() if small is masks else small
    return small > (0 if small.dtype == torch.uint8 else 0.5)


def _positive_counts(regions: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For bool [groups*n, S] membership (rows of group g contiguous):
    (count of rows in the SAME group sharing a region with each row [groups, n],
     count of rows in ALL groups sharing a region with each row [groups*n]).

    Goes through the distinct region signatures (a handful) instead of an n x n matrix."""
    total, s = regions.shape
    n = total // groups
    if s == 0 or total == 0:
        zeros = torch.zeros(total, dtype=torch.long)
        return zeros.view(groups, n), zeros
    sig, ids = torch.unique(regions.to(torch.uint8), dim=0, return_inverse=True)
    n_sig = sig.shape[0]
    share = (sig.long() @ sig.long().T) > 0                            # [U, U] signatures overlap
    group = torch.arange(groups).repeat_interleave(n)
    per_group = torch.bincount(group * n_sig + ids, minlength=groups * n_sig).view(groups, n_sig)
    in_group = (per_group @ share.long().T)                             # [groups, U]
    same = in_group.gather(1, ids.view(groups, n))                      # [groups, n]
    everywhere = (share.long() @ per_group.sum(0))[ids]                 # [groups*n]
    return same, everywhere


@dataclass(frozen=True, eq=False)
class GridLayout:
    """Region terms at one token grid (see the module docstring). All on `device`."""
    height: int
    width: int
    frames: int
    frame_regions: torch.Tensor         # bool [F, h*w, S]
    clip_regions: torch.Tensor          # bool [F*h*w, S], frame-major
    frame_positive_counts: torch.Tensor  # long [F, h*w]: same-frame pixels sharing a region (self included)
    clip_positive_counts: torch.Tensor   # long [F*h*w]: tokens of all frames sharing a region
    frame_region_sums: torch.Tensor      # long [F, h*w]: sum over x's regions of their same-frame sizes
    clip_region_sums: torch.Tensor       # long [F*h*w]: sum over the token's regions of their clip sizes

    @property
    def tokens(self) -> int:
        return self.height * self.width

    @property
    def cross_size(self) -> torch.Tensor:
        """float [F, h*w]: 1 - |pixels of the frame in x's region(s)| / (h*w)."""
        return 1.0 - self.frame_positive_counts.float() / self.tokens

    def self_size(self, term: str = "reference") -> torch.Tensor:
        """float [F*h*w]: self-attention size over all frames' keys.
        "paper": 1 - n / (F*h*w) with n the keys sharing a region with the query;
        "reference": 1 - n' / (F*F*h*w) with n' = sum over the query's regions of their
        sizes (a key counted once per shared region; ~1 for typical F)."""
        if term not in SIZE_TERMS:
            raise ValueError(f"size term must be one of {SIZE_TERMS}, got {term!r}")
        if term == "reference":
            return 1.0 - self.clip_region_sums.float() / (self.frames * self.frames * self.tokens)
        return 1.0 - self.clip_positive_counts.float() / (self.frames * self.tokens)

    def frame_self_size(self, term: str = "reference") -> torch.Tensor:
        """float [F, h*w]: the self-attention size when each frame attends to its own keys
        only (full-frame attention off), counted as `self_size` counts; the reference's
        extra factor F is kept so that the variants stay comparable."""
        if term not in SIZE_TERMS:
            raise ValueError(f"size term must be one of {SIZE_TERMS}, got {term!r}")
        if term == "reference":
            return 1.0 - self.frame_region_sums.float() / (self.tokens * self.frames)
        return 1.0 - self.frame_positive_counts.float() / self.tokens


@dataclass(frozen=True, eq=False)
class RegionLayout:
    """Region masks of one clip plus their token spans; derived terms cached per grid.

    masks: [F, S, H, W] bool or float (> 0.5 is inside); regions may overlap or be empty.
    spans: one [start, end) per region in the positive conditioning, None for a region
        without text; the whole tuple None before prompt encoding (no text is positive).
    token_count: tokens of the positive conditioning the spans index into (e.g. 77).
    """
    masks: torch.Tensor
    spans: tuple[Span | None, ...] | None = None
    token_count: int | None = None
    _grids: dict = field(default_factory=dict, repr=False)
    _texts: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.masks.dim() != 4:
            raise ValueError(f"region masks must be [frames, regions, height, width], got {tuple(self.masks.shape)}")
        if self.spans is not None:
            spans = tuple(None if s is None else (int(s[0]), int(s[1])) for s in self.spans)
            if len(spans) != self.regions:
                raise ValueError(f"{len(spans)} spans for {self.regions} regions")
            object.__setattr__(self, "spans", spans)

    @classmethod
    def from_layout(cls, layout, frames: int) -> "RegionLayout":
        """From the wire type `videograin_core.layout.Layout` for a clip of `frames` frames."""
        return cls(layout.masks(frames), layout.spans, layout.token_count)

    @property
    def frames(self) -> int:
        return self.masks.shape[0]

    @property
    def regions(self) -> int:
        return self.masks.shape[1]

    def grid(self, h: int, w: int, device: torch.device | str | None = None) -> GridLayout:
        """Membership and size terms at token grid (h, w); computed once per grid and device."""
        key = (int(h), int(w), str(device))
        cached = self._grids.get(key)
        if cached is not None:
            return cached
        f, s = self.frames, self.regions
        small = masks_at_grid(self.masks.cpu(), h, w)                   # [F, S, h, w]
        frame_regions = small.flatten(2).transpose(1, 2).contiguous()   # [F, h*w, S]
        clip_regions = frame_regions.view(f * h * w, s)
        same_frame, all_frames = _positive_counts(clip_regions, f)
        frame_sizes = frame_regions.sum(1)                               # [F, S] region sizes per frame
        frame_sums = (frame_regions.long() * frame_sizes[:, None, :]).sum(-1)  # [F, h*w]
        clip_sums = clip_regions.long() @ frame_sizes.sum(0)             # [F*h*w]
        g = GridLayout(int(h), int(w), f, *(t.to(device) if device is not None else t
                                            for t in (frame_regions, clip_regions, same_frame, all_frames,
                                                      frame_sums, clip_sums)))
        self._grids[key] = g
        return g

    def text_regions(self, key_length: int, device: torch.device | str | None = None) -> torch.Tensor:
        """bool [Lk, S]: text key p is in region s iff p % token_count lies in s's span.

        The host repeats a shorter conditioning to batch it with a longer one, so key p of
        the positive conditioning is its token p % token_count. Tokens outside every span
        (start/end markers, padding, glue words) are negative for every pixel."""
        key = (int(key_length), str(device))
        cached = self._texts.get(key)
        if cached is not None:
            return cached
        period = self.token_count or key_length
        pos = torch.arange(key_length) % period
        out = torch.zeros(key_length, self.regions, dtype=torch.bool)
        for r, span in enumerate(self.spans or ()):
            if span is not None:
                out[:, r] = (pos >= span[0]) & (pos < span[1])
        out = out.to(device) if device is not None else out
        self._texts[key] = out
        return out


__all__ = ["RegionLayout", "GridLayout", "treg", "masks_at_grid", "SIZE_TERMS", "Span"]
