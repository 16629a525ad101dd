"""Benchmark: the VideoGrain Metrics node on 16 frames at 512x512, on the CPU, with a
ViT-L/14-sized random CLIP (scripts/make_test_models.write_clip_pair: the layout and size
of openai's clip-vit-large-patch14) loaded by the host's own loaders.

    python bench/metrics.py [--frames 16] [--size 512] [--repeats 2]

The clip is the sample clip (example_data/vtest_two_people.mp4, 24 frames) resized and
centre-cropped to size x size, so the flows are real motion; the "edit" is the same clip
with a colour shift (the scores do not matter, the work does). Timed inside the host's
inference mode, as a node runs: the whole node (text encoding, image encoding, DIS flows
both ways, Warp-Err), then its parts one by one. Target: the node <= 30 s for 16 frames at 512x512.
The time is the minimum over --repeats runs; the machine's load average is printed with
it, as the CPU is shared.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from host_bench import load_host  # bench/ is sys.path[0]

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def sample_frames(frames: int, size: int):
    import av
    import torch
    import torch.nn.functional as F
    with av.open(os.path.join(REPO, "example_data", "vtest_two_people.mp4")) as c:
        clip = [torch.from_numpy(f.to_ndarray(format="rgb24")) for f in c.decode(video=0)]
    n = len(clip)
    order = [(i % (2 * n - 2)) if (i % (2 * n - 2)) < n else 2 * n - 2 - (i % (2 * n - 2)) for i in range(frames)]
    x = torch.stack([clip[i] for i in order]).float().div(255).permute(0, 3, 1, 2)
    h, w = x.shape[-2:]
    s = size / min(h, w)
    x = F.interpolate(x, size=(max(size, round(h * s)), max(size, round(w * s))), mode="bilinear", antialias=True)
    top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
    return x[..., top:top + size, left:left + size].permute(0, 2, 3, 1).contiguous().clamp(0, 1)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH", os.path.join(REPO, ".host", "ComfyUI")))
    a = ap.parse_args()
    comfy = os.path.abspath(a.comfyui)
    sys.path.insert(0, os.path.join(REPO, "scripts"))
    import torch
    nodes, _ = load_host(comfy)

    import make_test_models
    print("writing/reusing the random CLIP ViT-L/14 ...", flush=True)
    name = make_test_models.write_clip_pair(os.path.join(comfy, "models"))
    metrics_cls = nodes.NODE_CLASS_MAPPINGS["VideoGrainMetrics"]
    pack = sys.modules[metrics_cls.__module__]

    load_start = " ".join(f"{x:.2f}" for x in os.getloadavg())
    with torch.inference_mode():
        t0 = time.perf_counter()
        loader = sys.modules[pack.__name__.rsplit(".", 1)[0] + ".metrics_clip"]
        metrics_clip = loader.load_metrics_clip(name)
        load_s = time.perf_counter() - t0
        source = sample_frames(a.frames, a.size)
        edited = (source * torch.tensor([0.8, 1.0, 1.1])).clamp(0, 1)
        prompt = "two people walking along a snowy street"

        runs = []
        for _ in range(a.repeats):
            t = time.perf_counter()
            out = metrics_cls.execute(edited, source, prompt, metrics_clip)
            runs.append(time.perf_counter() - t)
        # the parts, as the node runs them (after the node's runs: warm, as a second run is)
        parts = {}
        t = time.perf_counter()
        text = pack.text_embedding(metrics_clip, prompt)
        parts["text"] = time.perf_counter() - t
        t = time.perf_counter()
        metrics_clip.vision.encode_image(edited, crop=True)["image_embeds"]
        parts["images"] = time.perf_counter() - t
        from_flow = sys.modules[pack.__name__.rsplit(".nodes.", 1)[0] + ".videograin_core.trajectories.flow"]
        t = time.perf_counter()
        flows = from_flow.clip_flows(source, backward=True)
        parts["flows"] = time.perf_counter() - t
        warp = sys.modules[pack.__name__.rsplit(".nodes.", 1)[0] + ".videograin_core.metrics.warp_error"]
        t = time.perf_counter()
        warp.warp_error(edited, flows.forward, flows.backward)
        parts["warp_err"] = time.perf_counter() - t
        del text

    table = out.result[4]
    load_avg = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"\nVideoGrain Metrics, {a.frames} frames at {a.size}x{a.size}, random CLIP ViT-L/14 (the host's loaders), "
          f"CPU ({os.cpu_count()} cores, torch threads {torch.get_num_threads()}); load average at start {load_start}, "
          f"at end {load_avg}")
    print(f"  models loaded in {load_s:.1f} s (not counted)")
    print("  parts: " + ", ".join(f"{k} {v:.2f} s" for k, v in parts.items()))
    print(f"  node: {min(runs):.2f} s (min of {len(runs)}: {', '.join(f'{r:.2f}' for r in runs)}); target <= 30 s")
    print("\n" + table)


if __name__ == "__main__":
    main()
