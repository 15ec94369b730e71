"""Exact order statistics on the device: two-level 16-bit radix select (docs/design.md 3.3, 4).

A float32 maps to an int32 key with the float's order (negatives get every bit but the sign
flipped). Level 1 counts the top 16 bits of the keys of every task row into [n, 65536] int64
histograms; :func:`find_kernel` then finds, on the device, the bucket that holds each wanted rank.
Level 2 counts the low 16 bits of the keys inside the chosen buckets, which pins the exact key:
``sort(x_i)[rank]`` with no sort and no host round trip. Counts are integer atomics, so the result
does not depend on the order in which programs run. Several ranks per task share the same passes.

Kernels that produce the values (|tau|, PCB scores) call :func:`radix_count` on their tile; the
values are never written to memory.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .keys import keys_to_float

BUCKETS = 1 << 16
FIND_CHUNK = 1024  # histogram bins per step of the bucket search: 8 int64 per thread, no spill
INT32_MIN = -(1 << 31)
INT32_MAX = (1 << 31) - 1
# the same bounds for use inside kernels (compiled kernels read only constexpr globals)
KEY_MIN = tl.constexpr(INT32_MIN)
KEY_MAX = tl.constexpr(INT32_MAX)


@triton.jit
def order_key(x):
    """int32 key of float32 ``x`` whose signed order is the float order."""
    bits = x.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def radix_count(key, ok, i, hist_ptr, bucket_ptr, LEVEL: tl.constexpr, R: tl.constexpr):
    """Count the keys of task ``i`` over this program's columns (entries where ``ok``) into the level's
    histograms.

    Level 1: hist [n, 65536] by the top 16 bits. Level 2: hist [n, R, 65536] by the low 16 bits,
    only keys whose top bits equal the bucket chosen for rank r (bucket_ptr: [n, R] int64).
    """
    high = (key >> 16) + 32768
    row = i  # i < 64 and R <= 2: row offsets stay far inside int32
    if LEVEL == 1:
        tl.atomic_add(hist_ptr + row * 65536 + high, 1, mask=ok, sem="relaxed")
    else:
        low = key & 0xFFFF
        for r in tl.static_range(R):
            bucket = tl.load(bucket_ptr + row * R + r)
            inside = ok & (high.to(tl.int64) == bucket)
            tl.atomic_add(hist_ptr + (row * R + r) * 65536 + low, 1, mask=inside, sem="relaxed")


@triton.jit
def find_kernel(hist_ptr, rank_ptr, index_ptr, below_ptr, R: tl.constexpr, PER_ROW: tl.constexpr,
                CHUNK: tl.constexpr):
    """For program q (task q // R, rank q % R): the histogram bin holding the rank, and the count of
    entries in the bins before it. Level-1 histograms are per task (PER_ROW=False), level-2 per
    (task, rank) (PER_ROW=True)."""
    q = tl.program_id(0).to(tl.int64)
    row = q if PER_ROW else q // R
    rank = tl.load(rank_ptr + q)
    index = rank * 0  # int64 scalars carried through the loop
    below = rank * 0
    total = rank * 0
    for start in range(0, 65536, CHUNK):
        counts = tl.load(hist_ptr + row * 65536 + start + tl.arange(0, CHUNK))
        cumulative = tl.cumsum(counts, axis=0) + total
        # cumulative counts never decrease: the bin holding the rank is the number of bins whose
        # cumulative count does not exceed it, and the count before it is their largest one
        at_or_below = cumulative <= rank
        index += tl.sum(at_or_below.to(tl.int64), axis=0)
        below = tl.maximum(below, tl.max(tl.where(at_or_below, cumulative, 0), axis=0))
        total += tl.sum(counts, axis=0)
    tl.store(index_ptr + q, index)
    tl.store(below_ptr + q, below)


class DeviceSelect:
    """Exact ``sort(x_i)[ranks[i, r]]`` for n streamed rows and R ranks per row, on the device.

    Usage: every pass over the rows calls a counting kernel with :meth:`kernel_args`; between the
    two passes call :meth:`next_level`; then :meth:`values` gives the [n, R] float32 statistics
    and :meth:`count_above` the number of entries above (or at and above) each one.
    """

    def __init__(self, ranks, lengths: int, device):
        self.ranks = torch.as_tensor(ranks, dtype=torch.int64).to(device)
        self.n, self.R = self.ranks.shape
        if bool((self.ranks < 0).any()) or bool((self.ranks >= lengths).any()):
            raise ValueError(f"ranks {self.ranks.tolist()} out of range for rows of length {lengths}")
        self.length = lengths
        self.device = torch.device(device)
        self.level = 1
        self.hist = torch.zeros(self.n, BUCKETS, dtype=torch.int64, device=device)
        self.buckets = torch.zeros(self.n, self.R, dtype=torch.int64, device=device)  # unused at level 1

    def kernel_args(self) -> tuple:
        """(hist, buckets, LEVEL, R) for :func:`radix_count`."""
        return self.hist, self.buckets, self.level, self.R

    def _find(self, hist: torch.Tensor, ranks: torch.Tensor, per_row: bool):
        index = torch.empty(self.n * self.R, dtype=torch.int64, device=self.device)
        below = torch.empty_like(index)
        find_kernel[(self.n * self.R,)](hist, ranks.contiguous(), index, below, R=self.R, PER_ROW=per_row,
                                        CHUNK=FIND_CHUNK)
        return index.view(self.n, self.R), below.view(self.n, self.R)

    def next_level(self) -> None:
        """Find each rank's bucket from the level-1 counts; start level 2."""
        if self.level != 1:
            raise RuntimeError("next_level() called twice")
        self.buckets, self.below_high = self._find(self.hist, self.ranks, per_row=False)
        self.local_ranks = self.ranks - self.below_high
        self.hist = torch.zeros(self.n, self.R, BUCKETS, dtype=torch.int64, device=self.device)
        self.level = 2

    def _finish(self):
        if self.level != 2:
            raise RuntimeError("values() needs both levels counted")
        if not hasattr(self, "low"):
            self.low, self.below_low = self._find(self.hist, self.local_ranks, per_row=True)
        return self.low, self.below_low

    def values(self) -> torch.Tensor:
        """The selected order statistics, float32 [n, R] on the device."""
        low, _ = self._finish()
        return keys_to_float(((self.buckets - BUCKETS // 2) << 16) | low)

    def count_above(self, inclusive: bool) -> torch.Tensor:
        """[n, R] int64: entries > each statistic, or >= it with ``inclusive``."""
        low, below_low = self._finish()
        smaller = self.below_high + below_low  # entries whose key is below the statistic's key
        if not inclusive:
            smaller = smaller + torch.gather(self.hist.view(self.n * self.R, BUCKETS), 1,
                                             low.view(-1, 1)).view(self.n, self.R)
        return self.length - smaller
