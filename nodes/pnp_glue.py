"""Host glue of PnP feature injection (METHOD.md section 9), shared by DDIM Invert (record)
and Sample (inject); the core is videograin_core.pnp.

On a cloned model:
- a DIFFUSION_MODEL wrapper (keyed `videograin_pnp`) that, for a UNet call tagged with a
  `PnPCall` in its transformer_options, tells the taps the call's batch layout and step
  (the ResBlock tap gets no options from the host), and clears it after the call;
- object patches on the target ResBlocks' `forward` (never a module replacement);
- one attn1 patch (the host's composable list) for the target self-attention layers;
- recording only: a CALC_COND_BATCH wrapper that, at cfg 1, runs the uncond branch of a
  recorded call as a UNet call of its own and returns the cond prediction exactly as the
  host's cfg-1 path would (see `split_uncond`).
The sampler functions tag the calls through `call_options` (sampling.ddim)."""
from __future__ import annotations

import torch

from ..videograin_core.attention import batch_layout
from ..videograin_core.attention.batch_layout import BatchLayout
from ..videograin_core.pnp.hooks import CALL_KEY, Attn1Input, PnPCall, PnPRun, ResidualTap

WRAPPER_KEY = "videograin_pnp"


def call_layout(rows: int, transformer_options: dict) -> BatchLayout | None:
    """The UNet call's batch layout (batch_layout.call_layout); None for calls sliced by
    context windows."""
    if transformer_options.get("context_window") is not None or transformer_options.get("ad_params") is not None:
        return None
    return batch_layout.call_layout(rows, transformer_options)


def install(patched, run: PnPRun, targets) -> None:
    """The taps on `patched` (a clone): see the module docstring."""
    import comfy.patcher_extension

    def pnp_call(executor, x, *args, **kwargs):
        options = args[4] if len(args) > 4 else kwargs.get("transformer_options")
        call = (options or {}).get(CALL_KEY)
        if call is None:
            return executor(x, *args, **kwargs)
        run.begin(call_layout(x.shape[0], options), call)
        try:
            return executor(x, *args, **kwargs)
        finally:
            run.end()

    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY, pnp_call)
    for t in targets:
        if t.kind != "residual":
            continue
        key = f"diffusion_model.{t.module}.forward"
        block = patched.get_model_object(f"diffusion_model.{t.module}")
        patched.add_object_patch(key, ResidualTap(t.name, block, patched.get_model_object(key), run))
    names = {t.attn_key: t.name for t in targets if t.kind == "attn1"}
    if names:
        patched.set_model_attn1_patch(Attn1Input(run, names))
    if run.mode == "record":
        patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, WRAPPER_KEY, split_uncond)


def split_uncond(executor, model, conds, x_in, timestep, model_options, *args, **kwargs):
    """A recorded inversion call at cfg 1 needs the uncond branch (the reference records
    both), which the host skips at cfg 1 unless `disable_cfg1_optimization` is set. With it
    set, the host would batch cond and uncond together (which changes the cond prediction
    in its last bits) and combine them as uncond + (cond - uncond) * 1 (not cond exactly).
    So the cond list runs alone, as the host's cfg-1 path runs it; the uncond list runs in a
    call of its own for its records; and the uncond prediction returned is the host's
    "not run" zero, so the combine gives the cond prediction exactly: the inversion is the
    same, bit for bit, with or without recording."""
    call = (model_options.get("transformer_options") or {}).get(CALL_KEY)
    if call is None or not call.split_uncond or len(conds) < 2 or conds[1] is None:
        return executor(model, conds, x_in, timestep, model_options, *args, **kwargs)
    out = executor(model, [conds[0], None] + list(conds[2:]), x_in, timestep, model_options, *args, **kwargs)
    executor(model, [None, conds[1]], x_in, timestep, model_options, *args, **kwargs)
    return out


def tagged(model_options: dict, call: PnPCall, disable_cfg1: bool = False) -> dict:
    """model_options for one UNet call carrying `call` (copies; the run's options stay)."""
    options = dict(model_options)
    to = dict(options.get("transformer_options") or {})
    to[CALL_KEY] = call
    options["transformer_options"] = to
    if disable_cfg1:
        options["disable_cfg1_optimization"] = True
    return options


def record_options(plan: dict[int, int], branches: tuple[int, ...], split: bool):
    """call_options for an inversion: the calls in `plan` (sigma index -> sampling step) record."""
    def options(k, model_options):
        step = plan.get(k)
        if step is None:
            return None
        return tagged(model_options, PnPCall(step, tuple(branches), split), disable_cfg1=split)
    return options


def inject_options(inject_step: int):
    """call_options for sampling: steps 0 .. inject_step - 1 inject their records."""
    def options(i, model_options):
        return tagged(model_options, PnPCall(i)) if i < inject_step else None
    return options


def same_conditioning(a, b) -> bool:
    """Two CONDITIONING lists that give the UNet the same inputs (so one record serves both
    branches): the same object, or equal tensors and the same extras."""
    if a is b:
        return True
    if a is None or b is None or len(a) != len(b):
        return False
    for (ta, da), (tb, db) in zip(a, b):
        if not _same(ta, tb) or set(da) != set(db) or not all(_same(da[k], db[k]) for k in da):
            return False
    return True


def _same(x, y) -> bool:
    if x is y:
        return True
    if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
        return x.shape == y.shape and x.dtype == y.dtype and bool(torch.equal(x, y))
    if isinstance(x, (int, float, str, bool, type(None))):
        return x == y
    return False
