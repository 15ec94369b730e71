"""How a merge runs, apart from what it merges: one frozen object per run (docs/design.md 3.1)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class RunOptions:
    """The run settings a source's passes and the methods read; set once by the entry point that
    builds the source (``dataclasses.replace`` gives a changed copy), never changed during a pass."""

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
    # then the global number of entries, its segments the local keys); None in a scope="tensor" view,
    # whose statistics live on the rank that holds the tensor
    comm: Any = None
    # where bad data is reported instead of raised, so that every rank fails together (kept by views)
    errors: Any = None


def numbered_passes(progress: Callable) -> Callable:
    """A ``progress(total_bytes)`` for :class:`RunOptions` from a ``progress(total_bytes, description)``
    that makes one bar per pass, named "pass 1", "pass 2", ..."""
    count = [0]

    def bar(total):
        count[0] += 1
        return progress(total, f"pass {count[0]}")

    return bar
