"""How a merge runs, apart from what it merges: one frozen object per run (docs/design.md 3.1)."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class RunOptions:
    """The run settings the methods and their passes read: built once by the entry point, handed to
    core.engine.run and from there, as an argument, to the method and every pass over the source
    (``dataclasses.replace`` gives a changed copy); never changed during a pass."""

    # bytes the engine may hold for the entries it collects between passes (None: no limit); above
    # it, methods find their thresholds by radix select and merge in one more pass
    memory_budget: int | None = None
    # run the per-block work of the methods that have them through pcb_fast.cpu.fused's loops
    fused: bool = False
    # keep the thread count chosen at the start (compiled loops are specialised to it)
    fixed_threads: bool = False
    # core.threads.CpuThreads of the merge: looks at the machine between blocks (None: leave torch's setting)
    threads: Any = None
    # progress(total_bytes) -> a bar with update(nbytes) and close(), started by every pass
    progress: Callable | None = None
    # pcb_fast.io.distributed.Comm when the source is one rank's share of a distributed merge (its D is
    # then the global number of entries, its segments the local keys); None for a scope="tensor" part,
    # whose statistics live on the rank that holds the tensor
    comm: Any = None
    # where bad data is reported instead of raised, so that every rank fails together (kept per tensor)
    errors: Any = None
    # runs of small keys may share a block (core.sources.pack_segments): set only where the method's
    # values do not depend on where a key begins in its block (MethodSpec.packable) and the sink
    # writes packs
    pack_keys: bool = False


class PassBars:
    """The ``progress`` of :class:`RunOptions` from a bar factory ``make(total_bytes, description)``:
    one bar per pass, described "pass k of n: what it does"; or, for a per-tensor merge (every tensor
    runs its own passes), one bar for the whole run, advanced as each tensor is done (:meth:`tensors`).

    n is the plan: a method announces the passes it will make before its first (:func:`plan_passes`;
    without one, a run is one "merge" pass), and the run adds passes where the data decides
    otherwise (:func:`add_passes`: a sampled bracket that missed), so that k never exceeds n and the
    last bar says "pass n of n". A pass nobody planned is counted as it comes (n = k)."""

    def __init__(self, make: Callable):
        self._make, self._count, self._ahead, self._why, self._last = make, 0, [], None, "read"

    def plan(self, names) -> None:
        """The passes still to come, by what each does, in order (replacing what was planned)."""
        self._ahead = list(names)

    def add(self, names, why: str) -> None:
        """Passes the run makes before those planned (``names``; None: the last pass again), and why:
        the next bar says so."""
        self._ahead[:0] = [self._last] if names is None else list(names)
        self._why = why

    def __call__(self, total: int):
        self._count += 1
        self._last = self._ahead.pop(0) if self._ahead else "read"
        why, self._why = self._why, None
        description = f"pass {self._count} of {self._count + len(self._ahead)}: {self._last}"
        return self._make(total, description + (f" ({why})" if why else ""))

    def tensors(self, total: int, count: int):
        """One bar over the ``total`` bytes of ``count`` tensors merged one after the other."""
        return self._make(total, f"{count} tensors, each with its own statistics")


def plan_passes(options: RunOptions, *names: str) -> None:
    """Announce the passes a run will make from now on, by what each does ("sample", "merge"...),
    to its progress bars (:class:`PassBars`; nothing without them)."""
    if isinstance(options.progress, PassBars):
        options.progress.plan(names)


def add_passes(options: RunOptions, *names: str, why: str) -> None:
    """Passes a run adds before those it planned (none named: the last pass once more), and why
    (shown on the next bar)."""
    if isinstance(options.progress, PassBars):
        options.progress.add(names or None, why)


def stderr_bars(total: int, description: str, unit: str = "B"):
    """A progress factory for the command line: a tqdm bar on stderr where it is a terminal;
    elsewhere (a log, a pipe) one plain line when the work is done, no carriage returns. ``unit``:
    bytes ("B"), or what else the bar counts ("evaluation")."""
    if not sys.stderr.isatty():
        return _DoneLine(total, description, unit)
    from tqdm import tqdm

    # a terminal that reports no size (a pty nobody sized) would get no bar at all: 80 x 20 there
    try:
        sized = min(os.get_terminal_size(sys.stderr.fileno())) > 0
    except (OSError, ValueError):
        sized = False
    return tqdm(total=total, desc=description, unit=unit, unit_scale=unit == "B", unit_divisor=1024, file=sys.stderr,
                leave=False, dynamic_ncols=sized, **({} if sized else {"ncols": 80, "nrows": 20}))


class _DoneLine:
    """Progress where stderr is not a terminal: one line when the work is done."""

    def __init__(self, total: int, description: str, unit: str):
        self.total, self.description, self.unit, self.done = total, description, unit, 0
        self.started = time.perf_counter()

    def update(self, amount: int) -> None:
        self.done += amount

    def close(self) -> None:
        if self.unit == "B":
            size = f"{self.done / 2**30:.2f} GiB" if self.done >= 2**30 else f"{self.done / 2**20:.1f} MiB"
            what = f"{size} read"
        else:
            what = f"{self.done} {self.unit}{'' if self.done == 1 else 's'}"
        print(f"pcb-fast: {self.description}: {what} in {time.perf_counter() - self.started:.1f} s",
              file=sys.stderr, flush=True)
