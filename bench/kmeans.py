"""Benchmark: Auto Regions' k-means on the sample clip, at the paper's size.

What the node clusters is the decoder's self-attention output at the 1/2 grid (640 channels;
32x32 tokens per frame at 512x512), all frames together. With the random test weights those
features carry no meaning, so this bench clusters features of the SAME SHAPE made from the
sample clip's own pixels: each token's 16x16-pixel patch (at 512x512) mapped to 640
dimensions by a fixed random projection (seed 0). The cost of k-means depends only on the
shape (points x dimensions x K), so the times are those the node spends at that size; the
agreement with the clip's masks says only that k-means on the clip separates what its
pixels separate.

    python bench/kmeans.py [--frames 16] [--size 512] [--ks 2 3 4 8] [--restarts 4]

Prints per K: time (the node's call: k-means++ seeding, Lloyd iterations, `restarts`
restarts), the features' memory, whether a second run gives the same labels, and for each
of the clip's people/background masks the best IoU of any cluster with it (on the token
grid).
"""
from __future__ import annotations

import argparse
import glob
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)


def sample_frames(frames: int, size: int) -> np.ndarray:
    """The sample clip's first `frames` frames, short side `size`, centre-cropped square,
    float32 [F, size, size, 3] in 0..1."""
    import av
    out = []
    with av.open(os.path.join(REPO, "example_data", "vtest_two_people.mp4")) as c:
        for frame in c.decode(video=0):
            img = frame.to_image().convert("RGB")
            w, h = img.size
            s = min(w, h)
            img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)).resize((size, size))
            out.append(np.asarray(img, dtype=np.float32) / 255.0)
            if len(out) == frames:
                break
    return np.stack(out)


def sample_masks(region: str, frames: int, grid: int) -> np.ndarray:
    """The clip's mask of `region` per frame on the token grid, bool [F, grid, grid]."""
    from PIL import Image
    out = []
    for path in sorted(glob.glob(os.path.join(REPO, "example_data", "masks", region, "*.png")))[:frames]:
        img = Image.open(path).convert("L")
        w, h = img.size
        s = min(w, h)
        img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)).resize((grid, grid))
        out.append(np.asarray(img) >= 128)
    return np.stack(out)


def patch_features(frames: np.ndarray, grid: int, dims: int) -> np.ndarray:
    """[F*grid*grid, dims] float32: each token's pixel patch through a fixed random projection."""
    f, size = frames.shape[0], frames.shape[1]
    p = size // grid
    patches = frames.reshape(f, grid, p, grid, p, 3).transpose(0, 1, 3, 2, 4, 5).reshape(f * grid * grid, -1)
    proj = np.random.default_rng(0).standard_normal((patches.shape[1], dims)).astype(np.float32)
    return (patches - patches.mean(0)) @ proj / np.sqrt(patches.shape[1])


def best_iou(labels: np.ndarray, mask: np.ndarray, k: int) -> float:
    ious = []
    for c in range(k):
        m = labels == c
        union = (m | mask).sum()
        ious.append((m & mask).sum() / union if union else 0.0)
    return float(max(ious))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--size", type=int, default=512, help="frame side in pixels (square)")
    ap.add_argument("--ks", type=int, nargs="+", default=[2, 3, 4, 8])
    ap.add_argument("--restarts", type=int, default=4)
    ap.add_argument("--dims", type=int, default=640, help="feature channels (SD1.5 decoder at the 1/2 grid: 640)")
    a = ap.parse_args()
    from videograin_core.capture.clusters import kmeans

    grid = a.size // 16  # the 1/2 grid: latent / 2
    frames = sample_frames(a.frames, a.size)
    x = patch_features(frames, grid, a.dims)
    masks = {r: sample_masks(r, a.frames, grid) for r in ("person_left", "person_right", "background")}
    masks["people"] = masks["person_left"] | masks["person_right"]
    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"k-means on the sample clip: {a.frames} frames at {a.size}x{a.size} -> {x.shape[0]} tokens "
          f"({a.frames} x {grid}x{grid}) x {a.dims} dims, {x.nbytes / 2**20:.1f} MiB of features; "
          f"{a.restarts} restarts; load average {load}")
    print(f"{'K':>3} {'time s':>8} {'same labels twice':>18}  best IoU with the clip's masks (token grid)")
    for k in a.ks:
        t0 = time.perf_counter()
        labels = kmeans(x, k, seed=0, restarts=a.restarts)
        secs = time.perf_counter() - t0
        again = kmeans(x, k, seed=0, restarts=a.restarts)
        lab = labels.reshape(a.frames, grid, grid)
        ious = ", ".join(f"{r} {best_iou(lab, m, k):.2f}" for r, m in masks.items())
        print(f"{k:>3} {secs:8.2f} {str(bool((labels == again).all())):>18}  {ious}", flush=True)
    print(f"load average at the end {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
