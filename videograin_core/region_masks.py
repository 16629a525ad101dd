"""Region masks: reading them from files and lining them up with the loaded frames.

Masks come at the video's source size and frame count (a mask video, a folder of
per-frame PNGs, a segmentation node run on the source frames) or already at the loaded
clip's size. `align_masks` puts either through the Video Loader's FrameTransform, so a
mask always covers the same pixels as the frame it belongs to, whatever the resize and
crop did.
"""
from __future__ import annotations

import os
import re

import numpy as np
import torch

from .frame_transform import FrameTransform
from .input_paths import InputPathError, is_inside, resolve_inside

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mov", ".mkv", ".avi", ".m4v", ".gif")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
CHANNELS = ("luminance", "alpha", "red", "green", "blue")


def binarize(mask: torch.Tensor, threshold: float) -> torch.Tensor:
    """bool mask: values above `threshold` are inside the region."""
    mask = torch.as_tensor(mask)
    if not mask.is_floating_point():
        mask = mask.float()
    return mask > threshold


def align_masks(mask: torch.Tensor, transform: FrameTransform, threshold: float = 0.5,
                what: str = "mask") -> torch.Tensor:
    """Binarise a [N, H, W] (or [H, W]) mask and put it through the clip's transform.

    Frames: N == the clip's frame count passes; N == the source's frame count is subset with
    the transform's frame selection; N == 1 stays one frame (it broadcasts over the clip).
    Size: the clip's output size passes; the source size is resized and cropped like the
    frames (nearest neighbour, so the mask stays binary). Returns bool [F', h, w].
    """
    mask = torch.as_tensor(mask)
    if mask.ndim == 2:
        mask = mask[None]
    if mask.ndim == 4 and mask.shape[-1] in (1, 3, 4):
        mask = mask[..., 0]  # an IMAGE-like [N, H, W, C] mask: every channel carries the same values
    if mask.ndim != 3:
        raise ValueError(f"{what} must be [frames, height, width], got shape {tuple(mask.shape)}")
    n, h, w = mask.shape
    out_w, out_h = transform.size
    src_w, src_h = transform.source_size

    if n == transform.frame_count or n == 1:
        pass
    elif n == transform.source_frame_count:
        mask = mask[list(transform.frame_indices)]
    else:
        raise ValueError(f"{what} has {n} frames but the video has {transform.source_frame_count} source frames "
                         f"({transform.frame_count} loaded): give one mask per source frame, one per loaded frame, "
                         f"or a single mask for all frames")

    b = binarize(mask, threshold)
    if (h, w) == (out_h, out_w):
        return b.contiguous()
    if (h, w) == (src_h, src_w):
        x = b[:, None].float()
        return (transform.apply_spatial(x, mode="nearest")[:, 0] > 0.5).contiguous()
    raise ValueError(f"{what} is {w}x{h} but the video's source frames are {src_w}x{src_h} and the loaded frames "
                     f"{out_w}x{out_h}: give masks at one of those sizes (for example run the segmentation on "
                     f"the Video Loader's frames)")


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
    from PIL import Image, ImageOps
    img = ImageOps.exif_transpose(img)
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
    with Image.open(path) as img:
        return torch.from_numpy(_image_channel(img, channel))


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


def read_sequence(files: list[str], channel: str = "luminance") -> torch.Tensor:
    frames = [read_image_mask(f, channel) for f in files]
    sizes = {tuple(f.shape) for f in frames}
    if len(sizes) != 1:
        raise ValueError(f"the mask images differ in size ({sorted(sizes)}): give every frame's mask the same size")
    return torch.stack(frames)


def read_video_mask(path: str, channel: str = "luminance") -> torch.Tensor:
    """[N, H, W] float masks from every frame of a video file."""
    import av
    from PIL import Image
    frames = []
    with av.open(path) as container:
        if not container.streams.video:
            raise ValueError(f"{os.path.basename(path)!r} has no video stream")
        stream = container.streams.video[0]
        for frame in container.decode(stream):
            fmt = "rgba" if channel == "alpha" else "rgb24"
            frames.append(torch.from_numpy(_image_channel(Image.fromarray(frame.to_ndarray(format=fmt)), channel)))
    if not frames:
        raise ValueError(f"{os.path.basename(path)!r} has no frames")
    return torch.stack(frames)


def read_mask_source(full_path: str, base_dir: str, channel: str = "luminance") -> torch.Tensor:
    """[N, H, W] float masks from a video, a folder of images, or one image (N = 1)."""
    if channel not in CHANNELS:
        raise ValueError(f"channel must be one of {', '.join(CHANNELS)}, got {channel!r}")
    if os.path.isdir(full_path):
        return read_sequence(list_sequence(full_path, base_dir), channel)
    low = full_path.lower()
    if low.endswith(VIDEO_EXTENSIONS):
        return read_video_mask(full_path, channel)
    if low.endswith(IMAGE_EXTENSIONS):
        return read_image_mask(full_path, channel)[None]
    raise ValueError(f"{os.path.basename(full_path)!r} is neither a video ({', '.join(VIDEO_EXTENSIONS)}), an image "
                     f"({', '.join(IMAGE_EXTENSIONS)}) nor a folder of images")


__all__ = ["align_masks", "binarize", "safe_input_path", "read_mask_source", "list_sequence", "CHANNELS"]
