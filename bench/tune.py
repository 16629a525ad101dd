"""T2S Tune: time per tuning step and peak memory, as ratios to one plain UNet forward of
the same clip measured in the same run.

    python bench/tune.py [--frames 2] [--latent 8] [--steps 4] [--repeat 3] [--threads 1]
                         [--checkpoint PATH] [--gpu]

One process, the host in-process, the small random test model (scripts/make_test_models.py)
unless --checkpoint names an SD1.5 checkpoint; CPU unless --gpu (then the host's own device
choice). Measured:
- plain forward: one `apply_model` of the clip (frames as the batch, the prompt as the
  condition) without gradients, the best (minimum) of --repeat;
- tuning step: the time between the loop's successive step callbacks of one T2S Tune run of
  --steps steps (the first step, which includes the optimiser's set-up, left out), the
  median; the set-up before the first step (loading, the trainable copy of the UNet) is
  printed on its own;
- peak memory: on the CPU the process's RSS high-water mark above the RSS right before the
  work (reset in between), on a GPU torch's peak allocation above the allocation before;
  for both the plain forward and the whole tuning run, beside the node's estimate (which it
  refuses runs by).
Times: process CPU time on the CPU (shared machines: less noise than wall-clock), wall-clock
with synchronisation on a GPU. Ratios are within one run on one machine.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

from host_bench import load_host  # bench/ is sys.path[0]
from proc_memory import peak_rss_bytes, settle_and_reset_peak

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
MIB = 2 ** 20


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=2)
    ap.add_argument("--latent", type=int, default=8, help="latent side (pixels / 8)")
    ap.add_argument("--steps", type=int, default=4, help="tuning steps timed (at least 2)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads on the CPU (0: torch's default)")
    ap.add_argument("--checkpoint", default=None, help="an SD1.5 checkpoint (default: the small test model)")
    ap.add_argument("--gpu", action="store_true", help="let the host pick its device (default: CPU)")
    ap.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH", os.path.join(REPO, ".host", "0.3.75", "ComfyUI")))
    a = ap.parse_args()
    if a.steps < 2:
        ap.error("--steps must be at least 2 (the first step is left out)")
    import torch
    if a.threads and not a.gpu:
        torch.set_num_threads(a.threads)
    nodes, pack = load_host(os.path.abspath(a.comfyui), cpu=not a.gpu)
    from importlib import import_module
    tune_node = import_module(pack + ".nodes.t2s_tune")
    tune_mod = import_module(pack + ".videograin_core.tuning.tune")
    weights_mod = import_module(pack + ".videograin_core.tuning.weights")
    import comfy.model_management as mm
    import comfy.sd
    path = a.checkpoint
    if path is None:
        sys.path.insert(0, os.path.join(REPO, "scripts"))
        import make_test_models
        path = make_test_models.write_model(os.path.join(a.comfyui, "models"), "small")
    with torch.inference_mode():
        model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(path, output_vae=False)
        cond = nodes.CLIPTextEncode().encode(clip, "a rabbit is jumping on the grass")[0]
    g = torch.Generator().manual_seed(0)
    latent = torch.nn.functional.interpolate(torch.randn(a.frames, 4, 4, 4, generator=g), size=(a.latent, a.latent),
                                             mode="bilinear") * 2
    device = model.load_device
    cuda = device.type == "cuda"

    def clock():
        if cuda:
            torch.cuda.synchronize()
            return time.perf_counter()
        return time.process_time()

    def mem_start():
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return torch.cuda.memory_allocated()
        return settle_and_reset_peak() or peak_rss_bytes()

    def mem_peak(start):
        if cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - start
        return peak_rss_bytes() - start

    print(f"T2S Tune, {os.path.basename(path)}, {a.frames} frames, latent {a.latent}x{a.latent} "
          f"({a.latent * 8}x{a.latent * 8} px), device {device}"
          + ("" if cuda else f" ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)")
          + f"; load average at start {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)

    # ---- one plain UNet forward (no gradients)
    mm.load_models_gpu([model])
    text = cond[0][0]
    x = latent.to(device)
    sigma = model.get_model_object("model_sampling").sigmas[500].to(device)
    s = sigma.reshape(1).expand(a.frames)
    ctx = text.expand(a.frames, -1, -1).to(device)

    def forward():
        with torch.inference_mode():
            return model.model.apply_model(x, s, c_crossattn=ctx, transformer_options={"cond_or_uncond": [0]})
    forward()  # warm-up
    times, peaks = [], []
    for _ in range(a.repeat):
        m0 = mem_start()
        t0 = clock()
        forward()
        times.append(clock() - t0)
        peaks.append(mem_peak(m0))
    fwd_t, fwd_m = min(times), min(peaks)

    # ---- tuning
    specs = tune_node.block_specs(model.model.diffusion_model)
    with torch.inference_mode(False):
        weights = weights_mod.T2SWeights(specs, seed=0)
    estimate = tune_node.estimate_bytes(model, tuple(latent.shape), weights)
    stamps = []
    config = tune_mod.TuneConfig(steps=a.steps, learning_rate=3e-5, seed=0)
    m0 = mem_start()
    t0 = clock()
    tune_node.run_tuning(model, latent, text, config, weights, on_step=lambda step, loss: stamps.append(clock()))
    total = clock() - t0
    tune_m = mem_peak(m0)
    per_step = statistics.median(b - a_ for a_, b in zip(stamps, stamps[1:]))
    setup = stamps[0] - t0 - per_step  # the first step's own time taken as a typical step's
    print("\n| what | time (s) | x plain forward | peak memory (MiB) | x plain forward |")
    print("|---|---:|---:|---:|---:|")
    print(f"| plain UNet forward (no grad) | {fwd_t:.3f} | 1.00 | {fwd_m / MIB:.1f} | 1.00 |")
    print(f"| tuning step (median of {len(stamps) - 1}) | {per_step:.3f} | {per_step / fwd_t:.2f} | "
          f"{tune_m / MIB:.1f} (whole run) | {tune_m / max(fwd_m, 1):.2f} |")
    print(f"| set-up before the first step | {max(0.0, setup):.3f} | {max(0.0, setup) / fwd_t:.2f} | | |")
    print(f"\nwhole run {total:.2f} s for {a.steps} steps; tuned parameters {weights.parameter_count() / 1e6:.2f} M; "
          f"the node's memory estimate {estimate / MIB:.0f} MiB (measured peak above the start: {tune_m / MIB:.0f} MiB); "
          f"load average at end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
