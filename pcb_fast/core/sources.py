"""Sources of aligned task-vector blocks (docs/design.md 3.1).

A source presents n task vectors as one row per task, made of segments (one per merged key, in
sorted key order). It yields blocks: the slice [lo:hi) of one segment for all n tasks, as a float32
[n, m] tensor computed on the fly (theta_i - theta_pre for state dicts). Blocks never cross a
segment, so scope="tensor" is a restriction of the same source to one segment.

The tensor handed out for a block may be a reused buffer: consumers copy what they keep.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, replace
from typing import Iterator, Sequence

import torch

from . import checks
from .memory import HeapTrimmer
from .options import RunOptions
from .threads import room_for_io

DEFAULT_BLOCK_WIDTH = 1 << 17  # entries per task per block: an [8, 131072] fp32 block is 4 MiB (docs/design.md 3.1)


@dataclass(frozen=True)
class Segment:
    """One merged key: its name, shape, number of entries and start offset in the task row."""

    key: str
    shape: tuple
    numel: int
    offset: int


@dataclass
class Block:
    """Entries [lo, hi) of one segment for all tasks; ``start`` is the offset in the task row."""

    segment: Segment
    lo: int
    hi: int
    tv: torch.Tensor  # float32 [n, hi - lo]

    @property
    def start(self) -> int:
        return self.segment.offset + self.lo


def segments_of(keys: Sequence[str], shape_of) -> list[Segment]:
    """The segments of ``keys``, laid end to end in that order; ``shape_of(key)`` gives a key's shape."""
    segments, offset = [], 0
    for key in keys:
        shape = tuple(shape_of(key))
        numel = math.prod(shape)
        segments.append(Segment(key, shape, numel, offset))
        offset += numel
    return segments


def row_length(shape) -> int:
    """Entries per row (last dimension) of a tensor of this shape; a scalar is one row of one."""
    return shape[-1] if len(shape) else 1


class TaskVectorSource:
    """Base class: n task vectors split into segments; subclasses implement ``_read``."""

    def __init__(self, n: int, segments: Sequence[Segment], model_names: Sequence[str]):
        self.n = n
        self.segments = list(segments)
        self.D = sum(s.numel for s in self.segments)
        self.model_names = list(model_names)
        self.options = RunOptions()  # the run's settings, replaced whole by the entry point (core/options.py)

    def restrict(self, segment: Segment) -> "TaskVectorSource":
        """The same source seen as a single segment (for scope="tensor")."""
        view = object.__new__(type(self))
        view.__dict__.update(self.__dict__)
        view.segments = [Segment(segment.key, segment.shape, segment.numel, 0)]
        view.D = segment.numel
        view.options = replace(self.options, comm=None)  # one tensor's statistics live on the rank that holds it
        return view

    def block_width(self, width: int) -> int:
        """The widest block :meth:`blocks` yields for ``width`` (buffers need no more)."""
        return min(width, max((s.numel for s in self.segments), default=1))

    def plan(self, width: int = DEFAULT_BLOCK_WIDTH, whole_rows: bool = False) -> list[tuple[Segment, int, int]]:
        """The (segment, lo, hi) of every block :meth:`blocks` yields, in order.

        With ``whole_rows``, blocks hold whole rows (last dimension) of each tensor: as many as fit in
        ``width`` entries, or one row if a row is longer.
        """
        ranges = []
        for seg in self.segments:
            row = row_length(seg.shape) if whole_rows else 1
            step = max(width // row, 1) * row
            ranges += [(seg, lo, min(lo + step, seg.numel)) for lo in range(0, seg.numel, step)]
        return ranges

    def blocks(self, width: int = DEFAULT_BLOCK_WIDTH, whole_rows: bool = False) -> Iterator[Block]:
        """Yield the aligned blocks of every segment, in order (see :meth:`plan`)."""
        ranges = self.plan(width, whole_rows)
        buffer = torch.empty(self.n, max((hi - lo for _, lo, hi in ranges), default=1))
        for seg, lo, hi in self._pass(ranges):
            yield Block(seg, lo, hi, self._read(seg, lo, hi, buffer[:, : hi - lo]))

    def _pass(self, ranges: list) -> Iterator[tuple[Segment, int, int]]:
        """One pass over ``ranges``: the progress bar, the heap, the thread count and the reads ahead,
        around the caller's work on each range."""
        progress, threads = self.options.progress, self.options.threads
        bar = progress(sum(s.numel * self.bytes_per_entry(s) for s in self.segments)) if progress else None
        heap = HeapTrimmer()
        try:
            with self._reading(ranges):
                for seg, lo, hi in ranges:
                    heap.maybe()  # the blocks' temporaries must not pile up in malloc's arenas
                    # compiled loops are specialised to the thread count: such a merge keeps the one chosen at
                    # its start (a change would recompile them in the middle of the merge)
                    if threads is not None and not self.options.fixed_threads:
                        threads.adapt()
                    yield seg, lo, hi
                    if bar is not None:
                        bar.update((hi - lo) * self.bytes_per_entry(seg))
        finally:
            if bar is not None:
                bar.close()

    def _reading(self, ranges: list):
        """A context for one pass over ``ranges``: where a source reads ahead (files on disk)."""
        return contextlib.nullcontext()

    def base_problem(self, block: Block) -> str | None:
        """What is wrong with the base's values under a block whose task vectors are not finite
        (then every task would be blamed for it), or None; sources that check their base up front
        have nothing to say here."""
        return None

    def bytes_per_entry(self, seg: Segment | None = None) -> int:
        """Bytes a pass reads per entry of a task row (of ``seg``; the first segment's if None)."""
        return 4 * self.n

    def strided_columns(self, stride: int) -> list | None:
        """The float32 [n, k] task-vector columns at row offsets divisible by ``stride``, one tensor
        per segment, when the source can read them without a pass over everything (in memory);
        else None."""
        return None

    def _read(self, seg: Segment, lo: int, hi: int, out: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def where(self, task: int, seg: Segment) -> str:
        """Human-readable location for error messages."""
        return f"{self.model_names[task]}, key {checks.short(seg.key, 80)}"

    def why_not_finite(self, task: int, block: Block) -> str:
        """What is wrong with task ``task``'s inputs where its task-vector block is not finite."""
        return "contains NaN or Inf; every input value must be finite"

    @staticmethod
    def _diagnose(model: torch.Tensor, base: torch.Tensor) -> str:
        """Why theta_i - theta_pre is not finite in float32 for these slices of finite-checked inputs."""
        return checks.non_finite_reason(model) or checks.non_finite_reason(base) or (
            "its difference from the base model overflows float32 (values near the float32 limit); "
            "every task vector must fit float32")


class MatrixSource(TaskVectorSource):
    """Task vectors given as a [n, D] tensor or a list of n 1-D tensors (one segment)."""

    def __init__(self, task_vectors):
        rows = checks.task_vector_rows(task_vectors)
        for i, row in enumerate(rows):
            check_cpu(f"task vector {i}", row)
        D = rows[0].numel()
        self._rows = rows
        # A float32 [n, D] matrix with contiguous rows is read in place, without a copy per block.
        self._matrix = None
        if not isinstance(task_vectors, (list, tuple)) and task_vectors.dtype == torch.float32 and task_vectors.stride(1) == 1:
            self._matrix = task_vectors
        super().__init__(len(rows), [Segment("task_vector", (D,), D, 0)], [f"task vector {i}" for i in range(len(rows))])

    def where(self, task: int, seg: Segment) -> str:
        return self.model_names[task]

    def strided_columns(self, stride: int) -> list:
        return [torch.stack([row[::stride].float() for row in self._rows])]

    def _read(self, seg, lo, hi, out):
        if self._matrix is not None:
            return self._matrix[:, lo:hi]
        for i, row in enumerate(self._rows):
            out[i].copy_(row[lo:hi])
        return out


class StateDictSource(TaskVectorSource):
    """Task vectors theta_i - theta_pre of in-memory state dicts, computed per block in float32."""

    def __init__(self, base: dict, models: Sequence[dict], merged_keys: Sequence[str], model_names=None):
        self._base = {k: base[k].reshape(-1) for k in merged_keys}
        self._models = [{k: m[k].reshape(-1) for k in merged_keys} for m in models]
        segments = segments_of(merged_keys, lambda k: base[k].shape)
        names = model_names or [f"model {i}" for i in range(len(models))]
        super().__init__(len(models), segments, names)
        self._base_buffer = None

    def strided_columns(self, stride: int) -> list:
        columns = []
        for seg in self.segments:
            first = (-seg.offset) % stride
            base = self._base[seg.key][first::stride].float()
            columns.append(torch.stack([model[seg.key][first::stride].float() - base for model in self._models]))
        return columns

    def why_not_finite(self, task: int, block: Block) -> str:
        key, lo, hi = block.segment.key, block.lo, block.hi
        return self._diagnose(self._models[task][key][lo:hi], self._base[key][lo:hi])

    def raw_blocks(self, width: int = DEFAULT_BLOCK_WIDTH) -> Iterator[tuple]:
        """Yield (segment, lo, hi, [base, model_0, ...]) for the blocks of :meth:`blocks`: the slices
        as stored (see CheckpointSource.raw_blocks)."""
        for seg, lo, hi in self._pass(self.plan(width)):
            yield seg, lo, hi, [self._base[seg.key][lo:hi]] + [m[seg.key][lo:hi] for m in self._models]

    def _read(self, seg, lo, hi, out):
        base = self._base[seg.key][lo:hi]
        if base.dtype != torch.float32:
            if self._base_buffer is None or self._base_buffer.numel() < hi - lo:
                self._base_buffer = torch.empty(max(hi - lo, DEFAULT_BLOCK_WIDTH))
            base = self._base_buffer[: hi - lo].copy_(base)
        for i, model in enumerate(self._models):
            out[i].copy_(model[seg.key][lo:hi]).sub_(base)
        return out


def check_cpu(what: str, t: torch.Tensor) -> None:
    """The torch backend's sources hold CPU tensors (CUDA tensors go to the triton backend)."""
    if t.device.type != "cpu":
        raise ValueError(f"{what} is on {t.device}; this version merges CPU tensors only (move them with .cpu())")


# input dtypes whose values float32 holds exactly: their task vectors are formed in one op
EXACT_IN_FLOAT32 = (torch.float32, torch.bfloat16, torch.float16)


class CheckpointSource(TaskVectorSource):
    """Task vectors of checkpoints (pcb_fast.io.checkpoints), read slice by slice: every pass reads the
    files again (through the page cache), so memory stays at a few blocks whatever the model size.
    A pass reads ahead of the engine in a background thread (:class:`pcb_fast.core.prefetch.Prefetcher`).

    Its options' ``progress`` (core/options.py), if given, is called at the start of every pass with
    the bytes the pass reads and returns an object with ``update(nbytes)`` and ``close()`` (a tqdm bar,
    for instance).
    """

    # blocks of raw inputs read ahead of the engine (each (n + 1) slices of one block)
    READ_AHEAD = 4

    def __init__(self, base, models: Sequence, merged_keys: Sequence[str]):
        self._base_ckpt, self._model_ckpts = base, list(models)
        segments = segments_of(merged_keys, base.shape)
        super().__init__(len(self._model_ckpts), segments, [m.name for m in self._model_ckpts])
        self._buffers = {}
        self._prefetcher = None
        self._readers = []  # every Prefetcher running, shared with the views of restrict() (close_reads)
        # (key, lo, hi, float32 values) of the block read last, for base_block; shared with the views
        # of restrict() (scope="tensor"), which read for this source
        self._last_base = [None]

    def _buffer(self, slot, dtype: torch.dtype, m: int) -> torch.Tensor:
        """A reusable flat buffer per (slot, dtype), grown to the widest block."""
        buffer = self._buffers.get((slot, dtype))
        if buffer is None or buffer.numel() < m:
            buffer = self._buffers[(slot, dtype)] = torch.empty(m, dtype=dtype)
        return buffer[:m]

    def bytes_per_entry(self, seg: Segment | None = None) -> int:
        key = (seg or self.segments[0]).key
        return sum(c.dtype(key).itemsize for c in [self._base_ckpt] + self._model_ckpts)

    def why_not_finite(self, task: int, block: Block) -> str:
        key, lo, hi = block.segment.key, block.lo, block.hi
        model, base = self._model_ckpts[task], self._base_ckpt
        return self._diagnose(model.read_into(key, lo, hi, torch.empty(hi - lo, dtype=model.dtype(key))),
                              base.read_into(key, lo, hi, torch.empty(hi - lo, dtype=base.dtype(key))))

    def base_problem(self, block: Block) -> str | None:
        # checked only where a block is not finite: a bad base value makes every task's entry there bad
        key, lo, hi = block.segment.key, block.lo, block.hi
        reason = checks.non_finite_reason(self._base_ckpt.read_into(key, lo, hi, torch.empty(
            hi - lo, dtype=self._base_ckpt.dtype(key))))
        return None if reason is None else f"base model, key {checks.short(key, 80)}: {reason}"

    def base_block(self, key: str, lo: int, hi: int) -> torch.Tensor | None:
        """The base's entries [lo, hi) of ``key`` in float32 when the block read last is this one and
        float32 holds them exactly (a sink then need not read them again), else None. Valid until
        the next block is read."""
        last = self._last_base[0]
        return last[3] if last is not None and last[:3] == (key, lo, hi) else None

    @contextlib.contextmanager
    def _reading(self, ranges):
        if (self._prefetcher is not None or len(ranges) < 2  # a pass inside a pass reads for itself
                or (self.options.threads is not None and not room_for_io(self.options.threads.threads))):
            yield
            return
        from .prefetch import Prefetcher

        self._prefetcher = Prefetcher([self._base_ckpt] + self._model_ckpts,
                                      [(seg.key, lo, hi) for seg, lo, hi in ranges], depth=self.READ_AHEAD)
        self._readers.append(self._prefetcher)
        try:
            yield
        finally:
            prefetcher, self._prefetcher = self._prefetcher, None
            prefetcher.close()
            if prefetcher in self._readers:  # close_reads may have stopped it first
                self._readers.remove(prefetcher)

    def close_reads(self) -> None:
        """Stop every reader thread still running. A pass abandoned by an exception stops its reader
        when its generator is closed, which CPython may put off while the traceback lives; a reader
        alive at interpreter exit would be killed inside torch and abort the process."""
        while self._readers:
            self._readers.pop().close()

    def _read(self, seg, lo, hi, out):
        try:
            with self._natives(seg, lo, hi) as natives:
                self._subtract(seg.key, lo, hi, natives, out)
        except (ValueError, OSError) as e:
            if self.options.errors is None:
                raise
            self.options.errors.fail(str(e))  # raised on every rank at the next collective
            out.zero_()
        return out

    @contextlib.contextmanager
    def _natives(self, seg, lo, hi):
        """The raw slices [base, model_0, ...] of entries [lo, hi) of ``seg``, as stored (read ahead, or
        read now); valid inside the context."""
        taken = self._prefetcher.take(seg.key, lo, hi) if self._prefetcher is not None else None
        try:
            if taken is not None:
                yield taken[1]
            else:
                yield [ck.read_into(seg.key, lo, hi, self._buffer(("input", j), ck.dtype(seg.key), hi - lo))
                       for j, ck in enumerate([self._base_ckpt] + self._model_ckpts)]
        finally:
            if taken is not None:
                self._prefetcher.release(taken[0])

    def raw_blocks(self, width: int = DEFAULT_BLOCK_WIDTH) -> Iterator[tuple]:
        """Yield (segment, lo, hi, [base, model_0, ...]) for the blocks of :meth:`blocks`: the inputs as
        stored, for kernels that convert them on the fly (pcb_fast.cpu.native.weighted_merge); the
        slices are valid until the next block. :meth:`task_vectors` gives a block's float32 tau."""
        for seg, lo, hi in self._pass(self.plan(width)):
            with self._natives(seg, lo, hi) as natives:
                yield seg, lo, hi, natives

    def task_vectors(self, seg: Segment, lo: int, hi: int, natives: list) -> Block:
        """The block of :meth:`blocks` for raw slices of :meth:`raw_blocks` (a new tensor)."""
        out = torch.empty(self.n, hi - lo)
        self._subtract(seg.key, lo, hi, natives, out)
        return Block(seg, lo, hi, out)

    def _subtract(self, key, lo, hi, natives, out) -> None:
        """out[i] = float32(model_i) - float32(base) from the raw slices [base, model_0, ...]. A base
        value that is not finite makes the whole column non-finite; the engine's check then names
        the base (:meth:`base_problem`)."""
        native_base, models = natives[0], natives[1:]
        base = self._buffer("base32", torch.float32, hi - lo).copy_(native_base)
        self._last_base[0] = (key, lo, hi, base) if native_base.dtype in EXACT_IN_FLOAT32 else None
        for i, native in enumerate(models):
            if native.dtype in EXACT_IN_FLOAT32:
                torch.sub(native, base, out=out[i])  # converted exactly on the fly: the same bits as copy then sub
            else:  # float64: rounded to float32 first, as the whole engine does
                out[i].copy_(native).sub_(base)


class CachedSource(TaskVectorSource):
    """A source whose first complete pass keeps every task-vector block in one float32 [n, D]
    tensor, so that later passes read memory instead of files (for inputs that fit the budget)."""

    def __init__(self, inner: TaskVectorSource):
        super().__init__(inner.n, inner.segments, inner.model_names)
        self.inner = inner
        self.cache = None  # allocated by the first pass
        self.complete = False
        # where the caches of this source's restrict() views live: one buffer, sized for the largest
        # segment once, reused by every tensor of scope="tensor" (fresh memory would be faulted in and
        # zeroed by the kernel for every tensor: seconds on an LLM)
        self._shared = [None]

    @property
    def options(self) -> RunOptions:
        """The inner source's: its passes fill the cache."""
        return self.inner.options

    @options.setter
    def options(self, options: RunOptions) -> None:
        if hasattr(self, "inner"):  # (TaskVectorSource.__init__ sets the default before inner exists)
            self.inner.options = options

    def restrict(self, segment: Segment) -> "TaskVectorSource":
        view = CachedSource(self.inner.restrict(segment))
        if self._shared[0] is None:
            self._shared[0] = torch.empty(self.n * max(s.numel for s in self.segments))
        view.cache = self._shared[0][: self.n * segment.numel].view(self.n, segment.numel)
        return view

    def strided_columns(self, stride: int) -> list | None:
        return [self.cache[:, ::stride].clone()] if self.complete else None

    def where(self, task: int, seg: Segment) -> str:
        return self.inner.where(task, seg)

    def why_not_finite(self, task: int, block: Block) -> str:
        return self.inner.why_not_finite(task, block)

    def base_problem(self, block: Block) -> str | None:
        return self.inner.base_problem(block)

    def blocks(self, width: int = DEFAULT_BLOCK_WIDTH, whole_rows: bool = False) -> Iterator[Block]:
        if self.complete:
            yield from super().blocks(width, whole_rows)
            return
        if self.cache is None:
            self.cache = torch.empty(self.n, self.D)
        inner = self.inner
        # the inner source's pass, its task vectors formed straight into the cache (no copy)
        for seg, lo, hi in inner._pass(inner.plan(width, whole_rows)):
            view = self.cache[:, seg.offset + lo : seg.offset + hi]
            tv = inner._read(seg, lo, hi, view)
            if tv.data_ptr() != view.data_ptr():  # a source that hands out its own tensor (in memory)
                view.copy_(tv)
            yield Block(seg, lo, hi, view)
        self.complete = True

    def _read(self, seg, lo, hi, out):
        return self.cache[:, seg.offset + lo : seg.offset + hi]
