"""Peak resident memory of a call, measured in this process (Linux: VmHWM reset via clear_refs)."""

from __future__ import annotations

import ctypes
import gc
import threading
import time


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _release_free_heap() -> None:
    """Give freed heap pages back to the OS, so an earlier run's garbage is not counted as "before"
    and then reused for free by the measured call (glibc only; a no-op elsewhere)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def measure(fn, *args, **kwargs):
    """Run fn; return (result, seconds, peak RSS in bytes during the call, RSS before in bytes)."""
    gc.collect()
    _release_free_heap()
    before = _status_kib("VmRSS")
    exact = _reset_peak()
    peak = [before]
    stop = threading.Event()

    def sample():  # fallback where the kernel cannot reset the high-water mark
        while not stop.is_set():
            peak[0] = max(peak[0], _status_kib("VmRSS"))
            time.sleep(0.002)

    sampler = None if exact else threading.Thread(target=sample, daemon=True)
    if sampler:
        sampler.start()
    t0 = time.perf_counter()
    result = fn(*args, **kwargs)
    seconds = time.perf_counter() - t0
    if sampler:
        stop.set()
        sampler.join()
    high = _status_kib("VmHWM") if exact else peak[0]
    return result, seconds, high * 1024, before * 1024
