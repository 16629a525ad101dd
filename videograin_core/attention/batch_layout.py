"""The layout of the UNet batch, published once per UNet call and read by every part of
the pack that regroups frames (the attention runtime, the frame-pooled GroupNorm).

Inside the UNet the host stacks one chunk per conditioning list it evaluates
(`cond_or_uncond`, chunk-major). Each chunk holds `groups` sequences of `frames` frames:
one sequence for a plain edit, several when a sampler stacks branches (a source and a
target) in one chunk. Frames of one sequence belong together (full-frame attention,
pooled statistics); frames of different sequences or chunks never mix.
"""
from __future__ import annotations

from dataclasses import dataclass

PUBLISHED_KEY = "videograin_batch_layout"   # transformer_options key of the current call's layout
GROUPS_KEY = "videograin_batch_groups"      # optional: sequences per chunk, set by a sampler that stacks branches


@dataclass(frozen=True)
class BatchLayout:
    branches: tuple[int, ...]   # the cond_or_uncond entry of each chunk, in batch order
    frames: int                 # frames per sequence
    groups: int = 1             # sequences per chunk

    def __post_init__(self):
        if not self.branches or self.frames < 1 or self.groups < 1:
            raise ValueError(f"invalid batch layout {self}")

    @property
    def chunks(self) -> int:
        return len(self.branches)

    @property
    def sequences(self) -> int:
        """Independent frame sequences in the batch (chunks x groups)."""
        return self.chunks * self.groups

    @property
    def rows(self) -> int:
        return self.sequences * self.frames

    @property
    def rows_per_chunk(self) -> int:
        return self.groups * self.frames

    @classmethod
    def from_call(cls, rows: int, cond_or_uncond, groups: int = 1) -> "BatchLayout | None":
        """The layout of a batch of `rows` rows with one chunk per cond_or_uncond entry, or
        None when the rows do not split evenly (another wrapper reshaped the batch)."""
        if not cond_or_uncond:
            return None
        per = len(cond_or_uncond) * groups
        if rows <= 0 or rows % per:
            return None
        return cls(tuple(int(b) for b in cond_or_uncond), rows // per, groups)


def published(extra_options: dict) -> BatchLayout | None:
    """The layout the pack published for this UNet call, if any."""
    layout = extra_options.get(PUBLISHED_KEY) if extra_options else None
    return layout if isinstance(layout, BatchLayout) else None


class BatchLayoutSlot:
    """Holds the layout of the UNet call in progress for code the host gives no options to
    (the GroupNorm forwards). Set and cleared around each UNet call by the publisher; None
    outside the pack's runs, which keeps everything reading it inert there. An object (not a
    dict entry) so that clones of the model options share it, see HOST.md."""

    def __init__(self):
        self.current: BatchLayout | None = None

    def __deepcopy__(self, memo):
        return self

    def videograin_fingerprint(self) -> dict:
        return {"batch_layout_slot": 1}


def call_layout(rows: int, transformer_options) -> BatchLayout | None:
    """The batch layout of a call inside the UNet (an attention layer, a transformer block):
    the one the pack published for the UNet call when it fits the call's rows, else one chunk
    of frames per cond_or_uncond entry (sequences per chunk from GROUPS_KEY); None when the
    rows do not split (another wrapper reshaped the batch)."""
    if not isinstance(transformer_options, dict):
        return None
    layout = published(transformer_options)
    if layout is not None and layout.rows == rows:
        return layout
    return BatchLayout.from_call(rows, transformer_options.get("cond_or_uncond"),
                                 int(transformer_options.get(GROUPS_KEY, 1) or 1))


def publish_call(slot: BatchLayoutSlot, x_rows: int, transformer_options: dict) -> BatchLayout | None:
    """Describe the call's batch and publish it into its transformer_options and the slot.
    Calls sliced by context windows (other packs) are not described: frames of a window
    are not the clip's frames, so nothing regroups them."""
    if transformer_options is None:
        return None
    if transformer_options.get("context_window") is not None or transformer_options.get("ad_params") is not None:
        layout = None
    else:
        layout = BatchLayout.from_call(x_rows, transformer_options.get("cond_or_uncond"),
                                       int(transformer_options.get(GROUPS_KEY, 1) or 1))
    if layout is not None:
        transformer_options[PUBLISHED_KEY] = layout
    slot.current = layout
    return layout


__all__ = ["BatchLayout", "BatchLayoutSlot", "published", "publish_call", "PUBLISHED_KEY", "GROUPS_KEY"]
