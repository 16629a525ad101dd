"""Region masks: reading them from files and lining them up with the loaded frames.

Masks come at the video's source size and frame count (a mask video, a folder of
per-frame PNGs, a segmentation node run on the source frames) or already at the loaded
clip's size. `align_mask_frames` puts either through the Video Loader's FrameTransform, so
a mask always covers the same pixels as the frame it belongs to, whatever the resize and
crop did; it takes the frames one at a time, so a long or large mask source is never held
whole at its own size.
"""
from __future__ import annotations

import os
import re
from functools import partial
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from .frame_transform import FrameTransform
from .input_paths import InputPathError, is_inside, resolve_inside
from .video_io import VIDEO_EXTENSIONS, open_video, upright_pixels

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
CHANNELS = ("luminance", "alpha", "red", "green", "blue")


def binarize(mask: torch.Tensor, threshold: float) -> torch.Tensor:
    """bool mask: values above `threshold` are inside the region."""
    mask = torch.as_tensor(mask)
    if not mask.is_floating_point():
        mask = mask.float()
    return mask > threshold


def _frame_selection(n: int, transform: FrameTransform, what: str) -> list[int] | None:
    """Which of n mask frames the clip uses: None for all of them (n is the clip's frame
    count, or 1 for every frame), the transform's picks when n is the source's count."""
    if n == transform.frame_count or n == 1:
        return None
    if n == transform.source_frame_count:
        return list(transform.frame_indices)
    raise ValueError(f"{what} has {n} frames but the video has {transform.source_frame_count} source frames "
                     f"({transform.frame_count} loaded): give one mask per source frame, one per loaded frame, "
                     f"or a single mask for all frames")


def align_mask_frames(frames: Iterable[torch.Tensor | Callable[[], torch.Tensor]], transform: FrameTransform,
                      threshold: float = 0.5, what: str = "mask", count: int | None = None) -> torch.Tensor:
    """Binarise [H, W] mask frames and put them through the clip's transform, one at a time.

    Each frame is brought to the clip's size as it arrives, so besides the result (bools at
    the clip's size) only one source-size frame is held, however long or large the source.
    A frame may also come as a function that reads it: with `count` given, the frames the
    clip's selection drops are then never read (a folder of 900 images feeding a 32-frame
    clip decodes 32 of them).
    Frames: `count` (or, when it is not known up front, the number of frames that came)
    equal to the clip's frame count passes; equal to the source's count is subset with the
    transform's frame selection; 1 stays one frame (it broadcasts over the clip).
    Size: the clip's output size passes; the source size is resized and cropped like the
    frames (nearest neighbour, so the mask stays binary). Returns bool [F', h, w].
    """
    out_w, out_h = transform.size
    src_w, src_h = transform.source_size
    wanted = None if count is None else _frame_selection(count, transform, what)
    keep = None if wanted is None else set(wanted)
    kept: dict[int, torch.Tensor] = {}
    size = first = None
    n = 0
    for i, m in enumerate(frames):
        n = i + 1
        if callable(m):
            if keep is not None and i not in keep:
                continue  # a dropped frame that is still unread stays unread
            m = m()
        m = torch.as_tensor(m)
        if size is None:
            size, first = tuple(m.shape), i
            if size not in ((out_h, out_w), (src_h, src_w)):
                raise ValueError(f"{what} is {size[1]}x{size[0]} but the video's source frames are "
                                 f"{src_w}x{src_h} and the loaded frames {out_w}x{out_h}: give masks at one of "
                                 f"those sizes (for example run the segmentation on the Video Loader's frames)")
        elif tuple(m.shape) != size:
            raise ValueError(f"{what}: frame {i} is {m.shape[1]}x{m.shape[0]} but frame {first} is "
                             f"{size[1]}x{size[0]}: give every frame's mask the same size")
        if keep is not None and i not in keep:
            continue
        b = binarize(m, threshold)
        if size != (out_h, out_w):
            b = transform.apply_spatial(b[None, None].float(), mode="nearest")[0, 0] > 0.5
        kept[i] = b
    if n == 0:
        raise ValueError(f"{what} has no frames")
    if count is not None and n != count:
        raise ValueError(f"{what}: expected {count} frames, read {n}")
    if count is None:
        wanted = _frame_selection(n, transform, what)
    order = wanted if wanted is not None else range(n)
    return torch.stack([kept[i] for i in order]).contiguous()


def align_masks(mask: torch.Tensor, transform: FrameTransform, threshold: float = 0.5,
                what: str = "mask") -> torch.Tensor:
    """align_mask_frames for a mask tensor [N, H, W] (or [H, W], or IMAGE-like [N, H, W, C])."""
    mask = torch.as_tensor(mask)
    if mask.ndim == 2:
        mask = mask[None]
    if mask.ndim == 4 and mask.shape[-1] in (1, 3, 4):
        mask = mask[..., 0]  # an IMAGE-like [N, H, W, C] mask: every channel carries the same values
    if mask.ndim != 3:
        raise ValueError(f"{what} must be [frames, height, width], got shape {tuple(mask.shape)}")
    return align_mask_frames(mask.unbind(0), transform, threshold, what, count=mask.shape[0])


# ---------------------------------------------------------------- reading mask files
def _natural_key(name: str):
    # frame_2.png before frame_10.png
    return [int(p) if p.isdigit() else p.lower() for p in re.split(r"(\d+)", name)]


def safe_input_path(base_dir: str, relative: str, what: str = "path") -> str:
    """`relative` resolved inside `base_dir`; refuses anything that leaves it (absolute
    paths, `..`, symlinks pointing outside)."""
    rel = (relative or "").strip()
    if not rel:
        raise ValueError(f"{what} is empty: name a file or folder inside the input folder")
    messages = {
        "absolute": f"{what} {rel!r} is absolute: give a path relative to the input folder",
        "parent": f"{what} {rel!r} leaves the input folder ('..'): give a path inside the input folder",
        "outside": f"{what} {rel!r} resolves outside the input folder (a symlink?): copy the masks into "
                   f"the input folder",
    }
    try:
        full = resolve_inside(base_dir, rel)
    except InputPathError as e:
        raise ValueError(messages[e.reason]) from None
    if not os.path.exists(full):
        raise ValueError(f"{what} {rel!r} does not exist in the input folder")
    return full


def _image_channel(img, channel: str) -> np.ndarray:
    from PIL import ImageOps
    img = ImageOps.exif_transpose(img)
    if img.mode.startswith("I;16") or img.mode == "I":
        # 16-bit greyscale: converting to 8-bit modes would clip every value above 255
        # (so nearly everything) to white; read the values themselves
        if channel == "alpha":
            return np.ones(img.size[::-1], np.float32)  # no alpha channel: all opaque, as PIL's RGBA has it
        return np.clip(np.asarray(img).astype(np.float32) / 65535.0, 0.0, 1.0)
    if channel == "alpha":
        if "A" not in img.getbands():
            img = img.convert("RGBA")
        arr = np.asarray(img.getchannel("A"))
    elif channel == "luminance":
        arr = np.asarray(img.convert("L"))
    else:
        arr = np.asarray(img.convert("RGB").getchannel({"red": "R", "green": "G", "blue": "B"}[channel]))
    if arr.dtype == np.uint16 or arr.max(initial=0) > 255:
        return arr.astype(np.float32) / 65535.0
    return arr.astype(np.float32) / 255.0


def read_image_mask(path: str, channel: str = "luminance") -> torch.Tensor:
    from PIL import Image
    try:
        with Image.open(path) as img:
            return torch.from_numpy(_image_channel(img, channel))
    except (OSError, Image.DecompressionBombError) as e:  # UnidentifiedImageError is an OSError
        raise ValueError(f"mask image {os.path.basename(path)!r} could not be read ({e.__class__.__name__}): the file "
                         f"is damaged or not an image; save it again (PNG) or pick another file") from None


def list_sequence(folder: str, base_dir: str) -> list[str]:
    """Image files of a mask sequence, in natural order; each must stay in `base_dir`."""
    names = sorted((n for n in os.listdir(folder) if n.lower().endswith(IMAGE_EXTENSIONS) and not n.startswith(".")),
                   key=_natural_key)
    files = []
    for n in names:
        full = os.path.realpath(os.path.join(folder, n))
        if not is_inside(base_dir, full):
            raise ValueError(f"mask file {n!r} is a link out of the input folder: copy it into the input folder")
        if os.path.isfile(full):
            files.append(full)
    if not files:
        raise ValueError(f"the folder {os.path.basename(folder)!r} holds no mask images ({', '.join(IMAGE_EXTENSIONS)})")
    return files


def _has_alpha(fmt) -> bool:
    # a palette (GIF) may hold transparency too
    return bool(fmt.has_palette or any(c.is_alpha for c in fmt.components))


def _video_mask_frames(path: str, channel: str) -> Iterator[torch.Tensor]:
    import av
    from PIL import Image
    label = os.path.basename(path)
    fmt = "rgba" if channel == "alpha" else "rgb24"
    with open_video(path, label, what="mask video") as container:
        i = 0
        try:
            for frame in container.decode(container.streams.video[0]):
                if channel == "alpha" and not _has_alpha(frame.format):
                    # webm alpha travels beside the picture and FFmpeg's own VP8/VP9 decoders
                    # drop it: without this check every pixel would read as inside the region
                    raise ValueError(f"mask video {label!r}: channel 'alpha' was asked for but its frames decode "
                                     f"without alpha ({frame.format.name}): save the mask as PNG frames (with "
                                     f"alpha) or as black-and-white video and use channel 'luminance'")
                yield torch.from_numpy(_image_channel(Image.fromarray(upright_pixels(frame, fmt)), channel))
                i += 1
        except av.error.FFmpegError as e:  # a broken packet mid-stream
            raise ValueError(f"mask video {label!r}: frame {i} could not be decoded ({e.__class__.__name__}): the "
                             f"file is damaged; re-encode it (e.g. to h264 mp4) or give PNG frames") from None


def open_mask_source(full_path: str, base_dir: str, channel: str = "luminance"
                     ) -> tuple[int | None, Iterator[torch.Tensor | Callable[[], torch.Tensor]]]:
    """A video, a folder of images, or one image as (frame count if known up front, an
    iterator of [H, W] float masks, decoded one at a time). A folder's frames come as
    functions that read them, so align_mask_frames reads only the images the clip uses."""
    if channel not in CHANNELS:
        raise ValueError(f"channel must be one of {', '.join(CHANNELS)}, got {channel!r}")
    if os.path.isdir(full_path):
        files = list_sequence(full_path, base_dir)
        return len(files), (partial(read_image_mask, f, channel) for f in files)
    low = full_path.lower()
    if low.endswith(VIDEO_EXTENSIONS):
        return None, _video_mask_frames(full_path, channel)
    if low.endswith(IMAGE_EXTENSIONS):
        return 1, iter([read_image_mask(full_path, channel)])
    raise ValueError(f"{os.path.basename(full_path)!r} is neither a video ({', '.join(VIDEO_EXTENSIONS)}), an image "
                     f"({', '.join(IMAGE_EXTENSIONS)}) nor a folder of images")


__all__ = ["align_masks", "align_mask_frames", "binarize", "safe_input_path", "open_mask_source", "list_sequence",
           "CHANNELS"]
