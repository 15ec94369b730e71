"""Sources of aligned task-vector blocks (docs/design.md 3.1).

A source presents n task vectors as one row per task, made of segments (one per merged key, in
sorted key order). It yields blocks: the slice [lo:hi) of one segment for all n tasks, as a float32
[n, m] tensor computed on the fly (theta_i - theta_pre for state dicts). Blocks never cross a
segment, so scope="tensor" is a restriction of the same source to one segment.

The tensor handed out for a block may be a reused buffer: consumers copy what they keep.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import itertools
import math
import operator
from dataclasses import dataclass
from typing import Iterator, NamedTuple, Sequence

import torch

from ..cpu.native import task_vectors as native_task_vectors
from . import checks
from .memory import HeapTrimmer
from .options import RunOptions
from .threads import room_for_io

DEFAULT_BLOCK_WIDTH = 1 << 17  # entries per task per block: an [8, 131072] fp32 block is 4 MiB (docs/design.md 3.1)
MAX_PACK_WIDTH = DEFAULT_BLOCK_WIDTH  # entries of a pack of small keys, at most (TaskVectorSource._segments)


class Segment(NamedTuple):
    """One merged key: its name, shape, number of entries and start offset in the task row; or a
    pack of several consecutive small keys read, merged and written as one block (``parts``: their
    segments; ``key``: the pair (first key, last key), which no sink mistakes for a key). A named
    tuple: a model may have hundreds of thousands of keys."""

    key: str | tuple
    shape: tuple
    numel: int
    offset: int
    parts: tuple = ()

    @property
    def lead_key(self) -> str:
        """The key whose dtypes every part of a pack shares (a plain segment's own key)."""
        return self.parts[0].key if self.parts else self.key

    def pieces(self, lo: int, hi: int) -> list[tuple]:
        """(segment, lo, hi, start, end) of every key within entries [lo, hi) of this segment: where
        they are in their key, and where in the block ([start, end)). One piece for a plain segment."""
        if not self.parts:
            return [(self, lo, hi, 0, hi - lo)]
        numels = list(map(operator.itemgetter(2), self.parts))
        if lo == 0 and hi == self.numel and 0 not in numels:  # the whole pack (as read and written), in bulk
            starts = list(map((-self.offset).__add__, map(operator.itemgetter(3), self.parts)))
            return list(zip(self.parts, itertools.repeat(0), numels, starts, map(operator.add, starts, numels)))
        found = []
        for part in self.parts:
            a, b = max(lo, part.offset - self.offset), min(hi, part.offset - self.offset + part.numel)
            if a < b:
                start = part.offset - self.offset
                found.append((part, a - start, b - start, a - lo, b - lo))
        return found


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
    """The segments of ``keys``, laid end to end in that order; ``shape_of(key)`` gives a key's shape,
    or ``shape_of`` is the list of their shapes."""
    shapes = [tuple(shape_of(key)) for key in keys] if callable(shape_of) else list(shape_of)
    numel_of = {shape: math.prod(shape) for shape in set(shapes)}
    numels = list(map(numel_of.__getitem__, shapes))
    offsets = itertools.accumulate(numels, initial=0)
    # made in bulk (tuple.__new__ of the named tuple): a model may have hundreds of thousands of keys
    rows = zip(keys, shapes, numels, offsets, itertools.repeat(()))
    return list(map(functools.partial(tuple.__new__, Segment), rows))


def pack_segments(segments: Sequence[Segment], width: int, signatures: Sequence) -> list[Segment]:
    """``segments`` with every run of consecutive ones that fit ``width`` entries together and share
    their ``signatures`` (one per segment: their dtypes in every input; None: never packed) joined
    into a pack (:class:`Segment` with ``parts``): a model of many small tensors then costs a few
    blocks, not one block per key."""
    packed, run, total, shared = [], [], 0, None

    def close_run():
        if len(run) > 1:
            packed.append(Segment((run[0].key, run[-1].key), (total,), total, run[0].offset, tuple(run)))
        else:
            packed.extend(run)

    for seg, mark in zip(segments, signatures):
        mark = mark if seg.numel < width else None
        if not run or mark is None or mark != shared or total + seg.numel > width:
            close_run()
            run, total, shared = [], 0, mark
        if mark is None:
            packed.append(seg)
            continue
        run.append(seg)
        total += seg.numel
    close_run()
    return packed


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

    def restrict(self, segment: Segment) -> "TaskVectorSource":
        """The same source seen as a single segment (for scope="tensor"): one key, or a pack of keys
        (:meth:`packs`), whose parts then lie where they lie in the pack."""
        view = copy.copy(self)  # the same data (readers, buffers), seen as one segment
        parts = ()
        if segment.parts:  # (made in bulk: a pack may hold thousands of keys)
            keys, shapes, numels, offsets = (map(operator.itemgetter(i), segment.parts) for i in range(4))
            rows = zip(keys, shapes, numels, map((-segment.offset).__add__, offsets), itertools.repeat(()))
            parts = tuple(map(functools.partial(tuple.__new__, Segment), rows))
        view.segments = [Segment(segment.key, segment.shape, segment.numel, 0, parts)]
        view.D = segment.numel
        return view

    def block_width(self, width: int, options: RunOptions) -> int:
        """The widest block :meth:`blocks` yields for ``width`` in a run with ``options`` (buffers need no more)."""
        if options.pack_keys and len(self.segments) > 1:
            return min(width, self.D)  # a pack spans several keys
        return min(width, max((s.numel for s in self.segments), default=1))

    def _pack_signatures(self) -> list:
        """What must be equal, per segment, for it to share a pack with its neighbours; None: never
        packed (sources that read their inputs by key do not pack)."""
        return [None] * len(self.segments)

    def packs(self, width: int) -> list[Segment]:
        """The segments with every run of consecutive keys of fewer than ``width`` entries that fit
        ``width`` together and share their dtypes in every input joined into a pack
        (:func:`pack_segments`), computed once per width."""
        packs = self.__dict__.setdefault("_packs", {})
        if width not in packs:
            packs[width] = pack_segments(self.segments, width, self._pack_signatures())
        return packs[width]

    def _segments(self, width: int, options: RunOptions) -> list[Segment]:
        """The segments a pass of ``width`` goes through: packs of small keys where the run allows
        them (``options.pack_keys``), no wider than :data:`MAX_PACK_WIDTH` (a pass of blocks that
        hold whole tensors, as wide as the largest, packs small keys only: a pack's statistics take
        a sort of its entries, where a large tensor alone takes selections)."""
        if not options.pack_keys or len(self.segments) < 2:
            return self.segments
        return self.packs(min(width, MAX_PACK_WIDTH))

    def plan(self, width: int = DEFAULT_BLOCK_WIDTH, whole_rows: bool = False, *,
             options: RunOptions) -> list[tuple[Segment, int, int]]:
        """The (segment, lo, hi) of every block :meth:`blocks` yields, in order.

        With ``whole_rows``, blocks hold whole rows (last dimension) of each tensor: as many as fit in
        ``width`` entries, or one row if a row is longer. Where the run allows it (``options.pack_keys``),
        runs of small keys share a block (:func:`pack_segments`; such a block holds whole tensors).
        """
        ranges = []
        for seg in self._segments(width, options):  # (a pack holds whole tensors: whole rows)
            row = row_length(seg.shape) if whole_rows else 1
            step = max(width // row, 1) * row
            ranges += [(seg, lo, min(lo + step, seg.numel)) for lo in range(0, seg.numel, step)]
        return ranges

    def blocks(self, width: int = DEFAULT_BLOCK_WIDTH, whole_rows: bool = False, *,
               options: RunOptions, only=None) -> Iterator[Block]:
        """Yield the aligned blocks of every segment, in order (see :meth:`plan`), in one pass run with
        ``options`` (core/options.py: progress, threads, where errors go). ``only``: the numbers (in
        :meth:`plan`'s order) of the blocks to yield; the pass then reads, and reads ahead, only those."""
        ranges = self.plan(width, whole_rows, options=options)
        if only is not None:
            ranges = [ranges[number] for number in sorted(only)]
        buffer = torch.empty(self.n, max((hi - lo for _, lo, hi in ranges), default=1))
        for seg, lo, hi in self._pass(ranges, options, whole=only is None):
            yield Block(seg, lo, hi, self._read_reporting(seg, lo, hi, buffer[:, : hi - lo], options))

    def _read_reporting(self, seg: Segment, lo: int, hi: int, out: torch.Tensor, options: RunOptions) -> torch.Tensor:
        """:meth:`_read`, where a read that fails (a file that ends early, a bad value) is reported to
        ``options.errors`` (raised on every rank at the next collective; the block is zeros until
        then) when the run has one, else raised."""
        try:
            return self._read(seg, lo, hi, out)
        except (ValueError, OSError) as e:
            if options.errors is None:
                raise
            options.errors.fail(str(e))
            return out.zero_()

    def _pass(self, ranges: list, options: RunOptions, whole: bool = True) -> Iterator[tuple[Segment, int, int]]:
        """One pass over ``ranges`` (``whole``: they cover every segment): the progress bar, the heap, the
        thread count and the reads ahead, around the caller's work on each range."""
        progress, threads = options.progress, options.threads
        bar = None
        if progress:
            bar = progress(sum(s.numel * self.bytes_per_entry(s) for s in self.segments) if whole
                           else sum((hi - lo) * self.bytes_per_entry(seg) for seg, lo, hi in ranges))
        heap = HeapTrimmer()
        try:
            with self._reading(ranges, options):
                for seg, lo, hi in ranges:
                    heap.maybe()  # the blocks' temporaries must not pile up in malloc's arenas
                    # compiled loops are specialised to the thread count: such a merge keeps the one chosen at
                    # its start (a change would recompile them in the middle of the merge)
                    if threads is not None and not options.fixed_threads:
                        threads.adapt()
                    yield seg, lo, hi
                    if bar is not None:
                        bar.update((hi - lo) * self.bytes_per_entry(seg))
        finally:
            if bar is not None:
                bar.close()

    def _reading(self, ranges: list, options: RunOptions):
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

    def holds_columns(self) -> bool:
        """Whether :meth:`strided_columns` gives columns (without a pass)."""
        return False

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

    def holds_columns(self) -> bool:
        return True

    def _read(self, seg, lo, hi, out):
        if self._matrix is not None:
            return self._matrix[:, lo:hi]
        for i, row in enumerate(self._rows):
            out[i].copy_(row[lo:hi])
        return out


class StateDictSource(TaskVectorSource):
    """Task vectors theta_i - theta_pre of in-memory state dicts, computed per block in float32."""

    def __init__(self, base: dict, models: Sequence[dict], merged_keys: Sequence[str], model_names=None):
        self._base = {k: flat(base[k]) for k in merged_keys}
        self._models = [{k: flat(m[k]) for k in merged_keys} for m in models]
        segments = segments_of(merged_keys, lambda k: base[k].shape)
        names = model_names or [f"model {i}" for i in range(len(models))]
        super().__init__(len(models), segments, names)
        self._base_buffer = None

    def holds_columns(self) -> bool:
        return True

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

    def raw_blocks(self, width: int = DEFAULT_BLOCK_WIDTH, *, options: RunOptions) -> Iterator[tuple]:
        """Yield (segment, lo, hi, [base, model_0, ...]) for the blocks of :meth:`blocks`: the slices
        as stored (see CheckpointSource.raw_blocks)."""
        for seg, lo, hi in self._pass(self.plan(width, options=options), options):
            yield seg, lo, hi, self.slices(seg, lo, hi)

    def _pack_signatures(self) -> list:
        inputs = [self._base] + self._models  # every key's dtypes in every input
        return list(zip(*[[t.dtype for t in sd.values()] for sd in inputs]))

    def slices(self, seg: Segment, lo: int, hi: int) -> list:
        """[base, model_0, ...]: entries [lo, hi) of ``seg`` as stored (a pack's keys one after the other,
        in a new tensor)."""
        if not seg.parts:
            return [sd[seg.key][lo:hi] for sd in [self._base] + self._models]
        keys = [part.key for part in seg.parts]  # (a pack is always one whole block)
        return [torch.cat(list(map(sd.__getitem__, keys))) for sd in [self._base] + self._models]

    def _read(self, seg, lo, hi, out):
        if seg.parts:
            base, *models = self.slices(seg, lo, hi)
            base = base.float()
            for i, model in enumerate(models):
                out[i].copy_(model).sub_(base)
            return out
        base = self._base[seg.key][lo:hi]
        if base.dtype != torch.float32:
            if self._base_buffer is None or self._base_buffer.numel() < hi - lo:
                self._base_buffer = torch.empty(max(hi - lo, DEFAULT_BLOCK_WIDTH))
            base = self._base_buffer[: hi - lo].copy_(base)
        for i, model in enumerate(self._models):
            out[i].copy_(model[seg.key][lo:hi]).sub_(base)
        return out


def flat(t: torch.Tensor) -> torch.Tensor:
    """``t.reshape(-1)``: ``t`` itself where it is one-dimensional (a view of itself), without a call
    into torch (a model may have hundreds of thousands of small tensors)."""
    return t if t.dim() == 1 else t.reshape(-1)


def check_cpu(what: str, t: torch.Tensor) -> None:
    """The torch backend's sources hold CPU tensors (CUDA tensors go to the triton backend)."""
    if t.device.type != "cpu":
        raise ValueError(f"{what} is on {t.device}; this version merges CPU tensors only (move them with .cpu())")


# input dtypes whose values float32 holds exactly: their task vectors are formed in one op
EXACT_IN_FLOAT32 = (torch.float32, torch.bfloat16, torch.float16)


class PackReads:
    """A checkpoint (pcb_fast.io.checkpoints) that also reads packs: for a pack's key, the whole
    tensors of its parts one after the other, by the checkpoint's planned reads (one read per run
    of tensors that lie next to each other in a file); any other key as the checkpoint does."""

    def __init__(self, checkpoint, pack_of: dict):
        self.checkpoint, self.name = checkpoint, checkpoint.name
        self._pack_of = pack_of  # pack key -> pack (shared with the source)
        self._reads = {}  # pack key -> the checkpoint's plan of its reads

    def dtype(self, key) -> torch.dtype:
        return self.checkpoint.dtype(self._pack_of[key].lead_key if type(key) is tuple else key)

    def _plan(self, key):
        plan = self._reads.get(key)
        if plan is None:
            plan = self._reads[key] = self.checkpoint.plan_reads([part.key for part in self._pack_of[key].parts])
        return plan

    def read_into(self, key, lo: int, hi: int, out: torch.Tensor) -> torch.Tensor:
        if type(key) is not tuple:
            return self.checkpoint.read_into(key, lo, hi, out)
        return self.checkpoint.read_planned(self._plan(key), out)  # (a pack is always one whole block)

    def advise(self, key, lo: int, hi: int) -> None:
        if type(key) is not tuple:
            self.checkpoint.advise(key, lo, hi)
        else:
            self.checkpoint.advise_planned(self._plan(key))


class CheckpointSource(TaskVectorSource):
    """Task vectors of checkpoints (pcb_fast.io.checkpoints), read slice by slice: every pass reads the
    files again (through the page cache), so memory stays at a few blocks whatever the model size.
    A pass reads ahead of the engine in a background thread (:class:`pcb_fast.core.prefetch.Prefetcher`).

    A pass's ``options.progress`` (core/options.py), if given, is called at its start with the bytes
    the pass reads and returns an object with ``update(nbytes)`` and ``close()`` (a tqdm bar, for
    instance).
    """

    # blocks of raw inputs read ahead of the engine (each (n + 1) slices of one block)
    READ_AHEAD = 4

    def __init__(self, base, models: Sequence, merged_keys: Sequence[str]):
        self._base_ckpt, self._model_ckpts = base, list(models)
        segments = segments_of(merged_keys, base.layout(merged_keys)[1])
        super().__init__(len(self._model_ckpts), segments, [m.name for m in self._model_ckpts])
        self._pack_of = {}  # pack key -> pack, for the inputs' reads (PackReads)
        self._inputs = [PackReads(ck, self._pack_of) for ck in [base] + self._model_ckpts]
        self._buffers = {}
        self._prefetcher = None
        self._readers = []  # every Prefetcher running, shared with the views of restrict() (close_reads)
        # (key, lo, hi, values in float32 or as stored) of the block read last, for base_block; shared with the views
        # of restrict() (scope="tensor"), which read for this source
        self._last_base = [None]

    def _buffer(self, slot, dtype: torch.dtype, m: int) -> torch.Tensor:
        """A reusable flat buffer per (slot, dtype), grown to the widest block."""
        buffer = self._buffers.get((slot, dtype))
        if buffer is None or buffer.numel() < m:
            buffer = self._buffers[(slot, dtype)] = torch.empty(m, dtype=dtype)
        return buffer[:m]

    def bytes_per_entry(self, seg: Segment | None = None) -> int:
        key = (seg or self.segments[0]).lead_key
        return sum(c.dtype(key).itemsize for c in [self._base_ckpt] + self._model_ckpts)

    def _pack_signatures(self) -> list:
        keys = [s.key for s in self.segments]  # every key's dtypes in every input, asked in bulk
        base_dtypes = self._base_ckpt.layout(keys)[0]  # (once for the inputs that share the base's header)
        others = [ck.layout(keys)[0] for ck in self._model_ckpts if not ck.same_layout(self._base_ckpt)]
        return list(zip(base_dtypes, *others)) if others else base_dtypes  # (no tuple per key where all share it)

    def packs(self, width: int) -> list[Segment]:
        packs = super().packs(width)
        self._pack_of.update((seg.key, seg) for seg in packs if seg.parts)
        return packs

    def restrict(self, segment: Segment) -> "TaskVectorSource":
        if segment.parts:  # (a run of a pack's keys too: its reads are planned by its key)
            self._pack_of[segment.key] = segment
        return super().restrict(segment)

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
        """The base's entries [lo, hi) of ``key`` (a segment's key, a pack's too), in float32 or as stored,
        when the block read last is this one and float32 holds them exactly (a sink then need not read
        them again), else None. Valid until the next block is read."""
        last = self._last_base[0]
        return last[3] if last is not None and last[:3] == (key, lo, hi) else None

    def base_slice(self, seg: Segment, lo: int, hi: int) -> torch.Tensor:
        """The base's entries [lo, hi) of ``seg`` (a pack too), as stored, in a buffer reused by the
        next call (a sink's own: the reads ahead never touch it)."""
        base = self._inputs[0]
        return base.read_into(seg.key, lo, hi, self._buffer("sink base", base.dtype(seg.key), hi - lo))

    @contextlib.contextmanager
    def _reading(self, ranges, options):
        if (self._prefetcher is not None or len(ranges) < 2  # a pass inside a pass reads for itself
                or (options.threads is not None and not room_for_io(options.threads.threads))
                # (inputs whose reads compute with torch's thread setting: pcb_fast.io.lora_models)
                or any(getattr(ck.checkpoint, "threads_on_read", False) for ck in self._inputs)):
            yield
            return
        from .prefetch import Prefetcher

        self._prefetcher = Prefetcher(self._inputs, [(seg.key, lo, hi) for seg, lo, hi in ranges],
                                      depth=self.READ_AHEAD)
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
        with self._natives(seg, lo, hi) as natives:
            self._subtract(seg.key, lo, hi, natives, out)
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
                       for j, ck in enumerate(self._inputs)]
        finally:
            if taken is not None:
                self._prefetcher.release(taken[0])

    def raw_blocks(self, width: int = DEFAULT_BLOCK_WIDTH, *, options: RunOptions) -> Iterator[tuple]:
        """Yield (segment, lo, hi, [base, model_0, ...]) for the blocks of :meth:`blocks`: the inputs as
        stored, for kernels that convert them on the fly (pcb_fast.cpu.native.weighted_merge); the
        slices are valid until the next block. :meth:`task_vectors` gives a block's float32 tau."""
        for seg, lo, hi in self._pass(self.plan(width, options=options), options):
            with self._natives(seg, lo, hi) as natives:
                base = natives[0]
                self._last_base[0] = (seg.key, lo, hi, base) if base.dtype in EXACT_IN_FLOAT32 else None
                try:
                    yield seg, lo, hi, natives
                finally:
                    self._last_base[0] = None  # (the slices are let go)

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
        base = self._buffer("base32", torch.float32, hi - lo)
        self._last_base[0] = (key, lo, hi, base) if native_base.dtype in EXACT_IN_FLOAT32 else None
        if native_task_vectors(natives, base, out):  # one C sweep, the same bits as the torch ops below
            return
        base.copy_(native_base)
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

    def restrict(self, segment: Segment) -> "TaskVectorSource":
        if segment.parts:  # a pack of small keys, merged together from one read (engine.run)
            return self.inner.restrict(segment)
        view = CachedSource(self.inner.restrict(segment))
        if self._shared[0] is None:
            self._shared[0] = torch.empty(self.n * max(s.numel for s in self.segments))
        view.cache = self._shared[0][: self.n * segment.numel].view(self.n, segment.numel)
        return view

    def strided_columns(self, stride: int) -> list | None:
        return [self.cache[:, ::stride].clone()] if self.complete else None

    def holds_columns(self) -> bool:
        return self.complete

    def _pack_signatures(self) -> list:
        return self.inner._pack_signatures()  # later passes see the blocks of the first

    def where(self, task: int, seg: Segment) -> str:
        return self.inner.where(task, seg)

    def why_not_finite(self, task: int, block: Block) -> str:
        return self.inner.why_not_finite(task, block)

    def base_problem(self, block: Block) -> str | None:
        return self.inner.base_problem(block)

    def blocks(self, width: int = DEFAULT_BLOCK_WIDTH, whole_rows: bool = False, *,
               options: RunOptions, only=None) -> Iterator[Block]:
        if self.complete or only is not None:  # (a pass over some blocks only reads, caching nothing)
            yield from (super() if self.complete else self.inner).blocks(width, whole_rows, options=options, only=only)
            return
        if self.cache is None:
            self.cache = torch.empty(self.n, self.D)
        inner = self.inner
        # the inner source's pass, its task vectors formed straight into the cache (no copy)
        for seg, lo, hi in inner._pass(inner.plan(width, whole_rows, options=options), options):
            view = self.cache[:, seg.offset + lo : seg.offset + hi]
            tv = inner._read_reporting(seg, lo, hi, view, options)
            if tv.data_ptr() != view.data_ptr():  # a source that hands out its own tensor (in memory)
                view.copy_(tv)
            yield Block(seg, lo, hi, view)
        self.complete = True

    def _read(self, seg, lo, hi, out):
        return self.cache[:, seg.offset + lo : seg.offset + hi]
