"""Regions without masks (METHOD.md section 10): k-means over the captured self-attention
features of ALL frames at once, so that a cluster is the same region in every frame.

k-means, deterministic:
- initialisation: k-means++ (the first centre drawn uniformly, each next one with
  probability proportional to the squared distance to the nearest centre chosen), drawn
  from numpy's PCG64 generator seeded with `seed` (restart r uses seed + r);
- `restarts` runs (Lloyd iterations until no label changes, at most `max_iter`), the one
  with the lowest within-cluster sum of squares kept (the first on a tie); an emptied
  cluster takes the point farthest from its centre;
- labels renumbered canonically: cluster 1 is the one holding the first token in
  (frame, row, column) order, cluster 2 the one holding the first token not in cluster 1,
  and so on. The numbering therefore depends on the partition only, not on the draws.
float32 numpy throughout (the features are unit vectors per layer; 16 frames of 32x32
tokens with 1920 dims are 120 MiB): the same features give the same clusters on a given
machine (the BLAS product's summation order may differ across machines, which can move a
point lying on a border).

Masks at frame resolution: each cluster's indicator at the feature grid is upsampled
bilinearly to the frame size and every pixel goes to the cluster with the largest value
(the first on a tie): smooth borders, and the masks of one frame still partition it.

Names: each word's cross-attention map is scaled to 0..1 over the clip (divided by its
maximum) and resampled to the feature grid; a cluster is named by the word with the
highest mean inside it when that mean reaches `threshold`, else it stays unnamed.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

PALETTE = np.array([[230, 25, 75], [60, 180, 75], [0, 130, 200], [255, 225, 25], [145, 30, 180],
                    [70, 240, 240], [245, 130, 48], [240, 50, 230]], dtype=np.float32) / 255


def _kmeans_pp(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    n = x.shape[0]
    centres = [x[int(rng.integers(n))]]
    d2 = ((x - centres[0]) ** 2).sum(1)
    for _ in range(1, k):
        total = d2.sum()
        if total <= 0:  # every point sits on a centre already: take the next index in order
            idx = len(centres) % n
        else:
            idx = int(np.searchsorted(np.cumsum(d2), rng.random() * total, side="right"))
            idx = min(idx, n - 1)
        centres.append(x[idx])
        d2 = np.minimum(d2, ((x - x[idx]) ** 2).sum(1))
    return np.stack(centres)


def _assign(x: np.ndarray, centres: np.ndarray, x2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    d = x2[:, None] - 2 * x @ centres.T + (centres ** 2).sum(1)[None]
    labels = d.argmin(1)
    return labels, np.maximum(d[np.arange(len(x)), labels], 0)


def _lloyd(x: np.ndarray, centres: np.ndarray, max_iter: int) -> tuple[np.ndarray, float]:
    x2 = (x ** 2).sum(1)
    labels, dist = _assign(x, centres, x2)
    for _ in range(max_iter):
        for c in range(len(centres)):
            members = labels == c
            if members.any():
                centres[c] = x[members].mean(0)
            else:  # an empty cluster restarts at the point worst served
                far = int(dist.argmax())
                centres[c] = x[far]
                dist[far] = 0
        new, dist = _assign(x, centres, x2)
        if np.array_equal(new, labels):
            break
        labels = new
    return labels, float(dist.sum())


def canonical(labels: np.ndarray) -> np.ndarray:
    """Renumber labels 0..k-1 in order of first occurrence (flattened order)."""
    flat = labels.reshape(-1)
    _, first = np.unique(flat, return_index=True)
    order = np.argsort(first, kind="stable")
    remap = np.empty(flat.max() + 1, dtype=np.int64)
    remap[np.unique(flat)[order]] = np.arange(len(order))
    return remap[labels]


def kmeans(features: np.ndarray | torch.Tensor, k: int, seed: int = 0, restarts: int = 4,
           max_iter: int = 100) -> np.ndarray:
    """Labels int64 [N] (canonical numbering, see the module docstring) of features [N, D]."""
    x = np.ascontiguousarray(features.detach().cpu() if isinstance(features, torch.Tensor) else features,
                           dtype=np.float32)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"features must be [points, dims], got {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("features contain NaN or infinite values")
    distinct = len(np.unique(x, axis=0)) if x.shape[0] <= 65536 else x.shape[0]
    if not 1 <= k <= distinct:
        raise ValueError(f"regions: {k} clusters asked for but the features have {distinct} distinct points")
    best, best_cost = None, np.inf
    for r in range(max(1, restarts)):
        rng = np.random.Generator(np.random.PCG64(seed + r))
        labels, cost = _lloyd(x, _kmeans_pp(x, k, rng), max_iter)
        if cost < best_cost:  # the first run wins a tie
            best, best_cost = labels, cost
    return canonical(best)


def cluster_masks(labels: torch.Tensor | np.ndarray, k: int, size: tuple[int, int]) -> torch.Tensor:
    """bool [k, F, H, W] from labels [F, h, w] (module docstring: smooth upsampling, one
    cluster per pixel)."""
    lab = torch.as_tensor(np.asarray(labels)).long()
    onehot = F.one_hot(lab, k).permute(0, 3, 1, 2).float()                   # [F, k, h, w]
    up = F.interpolate(onehot, size=size, mode="bilinear", align_corners=False)
    winner = up.argmax(dim=1)                                                # [F, H, W]
    return torch.stack([winner == c for c in range(k)])


def name_clusters(labels: torch.Tensor | np.ndarray, maps: dict[str, torch.Tensor],
                  threshold: float) -> list[tuple[str, float]]:
    """(name or "", score) per cluster: labels [F, h, w], maps name -> [F, h', w']."""
    lab = torch.as_tensor(np.asarray(labels)).long()
    k = int(lab.max()) + 1
    fr, h, w = lab.shape
    scores = torch.zeros(k, len(maps), dtype=torch.float64)
    names = list(maps)
    for j, name in enumerate(names):
        m = maps[name].float()
        if m.shape[0] != fr:
            raise ValueError(f"the cross-attention maps have {m.shape[0]} frames but the features {fr}")
        if tuple(m.shape[1:]) != (h, w):
            m = F.interpolate(m[:, None], size=(h, w), mode="bilinear", align_corners=False)[:, 0]
        top = float(m.max())
        m = m / top if top > 0 else torch.zeros_like(m)
        for c in range(k):
            sel = lab == c
            if sel.any():
                scores[c, j] = float(m[sel].double().mean())
    out = []
    for c in range(k):
        if not names:
            out.append(("", 0.0))
            continue
        j = int(scores[c].argmax())
        s = float(scores[c, j])
        out.append((names[j] if s >= threshold else "", s))
    return out


def preview(frames: torch.Tensor, masks: torch.Tensor, opacity: float = 0.5,
            labels: list[str] | None = None) -> torch.Tensor:
    """float [F, H, W, 3]: the frames tinted with each cluster's colour (PALETTE order);
    with `labels`, each cluster's label written at its centre of mass in every frame."""
    from .render import draw_label
    k = masks.shape[0]
    colours = torch.from_numpy(PALETTE[np.arange(k) % len(PALETTE)])
    tint = torch.einsum("kfhw,kc->fhwc", masks.float(), colours)
    out = (frames[..., :3].float().cpu() * (1 - opacity) + tint * opacity).clamp(0, 1)
    if not labels:
        return out
    u8 = (out.numpy() * 255 + 0.5).astype(np.uint8)
    h, w = masks.shape[-2:]
    ys, xs = torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64)
    for f in range(u8.shape[0]):
        for c in range(k):
            m = masks[c, f].double()
            n = float(m.sum())
            if n:
                centre = (float((m.sum(0) * xs).sum()) / n, float((m.sum(1) * ys).sum()) / n)
                u8[f] = draw_label(u8[f], labels[c], centre=centre)
    return torch.from_numpy(u8.astype(np.float32) / 255)


__all__ = ["kmeans", "canonical", "cluster_masks", "name_clusters", "preview", "PALETTE"]
