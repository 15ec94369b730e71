"""Writing behind the engine (docs/design.md 3.7): a thread that puts merged slices into the output
shards while the engine computes the next ones, and starts their write-back to disk as it goes.

``pwritev`` releases the GIL, so the copy into the page cache overlaps the engine's arithmetic; an
``fdatasync`` every ``sync_every`` bytes lets the disk write while the merge runs instead of all at
the final flush. At most ``max_pending`` bytes wait in the queue (the writer then makes the engine
wait), so memory stays bounded. A write error is raised in the engine's thread at its next write or
at :meth:`WriteBehind.close`.
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

    def __init__(self, writer, max_pending: int = 16 << 20, sync_every: int = 256 << 20):
        self.writer = writer
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
                    if unsynced >= self._sync_every:
                        for fd, _ in self.writer.files:  # start the write-back now, not at close
                            os.fdatasync(fd)
                        unsynced = 0
            except BaseException as e:  # raised in the engine's thread
                self._error = e
            finally:
                with self._room:
                    self._pending -= values.numel() * values.element_size()
                    self._room.notify_all()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def write(self, key: str, lo: int, values: torch.Tensor) -> None:
        """Queue entries [lo, lo + values.numel()) of ``key``; ``values`` must not change afterwards."""
        self._put(self.writer.write, key, lo, values)

    def write_segment(self, segment, lo: int, values: torch.Tensor) -> None:
        """Queue the writer's ``write_segment`` (a segment, or a pack of keys); as :meth:`write`."""
        self._put(self.writer.write_segment, segment, lo, values)

    def _put(self, write, key, lo: int, values: torch.Tensor) -> None:
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
