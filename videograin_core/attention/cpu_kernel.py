"""The fused CPU kernel of ST-Layout attention: the per-key-chunk online update.

`kernels/online_chunk.c` (plain C, no dependencies) is compiled on first use with the
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

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels", "online_chunk.c")
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
        path = os.path.join(folder, f"online_chunk-{key}.so")
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
    fn = lib.vg_online_chunk
    fn.restype = ctypes.c_int
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    fn.argtypes = [p, i64, i64, i64, p, p, p, p, p, p]
    _self_check(fn)
    return fn


def new_state(rows: int, segments: int | None = None) -> dict:
    """Running state before the first chunk (the starting values the C source expects):
    per segment a max and a sum ([rows], or [segments, rows] for several segments), and
    the raw row max / min."""
    seg_shape = (rows,) if segments is None else (segments, rows)
    return {"seg_max": torch.full(seg_shape, -3.4e38), "seg_sum": torch.zeros(seg_shape),
            "row_max": torch.full((rows,), -3.4e38), "row_min": torch.full((rows,), 3.4e38)}


def reference_chunk(s, n, temp, state):
    """online_chunk in plain torch (fp64 math, the state updated in place): the kernel's
    self-check and the tests compare against it. Returns (2 ** (temp * s - m_new), alpha)."""
    rows = s.shape[0]
    t = temp.double()[torch.arange(rows) % n]
    x = s.double()
    state["row_max"].copy_(torch.maximum(state["row_max"].double(), x.amax(1)))
    state["row_min"].copy_(torch.minimum(state["row_min"].double(), x.amin(1)))
    m_old = state["seg_max"].double()
    m_new = torch.maximum(m_old, (t[:, None] * x).amax(1))
    alpha = torch.exp2(m_old - m_new)
    p = torch.exp2(t[:, None] * x - m_new[:, None])
    state["seg_sum"].copy_(state["seg_sum"].double() * alpha + p.sum(1))
    state["seg_max"].copy_(m_new)
    return p, alpha


def _self_check(fn) -> None:
    """Three chunks of one segment through the kernel and through torch: they must agree."""
    g = torch.Generator().manual_seed(0)
    n, heads = 5, 3                                     # odd sizes: vector tails are exercised
    temp = torch.tensor([1.0, 0.5, -0.3, 1.0, 0.0])
    got_state, want_state = new_state(heads * n), new_state(heads * n)
    alpha = torch.empty(heads * n)
    for lk, scale in ((37, 5.0), (203, 20.0), (8, 1.0)):
        s = torch.randn(heads * n, lk, generator=g) * scale
        want, want_alpha = reference_chunk(s, n, temp, want_state)
        got = s.clone()
        if fn(got.data_ptr(), heads * n, n, lk, temp.data_ptr(), *(got_state[k].data_ptr() for k in
              ("seg_max", "seg_sum", "row_max", "row_min")), alpha.data_ptr()) < 0:
            raise RuntimeError("self-check: the kernel refused valid input")
        err = max((got.double() - want).abs().max().item(), (alpha.double() - want_alpha).abs().max().item())
        err = max([err] + [((got_state[k] - want_state[k]).abs() / want_state[k].abs().clamp_min(1)).max().item()
                           for k in got_state])
        if not err < 1e-5:
            raise RuntimeError(f"self-check: the kernel disagrees with torch (max error {err:.2e})")


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


def online_chunk(s: torch.Tensor, n: int, temp: torch.Tensor, seg_max: torch.Tensor, seg_sum: torch.Tensor,
                 row_max: torch.Tensor, row_min: torch.Tensor, alpha: torch.Tensor) -> int:
    """One key chunk (inside one segment) of the online form, in place (see the C source):
    s [rows, lk] <- 2 ** (temp * s - m_new); seg_max / seg_sum / row_max / row_min [rows]
    updated; alpha [rows] <- the factor for the segment's output accumulator. Returns the
    number of rows whose alpha is not 1."""
    fn = function()
    rows, lk = s.shape
    for name, t in (("s", s), ("temp", temp), ("seg_max", seg_max), ("seg_sum", seg_sum), ("row_max", row_max),
                    ("row_min", row_min), ("alpha", alpha)):
        if t.dtype != torch.float32 or not t.is_contiguous() or t.device.type != "cpu":
            raise ValueError(f"{name}: needs a contiguous fp32 CPU tensor")
    if temp.numel() != n or any(t.numel() != rows for t in (seg_max, seg_sum, row_max, row_min, alpha)):
        raise ValueError("online_chunk: inconsistent shapes")
    rescaled = fn(s.data_ptr(), rows, n, lk, temp.data_ptr(), seg_max.data_ptr(), seg_sum.data_ptr(),
                  row_max.data_ptr(), row_min.data_ptr(), alpha.data_ptr())
    if rescaled < 0:
        raise ValueError("online_chunk: empty chunk or no queries")
    return rescaled
