"""The frame transform: which source frames a clip keeps and how they are resized and
cropped. The Video Loader plans it; frames and every region mask go through the very
same transform, so masks always line up with the frames whatever the source size.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class FrameTransform:
    source_size: tuple[int, int]       # (width, height) of the decoded source frames
    source_frame_count: int            # frames in the source (after decoding)
    frame_indices: tuple[int, ...]     # source frames kept, in order
    resized_size: tuple[int, int]      # (width, height) after resizing, before cropping
    crop_box: tuple[int, int, int, int]  # (left, top, width, height) in resized pixels

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the output frames."""
        return self.crop_box[2], self.crop_box[3]

    @property
    def frame_count(self) -> int:
        return len(self.frame_indices)

    def apply_spatial(self, x: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
        """Resize then crop [N, C, H, W] frames given at source size.

        `mode="nearest"` for masks (keeps them binary); "bilinear" (antialiased when
        shrinking) for pictures.
        """
        if tuple(x.shape[-2:]) != (self.source_size[1], self.source_size[0]):
            raise ValueError(f"expected frames of {self.source_size[0]}x{self.source_size[1]} (the source size), "
                             f"got {x.shape[-1]}x{x.shape[-2]}")
        rw, rh = self.resized_size
        if (rw, rh) != self.source_size:
            if mode == "nearest":
                x = F.interpolate(x, size=(rh, rw), mode="nearest-exact")
            else:
                shrink = rw < self.source_size[0] or rh < self.source_size[1]
                x = F.interpolate(x.float(), size=(rh, rw), mode="bilinear", align_corners=False, antialias=shrink)
        left, top, w, h = self.crop_box
        return x[..., top:top + h, left:left + w]

    def to_dict(self) -> dict:
        return {"source_size": list(self.source_size), "source_frame_count": self.source_frame_count,
                "frame_indices": list(self.frame_indices), "resized_size": list(self.resized_size),
                "crop_box": list(self.crop_box)}


def kept_frames(source_frame_count: int, skip_first: int = 0, every_nth: int = 1, frame_cap: int = 0) -> range:
    """Indices of the kept frames as a range (its length costs nothing, however many frames
    a header claims): drop `skip_first`, keep every `every_nth`, at most `frame_cap` of them
    (0 = no cap)."""
    if skip_first < 0:
        raise ValueError(f"skip_first_frames must be >= 0, got {skip_first}")
    if every_nth < 1:
        raise ValueError(f"select_every_nth must be >= 1, got {every_nth}")
    if frame_cap < 0:
        raise ValueError(f"frame_load_cap must be >= 0 (0 = all frames), got {frame_cap}")
    idx = range(skip_first, source_frame_count, every_nth)
    return idx[:frame_cap] if frame_cap else idx


def plan_frame_indices(source_frame_count: int, skip_first: int = 0, every_nth: int = 1, frame_cap: int = 0) -> tuple[int, ...]:
    """kept_frames as the tuple a FrameTransform holds."""
    return tuple(kept_frames(source_frame_count, skip_first, every_nth, frame_cap))


def plan_transform(source_size: tuple[int, int], source_frame_count: int, *, skip_first: int = 0,
                   every_nth: int = 1, frame_cap: int = 0, short_side: int = 0, crop: str = "center",
                   multiple_of: int = 8, pixel_aspect: float = 1.0) -> FrameTransform:
    """Plan the transform for a source of `source_size` = (width, height).

    short_side: resize so the shorter side has this many pixels (0 = keep the size).
    crop: "center" crops the long side to a multiple of `multiple_of` around the centre
          (and to a square when short_side is given and crop is "center_square");
          "none" resizes both sides to the nearest multiple instead of cropping.
    """
    sw, sh = source_size
    if sw <= 0 or sh <= 0:
        raise ValueError(f"the source has no pixels ({sw}x{sh})")
    if multiple_of < 1:
        raise ValueError(f"multiple_of must be >= 1, got {multiple_of}")
    # Sizes are planned on the picture as it is shown: non-square pixels (anamorphic DV/DVD,
    # pixel_aspect = width/height of one pixel) are stretched to square ones by the resize.
    dw = sw * pixel_aspect if pixel_aspect > 0 else sw
    if short_side:
        scale = short_side / min(dw, sh)
        rw, rh = max(1, round(dw * scale)), max(1, round(sh * scale))
    else:
        rw, rh = max(1, round(dw)), sh
    if crop == "none":
        # Stretch slightly instead of cropping: each side to its nearest multiple.
        rw = max(multiple_of, int(round(rw / multiple_of)) * multiple_of)
        rh = max(multiple_of, int(round(rh / multiple_of)) * multiple_of)
        box = (0, 0, rw, rh)
    elif crop in ("center", "center_square"):
        if crop == "center_square":
            cw = ch = min(rw, rh)
        else:
            cw, ch = rw, rh
        cw = (cw // multiple_of) * multiple_of
        ch = (ch // multiple_of) * multiple_of
        if cw == 0 or ch == 0:
            raise ValueError(f"{rw}x{rh} is smaller than {multiple_of} pixels on one side: choose a larger size")
        box = ((rw - cw) // 2, (rh - ch) // 2, cw, ch)
    else:
        raise ValueError(f"crop must be 'center', 'center_square' or 'none', got {crop!r}")
    idx = plan_frame_indices(source_frame_count, skip_first, every_nth, frame_cap)
    return FrameTransform((sw, sh), source_frame_count, idx, (rw, rh), box)


def estimate_frames_bytes(transform: FrameTransform, channels: int = 3, bytes_per_value: int = 4) -> int:
    """Memory of the transformed frames as a float32 IMAGE tensor."""
    w, h = transform.size
    return transform.frame_count * h * w * channels * bytes_per_value



__all__ = ["FrameTransform", "plan_transform", "kept_frames", "plan_frame_indices", "estimate_frames_bytes"]
