"""The fused CPU kernel (videograin_core/attention/kernels/online_chunk.c) against torch."""
import os
import subprocess
import sys

import pytest
import torch

from videograin_core.attention import cpu_kernel

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module", autouse=True)
def kernel():
    assert cpu_kernel.available(), cpu_kernel.unavailable_reason()


def run_chunks(chunks, n, temp):
    """Feed the chunks (one segment) through the kernel and through the torch reference."""
    rows = chunks[0].shape[0]
    got_state, want_state = cpu_kernel.new_state(rows), cpu_kernel.new_state(rows)
    alpha = torch.empty(rows)
    for s in chunks:
        got = s.clone()
        rescaled = cpu_kernel.online_chunk(got, n, temp, got_state["seg_max"], got_state["seg_sum"],
                                           got_state["row_max"], got_state["row_min"], alpha)
        want, want_alpha = cpu_kernel.reference_chunk(s, n, temp, want_state)
        yield got, alpha.clone(), rescaled, want, want_alpha, got_state, want_state


@pytest.mark.parametrize("lk", [1, 7, 8, 15, 16, 17, 33, 100, 1031])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_torch_for_every_tail_length(lk, seed):
    """Chunk lengths around the 8- and 16-wide vector steps, three chunks in a row (the
    running max rises, stays, rises), temperatures folded (1), unfolded, zero, negative."""
    g = torch.Generator().manual_seed(seed)
    n, heads = 6, 2
    temp = torch.tensor([1.0, 0.7, 0.0, -0.5, 1.0, 1e-5])
    chunks = [torch.randn(heads * n, lk, generator=g) * scale for scale in (3.0, 1.0, 10.0)]
    for i, (got, alpha, rescaled, want, want_alpha, gs, ws) in enumerate(run_chunks(chunks, n, temp)):
        # fp32 arguments of size ~30 round to ~1e-6 relative; the reference is fp64
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=0)
        torch.testing.assert_close(alpha.double(), want_alpha, atol=1e-5, rtol=0)
        assert rescaled == int((want_alpha != 1).sum())
        for k in gs:
            torch.testing.assert_close(gs[k].double(), ws[k].double(), atol=1e-5, rtol=1e-5)
        if i == 0:
            assert torch.equal(alpha, torch.zeros_like(alpha))     # first chunk: nothing to rescale
        assert (got <= 1.0 + 1e-6).all() and (got >= 0).all()     # shifted by the running max


def test_exp2_accuracy_and_underflow():
    """One chunk, temperature 1: the kernel writes 2 ** (s - max s). Over the whole fp32
    exponent range the polynomial must agree with torch.exp2 to ~fp32 precision, and
    values below 2**-126 come out as exactly 0 (never denormal garbage or NaN)."""
    x = torch.linspace(-140.0, 0.0, 70001)
    ((got, *_),) = list(run_chunks([x[None].clone()], 1, torch.ones(1)))
    want = torch.exp2(x.double())
    normal = x > -125.9
    rel = ((got[0].double() - want).abs() / want)[normal]
    assert rel.max().item() < 1e-6
    assert torch.equal(got[0][x < -127.0], torch.zeros(int((x < -127.0).sum())))
    assert torch.isfinite(got).all() and (got >= 0).all()


def test_huge_logit_range_stays_finite():
    g = torch.Generator().manual_seed(3)
    chunks = [torch.randn(8, 300, generator=g) * 1e4 for _ in range(3)]
    for got, alpha, _, _, _, gs, _ in run_chunks(chunks, 4, torch.tensor([1.0, -1.0, 0.3, 0.0])):
        assert torch.isfinite(got).all() and torch.isfinite(alpha).all()
        assert all(torch.isfinite(t).all() for t in gs.values())
        assert (gs["seg_sum"] >= 0.99).all()        # the top key contributes ~2**0


def test_bad_arguments_are_refused():
    s = torch.randn(4, 10)
    st = cpu_kernel.new_state(4)
    args = dict(n=2, temp=torch.ones(2), alpha=torch.empty(4), **st)
    with pytest.raises(ValueError, match="inconsistent"):
        cpu_kernel.online_chunk(s, **{**args, "temp": torch.ones(3)})
    with pytest.raises(ValueError, match="inconsistent"):
        cpu_kernel.online_chunk(s, **{**args, "alpha": torch.empty(5)})
    with pytest.raises(ValueError, match="contiguous fp32"):
        cpu_kernel.online_chunk(s.t().contiguous().t(), **args)
    with pytest.raises(ValueError, match="contiguous fp32"):
        cpu_kernel.online_chunk(s.double(), **args)


def test_build_is_cached_per_user_and_source(tmp_path):
    """A fresh cache folder gets one library named by the source's hash, built in a private
    folder; a second process loads it without compiling again."""
    env = dict(os.environ, VIDEOGRAIN_KERNEL_DIR=str(tmp_path / "k"))
    code = ("from videograin_core.attention import cpu_kernel; import sys; "
            "sys.exit(0 if cpu_kernel.available() else cpu_kernel.unavailable_reason())")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, check=True)
    built = list((tmp_path / "k").iterdir())
    assert len(built) == 1 and built[0].name.startswith("online_chunk-") and built[0].suffix == ".so"
    assert (tmp_path / "k").stat().st_mode & 0o077 == 0
    mtime = built[0].stat().st_mtime_ns
    env["CC"] = "/nonexistent/cc"      # no compiler now: must load the cached build
    env["PATH"] = ""
    subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, check=True)
    assert [p.stat().st_mtime_ns for p in (tmp_path / "k").iterdir()] == [mtime]


def test_no_compiler_falls_back_to_torch(tmp_path):
    """No C compiler (a typical Windows install): the kernel is unavailable with a reason,
    and layout_attention still gives the right answer on the torch path."""
    env = dict(os.environ, VIDEOGRAIN_KERNEL_DIR=str(tmp_path / "empty"), PATH="", CC="")
    code = r"""
import torch
from videograin_core.attention import cpu_kernel, st_layout
assert not cpu_kernel.available()
assert "compiler" in cpu_kernel.unavailable_reason(), cpu_kernel.unavailable_reason()
g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(1, 40, 16, generator=g) for _ in range(3))
r = torch.rand(40, 2, generator=g) < 0.5
c = torch.full((40,), 0.4)
got = st_layout.layout_attention(q, k, v, 2, r, r, c)
assert torch.isfinite(got).all()
print("FALLBACK-OK")
"""
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "FALLBACK-OK" in res.stdout
    assert "using the torch path" in res.stderr          # the warning says what happens


def test_disabled_by_environment(tmp_path):
    env = dict(os.environ, VIDEOGRAIN_CPU_KERNEL="0", VIDEOGRAIN_KERNEL_DIR=str(tmp_path / "k"))
    code = ("from videograin_core.attention import cpu_kernel; assert not cpu_kernel.available(); "
            "assert 'VIDEOGRAIN_CPU_KERNEL' in cpu_kernel.unavailable_reason()")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, check=True)
    assert not (tmp_path / "k").exists()


def test_self_check_rejects_a_wrong_kernel():
    """A library that loads but computes something else (a broken compiler, a stale file)
    must be refused by the load-time self-check, so st_layout stays on the torch path."""
    def does_nothing(*args):
        return 0

    def refuses(*args):
        return -1
    with pytest.raises(RuntimeError, match="disagrees"):
        cpu_kernel._self_check(does_nothing)
    with pytest.raises(RuntimeError, match="refused"):
        cpu_kernel._self_check(refuses)
