"""Reproduce the sample clip and its region masks from the original footage.

Source: `vtest.avi` (768x576, 10 fps, a static camera over a campus path with pedestrians)
from the OpenCV samples, shipped by Debian's `opencv-doc` package
(`apt-get install opencv-doc`). We keep 24 frames (source frames 300, 302, ..., 346:
5 fps) of a 256x256 window in which a couple walks side by side, and make one mask per
frame for each person and for the background with classical segmentation only:

1. background model: the per-pixel median of every 4th source frame (grey);
2. foreground: |frame - background| > 30 in the window, opened (3x3) and closed (9x9),
   components under 150 px dropped, holes filled;
3. the two people touch, so the foreground is split at the emptiest pixel column in the
   middle of its extent (the gap between them); each side keeps its largest component;
4. background = not (left or right); head_left = the top 22% of the left person's box,
   inside the left person's mask (the part-level example edits it).

    python scripts/make_sample_clip.py [--source vtest.avi] [--out example_data]

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
    """Grey frames for the background model, RGB for the kept frames; and the fps."""
    if path.endswith(".gz"):
        tmp = tempfile.NamedTemporaryFile(suffix=".avi", delete=False)
        with gzip.open(path) as src, tmp:
            shutil.copyfileobj(src, tmp)
        path = tmp.name
    keep = set(range(FIRST, FIRST + STRIDE * COUNT, STRIDE))
    grey_samples, kept = [], {}
    with av.open(path) as c:
        stream = c.streams.video[0]
        fps = float(stream.average_rate)
        for i, frame in enumerate(c.decode(stream)):
            if i % 4 == 0:
                grey_samples.append(frame.to_ndarray(format="gray"))
            if i in keep:
                kept[i] = frame.to_ndarray(format="rgb24")
    if len(kept) != COUNT:
        raise SystemExit(f"{path}: expected at least {FIRST + STRIDE * COUNT} frames")
    return np.stack(grey_samples), [kept[i] for i in sorted(kept)], fps


def largest_component(mask: np.ndarray) -> np.ndarray:
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8))
    if n <= 1:
        return mask.astype(bool)
    best = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    return labels == best


def fill_holes(mask: np.ndarray) -> np.ndarray:
    flood = np.pad(mask.astype(np.uint8), 1)
    cv2.floodFill(flood, None, (0, 0), 1)
    holes = flood[1:-1, 1:-1] == 0
    return mask.astype(bool) | holes


def segment(rgb: np.ndarray, background: np.ndarray):
    x, y, w, h = WINDOW
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)[y:y + h, x:x + w].astype(np.int16)
    fg = (np.abs(grey - background[y:y + h, x:x + w].astype(np.int16)) > 30).astype(np.uint8)
    fg = cv2.morphologyEx(fg, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    fg = cv2.morphologyEx(fg, cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (9, 9)))
    n, labels, stats, _ = cv2.connectedComponentsWithStats(fg)
    fg = np.isin(labels, [j for j in range(1, n) if stats[j, cv2.CC_STAT_AREA] >= 150])
    fg = fill_holes(fg)
    cols = fg.sum(axis=0)
    xs = np.nonzero(cols)[0]
    x0, x1 = int(xs[0]), int(xs[-1])
    lo, hi = x0 + int(0.3 * (x1 - x0)), x0 + int(0.7 * (x1 - x0))
    split = lo + int(np.argmin(cols[lo:hi + 1]))
    left, right = fg.copy(), fg.copy()
    left[:, split:] = False
    right[:, :split] = False
    left, right = largest_component(left), largest_component(right)
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


def make(source: str, out: str) -> None:
    grey, kept, fps = read_source(source)
    background = np.median(grey, axis=0).astype(np.uint8)
    os.makedirs(out, exist_ok=True)
    masks_dir = os.path.join(out, "masks")
    shutil.rmtree(masks_dir, ignore_errors=True)
    for r in REGIONS:
        os.makedirs(os.path.join(masks_dir, r))
    for i, rgb in enumerate(kept):
        for name, m in segment(rgb, background).items():
            cv2.imwrite(os.path.join(masks_dir, name, f"{i:05d}.png"), m.astype(np.uint8) * 255,
                        [cv2.IMWRITE_PNG_COMPRESSION, 9, cv2.IMWRITE_PNG_BILEVEL, 1])
    write_video(os.path.join(out, "vtest_two_people.mp4"), [crop(f) for f in kept], fps / STRIDE)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", help="vtest.avi (default: from Debian's opencv-doc)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "example_data"))
    a = ap.parse_args()
    make(a.source or find_source(), a.out)
    print("wrote", a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
