"""Trajectory attention as a stage of the attention runtime (METHOD.md section 8).

`ClipTrajectories` is what travels on a VIDEOGRAIN_TRAJECTORIES wire: the source clip's
forward flows at frame resolution, from which the trajectories of any token grid are
built on first use and kept. `TrajectoryStage` runs after each self-attention over all
frames at the chosen grids: every sequence's output O [F*h*w, C] is replaced by the
attention of each token's original q over the original k and O of its own trajectory's
cells, in every branch, during inversion and sampling alike.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

from ..attention.runtime import AttentionCall, Stage, grid_level
from .attention import trajectory_attention
from .chains import Trajectories, build_trajectories

# Grid levels (halvings of the latent) a user can choose: the reference's default is the
# full-resolution layers only; some of its configs add 1/2 and 1/4.
RESOLUTIONS = {"full": (0,), "full + 1/2": (0, 1), "full + 1/2 + 1/4": (0, 1, 2)}


@dataclass(frozen=True, eq=False)
class ClipTrajectories:
    """The flows of one clip (float32 [F-1, H, W, 2], t -> t+1, pixels) and its frame size;
    trajectories per token grid are built lazily and cached. Shared, never copied, by the
    host's clones of model options; no `.to` (the host would move it)."""
    flows: torch.Tensor
    frames: int
    frame_hw: tuple[int, int]
    method: str
    _grids: dict = field(default_factory=dict, repr=False)
    _digest: list = field(default_factory=list, repr=False)

    def __post_init__(self):
        h, w = self.frame_hw
        if tuple(self.flows.shape) != (self.frames - 1, h, w, 2):
            raise ValueError(f"flows must be [{self.frames - 1}, {h}, {w}, 2] for {self.frames} frames of "
                             f"{w}x{h}, got {tuple(self.flows.shape)}")

    def at_grid(self, h: int, w: int) -> Trajectories:
        key = (int(h), int(w))
        t = self._grids.get(key)
        if t is None:
            t = self._grids[key] = build_trajectories(self.flows, key, self.frame_hw)
        return t

    def digest(self) -> str:
        if not self._digest:
            flows = self.flows.contiguous()
            h = hashlib.sha256(f"{self.frames}|{self.frame_hw}|{self.method}|".encode())
            h.update(memoryview(flows.numpy()).cast("B"))
            self._digest.append(h.hexdigest())
        return self._digest[0]

    def videograin_fingerprint(self) -> dict:
        return {"trajectories": self.digest()}

    def __deepcopy__(self, memo):
        return self

    def get_ram_usage(self) -> int:
        return self.flows.numel() * self.flows.element_size()


class TrajectoryStage(Stage):
    """After the all-frames self-attention at the chosen grid levels, each sequence's output
    becomes its trajectory attention. Calls it cannot read (no batch layout, cross-attention,
    other grids, per-frame attention) pass through unchanged."""

    def __init__(self, trajectories: ClipTrajectories, levels: tuple[int, ...],
                 memory_budget_bytes: int | None = None):
        self.trajectories = trajectories
        self.levels = tuple(sorted(set(int(v) for v in levels)))
        self.memory_budget_bytes = memory_budget_bytes

    def applies(self, call: AttentionCall) -> tuple[int, int] | None:
        if call.kind != "self" or call.batch is None:
            return None
        act = call.extra_options.get("activations_shape")
        level = grid_level(act, call.extra_options.get("original_shape"))
        if level not in self.levels:
            return None
        h, w = int(act[-2]), int(act[-1])
        if h * w != call.q.shape[1] or call.k.shape[1] != call.q.shape[1]:
            return None  # another patch changed the tokens
        return h, w

    def after(self, call: AttentionCall, out: torch.Tensor) -> torch.Tensor:
        grid = self.applies(call)
        if grid is None:
            return out
        batch = call.batch
        if batch.frames != self.trajectories.frames:
            raise ValueError(f"trajectories: they are for {self.trajectories.frames} frames but the video latent has "
                             f"{batch.frames}: compute them from the same frames as the latent")
        traj = self.trajectories.at_grid(*grid)
        seqs, lq = batch.sequences, call.q.shape[1]
        regroup = lambda t: t.reshape(seqs, batch.frames * lq, t.shape[-1])
        kw = {} if self.memory_budget_bytes is None else {"memory_budget_bytes": self.memory_budget_bytes}
        result = trajectory_attention(regroup(call.q), regroup(call.k), regroup(out), call.extra_options["n_heads"],
                                      traj, **kw)
        return result.reshape(out.shape)

    def videograin_fingerprint(self) -> dict:
        return {"trajectory_attention": self.trajectories.digest(), "levels": list(self.levels)}


__all__ = ["ClipTrajectories", "TrajectoryStage", "RESOLUTIONS"]
