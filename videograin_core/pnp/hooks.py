"""The PnP taps inside the UNet and the per-run state they share.

- `ResidualTap` stands in for a decoder ResBlock's bound `forward` (an object patch; the
  module and its weights stay, so LoRA patches and the host's casting still apply). It calls
  the forward it replaces and, during a PnP call, takes the residual branch
  h = out - skip_connection(x) (the block's own skip: a 1x1 conv in the PnP blocks, Identity
  where channels match). Record: h. Inject: out + (h_src - h), which is skip(x) + h_src and
  exactly `out` when the record is this call's own.
- `Attn1Input` is an attn1 patch (the host calls it with the self-attention's input n before
  to_q/to_k/to_v). Record: n. Inject: q and k from the source's n, v from the call's own:
  (n_src, n_src, value). The layer's attention (the host's, or the pack's runtime with
  full-frame attention and ST-Layout modulation, or a chained replace) then runs on them.
- `PnPRun` holds what one PnP-enabled model clone does (record into a bank or inject from
  one) and the call in progress: the batch layout and the step, set by a DIFFUSION_MODEL
  wrapper around each UNet call that carries a `PnPCall` tag in its transformer_options.
  Without a tag (the other inversion and sampling steps, other samplers, ControlNets) the
  taps are inert: they return what the host computed.

Rows: the batch is chunk-major (one chunk per cond/uncond branch, BatchLayout); each chunk's
branch selects its own record.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..attention.batch_layout import BatchLayout
from .bank import FeatureBank

log = logging.getLogger(__name__)

CALL_KEY = "videograin_pnp_call"  # transformer_options: the PnPCall of a UNet call (absent: inert)


@dataclass(frozen=True)
class PnPCall:
    step: int                          # the sampling step the call records for / injects into
    branches: tuple[int, ...] = (0, 1)  # record: the branches to record
    split_uncond: bool = False         # record at cfg 1: the uncond branch runs in a call of its own


class PnPRun:
    """Shared by the taps of one model clone; `mode` is "record" or "inject"."""

    def __init__(self, mode: str, bank: FeatureBank):
        if mode not in ("record", "inject"):
            raise ValueError(f"PnP mode must be record or inject, got {mode!r}")
        self.mode = mode
        self.bank = bank
        self.current: tuple[BatchLayout, PnPCall] | None = None
        self._warned_context = False

    def __deepcopy__(self, memo):  # clone() deep-copies model options: share, never copy
        return self

    def videograin_fingerprint(self) -> dict:
        return {"pnp_run": self.mode}

    # ------------------------------------------------------------ the call in progress
    def begin(self, layout: BatchLayout | None, call: PnPCall) -> None:
        if layout is None:
            raise ValueError("PnP feature injection needs every frame of the clip in each UNet call: it does not "
                             "work with context windows (or another wrapper that slices the batch)")
        if layout.frames != self.bank.frames:
            raise ValueError(f"PnP: the UNet call has {layout.frames} frames per sequence but the features are for "
                             f"{self.bank.frames}")
        if self.mode == "record" and layout.groups != 1:
            raise ValueError("PnP records one sequence per branch; this sampler stacks several in a chunk")
        self.current = (layout, call)

    def end(self) -> None:
        self.current = None

    def _chunks(self, rows: int):
        """(row slice, branch) of every chunk of the call in progress."""
        layout, _ = self.current
        if rows != layout.rows:
            raise ValueError(f"PnP: a layer got {rows} rows but the call's batch has {layout.rows}")
        rpc = layout.rows_per_chunk
        return [(slice(i * rpc, (i + 1) * rpc), b) for i, b in enumerate(layout.branches)]

    def _source(self, name: str, branch: int, like: torch.Tensor) -> torch.Tensor | None:
        layout, call = self.current
        rec = self.bank.get(call.step, name, branch)
        if rec is None:
            return None
        if tuple(rec.shape[1:]) != tuple(like.shape[1:]):
            raise ValueError(f"PnP: the record of {name} has shape {tuple(rec.shape)} but the layer computes "
                             f"{tuple(like.shape)} per chunk: the features belong to another clip size")
        rec = rec.to(device=like.device, dtype=like.dtype)
        return rec.repeat((layout.groups,) + (1,) * (rec.dim() - 1)) if layout.groups > 1 else rec

    # ------------------------------------------------------------ the two taps
    def residual(self, name: str, block, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        xs = block.x_upd(x) if getattr(block, "updown", False) else x
        h = out - block.skip_connection(xs)
        _, call = self.current
        if self.mode == "record":
            for rows, b in self._chunks(out.shape[0]):
                if b in call.branches:
                    self.bank.put(call.step, name, b, h[rows])
            return out
        new = None
        for rows, b in self._chunks(out.shape[0]):
            src = self._source(name, b, h[rows])
            if src is None:
                continue
            if new is None:
                new = out.clone()
            new[rows] = out[rows] + (src - h[rows])
        return out if new is None else new

    def attn1(self, name: str, n: torch.Tensor, context, value):
        _, call = self.current
        if self.mode == "record":
            for rows, b in self._chunks(n.shape[0]):
                if b in call.branches:
                    self.bank.put(call.step, name, b, n[rows])
            return n, context, value
        own_keys = context is None or context is n
        if not own_keys and tuple(context.shape) != tuple(n.shape):
            # another attn1 patch gave self-attention other keys: the source's keys cannot stand in
            if not self._warned_context:
                self._warned_context = True
                log.warning("VideoGrain PnP: another attn1 patch changed the self-attention keys of %s; PnP "
                            "injects only the queries there", name)
        new_n = new_ctx = None
        for rows, b in self._chunks(n.shape[0]):
            src = self._source(name, b, n[rows])
            if src is None:
                continue
            if new_n is None:
                new_n = n.clone()
                if own_keys:
                    new_ctx = new_n          # k from the same (source) input as q
                elif tuple(context.shape) == tuple(n.shape):
                    new_ctx = context.clone()
            new_n[rows] = src
            if new_ctx is not None and new_ctx is not new_n:
                new_ctx[rows] = src
        if new_n is None:
            return n, context, value
        # v stays the call's own: the host passes n itself as the value when no other patch set one
        return new_n, (context if new_ctx is None else new_ctx), (n if value is None else value)


class ResidualTap:
    """Object patch for a ResBlock's `forward` (see the module docstring)."""

    def __init__(self, name: str, block, forward, run: PnPRun):
        self.name = name
        self.block = block
        self.forward = forward
        self.run = run

    def __call__(self, x, *args, **kwargs):
        out = self.forward(x, *args, **kwargs)
        if self.run.current is None:
            return out
        return self.run.residual(self.name, self.block, x, out)

    def __deepcopy__(self, memo):
        return self

    def videograin_fingerprint(self) -> dict:
        return {"pnp_residual_tap": self.name, "run": self.run.mode}


class Attn1Input:
    """attn1 patch (n, context, value, extra_options) -> (n, context, value); acts only on the
    target layers, found by the host's (block, number, transformer index)."""

    def __init__(self, run: PnPRun, names: dict[tuple[str, int, int], str]):
        self.run = run
        self.names = dict(names)

    def __call__(self, n, context, value, extra_options, *args, **kwargs):
        if self.run.current is None:
            return n, context, value
        block = extra_options.get("block")
        if not block:
            return n, context, value
        name = self.names.get((block[0], int(block[1]), int(extra_options.get("block_index", 0) or 0)))
        if name is None:
            return n, context, value
        return self.run.attn1(name, n, context, value)

    def __deepcopy__(self, memo):
        return self

    def videograin_fingerprint(self) -> dict:
        return {"pnp_attn1_input": sorted(self.names.values()), "run": self.run.mode}


__all__ = ["CALL_KEY", "PnPCall", "PnPRun", "ResidualTap", "Attn1Input"]
