"""layout_attention against a dense reference of the rule's FIRST form (METHOD.md section 2)."""
import math

import pytest
import torch
import torch.nn.functional as F

from videograin_core.attention import cpu_kernel, st_layout
from videograin_core.attention.st_layout import block_plan, full_attention, layout_attention


@pytest.fixture(autouse=True, params=["fused", "fused-tiny-chunks", "torch"])
def cpu_path(request, monkeypatch):
    """Every test runs on the CPU paths: the fused C kernel with its key chunks (default,
    and 5 keys: many chunks per segment, running maxima that rise mid-segment) and the
    plain torch ops. The fused one must really be there (a failed build fails here
    instead of passing on the fallback)."""
    fused = request.param.startswith("fused")
    if fused:
        assert cpu_kernel.available(), cpu_kernel.unavailable_reason()
    if request.param == "fused-tiny-chunks":
        monkeypatch.setattr(st_layout, "FUSED_CPU_KEY_CHUNK", 5)
    monkeypatch.setattr(st_layout, "CPU_FUSED_KERNEL", fused)
    monkeypatch.setattr(st_layout, "FUSED_CPU_MIN_KEYS", 0)  # the test sizes are all short rows
    return "fused" if fused else "torch"


def dense_reference(q, k, v, heads, q_regions, k_regions, c):
    """s' = s + P*c*(mx - s) - (1 - P)*c*(s - mn), softmax, @ v; everything in float64."""
    b, lq, inner = q.shape
    d = inner // heads
    qr = q_regions if q_regions.dim() == 3 else q_regions[None].expand(b, -1, -1)
    kr = k_regions if k_regions.dim() == 3 else k_regions[None].expand(b, -1, -1)
    c = torch.as_tensor(c, dtype=torch.float64)
    c = c if c.dim() == 2 else c[None].expand(b, -1)
    qh, kh, vh = (t.double().view(b, t.shape[1], heads, d).transpose(1, 2) for t in (q, k, v))
    s = qh @ kh.transpose(-1, -2) / math.sqrt(d)
    P = torch.zeros(b, lq, k.shape[1], dtype=torch.float64)
    for i in range(lq):                      # P[q, k] = q and k share a region
        P[:, i] = (qr[:, i, None, :] & kr).any(-1).double()
    P = P[:, None]
    cc = c[:, None, :, None]
    mx = s.amax(-1, keepdim=True)
    mn = s.amin(-1, keepdim=True)
    s2 = s + P * cc * (mx - s) - (1 - P) * cc * (s - mn)
    return (s2.softmax(-1) @ vh).transpose(1, 2).reshape(b, lq, inner)


def make(b=2, lq=37, lk=53, heads=3, d=8, regions=3, seed=0, dtype=torch.float32, batched=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, lq, heads * d, generator=g) * 2
    k = torch.randn(b, lk, heads * d, generator=g)
    v = torch.randn(b, lk, heads * d, generator=g)
    shape_q = (b, lq, regions) if batched else (lq, regions)
    shape_k = (b, lk, regions) if batched else (lk, regions)
    qr = torch.rand(shape_q, generator=g) < 0.4
    kr = torch.rand(shape_k, generator=g) < 0.4
    if regions:
        qr[..., -1] = False                  # an empty region
        kr[..., -1] = False
        qr[..., :3, :] = False               # queries in no region -> no positive key
    c = torch.rand((b, lq) if batched else (lq,), generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype), qr, kr, c


@pytest.mark.parametrize("chunk", [1, 7, None])
@pytest.mark.parametrize("batched", [False, True])
def test_matches_dense_reference(chunk, batched):
    q, k, v, qr, kr, c = make(batched=batched)
    want = dense_reference(q, k, v, 3, qr, kr, c)
    got = layout_attention(q, k, v, 3, qr, kr, c, chunk_size=chunk)
    assert got.dtype == q.dtype and got.shape == q.shape
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("batched", [False, True])
def test_batch_elements_share_torch_blocks(monkeypatch, batched):
    """Short rows on the torch path: several batch elements per block (here 2, 2 and 1 of 5)
    give the same result as the dense reference, per-element regions and c included."""
    monkeypatch.setattr(st_layout, "CPU_FUSED_KERNEL", False)
    q, k, v, qr, kr, c = make(b=5, batched=batched, seed=21)
    if batched:
        kr[:] = kr[0]                        # one key layout (as in cross-attention), per-element queries
    per_element = 4 * 3 * q.shape[1] * k.shape[1]
    monkeypatch.setattr(st_layout, "CPU_GROUP_BYTES", 2 * per_element)
    assert st_layout._batch_group(5, 3, 3, 37, 37, 53, "cpu", 2**30) == 2
    seen = []
    real = st_layout._torch_block
    monkeypatch.setattr(st_layout, "_torch_block", lambda qb, *a: seen.append(qb.shape[0]) or real(qb, *a))
    got = layout_attention(q, k, v, 3, qr, kr, c)
    assert sorted(seen) == [1, 2, 2]
    torch.testing.assert_close(got.double(), dense_reference(q, k, v, 3, qr, kr, c), atol=2e-5, rtol=2e-5)


def test_short_rows_skip_the_fused_kernel(monkeypatch):
    """Rows shorter than FUSED_CPU_MIN_KEYS go to the batched torch blocks, longer ones to
    the fused kernel (where it is built)."""
    if not cpu_kernel.available():
        pytest.skip(cpu_kernel.unavailable_reason())
    monkeypatch.setattr(st_layout, "CPU_FUSED_KERNEL", True)
    monkeypatch.setattr(st_layout, "FUSED_CPU_MIN_KEYS", 50)
    calls = {"fused": 0, "torch": 0}
    real_online, real_torch = st_layout._online_block, st_layout._torch_block
    monkeypatch.setattr(st_layout, "_online_block", lambda *a: calls.__setitem__("fused", calls["fused"] + 1) or real_online(*a))
    monkeypatch.setattr(st_layout, "_torch_block", lambda *a: calls.__setitem__("torch", calls["torch"] + 1) or real_torch(*a))
    for lk, path in ((49, "torch"), (53, "fused")):
        calls.update(fused=0, torch=0)
        q, k, v, qr, kr, c = make(lk=lk, seed=22)
        got = layout_attention(q, k, v, 3, qr, kr, c)
        assert calls[path] > 0 and calls["torch" if path == "fused" else "fused"] == 0
        torch.testing.assert_close(got.double(), dense_reference(q, k, v, 3, qr, kr, c), atol=2e-5, rtol=2e-5)


def test_chunk_size_does_not_change_the_result():
    q, k, v, qr, kr, c = make(lq=41, lk=29, seed=3)
    outs = [layout_attention(q, k, v, 3, qr, kr, c, chunk_size=n) for n in (1, 7, 41)]
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], atol=1e-6, rtol=1e-6)


def test_self_attention_shape_single_frame_and_one_query_per_key():
    # self-attention: queries and keys are the same tokens (F = 1, odd length)
    q, k, v, qr, _, c = make(b=1, lq=45, lk=45, heads=2, d=16, seed=5)
    want = dense_reference(q, k, v, 2, qr, qr, c)
    torch.testing.assert_close(layout_attention(q, k, v, 2, qr, qr, c, chunk_size=4).double(), want,
                               atol=2e-5, rtol=2e-5)


def test_c_equal_one_and_extreme_rows():
    q, k, v, qr, kr, c = make(seed=7)
    c[:5] = 1.0                              # temperature 0: the fold must not be used
    c[5:9] = 0.0
    want = dense_reference(q, k, v, 3, qr, kr, c)
    torch.testing.assert_close(layout_attention(q, k, v, 3, qr, kr, c).double(), want, atol=2e-5, rtol=2e-5)


def test_per_batch_key_layouts_differ():
    q, k, v, qr, kr, c = make(batched=True, seed=11)
    kr[1] = ~kr[1]                           # a different key layout in element 1
    want = dense_reference(q, k, v, 3, qr, kr, c)
    torch.testing.assert_close(layout_attention(q, k, v, 3, qr, kr, c, chunk_size=5).double(), want,
                               atol=2e-5, rtol=2e-5)


def test_no_regions_is_a_temperature():
    q, k, v, qr, kr, c = make(regions=0, seed=2)
    got = layout_attention(q, k, v, 3, qr, kr, c)
    want = dense_reference(q, k, v, 3, qr, kr, c)
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=2e-5)
    assert torch.isfinite(got).all()


def test_c_zero_is_sdpa():
    q, k, v, qr, kr, c = make(seed=4)
    b, lq, inner = q.shape
    heads, d = 3, inner // 3
    split = lambda t: t.view(b, -1, heads, d).transpose(1, 2)
    sdpa = F.scaled_dot_product_attention(split(q), split(k), split(v)).transpose(1, 2).reshape(b, lq, inner)
    torch.testing.assert_close(layout_attention(q, k, v, heads, qr, kr, torch.zeros(lq)), sdpa)
    torch.testing.assert_close(full_attention(q, k, v, heads), sdpa)
    torch.testing.assert_close(layout_attention(q, k, v, heads, qr, kr, None), sdpa)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    q, k, v, qr, kr, c = make(seed=9, dtype=dtype)
    got = layout_attention(q, k, v, 3, qr, kr, c, chunk_size=7)
    assert got.dtype == dtype and torch.isfinite(got).all()
    want = dense_reference(q, k, v, 3, qr, kr, c)
    tol = 2e-2 if dtype == torch.bfloat16 else 3e-3
    torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol)


def test_large_logits_no_nan():
    q, k, v, qr, kr, c = make(seed=6)
    q = q * 200                               # logits in the thousands
    got = layout_attention(q, k, v, 3, qr, kr, c)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), dense_reference(q, k, v, 3, qr, kr, c), atol=1e-4, rtol=1e-4)


def test_memory_budget_bounds_the_block(monkeypatch):
    """The only [rows, Lk] scratch comes from _alloc_logits; its size must obey the budget
    and stay linear in Lk (no [Lq, Lk] matrix for the whole input)."""
    seen = []
    real = st_layout._alloc_logits
    monkeypatch.setattr(st_layout, "_alloc_logits", lambda n, dev: seen.append(n) or real(n, dev))
    q, k, v, qr, kr, c = make(b=1, lq=64, lk=96, heads=4, d=8, seed=8)
    budget = 2 * 4 * 96 * 5                   # two fp32 buffers of 5 rows of one head
    got = layout_attention(q, k, v, 4, qr, kr, c, memory_budget_bytes=budget)
    torch.testing.assert_close(got.double(), dense_reference(q, k, v, 4, qr, kr, c), atol=2e-5, rtol=2e-5)
    assert seen and all(2 * 4 * n <= budget * 2 for n in seen)  # each of the 2 buffers: n*4 <= budget/2
    assert sum(4 * n for n in seen) <= budget
    for lk in (1000, 10_000, 100_000):
        for dev in ("cpu", "cuda"):
            hpb, rows = block_plan(1, 8, lk, dev, memory_budget_bytes=2**20)
            assert 8 * hpb * rows * lk <= max(2**20, 8 * lk)
            assert 8 % hpb == 0


def test_empty_keys_and_all_zero_c_are_safe():
    q, k, v, qr, kr, c = make(seed=1)
    empty = layout_attention(q, k[:, :0], v[:, :0], 3, qr, kr[:0], c)
    assert torch.equal(empty, torch.zeros_like(q))


@pytest.mark.parametrize("workers", [1, 3])
def test_worker_threads_match_and_restore_thread_count(monkeypatch, workers):
    """CPU blocks on several worker threads: same result as one thread, torch's thread
    count restored afterwards."""
    q, k, v, qr, kr, c = make(b=2, lq=50, lk=40, seed=12, batched=True)
    want = dense_reference(q, k, v, 3, qr, kr, c)
    monkeypatch.setattr(st_layout, "_cpu_workers", lambda dev: workers)
    threads = torch.get_num_threads()
    got = layout_attention(q, k, v, 3, qr, kr, c, chunk_size=6)
    assert torch.get_num_threads() == threads
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=2e-5)


def test_worker_error_propagates(monkeypatch, cpu_path):
    q, k, v, qr, kr, c = make(seed=13)
    monkeypatch.setattr(st_layout, "_cpu_workers", lambda dev: 2)
    boom = lambda *a: (_ for _ in ()).throw(RuntimeError("boom"))  # noqa: E731
    if cpu_path == "fused":
        monkeypatch.setattr(cpu_kernel, "online_chunk", boom)
    else:
        monkeypatch.setattr(st_layout, "_exp_matmul", boom)
    threads = torch.get_num_threads()
    with pytest.raises(RuntimeError, match="boom"):
        layout_attention(q, k, v, 3, qr, kr, c, chunk_size=5)
    assert torch.get_num_threads() == threads


def test_exact_max_fallback(monkeypatch):
    """Rows whose shifted exponentials underflow are redone with the exact row max; force
    that path for every block and check it against the reference, large logits included."""
    monkeypatch.setattr(st_layout, "_MIN_ROW_SUM", float("inf"))
    for scale in (1, 200):
        q, k, v, qr, kr, c = make(seed=14)
        q = q * scale
        c[:4] = 1.0                              # no fold
        got = layout_attention(q, k, v, 3, qr, kr, c, chunk_size=9)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), dense_reference(q, k, v, 3, qr, kr, c), atol=1e-4, rtol=1e-4)


def test_far_positive_segment_with_large_bias():
    """Positive keys far below the row max and a large bias: the upper bound of the row
    max overshoots; the result must still be finite and match the reference."""
    b, lq, lk, heads, d = 1, 6, 40, 1, 4
    q = torch.zeros(b, lq, d)
    q[..., 0] = 100.0
    k = torch.zeros(b, lk, d)
    k[0, :20, 0] = torch.linspace(-30, -29, 20)   # the positive keys: far below
    k[0, 20:, 0] = torch.linspace(0, 30, 20)      # the others: the row max is here
    v = torch.randn(b, lk, d, generator=torch.Generator().manual_seed(0))
    qr = torch.ones(lq, 1, dtype=torch.bool)
    kr = torch.zeros(lk, 1, dtype=torch.bool)
    kr[:20] = True
    c = torch.full((lq,), 0.9)
    got = layout_attention(q, k, v, heads, qr, kr, c)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), dense_reference(q, k, v, heads, qr, kr, c), atol=1e-4, rtol=1e-4)


def test_worker_threads_under_inference_mode(monkeypatch):
    """The host runs under torch.inference_mode: the workers must write its tensors in it."""
    monkeypatch.setattr(st_layout, "_cpu_workers", lambda dev: 2)
    with torch.inference_mode():
        q, k, v, qr, kr, c = make(seed=15)
        got = layout_attention(q, k, v, 3, qr, kr, c, chunk_size=8)
    torch.testing.assert_close(got.double(), dense_reference(q, k, v, 3, qr, kr, c), atol=2e-5, rtol=2e-5)
