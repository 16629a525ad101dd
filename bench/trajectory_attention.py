"""Benchmark: the trajectory-attention step vs the all-frames self-attention of the same layer.

The layer is SD1.5's full-resolution self-attention (320 channels, 8 heads of 40), the one
the reference runs trajectory attention on: 32x32 tokens for 256x256 frames (default, CPU)
or, with --grid 64, 64x64 tokens for 512x512 frames (GPU-sized). B=1, F frames.

    python bench/trajectory_attention.py [--frames 8 16 32] [--grid 32] [--repeats 3]
                                         [--device cpu|cuda] [--dtype float32] [--threads N]

Trajectories are real ones: DIS flow (trajectories.flow) of the sample clip
example_data/vtest_two_people.mp4 (24 frames; played forward then backward to reach 32),
resized to grid*8 pixels, built at the token grid. q, k, o are random (the step's cost
does not depend on their values).

Methods
- traj: videograin_core.trajectories.attention.trajectory_attention (the step alone);
- sdpa: torch.nn.functional.scaled_dot_product_attention over [1, heads, F*h*w, d], the
        self-attention over all frames the step follows (the cost it is added to).

How it is measured
- Time: minimum over --repeats, traj and sdpa alternating in one process, so load from
  other processes hits both alike. Read the ratio traj/sdpa (target <= 0.25), not the
  seconds.
- Memory of the step: CPU: a fresh subprocess per F; after the inputs exist and a small
  warm-up call, freed heap goes back to the OS and the RSS high-water mark is reset
  (bench/proc_memory.py); the mark after one call, minus that, is the extra peak of the
  call, its output included. CUDA: torch.cuda.max_memory_allocated over the call, minus
  what was allocated before it. Linear in F means a constant cost per extra token.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from videograin_core.trajectories.attention import DEFAULT_MEMORY_BUDGET_BYTES, trajectory_attention  # noqa: E402
from videograin_core.trajectories.chains import build_trajectories  # noqa: E402
from videograin_core.trajectories.flow import clip_flows  # noqa: E402

from proc_memory import peak_rss_bytes, settle_and_reset_peak  # noqa: E402  (bench/ is sys.path[0])

HEADS, CHANNELS = 8, 320
SAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "example_data",
                      "vtest_two_people.mp4")
MiB = 2**20


def sample_frames(frames: int, side: int) -> torch.Tensor:
    """[frames, side, side, 3] in 0..1: the sample clip forward, then backward, ...
    Decoded with PyAV, or OpenCV where PyAV is not installed (a bare GPU machine)."""
    try:
        import av
        with av.open(SAMPLE) as c:
            clip = [torch.from_numpy(f.to_ndarray(format="rgb24")) for f in c.decode(video=0)]
    except ImportError:
        import cv2
        cap, clip = cv2.VideoCapture(SAMPLE), []
        ok, bgr = cap.read()
        while ok:
            clip.append(torch.from_numpy(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)))
            ok, bgr = cap.read()
        cap.release()
    order = list(range(len(clip))) + list(range(len(clip) - 2, 0, -1))       # ping-pong
    picked = torch.stack([clip[order[i % len(order)]] for i in range(frames)]).float() / 255
    if picked.shape[1] != side:
        picked = F.interpolate(picked.permute(0, 3, 1, 2), size=(side, side), mode="bilinear",
                               align_corners=False).clamp(0, 1).permute(0, 2, 3, 1).contiguous()
    return picked


def sdpa(q, k, v):
    b, n, inner = q.shape
    qh, kh, vh = (t.view(b, n, HEADS, inner // HEADS).transpose(1, 2) for t in (q, k, v))
    return F.scaled_dot_product_attention(qh, kh, vh).transpose(1, 2).reshape(b, n, inner)


def make_inputs(frames: int, grid: int, device: str, dtype: torch.dtype = torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, frames * grid * grid, CHANNELS, generator=g).to(device, dtype) for _ in range(3)]


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def best_time(fn, device: str) -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def step_memory(flows: torch.Tensor, frames: int, grid: int, device: str, dtype: torch.dtype = torch.float32,
                budget: int = DEFAULT_MEMORY_BUDGET_BYTES):
    """Extra peak bytes of one trajectory_attention call (module docstring)."""
    traj = build_trajectories(flows[:frames - 1], (grid, grid), tuple(flows.shape[1:3]))
    q, k, o = make_inputs(frames, grid, device, dtype)
    traj.groups(device)
    small = build_trajectories(flows[:1], (grid, grid), tuple(flows.shape[1:3]))
    trajectory_attention(*make_inputs(2, grid, device, dtype), HEADS, small, memory_budget_bytes=budget)  # warm-up
    if device == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        trajectory_attention(q, k, o, HEADS, traj, memory_budget_bytes=budget)
        sync(device)
        return torch.cuda.max_memory_allocated() - before
    before = settle_and_reset_peak()
    if before is None:
        before = peak_rss_bytes()
    out = trajectory_attention(q, k, o, HEADS, traj, memory_budget_bytes=budget)
    after = peak_rss_bytes()
    assert torch.isfinite(out).all()
    return after - before


def memory_of(flow_file: str, frames: int, grid: int, device: str, dtype: str, budget: int) -> int:
    if device == "cuda":
        from safetensors.torch import load_file
        return step_memory(load_file(flow_file)["flows"], frames, grid, device, getattr(torch, dtype), budget)
    res = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", flow_file, str(frames), str(grid),
                          "--threads", str(torch.get_num_threads()), "--dtype", dtype, "--budget-mib",
                          str(budget / MiB)],
                         capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])["extra_peak"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, nargs="+", default=[8, 16, 32])
    ap.add_argument("--grid", type=int, default=32, help="token grid side (frames are 8x it in pixels)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                    help="q, k, o dtype (the host runs fp16 on a GPU)")
    ap.add_argument("--budget-mib", type=float, default=DEFAULT_MEMORY_BUDGET_BYTES / MiB,
                    help="trajectory_attention's chunk budget (default: the module's)")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    budget = int(args.budget_mib * MiB)
    if args.child:
        from safetensors.torch import load_file
        flows = load_file(args.child[0])["flows"]
        print(json.dumps({"extra_peak": step_memory(flows, int(args.child[1]), int(args.child[2]), "cpu",
                                                    getattr(torch, args.dtype), budget)}))
        return

    load_start = os.getloadavg()
    side, grid, dev = args.grid * 8, args.grid, args.device
    t = time.perf_counter()
    frames = sample_frames(max(args.frames), side)
    flows = clip_flows(frames).forward
    flow_s = time.perf_counter() - t
    where = (torch.cuda.get_device_name() if dev == "cuda" else f"CPU, {torch.get_num_threads()} threads")
    print(f"Trajectory attention vs all-frames SDPA, {where}, torch {torch.__version__}; B=1, {CHANNELS} channels, "
          f"{HEADS} heads x {CHANNELS // HEADS}, {grid}x{grid} tokens/frame ({side}x{side} frames), {args.dtype}")
    print(f"DIS flow of {max(args.frames)} frames at {side}x{side}: {flow_s:.2f} s (sample clip, ping-pong)")
    print(f"time: min of {args.repeats} (traj and sdpa alternating in one process); memory: extra peak of one "
          f"call ({'max_memory_allocated' if dev == 'cuda' else 'RSS high-water, fresh process each'}); "
          f"chunk budget {budget / MiB:g} MiB")
    hdr = (f"{'F':>3} {'tokens':>7} {'traj.':>6} {'mean L':>6} {'build s':>7} | {'traj s':>8} {'sdpa s':>8} "
           f"{'traj/sdpa':>9} | {'step MiB':>8} {'KiB/token':>9}")
    print(hdr)
    print("-" * len(hdr))
    mem = {}
    with tempfile.TemporaryDirectory() as tmp:
        flow_file = os.path.join(tmp, "flows.safetensors")
        from safetensors.torch import save_file
        save_file({"flows": flows.contiguous()}, flow_file)
        for f in args.frames:
            t = time.perf_counter()
            traj = build_trajectories(flows[:f - 1], (grid, grid), (side, side))
            build_s = time.perf_counter() - t
            traj.groups(dev)
            q, k, o = make_inputs(f, grid, dev, getattr(torch, args.dtype))
            step = lambda: trajectory_attention(q, k, o, HEADS, traj, memory_budget_bytes=budget)  # noqa: E731
            step()                                                                 # warm-up at size
            times = {"traj": math.inf, "sdpa": math.inf}
            run = {"traj": step, "sdpa": lambda: sdpa(q, k, o)}
            for _ in range(args.repeats):                                          # alternate: shared load hits both
                for m in ("traj", "sdpa"):
                    times[m] = min(times[m], best_time(run[m], dev))
            del q, k, o
            mem[f] = memory_of(flow_file, f, grid, dev, args.dtype, budget)
            n = f * grid * grid
            print(f"{f:3d} {n:7d} {traj.count:6d} {n / traj.count:6.2f} {build_s:7.2f} | {times['traj']:8.3f} "
                  f"{times['sdpa']:8.3f} {times['traj'] / times['sdpa']:9.3f} | {mem[f] / MiB:8.1f} "
                  f"{mem[f] / n / 1024:9.2f}", flush=True)
    fs = sorted(mem)
    if len(fs) >= 2:
        a, b = fs[0], fs[-1]
        print(f"step memory growth F={a} -> F={b} ({b / a:g}x tokens): {mem[b] / max(mem[a], 1):.2f}x "
              f"(linear: at most {b / a:g}x; quadratic: {(b / a) ** 2:g}x). The chunk budget "
              f"({budget / MiB:g} MiB) is a constant part, the output [B, tokens, {CHANNELS}] "
              f"the linear part.")
        per_token = [(mem[y] - mem[x]) / ((y - x) * grid * grid) / 1024 for x, y in zip(fs, fs[1:])]
        out_kib = CHANNELS * torch.finfo(getattr(torch, args.dtype)).bits / 8 / 1024
        print("memory per extra token between successive F: " + ", ".join(f"{v:.2f} KiB" for v in per_token)
              + f" (the output alone is {out_kib:.2f} KiB/token)")
    print(f"a dense 'same trajectory' mask at F={fs[-1]} would be {(fs[-1] * grid * grid) ** 2 / MiB:.0f} MiB "
          f"of bool, and its fp32 logits {HEADS} x 4 bytes x that")
    print(f"load average at the start: {', '.join(f'{x:.2f}' for x in load_start)}; at the end: "
          f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
