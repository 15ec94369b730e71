"""Reading ahead of the engine (docs/design.md 3.7).

A pass over checkpoints on disk knows, before it starts, every slice it will read: the blocks of
each merged key, in order. A :class:`Prefetcher` reads those slices from every checkpoint in a
background thread (``os.preadv`` releases the GIL) into a few reusable slots, and asks the kernel
to start reading the slices after them (``posix_fadvise(WILLNEED)``, through the checkpoints'
``advise``), so that the disk, the copy out of the page cache and the engine's arithmetic overlap
instead of taking turns. The engine takes the slots back in the same order; a slot is reused only
once it is released, so memory stays at ``depth`` blocks of raw inputs.
"""

from __future__ import annotations

import queue
import threading
from typing import Sequence

import torch

from .threads import halt_at_exit

_DONE = object()  # the reader has read every range


class Slot:
    """Reusable raw buffers, one per checkpoint, grown to the widest slice read into them."""

    def __init__(self, count: int):
        self._bytes = [torch.empty(0, dtype=torch.uint8) for _ in range(count)]

    def view(self, j: int, dtype: torch.dtype, m: int) -> torch.Tensor:
        """A contiguous [m] tensor of ``dtype`` over checkpoint j's buffer."""
        size = m * dtype.itemsize
        if self._bytes[j].numel() < size:
            self._bytes[j] = torch.empty(size, dtype=torch.uint8)
        return self._bytes[j][:size].view(dtype)


class Prefetcher:
    """Reads ``ranges`` ((key, lo, hi), in the order they will be asked for) from every checkpoint in
    a background thread, at most ``depth`` ranges ahead of :meth:`take`.

    ``advise_ahead``: how many ranges beyond the one being read the kernel is asked to fetch already
    (0: no hints)."""

    def __init__(self, checkpoints: Sequence, ranges: Sequence[tuple], depth: int = 4, advise_ahead: int = 8):
        self._checkpoints = list(checkpoints)
        self._ranges = list(ranges)
        self._advise_ahead = advise_ahead
        self._free: queue.Queue = queue.Queue()
        for _ in range(depth):
            self._free.put(Slot(len(self._checkpoints)))
        self._ready: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._head = None  # the next item of _ready, once looked at
        self._thread = threading.Thread(target=self._run, name="pcb_fast-reader", daemon=True)
        halt_at_exit(self)
        self._thread.start()

    def _advise(self, index: int) -> None:
        if index < len(self._ranges):
            key, lo, hi = self._ranges[index]
            for ck in self._checkpoints:
                ck.advise(key, lo, hi)

    def _run(self) -> None:
        try:
            for index in range(min(self._advise_ahead, len(self._ranges))):
                self._advise(index)
            for index, (key, lo, hi) in enumerate(self._ranges):
                slot = self._free.get()
                if slot is None or self._stop.is_set():
                    return
                if self._advise_ahead:
                    self._advise(index + self._advise_ahead)
                views = [ck.read_into(key, lo, hi, slot.view(j, ck.dtype(key), hi - lo))
                         for j, ck in enumerate(self._checkpoints)]
                self._ready.put((key, lo, hi, slot, views))
            self._ready.put(_DONE)
        except BaseException as e:  # handed to the engine's thread, which raises it
            self._ready.put(e)

    def take(self, key: str, lo: int, hi: int):
        """(slot, [one view per checkpoint]) of this range when it is the next one read ahead (waiting
        for it), else None (the caller reads it itself). Raises what the reader raised."""
        if self._head is None:
            self._head = self._ready.get()
        head = self._head
        if head is _DONE:
            return None
        if isinstance(head, BaseException):
            raise head
        if head[:3] != (key, lo, hi):
            return None
        self._head = None
        return head[3], head[4]

    def release(self, slot: Slot) -> None:
        """Give a slot back to the reader once its views are no longer used."""
        self._free.put(slot)

    def close(self) -> None:
        """Stop the reader (it finishes the slice it is reading) and wait for it; closing twice is
        harmless."""
        self._stop.set()
        self._free.put(None)
        if self._thread.is_alive():
            self._thread.join()

    halt = close  # at interpreter exit (core.threads.halt_at_exit)
