"""Draw the pack's icon (docs/icon.png, the Comfy Registry's `Icon`) with Pillow.

    python scripts/make_icon.py [--out docs/icon.png] [--size 256]

A film strip of three frames of the same two people, edited at the three grains the pack
works at: class level (both people one colour), instance level (one colour each), part level
(one person's head alone). Drawn from primitives at 4x and scaled down, so the edges are
smooth; nothing is read from other files.
"""
from __future__ import annotations

import argparse
import os

from PIL import Image, ImageDraw

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUPER = 4  # supersampling factor

BG_TOP, BG_BOTTOM = (32, 36, 72), (58, 30, 92)
STRIP, HOLE = (14, 15, 22), (214, 218, 230)
SCENE = (38, 132, 122)   # the background region of each frame
CLASS = (255, 160, 60)   # class level: every person
LEFT, RIGHT = (255, 120, 70), (120, 150, 255)  # instance level: each person
PART = (255, 215, 70)    # part level: the left person's head
PLAIN = (196, 200, 212)  # unedited people


def _person(d: ImageDraw.ImageDraw, cx: float, ground: float, h: float, body, head) -> None:
    """A simple figure standing on `ground`, centred at cx, h tall."""
    r = h * 0.17
    d.ellipse([cx - r, ground - h, cx + r, ground - h + 2 * r], fill=head)
    w = h * 0.40
    d.rounded_rectangle([cx - w / 2, ground - h + 2.25 * r, cx + w / 2, ground], radius=w * 0.38, fill=body)


def draw(size: int = 256) -> Image.Image:
    s = size * SUPER
    # vertical gradient background, then cut to a rounded square
    bg = Image.new("RGB", (s, s))
    px = ImageDraw.Draw(bg)
    for y in range(s):
        t = y / (s - 1)
        px.line([(0, y), (s, y)], fill=tuple(round(a + (b - a) * t) for a, b in zip(BG_TOP, BG_BOTTOM)))
    img = Image.new("RGBA", (s, s), (0, 0, 0, 0))
    mask = Image.new("L", (s, s), 0)
    ImageDraw.Draw(mask).rounded_rectangle([0, 0, s - 1, s - 1], radius=s * 0.2, fill=255)
    img.paste(bg, (0, 0), mask)
    d = ImageDraw.Draw(img)

    # the film strip with its sprocket holes
    top, bottom = s * 0.25, s * 0.75
    d.rectangle([0, top, s, bottom], fill=STRIP)
    band = (bottom - top) * 0.14
    holes = 9
    for i in range(holes):
        x = (i + 0.5) * s / holes
        hw, hh = s * 0.022, band * 0.32
        for yc in (top + band / 2, bottom - band / 2):
            d.rounded_rectangle([x - hw, yc - hh, x + hw, yc + hh], radius=hh * 0.5, fill=HOLE)

    # three frames: class, instance, part level
    gap = s * 0.035
    fw = (s - 4 * gap) / 3
    f_top, f_bottom = top + band, bottom - band
    looks = [
        ((CLASS, CLASS), (CLASS, CLASS)),  # (left body, left head), (right body, right head)
        ((LEFT, LEFT), (RIGHT, RIGHT)),
        ((PLAIN, PART), (PLAIN, PLAIN)),
    ]
    for k, ((lb, lh), (rb, rh)) in enumerate(looks):
        x0 = gap + k * (fw + gap)
        d.rounded_rectangle([x0, f_top, x0 + fw, f_bottom], radius=s * 0.02, fill=SCENE)
        ground = f_bottom - (f_bottom - f_top) * 0.06
        h = (f_bottom - f_top) * 0.78
        _person(d, x0 + fw * 0.285, ground, h, lb, lh)
        _person(d, x0 + fw * 0.715, ground, h * 0.92, rb, rh)
    return img.resize((size, size), Image.LANCZOS)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(REPO, "docs", "icon.png"))
    ap.add_argument("--size", type=int, default=256)
    a = ap.parse_args()
    draw(a.size).save(a.out, optimize=True)
    print("wrote", os.path.relpath(a.out, REPO), f"({os.path.getsize(a.out)} bytes)")


if __name__ == "__main__":
    main()
