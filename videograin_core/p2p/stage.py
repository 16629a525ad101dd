"""The Video-P2P cross-attention control as a stage of the pack's attention runtime
(videograin_core.attention.runtime; VIDEO_P2P.md sections 5 and 6).

The sampler stacks the source and the target in one batch and announces two sequences per
chunk, so the published layout of each attn2 call is chunks x [source F; target F]. On
the cond chunks, inside the cross window, this stage recomputes the target rows: explicit
float32 softmax probabilities of the source rows and of the target rows (a normal
per-row softmax), `P2PControl.control_cross` on them, then probabilities @ v of the
target rows. The source rows, the uncond chunks, every call outside the window and every
batch that is not laid out in two groups keep the kernel's output.

Cost. The runtime's `after` hook sees the kernel's finished output, so the kernel has
already computed the target rows this stage overwrites: inside the window a cond chunk's
target rows are attended twice (once by the kernel, thrown away), and the source and
target probabilities are materialised ([frames, heads, query tokens, L] float32 each,
computed a few frames at a time within PROBS_BUDGET elements). Outside the window the
stage costs one schedule lookup per call.
"""
from __future__ import annotations

import logging

import torch

from ..attention.runtime import AttentionCall, Stage
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

    def after(self, call: AttentionCall, out: torch.Tensor) -> torch.Tensor:
        if call.kind != "cross":
            return out
        batch = call.batch
        if batch is None or batch.groups != GROUPS:
            return out
        cond = [c for c, b in enumerate(batch.branches) if b == 0]
        if not cond:
            return out
        when = schedule_step(call.extra_options)
        if when is None:
            return out
        step, steps = when
        ctl = self.control
        if ctl.cross_alpha(step, steps) is None:
            return out
        q, k, v = call.q, call.k, call.v
        if k.shape[1] != ctl.token_count:
            self._warn_once("VideoGrain P2P: cross-attention got %d text tokens, the P2P control was built for %d "
                            "(wire the P2P Control node's conditionings unaltered); no cross-attention control",
                            k.shape[1], ctl.token_count)
            return out
        heads = int(call.extra_options["n_heads"])
        frames, rpc = batch.frames, batch.rows_per_chunk
        per_frame = 2 * heads * q.shape[1] * k.shape[1]
        block = max(1, min(frames, PROBS_BUDGET // max(1, per_frame)))
        out = out.clone()  # the kernel's tensor may be shared with whatever produced it
        for c in cond:
            base = c * rpc
            for f0 in range(0, frames, block):
                f1 = min(frames, f0 + block)
                src = slice(base + f0, base + f1)
                tgt = slice(base + frames + f0, base + frames + f1)
                p_src = attention_probs(q[src], k[src], heads)
                p_tgt = attention_probs(q[tgt], k[tgt], heads)
                p_new = ctl.control_cross(p_src, p_tgt, step, steps)
                out[tgt] = apply_probs(p_new, v[tgt], heads).to(out.dtype)
        return out


__all__ = ["P2PCrossStage", "schedule_step", "attention_probs", "apply_probs", "GROUPS", "PROBS_BUDGET"]
