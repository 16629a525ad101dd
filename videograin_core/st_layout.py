"""ST-Layout attention: softmax attention with layout-modulated logits, in bounded memory.

The rule (METHOD.md section 2), per query row with logits s = q.k / sqrt(d):

    mx, mn = max_k s, min_k s                       (over ALL keys of the row)
    s'     = s + P * c * (mx - s) - (1 - P) * c * (s - mn)
           = (1 - c) * s + c * (mx - mn) * P  +  (per-row constant, ignored by softmax)
    out    = softmax_k(s') @ v

P[q, k] = 1 iff the query and the key share at least one region.

How it is computed without an [Lq, Lk] matrix for the whole input
- Keys are grouped by their region *signature* (the set of regions a key belongs to).
  Distinct signatures are few (U, a handful), so the keys (with their values) are
  permuted once so that each signature is one contiguous segment. Softmax attention is
  invariant to a permutation of the keys, so nothing needs to be undone afterwards.
  For a query, P is then constant on every segment: P[q, segment u] = A[q, u], where
  A = "does q share a region with signature u" is a tiny [Lq, U] table. The bias
  c * (mx - mn) * P becomes one per-row scalar added to a slice of the logits: no
  positive map is ever materialised, not even per chunk.
- The temperature (1 - c) is folded into the query (s is linear in q), so the logits of
  a block come out of the matmul already scaled, and the raw row range is recovered
  as (mx' - mn') / |1 - c|.
- Queries are processed in blocks; a block's logits live in one reused fp32 buffer (plus
  one for the softmax). Block sizes come from a memory budget, so extra memory is
  O(block * Lk): linear in the number of frames, never quadratic.
- c == 0 everywhere is plain attention and goes to the fused
  torch.nn.functional.scaled_dot_product_attention.

Tensors follow the host's projected layout: q [B, Lq, heads*d], k and v [B, Lk, heads*d].
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

DEFAULT_MEMORY_BUDGET_BYTES = 256 * 2**20   # logits + softmax buffers of one block
# On CPU a block's logits should stay in the last-level cache between the matmul, the
# reductions and the softmax; a few MiB per block measured fastest (2-core EPYC, 32 MiB L3).
CPU_BLOCK_BYTES = 8 * 2**20
MIN_CPU_BLOCK_ROWS = 32
CPU_HEADS_PER_BLOCK = 1   # 0: all heads per block, rows from the budget (as on GPU)
# Below this |1 - c| the temperature cannot be folded into q (it would erase the logits
# the row range is read from); such calls scale the logits after the reductions instead.
_FOLD_EPS = 1e-4


def full_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Plain softmax attention via the fused SDPA kernel. q [B, Lq, heads*d] -> [B, Lq, heads*d]."""
    b, lq, inner = q.shape
    d = inner // heads
    qh, kh, vh = (t.view(b, t.shape[1], heads, d).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(qh, kh, vh)
    return out.transpose(1, 2).reshape(b, lq, inner)


def block_plan(batch: int, heads: int, key_length: int, device: torch.device | str = "cpu", *,
               memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
               chunk_size: int | None = None) -> tuple[int, int]:
    """(heads per block, query rows per block) for one batch element.

    A block holds two fp32 buffers of heads_per_block * rows * key_length values (logits
    and softmax), so 8 * heads_per_block * rows * key_length <= memory_budget_bytes
    (at least one row of one head, whatever the budget).
    GPU: all heads at once (few, large kernels). CPU: one head at a time with blocks sized
    for the cache (the matmul / reduction / softmax passes then run from cache), capped
    by the budget. `chunk_size` fixes the rows (still capped by the budget).
    """
    row_bytes = 2 * 4 * max(key_length, 1)   # logits + softmax, fp32
    if torch.device(device).type == "cpu" and CPU_HEADS_PER_BLOCK:
        hpb = min(heads, CPU_HEADS_PER_BLOCK)
        while heads % hpb:
            hpb -= 1
        rows = max(MIN_CPU_BLOCK_ROWS, CPU_BLOCK_BYTES // (row_bytes * hpb))
    else:
        hpb = heads
        rows = memory_budget_bytes // (row_bytes * heads)
        if rows < 1:               # one row of all heads is over budget: split heads too
            hpb = max(1, memory_budget_bytes // row_bytes)
            hpb = min(heads, hpb)
            while heads % hpb:
                hpb -= 1
            rows = 1
    if chunk_size is not None:
        rows = int(chunk_size)
    rows = min(rows, memory_budget_bytes // (row_bytes * hpb))
    return hpb, max(1, rows)


def _region_signatures(regions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct rows of bool [L, S]: (signatures bool [U, S], signature id of each row [L])."""
    if regions.shape[1] == 0:   # no regions at all: one empty signature
        return regions.new_zeros((1, 0)), torch.zeros(regions.shape[0], dtype=torch.long, device=regions.device)
    sig, ids = torch.unique(regions.to(torch.uint8), dim=0, return_inverse=True)
    return sig.bool(), ids


def layout_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                     q_regions: torch.Tensor, k_regions: torch.Tensor, c: torch.Tensor | float | None, *,
                     chunk_size: int | None = None,
                     memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES) -> torch.Tensor:
    """Layout-modulated attention (module docstring), chunked over queries.

    q [B, Lq, heads*d], k / v [B, Lk, heads*d]; q_regions bool [Lq, S] or [B, Lq, S];
    k_regions bool [Lk, S] or [B, Lk, S]; c float [Lq] or [B, Lq] (or a scalar, or None
    for no modulation). Returns [B, Lq, heads*d] in q's dtype. Logits are fp32.
    """
    b, lq, inner = q.shape
    lk = k.shape[1]
    d = inner // heads
    if c is None:
        return full_attention(q, k, v, heads)
    c = torch.as_tensor(c, device=q.device, dtype=torch.float32)
    if c.dim() == 0:
        c = c.expand(lq)
    if not bool(c.any()):
        return full_attention(q, k, v, heads)
    if lk == 0:
        return q.new_zeros(q.shape)
    c = c[None] if c.dim() == 1 else c                                   # [1 or B, Lq]
    q_regions = q_regions.bool().to(q.device)
    k_regions = k_regions.bool().to(q.device)
    q_regions = q_regions[None] if q_regions.dim() == 2 else q_regions   # [1 or B, Lq, S]
    if k_regions.dim() == 3:
        if k_regions.shape[0] == 1 or bool((k_regions == k_regions[:1]).all()):
            k_regions = k_regions[0]
        else:
            # Different key layouts per batch element (e.g. per-frame attention): the key
            # permutation differs, so run the elements one by one.
            outs = []
            for i in range(b):
                outs.append(layout_attention(
                    q[i:i + 1], k[i:i + 1], v[i:i + 1], heads,
                    q_regions[i if q_regions.shape[0] > 1 else 0], k_regions[i],
                    c[i if c.shape[0] > 1 else 0], chunk_size=chunk_size, memory_budget_bytes=memory_budget_bytes))
            return torch.cat(outs, 0)
    if q_regions.shape[-2] != lq or k_regions.shape[0] != lk or q_regions.shape[-1] != k_regions.shape[-1]:
        raise ValueError(f"region shapes {tuple(q_regions.shape)} / {tuple(k_regions.shape)} do not match "
                         f"Lq={lq}, Lk={lk}")

    # ---- key segments: keys sorted by region signature -------------------------------
    signatures, key_sig = _region_signatures(k_regions)                 # [U, S], [Lk]
    n_sig = signatures.shape[0]
    # A[b, q, u]: the query shares a region with signature u (a tiny matmul over regions).
    positive = (q_regions.float() @ signatures.float().T) > 0           # [1 or B, Lq, U]
    if n_sig > 1:
        order = torch.argsort(key_sig, stable=True)
        counts = torch.bincount(key_sig, minlength=n_sig).tolist()
    else:
        order, counts = None, [lk]
    segments, start = [], 0
    for u, n in enumerate(counts):
        segments.append((u, start, start + n))
        start += n

    # k, v as fp32 [B, heads, Lk, d] in segment order (one copy each, linear in Lk).
    def heads_first(t):
        t = t.view(b, lk, heads, d).transpose(1, 2)
        t = t.index_select(2, order) if order is not None else t
        return t.to(torch.float32).contiguous()
    kf, vf = heads_first(k), heads_first(v)

    # ---- per-row coefficients ---------------------------------------------------------
    one_minus_c = 1.0 - c                                               # temperature
    fold = bool((one_minus_c.abs() >= _FOLD_EPS).all())
    q_scale = one_minus_c / math.sqrt(d) if fold else torch.full_like(c, 1.0 / math.sqrt(d))
    # raw range = (mx' - mn') * range_from_block when the temperature is folded into q
    range_from_block = c / one_minus_c.abs() if fold else c

    hpb, rows = block_plan(b, heads, lk, q.device, memory_budget_bytes=memory_budget_bytes,
                           chunk_size=chunk_size)
    logits_buf = _alloc_logits(hpb * rows * lk, q.device)
    probs_buf = _alloc_logits(hpb * rows * lk, q.device)
    # written in the host's [B, Lq, heads, d] order, so the result needs no final copy
    out = torch.empty(b, lq, heads, d, dtype=q.dtype, device=q.device)
    qh = q.view(b, lq, heads, d).transpose(1, 2)                        # [B, heads, Lq, d] view

    for bi in range(b):
        pos_b = positive[bi if positive.shape[0] > 1 else 0]            # [Lq, U]
        scale_b = q_scale[bi if q_scale.shape[0] > 1 else 0]
        range_b = range_from_block[bi if range_from_block.shape[0] > 1 else 0]
        temp_b = one_minus_c[bi if one_minus_c.shape[0] > 1 else 0]
        for r0 in range(0, lq, rows):
            r1 = min(lq, r0 + rows)
            n = r1 - r0
            pos_blk = pos_b[r0:r1]
            # segments some query of this block is positive with (host sync, tiny)
            live = [seg for seg, any_pos in zip(segments, pos_blk.any(0).tolist()) if any_pos]
            bias_coef = range_b[r0:r1, None]                             # [n, 1]
            for h0 in range(0, heads, hpb):
                h1 = h0 + hpb
                # logits of the block, temperature already applied (fold) or not
                qb = qh[bi, h0:h1, r0:r1].to(torch.float32) * scale_b[r0:r1, None]
                s = torch.bmm(qb, kf[bi, h0:h1].transpose(1, 2),
                              out=logits_buf[:hpb * n * lk].view(hpb, n, lk))
                if live:
                    spread = s.amax(-1) - s.amin(-1)                     # [hpb, n]: row range over all keys
                    if not fold:
                        s.mul_(temp_b[r0:r1, None])
                    bias = spread[..., None] * bias_coef                  # c * (mx - mn), [hpb, n, 1]
                    for u, k0, k1 in live:
                        s[..., k0:k1].add_(bias * pos_blk[:, u, None])
                elif not fold:
                    s.mul_(temp_b[r0:r1, None])
                p = probs_buf[:hpb * n * lk].view(hpb, n, lk)
                torch.softmax(s, dim=-1, out=p)
                o = torch.bmm(p, vf[bi, h0:h1])
                out[bi, r0:r1, h0:h1] = o.transpose(0, 1)
    return out.view(b, lq, inner)


def _alloc_logits(numel: int, device) -> torch.Tensor:
    """The fp32 scratch of one block (a function so tests can watch its size)."""
    return torch.empty(numel, dtype=torch.float32, device=device)


__all__ = ["layout_attention", "full_attention", "block_plan", "DEFAULT_MEMORY_BUDGET_BYTES"]
