"""Benchmark: ST-Layout attention (layout_attention) vs the dense reference vs plain SDPA.

Full space-time self-attention over F frames of 32x32 tokens (Lq = Lk = F*1024), B=1,
8 heads of 80 dims, 2 regions + background, c = 0.3 * treg(981) * size (reference
size term): the self-attention defaults at the first step.

    python bench/attention.py [--frames 4 8 16 32] [--repeats 3] [--dense-limit-gb 8] [--threads N]

Methods
- layout: videograin_core.attention.st_layout.layout_attention (chunked, memory linear in F);
- sdpa:   torch.nn.functional.scaled_dot_product_attention over the same keys,
          unmodulated (the fused kernel: the speed floor we compare against);
- dense:  the rule materialised as the reference implementation does: all heads'
          [Lq, Lk] logits, the positive map, the modulated logits and the softmax.
          Skipped (with the memory it would need) above --dense-limit-gb.

How it is measured (honest, and why)
- Time: the minimum over --repeats runs; layout and sdpa are timed in the same process,
  alternating, so load from other processes on the machine hits both alike. The ratio
  layout/sdpa is the number to read; absolute seconds depend on the machine.
- Peak memory: each (method, F) runs in a fresh subprocess. After the inputs exist and a
  small warm-up call has loaded the kernels, freed heap memory is returned to the OS
  (malloc_trim) and the RSS high-water mark (VmHWM in /proc/self/status) is reset to the
  current RSS; after one full-size call the high-water mark is read. The difference is
  the extra peak memory of the call, output tensor included, in the same units for every
  method (without the reset, memory freed earlier and reused by the call would hide).
  Allocator caching cannot hide memory from a high-water mark, and a fresh process per
  measurement keeps one method's peak from masking another's.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from videograin_core.attention.region_layout import RegionLayout, treg  # noqa: E402
from videograin_core.attention.st_layout import layout_attention  # noqa: E402

from proc_memory import peak_rss_bytes, settle_and_reset_peak  # noqa: E402  (bench/ is sys.path[0])

HEADS, DIM, GRID = 8, 80, 32
LOAD_AT_START = os.getloadavg()
GiB, MiB = 2**30, 2**20


def make_inputs(frames: int, seed: int = 0):
    """q, k, v [1, F*1024, 640]; region membership [F*1024, 3]; c [F*1024]."""
    g = torch.Generator().manual_seed(seed)
    lt = frames * GRID * GRID
    q, k, v = (torch.randn(1, lt, HEADS * DIM, generator=g) for _ in range(3))
    yy, xx = torch.meshgrid(torch.arange(GRID * 8), torch.arange(GRID * 8), indexing="ij")
    masks = torch.zeros(frames, 3, GRID * 8, GRID * 8, dtype=torch.bool)
    for f in range(frames):
        cx = 60 + 4 * f % 100                       # region 0: a disc moving right
        masks[f, 0] = (xx - cx) ** 2 + (yy - 110) ** 2 < 50 ** 2
        masks[f, 1] = (xx > 150) & (yy > 40) & (yy < 220)   # region 1: a box, overlapping the disc sometimes
    masks[:, 2] = ~(masks[:, 0] | masks[:, 1])       # background
    grid = RegionLayout(masks).grid(GRID, GRID)
    c = 0.3 * treg(981) * grid.self_size("reference")
    return q, k, v, grid.clip_regions, c


def dense_reference(q, k, v, regions, c):
    """The rule as written (first form), every [Lq, Lk] tensor materialised, fp32."""
    b, lt, inner = q.shape
    qh, kh, vh = (t.view(b, lt, HEADS, DIM).transpose(1, 2) for t in (q, k, v))
    s = (qh @ kh.transpose(-1, -2)) / math.sqrt(DIM)                     # [B, H, L, L]
    positive = (regions.float() @ regions.float().T) > 0                 # [L, L]
    mx = s.amax(-1, keepdim=True)
    mn = s.amin(-1, keepdim=True)
    # s' = s + c * (mx - s) on positive pairs, s - c * (s - mn) = s + c * (mn - s) elsewhere
    target = torch.where(positive, mx, mn)                               # [B, H, L, L]
    s = target.sub_(s).mul_(c[:, None]).add_(s)
    p = s.softmax(-1)
    del s, target
    return (p @ vh).transpose(1, 2).reshape(b, lt, inner)


def sdpa(q, k, v):
    b, lt, inner = q.shape
    qh, kh, vh = (t.view(b, lt, HEADS, DIM).transpose(1, 2) for t in (q, k, v))
    return F.scaled_dot_product_attention(qh, kh, vh).transpose(1, 2).reshape(b, lt, inner)


METHODS = {
    "layout": lambda q, k, v, r, c: layout_attention(q, k, v, HEADS, r, r, c),
    "sdpa": lambda q, k, v, r, c: sdpa(q, k, v),
    "dense": lambda q, k, v, r, c: dense_reference(q, k, v, r, c),
}


def dense_bytes(frames: int) -> int:
    """Peak the dense reference needs: two [H, L, L] fp32 at once (logits and modulated
    logits, then modulated logits and softmax) + the positive map (bool [L, L])."""
    lt = frames * GRID * GRID
    return 2 * HEADS * lt * lt * 4 + lt * lt


def measure_memory_child(method: str, frames: int) -> None:
    """Runs in a fresh process: print the extra RSS high-water of one call as JSON."""
    q, k, v, r, c = make_inputs(frames)
    small = make_inputs(1)
    METHODS[method](*small)                       # load kernels / thread pools at small size
    del small
    before = settle_and_reset_peak()
    if before is None:
        before = peak_rss_bytes()
    out = METHODS[method](q, k, v, r, c)
    after = peak_rss_bytes()
    print(json.dumps({"extra_peak": after - before, "finite": bool(torch.isfinite(out).all())}))


def memory_of(method: str, frames: int) -> int:
    res = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", method, str(frames),
                          "--threads", str(torch.get_num_threads())],
                         capture_output=True, text=True, check=True)
    info = json.loads(res.stdout.strip().splitlines()[-1])
    if not info["finite"]:
        raise RuntimeError(f"{method} at F={frames} produced non-finite values")
    return info["extra_peak"]


def best_time(fn, repeats: int) -> float:
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, nargs="+", default=[4, 8, 16, 32])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dense-limit-gb", type=float, default=8.0)
    ap.add_argument("--threads", type=int, default=0,
                    help="torch intra-op threads for every method (0: torch's default). On a machine "
                         "shared with other busy processes, 1 avoids the thread-barrier stalls that make "
                         "any many-kernel method look slower than a single fused kernel")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        measure_memory_child(args.child[0], int(args.child[1]))
        return

    print(f"ST-Layout attention, CPU, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"B=1, {HEADS} heads x {DIM}, {GRID}x{GRID} tokens/frame, self-attention over all frames")
    print(f"time: min of {args.repeats} (layout and sdpa alternating in one process); "
          f"memory: extra RSS high-water of one call, fresh process each")
    hdr = (f"{'F':>3} {'tokens':>7} | {'layout s':>9} {'sdpa s':>8} {'dense s':>8} {'lay/sdpa':>8} | "
           f"{'layout MiB':>10} {'sdpa MiB':>9} {'dense MiB':>17} {'lay/dense':>9} | max|lay-dense|")
    print(hdr)
    print("-" * len(hdr))
    layout_mem = {}
    for frames in args.frames:
        q, k, v, r, c = make_inputs(frames)
        run = {m: (lambda m=m: METHODS[m](q, k, v, r, c)) for m in ("layout", "sdpa")}
        times = {"layout": math.inf, "sdpa": math.inf}
        for _ in range(args.repeats):                    # alternate: shared load hits both
            for m in ("layout", "sdpa"):
                times[m] = min(times[m], best_time(run[m], 1))
        mem = {m: memory_of(m, frames) for m in ("layout", "sdpa")}
        layout_mem[frames] = mem["layout"]
        need = dense_bytes(frames)
        if need <= args.dense_limit_gb * GiB:
            dense_t = best_time(lambda: METHODS["dense"](q, k, v, r, c), 1)
            want = METHODS["dense"](q, k, v, r, c)
            err = (METHODS["layout"](q, k, v, r, c) - want).abs().max().item()
            del want
            mem["dense"] = memory_of("dense", frames)
            dense_t_s, dense_m_s = f"{dense_t:8.2f}", f"{mem['dense'] / MiB:17.0f}"
            ratio = f"{mem['layout'] / max(mem['dense'], 1):9.3f}"
            err_s = f"{err:.1e}"
        else:
            dense_t_s = f"{'skipped':>8}"
            dense_m_s = f"skip (~{need / GiB:.1f} GB)".rjust(17)
            ratio = f"~{mem['layout'] / need:8.4f}"
            err_s = "-"
        print(f"{frames:3d} {q.shape[1]:7d} | {times['layout']:9.2f} {times['sdpa']:8.2f} {dense_t_s} "
              f"{times['layout'] / times['sdpa']:8.2f} | {mem['layout'] / MiB:10.0f} {mem['sdpa'] / MiB:9.0f} "
              f"{dense_m_s} {ratio} | {err_s}", flush=True)
        del q, k, v, r, c
    if 8 in layout_mem and 32 in layout_mem:
        print(f"layout memory growth F=8 -> F=32 (4x tokens): {layout_mem[32] / layout_mem[8]:.2f}x "
              f"(linear = 4x, quadratic = 16x)")
    fs = sorted(layout_mem)
    if len(fs) >= 3:
        # Linear memory = a constant cost per extra token (a ratio of totals also moves with
        # the fixed part, which the allocator's reuse of freed memory can even make negative)
        per_token = [(layout_mem[b] - layout_mem[a]) / ((b - a) * GRID * GRID) / 1024 for a, b in zip(fs, fs[1:])]
        print("layout memory per extra token, between successive F: "
              + ", ".join(f"{x:.1f} KiB" for x in per_token)
              + " (constant = linear; quadratic would double with every doubling of F)")
    print("~ = against the dense reference's computed need (2 fp32 [heads, L, L] + bool [L, L]), "
          "where running it would exceed the limit")
    print(f"load average at the start: {', '.join(f'{x:.2f}' for x in LOAD_AT_START)}")
    print(f"load average at the end: {', '.join(f'{x:.2f}' for x in os.getloadavg())} (2-core machine)")


if __name__ == "__main__":
    main()
