"""PCB scores fused with the radix-select counts: scores never reach memory (docs/design.md 2.2, 2.3, 4).

Each program owns BLOCK columns and loops over the tasks, reading each row of task vectors (or of
fine-tuned weights, minus the base, in registers); a score that depends on other tasks reads their
rows again from the cache, so registers do not grow with the number of tasks:
- ``magnitude_kernel``: counts |tau| for the clip bounds, and flags NaN/Inf per task;
- ``official_kernel``: computes the official score P = exp(n N^2) * inter (inter "sum" or
  "normalized_sum" from one column sum over the tasks; "pairwise" from an inner loop over the tasks),
  counts it and tracks max(P);
- ``pair_minmax_kernel`` / ``partition_kernel`` / ``paper_kernel``: the paper variant's per-pair
  min/max, softmax partition sums (per-program partials, summed in a fixed order by the caller),
  and beta, counted like P.
Sums over tasks run in task order. Min/max are integer atomics on order keys: every result is the
same from run to run.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .select import KEY_MAX, KEY_MIN, count_values, group_of, order_key
from .tiles import as_segments, flag_bad, load_base, load_row, locate, locate_at, sign, tanh

INTER_CODES = {"sum": 0, "normalized_sum": 1, "pairwise": 2}
def tail_warps(kernel: str, level: int) -> int:
    """tiles.warps of the last tiles of a counting pass (benchmarks/kernel_report.py on triton 3.6 and
    3.9): the official score around a bracket spilled at 16 warps on 3.9 (8 bytes), its radix levels
    at 8 warps on 3.6 (8 bytes, float64 rows); the |tau| pass spilled at 8 warps on 3.9 (fp32 rows)."""
    return 8 if kernel == "official_kernel" and level == 0 else 16


@triton.jit
def magnitude_kernel(x_ptr, base_ptr, table_ptr, programs_ptr, n, hist_ptr, bucket_ptr, map_ptr, bounds_ptr, tally_ptr,
                     kept_ptr, layout_ptr, copies, tiles_ptr, bad_ptr, HAS_BASE: tl.constexpr, LEVEL: tl.constexpr,
                     R: tl.constexpr, TILES: tl.constexpr, PER_PART: tl.constexpr, ALIGN: tl.constexpr,
                     BASE_ALIGN: tl.constexpr, FULL: tl.constexpr, BLOCK: tl.constexpr):
    """|tau| counted for a select (LEVEL 0: a bracket; 1 to 4: radix levels); NaN/Inf flags in the first pass.
    PER_PART: each part's statistics apart (scope "tensor")."""
    cols, col_ok, offsets_ptr, base_off, out_off, tile, part = locate(table_ptr, programs_ptr, n, FULL, BLOCK)
    g = group_of(part, PER_PART)
    base = load_base(base_ptr, base_off, cols, col_ok, HAS_BASE, BASE_ALIGN, BLOCK)
    for i in range(n):
        tau = load_row(x_ptr, offsets_ptr, base, i, cols, col_ok, HAS_BASE, ALIGN)
        count_values(tl.abs(tau), col_ok, g, i, n, tile, hist_ptr, bucket_ptr, map_ptr, bounds_ptr, tally_ptr, kept_ptr,
                     layout_ptr, copies, tiles_ptr, LEVEL, R, TILES, BLOCK)
        if LEVEL <= 1:
            flag_bad(tau, col_ok, i, bad_ptr + part * n)


@triton.jit
def clip_row(tau, i, lo_ptr, hi_ptr, span_ptr):
    """(tau~ magnitude clip(|tau_i|), its normalisation (clip - lo) / span) of task i."""
    lo = tl.load(lo_ptr + i)
    hi = tl.load(hi_ptr + i)
    span = tl.load(span_ptr + i)
    clipped = tl.minimum(tl.maximum(tl.abs(tau), lo), hi)
    return clipped, tl.math.div_rn(clipped - lo, span)  # span is inf for a constant row: normalises to 0


@triton.jit
def column_term(x_ptr, offsets_ptr, base, cols, col_ok, n, lo_ptr, hi_ptr, span_ptr, HAS_BASE: tl.constexpr,
                INTER: tl.constexpr, ALIGN: tl.constexpr, BLOCK: tl.constexpr):
    """The column sum the inter term needs, in task order: sum_j tau_j ("sum"), sum_j sign(tau_j) N_j
    ("normalized_sum"); zeros for "pairwise" (its inner loop reads the rows itself)."""
    column = tl.zeros([BLOCK], dtype=tl.float32)
    if INTER != 2:
        for j in range(n):
            tau = load_row(x_ptr, offsets_ptr, base, j, cols, col_ok, HAS_BASE, ALIGN)
            if INTER == 0:
                column += tau
            else:
                _, normalized = clip_row(tau, j, lo_ptr, hi_ptr, span_ptr)
                column += sign(tau) * normalized
    return column


@triton.jit
def official_score(tau, i, column, x_ptr, offsets_ptr, base, cols, col_ok, n, lo_ptr, hi_ptr, span_ptr,
                   HAS_BASE: tl.constexpr, INTER: tl.constexpr, ALIGN: tl.constexpr):
    """P_i over this program's columns (docs/design.md 2.2 steps 1-5); also returns the clipped
    tau~_i = sign(tau_i) clip(|tau_i|)."""
    clipped, normalized = clip_row(tau, i, lo_ptr, hi_ptr, span_ptr)
    intra = tl.exp(normalized * normalized * n)  # n <= MAX_TASKS (64): exp(n) fits in float32
    if INTER == 2:
        signed = sign(tau) * normalized
        inter = tl.zeros_like(tau)
        for j in range(n):
            other = load_row(x_ptr, offsets_ptr, base, j, cols, col_ok, HAS_BASE, ALIGN)
            _, normalized_j = clip_row(other, j, lo_ptr, hi_ptr, span_ptr)
            inter += tanh(signed * (sign(other) * normalized_j))
    else:
        inter = tanh(tau * column)
    return intra * inter, sign(tau) * clipped


@triton.jit
def official_kernel(x_ptr, base_ptr, table_ptr, programs_ptr, n, lo_ptr, hi_ptr, span_ptr,
                    hist_ptr, bucket_ptr, map_ptr, bounds_ptr, tally_ptr, kept_ptr, layout_ptr, copies, tiles_ptr,
                    peak_ptr, HAS_BASE: tl.constexpr, INTER: tl.constexpr, LEVEL: tl.constexpr, R: tl.constexpr,
                    TILES: tl.constexpr, PER_PART: tl.constexpr, ALIGN: tl.constexpr, BASE_ALIGN: tl.constexpr,
                    FULL: tl.constexpr, BLOCK: tl.constexpr):
    """P counted for a select, M_i as an atomic max of order keys (lo, hi, span, peak: [groups, n])."""
    cols, col_ok, offsets_ptr, base_off, out_off, tile, part = locate(table_ptr, programs_ptr, n, FULL, BLOCK)
    g = group_of(part, PER_PART)
    lo_ptr += g * n  # this group's clip bounds and M_i
    hi_ptr += g * n
    span_ptr += g * n
    peak_ptr += g * n
    base = load_base(base_ptr, base_off, cols, col_ok, HAS_BASE, BASE_ALIGN, BLOCK)
    column = column_term(x_ptr, offsets_ptr, base, cols, col_ok, n, lo_ptr, hi_ptr, span_ptr, HAS_BASE, INTER,
                         ALIGN, BLOCK)
    for i in range(n):
        tau = load_row(x_ptr, offsets_ptr, base, i, cols, col_ok, HAS_BASE, ALIGN)
        score, _ = official_score(tau, i, column, x_ptr, offsets_ptr, base, cols, col_ok, n, lo_ptr, hi_ptr,
                                  span_ptr, HAS_BASE, INTER, ALIGN)
        count_values(score, col_ok, g, i, n, tile, hist_ptr, bucket_ptr, map_ptr, bounds_ptr, tally_ptr, kept_ptr,
                     layout_ptr, copies, tiles_ptr, LEVEL, R, TILES, BLOCK)
        if LEVEL <= 1:
            key = order_key(score)
            tl.atomic_max(peak_ptr + i, tl.max(tl.where(col_ok, key, KEY_MIN), axis=0), sem="relaxed")


@triton.jit
def pair(i, j, n):
    """The place of pair (i, j) in an [n, n] table, in 64-bit arithmetic (docs/design.md 4)."""
    return tl.cast(i, tl.int64) * n + j  # i may be a Python int (the interpreter's loops)


@triton.jit
def pair_normalized(tau_i, tau_j, i, j, n, lo_ptr, span_ptr):
    """Norm(tau_j * tau_i) over this program's columns, with the pair's global min and span."""
    lo = tl.load(lo_ptr + pair(i, j, n))
    span = tl.load(span_ptr + pair(i, j, n))
    return tl.math.div_rn(tau_j * tau_i - lo, span)


@triton.jit
def pair_minmax_kernel(x_ptr, base_ptr, table_ptr, programs_ptr, n, min_ptr, max_ptr, bad_ptr, count,
                       HAS_BASE: tl.constexpr, PER_PART: tl.constexpr, ALIGN: tl.constexpr, BASE_ALIGN: tl.constexpr,
                       FULL: tl.constexpr, BLOCK: tl.constexpr, TILES: tl.constexpr):
    """min/max keys of tau_i tau_j ([groups, n, n] int32) over TILES consecutive listed tiles (of
    ``count``; one part's group: TILES > 1 only without PER_PART), reduced in the program before one
    atomic per pair: at most 4 n^2 atomics per TILES x BLOCK columns."""
    first = tl.program_id(0).to(tl.int64) * TILES
    cols, col_ok, offsets_ptr, base_off, out_off, tile, part = locate_at(table_ptr, programs_ptr, first, n, FULL, BLOCK)
    g = group_of(part, PER_PART)
    min_ptr += g * n * n
    max_ptr += g * n * n
    for i in range(n):
        for t in tl.static_range(TILES):
            index = tl.minimum(first + t, count - 1)  # past the last tile: the last again (all idempotent)
            cols, col_ok, offsets_ptr, base_off, out_off, tile, part = locate_at(table_ptr, programs_ptr, index, n,
                                                                                FULL, BLOCK)
            base = load_base(base_ptr, base_off, cols, col_ok, HAS_BASE, BASE_ALIGN, BLOCK)
            flag_bad(load_row(x_ptr, offsets_ptr, base, i, cols, col_ok, HAS_BASE, ALIGN), col_ok, i, bad_ptr + part * n)
        for j in range(i, n):  # products commute exactly: pair (i, j) also gives (j, i)
            low = KEY_MAX + n * 0
            high = KEY_MIN + n * 0
            for k in range(TILES):
                index = tl.minimum(first + k, count - 1)
                cols, col_ok, offsets_ptr, base_off, out_off, tile, part = locate_at(table_ptr, programs_ptr, index, n,
                                                                                    FULL, BLOCK)
                base = load_base(base_ptr, base_off, cols, col_ok, HAS_BASE, BASE_ALIGN, BLOCK)
                tau_i = load_row(x_ptr, offsets_ptr, base, i, cols, col_ok, HAS_BASE, ALIGN)
                tau_j = load_row(x_ptr, offsets_ptr, base, j, cols, col_ok, HAS_BASE, ALIGN)
                key = order_key(tau_j * tau_i)
                low = tl.minimum(low, tl.min(tl.where(col_ok, key, KEY_MAX), axis=0))
                high = tl.maximum(high, tl.max(tl.where(col_ok, key, KEY_MIN), axis=0))
            tl.atomic_min(min_ptr + pair(i, j, n), low, sem="relaxed")
            tl.atomic_max(max_ptr + pair(i, j, n), high, sem="relaxed")
            if j != i:
                tl.atomic_min(min_ptr + pair(j, i, n), low, sem="relaxed")
                tl.atomic_max(max_ptr + pair(j, i, n), high, sem="relaxed")


@triton.jit
def intra_term(tau_i, i, n, lo_ptr, span_ptr, peak_ptr):
    """exp(n Norm(tau_i^2) - n peak_ii), the unnormalised intra softmax of task i."""
    peak_ii = tl.load(peak_ptr + pair(i, i, n))
    return tl.exp(pair_normalized(tau_i, tau_i, i, i, n, lo_ptr, span_ptr) * n - n * peak_ii)


@triton.jit
def partition_kernel(x_ptr, base_ptr, table_ptr, programs_ptr, n, lo_ptr, span_ptr, peak_ptr, inter_ptr, intra_ptr,
                     HAS_BASE: tl.constexpr, PER_PART: tl.constexpr, ALIGN: tl.constexpr, BASE_ALIGN: tl.constexpr,
                     FULL: tl.constexpr, BLOCK: tl.constexpr):
    """This program's partial softmax sums: inter[i, j] = sum exp(N_ij - peak_ij), intra[i] = sum
    exp(n N_ii - n peak_ii), stored at row ``tile`` (this program's tile number) of the partial buffers
    (lo, span, peak: [groups, n, n])."""
    cols, col_ok, offsets_ptr, base_off, out_off, tile, part = locate(table_ptr, programs_ptr, n, FULL, BLOCK)
    g = group_of(part, PER_PART)
    lo_ptr += g * n * n
    span_ptr += g * n * n
    peak_ptr += g * n * n
    base = load_base(base_ptr, base_off, cols, col_ok, HAS_BASE, BASE_ALIGN, BLOCK)
    slot = tile
    for i in range(n):
        tau_i = load_row(x_ptr, offsets_ptr, base, i, cols, col_ok, HAS_BASE, ALIGN)
        for j in range(n):
            tau_j = load_row(x_ptr, offsets_ptr, base, j, cols, col_ok, HAS_BASE, ALIGN)
            normalized = pair_normalized(tau_i, tau_j, i, j, n, lo_ptr, span_ptr)
            peak = tl.load(peak_ptr + pair(i, j, n))
            terms = tl.where(col_ok, tl.exp(normalized - peak), 0.0)
            tl.store(inter_ptr + (slot * n + i) * n + j, tl.sum(terms, axis=0))
        intra = intra_term(tau_i, i, n, lo_ptr, span_ptr, peak_ptr)
        tl.store(intra_ptr + slot * n + i, tl.sum(tl.where(col_ok, intra, 0.0), axis=0))


@triton.jit
def paper_score(tau_i, i, x_ptr, offsets_ptr, base, cols, col_ok, n, lo_ptr, span_ptr, peak_ptr, inv_inter_ptr,
                inv_intra_ptr, HAS_BASE: tl.constexpr, ALIGN: tl.constexpr):
    """beta_i = Softmax(n Norm(tau_i^2)) * sum_j Softmax(Norm(tau_i tau_j)) over this program's
    columns (docs/design.md 2.3); the sum over j in task order."""
    inter = tl.zeros_like(tau_i)
    for j in range(n):
        tau_j = load_row(x_ptr, offsets_ptr, base, j, cols, col_ok, HAS_BASE, ALIGN)
        normalized = pair_normalized(tau_i, tau_j, i, j, n, lo_ptr, span_ptr)
        peak = tl.load(peak_ptr + pair(i, j, n))
        inv_inter = tl.load(inv_inter_ptr + pair(i, j, n))
        inter += tl.where(col_ok, tl.exp(normalized - peak) * inv_inter, 0.0)
    intra = intra_term(tau_i, i, n, lo_ptr, span_ptr, peak_ptr) * tl.load(inv_intra_ptr + i)
    return intra * inter


@triton.jit
def paper_kernel(x_ptr, base_ptr, table_ptr, programs_ptr, n, lo_ptr, span_ptr, peak_ptr, inv_inter_ptr, inv_intra_ptr,
                 hist_ptr, bucket_ptr, map_ptr, bounds_ptr, tally_ptr, kept_ptr, layout_ptr, copies, tiles_ptr,
                 HAS_BASE: tl.constexpr, LEVEL: tl.constexpr, R: tl.constexpr, TILES: tl.constexpr,
                 PER_PART: tl.constexpr, ALIGN: tl.constexpr, BASE_ALIGN: tl.constexpr, FULL: tl.constexpr,
                 BLOCK: tl.constexpr):
    """beta counted for a select (pair statistics [groups, n, n], 1/Z_intra [groups, n])."""
    cols, col_ok, offsets_ptr, base_off, out_off, tile, part = locate(table_ptr, programs_ptr, n, FULL, BLOCK)
    g = group_of(part, PER_PART)
    lo_ptr += g * n * n
    span_ptr += g * n * n
    peak_ptr += g * n * n
    inv_inter_ptr += g * n * n
    inv_intra_ptr += g * n
    base = load_base(base_ptr, base_off, cols, col_ok, HAS_BASE, BASE_ALIGN, BLOCK)
    for i in range(n):
        tau_i = load_row(x_ptr, offsets_ptr, base, i, cols, col_ok, HAS_BASE, ALIGN)
        beta = paper_score(tau_i, i, x_ptr, offsets_ptr, base, cols, col_ok, n, lo_ptr, span_ptr, peak_ptr,
                           inv_inter_ptr, inv_intra_ptr, HAS_BASE, ALIGN)
        count_values(beta, col_ok, g, i, n, tile, hist_ptr, bucket_ptr, map_ptr, bounds_ptr, tally_ptr, kept_ptr,
                     layout_ptr, copies, tiles_ptr, LEVEL, R, TILES, BLOCK)


# ---- launchers
# ``rows``: a tiles.Segments (every part of a scope group), or one tiles.Rows. ``select``: a
# select.DeviceSelect (radix levels) or a select.DeviceBracket (one pass around a bracket).


def magnitude_pass(rows, select, bad: torch.Tensor) -> None:
    """Count |tau| into ``select``; in the first pass, set bad[part, i] = 1 if task i of a part has
    NaN/Inf (``bad``: [parts, n], or [n] for one part)."""
    seg = as_segments(rows)
    args = select.kernel_args()
    seg.check(args["kept_ptr"], args["hist_ptr"], bad)
    seg.launch(magnitude_kernel, bad_ptr=bad, tail_warps=tail_warps("magnitude_kernel", args["LEVEL"]),
               PER_PART=seg.per_part, **args)


def official_pass(rows, select, peak: torch.Tensor, clip: tuple, inter: str) -> None:
    """Count P into ``select``; in the first pass also peak[i] = max(key of P_i) (int32 keys).

    ``clip`` = (lo, hi, span) float32 [n] tensors (span: hi - lo, inf where 0).
    """
    seg = as_segments(rows)
    lo, hi, span = clip
    args = select.kernel_args()
    seg.check(args["kept_ptr"], args["hist_ptr"], peak, lo, hi, span)
    seg.launch(official_kernel, lo, hi, span, peak_ptr=peak, INTER=INTER_CODES[inter], PER_PART=seg.per_part,
               tail_warps=tail_warps("official_kernel", args["LEVEL"]), **args)


PAIR_TILES = 8  # tiles a pair min/max program reduces before its atomics (global scope)


def pair_minmax_pass(rows, lo_key: torch.Tensor, hi_key: torch.Tensor, bad: torch.Tensor) -> None:
    """Fold min/max keys of tau_i * tau_j ([n, n] int32) and the NaN/Inf flags ([parts, n])."""
    seg = as_segments(rows)
    seg.check(lo_key, hi_key, bad)
    # a program's tiles must share a group: several only in global scope
    seg.launch(pair_minmax_kernel, lo_key, hi_key, bad, PER_PART=seg.per_part,
               tiles_per_program=1 if seg.per_part else PAIR_TILES)


def partition_pass(rows, pairs: tuple, inter: torch.Tensor, intra: torch.Tensor) -> None:
    """Write the partial softmax sums of every tile into inter[tile], intra[tile] ([tiles, n, n] and
    [tiles, n] float32, tiles numbered across the scope group). ``pairs`` = (lo, span, peak) [n, n]."""
    seg = as_segments(rows)
    lo, span, peak = pairs
    seg.check(inter, intra, lo, span, peak)
    if seg.first_tile + seg.tiles > inter.shape[0]:
        raise ValueError("partial buffers too small for this pass")
    seg.launch(partition_kernel, lo, span, peak, inter, intra, PER_PART=seg.per_part)


def paper_pass(rows, select, pairs: tuple, inv_z: tuple) -> None:
    """Count beta into ``select``. ``inv_z`` = (1/Z_inter [n, n], 1/Z_intra [n])."""
    seg = as_segments(rows)
    lo, span, peak = pairs
    inv_inter, inv_intra = inv_z
    args = select.kernel_args()
    seg.check(args["kept_ptr"], args["hist_ptr"], lo, span, peak, inv_inter, inv_intra)
    seg.launch(paper_kernel, lo, span, peak, inv_inter, inv_intra, PER_PART=seg.per_part, **args)
