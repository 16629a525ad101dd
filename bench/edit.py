"""End-to-end benchmark: the instance-level edit of the sample clip on the FULL-SIZE random
SD1.5 checkpoint (UNet, CLIP-L and KL VAE of the real sizes) at a small fixed resolution.

    python bench/edit.py [--frames 8 16 32] [--size 64] [--steps 10] [--long 64]
    python bench/edit.py --gpu --frames 16 --size 512 --variants c e   (a CUDA GPU: fp16 as the host picks)

For every frame count, each variant runs in a fresh process (so peak RSS is its own) that
imports the host in-process and executes the API workflow with the host's executor:
  (a) unpatched model: ordinary per-frame attention
  (b) full-frame attention, no modulation (ST-Layout Patch with both strengths 0)
  (c) the workflow as shipped: the full ST-Layout patch and trajectory attention at full
      resolution (defaults), inversion cache empty
  (d) a second edit of the same clip with NEW prompts (c's cache filled): inversion hits
  (e) (c) without trajectory attention (the ST-Layout patch alone)
  (f) (c) with PnP feature injection for the first steps // 5 steps (recorded by the
      inversion, injected by Sample), as about half the reference's configs do
Video-P2P (the video_p2p_word_swap workflow: next-step inversion, no masks):
  (g) a plain edit of the same clip: VideoGrain Sample of the target prompt from the
      inversion, no attention control, no blend (one branch)
  (p) the P2P edit, source mode direct (source and target branches in one run)
  (q) the P2P edit, source mode fast
  (n) the P2P edit, source mode null-text (the shared null embedding optimised per step)
The edits of (c) and (e) are saved as PNG frames with the source frames, and their
Warp-Err (videograin_core.metrics.warp_error: the source's DIS flow, forward-backward
occlusion check, mean absolute difference on [0, 1], x100 as the paper reports) is
printed; with random weights it says nothing about quality, only that the numbers run.
Timed: the pack's heavy nodes (DDIM Invert, Sample, Decode), wall clock, summed. Memory:
the models are loaded first, then the RSS high-water mark (VmHWM) is reset to the settled
RSS, so the peak read after the edit is the edit's own; reported as that peak and as its
growth above the loaded models, with the cost of each extra frame between frame counts.
Ratios are within one run on one machine; absolute times are machine-dependent.
--long F: also one (c) run at F frames, compared with what linear growth from the
smallest F predicts for its memory above the model baseline.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from host_bench import NullServer, load_host, private_folders, time_executes  # bench/ is sys.path[0]
from proc_memory import peak_rss_bytes, settle_and_reset_peak, status_kib

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.append(os.path.join(REPO, "scripts"))
import comfy_runner  # noqa: E402
TIMED_NODES = ("VideoGrainFlowTrajectories", "VideoGrainDDIMInvert", "VideoGrainSample", "VideoGrainP2PSample",
               "VideoGrainDecode")
VARIANTS = "abcdefgpqn"


def looped_sample_clip(input_dir: str, frames: int) -> None:
    """The sample clip (24 frames) played forward and backward until it has `frames`
    frames, with its masks likewise, under the names the workflow expects. Content does
    not matter for timing; frame count does."""
    import glob
    import shutil
    from fractions import Fraction

    import av
    src = os.path.join(REPO, "example_data")
    if os.path.exists(os.path.join(input_dir, "vtest_two_people.mp4")):
        return  # (d) reuses (c)'s input: same bytes, so the inversion cache can hit
    with av.open(os.path.join(src, "vtest_two_people.mp4")) as c:
        fps = c.streams.video[0].average_rate
        clip = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    n = len(clip)
    order = [(i % (2 * n - 2)) if (i % (2 * n - 2)) < n else 2 * n - 2 - (i % (2 * n - 2)) for i in range(frames)]
    with av.open(os.path.join(input_dir, "vtest_two_people.mp4"), "w") as c:
        s = c.add_stream("libx264", rate=Fraction(fps))
        s.width, s.height, s.pix_fmt, s.options = clip[0].shape[1], clip[0].shape[0], "yuv420p", {"crf": "18", "threads": "1"}
        for i in order:
            for p in s.encode(av.VideoFrame.from_ndarray(clip[i], format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    for region in os.listdir(os.path.join(src, "masks")):
        files = sorted(glob.glob(os.path.join(src, "masks", region, "*.png")))
        dst = os.path.join(input_dir, "vtest_two_people_masks", region)
        os.makedirs(dst, exist_ok=True)
        for j, i in enumerate(order):
            shutil.copyfile(files[i], os.path.join(dst, f"{j:05d}.png"))


P2P_VARIANTS = {"p": "direct", "q": "fast", "n": "null-text"}


def shipped_workflow(name: str, frames: int, size: int, steps: int, ckpt: str) -> dict:
    """A shipped API workflow at the bench's checkpoint, frame count, size and steps."""
    with open(os.path.join(REPO, "example_workflows", "api", name + ".json")) as f:
        prompt = json.load(f)
    for node in prompt.values():
        t, inp = node["class_type"], node["inputs"]
        if t == "CheckpointLoaderSimple":
            inp["ckpt_name"] = ckpt
        elif t == "VideoGrainVideoLoader":
            inp.update(frame_load_cap=frames, size=size)
        elif t == "VideoGrainDDIMInvert":
            inp["steps"] = steps
    return prompt


def build_p2p_prompt(variant: str, frames: int, size: int, steps: int, ckpt: str) -> dict:
    prompt = shipped_workflow("video_p2p_word_swap", frames, size, steps, ckpt)
    ids = {node["class_type"]: k for k, node in prompt.items()}
    for node in prompt.values():
        t, inp = node["class_type"], node["inputs"]
        if t == "VideoGrainDDIMInvert":
            inp["use_cache"] = False  # every variant pays its inversion
        elif t == "VideoGrainP2PSample" and variant in P2P_VARIANTS:
            inp["source_mode"] = P2P_VARIANTS[variant]
    if variant == "g":
        p2p = prompt[ids["VideoGrainP2PSample"]]["inputs"]
        prompt[ids["VideoGrainP2PSample"]] = {"class_type": "VideoGrainSample", "inputs": {
            "model": p2p["model"], "positive": p2p["target"], "negative": p2p["negative"],
            "inversion": p2p["inversion"], "cfg": p2p["cfg"], "blend": "off", "seed": 0, "inject_step": 0}}
    return prompt


def build_prompt(variant: str, frames: int, size: int, steps: int, ckpt: str) -> dict:
    if variant in "gpqn":
        return build_p2p_prompt(variant, frames, size, steps, ckpt)
    prompt = shipped_workflow("instance_level_edit", frames, size, steps, ckpt)
    for node in prompt.values():
        t, inp = node["class_type"], node["inputs"]
        if t == "VideoGrainSTLayoutPatch" and variant == "b":
            inp.update(self_strength=0.0, cross_strength=0.0)
        elif t == "VideoGrainLayoutConditioning" and variant == "d":
            # a new edit of the same clip: other local prompts, same source
            inp["global_prompt"] = "Batman and Superman walking along a snowy street"
        elif t == "VideoGrainLocalPrompt" and variant == "d":
            inp["local_prompt"] = {"Iron Man": "Batman", "Spider-Man": "Superman"}.get(inp["local_prompt"], inp["local_prompt"])
    ids = {node["class_type"]: k for k, node in prompt.items()}
    if variant in ("a", "b", "e"):
        # no trajectory attention: the invert and sample nodes take the model before it
        # (the checkpoint's for (a))
        model = ["1", 0] if variant == "a" else [ids["VideoGrainSTLayoutPatch"], 0]
        for node in prompt.values():
            if node["class_type"] in ("VideoGrainDDIMInvert", "VideoGrainSample"):
                node["inputs"]["model"] = model
        drop = {"VideoGrainTrajectoryAttention", "VideoGrainFlowTrajectories"}
        if variant == "a":
            drop.add("VideoGrainSTLayoutPatch")
        prompt = {k: v for k, v in prompt.items() if v["class_type"] not in drop}
    if variant == "f":
        inject = max(1, steps // 5)
        prompt[ids["VideoGrainDDIMInvert"]]["inputs"]["pnp_steps"] = inject
        prompt[ids["VideoGrainSample"]]["inputs"]["inject_step"] = inject
    if variant in ("c", "e"):
        prompt["bench_edit"] = {"class_type": "SaveImage", "inputs": {
            "images": [ids["VideoGrainDecode"], 0], "filename_prefix": f"bench_{variant}/edit"}}
        prompt["bench_source"] = {"class_type": "SaveImage", "inputs": {
            "images": [ids["VideoGrainVideoLoader"], 0], "filename_prefix": f"bench_{variant}/source"}}
    return prompt


def warp_err_x100(output_dir: str, variant: str) -> float:
    """Warp-Err (x100) of a saved edit against its saved source frames' DIS flow."""
    import glob

    import numpy as np
    import torch
    from PIL import Image
    sys.path.insert(0, REPO)
    from videograin_core.metrics.warp_error import warp_error
    from videograin_core.trajectories.flow import clip_flows
    read = lambda kind: torch.from_numpy(np.stack([
        np.asarray(Image.open(f).convert("RGB"), np.float32) / 255.0
        for f in sorted(glob.glob(os.path.join(output_dir, f"bench_{variant}", f"{kind}_*.png")))]))
    source, edit = read("source"), read("edit")
    flows = clip_flows(source, backward=True)
    return 100.0 * warp_error(edit, flows.forward, flows.backward)


def child(a) -> None:
    """One measurement in this (fresh) process; prints one JSON line."""
    import asyncio
    import uuid
    nodes, _ = load_host(a.comfyui, cpu=not a.gpu)
    import execution
    private_folders(a.workdir)
    looped_sample_clip(os.path.join(a.workdir, "input"), a.frames)
    timings = {}
    time_executes(nodes, TIMED_NODES, timings)
    prompt = build_prompt(a.variant, a.frames, a.size, a.steps, a.ckpt)
    # The executor's classic cache keeps node outputs between runs: a first prompt with
    # only the checkpoint loader leaves the models loaded, so the RSS after it is the
    # baseline the edit's own memory is measured against. Loading sets a high-water mark
    # of its own (about 2 GiB above the loaded models for the full-size checkpoint), so
    # the mark is reset to the settled RSS first: the peak read after the edit is the
    # edit's, not the loader's.
    ex = comfy_runner.in_process_executor(execution, NullServer())
    warm = {"1": prompt["1"], "w": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}}}
    ex.execute(warm, str(uuid.uuid4()), {}, ["w"])  # not an output node: asked for by id
    import gc
    gc.collect()
    if settle_and_reset_peak() is None and not a.gpu:
        raise SystemExit("cannot reset the RSS high-water mark (needs Linux /proc/self/clear_refs): the edit's "
                         "peak would be hidden under the checkpoint loader's")
    if a.gpu:
        import torch
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        gpu_base = torch.cuda.memory_allocated()
    base_rss = status_kib("VmRSS")
    valid = asyncio.run(execution.validate_prompt(str(uuid.uuid4()), prompt, None))
    if not valid[0]:
        raise SystemExit(f"invalid prompt: {valid[1]} {valid[3]}")
    t0 = time.perf_counter()
    ex.execute(prompt, str(uuid.uuid4()), {}, valid[2])
    wall = time.perf_counter() - t0
    if not ex.success:
        raise SystemExit(f"execution failed: {json.dumps(ex.status_messages)[-3000:]}")
    hwm = peak_rss_bytes() // 1024
    gpu = {}
    if a.gpu:
        gpu = {"peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20, "base_gpu_mib": gpu_base / 2**20,
               "device": torch.cuda.get_device_name()}
    warp = warp_err_x100(os.path.join(a.workdir, "output"), a.variant) if a.variant in ("c", "e") else None
    print("RESULT " + json.dumps({"variant": a.variant, "frames": a.frames, "timed_s": sum(timings.values()),
                                  "nodes_s": timings, "wall_s": wall, "peak_rss_mib": hwm / 1024,
                                  "base_rss_mib": base_rss / 1024, "warp_err_x100": warp, **gpu}), flush=True)


def ratios(res: dict, frames) -> None:
    """The targets' ratios among whichever variants ran (times are the timed nodes)."""
    pairs = [("c", "e", "trajectory attention on / off (target <= 1.3)"),
             ("f", "e", "trajectories + PnP / neither (target <= 1.3)"),
             ("p", "g", "P2P edit (direct) / plain edit"), ("q", "g", "P2P edit (fast) / plain edit"),
             ("n", "g", "P2P edit (null-text) / plain edit")]
    for f in frames:
        for x, y, what in pairs:
            if (x, f) in res and (y, f) in res:
                rx, ry = res[(x, f)], res[(y, f)]
                print(f"  F={f:3d} ({x})/({y}) {rx['timed_s'] / ry['timed_s']:.2f}x time, peak RSS over models "
                      f"{rx['peak_rss_mib'] - rx['base_rss_mib']:.0f} / {ry['peak_rss_mib'] - ry['base_rss_mib']:.0f} "
                      f"MiB: {what}")
        if ("n", f) in res and ("p", f) in res:
            inv = res[("p", f)]["nodes_s"].get("VideoGrainDDIMInvert", 0.0)
            extra = res[("n", f)]["nodes_s"].get("VideoGrainP2PSample", 0.0) - res[("p", f)]["nodes_s"].get(
                "VideoGrainP2PSample", 0.0)
            print(f"  F={f:3d} null-text optimisation {extra:.1f} s (P2P Sample null-text - direct) vs plain DDIM "
                  f"inversion {inv:.1f} s: {extra / max(inv, 1e-9):.1f}x")


def measure(a, variant: str, frames: int, workdir: str) -> dict:
    cmd = [sys.executable, __file__, "--child", "--variant", variant, "--frames", str(frames), "--size", str(a.size),
           "--steps", str(a.steps), "--comfyui", a.comfyui, "--workdir", workdir, "--ckpt", a.ckpt] + (
        ["--gpu"] if a.gpu else [])
    p = subprocess.run(cmd, capture_output=True, text=True)
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise SystemExit(f"measurement {variant} F={frames} failed:\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, nargs="+", default=[8, 16, 32])
    ap.add_argument("--size", type=int, default=64, help="short side in pixels")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--long", type=int, default=0, help="also run (c) at this many frames")
    ap.add_argument("--comfyui", default=comfy_runner.default_comfyui(REPO))
    ap.add_argument("--ckpt", default="videograin_test_sd15_full.safetensors")
    ap.add_argument("--gpu", action="store_true", help="run on the CUDA GPU (the host's default precision: fp16)")
    ap.add_argument("--variants", nargs="+", default=list("abcde"), choices=list(VARIANTS))
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    a = ap.parse_args()
    a.comfyui = os.path.abspath(a.comfyui)
    if a.child:
        a.frames = a.frames[0]
        return child(a)

    sys.path.insert(0, a.comfyui)
    from comfy.cli_args import args as comfy_args
    comfy_args.cpu = True
    import make_test_models
    print("writing/reusing the full-size random SD1.5 checkpoint ...", flush=True)
    make_test_models.write_model(os.path.join(a.comfyui, "models"), "full")
    print(f"instance-level edit, full-size random SD1.5, short side {a.size}px, {a.steps} DDIM steps, CPU "
          f"({os.cpu_count()} cores); each cell a fresh process; load average at start "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}\n", flush=True)
    res = {}
    for f in a.frames:
        with tempfile.TemporaryDirectory(prefix="vg-bench-") as wd:
            for v in [v for v in VARIANTS if v in a.variants]:
                # each variant its own folders (b's inversion would be a hit for c), except
                # d, which shares c's: d is the second edit and hits c's cache
                r = measure(a, v, f, os.path.join(wd, "c" if v == "d" else v))
                if r.get("warp_err_x100") is not None:
                    print(f"  F={f:3d} ({v}) Warp-Err x100 {r['warp_err_x100']:.3f}", flush=True)
                res[(v, f)] = r
                if a.gpu:
                    print(f"  F={f:3d} ({v}) {r['timed_s']:8.2f} s  peak GPU {r['peak_gpu_mib']:8.0f} MiB "
                          f"(+{r['peak_gpu_mib'] - r['base_gpu_mib']:.0f} over models) on {r['device']}", flush=True)
                print(f"  F={f:3d} ({v}) {r['timed_s']:8.2f} s  peak RSS {r['peak_rss_mib']:8.0f} MiB  "
                      f"(+{r['peak_rss_mib'] - r['base_rss_mib']:.0f} over models)  {json.dumps({k: round(x, 2) for k, x in r['nodes_s'].items()})}",
                      flush=True)
    print()
    ratios(res, a.frames)
    if set(a.variants) != set("abcde"):
        return  # the tables compare all five
    print("| frames | (a) per-frame | (b) full-frame | (c) as shipped | (d) cached inversion | (e) no trajectories | (c)/(e) time | (d)/(c) time | (c) peak RSS | (c) RSS over models | (e) RSS over models | Warp-Err x100 (c) / (e) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for f in a.frames:
        t = {v: res[(v, f)]["timed_s"] for v in "abcde"}
        c, e = res[("c", f)], res[("e", f)]
        print(f"| {f} | {t['a']:.1f} s | {t['b']:.1f} s | {t['c']:.1f} s | {t['d']:.1f} s | {t['e']:.1f} s | "
              f"{t['c'] / t['e']:.2f} | {t['d'] / t['c']:.2f} | {c['peak_rss_mib']:.0f} MiB | "
              f"{c['peak_rss_mib'] - c['base_rss_mib']:.0f} MiB | {e['peak_rss_mib'] - e['base_rss_mib']:.0f} MiB | "
              f"{c['warp_err_x100']:.3f} / {e['warp_err_x100']:.3f} |")
    fs = sorted(a.frames)
    over = {f: res[("c", f)]["peak_rss_mib"] - res[("c", f)]["base_rss_mib"] for f in fs}
    f0, f1 = fs[0], fs[-1]
    c0, c1 = res[("c", f0)], res[("c", f1)]
    print(f"\n(c) peak RSS growth F={f0} -> F={f1}: {c1['peak_rss_mib'] / c0['peak_rss_mib']:.2f}x total, "
          f"{over[f1] / max(1e-9, over[f0]):.2f}x above the models "
          f"(frames grew {f1 / f0:.1f}x; linear is <= {f1 / f0 * 1.1:.1f}x)")
    if len(fs) > 1:
        # linear in F means a constant cost per extra frame; quadratic would double it
        # each time the frame count doubles
        steps = [f"F={x}->{y}: {(over[y] - over[x]) / (y - x):.1f}" for x, y in zip(fs, fs[1:])]
        print(f"(c) memory per extra frame (MiB above the models): {', '.join(steps)}")
    print(f"load average at end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if a.long:
        with tempfile.TemporaryDirectory(prefix="vg-bench-") as wd:
            r = measure(a, "c", a.long, wd)
        over_long = r["peak_rss_mib"] - r["base_rss_mib"]
        predicted = over[f0] * a.long / f0  # proportional growth from the smallest F
        print(f"\nlong clip: F={a.long} (c) {r['timed_s']:.1f} s, peak RSS {r['peak_rss_mib']:.0f} MiB, "
              f"{over_long:.0f} MiB above the models; linear growth from F={f0} predicts {predicted:.0f} MiB above "
              f"the models -> {over_long / predicted:.2f}x of the prediction (target <= 1.2)")
        if len(fs) > 1:
            x, y = fs[-2], fs[-1]
            line = over[y] + (over[y] - over[x]) / (y - x) * (a.long - y)
            print(f"  (the line through F={x} and F={y} extrapolates to {line:.0f} MiB: "
                  f"{over_long / max(line, 1e-9):.2f}x of that)")


if __name__ == "__main__":
    main()
