"""Peak-memory readings for the benchmarks (Linux /proc, with a getrusage fallback).

A process's RSS high-water mark (VmHWM) includes everything it ever held: loading a
checkpoint alone can set it. `settle_and_reset_peak` brings the mark down to the current
RSS right before the work to be measured, so the peak read after it is that work's own.
"""
from __future__ import annotations

import ctypes
import resource


def status_kib(field: str) -> int | None:
    """A 'kB' field of /proc/self/status (VmRSS, VmHWM, ...), or None where unreadable."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def peak_rss_bytes() -> int:
    """This process's RSS high-water mark (VmHWM). Not getrusage's ru_maxrss: a child made
    with fork+exec starts with the parent's high-water there, which would hide its own."""
    hwm = status_kib("VmHWM")
    if hwm is not None:
        return hwm * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def settle_and_reset_peak() -> int | None:
    """Return freed heap memory to the OS (malloc_trim) and reset the RSS high-water mark
    to the current RSS (writing 5 to /proc/self/clear_refs, Linux >= 4.0). Returns that
    RSS in bytes, or None where either is not possible: then the high-water before the
    work is the baseline, which undercounts work that reuses memory freed earlier."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    hwm, rss = status_kib("VmHWM"), status_kib("VmRSS")
    if rss is None or hwm is None or hwm - rss > 1024:    # the reset did not take
        return None
    return hwm * 1024
