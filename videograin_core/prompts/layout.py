"""The region layout that travels on VIDEOGRAIN_LAYOUT wires.

A layout is an immutable list of regions, each a boolean mask over the frames and the
local prompt that edits it. Local Prompt nodes append regions; prompt encoding records
where each local prompt sits among the positive conditioning's tokens (`spans`), which
the ST-Layout patch needs for cross-attention.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

Span = tuple[int, int]  # [start, end) token positions in the positive conditioning


@dataclass(frozen=True)
class Region:
    mask: torch.Tensor   # bool [F, H, W] at frame resolution; F == 1 broadcasts over the clip
    prompt: str          # may be empty: the region still separates self-attention


@dataclass(frozen=True)
class Layout:
    regions: tuple[Region, ...] = ()
    spans: tuple[Span | None, ...] | None = None  # one per region, set by prompt encoding
    # Tokens in the positive conditioning the spans index into (77 per CLIP window). The
    # sampler may repeat a shorter conditioning to batch it with a longer one, so the
    # patch maps a key position p to p % token_count.
    token_count: int | None = None

    def add(self, mask: torch.Tensor, prompt: str) -> "Layout":
        """A new layout with one more region (spans are dropped: they must be re-encoded)."""
        mask = torch.as_tensor(mask)
        if mask.ndim == 2:
            mask = mask[None]
        if mask.ndim != 3:
            raise ValueError(f"region mask must be [frames, height, width], got shape {tuple(mask.shape)}")
        # A soft mask (SAM, feathered editor strokes) wired straight in is cut at 0.5.
        mask = (mask > 0.5) if mask.is_floating_point() else mask.bool()
        mask = mask.cpu()
        if self.regions:
            h, w = self.size
            if tuple(mask.shape[-2:]) != (h, w):
                raise ValueError(f"region mask is {mask.shape[-1]}x{mask.shape[-2]} but the layout's regions are "
                                 f"{w}x{h}: give all masks the frames' size (use the Video Loader's transform)")
            f = self.frame_count
            if mask.shape[0] not in (1, f) and f != 1:
                raise ValueError(f"region mask has {mask.shape[0]} frames but the layout's other masks have {f} "
                                 f"frames: give every region one mask per video frame (or a single mask for all)")
        return Layout(self.regions + (Region(mask, str(prompt)),))

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the masks."""
        if not self.regions:
            raise ValueError("the layout has no regions")
        return tuple(self.regions[0].mask.shape[-2:])

    @property
    def frame_count(self) -> int:
        """Frames of the longest mask (1 when every mask is a single broadcast frame)."""
        return max((r.mask.shape[0] for r in self.regions), default=0)

    @property
    def prompts(self) -> list[str]:
        return [r.prompt for r in self.regions]

    def masks(self, frames: int) -> torch.Tensor:
        """bool [frames, S, H, W]: every region's mask, single-frame masks broadcast."""
        out = []
        for i, r in enumerate(self.regions):
            m = r.mask
            if m.shape[0] == 1:
                m = m.expand(frames, -1, -1)
            elif m.shape[0] != frames:
                raise ValueError(f"region {i + 1} ({r.prompt!r}) has {m.shape[0]} mask frames but the video has "
                                 f"{frames} frames: give one mask per frame, or a single mask for all")
            out.append(m)
        return torch.stack(out, dim=1)

    def union_mask(self, frames: int) -> torch.Tensor:
        """bool [frames, H, W]: pixels covered by at least one region."""
        return self.masks(frames).any(dim=1)

    def with_spans(self, spans, token_count: int | None = None) -> "Layout":
        """A copy with each region's token span (None: empty local prompt) in a positive
        conditioning of `token_count` tokens."""
        spans = tuple(None if s is None else (int(s[0]), int(s[1])) for s in spans)
        if len(spans) != len(self.regions):
            raise ValueError(f"{len(spans)} spans for {len(self.regions)} regions")
        if token_count is not None:
            token_count = int(token_count)
            for s in spans:
                if s is not None and not (0 <= s[0] < s[1] <= token_count):
                    raise ValueError(f"span {s} lies outside a conditioning of {token_count} tokens")
        return replace(self, spans=spans, token_count=token_count)

    @property
    def encoded(self) -> bool:
        """True once prompt encoding recorded the spans."""
        return self.spans is not None
