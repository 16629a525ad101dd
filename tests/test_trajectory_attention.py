"""trajectory_attention against the dense formula: the full [F*h*w, F*h*w] "same
trajectory" mask, softmax(q k^T / sqrt(d)) with everything else masked, @ o, in float64."""
import math

import pytest
import torch

from videograin_core.trajectories import attention as attn
from videograin_core.trajectories.attention import chunk_rows, trajectory_attention
from videograin_core.trajectories.chains import build_trajectories


def random_trajectories(frames, h, w, seed):
    """Trajectories of random integer motions of -1..1 cells (exits, collisions, new
    chains): lengths from 1 to F."""
    g = torch.Generator().manual_seed(seed)
    flows = torch.randint(-1, 2, (frames - 1, h, w, 2), generator=g).float()
    flows *= torch.rand(frames - 1, h, w, 1, generator=g) < 0.5     # half the cells stay
    return build_trajectories(flows, (h, w), (h, w))


def dense_reference(q, k, o, heads, same):
    """float64: softmax over the keys where same[i, j] (token i and j share a trajectory)."""
    b, n, inner = q.shape
    d = inner // heads
    qh, kh, oh = (t.double().view(b, n, heads, d).transpose(1, 2) for t in (q, k, o))
    s = qh @ kh.transpose(-1, -2) / math.sqrt(d)                    # [B, heads, N, N]
    s = s.masked_fill(~same, float("-inf"))
    return (s.softmax(-1) @ oh).transpose(1, 2).reshape(b, n, inner)


def same_trajectory_mask(traj):
    """bool [N, N] from the chains (token lists), not from the ids the function reads."""
    n = traj.token_count
    same = torch.zeros(n, n, dtype=torch.bool)
    for a, b in zip(traj.offsets[:-1].tolist(), traj.offsets[1:].tolist()):
        chain = traj.tokens[a:b]
        same[chain[:, None], chain[None, :]] = True
    return same


def inputs(b, n, heads, d, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, n, heads * d, generator=g, dtype=torch.float64) * 2     # peaked softmaxes too
    k = torch.randn(b, n, heads * d, generator=g, dtype=torch.float64)
    o = torch.randn(b, n, heads * d, generator=g, dtype=torch.float64)
    return q.to(dtype), k.to(dtype), o.to(dtype)


@pytest.mark.parametrize("frames", [1, 2, 5, 16])
@pytest.mark.parametrize("grid", [(3, 5), (7, 7)])
@pytest.mark.parametrize("chunk", [None, 3])
def test_matches_dense_masked_attention(frames, grid, chunk):
    h, w = grid
    traj = random_trajectories(frames, h, w, seed=frames * 100 + h)
    if frames >= 5:
        assert len(traj.groups()) >= 3          # several lengths, hence several groups
    heads, d = 4, 6
    same = same_trajectory_mask(traj)
    for dtype in (torch.float64, torch.float32):
        q, k, o = inputs(2, traj.token_count, heads, d, seed=frames, dtype=dtype)
        got = trajectory_attention(q, k, o, heads, traj, chunk=chunk)
        assert got.dtype == dtype and got.shape == o.shape
        want = dense_reference(q, k, o, heads, same)
        assert torch.allclose(got.double(), want, atol=1e-5, rtol=0), (got.double() - want).abs().max()


def test_length_one_trajectories_return_o_and_chunks_do_not_matter():
    traj = random_trajectories(1, 3, 5, seed=0)
    q, k, o = inputs(2, 15, 2, 3, seed=1)
    assert torch.equal(trajectory_attention(q, k, o, 2, traj), o)
    traj = random_trajectories(6, 4, 3, seed=2)
    q, k, o = inputs(2, traj.token_count, 2, 5, seed=3)
    ref = trajectory_attention(q, k, o, 2, traj)
    for chunk in (1, 2, 7, 10**6):
        assert torch.allclose(trajectory_attention(q, k, o, 2, traj, chunk=chunk), ref, atol=1e-12, rtol=0)
    tiny = trajectory_attention(q, k, o, 2, traj, memory_budget_bytes=1)     # one trajectory per chunk
    assert torch.allclose(tiny, ref, atol=1e-12, rtol=0)


def test_each_call_sees_only_its_trajectories_and_fits_the_budget(monkeypatch):
    traj = random_trajectories(8, 5, 6, seed=4)
    heads, d, b = 2, 4, 2
    q, k, o = inputs(b, traj.token_count, heads, d, seed=5, dtype=torch.float32)
    seen = []
    real = attn.F.scaled_dot_product_attention

    def spy(qq, kk, vv, **kw):
        seen.append(tuple(qq.shape))
        return real(qq, kk, vv, **kw)

    monkeypatch.setattr(attn.F, "scaled_dot_product_attention", spy)
    budget = 20_000
    trajectory_attention(q, k, o, heads, traj, memory_budget_bytes=budget)
    lengths = traj.lengths
    # blocks of [B*rows, heads, L <= F keys, d]: never more keys than a trajectory has
    assert seen and all(s[1] == heads and 2 <= s[2] <= 8 and s[3] == d for s in seen)
    # every trajectory longer than 1 went through exactly once
    assert sum(s[0] for s in seen) == b * int((lengths > 1).sum())
    for rows_b, _, length, _ in seen:
        rows = rows_b // b
        assert rows <= chunk_rows(b, heads, d, length, 4, 4, budget)
        # the fp32 q, k, o and result blocks alone fit the budget (unless one row is over it)
        assert rows == 1 or rows * b * 4 * length * heads * d * 4 <= budget
    assert max(s[0] for s in seen) > b      # the budget allowed several rows somewhere


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_accumulate_in_float32(dtype):
    traj = random_trajectories(5, 3, 5, seed=6)
    heads, d = 2, 8
    q, k, o = inputs(2, traj.token_count, heads, d, seed=7, dtype=dtype)
    got = trajectory_attention(q, k, o, heads, traj, chunk=4)
    assert got.dtype == dtype
    want = dense_reference(q, k, o, heads, same_trajectory_mask(traj))    # from the rounded inputs
    eps = torch.finfo(dtype).eps
    # only the final rounding to the half type (|out| < 4 here) may differ
    assert (got.double() - want).abs().max() <= 4 * eps


def test_shape_errors():
    traj = random_trajectories(2, 3, 5, seed=0)
    q, k, o = inputs(1, 30, 2, 4, seed=0)
    with pytest.raises(ValueError, match="heads"):
        trajectory_attention(q, k, o, 3, traj)
    with pytest.raises(ValueError, match="30 tokens"):
        trajectory_attention(q, k, o, 2, random_trajectories(3, 3, 5, seed=0))
    with pytest.raises(ValueError, match="share one shape"):
        trajectory_attention(q, k[:, :20], o, 2, traj)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_matches_dense(dtype):
    traj = random_trajectories(16, 7, 7, seed=8)
    heads, d = 4, 8
    q, k, o = inputs(2, traj.token_count, heads, d, seed=9, dtype=dtype)
    got = trajectory_attention(q.cuda(), k.cuda(), o.cuda(), heads, traj, chunk=5)
    assert got.device.type == "cuda" and got.dtype == dtype
    want = dense_reference(q, k, o, heads, same_trajectory_mask(traj))
    tol = 1e-5 if dtype == torch.float32 else 4 * torch.finfo(dtype).eps
    assert (got.cpu().double() - want).abs().max() <= tol
