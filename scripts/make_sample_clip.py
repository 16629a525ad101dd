"""Reproduce the sample clip and its region masks from the original footage.

Source: `vtest.avi` (768x576, 10 fps, a static camera over a campus path with pedestrians)
from the OpenCV samples, shipped by Debian's `opencv-doc` package
(`apt-get install opencv-doc`). We keep 24 frames (source frames 300, 302, ..., 346:
5 fps) of a 256x256 window in which a couple walks side by side, and make one mask per
frame for each person and for the background with classical segmentation only:

1. background model: the per-pixel median (RGB) of every 4th source frame;
2. foreground: the largest channel difference to the background > 30 in the window,
   opened (3x3) and closed (5x5), components under 150 px dropped;
3. the two people touch, so they are told apart by a marker watershed on the frame: seeds
   are the eroded foreground on either side of the emptiest pixel column in the middle of
   the foreground's extent (the gap between them);
4. cast shadows (darker than the background by a factor 0.45..0.92 with the same
   chromaticity) are removed from each person, a vertical closing gives back the legs,
   each person keeps its largest component and has its small holes (<= 40 px) filled;
5. background = not (left or right); head_left = the top 22% of the left person's box,
   inside the left person's mask (the part-level example edits it).

    python scripts/make_sample_clip.py [--source vtest.avi] [--out example_data] [--overlay PNG/JPG]

Needs numpy, opencv-python-headless and av (not torch). Deterministic: the same source
gives the same mask files; the mp4 is re-encoded with fixed settings.
"""
from __future__ import annotations

import argparse
import glob
import gzip
import os
import shutil
import tempfile
from fractions import Fraction

import av
import cv2
import numpy as np

FIRST, STRIDE, COUNT = 300, 2, 24
WINDOW = (512, 112, 256, 256)  # x, y, width, height in source pixels
REGIONS = ("person_left", "person_right", "background", "head_left")
CANDIDATES = ("/usr/share/doc/opencv-doc/examples/data/vtest.avi",
              "/usr/share/doc/opencv-doc/examples/data/vtest.avi.gz")


def find_source() -> str:
    for p in CANDIDATES + tuple(glob.glob("/usr/share/doc/opencv-doc/**/vtest.avi*", recursive=True)):
        if os.path.isfile(p):
            return p
    raise SystemExit("vtest.avi not found: install Debian's opencv-doc (`apt-get install opencv-doc`) "
                     "or pass --source PATH")


def read_source(path: str):
    """The RGB median background of the window, the kept RGB frames, and the fps."""
    if path.endswith(".gz"):
        tmp = tempfile.NamedTemporaryFile(suffix=".avi", delete=False)
        with gzip.open(path) as src, tmp:
            shutil.copyfileobj(src, tmp)
        path = tmp.name
        try:
            return _read(path)
        finally:
            os.unlink(path)
    return _read(path)


def _read(path: str):
    x, y, w, h = WINDOW
    keep = set(range(FIRST, FIRST + STRIDE * COUNT, STRIDE))
    samples, kept = [], {}
    with av.open(path) as c:
        stream = c.streams.video[0]
        fps = float(stream.average_rate)
        for i, frame in enumerate(c.decode(stream)):
            if i % 4 == 0 or i in keep:
                rgb = frame.to_ndarray(format="rgb24")
                if i % 4 == 0:
                    samples.append(rgb[y:y + h, x:x + w].copy())
                if i in keep:
                    kept[i] = rgb
    if len(kept) != COUNT:
        raise SystemExit(f"{path}: expected at least {FIRST + STRIDE * COUNT} frames")
    background = np.median(np.stack(samples), axis=0).astype(np.uint8)
    return background, [kept[i] for i in sorted(kept)], fps


def largest_component(mask: np.ndarray) -> np.ndarray:
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8))
    if n <= 1:
        return mask.astype(bool)
    best = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    return labels == best


def fill_small_holes(mask: np.ndarray, max_area: int) -> np.ndarray:
    """Fill the background pockets of at most max_area px that do not touch the border."""
    n, labels, stats, _ = cv2.connectedComponentsWithStats((~mask).astype(np.uint8), connectivity=4)
    h, w = mask.shape
    out = mask.copy()
    for j in range(1, n):
        x, y, bw, bh, area = stats[j]
        if area <= max_area and x > 0 and y > 0 and x + bw < w and y + bh < h:
            out |= labels == j
    return out


def segment(rgb: np.ndarray, background: np.ndarray):
    """Masks of one frame (window size): person_left, person_right, background, head_left."""
    frame = crop(rgb)
    diff = np.abs(frame.astype(np.int16) - background.astype(np.int16)).max(axis=-1)
    fg = (diff > 30).astype(np.uint8)
    fg = cv2.morphologyEx(fg, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    fg = cv2.morphologyEx(fg, cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5)))
    n, labels, stats, _ = cv2.connectedComponentsWithStats(fg)
    fg = np.isin(labels, [j for j in range(1, n) if stats[j, cv2.CC_STAT_AREA] >= 150])

    # Split: watershed from seeds on either side of the emptiest column between the two.
    cols = fg.sum(axis=0)
    xs = np.nonzero(cols)[0]
    x0, x1 = int(xs[0]), int(xs[-1])
    lo, hi = x0 + int(0.3 * (x1 - x0)), x0 + int(0.7 * (x1 - x0))
    split = lo + int(np.argmin(cols[lo:hi + 1]))
    fg8 = fg.astype(np.uint8)
    core = cv2.erode(fg8, np.ones((5, 5), np.uint8)).astype(bool)
    column = np.arange(fg.shape[1])[None, :]
    markers = np.zeros(fg.shape, np.int32)
    markers[~cv2.dilate(fg8, np.ones((5, 5), np.uint8)).astype(bool)] = 1
    markers[core & (column < split - 3)] = 2
    markers[core & (column > split + 3)] = 3
    cv2.watershed(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR), markers)

    # Cast shadows: darker than the background, same chromaticity.
    f, b = frame.astype(np.float32), background.astype(np.float32)
    ratio = (f.sum(-1) + 1) / (b.sum(-1) + 1)
    chroma = np.abs(f / (f.sum(-1, keepdims=True) + 1) - b / (b.sum(-1, keepdims=True) + 1)).max(-1)
    shadow = (ratio > 0.45) & (ratio < 0.92) & (chroma < 0.03)

    people = []
    for label in (2, 3):
        person = fg & (markers == label)
        m = (person & ~shadow).astype(np.uint8)
        m = cv2.morphologyEx(m, cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3, 9)))
        m = cv2.morphologyEx(m, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
        people.append(fill_small_holes(largest_component(m.astype(bool) & person), 40))
    left, right = people[0], people[1] & ~people[0]
    ys, _ = np.nonzero(left)
    head = left.copy()
    head[int(ys.min() + 0.22 * (ys.max() - ys.min() + 1)):] = False
    return {"person_left": left, "person_right": right, "background": ~(left | right), "head_left": head}


def crop(rgb: np.ndarray) -> np.ndarray:
    x, y, w, h = WINDOW
    return np.ascontiguousarray(rgb[y:y + h, x:x + w])


def write_video(path: str, frames, fps: float) -> None:
    with av.open(path, "w", format="mp4") as c:
        s = c.add_stream("libx264", rate=Fraction(fps).limit_denominator(1000))
        s.width, s.height, s.pix_fmt = frames[0].shape[1], frames[0].shape[0], "yuv420p"
        s.options = {"crf": "20", "preset": "medium", "threads": "1"}
        for f in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


OVERLAY_FRAMES = (0, 8, 16, 23)
OVERLAY_COLOURS = {"person_left": (220, 30, 30), "person_right": (30, 30, 220), "head_left": (255, 200, 0)}


def write_overlay(path: str, frames, masks) -> None:
    """A strip of a few frames with the person and head masks tinted over them."""
    tiles = []
    for i in OVERLAY_FRAMES:
        tile = frames[i].astype(np.float32)
        for name, colour in OVERLAY_COLOURS.items():
            m = masks[i][name]
            tile[m] = 0.45 * tile[m] + 0.55 * np.array(colour, np.float32)
        tiles.append(tile.astype(np.uint8))
    cv2.imwrite(path, cv2.cvtColor(np.hstack(tiles), cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 85])


def make(source: str, out: str, overlay: str | None = None) -> None:
    background, kept, fps = read_source(source)
    os.makedirs(out, exist_ok=True)
    masks_dir = os.path.join(out, "masks")
    shutil.rmtree(masks_dir, ignore_errors=True)
    for r in REGIONS:
        os.makedirs(os.path.join(masks_dir, r))
    all_masks = [segment(rgb, background) for rgb in kept]
    for i, masks in enumerate(all_masks):
        for name, m in masks.items():
            cv2.imwrite(os.path.join(masks_dir, name, f"{i:05d}.png"), m.astype(np.uint8) * 255,
                        [cv2.IMWRITE_PNG_COMPRESSION, 9, cv2.IMWRITE_PNG_BILEVEL, 1])
    frames = [crop(f) for f in kept]
    write_video(os.path.join(out, "vtest_two_people.mp4"), frames, fps / STRIDE)
    if overlay:
        write_overlay(overlay, frames, all_masks)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", help="vtest.avi (default: from Debian's opencv-doc)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "example_data"))
    ap.add_argument("--overlay", help="also write a preview strip of the masks over frames "
                    "(the README's docs/sample_clip_masks.jpg)")
    a = ap.parse_args()
    make(a.source or find_source(), a.out, a.overlay)
    print("wrote", a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
