"""PCB scores fused with the radix-select counts: scores never reach memory (docs/design.md 2.2, 2.3, 4).

Each program loads an [NT, BLOCK] tile of task vectors (or of fine-tuned weights, minus the base,
in registers) and
- ``magnitude_kernel``: counts |tau| for the clip bounds, and flags NaN/Inf per task;
- ``official_kernel``: computes the official score P = exp(n N^2) * inter (inter "sum",
  "normalized_sum" or "pairwise", all n^2 pairs in registers), counts it and tracks max(P);
- ``pair_minmax_kernel`` / ``partition_kernel`` / ``paper_kernel``: the paper variant's per-pair
  min/max, softmax partition sums (per-program partials, summed in a fixed order by the caller),
  and beta, counted like P.
Min/max are integer atomics on order keys: every result is the same from run to run.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .select import KEY_MAX, KEY_MIN, DeviceSelect, order_key, radix_count
from .tiles import Rows, flag_bad, launch_config, load_tau, row_of, sign, tanh, tile_shape

INTER_CODES = {"sum": 0, "normalized_sum": 1, "pairwise": 2}


@triton.jit
def magnitude_kernel(x_ptr, offsets_ptr, base_ptr, n, m, hist_ptr, bucket_ptr, bad_ptr,
                     HAS_BASE: tl.constexpr, LEVEL: tl.constexpr, R: tl.constexpr, NT: tl.constexpr,
                     BLOCK: tl.constexpr):
    tau, valid, rows, row_ok, cols, col_ok = load_tau(x_ptr, offsets_ptr, base_ptr, n, m, HAS_BASE, NT, BLOCK)
    radix_count(order_key(tl.abs(tau)), valid, rows, row_ok, hist_ptr, bucket_ptr, LEVEL, R)
    if LEVEL == 1:
        flag_bad(tau, valid, rows, row_ok, bad_ptr)


@triton.jit
def official_score(tau, rows, row_ok, n, lo_ptr, hi_ptr, span_ptr, INTER: tl.constexpr, NT: tl.constexpr):
    """P of a tile (docs/design.md 2.2 steps 1-5); also returns the clipped tau~ = sign(tau) clip(|tau|)."""
    lo = tl.load(lo_ptr + rows, mask=row_ok, other=0.0)[:, None]
    hi = tl.load(hi_ptr + rows, mask=row_ok, other=0.0)[:, None]
    span = tl.load(span_ptr + rows, mask=row_ok, other=1.0)[:, None]
    clipped = tl.minimum(tl.maximum(tl.abs(tau), lo), hi)
    normalized = (clipped - lo) / span  # span is inf for a constant row: normalises to 0
    intra = tl.exp(normalized * normalized * n)  # n <= MAX_TASKS (64): exp(n) fits in float32
    signed = sign(tau) * normalized
    if INTER == 0:
        inter = tanh(tau * tl.sum(tau, axis=0)[None, :])
    elif INTER == 1:
        inter = tanh(tau * tl.sum(signed, axis=0)[None, :])
    else:
        inter = tl.zeros_like(tau)
        for j in tl.static_range(NT):  # padded rows are zero and add tanh(0) = 0
            inter += tanh(signed * row_of(signed, rows, j)[None, :])
    return intra * inter, sign(tau) * clipped


@triton.jit
def official_kernel(x_ptr, offsets_ptr, base_ptr, n, m, lo_ptr, hi_ptr, span_ptr,
                    hist_ptr, bucket_ptr, peak_ptr,
                    HAS_BASE: tl.constexpr, INTER: tl.constexpr, LEVEL: tl.constexpr, R: tl.constexpr,
                    NT: tl.constexpr, BLOCK: tl.constexpr):
    tau, valid, rows, row_ok, cols, col_ok = load_tau(x_ptr, offsets_ptr, base_ptr, n, m, HAS_BASE, NT, BLOCK)
    score, _ = official_score(tau, rows, row_ok, n, lo_ptr, hi_ptr, span_ptr, INTER, NT)
    key = order_key(score)
    radix_count(key, valid, rows, row_ok, hist_ptr, bucket_ptr, LEVEL, R)
    if LEVEL == 1:
        tl.atomic_max(peak_ptr + rows, tl.max(tl.where(valid, key, KEY_MIN), axis=1), mask=row_ok, sem="relaxed")


@triton.jit
def pair_normalized(tau, rows, row_ok, n, i, lo_ptr, span_ptr):
    """Row j: Norm(tau_i * tau_j) over the tile, with the pair's global min and span."""
    products = tau * row_of(tau, rows, i)[None, :]
    lo = tl.load(lo_ptr + i * n + rows, mask=row_ok, other=0.0)[:, None]
    span = tl.load(span_ptr + i * n + rows, mask=row_ok, other=1.0)[:, None]
    return (products - lo) / span


@triton.jit
def pair_minmax_kernel(x_ptr, offsets_ptr, base_ptr, n, m, min_ptr, max_ptr, bad_ptr,
                       HAS_BASE: tl.constexpr, NT: tl.constexpr, BLOCK: tl.constexpr):
    tau, valid, rows, row_ok, cols, col_ok = load_tau(x_ptr, offsets_ptr, base_ptr, n, m, HAS_BASE, NT, BLOCK)
    flag_bad(tau, valid, rows, row_ok, bad_ptr)
    for i in tl.static_range(NT):
        if i < n:
            key = order_key(tau * row_of(tau, rows, i)[None, :])
            low = tl.min(tl.where(valid, key, KEY_MAX), axis=1)
            high = tl.max(tl.where(valid, key, KEY_MIN), axis=1)
            tl.atomic_min(min_ptr + i * n + rows, low, mask=row_ok, sem="relaxed")
            tl.atomic_max(max_ptr + i * n + rows, high, mask=row_ok, sem="relaxed")


@triton.jit
def partition_kernel(x_ptr, offsets_ptr, base_ptr, n, m, lo_ptr, span_ptr, peak_ptr, inter_ptr, intra_ptr,
                     first_program, HAS_BASE: tl.constexpr, NT: tl.constexpr, BLOCK: tl.constexpr):
    """This program's partial softmax sums: inter[i, j] = sum exp(N_ij - peak_ij), intra[i] = sum
    exp(n N_ii - n peak_ii), stored at row ``first_program + program id`` of the partial buffers."""
    tau, valid, rows, row_ok, cols, col_ok = load_tau(x_ptr, offsets_ptr, base_ptr, n, m, HAS_BASE, NT, BLOCK)
    slot = first_program + tl.program_id(0).to(tl.int64)
    for i in tl.static_range(NT):
        if i < n:
            normalized = pair_normalized(tau, rows, row_ok, n, i, lo_ptr, span_ptr)
            peak = tl.load(peak_ptr + i * n + rows, mask=row_ok, other=0.0)[:, None]
            terms = tl.where(valid, tl.exp(normalized - peak), 0.0)
            tl.store(inter_ptr + (slot * n + i) * n + rows, tl.sum(terms, axis=1), mask=row_ok)
            peak_ii = tl.load(peak_ptr + i * n + i)
            intra = tl.exp(row_of(normalized, rows, i) * n - n * peak_ii)
            tl.store(intra_ptr + slot * n + i, tl.sum(tl.where(col_ok, intra, 0.0), axis=0))


@triton.jit
def paper_score(tau, valid, rows, row_ok, col_ok, n, lo_ptr, span_ptr, peak_ptr, inv_inter_ptr, inv_intra_ptr,
                NT: tl.constexpr):
    """beta_i = Softmax(n Norm(tau_i^2)) * sum_j Softmax(Norm(tau_i tau_j)) of a tile (docs/design.md 2.3)."""
    beta = tl.zeros_like(tau)
    for i in tl.static_range(NT):
        if i < n:
            normalized = pair_normalized(tau, rows, row_ok, n, i, lo_ptr, span_ptr)
            peak = tl.load(peak_ptr + i * n + rows, mask=row_ok, other=0.0)[:, None]
            inv_inter = tl.load(inv_inter_ptr + i * n + rows, mask=row_ok, other=0.0)[:, None]
            inter = tl.sum(tl.where(valid, tl.exp(normalized - peak) * inv_inter, 0.0), axis=0)
            peak_ii = tl.load(peak_ptr + i * n + i)
            intra = tl.exp(row_of(normalized, rows, i) * n - n * peak_ii) * tl.load(inv_intra_ptr + i)
            beta = tl.where(rows[:, None] == i, (intra * inter)[None, :], beta)
    return beta


@triton.jit
def paper_kernel(x_ptr, offsets_ptr, base_ptr, n, m, lo_ptr, span_ptr, peak_ptr, inv_inter_ptr, inv_intra_ptr,
                 hist_ptr, bucket_ptr,
                 HAS_BASE: tl.constexpr, LEVEL: tl.constexpr, R: tl.constexpr, NT: tl.constexpr,
                 BLOCK: tl.constexpr):
    tau, valid, rows, row_ok, cols, col_ok = load_tau(x_ptr, offsets_ptr, base_ptr, n, m, HAS_BASE, NT, BLOCK)
    beta = paper_score(tau, valid, rows, row_ok, col_ok, n, lo_ptr, span_ptr, peak_ptr, inv_inter_ptr,
                       inv_intra_ptr, NT)
    radix_count(order_key(beta), valid, rows, row_ok, hist_ptr, bucket_ptr, LEVEL, R)


# ---- launchers


def programs(rows: Rows) -> int:
    """Number of programs (tiles) a pass over ``rows`` launches."""
    return triton.cdiv(rows.m, tile_shape(rows.n)[1])


def magnitude_pass(rows: Rows, select: DeviceSelect, bad: torch.Tensor) -> None:
    """Count |tau| of ``rows`` into ``select``; at level 1, set bad[i] = 1 if task i has NaN/Inf."""
    grid, base, meta = launch_config(rows, select.hist, bad)
    hist, buckets, level, r = select.kernel_args()
    magnitude_kernel[grid](rows.anchor, rows.offsets, base, rows.n, rows.m, hist, buckets, bad,
                           LEVEL=level, R=r, **meta)


def official_pass(rows: Rows, select: DeviceSelect, peak: torch.Tensor, clip: tuple, inter: str) -> None:
    """Count P of ``rows`` into ``select``; at level 1 also peak[i] = max(key of P_i) (int32 keys).

    ``clip`` = (lo, hi, span) float32 [n] tensors (span: hi - lo, inf where 0).
    """
    lo, hi, span = clip
    grid, base, meta = launch_config(rows, select.hist, peak, lo, hi, span)
    hist, buckets, level, r = select.kernel_args()
    official_kernel[grid](rows.anchor, rows.offsets, base, rows.n, rows.m, lo, hi, span,
                          hist, buckets, peak, INTER=INTER_CODES[inter], LEVEL=level, R=r, **meta)


def pair_minmax_pass(rows: Rows, lo_key: torch.Tensor, hi_key: torch.Tensor, bad: torch.Tensor) -> None:
    """Fold min/max keys of tau_i * tau_j ([n, n] int32) and the NaN/Inf flags of ``rows``."""
    grid, base, meta = launch_config(rows, lo_key, hi_key, bad)
    pair_minmax_kernel[grid](rows.anchor, rows.offsets, base, rows.n, rows.m, lo_key, hi_key, bad, **meta)


def partition_pass(rows: Rows, pairs: tuple, inter: torch.Tensor, intra: torch.Tensor, first_program: int) -> int:
    """Write the partial softmax sums of ``rows`` into inter[first_program:], intra[first_program:]
    ([P, n, n] and [P, n] float32). ``pairs`` = (lo, span, peak) [n, n]. Returns the programs used."""
    lo, span, peak = pairs
    grid, base, meta = launch_config(rows, inter, intra, lo, span, peak)
    if first_program + grid[0] > inter.shape[0]:
        raise ValueError("partial buffers too small for this pass")
    partition_kernel[grid](rows.anchor, rows.offsets, base, rows.n, rows.m, lo, span, peak, inter, intra,
                           first_program, **meta)
    return grid[0]


def paper_pass(rows: Rows, select: DeviceSelect, pairs: tuple, inv_z: tuple) -> None:
    """Count beta of ``rows`` into ``select``. ``inv_z`` = (1/Z_inter [n, n], 1/Z_intra [n])."""
    lo, span, peak = pairs
    inv_inter, inv_intra = inv_z
    grid, base, meta = launch_config(rows, select.hist, lo, span, peak, inv_inter, inv_intra)
    hist, buckets, level, r = select.kernel_args()
    paper_kernel[grid](rows.anchor, rows.offsets, base, rows.n, rows.m, lo, span, peak, inv_inter, inv_intra,
                       hist, buckets, LEVEL=level, R=r, **meta)
