"""Sources of aligned task-vector blocks (DESIGN.md 3).

A source presents n task vectors as one row per task, made of segments (one per merged key, in
sorted key order). It yields blocks: the slice [lo:hi) of one segment for all n tasks, as a float32
[n, m] tensor computed on the fly (theta_i - theta_pre for state dicts). Blocks never cross a
segment, so scope="tensor" is a restriction of the same source to one segment.

The tensor handed out for a block may be a reused buffer: consumers copy what they keep.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from . import checks

DEFAULT_BLOCK_WIDTH = 1 << 17  # entries per task per block: an [8, 131072] fp32 block is 4 MiB (fastest here)


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
        """The same source seen as a single segment (for scope="tensor")."""
        view = object.__new__(type(self))
        view.__dict__.update(self.__dict__)
        view.segments = [Segment(segment.key, segment.shape, segment.numel, 0)]
        view.D = segment.numel
        return view

    def block_width(self, width: int) -> int:
        """The widest block :meth:`blocks` yields for ``width`` (buffers need no more)."""
        return min(width, max(s.numel for s in self.segments))

    def blocks(self, width: int = DEFAULT_BLOCK_WIDTH, whole_rows: bool = False) -> Iterator[Block]:
        """Yield the aligned blocks of every segment, in order.

        With ``whole_rows``, blocks hold whole rows (last dimension) of each tensor: as many as fit in
        ``width`` entries, or one row if a row is longer.
        """
        rows = [row_length(s.shape) for s in self.segments] if whole_rows else [1] * len(self.segments)
        widest = max(max(width // r, 1) * r for r in rows) if whole_rows else width
        buffer = torch.empty(self.n, min(widest, max(s.numel for s in self.segments)))
        for seg, row in zip(self.segments, rows):
            step = max(width // row, 1) * row
            for lo in range(0, seg.numel, step):
                hi = min(lo + step, seg.numel)
                yield Block(seg, lo, hi, self._read(seg, lo, hi, buffer[:, : hi - lo]))

    def _read(self, seg: Segment, lo: int, hi: int, out: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def where(self, task: int, seg: Segment) -> str:
        """Human-readable location for error messages."""
        return f"{self.model_names[task]}, key {seg.key!r}"


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
        segments, offset = [], 0
        for k in merged_keys:
            segments.append(Segment(k, tuple(base[k].shape), base[k].numel(), offset))
            offset += base[k].numel()
        names = model_names or [f"model {i}" for i in range(len(models))]
        super().__init__(len(models), segments, names)
        self._base_buffer = None

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


def split_keys(base: dict, exclude: Sequence[str]) -> tuple[list[str], list[str]]:
    """(merged, copied) keys of ``base``: floating tensors not matching any exclude regex are merged."""
    patterns = []
    for p in exclude:
        try:
            patterns.append(re.compile(p))
        except re.error as e:
            raise ValueError(f"exclude pattern {p!r} is not a valid regular expression: {e}") from None
    merged, copied = [], []
    for key in sorted(base):
        t = base[key]
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"base model, key {key!r}: value is a {type(t).__name__}, expected a torch.Tensor")
        if t.is_floating_point() and t.numel() > 0 and not any(p.search(key) for p in patterns):
            merged.append(key)
        else:
            copied.append(key)
    return merged, copied


def check_models_match(base: dict, models: Sequence[dict], merged_keys: Sequence[str], names: Sequence[str]) -> None:
    """Every merged key in every model with the base's shape, and no model key the base lacks."""
    for name, model in zip(names, models):
        if not isinstance(model, dict):
            raise ValueError(f"{name} is a {type(model).__name__}, expected a state dict (dict of tensors)")
        extra = sorted(set(model) - set(base))
        if extra:
            raise ValueError(f"{name} has key {extra[0]!r} that the base model lacks ({len(extra)} such keys)")
        for key in merged_keys:
            if key not in model:
                raise ValueError(f"{name} lacks key {key!r} that the base model has")
            t = model[key]
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                what = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{name}, key {key!r}: {what} where the base has a floating tensor")
            if tuple(t.shape) != tuple(base[key].shape):
                raise ValueError(f"{name}, key {key!r}: shape {tuple(t.shape)} but the base has {tuple(base[key].shape)}")
