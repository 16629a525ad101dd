"""The fused CPU kernel for the element-wise middle of an ST-Layout attention block.

`kernels/modulated_exp2.c` (plain C, no dependencies) is compiled on first use with the
machine's C compiler into a per-user cache folder and loaded with ctypes. Where there is
no compiler (a typical Windows install), the build fails, or the self-check disagrees
with torch, `available()` is False and st_layout keeps its torch path: same results,
slower. Nothing here runs code from anywhere but this package's own source file.

Environment:
  VIDEOGRAIN_CPU_KERNEL=0     never build or use the kernel
  VIDEOGRAIN_KERNEL_DIR=path  where the compiled library is cached
                              (default: $XDG_CACHE_HOME/videograin or ~/.cache/videograin)
  CC                          the C compiler (default: cc, then gcc, then clang)
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading

import torch

log = logging.getLogger(__name__)

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels", "modulated_exp2.c")
# No -ffast-math (see the source); the two flags below only allow what the kernel does anyway.
BASE_FLAGS = ["-O3", "-fPIC", "-shared", "-fno-math-errno", "-fno-trapping-math"]

_lock = threading.Lock()
_state: dict = {}          # "fn": the ctypes function, or "error": why there is none


def kernel_dir() -> str:
    env = os.environ.get("VIDEOGRAIN_KERNEL_DIR")
    if env:
        return env
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "videograin")


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name.split()[0]):
            return name
    return None


def _cpu_signature() -> str:
    """What -march=native depends on: a cached library built on one CPU is not loaded on
    another (a home folder shared between machines)."""
    sig = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features", "model name")):
                    sig += line
    except OSError:
        pass
    return sig


def _build() -> str:
    """Path of the compiled library: the cached one for this source, flags and CPU, or a
    fresh build (the compiler is only needed then)."""
    with open(SOURCE, "rb") as f:
        source = f.read()
    folder = kernel_dir()
    options = []
    for extra in (["-march=native"], []):        # native first; some compilers lack it
        flags = BASE_FLAGS + extra
        key = hashlib.sha256(source + repr((flags, _cpu_signature())).encode()).hexdigest()[:16]
        path = os.path.join(folder, f"modulated_exp2-{key}.so")
        if os.path.exists(path):
            return path
        options.append((flags, path))
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC)")
    os.makedirs(folder, mode=0o700, exist_ok=True)
    last_error = ""
    for flags, path in options:
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
        os.close(fd)
        try:
            res = subprocess.run(cc.split() + flags + ["-o", tmp, SOURCE], capture_output=True, text=True,
                                 timeout=300)
            if res.returncode == 0:
                os.replace(tmp, path)      # atomic: another process may be building it too
                return path
            last_error = res.stderr.strip()[-2000:]
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    raise RuntimeError(f"compiling {SOURCE} with {cc} failed: {last_error}")


def _load():
    path = _build()
    lib = ctypes.CDLL(path)              # ctypes.CDLL releases the GIL during calls
    fn = lib.vg_modulated_exp2
    fn.restype = ctypes.c_int
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    fn.argtypes = [p, i64, i64, i64, p, i64, p, p, p, p]
    _self_check(fn)
    return fn


def reference(s, n, bounds, temp, range_scale, positive):
    """The same computation in torch (the kernel's self-check and the tests use it).
    s [rows, lk] -> (2 ** (modulated - row max) [rows, lk], row sums [rows]), fp64."""
    s = s.double()
    rows, lk = s.shape
    q = torch.arange(rows) % n
    t, rs, pos = temp.double()[q], range_scale.double()[q], positive.double()[q]
    spread = rs * (s.amax(-1) - s.amin(-1))
    sizes = (bounds[1:] - bounds[:-1]).tolist()
    bias = torch.repeat_interleave(spread[:, None] * pos, torch.tensor(sizes), dim=1)
    m = t[:, None] * s + bias
    e = torch.exp2(m - m.amax(-1, keepdim=True))
    return e, e.sum(-1)


def _self_check(fn) -> None:
    g = torch.Generator().manual_seed(0)
    n, heads, lk = 5, 3, 203                           # odd sizes: vector tails are exercised
    s = torch.randn(heads * n, lk, generator=g) * 20
    bounds = torch.tensor([0, 17, 150, lk], dtype=torch.int64)
    temp = torch.tensor([1.0, 0.5, -0.3, 1.0, 0.0])
    range_scale = torch.rand(n, generator=g)
    positive = (torch.rand(n, 3, generator=g) > 0.5).float()
    want, want_sum = reference(s, n, bounds, temp, range_scale, positive)
    rowsum = torch.empty(heads * n)
    got = s.clone()
    if fn(got.data_ptr(), heads * n, n, lk, bounds.data_ptr(), 3, temp.data_ptr(), range_scale.data_ptr(),
          positive.data_ptr(), rowsum.data_ptr()) != 0:
        raise RuntimeError("self-check: the kernel refused valid input")
    err = (got.double() - want).abs().max().item()
    err_sum = ((rowsum.double() - want_sum).abs() / want_sum).max().item()
    if not (err < 1e-5 and err_sum < 1e-5):
        raise RuntimeError(f"self-check: the kernel disagrees with torch (max error {err:.2e}, row sums {err_sum:.2e})")


def function():
    """The kernel's ctypes function, building it on first use; None where unavailable."""
    if "fn" not in _state and "error" not in _state:
        with _lock:
            if "fn" not in _state and "error" not in _state:
                if os.environ.get("VIDEOGRAIN_CPU_KERNEL", "1") == "0":
                    _state["error"] = "disabled by VIDEOGRAIN_CPU_KERNEL=0"
                else:
                    try:
                        _state["fn"] = _load()
                    except Exception as e:   # no compiler, build error, self-check: torch path
                        _state["error"] = f"{type(e).__name__}: {e}"
                        log.warning("VideoGrain: fused CPU attention kernel unavailable (%s); using the "
                                    "torch path (same results, slower)", _state["error"])
    return _state.get("fn")


def available() -> bool:
    return function() is not None


def unavailable_reason() -> str | None:
    function()
    return _state.get("error")


def modulated_exp2(s: torch.Tensor, n: int, bounds: torch.Tensor, temp: torch.Tensor,
                   range_scale: torch.Tensor, positive: torch.Tensor, rowsum: torch.Tensor) -> None:
    """In place: s [rows, lk] fp32 contiguous (CPU) <- 2 ** (modulated logits - row max);
    rowsum [rows] <- the row sums. bounds int64 [U+1] (no empty segment); temp, range_scale
    fp32 [n]; positive fp32 [n, U]. Row r belongs to query r % n."""
    fn = function()
    rows, lk = s.shape
    for name, t in (("s", s), ("temp", temp), ("range_scale", range_scale), ("positive", positive),
                    ("rowsum", rowsum)):
        if t.dtype != torch.float32 or not t.is_contiguous() or t.device.type != "cpu":
            raise ValueError(f"{name}: needs a contiguous fp32 CPU tensor")
    if (bounds.dtype != torch.int64 or not bounds.is_contiguous() or temp.numel() != n
            or range_scale.numel() != n or positive.shape != (n, bounds.numel() - 1) or rowsum.numel() != rows):
        raise ValueError("modulated_exp2: inconsistent shapes")
    if fn(s.data_ptr(), rows, n, lk, bounds.data_ptr(), bounds.numel() - 1, temp.data_ptr(),
          range_scale.data_ptr(), positive.data_ptr(), rowsum.data_ptr()) != 0:
        raise ValueError("modulated_exp2: segment bounds must rise from 0 to lk with no empty segment")
