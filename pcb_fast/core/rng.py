"""A counter-based random generator for DARE's drop masks (docs/design.md 5.4).

The draw for entry ``index`` of ``key`` in task ``task`` is a pure function of
(seed, task, key, index): a 32-bit integer hash, so masks never need to be stored and do not
depend on block sizes, scope, backend or the number of processes. The hash is written with 64-bit
integer ops whose products stay below 2^63 (32-bit values times 31-bit odd constants), so the
same bits come out of torch, Triton (the same int64 operations, kernels/linear.py) and plain Python.
"""

from __future__ import annotations

import zlib

import torch

MASK32 = 0xFFFFFFFF
M1, M2 = 0x21F0AAAD, 0x735A2D97  # odd multipliers below 2^31 of a two-round xorshift-multiply mix


def mix32(x: int) -> int:
    """The 32-bit mixing function on a Python int (for per-stream constants)."""
    x &= MASK32
    x ^= x >> 16
    x = (x * M1) & MASK32
    x ^= x >> 15
    x = (x * M2) & MASK32
    return x ^ (x >> 15)


def _mix32_(x: torch.Tensor) -> torch.Tensor:
    """:func:`mix32` elementwise, in place, on an int64 tensor of values in [0, 2^32) (products of
    32-bit values by 31-bit constants stay below 2^63; only the shifts make temporaries)."""
    x ^= x >> 16
    x.mul_(M1).bitwise_and_(MASK32)
    x ^= x >> 15
    x.mul_(M2).bitwise_and_(MASK32)
    x ^= x >> 15
    return x


def mix32_tensor(x: torch.Tensor) -> torch.Tensor:
    """:func:`mix32` elementwise on an int64 tensor of values in [0, 2^32)."""
    return _mix32_(x.clone())


def stream_constant(seed: int, task: int, key: str) -> int:
    """The 32-bit constant that names the stream of (seed, task, key)."""
    h = mix32(seed & MASK32)
    h = mix32(h ^ ((seed >> 32) & MASK32))
    h = mix32(h ^ (task & MASK32))
    return mix32(h ^ zlib.crc32(key.encode("utf-8")))


def uniform24(seed: int, task: int, key: str, lo: int, hi: int) -> torch.Tensor:
    """int64 draws in [0, 2^24) for entries [lo, hi) of (seed, task, key)."""
    h = stream_constant(seed, task, key)
    index = torch.arange(lo, hi, dtype=torch.int64)
    x = mix32_tensor((index & MASK32) ^ h)
    x = mix32_tensor(x ^ ((index >> 32) & MASK32) ^ mix32(h))
    return x >> 8


def keep_threshold(p: float) -> int:
    """DARE keeps an entry when its 24-bit draw is at least this."""
    return int(round(p * (1 << 24)))


def keep_masks(seed: int, key: str, lo: int, hi: int, ps) -> torch.Tensor:
    """[n, hi - lo] bool: row i is ``keep_mask(seed, i, key, lo, hi, ps[i])``, the n streams hashed
    together as one [n, m] int64 tensor (the same values, a few large ops instead of many small)."""
    streams = [stream_constant(seed, i, key) for i in range(len(ps))]
    index = torch.arange(lo, hi, dtype=torch.int64)
    x = _mix32_((index & MASK32) ^ torch.tensor(streams, dtype=torch.int64).unsqueeze(1))
    high = torch.tensor([mix32(h) for h in streams], dtype=torch.int64).unsqueeze(1)
    x ^= high if hi <= (1 << 32) else ((index >> 32) & MASK32) ^ high
    x = _mix32_(x)
    x >>= 8
    return x >= torch.tensor([keep_threshold(p) for p in ps], dtype=torch.int64).unsqueeze(1)


def keep_mask(seed: int, task: int, key: str, lo: int, hi: int, p: float) -> torch.Tensor:
    """Bool mask of the entries DARE keeps: each is dropped with probability p (to 2^-24)."""
    return uniform24(seed, task, key, lo, hi) >= keep_threshold(p)


def stream_constants(seed: int, n: int, keys) -> torch.Tensor:
    """[n, len(keys)] int64: :func:`stream_constant` of every task and key, hashed together (a pack of
    many small keys)."""
    h = mix32(mix32(seed & MASK32) ^ ((seed >> 32) & MASK32))
    tasks = torch.tensor([mix32(h ^ (task & MASK32)) for task in range(n)], dtype=torch.int64).unsqueeze(1)
    crcs = torch.tensor([zlib.crc32(key.encode("utf-8")) for key in keys], dtype=torch.int64)
    return _mix32_(tasks ^ crcs)


def keep_masks_in_streams(streams: torch.Tensor, index: torch.Tensor, ps) -> torch.Tensor:
    """[n, m] bool: :func:`keep_masks` of entries that each have their own stream (``streams`` [n, m],
    their keys' constants) and place ``index`` ([m] int64) in their key."""
    x = _mix32_((index & MASK32) ^ streams)
    x ^= ((index >> 32) & MASK32) ^ mix32_tensor(streams)
    x = _mix32_(x)
    x >>= 8
    return x >= torch.tensor([keep_threshold(p) for p in ps], dtype=torch.int64).unsqueeze(1)
