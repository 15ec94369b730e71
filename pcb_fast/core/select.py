"""Exact order statistics of streamed rows by two-level 16-bit radix select (docs/design.md 3.3).

A float32 maps to an int32 key that orders like the float (negatives get all bits but the sign
flipped). Level 1 histograms the top 16 bits of every key of each task row; the bucket holding rank
k is found from the cumulative counts. Level 2 histograms the low 16 bits of the keys inside that
bucket, which pins the exact key, hence exactly ``sort(x)[k]``: no sort, no index tensors, and
O(n * R * 65536) state for n rows and R ranks per row, whatever the length of the rows.
"""

from __future__ import annotations

import torch

from ..kernels.keys import keys_to_float, order_keys

BUCKETS = 1 << 16
_LOW_MASK = BUCKETS - 1


def high_bucket(keys: torch.Tensor) -> torch.Tensor:
    """Top 16 bits of int32 keys as a bucket index in [0, 65536)."""
    return (keys >> 16) + (BUCKETS // 2)


def bucket_floor(bucket: torch.Tensor) -> torch.Tensor:
    """The smallest float32 whose key lies in each high bucket."""
    return keys_to_float((bucket.to(torch.int64) - BUCKETS // 2) << 16)


class RadixSelect:
    """Exact ``sort(x_i)[ranks[i, r]]`` for n streamed rows and R ranks per row.

    Usage: feed every block of the rows to :meth:`count_high` (level 1), call :meth:`find_buckets`,
    feed every block again to :meth:`count_low` (level 2), then :meth:`values` gives [n, R] floats.
    Blocks are float32 [n, m]; counts are integers, so the result never depends on block order.
    """

    def __init__(self, n: int, ranks: torch.Tensor, lengths: int | torch.Tensor, comm=None):
        self.n = n
        self.ranks = torch.as_tensor(ranks, dtype=torch.int64).reshape(n, -1)
        self.R = self.ranks.shape[1]
        lengths = torch.as_tensor(lengths, dtype=torch.int64).expand(n)
        self.lengths = lengths
        if bool((self.ranks < 0).any()) or bool((self.ranks >= lengths.unsqueeze(1)).any()):
            raise ValueError(f"ranks {self.ranks.tolist()} out of range for rows of length {lengths.tolist()}")
        self.high = torch.zeros(n, BUCKETS, dtype=torch.int64)
        self.low = None
        self.comm = comm  # pcb_fast.io.distributed.Comm: histograms are summed over ranks before use
        self._low_reduced = False
        self.buckets = None
        self._row_offsets = (torch.arange(n, dtype=torch.int32) * BUCKETS).unsqueeze(1)

    # ---- level 1
    def count_high(self, block: torch.Tensor) -> None:
        """Add the top-16-bit histogram of a float32 [n, m] block."""
        flat = (high_bucket(order_keys(block)) + self._row_offsets).reshape(-1)
        self.high += torch.bincount(flat, minlength=self.n * BUCKETS).view(self.n, BUCKETS)

    def find_buckets(self) -> torch.Tensor:
        """Bucket of each rank ([n, R] int64) and the count below it; starts level 2."""
        if self.comm is not None:
            self.comm.sum_(self.high)
        cumulative = self.high.cumsum(1)
        self.buckets = torch.searchsorted(cumulative, self.ranks, right=True)
        below = torch.gather(cumulative, 1, self.buckets) - torch.gather(self.high, 1, self.buckets)
        self._local_ranks = self.ranks - below
        self.low = torch.zeros(self.n, self.R, BUCKETS, dtype=torch.int64)
        return self.buckets

    # ---- level 2
    def count_low(self, block: torch.Tensor) -> None:
        """Add the low-16-bit histogram of the entries of a block that fall in the chosen buckets."""
        keys = order_keys(block)
        high = high_bucket(keys)
        low = keys & _LOW_MASK
        for r in range(self.R):
            inside = high == self.buckets[:, r : r + 1]
            flat = torch.masked_select(low + (self._row_offsets * self.R + r * BUCKETS), inside).long()
            # Few entries fall in a bucket: scatter-add them rather than bincount a full histogram.
            self.low.view(-1).index_put_((flat,), torch.ones_like(flat), accumulate=True)

    def values(self) -> torch.Tensor:
        """The selected order statistics, float32 [n, R]."""
        keys = ((self.buckets - BUCKETS // 2) << 16) | self._low_index()
        return keys_to_float(keys)

    def _low_index(self) -> torch.Tensor:
        if self.comm is not None and not self._low_reduced:
            self.comm.sum_(self.low)
            self._low_reduced = True
        cumulative = self.low.cumsum(2)
        return torch.searchsorted(cumulative, self._local_ranks.unsqueeze(2), right=True).squeeze(2)

    def count_above(self, inclusive: bool) -> torch.Tensor:
        """[n, R] int64: entries > each selected value, or >= it with ``inclusive``."""
        low = self._low_index().unsqueeze(2)
        smaller = (self.ranks - self._local_ranks) + torch.gather(self.low.cumsum(2), 2, low).squeeze(2)
        if inclusive:  # the count above excludes the bin of the value itself
            smaller -= torch.gather(self.low, 2, low).squeeze(2)
        return self.lengths.unsqueeze(1) - smaller


class TailSelect:
    """Exact ``sort(x_i)[low_rank]`` and ``sort(x_i)[D - 1 - high_rank]`` when both ranks lie near
    the ends of the rows (the outlier clip of PCB): one pass, no histogram.

    Each task keeps candidate sets of its ``low_rank + 1`` smallest and ``high_rank + 1`` largest
    values seen so far; once a set is full, only values beyond its current bound can enter. A block
    is first reduced to the min and max of each run of CHUNK entries, and only the runs that reach
    past a bound are looked at, so after the first blocks a pass costs about one min/max reduction.
    Bounds come from the last compaction and are never tighter than the true ones: exact results.
    """

    CHUNK = 64

    def __init__(self, n: int, low_rank: int, high_rank: int):
        self.n = n
        self.k_low, self.k_high = low_rank + 1, high_rank + 1
        # candidates per task: a list of parts and their total size, compacted to k when it reaches 2k
        self.low = [([], 0) for _ in range(n)]
        self.high = [([], 0) for _ in range(n)]
        self.low_bound = torch.full((n, 1), float("inf"))
        self.high_bound = torch.full((n, 1), float("-inf"))

    def update(self, block: torch.Tensor, extremes=None, absolute: bool = False) -> None:
        """Feed a float32 [n, m] block. ``extremes``: the [n, m // CHUNK] (min, max) of its runs when
        the caller has them (a compiled loop); with ``absolute``, the values fed are |block| (the
        runs' extremes are those of |block|) without |block| being formed."""
        n, m = block.shape
        body = m - m % self.CHUNK
        if body:
            runs = block[:, :body].reshape(n, body // self.CHUNK, self.CHUNK)
            run_min, run_max = torch.aminmax(runs, dim=2) if extremes is None else extremes
            self._add_runs(runs, run_min < self.low_bound, largest=False, absolute=absolute)
            self._add_runs(runs, run_max > self.high_bound, largest=True, absolute=absolute)
        if body < m:
            rest = block[:, body:].unsqueeze(1)
            self._add_runs(rest, torch.ones(n, 1, dtype=torch.bool), largest=False, absolute=absolute)
            self._add_runs(rest, torch.ones(n, 1, dtype=torch.bool), largest=True, absolute=absolute)

    def _add_runs(self, runs: torch.Tensor, reaching: torch.Tensor, largest: bool, absolute: bool = False) -> None:
        where = reaching.nonzero()  # (task, run), task-major
        if not where.numel():
            return
        task = where[:, 0]
        data = runs[task, where[:, 1]]
        if absolute:
            data = data.abs()
        bounds = self.high_bound if largest else self.low_bound
        passing = data > bounds[task] if largest else data < bounds[task]
        counts = torch.zeros(self.n, dtype=torch.int64).index_add_(0, task, passing.sum(1)).tolist()
        parts = torch.masked_select(data, passing).split(counts)
        sets, k = (self.high, self.k_high) if largest else (self.low, self.k_low)
        for i, part in enumerate(parts):
            if not counts[i]:
                continue
            pending, size = sets[i]
            pending.append(part)
            size += counts[i]
            if size >= 2 * k or (size >= k and bool(torch.isinf(bounds[i, 0]))):
                kept = self._best(pending, k, largest)
                bounds[i, 0] = kept.min() if largest else kept.max()
                pending, size = [kept], k
            sets[i] = (pending, size)

    @staticmethod
    def _best(parts, k, largest):
        return torch.topk(torch.cat(parts), k, largest=largest, sorted=False).values

    def values(self) -> torch.Tensor:
        """[n, 2]: the low and the high order statistic of every task."""
        out = torch.empty(self.n, 2)
        for i in range(self.n):
            out[i, 0] = self._best(self.low[i][0], self.k_low, largest=False).max()
            out[i, 1] = self._best(self.high[i][0], self.k_high, largest=True).min()
        return out
