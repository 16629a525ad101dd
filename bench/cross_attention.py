"""Benchmark: modulated cross-attention (layout_attention on the text keys) vs plain SDPA.

The SD1.5 layers the method modulates for a 512x512 clip: token grids 32x32 (640 channels),
16x16 and 8x8 (1280 channels), 8 heads, 77 text keys, per frame (cross-attention does not
span frames), F frames as the batch. Two regions + background; each region's local prompt
holds 3 tokens; c = 1.0 * treg(981) * size (the cross-attention defaults at the first step).

    python bench/cross_attention.py [--frames 16] [--repeats 5] [--threads N]

Time is the minimum over --repeats, layout and SDPA alternating in one process (load from
other processes hits both alike): read the ratio, not the seconds.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from videograin_core.attention.region_layout import treg  # noqa: E402
from videograin_core.attention.st_layout import full_attention, layout_attention  # noqa: E402

HEADS, TEXT = 8, 77
LAYERS = ((32, 640), (16, 1280), (8, 1280))  # (token grid, channels) of a 512x512 clip's modulated layers


def make_inputs(frames: int, grid: int, channels: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(frames, grid * grid, channels, generator=g)
    k, v = (torch.randn(frames, TEXT, channels, generator=g) for _ in range(2))
    # left and right halves (shifting a little per frame), the rest of each frame in no region
    x = torch.arange(grid)[None, None, :].expand(frames, grid, grid)
    shift = torch.arange(frames)[:, None, None] % 3
    left = x < grid // 2 - shift
    right = x >= grid // 2 + 1 - shift
    q_regions = torch.stack([left, right], dim=-1).reshape(frames, grid * grid, 2)
    k_regions = torch.zeros(TEXT, 2, dtype=torch.bool)
    k_regions[2:5, 0] = True   # "red car" style spans inside the global prompt
    k_regions[7:10, 1] = True
    size = 1.0 - q_regions.float().sum(1, keepdim=True) / (grid * grid)  # per frame, the region's share
    c = 1.0 * treg(981) * (q_regions.float() * size).amax(-1)
    return q, k, v, q_regions, k_regions, c


def dense_rule(q, k, v, q_regions, k_regions, c):
    """The modulation rule written out in float64 (METHOD.md section 2), for the error column."""
    b, lq, ch = q.shape
    split = lambda t: t.double().reshape(b, t.shape[1], HEADS, ch // HEADS).transpose(1, 2)  # noqa: E731
    qh, kh, vh = split(q), split(k), split(v)
    s = qh @ kh.transpose(-1, -2) / (ch // HEADS) ** 0.5                       # [b, heads, lq, 77]
    pos = ((q_regions.double() @ k_regions.double().T) > 0)[:, None]           # [b, 1, lq, 77]
    mx, mn = s.amax(-1, keepdim=True), s.amin(-1, keepdim=True)
    cc = c.double()[:, None, :, None]
    s = s + pos * cc * (mx - s) - (~pos) * cc * (s - mn)
    return (s.softmax(-1) @ vh).transpose(1, 2).reshape(b, lq, ch)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's own choice)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    print(f"modulated cross-attention, CPU, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{a.frames} frames of a 512x512 clip, {HEADS} heads, {TEXT} text keys; load average at start "
          f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"{'grid':>6} {'channels':>8} | {'layout ms':>9} {'sdpa ms':>8} {'lay/sdpa':>8} | max|layout - dense rule|")
    with torch.no_grad():
        for grid, channels in LAYERS:
            q, k, v, qr, kr, c = make_inputs(a.frames, grid, channels)
            run_layout = lambda: layout_attention(q, k, v, HEADS, qr, kr, c)  # noqa: E731
            run_sdpa = lambda: full_attention(q, k, v, HEADS)  # noqa: E731  (the fused SDPA kernel)
            run_layout(), run_sdpa()  # warm-up (kernel build, allocator)
            t_lay = t_sdpa = float("inf")
            for _ in range(a.repeats):
                t_lay = min(t_lay, timed(run_layout))
                t_sdpa = min(t_sdpa, timed(run_sdpa))
            err = float((run_layout().double() - dense_rule(q, k, v, qr, kr, c)).abs().max())
            print(f"{grid:>4}^2 {channels:>8} | {t_lay * 1e3:>9.1f} {t_sdpa * 1e3:>8.1f} {t_lay / t_sdpa:>8.2f} | "
                  f"{err:.1e}")
    print(f"load average at end: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
