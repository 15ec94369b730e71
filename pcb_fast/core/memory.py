"""Keeping the resident memory of a merge near what it holds (docs/design.md 3.4).

glibc's malloc gives every thread that allocates its own arena, and an arena keeps the pages of
freed chunks: the temporaries of thousands of blocks, allocated by torch's worker threads and the
reader and writer threads, left a 3 GB merge of a 2 GB budget at 6-7 GB of RSS on this machine
(1.2 GB with MALLOC_ARENA_MAX=1, a setting that belongs to the application). ``malloc_trim(0)``
returns the free pages of every arena to the operating system without changing any setting;
:class:`HeapTrimmer` calls it at most every ``interval`` seconds between blocks (a trim costs
microseconds, a millisecond when it releases gigabytes). Elsewhere than glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import time


@functools.lru_cache(maxsize=None)
def _malloc_trim():
    """glibc's malloc_trim, or None where the C library has none."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_free_memory() -> None:
    """Return the free pages of the C heap to the operating system (glibc; else nothing)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


class HeapTrimmer:
    """:func:`release_free_memory`, at most every ``interval`` seconds, and no sooner after a trim
    than ``1 / share`` times what it took (the pages a trim returns are faulted in again by the next
    blocks: at most ``share`` of the time goes to that)."""

    def __init__(self, interval: float = 0.05, share: float = 0.05):
        self.interval, self.share = interval, share
        self._next = time.monotonic() + interval

    def maybe(self) -> None:
        now = time.monotonic()
        if now >= self._next:
            release_free_memory()
            done = time.monotonic()
            self._next = done + max(self.interval, (done - now) / self.share)


def _proc_bytes(path: str, field: str, default: int) -> int:
    """A "Field: N kB" line of a /proc file in bytes, or ``default`` where /proc is absent."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return default


def peak_rss_bytes() -> int:
    """The process's peak resident memory so far (VmHWM), or 0 where /proc is absent."""
    return _proc_bytes("/proc/self/status", "VmHWM", 0)


def available_memory() -> int:
    """Memory available to new allocations (MemAvailable), or 8 GiB where /proc is absent."""
    return _proc_bytes("/proc/meminfo", "MemAvailable", 8 << 30)
