"""Trajectory attention (METHOD.md section 8, attention step), memory linear in frames.

For token i on trajectory P(i) (`chains.Trajectories`), per head, with d the head width:

    out_i = sum_{j in P(i)} softmax_j(q_i . k_j / sqrt(d)) o_j

q and k are the layer's original self-attention queries and keys, o the output of its
self-attention over all frames (before the output projection). Keys off the trajectory
are masked out, so a row has at most F keys and the step costs O(F * tokens).

How: no token x token mask is ever built. The trajectories are grouped by length L
(`Trajectories.groups`: at most F groups, every token in exactly one row). Within a group
the rows are gathered as dense [B*rows, heads, L, d] blocks of q, k and o, so each
trajectory is a small full L x L attention with nothing to mask or pad, which torch's
fused scaled_dot_product_attention runs (on 2 CPU cores, 1.5-1.7x faster than matmul-softmax-
matmul here: those need the gathered blocks copied to contiguous [heads, L, d] first).
The result is written back to the rows' tokens (each token once, no accumulation). Rows
go in chunks whose working set (gathered copies, logits, result) stays within a byte
budget, so the extra memory is the budget plus the [B, tokens, heads*d] output, whatever
F is.
Length-1 trajectories attend to themselves only: softmax of one key is exactly 1, so
their output is o itself, copied without arithmetic.

The gathered blocks are converted to float32 (float64 stays float64) before the kernel,
so the logits and the softmax accumulate in float32 whichever backend SDPA picks; the
result has o's dtype. Works on any device the index tensors can follow (`groups`
caches them per device).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .chains import Trajectories

DEFAULT_MEMORY_BUDGET_BYTES = 64 * 2**20


def chunk_rows(batch: int, heads: int, head_dim: int, length: int, input_bytes: int, compute_bytes: int,
               memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES) -> int:
    """Trajectories of length `length` per chunk, at least 1. Accounted per trajectory:
    q, k, o gathered in the input dtype and converted to the compute dtype, the result in
    both dtypes (4 x L x heads*d values of each size) and logits plus probabilities
    (2 x heads x L x L compute values), for every batch element."""
    inner = heads * head_dim
    per_row = batch * (4 * length * inner * (input_bytes + compute_bytes) + 2 * heads * length * length * compute_bytes)
    return max(1, int(memory_budget_bytes) // per_row)


def trajectory_attention(q: torch.Tensor, k: torch.Tensor, o: torch.Tensor, heads: int, traj: Trajectories, *,
                         chunk: int | None = None,
                         memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES) -> torch.Tensor:
    """Attention of every token over its own trajectory (module docstring).

    q, k, o [B, F*h*w, heads*d] in the host's all-frames order (token t*h*w + y*w + x);
    `traj` built for that F and grid. `chunk` fixes the trajectories per chunk (tests,
    tuning); otherwise `chunk_rows` sizes chunks to `memory_budget_bytes`.
    Returns [B, F*h*w, heads*d] in o's dtype.
    """
    if q.shape != k.shape or q.shape != o.shape or q.dim() != 3:
        raise ValueError(f"q, k, o must share one shape [B, tokens, heads*d], got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(o.shape)}")
    b, n, inner = q.shape
    if inner % heads:
        raise ValueError(f"{inner} channels do not split into {heads} heads")
    if n != traj.token_count:
        raise ValueError(f"{n} tokens, but the trajectories are for {traj.frames} frames of "
                         f"{traj.grid[0]}x{traj.grid[1]} ({traj.token_count} tokens)")
    d = inner // heads
    compute = torch.promote_types(q.dtype, torch.float32)
    scale = 1.0 / math.sqrt(d)
    out = torch.empty_like(o)
    in_bytes, c_bytes = q.element_size(), torch.finfo(compute).bits // 8

    for length, index in traj.groups(q.device):
        per_chunk = chunk or chunk_rows(b, heads, d, length, in_bytes, c_bytes, memory_budget_bytes)
        for start in range(0, index.shape[0], per_chunk):
            tokens = index[start:start + per_chunk].reshape(-1)           # rows x L, time order per row
            rows = tokens.numel() // length
            if length == 1:                                                # softmax of one key: o itself
                out.index_copy_(1, tokens, o.index_select(1, tokens))
                continue

            def gather(t: torch.Tensor) -> torch.Tensor:                   # -> [B*rows, heads, L, d]
                g = t.index_select(1, tokens).to(compute)
                return g.view(b * rows, length, heads, d).transpose(1, 2)

            # one full L x L attention per (trajectory, head): the fused kernel takes the
            # strided [rows, heads, L, d] views as they are, so nothing is transposed to
            # contiguous memory on the way in
            res = F.scaled_dot_product_attention(gather(q), gather(k), gather(o), scale=scale)
            out.index_copy_(1, tokens, res.transpose(1, 2).reshape(b, rows * length, inner).to(out.dtype))
    return out
