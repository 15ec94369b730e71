"""Weighted sums of task vectors in one pass: average, task arithmetic, DARE (docs/design.md 5.1, 5.2, 5.4).

``linear_kernel`` writes base + lam * sum_i w_i m_i(tau_i) / divisor for a tile, where m_i is the
identity or DARE's drop-and-rescale; the sum runs in task order. DARE's draw for entry j of task i is
the counter-based hash of pcb_fast.core.rng (two rounds of a 32-bit xorshift-multiply mix), computed
in uint32 arithmetic whose multiplies wrap mod 2^32 as the definition's do, so the kernel keeps exactly
the entries the CPU path keeps.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .tiles import Rows, columns, flag_bad, launch_config, load_base, load_row


@triton.jit
def mix32(x):
    """pcb_fast.core.rng.mix32 on uint32 values (products wrap mod 2^32)."""
    x = x ^ (x >> 16)
    x = x * 0x21F0AAAD
    x = x ^ (x >> 15)
    x = x * 0x735A2D97
    return x ^ (x >> 15)


@triton.jit
def dare_keep(cols, i, streams_ptr, n, threshold):
    """[BLOCK] bool: DARE keeps entry ``cols`` of task i (pcb_fast.core.rng.keep_mask)."""
    h = tl.load(streams_ptr + i).to(tl.uint32)  # stream constant of (seed, task, key), below 2^32
    mh = tl.load(streams_ptr + n + i).to(tl.uint32)  # mix32 of it
    x = mix32(cols.to(tl.uint32) ^ h)  # the low 32 bits of the index
    x = mix32(x ^ (cols >> 32).to(tl.uint32) ^ mh)
    return (x >> 8) >= threshold.to(tl.uint32)


@triton.jit
def linear_kernel(x_ptr, offsets_ptr, base_ptr, out_ptr, n, m, weight_ptr, divisor, lam, streams_ptr, threshold,
                  keep_scale, bad_ptr, kept_ptr, HAS_BASE: tl.constexpr, DARE: tl.constexpr, ALIGN: tl.constexpr,
                  BLOCK: tl.constexpr):
    cols, col_ok = columns(m, BLOCK)
    base = load_base(base_ptr, cols, col_ok, HAS_BASE, BLOCK)
    total = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(n):
        tau = load_row(x_ptr, offsets_ptr, base, i, cols, col_ok, HAS_BASE, ALIGN)
        flag_bad(tau, col_ok, i, bad_ptr)
        if DARE:
            kept = col_ok & dare_keep(cols, i, streams_ptr, n, threshold)
            tl.atomic_add(kept_ptr + i, tl.sum(kept.to(tl.int64), axis=0), sem="relaxed")
            tau = tau * kept.to(tl.float32) / keep_scale
        total += tl.where(col_ok, tau * tl.load(weight_ptr + i), 0.0)
    tau_m = total / divisor
    if HAS_BASE:
        tau_m = base + lam * tau_m
    tl.store(out_ptr + cols, tau_m.to(out_ptr.dtype.element_ty), mask=col_ok)


def linear_pass(rows: Rows, out: torch.Tensor, weights: torch.Tensor, divisor: float, lam: float, bad: torch.Tensor,
                kept: torch.Tensor, dare: tuple | None = None) -> None:
    """Write base + lam * sum_i w_i m_i / divisor (or the sum alone without a base) into ``out``.

    ``dare`` = (streams, p): drop each entry with probability p and rescale the kept ones by
    1 / (1 - p); streams is an int64 [2n] tensor, the stream constant of (seed, task, key) of every
    task, then the mix32 of each (pcb_fast.core.rng). ``bad`` [n] int32 receives NaN/Inf flags, ``kept``
    [n] int64 the entries DARE keeps.
    """
    out_flat = out.view(-1)
    grid, base, meta = launch_config(rows, out, weights, bad, kept)
    streams, p = dare if dare is not None else (weights, 0.0)
    linear_kernel[grid](rows.anchor, rows.offsets, base, out_flat, rows.n, rows.m, weights, float(divisor),
                        float(lam), streams, int(round(p * (1 << 24))), float(1 - p), bad, kept,
                        DARE=dare is not None, **meta)
