"""Writing behind the engine (docs/design.md 3.7): a thread that puts merged slices into the output
shards while the engine computes the next ones, and starts their write-back to disk as it goes.

``pwritev`` releases the GIL, so the copy into the page cache overlaps the engine's arithmetic.
Every ``sync_every`` bytes written, a third thread (:class:`Syncer`) flushes the shards written so
far (``fdatasync``) while the writer thread writes the next bytes: the disk writes while the merge
runs, and the flush before the folder is published (the shards' ``fsync`` at close, which stays)
finds little left to do. At most ``max_pending`` bytes wait in the queue (the writer then makes the
engine wait), so memory stays bounded. A write or flush error is raised in the engine's thread at
its next write or at :meth:`WriteBehind.close`.
"""

from __future__ import annotations

import os
import queue
import threading

import torch

from ..core.threads import halt_at_exit
from .safetensors import Finished

_STOP = object()


class WriteBehind(Finished):
    """Wraps a :class:`pcb_fast.io.safetensors.ShardedWriter`: the same ``write``, ``close``, ``abort``
    and ``with`` block, with the writes made by a background thread in the order they were given."""

    def __init__(self, writer, max_pending: int = 16 << 20, sync_every: int = 16 << 20):
        self.writer = writer
        self._syncer = Syncer(writer.files)
        self._queue: queue.Queue = queue.Queue()
        self._room = threading.Condition()
        self._pending = 0
        self._max_pending = max_pending
        self._sync_every = sync_every
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="pcb_fast-writer", daemon=True)
        halt_at_exit(self)
        self._thread.start()

    def _run(self) -> None:
        unsynced = 0
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            write, key, lo, values = item
            try:
                if self._error is None:
                    write(key, lo, values)
                    unsynced += values.numel() * values.element_size()
                    if unsynced >= self._sync_every:  # the write-back starts now, not at close
                        self._syncer.request()
                        unsynced = 0
            except BaseException as e:  # raised in the engine's thread
                self._error = e
            finally:
                with self._room:
                    self._pending -= values.numel() * values.element_size()
                    self._room.notify_all()

    def _raise_if_failed(self) -> None:
        if self._error is None:
            self._error = self._syncer.error
        if self._error is not None:
            raise self._error

    def write(self, key: str, lo: int, values: torch.Tensor) -> None:
        """Queue entries [lo, lo + values.numel()) of ``key``; ``values`` must not change afterwards."""
        self._put(self.writer.write, key, lo, values)

    def write_segment(self, segment, lo: int, values: torch.Tensor) -> None:
        """Queue the writer's ``write_segment`` (a segment, or a pack of keys); as :meth:`write`."""
        self._put(self.writer.write_segment, segment, lo, values)

    def patch(self, key: str, positions: torch.Tensor, values: torch.Tensor) -> None:
        """Queue the writer's ``patch`` (after every write queued before it); as :meth:`write`."""
        self._put(self.writer.patch, key, positions, values)

    def _put(self, write, key, lo, values: torch.Tensor) -> None:
        self._raise_if_failed()
        size = values.numel() * values.element_size()
        with self._room:
            while self._pending > 0 and self._pending + size > self._max_pending and self._error is None:
                self._room.wait()
            self._pending += size
        self._queue.put((write, key, lo, values.contiguous()))

    def _stop(self) -> None:
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join()
        self._syncer.stop()  # (before the shards close: it flushes their descriptors)

    def close(self) -> None:
        """Finish every queued write, then flush and close the shards (raises a write's error)."""
        self._stop()
        self._raise_if_failed()
        self.writer.close()

    def halt(self) -> None:
        """Stop the thread without writing what is queued (at interpreter exit: core.threads.halt_at_exit)."""
        self._error = self._error or RuntimeError("aborted")
        self._stop()

    def abort(self) -> None:
        """Stop the thread (after the write in progress) and close the shards without flushing."""
        self.halt()  # the queued writes are skipped
        self.writer.abort()


class Syncer:
    """A thread that flushes the shards (``fdatasync`` of each) when asked, while the writer thread
    goes on writing. Requests made while it flushes make one more flush; the first error is kept in
    ``error`` (and ends the thread)."""

    def __init__(self, files: list):
        self._files = files  # the writer's (fd, name) pairs: open until stop() returns
        self._wanted = threading.Event()
        self._stopping = False
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="pcb_fast-syncer", daemon=True)
        self._thread.start()

    def request(self) -> None:
        self._wanted.set()

    def _run(self) -> None:
        while True:
            self._wanted.wait()
            self._wanted.clear()
            if self._stopping:
                return
            try:
                for fd, _ in list(self._files):
                    os.fdatasync(fd)
            except BaseException as e:
                self.error = e
                return

    def stop(self) -> None:
        """Finish the flush in progress (not the one asked for) and end the thread."""
        self._stopping = True
        self._wanted.set()
        self._thread.join()
