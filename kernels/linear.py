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

from .tiles import as_segments, flag_bad, load_base, load_row, locate, store_out, theta


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
def linear_kernel(x_ptr, base_ptr, table_ptr, programs_ptr, n, out_ptr, weight_ptr, divisor, lam, streams_ptr,
                  threshold, keep_scale, bad_ptr, kept_ptr, HAS_BASE: tl.constexpr, DARE: tl.constexpr,
                  ALIGN: tl.constexpr, BASE_ALIGN: tl.constexpr, OUT_ALIGN: tl.constexpr, FULL: tl.constexpr,
                  BLOCK: tl.constexpr):
    """streams_ptr: [parts, 2n] DARE stream constants (and their mix32) of each part's key."""
    cols, col_ok, offsets_ptr, base_off, out_off, tile, part = locate(table_ptr, programs_ptr, n, FULL, BLOCK)
    base = load_base(base_ptr, base_off, cols, col_ok, HAS_BASE, BASE_ALIGN, BLOCK)
    total = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(n):
        tau = load_row(x_ptr, offsets_ptr, base, i, cols, col_ok, HAS_BASE, ALIGN)
        flag_bad(tau, col_ok, i, bad_ptr + part * n)
        if DARE:
            kept = col_ok & dare_keep(cols, i, streams_ptr + part * 2 * n, n, threshold)
            tl.atomic_add(kept_ptr + i, tl.sum(kept.to(tl.int64), axis=0), sem="relaxed")
            tau = tl.math.div_rn(tau * kept.to(tl.float32), keep_scale)
        total += tl.where(col_ok, tau * tl.load(weight_ptr + i), 0.0)
    tau_m = tl.math.div_rn(total, divisor)
    tau_m = theta(tau_m, base, base_ptr, base_off, cols, col_ok, lam, out_ptr, HAS_BASE, BASE_ALIGN)
    store_out(out_ptr, out_off, cols, col_ok, tau_m, OUT_ALIGN)


def linear_pass(rows, out: torch.Tensor | None, weights: torch.Tensor, divisor: float, lam: float,
                bad: torch.Tensor, kept: torch.Tensor, dare: tuple | None = None) -> None:
    """Write base + lam * sum_i w_i m_i / divisor (or the sum alone without a base) into the outputs of
    ``rows`` (a tiles.Segments with its outputs, or one tiles.Rows and ``out``).

    ``dare`` = (streams, p): drop each entry with probability p and rescale the kept ones by
    1 / (1 - p); streams is an int64 [parts, 2n] tensor (or [2n] for one part), the stream constant
    of (seed, task, key) of every task, then the mix32 of each (pcb_fast.core.rng). ``bad`` [parts, n]
    int32 receives NaN/Inf flags, ``kept`` [n] int64 the entries DARE keeps.
    """
    seg = as_segments(rows, out)
    streams, p = dare if dare is not None else (weights, 0.0)
    seg.check(seg.out_anchor, weights, bad, kept, streams)
    seg.launch(linear_kernel, seg.out_anchor, weights, float(divisor), float(lam), streams,
               int(round(p * (1 << 24))), float(1 - p), bad, kept, DARE=dare is not None, OUT_ALIGN=seg.out_align)
