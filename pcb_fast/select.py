"""Exact order statistics of streamed rows by two-level 16-bit radix select (DESIGN.md 3).

A float32 maps to an int32 key that orders like the float (negatives get all bits but the sign
flipped). Level 1 histograms the top 16 bits of every key of each task row; the bucket holding rank
k is found from the cumulative counts. Level 2 histograms the low 16 bits of the keys inside that
bucket, which pins the exact key, hence exactly ``sort(x)[k]``: no sort, no index tensors, and
O(n * R * 65536) state for n rows and R ranks per row, whatever the length of the rows.
"""

from __future__ import annotations

import torch

BUCKETS = 1 << 16
_LOW_MASK = BUCKETS - 1


def order_keys(x: torch.Tensor) -> torch.Tensor:
    """int32 keys of float32 ``x`` with key order == float order (-0.0 sorts just below +0.0)."""
    bits = x.contiguous().view(torch.int32)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def keys_to_float(keys: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`order_keys` (the map is an involution on int32)."""
    keys = keys.to(torch.int32)
    return (keys ^ ((keys >> 31) & 0x7FFFFFFF)).view(torch.float32)


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

    def __init__(self, n: int, ranks: torch.Tensor, lengths: int | torch.Tensor):
        self.n = n
        self.ranks = torch.as_tensor(ranks, dtype=torch.int64).reshape(n, -1)
        self.R = self.ranks.shape[1]
        lengths = torch.as_tensor(lengths, dtype=torch.int64).expand(n)
        if bool((self.ranks < 0).any()) or bool((self.ranks >= lengths.unsqueeze(1)).any()):
            raise ValueError(f"ranks {self.ranks.tolist()} out of range for rows of length {lengths.tolist()}")
        self.high = torch.zeros(n, BUCKETS, dtype=torch.int64)
        self.low = None
        self.buckets = None
        self._row_offsets = (torch.arange(n, dtype=torch.int32) * BUCKETS).unsqueeze(1)

    # ---- level 1
    def count_high(self, block: torch.Tensor) -> None:
        """Add the top-16-bit histogram of a float32 [n, m] block."""
        self.count_high_keys(high_bucket(order_keys(block)))

    def count_high_keys(self, buckets: torch.Tensor) -> None:
        """Add already computed high buckets ([n, m] int32) to the level-1 histogram."""
        flat = (buckets + self._row_offsets).reshape(-1)
        self.high += torch.bincount(flat, minlength=self.n * BUCKETS).view(self.n, BUCKETS)

    def find_buckets(self) -> torch.Tensor:
        """Bucket of each rank ([n, R] int64) and the count below it; starts level 2."""
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
        cumulative = self.low.cumsum(2)
        low = torch.searchsorted(cumulative, self._local_ranks.unsqueeze(2), right=True).squeeze(2)
        keys = ((self.buckets - BUCKETS // 2) << 16) | low
        return keys_to_float(keys)
