"""The fused CPU kernel (videograin_core/kernels/modulated_exp2.c) against torch."""
import os
import subprocess
import sys

import pytest
import torch

from videograin_core import cpu_kernel

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module", autouse=True)
def kernel():
    assert cpu_kernel.available(), cpu_kernel.unavailable_reason()


def run_kernel(s, n, bounds, temp, range_scale, positive):
    got = s.clone()
    rowsum = torch.empty(s.shape[0])
    cpu_kernel.modulated_exp2(got, n, bounds, temp, range_scale, positive, rowsum)
    return got, rowsum


@pytest.mark.parametrize("lk", [1, 7, 8, 15, 16, 17, 33, 100, 1031])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_torch_for_every_tail_length(lk, seed):
    """Row lengths around the 8- and 16-wide vector steps, several segments (some of a
    single key), temperatures folded (1), unfolded, zero and negative."""
    g = torch.Generator().manual_seed(seed)
    n, heads = 6, 2
    cuts = sorted(set(torch.randint(1, lk, (3,), generator=g).tolist())) if lk > 1 else []
    bounds = torch.tensor([0] + cuts + [lk], dtype=torch.int64)
    nseg = bounds.numel() - 1
    s = torch.randn(heads * n, lk, generator=g) * 10
    temp = torch.tensor([1.0, 0.7, 0.0, -0.5, 1.0, 1e-5])
    range_scale = torch.rand(n, generator=g) * 2
    positive = (torch.rand(n, nseg, generator=g) > 0.5).float()
    got, rowsum = run_kernel(s, n, bounds, temp, range_scale, positive)
    want, want_sum = cpu_kernel.reference(s, n, bounds, temp, range_scale, positive)
    # fp32 arguments of size ~100 (logits x10, biases up to 2x the row range) round to
    # ~1e-5 relative; the reference is fp64
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=0)
    torch.testing.assert_close(rowsum.double(), want_sum, atol=0, rtol=1e-5)
    assert (rowsum >= 1.0 - 1e-5).all()        # the exact max: the top key contributes 2**0 (+- rounding)


def test_exp2_accuracy_and_underflow():
    """One segment, temperature 1, no bias: the kernel is 2 ** (s - max s). Over the whole
    fp32 exponent range the polynomial must agree with torch.exp2 to ~fp32 precision,
    and values below 2**-126 come out as exactly 0 (never denormal garbage or NaN)."""
    x = torch.linspace(-140.0, 0.0, 70001)
    s = x[None].clone()
    got, rowsum = run_kernel(s, 1, torch.tensor([0, x.numel()]), torch.ones(1), torch.zeros(1),
                             torch.zeros(1, 1))
    want = torch.exp2(x.double())
    normal = x > -125.9
    rel = ((got[0].double() - want).abs() / want)[normal]
    assert rel.max().item() < 1e-6
    assert torch.equal(got[0][x < -127.0], torch.zeros(int((x < -127.0).sum())))
    assert torch.isfinite(got).all() and (got >= 0).all()
    assert rowsum.item() == pytest.approx(want[normal].sum().item(), rel=1e-5)


def test_huge_logit_range_stays_finite():
    g = torch.Generator().manual_seed(3)
    s = torch.randn(8, 300, generator=g) * 1e4
    bounds = torch.tensor([0, 100, 300])
    got, rowsum = run_kernel(s, 4, bounds, torch.tensor([1.0, -1.0, 0.3, 0.0]), torch.ones(4),
                             torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]]))
    assert torch.isfinite(got).all() and torch.isfinite(rowsum).all()
    assert (rowsum >= 0.99).all()              # the top key ~2**0 (fp32 rounding at 1e5 is ~1e-2)


def test_bad_arguments_are_refused():
    s = torch.randn(4, 10)
    ok = dict(n=2, bounds=torch.tensor([0, 4, 10]), temp=torch.ones(2), range_scale=torch.ones(2),
              positive=torch.ones(2, 2))
    with pytest.raises(ValueError, match="segment bounds"):
        run_kernel(s, **{**ok, "bounds": torch.tensor([0, 4, 4, 10]), "positive": torch.ones(2, 3)})
    with pytest.raises(ValueError, match="segment bounds"):
        run_kernel(s, **{**ok, "bounds": torch.tensor([0, 4, 9])})
    with pytest.raises(ValueError, match="inconsistent"):
        run_kernel(s, **{**ok, "positive": torch.ones(2, 3)})
    with pytest.raises(ValueError, match="contiguous fp32"):
        cpu_kernel.modulated_exp2(s.t().contiguous().t(), 2, ok["bounds"], ok["temp"], ok["range_scale"],
                                  ok["positive"], torch.empty(4))
    with pytest.raises(ValueError, match="contiguous fp32"):
        cpu_kernel.modulated_exp2(s.double(), 2, ok["bounds"], ok["temp"], ok["range_scale"],
                                  ok["positive"], torch.empty(4))


def test_build_is_cached_per_user_and_source(tmp_path):
    """A fresh cache folder gets one library named by the source's hash, built in a private
    folder; a second process loads it without compiling again."""
    env = dict(os.environ, VIDEOGRAIN_KERNEL_DIR=str(tmp_path / "k"))
    code = ("from videograin_core import cpu_kernel; import sys; "
            "sys.exit(0 if cpu_kernel.available() else cpu_kernel.unavailable_reason())")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, check=True)
    built = list((tmp_path / "k").iterdir())
    assert len(built) == 1 and built[0].name.startswith("modulated_exp2-") and built[0].suffix == ".so"
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
from videograin_core import cpu_kernel, st_layout
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
    code = ("from videograin_core import cpu_kernel; assert not cpu_kernel.available(); "
            "assert 'VIDEOGRAIN_CPU_KERNEL' in cpu_kernel.unavailable_reason()")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, check=True)
    assert not (tmp_path / "k").exists()
