"""PnP feature injection: what storing the features costs, and what recomputing them would.

    python bench/pnp.py [--frames 4] [--latent 16] [--steps 10] [--inject 5] [--repeat 3]

One process, the host in-process (CPU), the small random test model (scripts/
make_test_models.py). Two source set-ups: the source prompt empty and no negative (the
reference's usual case: one record serves both branches) and a source prompt with the
empty prompt as the uncond branch (both branches recorded; at cfg 1 the uncond branch runs
only in the recorded calls).

Measured, each the best (minimum) of --repeat runs, on and off interleaved (the minimum is
the run least disturbed by other work on the machine):
- time: DDIM Invert with and without recording (pnp_steps = --inject), Sample with and
  without injection (inject_step = --inject, cfg 7.5); the UNet time of the injected steps
  is the sum of the sampler's UNet calls of those steps (timed one by one).
  Store's added time = (Invert on - off) + (Sample on - off); ratio to that UNet time
  (target <= 1.5).
- recompute (the alternative): the UNet calls that would rebuild the same records from the
  inversion's stored trajectory (one per injected step, the recorded branches), timed
  through the same recording taps; they run at every Sample instead of once per inversion
  (and a cache hit of the inversion would not spare them). The rebuilt records are compared
  with the stored ones.
- memory: the bank's bytes per frame and injected step (measured, and from the layer shapes;
  SD1.5 at 512x512 from its layer shapes, target <= 20 MiB), and the peak RSS that
  recording adds to the inversion (high-water mark reset before each run).
Times are this process's CPU time (time.process_time) with one torch thread by default:
on a machine shared with other jobs wall-clock differences of a few percent drown in the
noise, CPU time much less. Ratios are within one run on one machine; absolute times are
machine-dependent.
"""
from __future__ import annotations

import argparse
import gc
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
    ap.add_argument("--frames", type=int, default=4)
    ap.add_argument("--latent", type=int, default=16, help="latent side (pixels / 8)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--inject", type=int, default=5, help="pnp_steps = inject_step")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    ap.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH", os.path.join(REPO, ".host", "ComfyUI")))
    a = ap.parse_args()
    import torch
    if a.threads:
        torch.set_num_threads(a.threads)
    nodes, pack = load_host(os.path.abspath(a.comfyui))
    from importlib import import_module
    invert_mod = import_module(pack + ".nodes.ddim_invert")
    sample_mod = import_module(pack + ".nodes.sample")
    plan = import_module(pack + ".videograin_core.pnp.plan")
    sys.path.insert(0, os.path.join(REPO, "scripts"))
    import make_test_models
    import comfy.sd
    path = make_test_models.write_model(os.path.join(a.comfyui, "models"), "small")
    model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(path, output_vae=False)
    enc = lambda text: nodes.CLIPTextEncode().encode(clip, text)[0]
    empty, source, target = enc(""), enc("a red fox in the snow"), enc("a white cat in the snow")
    g = torch.Generator().manual_seed(0)
    latent = torch.nn.functional.interpolate(torch.randn(a.frames, 4, 4, 4, generator=g), size=(a.latent, a.latent),
                                             mode="bilinear") * 3

    calls = []  # (sigma, seconds) of each UNet call while `timing` is on

    def timed(apply_model, args):
        t0 = time.process_time()
        out = apply_model(args["input"], args["timestep"], **args["c"])
        calls.append((float(args["timestep"][0]), time.process_time() - t0))
        return out
    timed_model = model.clone()
    timed_model.set_model_unet_function_wrapper(timed)

    def invert(pnp, cond, neg):
        return invert_mod.VideoGrainDDIMInvert.execute(
            model=model, conditioning=cond, negative=neg, steps=a.steps, cfg=1.0, use_cache=False,
            latent={"samples": latent}, pnp_steps=a.inject if pnp else 0).args[1]

    def sample(inv, inject, m=model):
        return sample_mod.VideoGrainSample.execute(model=m, positive=target, negative=empty, inversion=inv, cfg=7.5,
                                                   inject_step=a.inject if inject else 0).args[0]["samples"]

    def clock(fn):
        t0 = time.process_time()
        out = fn()
        return time.process_time() - t0, out

    print(f"PnP, small random test model (times: process CPU seconds), {a.frames} frames, latent {a.latent}x{a.latent}, {a.steps} DDIM steps, "
          f"inject {a.inject}, cfg 7.5, CPU ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads), "
          f"best of {a.repeat}; load average at start {' '.join(f'{x:.2f}' for x in os.getloadavg())}\n",
          flush=True)
    sample(invert(False, empty, None), False)  # warm-up
    results = {}
    for setup, cond, neg in (("shared branches (source prompt empty)", empty, None),
                             ("two branches (source prompt + empty uncond)", source, empty)):
        t = {k: [] for k in ("inv_off", "inv_on", "smp_off", "smp_on", "replay")}
        unet_inj = []
        rss = {"off": [], "on": []}
        _CTX.update(model=model, cond=cond, uncond=cond if neg is None else neg)
        for _ in range(a.repeat):
            for pnp in (False, True):
                gc.collect()
                settle_and_reset_peak()
                base = peak_rss_bytes()
                dt, inv = clock(lambda: invert(pnp, cond, neg))
                rss["on" if pnp else "off"].append(peak_rss_bytes() - base)
                t["inv_on" if pnp else "inv_off"].append(dt)
                if pnp:
                    inv_on = inv
            calls.clear()
            t["smp_off"].append(clock(lambda: sample(inv_on, False, timed_model))[0])
            sig = inv_on.sigmas.flip(0)
            inj = {round(float(s), 5) for s in sig[:a.inject]}
            unet_inj.append(sum(dt for s, dt in calls if round(s, 5) in inj))
            t["smp_on"].append(clock(lambda: sample(inv_on, True, timed_model))[0])
            t["replay"].append(replay(inv_on))
        med = {k: min(v) for k, v in t.items()}
        u = min(unet_inj)
        bank = inv_on.features
        added = (med["inv_on"] - med["inv_off"]) + (med["smp_on"] - med["smp_off"])
        per_fs = bank.nbytes / (a.frames * a.inject)
        same = replay_equal(inv_on)
        results[setup] = dict(med=med, u=u, added=added, per_fs=per_fs, bank=bank,
                              rss=statistics.median(rss["on"]) - statistics.median(rss["off"]), same=same)
        print(f"{setup}:")
        print(f"  Invert off {med['inv_off']:.2f} s, on {med['inv_on']:.2f} s (+{med['inv_on'] - med['inv_off']:.2f}); "
              f"Sample off {med['smp_off']:.2f} s, on {med['smp_on']:.2f} s (+{med['smp_on'] - med['smp_off']:.2f}); "
              f"UNet time of the {a.inject} injected steps {u:.2f} s")
        print(f"  store: added time {added:.2f} s = {added / u:.2f}x the injected steps' UNet time (target <= 1.5); "
              f"recompute: {med['replay']:.2f} s per Sample = {med['replay'] / u:.2f}x (records rebuilt equal to the "
              f"stored ones: {same})")
        print(f"  store: bank {bank.nbytes / MIB:.2f} MiB = {per_fs / MIB:.3f} MiB per frame and injected step "
              f"(from the layer shapes: {bank.bytes_per_frame_step() / MIB:.3f}); peak RSS added by recording "
              f"{results[setup]['rss'] / MIB:.1f} MiB = {results[setup]['rss'] / (a.frames * a.inject) / MIB:.3f} "
              f"MiB per frame and step\n", flush=True)

    sd15 = plan.values_per_frame(plan.sd15_targets(), (64, 64)) * 2
    print(f"SD1.5 at 512x512 (latent 64x64), float16, from its layer shapes: {2 * sd15 / MIB:.1f} MiB per frame and "
          f"injected step with both branches (target <= 20), {sd15 / MIB:.1f} MiB shared; e.g. 16 frames x 10 "
          f"injected steps: {16 * 10 * 2 * sd15 / 2**30:.2f} GiB (the reference keeps q, k and residuals of all 49 "
          f"steps: about 0.5 GB per step at 16 frames)")
    print(f"load average at end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


def replay(inv):
    """What recomputing would run per Sample: one recorded UNet call per injected step on the
    inversion's stored latent at that call's sigma, through the same taps; its UNet time."""
    return _replay(inv)[0]


def replay_equal(inv) -> bool:
    _, bank = _replay(inv)
    ref = inv.features
    return sorted(bank.records) == sorted(ref.records) and all(
        bool((bank.records[k] == ref.records[k]).all()) for k in ref.records)


_CTX: dict = {}


def _replay(inv):
    """(UNet time, rebuilt bank)."""
    import torch
    from importlib import import_module
    pack = next(n for n in sys.modules if n.endswith("ComfyUI-VideoGrain"))
    glue = import_module(pack + ".nodes.pnp_glue")
    host_glue = import_module(pack + ".nodes.host_glue")
    bank_mod = import_module(pack + ".videograin_core.pnp.bank")
    hooks = import_module(pack + ".videograin_core.pnp.hooks")
    ref = inv.features
    bank = bank_mod.FeatureBank(steps=ref.steps, alignment=ref.alignment, scheme=ref.scheme, sigmas=ref.sigmas,
                                frames=ref.frames, latent_hw=ref.latent_hw, targets=ref.targets, shared=ref.shared,
                                source_index=ref.source_index)
    model, cond, uncond = _CTX["model"], _CTX["cond"], _CTX["uncond"]
    recorder = model.clone()
    glue.install(recorder, hooks.PnPRun("record", bank), ref.targets)
    options = glue.record_options({k: s for s, k in ref.source_index.items()}, bank.branches, not ref.shared)
    spent = []

    def fn(model_k, x, sigmas, extra_args=None, callback=None, disable=None):
        s_in = x.new_ones([x.shape[0]])
        t0 = time.process_time()
        with torch.no_grad():
            for step, k in sorted(ref.source_index.items()):
                xk = inv.trajectory[k].to(x)
                model_k(xk, inv.sigmas[k].to(x) * s_in, **{**extra_args, "model_options": options(
                    k, extra_args["model_options"])})
        spent.append(time.process_time() - t0)
        return x
    host_glue.run_sampler(recorder, fn, {}, inv.sigmas.flip(0), cond, uncond, 1.0, inv.latent)
    return spent[0], bank


if __name__ == "__main__":
    main()
