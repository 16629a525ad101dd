"""The tuned part of a T2S model as one object, and its file format.

`T2SWeights` holds, per transformer block (named by its module path under the UNet,
e.g. "input_blocks.1.1.transformer_blocks.0"), the deltas of the self- and
cross-attention query projections (attn1.to_q, attn2.to_q; the tuned weight is
original + delta, so the host applies them as weight patches on top of whatever else
patches the model) and the block's temporal attention module.

File (safetensors, float32 tensors, no pickle): keys
  "<block>.attn1.to_q.delta", "<block>.attn2.to_q.delta",
  "<block>.temporal.<parameter>" (norm.weight, norm.bias, to_q.weight, to_k.weight,
  to_v.weight, to_out.weight, to_out.bias),
and string metadata: format "videograin_t2s", version "1", blocks (JSON {block: [dim,
heads, dim_head]}), and the tuning settings (informative).
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from .temporal import TemporalAttention

FORMAT = "videograin_t2s"
VERSION = "1"
QS = ("attn1", "attn2")


@dataclass(frozen=True)
class BlockSpec:
    """What a transformer block offers the T2S model: its width, heads and the shapes of
    its two query projections."""
    name: str
    dim: int
    heads: int
    dim_head: int
    q_shapes: tuple  # ((out, in) of attn1.to_q, (out, in) of attn2.to_q)


class T2SWeights:
    """The q deltas and temporal modules of every transformer block (see module docstring).
    Shared, never copied, by clones of a model's options."""

    def __init__(self, specs: list[BlockSpec], seed: int = 0):
        if not specs:
            raise ValueError("T2S weights need at least one transformer block")
        g = torch.Generator().manual_seed(int(seed))
        self.specs = {s.name: s for s in specs}
        self.q_deltas: dict[str, torch.Tensor] = {}
        self.temporal: dict[str, TemporalAttention] = {}
        for s in specs:
            for which, shape in zip(QS, s.q_shapes):
                self.q_deltas[f"{s.name}.{which}.to_q"] = torch.zeros(tuple(shape), dtype=torch.float32)
            self.temporal[s.name] = TemporalAttention(s.dim, s.heads, s.dim_head, generator=g)
        self.info: dict[str, str] = {}

    # ------------------------------------------------------------ training view
    def parameters(self) -> list[torch.Tensor]:
        """Every tuned tensor (q deltas, then the temporal modules' parameters)."""
        out = list(self.q_deltas.values())
        for m in self.temporal.values():
            out.extend(m.parameters())
        return out

    def trainable(self, device) -> None:
        """Move everything to `device` (float32) and make it require gradients."""
        if torch.is_inference_mode_enabled():
            raise RuntimeError("T2SWeights.trainable must be called outside torch.inference_mode")
        # clones: tensors made under inference mode (a node's) cannot take gradients
        for k, d in self.q_deltas.items():
            self.q_deltas[k] = d.detach().to(device=device, dtype=torch.float32).clone().requires_grad_(True)
        for m in self.temporal.values():
            for sub in m.modules():
                for name, p in list(sub._parameters.items()):
                    if p is not None:
                        t = p.detach().to(device=device, dtype=torch.float32).clone()
                        sub._parameters[name] = torch.nn.Parameter(t, requires_grad=True)

    def frozen(self) -> None:
        """Back to the CPU, detached, no gradients (what a MODEL carries)."""
        for k, d in self.q_deltas.items():
            self.q_deltas[k] = d.detach().to("cpu", torch.float32)
        for m in self.temporal.values():
            m.requires_grad_(False)
            m.to("cpu", torch.float32)

    def parameter_count(self) -> int:
        return sum(int(p.numel()) for p in self.parameters())

    # ------------------------------------------------------------ file format
    def state_dict(self) -> dict[str, torch.Tensor]:
        sd = {f"{k}.delta": d.detach().to("cpu", torch.float32).contiguous() for k, d in self.q_deltas.items()}
        for name, m in self.temporal.items():
            for p, t in m.state_dict().items():
                sd[f"{name}.temporal.{p}"] = t.detach().to("cpu", torch.float32).contiguous()
        return sd

    def metadata(self) -> dict[str, str]:
        blocks = {s.name: [s.dim, s.heads, s.dim_head] for s in self.specs.values()}
        meta = {"format": FORMAT, "version": VERSION, "blocks": json.dumps(blocks, sort_keys=True)}
        meta.update({k: str(v) for k, v in self.info.items()})
        return meta

    @classmethod
    def from_state_dict(cls, sd: dict, metadata: dict | None, specs: list[BlockSpec],
                        what: str = "tuned") -> "T2SWeights":
        """Weights read from a file, checked against the model's blocks; every mismatch is an
        error naming `what` (the input it came from)."""
        metadata = metadata or {}
        if metadata.get("format") != FORMAT:
            raise ValueError(f"{what}: not a VideoGrain T2S file (its metadata has no format {FORMAT!r}); save one "
                             f"with VideoGrain T2S Tune")
        if metadata.get("version") != VERSION:
            raise ValueError(f"{what}: T2S file version {metadata.get('version')!r} is not supported (expected "
                             f"{VERSION})")
        w = cls(specs)
        expected = w.state_dict()
        missing = sorted(set(expected) - set(sd))
        extra = sorted(set(sd) - set(expected))
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"{len(missing)} tensors missing (e.g. {missing[0]})")
            if extra:
                parts.append(f"{len(extra)} unknown tensors (e.g. {extra[0]})")
            raise ValueError(f"{what}: this T2S file was tuned for another UNet ({'; '.join(parts)}): load it onto "
                             f"the model it was tuned on")
        for k, t in sd.items():
            if tuple(t.shape) != tuple(expected[k].shape):
                raise ValueError(f"{what}: tensor {k} has shape {tuple(t.shape)} but this model needs "
                                 f"{tuple(expected[k].shape)}: the file was tuned for another UNet")
            if not torch.isfinite(t).all():
                raise ValueError(f"{what}: tensor {k} holds NaN or infinite values")
        for k in w.q_deltas:
            w.q_deltas[k] = sd[f"{k}.delta"].detach().to("cpu", torch.float32).clone()
        for name, m in w.temporal.items():
            prefix = f"{name}.temporal."
            m.load_state_dict({p[len(prefix):]: t.float() for p, t in sd.items() if p.startswith(prefix)})
        w.info = {k: v for k, v in metadata.items() if k not in ("format", "version", "blocks")}
        return w

    def __deepcopy__(self, memo):
        return self


__all__ = ["BlockSpec", "T2SWeights", "FORMAT", "VERSION"]
