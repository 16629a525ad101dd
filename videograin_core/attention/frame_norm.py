"""Frame-pooled GroupNorm (METHOD.md section 6b).

The reference runs SD1.5 as a pseudo-3D UNet whose ResNet GroupNorms (and the output
GroupNorm) see a 5-D tensor (batch, channels, frames, h, w): each group's mean and
variance are taken over all frames of a sequence, not per frame. In the host the frames
are batch rows, so the pooled norm regroups [sequences*F, C, h, w] into
[sequences, C, F*h, w] and calls the module's own forward on it: a GroupNorm over
(C/G, F*h, w) per sequence, with the same per-channel affine. Calling the module's own
forward keeps the host's weight casting and LoRA weight patches.
"""
from __future__ import annotations

from typing import Callable

import torch

from .batch_layout import BatchLayoutSlot


def frame_pooled(norm_forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, frames: int) -> torch.Tensor:
    """norm_forward applied with its statistics pooled over each run of `frames` rows."""
    if frames == 1:
        return norm_forward(x)
    b, c, h, w = x.shape
    n = b // frames
    pooled = x.reshape(n, frames, c, h, w).transpose(1, 2).reshape(n, c, frames * h, w)
    y = norm_forward(pooled)
    return y.reshape(n, c, frames, h, w).transpose(1, 2).reshape(b, c, h, w)


class FramePooledGroupNorm:
    """Stands in for one GroupNorm module's `forward` (an object patch): pooled over the
    frames of each sequence when the current UNet call's layout is published, the module's
    own forward otherwise (other samplers using the model, ControlNets, odd batches)."""

    def __init__(self, norm_forward: Callable, slot: BatchLayoutSlot):
        self.norm_forward = norm_forward
        self.slot = slot

    def __call__(self, x, *args, **kwargs):
        layout = self.slot.current
        if layout is None or args or kwargs or x.dim() != 4 or x.shape[0] != layout.rows:
            return self.norm_forward(x, *args, **kwargs)
        return frame_pooled(self.norm_forward, x, layout.frames)

    def __deepcopy__(self, memo):  # model options are deep-copied by clone(): share, never copy
        return self

    def videograin_fingerprint(self) -> dict:
        return {"frame_pooled_group_norm": 1}


__all__ = ["frame_pooled", "FramePooledGroupNorm"]
