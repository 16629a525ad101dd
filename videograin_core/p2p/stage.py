"""The Video-P2P cross-attention control as a stage of the pack's attention runtime
(videograin_core.attention.runtime; VIDEO_P2P.md sections 5 and 6).

The sampler stacks the source and the target in one batch and announces two sequences per
chunk, so the published layout of each attn2 call is chunks x [source F; target F]. On
the cond chunks, inside the cross window (and, with a local blend, at every step on the
16x16-equivalent layers), this stage computes the target rows itself in its `around`:
explicit float32 softmax probabilities of the source rows and of the target rows (a normal
per-row softmax), `P2PControl.control_cross` on them, then probabilities @ v of the target
rows. The source rows and the uncond chunks go on to the rest of the chain (the kernel) as
a narrowed call, so no row is attended twice. Every call outside the window and every
batch that is not laid out in two groups is passed on whole.

The local blend's maps (the source's own and the target's post-edit maps of the blend
words) go into the run's `BlendStore`, found in the call's options (blend.STORE_KEY).

`P2PSelfStage` (attn1): inside the self window, on token grids of at most 32x32, the
target rows of the cond chunks attend with the source's queries and keys (so their
self-attention maps are the source's, over whatever keys the kernel or a frame-attention
stage uses) and their own values: image prompt-to-prompt's spatial self replacement,
with no maps materialised. Video-P2P's temporal replacement needs the T2S model's
temporal attention modules, which this pack does not build yet.

Cost: the source and target probabilities of a cond chunk are materialised
([frames, heads, query tokens, L] float32 each, a few frames at a time within
PROBS_BUDGET elements). Outside the window the stage costs one schedule lookup per call.
"""
from __future__ import annotations

import logging

import torch

import dataclasses

from ..attention.runtime import AttentionCall, Stage, grid_level, select_sequences, sequence_rows
from .blend import BLEND_LEVEL, STORE_KEY
from .control import P2PControl

log = logging.getLogger(__name__)

GROUPS = 2                 # sequences per chunk of a P2P batch: [source; target]
PROBS_BUDGET = 1 << 25     # float32 elements of probabilities held at once (128 MiB)


def schedule_step(extra_options: dict) -> tuple[int, int] | None:
    """(step index, steps) of the call's sigma in the sampler's schedule, found as the
    ST-Layout runtime finds it (the nearest sigma of `sample_sigmas`); None without a
    schedule."""
    sigmas, schedule = extra_options.get("sigmas"), extra_options.get("sample_sigmas")
    if sigmas is None or schedule is None:
        return None
    sched = torch.as_tensor(schedule).detach().flatten().float().cpu()
    if sched.numel() < 2:
        return None
    sigma = torch.as_tensor(sigmas).detach().flatten()[0].float().cpu()
    return int(torch.argmin((sched - sigma).abs())), sched.numel() - 1


def attention_probs(q: torch.Tensor, k: torch.Tensor, heads: int) -> torch.Tensor:
    """float32 softmax(q k^T / sqrt(d)) per head: [rows, heads, Lq, Lk] from [rows, L, heads*d]."""
    b, lq, c = q.shape
    d = c // heads
    qh = q.float().reshape(b, lq, heads, d).transpose(1, 2)
    kh = k.float().reshape(b, k.shape[1], heads, d).transpose(1, 2)
    return torch.softmax((qh @ kh.transpose(-1, -2)) * d ** -0.5, dim=-1)


def apply_probs(probs: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """probs [rows, heads, Lq, Lk] @ v [rows, Lk, heads*d] -> [rows, Lq, heads*d] (float32)."""
    b, lk, c = v.shape
    vh = v.float().reshape(b, lk, heads, c // heads).transpose(1, 2)
    o = probs @ vh
    return o.transpose(1, 2).reshape(b, probs.shape[2], c)


class P2PCrossStage(Stage):
    """attn2 stage: the target's cross-attention maps controlled by the source's."""

    def __init__(self, control: P2PControl):
        if not isinstance(control, P2PControl):
            raise ValueError("p2p: expected a VIDEOGRAIN_P2P control from VideoGrain P2P Control")
        self.control = control
        self._warned = False

    def videograin_fingerprint(self) -> dict:
        return {"p2p_cross_stage": 1, **self.control.videograin_fingerprint()}

    def _warn_once(self, msg, *args):
        if not self._warned:
            self._warned = True
            log.warning(msg, *args)

    def around(self, call: AttentionCall, next) -> torch.Tensor:
        if call.kind != "cross":
            return next(call)
        batch = call.batch
        if batch is None or batch.groups != GROUPS:
            return next(call)
        cond = [c for c, b in enumerate(batch.branches) if b == 0]
        if not cond:
            return next(call)
        when = schedule_step(call.extra_options)
        if when is None:
            return next(call)
        step, steps = when
        ctl = self.control
        store = call.extra_options.get(STORE_KEY)
        act = call.extra_options.get("activations_shape")
        blend_layer = (store is not None and act is not None
                       and grid_level(act, call.extra_options.get("original_shape")) == BLEND_LEVEL
                       and int(act[-2]) * int(act[-1]) == call.q.shape[1])
        controlled = ctl.cross_alpha(step, steps) is not None
        if not controlled and not blend_layer:
            return next(call)
        q, k, v = call.q, call.k, call.v
        if k.shape[1] != ctl.token_count:
            self._warn_once("VideoGrain P2P: cross-attention got %d text tokens, the P2P control was built for %d "
                            "(wire the P2P Control node's conditionings unaltered); no cross-attention control",
                            k.shape[1], ctl.token_count)
            return next(call)
        heads = int(call.extra_options["n_heads"])
        frames, rpc = batch.frames, batch.rows_per_chunk
        # the source rows and the uncond chunks: the rest of the chain
        passed = [s for s in range(batch.sequences) if not (s // GROUPS in cond and s % GROUPS == 1)]
        rest = next(select_sequences(call, passed))
        out = rest.new_empty((q.shape[0],) + tuple(rest.shape[1:]))
        out[sequence_rows(batch, passed).to(out.device)] = rest
        per_frame = 2 * heads * q.shape[1] * k.shape[1]
        block = max(1, min(frames, PROBS_BUDGET // max(1, per_frame)))
        for c in cond:
            base = c * rpc
            for f0 in range(0, frames, block):
                f1 = min(frames, f0 + block)
                src = slice(base + f0, base + f1)
                tgt = slice(base + frames + f0, base + frames + f1)
                p_src = attention_probs(q[src], k[src], heads)
                p_tgt = attention_probs(q[tgt], k[tgt], heads)
                p_new = ctl.control_cross(p_src, p_tgt, step, steps) if controlled else None
                if p_new is None:
                    p_new = p_tgt
                out[tgt] = apply_probs(p_new, v[tgt], heads).to(out.dtype)
                if blend_layer:
                    hw = (int(act[-2]), int(act[-1]))
                    store.add_frames("source", p_src, hw, f0, frames)
                    store.add_frames("target", p_new, hw, f0, frames)
        return out


class P2PSelfStage(Stage):
    """attn1 stage: spatial self-attention replacement inside the control's self window
    (see the module docstring)."""

    MAX_TOKENS = 32 * 32

    def __init__(self, control: P2PControl):
        if not isinstance(control, P2PControl):
            raise ValueError("p2p: expected a VIDEOGRAIN_P2P control from VideoGrain P2P Control")
        self.control = control

    def videograin_fingerprint(self) -> dict:
        return {"p2p_self_stage": 1, "self_window": list(self.control.self_window)}

    def around(self, call: AttentionCall, next) -> torch.Tensor:
        batch = call.batch
        if (call.kind != "self" or batch is None or batch.groups != GROUPS or call.q.shape[1] > self.MAX_TOKENS
                or call.k.shape[1] != call.q.shape[1]):
            return next(call)
        cond = [c for c, b in enumerate(batch.branches) if b == 0]
        when = schedule_step(call.extra_options)
        if not cond or when is None or not self.control.self_active(*when):
            return next(call)
        q, k = call.q.clone(), call.k.clone()
        frames, rpc = batch.frames, batch.rows_per_chunk
        for c in cond:
            src = slice(c * rpc, c * rpc + frames)
            tgt = slice(c * rpc + frames, (c + 1) * rpc)
            q[tgt] = call.q[src]
            k[tgt] = call.k[src]
        return next(dataclasses.replace(call, q=q, k=k))


class P2PTemporalReplace:
    """Video-P2P's self replacement on the T2S model's TEMPORAL attention (the reference's:
    its controller patches the temporal modules, never the spatial self-attention): inside
    the control's self window, each conditional chunk's target sequence takes its source
    sequence's temporal maps (videograin_core.tuning.temporal reads `pairs`). Lives in the
    transformer_options under tuning.temporal.TEMPORAL_REPLACE_KEY."""

    def __init__(self, control: P2PControl):
        if not isinstance(control, P2PControl):
            raise ValueError("p2p: expected a VIDEOGRAIN_P2P control from VideoGrain P2P Control")
        self.control = control

    def pairs(self, batch, transformer_options) -> list[tuple[int, int]]:
        if batch is None or batch.groups != GROUPS:
            return []
        when = schedule_step(transformer_options)
        if when is None or not self.control.self_active(*when):
            return []
        # chunk c holds sequences 2c (source) and 2c + 1 (target); only the cond chunks
        return [(GROUPS * c, GROUPS * c + 1) for c, b in enumerate(batch.branches) if b == 0]

    def __deepcopy__(self, memo):  # model options are deep-copied by clone(): share, never copy
        return self

    def videograin_fingerprint(self) -> dict:
        return {"p2p_temporal_replace": 1, "self_window": list(self.control.self_window)}


__all__ = ["P2PCrossStage", "P2PSelfStage", "P2PTemporalReplace", "schedule_step", "attention_probs", "apply_probs", "GROUPS",
           "PROBS_BUDGET"]
