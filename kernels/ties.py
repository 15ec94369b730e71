"""TIES and DARE-TIES on the device: trim (or drop), sign election, disjoint mean (docs/design.md 5.3, 5.5).

Two passes after the trim threshold is known (the |tau| radix select of select.py):
- ``sign_kernel`` sums the elected signs of its tile into one int64 counter (the whole model's
  majority sign, for positions whose sum is zero), an integer atomic;
- ``ties_merge_kernel`` recomputes the trimmed weighted vectors and their elected signs, keeps the
  entries that agree, and writes base + lam * (sum of the agreeing values / sum of their weights).
The trim keeps |tau_i| >= t_i (the authors' kthvalue threshold), or exactly k entries (mergekit's
top-k: ties at the threshold kept in position order, from per-tile counts of equal entries and
their prefix sums); DARE-TIES replaces it by DARE's counter-based drop and rescale. Each program
loops over the tasks; the weighted vectors are summed in task order with the CPU path's float32
operations and no fused multiply-add, so the elected signs equal the CPU's exactly (exact
cancellations, common with quantized deltas, included).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .linear import dare_keep
from .select import group_of
from .tiles import as_segments, flag_bad, load_base, load_row, locate, sign, store_out, theta


@triton.jit
def trim_mask(tau, col_ok, cols, i, n, t_ptr, streams_ptr, threshold, ties_ptr, budget_ptr, tile,
              DARE: tl.constexpr, EXACT: tl.constexpr):
    """[BLOCK] bool: the entries of task i the trim keeps. Authors' TIES: |tau| >= t. Exact top-k:
    |tau| > t, plus the entries equal to t in position order while the task's budget lasts
    (``ties_ptr``: the equal entries of every earlier tile, per task). DARE: its counter-based draw."""
    # one return at the end: a return inside a constexpr branch leaves the code after it compiled
    if DARE:
        kept = col_ok & dare_keep(cols, i, streams_ptr, n, threshold)
    elif EXACT:
        t = tl.load(t_ptr + i)
        magnitude = tl.abs(tau)
        equal = col_ok & (magnitude == t)
        before = tl.load(ties_ptr + tile * n + i)  # equal entries of task i in earlier tiles
        order = tl.cumsum(equal.to(tl.int32), axis=0)  # 1-based rank of each equal entry in this tile
        left = tl.minimum(tl.maximum(tl.load(budget_ptr + i) - before, 0), 1 << 30).to(tl.int32)  # budget left
        kept = col_ok & ((magnitude > t) | (equal & (order <= left)))
    else:
        kept = col_ok & (tl.abs(tau) >= tl.load(t_ptr + i))
    return kept


@triton.jit
def equal_count_kernel(x_ptr, base_ptr, table_ptr, programs_ptr, n, t_ptr, counts_ptr, HAS_BASE: tl.constexpr,
                       PER_PART: tl.constexpr, ALIGN: tl.constexpr, BASE_ALIGN: tl.constexpr, FULL: tl.constexpr,
                       BLOCK: tl.constexpr):
    """counts[tile, i]: entries of task i in this tile with |tau| == t_i (t: [groups, n])."""
    cols, col_ok, offsets_ptr, base_off, out_off, tile, part = locate(table_ptr, programs_ptr, n, FULL, BLOCK)
    t_ptr += group_of(part, PER_PART) * n
    base = load_base(base_ptr, base_off, cols, col_ok, HAS_BASE, BASE_ALIGN, BLOCK)
    for i in range(n):
        tau = load_row(x_ptr, offsets_ptr, base, i, cols, col_ok, HAS_BASE, ALIGN)
        equal = col_ok & (tl.abs(tau) == tl.load(t_ptr + i))
        tl.store(counts_ptr + tile * n + i, tl.sum(equal.to(tl.int64), axis=0))


@triton.jit
def weighted_row(tau, col_ok, cols, i, n, t_ptr, weight_ptr, streams_ptr, threshold, keep_scale, ties_ptr,
                 budget_ptr, tile, DARE: tl.constexpr, EXACT: tl.constexpr):
    """(w_i = lambda_i (tau_i m_i), kept m_i, lambda_i) of task i after the trim or drop, with the CPU
    path's float32 operations in its order (the kernels run without fused multiply-adds)."""
    kept = trim_mask(tau, col_ok, cols, i, n, t_ptr, streams_ptr, threshold, ties_ptr, budget_ptr, tile, DARE,
                     EXACT)
    tau = tau * kept.to(tl.float32)
    if DARE:
        tau = tl.math.div_rn(tau, keep_scale)
    weight = tl.load(weight_ptr + i)
    return tl.where(col_ok, tau * weight, 0.0), kept, weight


@triton.jit
def elected_sum(x_ptr, offsets_ptr, base, cols, col_ok, n, t_ptr, weight_ptr, streams_ptr, threshold, keep_scale,
                ties_ptr, budget_ptr, tile, kept_ptr, bad_ptr, COUNT: tl.constexpr, HAS_BASE: tl.constexpr,
                DARE: tl.constexpr, EXACT: tl.constexpr, ALIGN: tl.constexpr, BLOCK: tl.constexpr):
    """sum_i w_i in task order (the CPU's order, so the elected signs are the CPU's); with COUNT,
    also the kept entries per task and the NaN/Inf flags."""
    total = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(n):
        tau = load_row(x_ptr, offsets_ptr, base, i, cols, col_ok, HAS_BASE, ALIGN)
        weighted, kept, _ = weighted_row(tau, col_ok, cols, i, n, t_ptr, weight_ptr, streams_ptr, threshold,
                                         keep_scale, ties_ptr, budget_ptr, tile, DARE, EXACT)
        if COUNT:
            flag_bad(tau, col_ok, i, bad_ptr)
            tl.atomic_add(kept_ptr + i, tl.sum(kept.to(tl.int64), axis=0), sem="relaxed")
        total += weighted
    return total


@triton.jit
def sign_kernel(x_ptr, base_ptr, table_ptr, programs_ptr, n, t_ptr, weight_ptr, streams_ptr, threshold, keep_scale,
                ties_ptr, budget_ptr, total_ptr, kept_ptr, bad_ptr, HAS_BASE: tl.constexpr, DARE: tl.constexpr,
                EXACT: tl.constexpr, PER_PART: tl.constexpr, ALIGN: tl.constexpr, BASE_ALIGN: tl.constexpr,
                FULL: tl.constexpr, BLOCK: tl.constexpr):
    """The elected signs summed into total[group]; t, budget: [groups, n] (PER_PART: a group per part)."""
    cols, col_ok, offsets_ptr, base_off, out_off, tile, part = locate(table_ptr, programs_ptr, n, FULL, BLOCK)
    g = group_of(part, PER_PART)
    t_ptr += g * n
    budget_ptr += g * n
    total_ptr += g
    base = load_base(base_ptr, base_off, cols, col_ok, HAS_BASE, BASE_ALIGN, BLOCK)
    streams_ptr += part * 2 * n  # this part's key: [parts, 2n] stream constants
    total = elected_sum(x_ptr, offsets_ptr, base, cols, col_ok, n, t_ptr, weight_ptr, streams_ptr, threshold,
                        keep_scale, ties_ptr, budget_ptr, tile, kept_ptr, bad_ptr + part * n, True, HAS_BASE, DARE, EXACT,
                        ALIGN, BLOCK)
    elected = sign(total)
    tl.atomic_add(total_ptr, tl.sum(tl.where(col_ok, elected, 0.0), axis=0).to(tl.int64), sem="relaxed")


@triton.jit
def ties_merge_kernel(x_ptr, base_ptr, table_ptr, programs_ptr, n, out_ptr, t_ptr, weight_ptr, streams_ptr,
                      threshold, keep_scale, ties_ptr, budget_ptr, fill_ptr, lam, HAS_BASE: tl.constexpr,
                      DARE: tl.constexpr, EXACT: tl.constexpr, PER_PART: tl.constexpr, ALIGN: tl.constexpr,
                      BASE_ALIGN: tl.constexpr, OUT_ALIGN: tl.constexpr, FULL: tl.constexpr, BLOCK: tl.constexpr):
    """The disjoint mean; t, budget [groups, n], fill [groups] (PER_PART: a group per part)."""
    cols, col_ok, offsets_ptr, base_off, out_off, tile, part = locate(table_ptr, programs_ptr, n, FULL, BLOCK)
    g = group_of(part, PER_PART)
    t_ptr += g * n
    budget_ptr += g * n
    fill_ptr += g
    base = load_base(base_ptr, base_off, cols, col_ok, HAS_BASE, BASE_ALIGN, BLOCK)
    streams_ptr += part * 2 * n  # this part's key: [parts, 2n] stream constants
    total = elected_sum(x_ptr, offsets_ptr, base, cols, col_ok, n, t_ptr, weight_ptr, streams_ptr, threshold,
                        keep_scale, ties_ptr, budget_ptr, tile, fill_ptr, fill_ptr, False, HAS_BASE, DARE, EXACT,
                        ALIGN, BLOCK)
    elected = sign(total)
    elected = tl.where(elected == 0, tl.load(fill_ptr), elected)
    num = tl.zeros([BLOCK], dtype=tl.float32)
    den = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(n):
        tau = load_row(x_ptr, offsets_ptr, base, i, cols, col_ok, HAS_BASE, ALIGN)
        weighted, kept, weight = weighted_row(tau, col_ok, cols, i, n, t_ptr, weight_ptr, streams_ptr, threshold,
                                              keep_scale, ties_ptr, budget_ptr, tile, DARE, EXACT)
        agree = col_ok & tl.where(elected > 0, weighted > 0, weighted < 0)
        num += tl.where(agree, weighted, 0.0)
        den += tl.where(agree, weight, 0.0)
    tau_m = tl.math.div_rn(num, tl.where(den == 0, 1.0, den))
    tau_m = theta(tau_m, base, base_ptr, base_off, cols, col_ok, lam, out_ptr, HAS_BASE, BASE_ALIGN)
    store_out(out_ptr, out_off, cols, col_ok, tau_m, OUT_ALIGN)


# warps of the sign pass's last tiles: at 16, its DARE form spilled 12 bytes on triton 3.6 (div_rn's
# registers); 8 spilled on neither 3.6 nor 3.9 (benchmarks/kernel_report.py). The merge pass keeps 16.
SIGN_TAIL_WARPS = 8

# The elected signs must be the CPU's exactly: no fused multiply-add may merge w_i's rounding into the
# sum (a launch option of the compiler; the interpreter never fuses).
NO_FMA = dict(enable_fp_fusion=False)


class Trim:
    """How a pass trims the task vectors: by a threshold t [n] (the authors' |tau| >= t), by an
    exact top-k (``exact``: equal-entry counts before each tile [tiles, n] and budgets [n], tiles
    numbered in position order across the scope group), or by DARE's drop (``dare`` = (streams
    [parts, 2n], p))."""

    def __init__(self, threshold=None, dare=None, exact=None):
        self.threshold, self.dare, self.exact = threshold, dare, exact

    def args(self) -> tuple:
        if self.dare is not None:
            streams, p = self.dare
            return streams, streams, int(round(p * (1 << 24))), float(1 - p), streams, streams
        ties, budget = self.exact if self.exact is not None else (self.threshold, self.threshold)
        return self.threshold, self.threshold, 0, 1.0, ties, budget

    def meta(self) -> dict:
        return dict(DARE=self.dare is not None, EXACT=self.exact is not None)


def equal_counts(rows, threshold: torch.Tensor, counts: torch.Tensor) -> None:
    """Write the entries equal to t of each tile into counts[tile] ([tiles, n] int64)."""
    seg = as_segments(rows)
    seg.check(threshold, counts)
    seg.launch(equal_count_kernel, threshold, counts, PER_PART=seg.per_part)


def sign_pass(rows, weights: torch.Tensor, total: torch.Tensor, kept: torch.Tensor, bad: torch.Tensor,
              trim: Trim) -> None:
    """Add the elected signs of ``rows`` to ``total`` (int64 [1]), the kept entries per task to
    ``kept`` (int64 [n]) and NaN/Inf flags to ``bad`` ([parts, n])."""
    seg = as_segments(rows)
    t, *rest = trim.args()
    seg.check(weights, total, kept, bad, t)
    seg.launch(sign_kernel, t, weights, *rest, total, kept, bad, PER_PART=seg.per_part, tail_warps=SIGN_TAIL_WARPS,
               **trim.meta(), **NO_FMA)


def ties_merge_pass(rows, out: torch.Tensor | None, weights: torch.Tensor, fill: torch.Tensor, lam: float,
                    trim: Trim) -> None:
    """Write the disjoint mean (base + lam * it, with a base) into the outputs of ``rows`` (a
    tiles.Segments with its outputs, or one tiles.Rows and ``out``); ``fill`` (float32 [1]) is the
    sign given to positions whose elected sign is zero."""
    seg = as_segments(rows, out)
    t, *rest = trim.args()
    seg.check(seg.out_anchor, weights, fill, t)
    seg.launch(ties_merge_kernel, seg.out_anchor, t, weights, *rest, fill, float(lam), OUT_ALIGN=seg.out_align,
               PER_PART=seg.per_part, **trim.meta(), **NO_FMA)
