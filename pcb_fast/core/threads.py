"""How many threads the CPU engine runs on, chosen for the machine as it is (docs/design.md 3.6).

The eager engine runs thousands of small torch ops per merge, each its own OpenMP parallel region
that ends in a barrier. When another process holds a core, every barrier waits for a descheduled
thread: on a 2-core machine next to another PyTorch job a merge took 20-80x its idle time, while
the same merge on one thread took 2x. So with ``threads="auto"`` (the default) the engine counts,
every quarter second, the threads of *other* processes that are runnable right now (``procs_running``
of /proc/stat, minus this process's own running threads) and uses the cores they leave free, at
least one. An integer pins the count. The setting is torch's (``torch.set_num_threads``): it is
changed for the duration of a merge only and restored afterwards, also when the merge fails.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import time
import weakref

import torch

from .checks import short

ADAPT_SECONDS = 0.25  # how often "auto" looks at the machine again (a few reads of /proc: ~0.1 ms)


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _own_running_threads() -> int:
    """Threads of this process in state R (running or runnable), from /proc/self/task/*/stat."""
    count = 0
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return 1
    for tid in tasks:
        try:
            with open(f"/proc/self/task/{tid}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        count += fields[:1] == [b"R"]
    return max(count, 1)  # at least the thread reading this


def runnable_elsewhere() -> int | None:
    """Threads of other processes that are runnable right now, or None where /proc cannot tell."""
    try:
        with open("/proc/stat", "rb") as f:
            running = next(int(line.split()[1]) for line in f if line.startswith(b"procs_running"))
    except (OSError, StopIteration, ValueError, IndexError):
        return None
    return max(0, running - _own_running_threads())


def max_threads() -> int:
    """The most threads a merge may ask for: four per CPU (torch and OpenMP fail, or crash, on team
    sizes far beyond the machine's; more threads than CPUs never helps)."""
    return 4 * max(usable_cores(), os.cpu_count() or 1)


def check_threads(threads) -> str | int:
    """``"auto"`` or a number of threads from 1 to :func:`max_threads`."""
    if isinstance(threads, str) and threads == "auto":
        return threads
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads={short(threads)} is not valid; use 'auto' or a positive number of threads")
    if threads > max_threads():
        raise ValueError(f"threads={threads} is out of range; valid: 'auto' or 1 to {max_threads()} (four per CPU "
                         "of this machine)")
    return threads


def room_for_io(threads) -> bool:
    """Whether a merge with this ``threads`` setting may run its reader and writer threads beside
    torch's: always with "auto" (which leaves the cores other processes hold, looked at again
    between blocks), but not when torch's threads are pinned to every usable core, where an I/O
    thread waking up would park one of them and stall every parallel region behind it
    (docs/benchmarks.md has the measurement)."""
    return threads == "auto" or threads < usable_cores()


class CpuThreads:
    """Context manager: torch's thread count for one merge, restored on exit.

    ``threads="auto"``: the usable cores minus the other processes' runnable threads (median of three
    looks), at least one, looked at again by :meth:`adapt` (which the sources call once per block)
    every :data:`ADAPT_SECONDS`; an int: that many threads.
    """

    def __init__(self, threads="auto"):
        self.threads = check_threads(threads)
        self.cores = usable_cores()
        self._saved = None
        self._last = 0.0
        self.history = []  # the counts chosen, in order (for reports and tests)

    def choose(self) -> int:
        if self.threads != "auto":
            return self.threads
        looks = []
        for _ in range(3):
            others = runnable_elsewhere()
            if others is None:
                return self.cores
            looks.append(others)
        return max(1, self.cores - sorted(looks)[1])

    def adapt(self, force: bool = False) -> None:
        """Look at the machine again if it is time to (or ``force``), and set torch's thread count."""
        now = time.monotonic()
        if not force and (self.threads != "auto" or now - self._last < ADAPT_SECONDS):
            return
        self._last = now
        count = self.choose()
        if not self.history or self.history[-1] != count:
            self.history.append(count)
        if torch.get_num_threads() != count:
            torch.set_num_threads(count)

    def __enter__(self) -> "CpuThreads":
        self._saved = torch.get_num_threads()
        self.adapt(force=True)
        return self

    def __exit__(self, *exc) -> None:
        if torch.get_num_threads() != self._saved:
            torch.set_num_threads(self._saved)


@contextlib.contextmanager
def one_thread():
    """torch on one thread for the enclosed ops, restored after: for reductions whose rounding would
    otherwise depend on the thread count (torch splits a sum longer than its grain size, 32768, into
    one part per thread)."""
    threads = torch.get_num_threads()
    if threads != 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if threads != 1:
            torch.set_num_threads(threads)


_WORKERS: "weakref.WeakSet" = weakref.WeakSet()


def halt_at_exit(worker) -> None:
    """Have ``worker.halt()`` called at interpreter exit if it is still alive then. pcb_fast's I/O
    threads (reader, writer) are daemons that call into torch; one still running when the
    interpreter finalizes is killed inside torch's C++ and aborts the process ("terminate called
    without an active exception"). A signal can land between a thread's start and the code that
    would stop it, so this is the net under every path. atexit runs before daemon threads die."""
    _WORKERS.add(worker)


@atexit.register
def _halt_workers() -> None:
    for worker in list(_WORKERS):
        try:
            worker.halt()
        except Exception:  # noqa: BLE001 (exiting: nothing left to report to)
            pass
