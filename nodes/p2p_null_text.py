"""Host glue of P2P Sample's "null-text" source mode (VIDEO_P2P.md section 4): runs the
core's `optimize_null_text` (videograin_core.p2p.null_text) on the host's UNet, with a
progress bar, interruption and the on-disk cache. No arithmetic of its own.

The optimisation runs as a sampler function of its own guider run (on the source's F
frames), so the model is loaded, its patches and ControlNets apply and the conditionings
are processed exactly as in sampling; the two eps functions the core needs call the host's
`calc_cond_batch` with the processed conds, the negative's cross-attention tensor replaced
by the embedding being optimised.

Gradients: the host runs nodes under torch.inference_mode(), and weights loaded there are
inference tensors, which autograd cannot save for backward. The model is given fp32
compute (`set_model_compute_dtype`, as core's LoRA training does; the reference
optimises in fp32), and before the first backward every inference tensor among the UNet's
(and the negative's ControlNets') parameters and buffers is replaced by a normal copy of
the same values, outside inference mode. The values do not change, so nothing else sees a
difference; later runs find nothing left to copy.
"""
from __future__ import annotations

import logging

import comfy.conds
import comfy.model_management
import comfy.samplers
import comfy.utils
import torch

from ..videograin_core.p2p import null_text
from ..videograin_core.sampling.inversion_cache import InversionCache, make_key
from .host_glue import cache_folder, cache_max_bytes, host_fingerprint, run_guider

CACHE_KIND = "p2p-null-text"
CACHE_FORMAT = 1


def _plain_weights(module: torch.nn.Module) -> int:
    """Replace inference-tensor parameters and buffers of `module` by normal copies (same
    values, requires_grad False). Returns how many were replaced."""
    n = 0
    with torch.inference_mode(False), torch.no_grad():
        for sub in module.modules():
            for name, p in list(sub._parameters.items()):
                if p is not None and p.is_inference():
                    sub._parameters[name] = torch.nn.Parameter(p.clone(), requires_grad=False)
                    n += 1
            for name, b in list(sub._buffers.items()):
                if b is not None and b.is_inference():
                    sub._buffers[name] = b.clone()
                    n += 1
    return n


def _controls(conds):
    seen = set()
    for c in conds or []:
        control = c.get("control") if isinstance(c, dict) else None
        while control is not None and id(control) not in seen:
            seen.add(id(control))
            yield control
            control = getattr(control, "previous_controlnet", None)


def with_crossattn(conds: list, context: torch.Tensor) -> list:
    """Copies of processed conds entries with their cross-attention tensor replaced."""
    return [{**c, "model_conds": {**c["model_conds"], "c_crossattn": comfy.conds.CONDCrossAttn(context)}}
            for c in conds]


def sample_null_text(model, x, sigmas, extra_args=None, callback=None, disable=None, trajectory=None,
                     guidance=null_text.GUIDANCE, inner_steps=null_text.INNER_STEPS, result=None):
    """Sampler function (k-diffusion signature) of the null-text run: the guider's conds are
    [source prompt, negative]; `result` (a list) receives the core's NullTextResult."""
    extra_args = {} if extra_args is None else extra_args
    guider = model.inner_model                    # KSamplerX0Inpaint -> the CFGGuider
    base = guider.inner_model
    options = extra_args.get("model_options", {})
    positive, negative = guider.conds["positive"], guider.conds["negative"]
    _plain_weights(base)
    for control in _controls(negative):
        net = getattr(control, "control_model", None)
        if isinstance(net, torch.nn.Module):
            _plain_weights(net)
    # plain floats: the host's tensors are inference tensors, which autograd cannot save
    sig = [float(s) for s in sigmas]
    rows = x.shape[0]

    def denoised(x_, i, conds):
        return comfy.samplers.calc_cond_batch(base, [conds], x_, x_.new_full([rows], sig[i]), options)[0]

    def eps_cond(x_, i):
        return (x_ - denoised(x_, i, positive)) / sig[i]

    def eps_uncond(x_, i, null):
        return (x_ - denoised(x_, i, with_crossattn(negative, null))) / sig[i]

    pbar = comfy.utils.ProgressBar(inner_steps * (len(sig) - 1))

    def on_inner(i, j, loss):
        pbar.update_absolute(i * inner_steps + (inner_steps if j is None else j + 1))
        comfy.model_management.throw_exception_if_processing_interrupted()

    res = null_text.optimize_null_text(eps_cond, eps_uncond, trajectory.to(x.device), sigmas, negative[0]["model_conds"][
        "c_crossattn"].cond, guidance=guidance, inner_steps=inner_steps, on_inner=on_inner, device=x.device)
    result.append(res)
    return res.latent.to(x)


def null_text_key(model, source, negative, inversion, guidance: float, inner_steps: int) -> str:
    """Cache key: the mode and its options, the model (with its attention setup), both
    conditionings and the inversion the optimisation follows."""
    return make_key({"kind": CACHE_KIND, "format": CACHE_FORMAT, "source_mode": "null-text",
                     "guidance": float(guidance), "inner_steps": int(inner_steps),
                     "schedule": {"lr": null_text.LR, "epsilon": [null_text.EPSILON, null_text.EPSILON_PER_STEP]},
                     "model": model, "source": source, "negative": negative,
                     "inversion": {"trajectory": inversion.trajectory, "sigmas": inversion.sigmas,
                                   "scheme": inversion.scheme}},
                    hook=host_fingerprint)


def null_embeddings(model, source, negative, inversion, guidance: float, inner_steps: int,
                    use_cache: bool = True) -> torch.Tensor:
    """The per-step null embeddings [steps, 1, tokens, 768] (float32, CPU) for the source
    branch, from the cache or optimised now. `model`: a clone set up as the source branch
    is in sampling (one sequence per chunk)."""
    m = model.clone()
    m.set_model_compute_dtype(torch.float32)
    cache, key = None, None
    if use_cache:
        cache = InversionCache(cache_folder(), max_bytes=cache_max_bytes())
        key = null_text_key(m, source, negative, inversion, guidance, inner_steps)
        tensors, status = cache.load_tensors(key, CACHE_KIND)
        if tensors is not None and "embeddings" in tensors:
            return tensors["embeddings"]
        if status.startswith("damaged"):
            logging.warning("VideoGrain: null-text cache entry %s was %s; recomputing", key[:12], status)
    guider = comfy.samplers.CFGGuider(m)
    guider.set_conds(source, negative)
    guider.set_cfg(guidance)
    result: list = []
    run_guider(guider, sample_null_text, {"trajectory": inversion.trajectory, "guidance": float(guidance),
                                          "inner_steps": int(inner_steps), "result": result},
               inversion.sigmas.flip(0), inversion.latent.float())
    (res,) = result
    logging.info("VideoGrain P2P null-text: inner steps per step %s, last losses %s", res.inner_steps_run,
                 ["%.2e" % v for v in res.losses])
    if cache is not None:
        try:
            cache.save_tensors(key, CACHE_KIND, {"embeddings": res.embeddings})
        except OSError as e:
            logging.warning("VideoGrain: could not write the null-text cache: %s", e)
    return res.embeddings
