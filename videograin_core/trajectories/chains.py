"""Optical flow -> trajectories of cells at a token grid (METHOD.md section 8, steps 2-4).

    build_trajectories(flows, (h, w), (H, W)) -> Trajectories

Rules (the method leaves these open; each is deterministic):
- Flow to the grid: each cell's flow is the AREA AVERAGE of the pixel flow over the
  cell's pixels (adaptive average pooling: cell row i covers pixel rows
  floor(i*H/h) .. ceil((i+1)*H/h) - 1, so any H/h works, fractional ones included), then
  divided by the cell size: dx_cell = dx_px * w / W, dy_cell = dy_px * h / H. Averaged in
  float64, one frame pair at a time.
- Rounding: to the nearest integer, halves to even (torch.round).
- Link: cell (t, y, x) -> (t+1, y + dy, x + dx) when that cell is inside the grid; a
  link that leaves the grid ends the chain at (t, y, x).
- Collisions: of the cells of frame t linking to the same cell of t+1, the one with the
  SMALLEST flow magnitude (unrounded, in cells) keeps its link, ties broken by raster
  order (smaller y*w + x wins); the others end their chain at frame t. The smallest
  motion is the likeliest to be the surface that stays visible; the reference draws at
  random instead, which any fixed rule may replace (METHOD.md).
- Every cell of frame t+1 that no link reaches starts a new trajectory. Each cell has at
  most one link in and one out, so the chains are disjoint runs of consecutive frames
  that cover every cell of every frame exactly once.

Representation (memory linear in tokens in every case; tokens are numbered as the host
lays out self-attention over all frames: frame t, cell (y, x) is t*h*w + y*w + x):
- `token_trajectory` int64 [F*h*w]: the trajectory id of each token;
- `tokens` int64 [F*h*w]: the tokens grouped by trajectory, each trajectory's in time
  order; trajectory j is tokens[offsets[j]:offsets[j+1]];
- `offsets` int64 [T+1], `starts` int64 [T] (first frame of each trajectory).
Trajectory ids run in order of (start frame, raster index of the first cell), so equal
inputs give equal tensors. `cells` [T, F] (the padded table, -1 where a trajectory has
no cell) is built on request only: T*F is about F*h*w for smooth motion (T is about
h*w plus the chains started by occlusions and grid exits), but in the worst case
(every chain of length 1, e.g. motion of more than a grid per frame) T = F*h*w and the
table is F times the token count; attention therefore uses `groups()` instead.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Iterable

import torch
import torch.nn.functional as F

_DIGEST_TAG = b"videograin-trajectories-1"


@dataclass(frozen=True, eq=False)
class Trajectories:
    """The trajectories of one clip at one token grid (module docstring). Immutable;
    equality and hash compare `frames`, `grid` and the partition (`token_trajectory`)."""
    frames: int
    grid: tuple[int, int]
    token_trajectory: torch.Tensor
    tokens: torch.Tensor
    offsets: torch.Tensor
    starts: torch.Tensor
    _cache: dict = field(default_factory=dict, init=False, repr=False)

    @property
    def count(self) -> int:
        """T, the number of trajectories."""
        return self.starts.numel()

    @property
    def token_count(self) -> int:
        return self.token_trajectory.numel()

    @property
    def lengths(self) -> torch.Tensor:
        """int64 [T]: frames each trajectory spans (1..F)."""
        return self.offsets[1:] - self.offsets[:-1]

    def cells(self) -> torch.Tensor:
        """int64 [T, F]: token of trajectory j in frame t, -1 where it has none. Up to F
        times the token count (module docstring): for inspection, not for attention."""
        table = torch.full((self.count, self.frames), -1, dtype=torch.long)
        hw = self.grid[0] * self.grid[1]
        table[self.token_trajectory, torch.arange(self.token_count) // hw] = torch.arange(self.token_count)
        return table

    def groups(self, device: torch.device | str = "cpu") -> tuple[tuple[int, torch.Tensor], ...]:
        """((L, index int64 [n_L, L]), ...) for each length L present: row r lists, in
        time order, the tokens of one trajectory of length L. Every token is in exactly
        one row. Cached per device (the attention runs at every layer and step)."""
        device = torch.device(device)
        key = ("groups", str(device))
        if key not in self._cache:
            lengths = self.lengths
            out = []
            for length in torch.unique(lengths).tolist():
                first = self.offsets[:-1][lengths == length]
                index = self.tokens[first[:, None] + torch.arange(length)]
                out.append((int(length), index.to(device)))
            self._cache[key] = tuple(out)
        return self._cache[key]

    def digest(self) -> str:
        """sha256 hex of frames, grid and the partition: a cache key for what depends on it."""
        if "digest" not in self._cache:
            h = hashlib.sha256(_DIGEST_TAG)
            h.update(f"{self.frames},{self.grid[0]},{self.grid[1]};".encode())
            h.update(self.token_trajectory.to(torch.int64).contiguous().numpy().tobytes())
            self._cache["digest"] = h.hexdigest()
        return self._cache["digest"]

    def __eq__(self, other) -> bool:
        if not isinstance(other, Trajectories):
            return NotImplemented
        return (self.frames, self.grid) == (other.frames, other.grid) and \
            torch.equal(self.token_trajectory, other.token_trajectory)

    def __hash__(self) -> int:
        return hash(self.digest())


def flow_at_grid(flow: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
    """float64 [h, w, 2]: pixel flow [H, W, 2] area-averaged over each cell and expressed
    in cells (dx * w / W, dy * h / H)."""
    h, w = grid_hw
    big_h, big_w = flow.shape[:2]
    pooled = F.adaptive_avg_pool2d(flow.to(torch.float64).permute(2, 0, 1)[None], (h, w))[0]
    scale = torch.tensor([w / big_w, h / big_h], dtype=torch.float64)
    return pooled.permute(1, 2, 0) * scale


def links(cell_flow: torch.Tensor) -> torch.Tensor:
    """int64 [h*w]: for each cell of frame t (raster order) the cell of frame t+1 it links
    to, or -1 (its chain ends). `cell_flow` float [h, w, 2] in cells. Collision rule:
    smallest |flow| keeps the link, ties by raster order (module docstring)."""
    h, w = cell_flow.shape[:2]
    step = torch.round(cell_flow).to(torch.long)
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    ty, tx = (ys + step[..., 1]).reshape(-1), (xs + step[..., 0]).reshape(-1)
    source = torch.nonzero((ty >= 0) & (ty < h) & (tx >= 0) & (tx < w)).reshape(-1)   # ascending
    target = (ty * w + tx)[source]
    magnitude = cell_flow.reshape(-1, 2)[source].pow(2).sum(-1)
    # lexicographic order (target, magnitude, source) by stable sorts, last key first:
    # `source` is already ascending, so the first of each target run is the winner
    order = torch.argsort(magnitude, stable=True)
    order = order[torch.argsort(target[order], stable=True)]
    sorted_target = target[order]
    first = torch.ones_like(sorted_target, dtype=torch.bool)
    first[1:] = sorted_target[1:] != sorted_target[:-1]
    kept = order[first]
    out = torch.full((h * w,), -1, dtype=torch.long)
    out[source[kept]] = target[kept]
    return out


def build_trajectories(flows: torch.Tensor | None, grid_hw: tuple[int, int],
                       frame_hw: tuple[int, int]) -> Trajectories:
    """Trajectories of a clip at token grid (h, w) from its flows float [F-1, H, W, 2]
    (t -> t+1, pixels, as `flow.clip_flows` returns) at frame size (H, W). `flows` may be
    empty or None for a single frame: every cell is then its own trajectory."""
    h, w = (int(v) for v in grid_hw)
    big_h, big_w = (int(v) for v in frame_hw)
    if h < 1 or w < 1 or big_h < 1 or big_w < 1:
        raise ValueError(f"grid {grid_hw} and frame size {frame_hw} must be positive")
    if flows is None:
        flows = torch.zeros(0, big_h, big_w, 2)
    if flows.dim() != 4 or flows.shape[-1] != 2 or tuple(flows.shape[1:3]) != (big_h, big_w):
        raise ValueError(f"flows must be [F-1, {big_h}, {big_w}, 2] (pixels, at the frame size), "
                         f"got {tuple(flows.shape)}")
    if not bool(torch.isfinite(flows).all()):
        raise ValueError("flows contain NaN or infinite values")
    frames, hw = flows.shape[0] + 1, h * w
    ids = torch.empty(frames, hw, dtype=torch.long)
    ids[0] = torch.arange(hw)
    starts = [torch.zeros(hw, dtype=torch.long)]
    count = hw
    for t in range(frames - 1):
        nxt = links(flow_at_grid(flows[t].cpu(), (h, w)))
        linked = nxt >= 0
        row = torch.full((hw,), -1, dtype=torch.long)
        row[nxt[linked]] = ids[t][linked]          # continued chains keep their id
        new = row < 0                                # cells no link reaches start one
        n_new = int(new.sum())
        row[new] = torch.arange(count, count + n_new)
        starts.append(torch.full((n_new,), t + 1, dtype=torch.long))
        count += n_new
        ids[t + 1] = row
    token_trajectory = ids.reshape(-1)
    # token index grows with time, so a stable sort by id keeps each trajectory in time order
    tokens = torch.argsort(token_trajectory, stable=True)
    offsets = torch.zeros(count + 1, dtype=torch.long)
    offsets[1:] = torch.cumsum(torch.bincount(token_trajectory, minlength=count), 0)
    return Trajectories(frames, (h, w), token_trajectory, tokens, offsets, torch.cat(starts))


def build_trajectories_for_grids(flows: torch.Tensor | None, grids: Iterable[tuple[int, int]],
                                 frame_hw: tuple[int, int]) -> dict[tuple[int, int], Trajectories]:
    """{(h, w): Trajectories} for each distinct grid, all from the same flows."""
    return {tuple(int(v) for v in g): build_trajectories(flows, g, frame_hw)
            for g in dict.fromkeys(tuple(int(v) for v in g) for g in grids)}
