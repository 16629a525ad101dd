"""The local blend's per-run state (VIDEO_P2P.md section 8): the cumulative post-edit
cross-attention maps of the blend words at the 16x16-equivalent layers, and the mask
built from them after each model call.

One `BlendStore` per sampling run, owned by the sampler: it travels to the attention
stages as an object in the run's transformer_options (`STORE_KEY`; objects pass by
reference through the host's per-call copies), the P2P cross stage adds each call's maps,
and the sampler function reads the mask after the call. Nothing of it lives on a stage or
on the MODEL, so two runs never share it.
"""
from __future__ import annotations

import threading

import torch

from . import maps

STORE_KEY = "videograin_p2p_blend"
BLEND_LEVEL = 2   # token grids at 1/4 of the latent: 16x16 at 512x512 (SD1.5 input 7, 8, output 3, 4, 5)


class BlendStore:
    """Sums over steps, layers and heads of each side's blend-word maps, per frame."""

    def __init__(self, source_tokens, target_tokens, threshold: float = 0.3):
        self.source_tokens = tuple(int(t) for t in source_tokens)
        self.target_tokens = tuple(int(t) for t in target_tokens)
        self.threshold = float(threshold)
        self._sums: dict[str, torch.Tensor] = {}
        self._lock = threading.Lock()
        self.calls = 0   # layer calls added (for tests and a warning when none ever came)

    def __deepcopy__(self, memo):
        return self

    def tokens(self, side: str) -> tuple[int, ...]:
        return self.source_tokens if side == "source" else self.target_tokens

    def add_frames(self, side: str, probs: torch.Tensor, hw: tuple[int, int], first: int, frames: int) -> None:
        """probs: one layer's maps of one side for frames first.. of a clip of `frames`
        frames, [n, heads, h*w, L] (post-edit for the target)."""
        tokens = self.tokens(side)
        if not tokens:
            return
        idx = torch.as_tensor(tokens, dtype=torch.long, device=probs.device)
        s = probs.index_select(-1, idx).sum(-1).sum(1).float().detach()     # [n, h*w]
        s = s.reshape(s.shape[0], hw[0], hw[1])
        with self._lock:
            cur = self._sums.get(side)
            if cur is None:
                cur = self._sums[side] = s.new_zeros((frames, hw[0], hw[1]))
            if cur.shape != (frames, hw[0], hw[1]):
                raise ValueError(f"local blend: maps of {frames} frames at {hw} and {tuple(cur.shape)} at the "
                                 f"blend layers")
            cur[first:first + s.shape[0]] += s.to(cur.device)
            self.calls += 1

    def ready(self) -> bool:
        return any(side in self._sums for side in ("source", "target") if self.tokens(side))

    def mask(self, size: tuple[int, int]) -> torch.Tensor:
        """bool [F, H, W]: the union of both sides' word masks (maps.word_mask on the
        cumulative maps). The sums over heads and layers stand for their means: the mask
        divides each frame by its maximum, so a constant factor changes nothing."""
        parts = []
        for side in ("source", "target"):
            s = self._sums.get(side)
            if s is None or not self.tokens(side):
                continue
            parts.append(maps.word_mask([s[:, None, :, :, None]], (0,), size, self.threshold))
        if not parts:
            raise ValueError("local blend: no cross-attention maps were captured at the 16x16-equivalent layers")
        out = parts[0]
        for p in parts[1:]:
            out = out | p.to(out.device)
        return out


__all__ = ["BlendStore", "STORE_KEY", "BLEND_LEVEL"]
