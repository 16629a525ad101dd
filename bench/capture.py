"""Benchmark: what attention capture adds to an edit. The instance-level edit of the sample
clip (bench/edit.py's workflow (c): ST-Layout patch and trajectory attention, on the
FULL-SIZE random SD1.5 checkpoint) at bench/edit.py's small size, run

  (c) as shipped, and
  (k) with a VideoGrain Attention Capture on the model of BOTH DDIM Invert and Sample
      (the three local prompts' cross-attention at 1/2 + 1/4, self-attention features at
      1/2: the node's defaults), and its readers: Attention View of the edit and Auto
      Regions (K = 3) of the inversion.

    python bench/capture.py [--frames 8] [--size 64] [--steps 3] [--repeats 2]

One process, the variants alternating (c, k, k, c, c, k, ...) so that load from other
processes and drift hit both alike; each run is a fresh executor (nothing cached between
runs; the run's models are unloaded after it) and the inversion cache is off in both
(capture bypasses it anyway). Timed: the heavy nodes (DDIM Invert, Sample, Decode)
summed, the minimum over the repeats; the readers on their own. Target: (k) / (c) - 1
<= 10 %.

On a shared machine the difference of two edit times is mostly noise, so the capture's own
time is also measured inside (k): the wall time spent in the recorder (every layer call's
`observe`, and the end of each take: digest, move to the CPU), as a share of the same run's
heavy nodes. On the CPU the recorder runs synchronously, so that share is what capture adds.
Also printed: the recorder's memory after the run (its kept takes).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

from host_bench import NullServer, load_host, private_folders, time_executes  # bench/ is sys.path[0]

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
HEAVY = ("VideoGrainDDIMInvert", "VideoGrainSample", "VideoGrainDecode")
READERS = ("VideoGrainAttentionView", "VideoGrainAutoRegions")


def capture_prompt(prompt: dict) -> dict:
    """(c) + capture on the model that Invert and Sample share, and the two readers."""
    ids = {v["class_type"]: k for k, v in prompt.items()}
    inv, smp = ids["VideoGrainDDIMInvert"], ids["VideoGrainSample"]
    model = prompt[inv]["inputs"]["model"]
    assert prompt[smp]["inputs"]["model"] == model
    p = json.loads(json.dumps(prompt))
    p["cap"] = {"class_type": "VideoGrainAttentionCapture", "inputs": {
        "model": model, "words": "", "prompt": "", "cross_grid": "1/2+1/4", "self_grid": "1/2",
        "layout": [ids["VideoGrainLayoutConditioning"], 1]}}
    p[inv]["inputs"]["model"] = ["cap", 0]
    p[smp]["inputs"]["model"] = ["cap", 0]
    loader = ids["VideoGrainVideoLoader"]
    p["view"] = {"class_type": "VideoGrainAttentionView", "inputs": {
        "capture": ["cap", 1], "latent": [smp, 0], "images": [ids["VideoGrainDecode"], 0], "opacity": 0.6}}
    p["view_out"] = {"class_type": "PreviewImage", "inputs": {"images": ["view", 0]}}
    p["regions"] = {"class_type": "VideoGrainAutoRegions", "inputs": {
        "capture": ["cap", 1], "latent": [inv, 0], "images": [loader, 0], "regions": 3, "name_threshold": 0.4,
        "seed": 0}}
    p["regions_out"] = {"class_type": "PreviewImage", "inputs": {"images": ["regions", 8]}}
    return p


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--size", type=int, default=64, help="short side in pixels")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH", os.path.join(REPO, ".host", "ComfyUI")))
    ap.add_argument("--ckpt", default="videograin_test_sd15_full.safetensors")
    a = ap.parse_args()
    comfy_dir = os.path.abspath(a.comfyui)
    sys.path.insert(0, os.path.join(REPO, "scripts"))
    import asyncio
    import gc
    import uuid

    import edit  # bench/edit.py (bench/ is sys.path[0])
    nodes, _ = load_host(comfy_dir)
    import comfy.model_management
    import execution
    import make_test_models
    print("writing/reusing the full-size random SD1.5 checkpoint ...", flush=True)
    make_test_models.write_model(os.path.join(comfy_dir, "models"), "full")

    work = tempfile.mkdtemp(prefix="vg-bench-capture-")
    private_folders(work)
    edit.looped_sample_clip(os.path.join(work, "input"), a.frames)

    timings: dict = {}
    ram = {}

    def on_call(name, kw):
        if kw.get("capture") is not None:
            ram["recorder_mib"] = kw["capture"].get_ram_usage() / 2**20
    time_executes(nodes, HEAVY + READERS, timings, on_call)

    rec_mod = sys.modules[nodes.NODE_CLASS_MAPPINGS["VideoGrainAttentionCapture"].__module__.rsplit(".nodes.", 1)[0]
                          + ".videograin_core.capture.recorder"]
    inside = {"s": 0.0}
    for meth in ("observe", "end"):
        orig_m = getattr(rec_mod.AttentionRecorder, meth)

        def timed_m(self, *args, __orig=orig_m, **kw):
            t0 = time.perf_counter()
            try:
                return __orig(self, *args, **kw)
            finally:
                inside["s"] += time.perf_counter() - t0
        setattr(rec_mod.AttentionRecorder, meth, timed_m)

    base = edit.build_prompt("c", a.frames, a.size, a.steps, a.ckpt)
    for node in base.values():
        if node["class_type"] == "VideoGrainDDIMInvert":
            node["inputs"]["use_cache"] = False
    prompts = {"c": base, "k": capture_prompt(base)}
    results = {"c": [], "k": []}
    readers, shares = [], []
    print(f"instance-level edit (+ trajectory attention), full-size random SD1.5, {a.frames} frames, short side "
          f"{a.size}px, {a.steps} DDIM steps, CPU ({os.cpu_count()} cores); load average at start "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    for r in range(a.repeats):
        for v in (("c", "k") if r % 2 == 0 else ("k", "c")):
            timings.clear()
            inside["s"] = 0.0
            ex = execution.PromptExecutor(NullServer(), cache_args={"lru": 0, "ram": 0})
            valid = asyncio.run(execution.validate_prompt(str(uuid.uuid4()), prompts[v], None))
            if not valid[0]:
                raise SystemExit(f"invalid prompt ({v}): {valid[1]} {valid[3]}")
            ex.execute(prompts[v], str(uuid.uuid4()), {}, valid[2])
            if not ex.success:
                raise SystemExit(f"execution failed ({v}): {json.dumps(ex.status_messages)[-3000:]}")
            heavy = sum(timings.get(n, 0.0) for n in HEAVY)
            results[v].append(heavy)
            if v == "k":
                readers.append({n: timings.get(n, 0.0) for n in READERS})
                shares.append(inside["s"] / heavy)
            # each executor loads the checkpoint anew: let the previous run's models go
            del ex
            comfy.model_management.unload_all_models()
            gc.collect()
            print(f"  run {r + 1} ({v}) heavy nodes {heavy:7.2f} s  "
                  f"{json.dumps({k: round(x, 2) for k, x in timings.items()})}"
                  + (f"  recorder {inside['s']:.3f} s" if v == "k" else ""), flush=True)
    c, k = min(results["c"]), min(results["k"])
    rd = {n: min(x[n] for x in readers) for n in READERS}
    print(f"\n(c) edit {c:.2f} s, (k) edit with capture on inversion and sampling {k:.2f} s: capture adds "
          f"{100 * (k / c - 1):+.1f} % (target <= 10 %)")
    print(f"time inside the recorder during (k)'s edit: {100 * min(shares):.2f} % .. {100 * max(shares):.2f} % of "
          f"its heavy nodes (target <= 10 %)")
    print(f"readers (not in the edit): Attention View {rd['VideoGrainAttentionView']:.2f} s, Auto Regions "
          f"{rd['VideoGrainAutoRegions']:.2f} s; recorder memory {ram.get('recorder_mib', 0):.1f} MiB (two takes)")
    print(f"load average at end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
