"""The T2S model's temporal attention (VIDEO_P2P.md section 3).

After the feed-forward of every transformer block: x <- x + TemporalAttn(LayerNorm(x)),
where each spatial token attends over the F frames of its own sequence (plain softmax
attention, no positional encoding). The batch is [sequences * F, tokens, C] (frames of a
sequence consecutive, as the pack's batch layout describes it); the module regroups it
to [sequences * tokens, F, C]. The output projection's weight AND bias start at zero
(the reference leaves the bias random), so an untuned module adds exactly zero.

Temporal map replacement (Video-P2P's self replacement, VIDEO_P2P.md section 6): a
`replace` object in the block call's transformer_options (TEMPORAL_REPLACE_KEY) names,
per call, pairs (source sequence, target sequence): the target's temporal attention maps
become the source's, i.e. the target's queries and keys are the source's and its values
stay its own (softmax(q_s k_s^T) v_t).
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from ..attention.batch_layout import call_layout

log = logging.getLogger(__name__)

TEMPORAL_REPLACE_KEY = "videograin_temporal_replace"


class TemporalAttention(torch.nn.Module):
    """LayerNorm -> multi-head attention over frames -> output projection, plus the residual."""

    def __init__(self, dim: int, heads: int, dim_head: int, generator: torch.Generator | None = None):
        super().__init__()
        inner = heads * dim_head
        self.dim, self.heads, self.dim_head = int(dim), int(heads), int(dim_head)
        self.norm = torch.nn.LayerNorm(dim)
        self.to_q = torch.nn.Linear(dim, inner, bias=False)
        self.to_k = torch.nn.Linear(dim, inner, bias=False)
        self.to_v = torch.nn.Linear(dim, inner, bias=False)
        self.to_out = torch.nn.Linear(inner, dim)
        with torch.no_grad():
            bound = 1.0 / dim ** 0.5  # nn.Linear's default range, drawn from our generator (seeded runs)
            for lin in (self.to_q, self.to_k, self.to_v):
                lin.weight.copy_(torch.rand(lin.weight.shape, generator=generator) * 2 * bound - bound)
            self.to_out.weight.zero_()
            self.to_out.bias.zero_()

    def residual(self, x: torch.Tensor, sequences: int, frames: int, replace=()) -> torch.Tensor:
        """TemporalAttn(LayerNorm(x)) for x [sequences * frames, tokens, C], in x's dtype;
        `replace`: pairs (source sequence, target sequence) whose maps the target takes."""
        rows, tokens, c = x.shape
        if rows != sequences * frames:
            raise ValueError(f"temporal attention: {rows} rows are not {sequences} sequences of {frames} frames")
        p = self._params_on(x.device)
        h = F.layer_norm(x.float(), (c,), p["norm.weight"], p["norm.bias"], self.norm.eps)
        # [S, F, L, C] -> [S * L, F, C]: each token of each sequence over its frames
        h = h.reshape(sequences, frames, tokens, c).transpose(1, 2)            # [S, L, F, C]
        h_qk = h
        if replace:
            h_qk = h.clone()
            for src, tgt in replace:
                h_qk[tgt] = h[src]
        h = h.reshape(sequences * tokens, frames, c)
        h_qk = h_qk.reshape(sequences * tokens, frames, c)

        def heads(t):
            return t.reshape(t.shape[0], frames, self.heads, self.dim_head).transpose(1, 2)

        q = heads(F.linear(h_qk, p["to_q.weight"]))
        k = heads(F.linear(h_qk, p["to_k.weight"]))
        v = heads(F.linear(h, p["to_v.weight"]))
        a = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(d)) v
        a = a.transpose(1, 2).reshape(sequences * tokens, frames, self.heads * self.dim_head)
        out = F.linear(a, p["to_out.weight"], p["to_out.bias"])
        out = out.reshape(sequences, tokens, frames, c).transpose(1, 2).reshape(rows, tokens, c)
        return out.to(x.dtype)

    def _params_on(self, device) -> dict:
        """The parameters on `device` in float32. Frozen weights (a tuned model sampling) are
        copied to a device once, not per call; while training they are used as they are."""
        params = dict(self.named_parameters())
        if any(t.requires_grad for t in params.values()) and torch.is_grad_enabled():
            return {k: t.to(device=device, dtype=torch.float32) for k, t in params.items()}
        # (inference tensors keep no version counter; nothing changes them in place)
        key = (str(device), tuple((t.data_ptr(), 0 if t.is_inference() else t._version) for t in params.values()))
        cache = self.__dict__.get("_device_copy")
        if cache is None or cache[0] != key:
            with torch.no_grad():
                copy = {k: t.detach().to(device=device, dtype=torch.float32) for k, t in params.items()}
            self.__dict__["_device_copy"] = cache = (key, copy)
        return cache[1]

    def forward(self, x: torch.Tensor, sequences: int, frames: int, replace=()) -> torch.Tensor:
        return x + self.residual(x, sequences, frames, replace)


class TemporalBlockPatch:
    """Stands in for one transformer block's `forward` (an object patch): the block as the
    host runs it (the forward it replaces, so LoRA weight patches and attention replaces keep
    applying), then the block's temporal attention on its output. A call whose batch the
    pack cannot split into frame sequences runs without it (logged once)."""

    def __init__(self, forward, module: TemporalAttention, name: str):
        self.forward = forward
        self.module = module
        self.name = name
        self._warned = False

    def __call__(self, x, *args, **kwargs):
        out = self.forward(x, *args, **kwargs)
        options = kwargs.get("transformer_options")
        if options is None and len(args) > 1:
            options = args[1]
        if not isinstance(out, torch.Tensor) or out.dim() != 3:
            return out
        layout = call_layout(out.shape[0], options)
        if layout is None:
            if not self._warned:
                self._warned = True
                log.warning("VideoGrain T2S: a call of %s had a batch of %d rows the pack cannot split into frame "
                            "sequences; it ran without temporal attention", self.name, out.shape[0])
            return out
        replace = options.get(TEMPORAL_REPLACE_KEY) if isinstance(options, dict) else None
        pairs = replace.pairs(layout, options) if replace is not None else ()
        return self.module(out, layout.sequences, layout.frames, pairs)

    def __deepcopy__(self, memo):  # model options are deep-copied by clone(): share, never copy
        return self

    def videograin_fingerprint(self) -> dict:
        return {"t2s_temporal": self.name, "module": self.module}


__all__ = ["TemporalAttention", "TemporalBlockPatch", "call_layout", "TEMPORAL_REPLACE_KEY"]
