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
- The temperature (1 - c) and log2(e) are folded into the query (s is linear in q), so
  the logits of a block come out of the matmul already scaled and in base-2 units
  (exp2 is ~2x cheaper than exp on CPU); the raw row range is recovered as
  (mx' - mn') / |1 - c|.
- A block is all heads x a run of query rows; its logits live in one reused fp32 buffer
  and are overwritten in place: matmul, row max and min, one add per key segment (bias
  minus an upper bound of the modulated row max, so 2**x cannot overflow), exp2 in
  place, matmul with v, divide the [rows, d] result by the row sums. No softmax matrix.
  If the upper bound overshoots so far that a row underflows (row sum < 1e-20; needs a
  huge logit range), that block is redone with the exact row max.
- CPU with a C compiler: blocks of one head x FUSED_CPU_BLOCK_ROWS queries, and within
  a block the keys in chunks of FUSED_CPU_KEY_CHUNK, flash-attention style, so logits
  never leave the cache (the whole-row version above streams each block through memory
  five times). The bias of a segment needs the range of the whole row, which is only
  known after the last chunk; so each segment keeps its own running max, sum and output
  and the biases weigh the segments at the end (`_online_block`). The per-chunk update
  (row max / min, segment max, exp2 in place, sum, rescale factor) is one C kernel
  (cpu_kernel.py, kernels/online_chunk.c); the matmuls stay with torch (MKL). Without
  a compiler: the whole-row torch ops above.
- Short rows (under FUSED_CPU_MIN_KEYS keys: cross-attention's 77 text tokens, the small
  token grids) always take the whole-row torch ops, with several batch elements in one
  block (up to CPU_GROUP_BYTES of logits): a block of one head would be so little work
  that its fixed cost dominated.
- Block sizes come from a memory budget, so extra memory is O(block * Lk): linear in
  the number of frames, never quadratic.
- CPU: the blocks are shared out to torch.get_num_threads() Python threads that each
  run torch with ONE intra-op thread and pull the next block when done. Every torch op
  with 2+ threads is an OpenMP fork/join that stalls whenever another process holds a
  core; a block is ~10 ops, so the per-op version ran 8-10x slower than SDPA on a
  loaded machine. torch's thread count is process-wide for MKL: it is set back when
  the call returns (set CPU_THREADED_BLOCKS = False for the single-caller plan).
- c == 0 everywhere is plain attention and goes to the fused
  torch.nn.functional.scaled_dot_product_attention.

Tensors follow the host's projected layout: q [B, Lq, heads*d], k and v [B, Lk, heads*d].
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import cpu_kernel

DEFAULT_MEMORY_BUDGET_BYTES = 256 * 2**20   # block scratch of all workers, 2x headroom
# CPU: logits of one block of one worker (all heads; capped by the budget). Measured on a
# loaded 2-core EPYC (32 MiB L3): F=8 16 MiB 1.56x SDPA, 32 and 64 MiB 1.45x; F=16
# 32 MiB 1.48x, 64 MiB 1.40x. (Two workers: 2 x 64 MiB, within the default budget.)
CPU_BLOCK_BYTES = 64 * 2**20
MIN_CPU_BLOCK_ROWS = 32
# CPU, short rows: batch elements that share one torch block, up to this much logits.
# Modulated cross-attention (77 keys), 16 frames at 512x512, 8 heads, 2 cores, against
# SDPA on the same tensors: 64 MiB blocks 3.0x / 2.4x / 2.1x at the 32 / 16 / 8 token
# grids, 16 MiB 2.2x / 2.0x / 1.8x, 4 MiB 1.4x / 2.0x / 1.9x, 1 MiB 1.5x / 1.6x / 2.9x;
# one element per block (the fused path's plan) 6.4x / 5.8x / 15x.
CPU_GROUP_BYTES = 4 * 2**20
# CPU with the fused kernel: blocks of one head x FUSED_CPU_BLOCK_ROWS queries, keys in
# chunks of FUSED_CPU_KEY_CHUNK (a 2 MiB logits chunk: cache-resident). Measured on the
# 2-core EPYC (1 MiB L2 per core, 32 MiB L3), 2 workers, against SDPA: F=8 256x2048 1.06x,
# 128x2048 1.17x, 256x4096 1.08x; F=32 256x2048 1.04x, 128x2048 1.16x, 512x2048 1.03x.
# (Whole rows, no key chunks: F=8 1.07x but F=32 1.30x: the logits spill out of cache.)
FUSED_CPU_BLOCK_ROWS = 256
FUSED_CPU_KEY_CHUNK = 2048
# Rows shorter than this go to the torch ops even where the fused kernel is there: with few
# keys (cross-attention's 77 text tokens, the small token grids) a block of one head is so
# little work that its fixed cost dominates, and whole rows of many heads and batch
# elements in batched matmuls are faster. One batch element, 8 heads x 80, 2 cores, fused
# against torch blocks: 256 keys 11.5 vs 4.8 ms, 512 16.5 vs 11.7, 1024 42.5 vs 51.7, 2048
# 109 vs 177, 4096 383 vs 519.
FUSED_CPU_MIN_KEYS = 1024
# CPU: run blocks on torch.get_num_threads() Python worker threads, one torch thread each.
CPU_THREADED_BLOCKS = True
# CPU: keys in chunks with the fused C kernel (`_online_block`, cpu_kernel.py) where the
# machine can build it; else the whole-row torch ops in `run_block`.
CPU_FUSED_KERNEL = True
# Below this |1 - c| the temperature cannot be folded into q (it would erase the logits
# the row range is read from); such calls scale the logits after the reductions instead.
_FOLD_EPS = 1e-4
# A row whose exponentials (shifted by an upper bound of its max) sum below this lost
# precision to underflow and is recomputed with the exact max.
_MIN_ROW_SUM = 1e-20
_LOG2E = 1.4426950408889634


def full_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Plain softmax attention via the fused SDPA kernel. q [B, Lq, heads*d] -> [B, Lq, heads*d]."""
    b, lq, inner = q.shape
    d = inner // heads
    qh, kh, vh = (t.view(b, t.shape[1], heads, d).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(qh, kh, vh)
    return out.transpose(1, 2).reshape(b, lq, inner)


def block_plan(batch: int, heads: int, key_length: int, device: torch.device | str = "cpu", *,
               memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
               chunk_size: int | None = None, fused_cpu: bool = False) -> tuple[int, int]:
    """(heads per block, query rows per block) for one batch element.

    A block is accounted as two fp32 buffers of heads_per_block * rows * key_length values
    (the logits, plus as much again of headroom), so
    8 * heads_per_block * rows * key_length <= memory_budget_bytes (at least one row of
    one head, whatever the budget). All heads at once unless one row of all heads is over
    budget. GPU: rows from the budget (few, large kernels). CPU, torch ops: rows for
    CPU_BLOCK_BYTES of logits, capped by the budget (the caller passes budget / workers).
    CPU, fused kernel (`fused_cpu`): one head and FUSED_CPU_BLOCK_ROWS rows per block.
    `chunk_size` fixes the rows (still capped by the budget).
    """
    row_bytes = 2 * 4 * max(key_length, 1)   # accounted as two fp32 rows (logits + headroom)
    hpb = 1 if fused_cpu else heads
    rows = memory_budget_bytes // (row_bytes * heads)
    if rows < 1:               # one row of all heads is over budget: split heads too
        hpb = max(1, memory_budget_bytes // row_bytes)
        hpb = min(heads, hpb)
        while heads % hpb:
            hpb -= 1
        rows = 1
    if fused_cpu:
        rows = min(rows, FUSED_CPU_BLOCK_ROWS)
    elif torch.device(device).type == "cpu":
        rows = min(rows, max(MIN_CPU_BLOCK_ROWS, CPU_BLOCK_BYTES // (4 * max(key_length, 1) * hpb)))
    if chunk_size is not None:
        rows = int(chunk_size)
    rows = min(rows, memory_budget_bytes // (row_bytes * hpb))
    return hpb, max(1, rows)


def _region_signatures(regions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct rows of bool [L, S]: (signatures bool [U, S], signature id of each row [L])."""
    if regions.shape[1] == 0:   # no regions at all: one empty signature
        return regions.new_zeros((1, 0)), torch.zeros(regions.shape[0], dtype=torch.long, device=regions.device)
    s = regions.shape[1]
    if s <= 62:   # one integer per row (a bit per region): a 1-D unique, ~20x faster than dim=0
        bits = torch.arange(s, device=regions.device)
        codes = (regions.long() << bits).sum(1)
        uniq, ids = torch.unique(codes, return_inverse=True)
        return ((uniq[:, None] >> bits) & 1).bool(), ids
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
    kf = heads_first(k)
    vf = heads_first(v)

    # ---- per-row coefficients ---------------------------------------------------------
    one_minus_c = 1.0 - c                                               # temperature
    fold = bool((one_minus_c.abs() >= _FOLD_EPS).all())
    # Logits are kept in base-2 units (times log2(e)): exp2 is about twice as fast as exp
    # on CPU, and the rule is linear in s, so the result is the same.
    q_scale = (one_minus_c if fold else torch.ones_like(c)) * (_LOG2E / math.sqrt(d))
    # raw range = (mx' - mn') * range_from_block when the temperature is folded into q
    range_from_block = c / one_minus_c.abs() if fold else c

    # CPU: one worker thread per torch thread, each running whole blocks with one torch
    # thread (module docstring); each worker has its own logits buffer within the budget.
    workers = _cpu_workers(q.device)
    fused = (q.device.type == "cpu" and CPU_FUSED_KERNEL and lk >= FUSED_CPU_MIN_KEYS
             and cpu_kernel.available())
    span = min(lk, FUSED_CPU_KEY_CHUNK) if fused else lk      # logits columns a block holds
    hpb, rows = block_plan(b, heads, span, q.device, memory_budget_bytes=memory_budget_bytes // workers,
                           chunk_size=chunk_size, fused_cpu=fused)
    if workers > 1 and 8 * hpb * rows * span > memory_budget_bytes // workers:
        workers = 1             # the budget has no room for two blocks: one worker
        hpb, rows = block_plan(b, heads, span, q.device, memory_budget_bytes=memory_budget_bytes,
                               chunk_size=chunk_size, fused_cpu=fused)
    # written in the host's [B, Lq, heads, d] order, so the result needs no final copy
    out = torch.empty(b, lq, heads, d, dtype=q.dtype, device=q.device)
    qh = q.view(b, lq, heads, d).transpose(1, 2)                        # [B, heads, Lq, d] view
    seg_bounds = [(k0, k1) for _, k0, k1 in segments if k1 > k0]
    seg_ids = [u for u, k0, k1 in segments if k1 > k0]
    pos_f = positive[:, :, seg_ids].to(torch.float32).contiguous()      # [1 or B, Lq, U']
    # the temperature still to apply to the logits (1 where it is folded into q)
    kernel_temp = (torch.ones_like(c) if fold else one_minus_c).contiguous()

    def pick(t, bi):
        return t[bi if t.shape[0] > 1 else 0]

    def rows_of(t, b0, b1, r0, r1):
        """[1 or B, Lq, ...] per-row values -> [g or 1, 1, n, ...] for a block's elements and rows."""
        return (t[b0:b1] if t.shape[0] > 1 else t)[:, r0:r1].unsqueeze(1)

    def run_block(b0, b1, r0, r1, h0, h1, logits_buf):
        if fused:   # one batch element, one head, FUSED_CPU_BLOCK_ROWS rows, keys in chunks
            qb = qh[b0, h0:h1, r0:r1].to(torch.float32) * pick(q_scale, b0)[r0:r1, None]
            o = _online_block(qb, kf[b0, h0:h1], vf[b0, h0:h1], seg_bounds, pick(kernel_temp, b0)[r0:r1],
                              pick(range_from_block, b0)[r0:r1], pick(pos_f, b0)[r0:r1], logits_buf)
            out[b0, r0:r1, h0:h1] = o.transpose(0, 1)
            return
        # whole rows with torch ops: batch elements b0..b1, heads h0..h1, rows r0..r1
        qb = qh[b0:b1, h0:h1, r0:r1].to(torch.float32) * rows_of(q_scale, b0, b1, r0, r1)[..., None]
        g, nh, n = qb.shape[0], h1 - h0, r1 - r0
        s = logits_buf[:g * nh * n * lk].view(g, nh, n, lk)
        o = _torch_block(qb, kf[b0:b1, h0:h1], vf[b0:b1, h0:h1], seg_bounds,
                         None if fold else rows_of(one_minus_c, b0, b1, r0, r1),
                         rows_of(range_from_block, b0, b1, r0, r1), rows_of(pos_f, b0, b1, r0, r1), s)
        out[b0:b1, r0:r1, h0:h1] = o.transpose(1, 2)

    if fused:
        # heads outermost: consecutive blocks (taken by different workers at about the same
        # time) read the same head's keys and values, which then stay in the shared cache
        tasks = [(bi, bi + 1, r0, min(lq, r0 + rows), h0, h0 + hpb)
                 for bi in range(b) for h0 in range(0, heads, hpb) for r0 in range(0, lq, rows)]
        block_numel = hpb * rows * span
    else:
        group = _batch_group(b, hpb, heads, rows, lq, lk, q.device, memory_budget_bytes // workers)
        tasks = [(b0, min(b, b0 + group), r0, min(lq, r0 + rows), h0, h0 + hpb)
                 for b0 in range(0, b, group) for h0 in range(0, heads, hpb) for r0 in range(0, lq, rows)]
        block_numel = group * hpb * rows * lk
    workers = min(workers, len(tasks))
    if workers <= 1:
        buf = _alloc_logits(block_numel, q.device)
        for task in tasks:
            run_block(*task, buf)
    else:
        _run_threaded(run_block, tasks, [_alloc_logits(block_numel, q.device) for _ in range(workers)])
    return out.view(b, lq, inner)


def _batch_group(b: int, hpb: int, heads: int, rows: int, lq: int, lk: int, device, budget: int) -> int:
    """Batch elements per torch block. Where a block already holds whole rows of all heads
    (short keys: cross-attention, small token grids), several batch elements share it, up
    to CPU_GROUP_BYTES of logits on the CPU and within the budget (two fp32 buffers)."""
    if hpb < heads or rows < lq:
        return 1
    per_element = 4 * heads * lq * max(lk, 1)
    cap = budget // 2
    if torch.device(device).type == "cpu":
        cap = min(cap, CPU_GROUP_BYTES)
    return max(1, min(b, cap // per_element))


def _torch_block(qb, kb, vb, seg_bounds, temp, range_coef, positive, s):
    """One block with torch ops over whole rows: qb [g, h, n, d] scaled fp32 queries; kb, vb
    [g, h, Lk, d] in segment order; temp [g or 1, 1, n] the temperature still to apply
    (None where it is folded into q); range_coef [g or 1, 1, n]; positive [g or 1, 1, n, U'];
    s the logits scratch [g, h, n, Lk]. Returns the normalised output [g, h, n, d]."""
    torch.matmul(qb, kb.transpose(-1, -2), out=s)
    mx = s.amax(-1)                                                       # [g, h, n]
    mn = s.amin(-1)
    spread = mx - mn            # row range (of the folded logits when folded)
    if temp is not None:   # temperature after the reductions (it may be ~0 or negative)
        mx = torch.where(temp >= 0, mx * temp, mn * temp)                 # max of t * s
        s.mul_(temp[..., None])
    # additive bias of each segment: c * (mx - mn) on positive ones, [g, h, n, U']
    seg_bias = (spread * range_coef)[..., None] * positive
    # Shift by an upper bound of the modulated row max (no overflow), folded into the
    # bias add: one pass over the logits, then 2 ** s in place.
    row_top = mx + seg_bias.amax(-1).clamp_min(0)
    o, rowsum = _exp_matmul(s, seg_bounds, seg_bias - row_top[..., None], vb)
    if not bool((rowsum > _MIN_ROW_SUM).all()):
        # The bound overshot the true max by so much that a row underflowed (a far-off
        # positive segment with a large bias; rare): redo the block with the exact max of
        # the modulated logits.
        torch.matmul(qb, kb.transpose(-1, -2), out=s)
        if temp is not None:
            s.mul_(temp[..., None])
        for j, (k0, k1) in enumerate(seg_bounds):
            s[..., k0:k1].add_(seg_bias[..., j, None])
        s.sub_(s.amax(-1, keepdim=True))
        s.exp2_()
        o, rowsum = torch.matmul(s, vb), s.sum(-1)
    return o / rowsum[..., None]


def _online_block(qb, kb, vb, seg_bounds, temp, range_coef, positive, buf):
    """One block on the CPU, keys in chunks (flash-attention style) with the fused kernel.

    qb [h, n, d] scaled queries; kb, vb [h, Lk, d] keys / values in segment order;
    seg_bounds [(k0, k1)] the non-empty segments; temp, range_coef [n]; positive [n, U].
    Each segment u keeps m_u (running max of temp * s), sum_u and o_u (running sums of
    2 ** (temp * s - m_u) and of that times v): the bias of a segment needs the range of
    the whole row, so it is applied at the end, where
        bias_u = range_coef * (row max - row min) * positive[:, u]
        w_u    = 2 ** (m_u + bias_u - max_u (m_u + bias_u))
        out    = sum_u w_u o_u / sum_u w_u sum_u.
    Logits of one chunk live in `buf` (h * n * FUSED_CPU_KEY_CHUNK floats): memory does not
    grow with Lk."""
    chunk = FUSED_CPU_KEY_CHUNK
    h, n, d = qb.shape
    rows = h * n
    state = cpu_kernel.new_state(rows, len(seg_bounds))
    seg_max, seg_sum, row_max, row_min = state["seg_max"], state["seg_sum"], state["row_max"], state["row_min"]
    alpha = torch.empty(rows)
    acc = torch.empty(len(seg_bounds), h, n, d)
    for j, (k0, k1) in enumerate(seg_bounds):
        for c0 in range(k0, k1, chunk):
            c1 = min(k1, c0 + chunk)
            s = torch.bmm(qb, kb[:, c0:c1].transpose(1, 2), out=buf[:rows * (c1 - c0)].view(h, n, c1 - c0))
            # in place: s <- 2 ** (temp * s - m_u); m_u, sum_u, row max / min updated
            rescaled = cpu_kernel.online_chunk(s.view(rows, c1 - c0), n, temp, seg_max[j], seg_sum[j],
                                               row_max, row_min, alpha)
            if c0 == k0:
                torch.bmm(s, vb[:, c0:c1], out=acc[j])
            else:
                if rescaled:                 # the running max rose: o_u *= 2 ** (m_old - m_new)
                    acc[j].mul_(alpha.view(h, n, 1))
                acc[j].baddbmm_(s, vb[:, c0:c1])
    bias = (range_coef.repeat(h) * (row_max - row_min)) * positive.T.repeat(1, h)   # [U, rows]
    logw = seg_max + bias
    w = torch.exp2(logw - logw.amax(0))
    return (acc * w.view(-1, h, n, 1)).sum(0) / (seg_sum * w).sum(0).view(h, n, 1)


def _cpu_workers(device) -> int:
    """Worker threads for the CPU path: torch's intra-op thread count (1 on other devices)."""
    if torch.device(device).type != "cpu" or not CPU_THREADED_BLOCKS:
        return 1
    return max(1, torch.get_num_threads())


def _run_threaded(run_block, tasks, buffers) -> None:
    """Run the blocks on len(buffers) Python threads that pull them from a shared counter.

    Each worker sets torch to one intra-op thread, so a block's ~10 ops run with no
    OpenMP fork/join (which stalls whenever another process holds a core), and a worker
    whose core is busy simply takes fewer blocks. torch's thread setting is
    process-wide for MKL, so it is restored when the call ends."""
    import threading
    n_threads = torch.get_num_threads()
    # grad and inference mode are thread-local: the workers take the caller's (the host
    # runs under inference_mode, where its tensors may only be written in that mode)
    inference, grad = torch.is_inference_mode_enabled(), torch.is_grad_enabled()
    lock = threading.Lock()
    nxt = [0]
    errors = []

    def worker(buf):
        try:
            torch.set_num_threads(1)
            with torch.inference_mode(inference), torch.set_grad_enabled(grad):
                pull(buf)
        except BaseException as e:   # re-raised in the caller
            errors.append(e)

    def pull(buf):
        while not errors:
            with lock:
                i = nxt[0]
                nxt[0] += 1
            if i >= len(tasks):
                return
            run_block(*tasks[i], buf)

    threads = [threading.Thread(target=worker, args=(buf,), daemon=True) for buf in buffers]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        torch.set_num_threads(n_threads)
    if errors:
        raise errors[0]


def _exp_matmul(s: torch.Tensor, seg_bounds, seg_shift: torch.Tensor, v: torch.Tensor):
    """(2 ** (s + shift of each key segment) @ v, row sums), s overwritten by the powers.

    s [..., n, Lk] logits in base-2 units; seg_shift [..., n, U] one additive constant per
    row and segment; v [..., Lk, d]. (A column of ones in v would give the row sums from
    the matmul, but a 81-wide matmul costs more than the sum.)"""
    for j, (k0, k1) in enumerate(seg_bounds):
        s[..., k0:k1].add_(seg_shift[..., j, None])
    s.exp2_()
    return torch.matmul(s, v), s.sum(-1)


def _alloc_logits(numel: int, device) -> torch.Tensor:
    """The fp32 scratch of one block (a function so tests can watch its size)."""
    return torch.empty(numel, dtype=torch.float32, device=device)


__all__ = ["layout_attention", "full_attention", "block_plan", "DEFAULT_MEMORY_BUDGET_BYTES"]
