"""Weighted sums of task vectors in one pass: average, task arithmetic, DARE (docs/design.md 5.1, 5.2, 5.4).

``linear_kernel`` writes base + lam * sum_i w_i m_i(tau_i) / divisor for a tile, where m_i is the
identity or DARE's drop-and-rescale. DARE's draw for entry j of task i is the counter-based hash
of pcb_fast.core.rng (two rounds of a 32-bit xorshift-multiply mix on int64 values below 2^32, whose
products stay below 2^63), so the kernel keeps exactly the entries the CPU path keeps.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .tiles import Rows, flag_bad, launch_config, load_tau

@triton.jit
def mix32(x):
    """pcb_fast.core.rng.mix32 on int64 values in [0, 2^32)."""
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & 0xFFFFFFFF
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & 0xFFFFFFFF
    return x ^ (x >> 15)


@triton.jit
def dare_keep(cols, rows, row_ok, streams_ptr, n, threshold):
    """[NT, BLOCK] bool: DARE keeps entry ``cols`` of each task (pcb_fast.core.rng.keep_mask)."""
    h = tl.load(streams_ptr + rows, mask=row_ok, other=0)[:, None]  # stream constant of (seed, task, key)
    mh = tl.load(streams_ptr + n + rows, mask=row_ok, other=0)[:, None]  # mix32 of it
    index = cols[None, :].to(tl.int64)
    x = mix32((index & 0xFFFFFFFF) ^ h)
    x = mix32(x ^ ((index >> 32) & 0xFFFFFFFF) ^ mh)
    return (x >> 8) >= threshold


@triton.jit
def linear_kernel(x_ptr, offsets_ptr, base_ptr, out_ptr, n, m, weight_ptr, divisor, lam, streams_ptr, threshold,
                  keep_scale, bad_ptr, kept_ptr, HAS_BASE: tl.constexpr, WRITE_THETA: tl.constexpr,
                  DARE: tl.constexpr, NT: tl.constexpr, BLOCK: tl.constexpr):
    tau, valid, rows, row_ok, cols, col_ok = load_tau(x_ptr, offsets_ptr, base_ptr, n, m, HAS_BASE, NT, BLOCK)
    flag_bad(tau, valid, rows, row_ok, bad_ptr)
    if DARE:
        kept = dare_keep(cols, rows, row_ok, streams_ptr, n, threshold)
        tl.atomic_add(kept_ptr + rows, tl.sum((valid & kept).to(tl.int64), axis=1), mask=row_ok, sem="relaxed")
        tau = tau * kept.to(tl.float32) / keep_scale
    weight = tl.load(weight_ptr + rows, mask=row_ok, other=0.0)[:, None]
    tau_m = tl.sum(tl.where(valid, tau * weight, 0.0), axis=0) / divisor
    if WRITE_THETA:
        tau_m = tl.load(base_ptr + cols, mask=col_ok, other=0.0).to(tl.float32) + lam * tau_m
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
                        WRITE_THETA=rows.base is not None, DARE=dare is not None, **meta)
