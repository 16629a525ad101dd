"""Heatmaps of captured attention maps over the frames, one image per map per frame, with
the map's name written on it.

Each map is scaled to 0..1 over ALL its frames together (min to max of the whole clip),
so that a word's attention fading in a frame shows as fading, and upsampled bilinearly
to the frame size. Colours run dark blue (0) - blue - cyan - yellow - red (1); the frame
shows through with weight 1 - opacity. The label is drawn with Pillow's built-in font
(`ImageFont.load_default`, no system font files needed), white on a dark box at the
top-left corner.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

# value -> colour anchors (RGB 0..1)
_ANCHORS = torch.tensor([[0.0, 0.0, 0.35], [0.0, 0.2, 1.0], [0.0, 0.9, 1.0], [1.0, 0.95, 0.0], [0.9, 0.0, 0.0]])
LABEL_FG = (255, 255, 255)
LABEL_BG = (0, 0, 0)


def colormap(values: torch.Tensor) -> torch.Tensor:
    """float [..., 3] colours of values in 0..1 (piecewise linear between the anchors)."""
    v = values.clamp(0, 1) * (len(_ANCHORS) - 1)
    i = v.floor().long().clamp(max=len(_ANCHORS) - 2)
    t = (v - i)[..., None]
    a = _ANCHORS.to(values.device)
    return a[i] * (1 - t) + a[i + 1] * t


def normalise(maps: torch.Tensor) -> torch.Tensor:
    """[F, h, w] scaled to 0..1 over the whole clip (a constant map becomes zeros)."""
    lo, hi = maps.min(), maps.max()
    span = hi - lo
    if float(span) <= 0:
        return torch.zeros_like(maps)
    return (maps - lo) / span


def font(size: int):
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ValueError, OSError, ImportError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def draw_label(image: np.ndarray, text: str, size: int | None = None,
               centre: tuple[float, float] | None = None) -> np.ndarray:
    """uint8 [H, W, 3] with `text` white on a black box: at the top-left, or centred on
    `centre` (x, y) and kept inside the image."""
    from PIL import Image, ImageDraw
    if not text:
        return image
    h, w = image.shape[:2]
    size = size or max(10, min(24, h // 12))
    pil = Image.fromarray(image)
    draw = ImageDraw.Draw(pil)
    draw.fontmode = "1"  # no antialiasing: crisp white text even at small sizes
    f = font(size)
    pad = max(1, size // 6)
    x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=f)
    if centre is None:
        left, top = pad, pad
    else:
        left = int(round(min(max(centre[0] - (x1 - x0) / 2, pad), max(pad, w - (x1 - x0) - pad))))
        top = int(round(min(max(centre[1] - (y1 - y0) / 2, pad), max(pad, h - (y1 - y0) - pad))))
    box = draw.textbbox((left, top), text, font=f)
    draw.rectangle((max(0, box[0] - pad), max(0, box[1] - pad), min(w - 1, box[2] + pad), min(h - 1, box[3] + pad)),
                   fill=LABEL_BG)
    draw.text((left, top), text, font=f, fill=LABEL_FG)
    return np.asarray(pil)


def overlay(frames: torch.Tensor, maps: torch.Tensor, opacity: float = 0.6) -> torch.Tensor:
    """frames [F, H, W, 3] in 0..1 and maps [F, h, w] (already 0..1): float [F, H, W, 3]."""
    n, h, w = frames.shape[:3]
    up = F.interpolate(maps[:, None].float(), size=(h, w), mode="bilinear", align_corners=False)[:, 0]
    heat = colormap(up.clamp(0, 1))
    return (frames[..., :3].float().cpu() * (1 - opacity) + heat.cpu() * opacity).clamp(0, 1)


def heatmap_images(maps: dict[str, torch.Tensor], frames: torch.Tensor, opacity: float = 0.6,
                   label: bool = True) -> torch.Tensor:
    """IMAGE [len(maps) * F, H, W, 3]: for each map (in the dict's order) its F frames,
    overlaid and labelled with the map's name."""
    if frames.ndim != 4 or frames.shape[-1] < 3:
        raise ValueError(f"images must be an IMAGE batch [frames, height, width, 3], got {tuple(frames.shape)}")
    out = []
    for name, m in maps.items():
        if m.shape[0] != frames.shape[0]:
            raise ValueError(f"images has {frames.shape[0]} frames but the captured maps have {m.shape[0]}: connect "
                             f"the frames of the run that was captured")
        imgs = overlay(frames, normalise(m.float().cpu()), opacity)
        if label:
            u8 = (imgs.numpy() * 255 + 0.5).astype(np.uint8)
            imgs = torch.from_numpy(np.stack([draw_label(f, name) for f in u8]).astype(np.float32) / 255)
        out.append(imgs)
    if not out:
        raise ValueError("nothing to show: no maps were captured")
    return torch.cat(out)


__all__ = ["colormap", "normalise", "overlay", "draw_label", "heatmap_images", "font"]
