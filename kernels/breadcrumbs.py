"""Model Breadcrumbs on the device: each row's magnitude band found in registers (docs/design.md 5.6).

In every row (last dimension, L entries) of every key of every task, rank |tau| in descending order,
ties by position (the earlier entry ranks higher); keep the entries of rank [drop, drop + keep), then
tau_m = sum_i lambda_i (tau_i * band_i) in task order and out = base + lam * tau_m.

One program per row: for each task it loads the row (L <= ROW_MAX entries, in registers as one
[ROW_BLOCK] tile), finds the values at descending ranks drop and drop + keep - 1 by a bisection over
the bits of |tau| (31 steps, each a count over the row in registers: magnitudes are non-negative
floats, whose bits order as integers), counts the entries above each, ranks the entries equal to a
bound by position with a cumulative sum, and adds the task's banded row to the total; the output is
written once. No [n, m] (or [m]) temporary ever exists; one atomic per row and task counts the kept
entries, another flags NaN/Inf. Rows longer than ROW_MAX run through ``long_rows_kernel``: a program
per row still, which reads its row in chunks (a radix select per task over the row, then the band
chunk by chunk), so no row length takes torch operations or host synchronisations.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .tiles import on_device, segment, theta, to_device, to_output

ROW_MAX = 1 << 12  # the longest row a program holds in registers without spilling (longer: long_rows_kernel)


@triton.jit
def _kth_largest(key, k):
    """The key of descending rank k (0-based) among ``key`` (non-negative int32; entries outside the row
    are -1): the largest t with count(key >= t) > k, built bit by bit from the top."""
    t = k * 0  # int32 scalar
    for bit in range(30, -1, -1):
        candidate = t | (1 << bit)
        if tl.sum((key >= candidate).to(tl.int32), axis=0) > k:
            t = candidate
    return t


@triton.jit
def _in_band(key, bound, drop, end):
    """Entries equal to ``bound`` whose descending rank (entries above it, then the equal ones before
    them by position) lies in [drop, end)."""
    equal = key == bound
    rank = tl.sum((key > bound).to(tl.int32), axis=0) + tl.cumsum(equal.to(tl.int32), axis=0) - 1
    return equal & (rank >= drop) & (rank < end)


@triton.jit
def breadcrumbs_kernel(x_ptr, base_ptr, table_ptr, programs_ptr, n, out_ptr, band_ptr, weight_ptr, lam, kept_ptr,
                       bad_ptr, HAS_BASE: tl.constexpr, ALIGN: tl.constexpr, BASE_ALIGN: tl.constexpr,
                       OUT_ALIGN: tl.constexpr, ROW_ALIGN: tl.constexpr, ROW_BLOCK: tl.constexpr):
    """Program (part, row): band[part] = (L, drop, keep); the part's table entry as kernels.tiles.Segments.
    ROW_ALIGN divides every L of the launch (and the row, base and output alignments): row starts are
    multiples of it, so the rows load as vectors."""
    pid = tl.program_id(0).to(tl.int64)
    part = tl.load(programs_ptr + 2 * pid)
    row = tl.load(programs_ptr + 2 * pid + 1)
    entry = table_ptr + part * (5 + n)
    length = (tl.load(band_ptr + 3 * part) // ROW_ALIGN) * ROW_ALIGN  # int64, a multiple of ROW_ALIGN
    drop = tl.load(band_ptr + 3 * part + 1).to(tl.int32)
    end = drop + tl.load(band_ptr + 3 * part + 2).to(tl.int32)
    index = tl.load(entry + 4)  # the part's index in the merge (NaN/Inf flags)
    offsets_ptr = entry + 5
    within = tl.arange(0, ROW_BLOCK)
    ok = within < length
    cols = row * length + within  # int64: columns of this row inside its part
    base_off = tl.load(entry + 2)
    total = tl.zeros([ROW_BLOCK], dtype=tl.float32)
    for i in range(n):
        # the row is read again (from the cache) after the bisection instead of held through it, and so is
        # the base: fewer registers
        tau = _task_row(x_ptr, base_ptr, offsets_ptr, base_off, i, cols, ok, HAS_BASE, ALIGN, BASE_ALIGN)
        magnitude = tl.abs(tau)
        bad = ok & ((magnitude != magnitude) | (magnitude == float("inf")))
        tl.atomic_max(bad_ptr + index * n + i, tl.max(bad.to(tl.int32), axis=0), sem="relaxed")
        key = tl.where(ok, magnitude.to(tl.int32, bitcast=True), -1)
        top = _kth_largest(key, drop)
        low = _kth_largest(key, end - 1)
        band = ok & (end > drop) & (((key < top) & (key > low)) | _in_band(key, top, drop, end)
                                    | _in_band(key, low, drop, end))
        tl.atomic_add(kept_ptr + i, tl.sum(band.to(tl.int64), axis=0), sem="relaxed")
        tau = _task_row(x_ptr, base_ptr, offsets_ptr, base_off, i, cols, ok, HAS_BASE, ALIGN, BASE_ALIGN)
        total += tau * band.to(tl.float32) * tl.load(weight_ptr + i)
    _write(total, base_ptr, base_off, cols, ok, lam, out_ptr, entry, HAS_BASE, BASE_ALIGN, OUT_ALIGN)


@triton.jit
def _write(total, base_ptr, base_off, cols, ok, lam, out_ptr, entry, HAS_BASE: tl.constexpr, BASE_ALIGN: tl.constexpr,
           OUT_ALIGN: tl.constexpr):
    """Write base + lam * total (total alone without a base) at ``cols`` of the part's output."""
    if HAS_BASE:
        base = tl.load(base_ptr + base_off * BASE_ALIGN + cols, mask=ok, other=0.0).to(tl.float32)
    else:
        base = total
    value = theta(total, base, base_ptr, base_off, cols, ok, lam, out_ptr, HAS_BASE, BASE_ALIGN)
    tl.store(out_ptr + tl.load(entry + 3) * OUT_ALIGN + cols, to_output(value, out_ptr), mask=ok)


@triton.jit
def _task_row(x_ptr, base_ptr, offsets_ptr, base_off, i, cols, ok, HAS_BASE: tl.constexpr, ALIGN: tl.constexpr,
              BASE_ALIGN: tl.constexpr):
    """tau_i over the row (zero outside it), float32."""
    tau = tl.load(x_ptr + tl.load(offsets_ptr + i) * ALIGN + cols, mask=ok, other=0.0).to(tl.float32)
    if HAS_BASE:
        tau = tl.where(ok, tau - tl.load(base_ptr + base_off * BASE_ALIGN + cols, mask=ok, other=0.0).to(tl.float32),
                       0.0)
    return tau


LONG_CHUNK = 1024  # entries of a long row a program loads at once
LONG_BATCH = 1 << 14  # long rows per launch (each program keeps 8 int64 per task in a scratch buffer)
# 2 entries per thread: benchmarks/kernel_report.py on triton 3.6 and 3.9 found no spill at 16 warps and
# chunks of 1024, and spills (8-56 bytes) at 8 warps (chunks of 1024 or 2048) or 16 warps and 2048
LONG_WARPS = 16


@triton.jit
def _histogram(digit, ok, CHUNK: tl.constexpr):
    """[256] int32 counts of ``digit`` where ``ok`` (masked-off entries counted in bin 0, then taken off)."""
    counts = tl.histogram(tl.where(ok, digit, 0), 256)
    return counts - tl.where(tl.arange(0, 256) == 0, CHUNK - tl.sum(ok.to(tl.int32), axis=0), 0)


@triton.jit
def _pick(hist, rank):
    """(bin holding ascending ``rank`` of a [256] histogram, entries in the bins below it, entries in it)."""
    cumulative = tl.cumsum(hist, axis=0)
    at_or_below = cumulative <= rank
    found = tl.sum(at_or_below.to(tl.int32), axis=0)
    below = tl.max(tl.where(at_or_below, cumulative, 0), axis=0)
    equal = tl.sum(tl.where(tl.arange(0, 256) == found, hist, 0), axis=0)
    return found, below, equal


@triton.jit
def _row_key(x_ptr, base_ptr, offsets_ptr, base_off, i, start, length, rank, HAS_BASE: tl.constexpr,
             ALIGN: tl.constexpr, BASE_ALIGN: tl.constexpr, CHUNK: tl.constexpr):
    """(key at ascending ``rank`` among the keys of task i's row (the int32 bits of |tau|), entries whose
    key is above it, NaN/Inf flag of the row): a radix select in the program, four levels of 256-bin
    histograms of one byte of the keys, each level one read of the row in chunks."""
    prefix = rank * 0
    below = rank * 0
    equal = rank * 0
    bad = rank * 0
    within = tl.arange(0, CHUNK)
    for level in tl.static_range(4):
        hist = tl.zeros([256], dtype=tl.int32)
        for lo in range(0, length, CHUNK):
            ok = lo + within < length
            tau = _task_row(x_ptr, base_ptr, offsets_ptr, base_off, i, start + lo + within, ok, HAS_BASE, ALIGN,
                            BASE_ALIGN)
            magnitude = tl.abs(tau)
            key = tl.where(ok, magnitude.to(tl.int32, bitcast=True), 0)
            if level == 0:
                bad = tl.maximum(bad, tl.max((ok & ((magnitude != magnitude) | (magnitude == float("inf"))))
                                             .to(tl.int32), axis=0))
                hist += _histogram((key >> 24) & 0xFF, ok, CHUNK)
            else:
                hist += _histogram((key >> (24 - 8 * level)) & 0xFF, ok & ((key >> (32 - 8 * level)) == prefix), CHUNK)
        found, fewer, equal = _pick(hist, rank - below)
        prefix = prefix * 256 + found  # the keys are non-negative: the top byte below 128, no overflow
        below += fewer
    return prefix, length.to(tl.int32) - below - equal, bad


@triton.jit
def long_rows_kernel(x_ptr, base_ptr, table_ptr, programs_ptr, n, out_ptr, band_ptr, weight_ptr, lam, kept_ptr,
                     bad_ptr, scratch_ptr, HAS_BASE: tl.constexpr, ALIGN: tl.constexpr, BASE_ALIGN: tl.constexpr,
                     OUT_ALIGN: tl.constexpr, ROW_ALIGN: tl.constexpr, CHUNK: tl.constexpr):
    """Breadcrumbs on rows longer than a program holds, CHUNK entries at a time (arguments as
    :func:`breadcrumbs_kernel`'s; scratch [programs, n, 8] int64). Per task, the keys (the bits of
    |tau|) at descending ranks drop and drop + keep - 1 by a radix select over the row in the
    program (:func:`_row_key`: four reads of the row per bound); then, chunk by chunk, the band of
    every task (ties at a bound ranked by position, counted across chunks) summed in task order and
    written once."""
    pid = tl.program_id(0).to(tl.int64)
    part = tl.load(programs_ptr + 2 * pid)
    row = tl.load(programs_ptr + 2 * pid + 1)
    entry = table_ptr + part * (5 + n)
    length = (tl.load(band_ptr + 3 * part) // ROW_ALIGN) * ROW_ALIGN  # int64, a multiple of ROW_ALIGN
    drop = tl.load(band_ptr + 3 * part + 1)
    end = drop + tl.load(band_ptr + 3 * part + 2)
    index = tl.load(entry + 4)
    offsets_ptr = entry + 5
    base_off = tl.load(entry + 2)
    scratch = scratch_ptr + pid * n * 8
    within = tl.arange(0, CHUNK)
    start = row * length  # int64: the row's first column inside its part
    for i in range(n):
        mine = scratch + tl.cast(i, tl.int64) * 8  # task i's 8 scratch counters
        # the bounds one after the other (one histogram in registers at a time), from their ascending ranks
        top, above_top, bad = _row_key(x_ptr, base_ptr, offsets_ptr, base_off, i, start, length,
                                       (length - 1 - drop).to(tl.int32), HAS_BASE, ALIGN, BASE_ALIGN, CHUNK)
        low, above_low, bad = _row_key(x_ptr, base_ptr, offsets_ptr, base_off, i, start, length,
                                       tl.minimum(length - end, length - 1).to(tl.int32),  # keep = 0: no band
                                       HAS_BASE, ALIGN, BASE_ALIGN, CHUNK)
        tl.atomic_max(bad_ptr + index * n + i, bad, sem="relaxed")
        tl.store(mine, top.to(tl.int64))  # the bounds' keys,
        tl.store(mine + 1, low.to(tl.int64))
        tl.store(mine + 2, above_top.to(tl.int64))  # the entries above each,
        tl.store(mine + 3, above_low.to(tl.int64))
        tl.store(mine + 4, 0)  # and the entries equal to each in the chunks read so far
        tl.store(mine + 5, 0)
        tl.store(mine + 6, 0)  # kept entries
    drop32 = drop.to(tl.int32)
    end32 = end.to(tl.int32)
    for lo in range(0, length, CHUNK):
        ok = lo + within < length
        cols = start + lo + within
        total = tl.zeros([CHUNK], dtype=tl.float32)
        for i in range(n):
            mine = scratch + tl.cast(i, tl.int64) * 8
            tau = _task_row(x_ptr, base_ptr, offsets_ptr, base_off, i, cols, ok, HAS_BASE, ALIGN, BASE_ALIGN)
            key = tl.where(ok, tl.abs(tau).to(tl.int32, bitcast=True), -1)  # counts and ranks in 32 bits: L < 2^31
            top = tl.load(mine).to(tl.int32)
            low = tl.load(mine + 1).to(tl.int32)
            at_top = key == top
            at_low = key == low
            seen_top = tl.load(mine + 4).to(tl.int32)
            seen_low = tl.load(mine + 5).to(tl.int32)
            rank_top = tl.load(mine + 2).to(tl.int32) + seen_top + tl.cumsum(at_top.to(tl.int32), axis=0) - 1
            rank_low = tl.load(mine + 3).to(tl.int32) + seen_low + tl.cumsum(at_low.to(tl.int32), axis=0) - 1
            band = ok & (end32 > drop32) & (((key < top) & (key > low))
                                            | (at_top & (rank_top >= drop32) & (rank_top < end32))
                                            | (at_low & (rank_low >= drop32) & (rank_low < end32)))
            tl.store(mine + 4, (seen_top + tl.sum(at_top.to(tl.int32), axis=0)).to(tl.int64))
            tl.store(mine + 5, (seen_low + tl.sum(at_low.to(tl.int32), axis=0)).to(tl.int64))
            tl.store(mine + 6, tl.load(mine + 6) + tl.sum(band.to(tl.int32), axis=0).to(tl.int64))
            total += tau * band.to(tl.float32) * tl.load(weight_ptr + i)
        _write(total, base_ptr, base_off, cols, ok, lam, out_ptr, entry, HAS_BASE, BASE_ALIGN, OUT_ALIGN)
    for i in range(n):
        tl.atomic_add(kept_ptr + i, tl.load(scratch + tl.cast(i, tl.int64) * 8 + 6), sem="relaxed")


def row_max(rows) -> int:
    """The longest row the kernel takes for ``rows`` (kernels.tiles.Rows): ROW_MAX, half of it for float64
    rows or base (4096 float64 entries spilled at 16 and at 32 warps)."""
    wide = rows.anchor.element_size() == 8 or (rows.base is not None and rows.base.element_size() == 8)
    return ROW_MAX // 2 if wide else ROW_MAX


def row_block(length: int) -> int:
    """The tile a program holds a row of ``length`` entries in (a power of two, at least 256)."""
    return max(256, triton.next_power_of_2(length))


def row_warps(block: int) -> int:
    """Warps per program: 8 entries of the row per thread up to 1024 entries (one 128-bit load of bf16),
    4 beyond (2048: 16 warps, 4096: 32). benchmarks/kernel_report.py on triton 3.6 and 3.9: 8 entries
    per thread at 2048 and 4096 spilled (8-16 bytes) on one version or the other, 4 did not."""
    return max(1, block // 256) if block <= 1024 else block // 128


def breadcrumbs_pass(parts: list, outs: list, lengths: list, bands: list, weights: torch.Tensor, lam: float,
                     kept: torch.Tensor, bad: torch.Tensor, indices: list) -> None:
    """Write Breadcrumbs' merge of every part (kernels.tiles.Rows, rows of ``lengths[k]`` entries) into
    ``outs``: bands[k] = (drop, keep) per row; ``kept`` [n] int64 counts the kept entries,
    bad[indices[k], i] flags NaN/Inf of task i. One launch per row length class and dtypes; rows
    longer than :func:`row_max` go to :func:`long_rows_kernel` (LONG_BATCH rows per launch)."""
    classes = {}
    for k, length in enumerate(lengths):
        classes.setdefault(row_block(length) if length <= row_max(parts[k]) else 0, []).append(k)
    device = parts[0].device if parts else kept.device
    for block, members in classes.items():
        row_align = 16
        while row_align > 1 and any(lengths[k] % row_align for k in members):
            row_align //= 2
        done = 0
        for seg in segment([parts[k] for k in members], [outs[k] for k in members],
                           indices=[indices[k] for k in members]):
            local = members[done:done + len(seg.parts)]  # segment() keeps the parts' order
            done += len(seg.parts)
            counts = torch.tensor([parts[k].m // lengths[k] for k in local], dtype=torch.int64)
            first = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
            programs = torch.stack([torch.repeat_interleave(torch.arange(len(local)), counts),
                                    torch.arange(int(counts.sum())) - first], 1).contiguous()
            band = on_device([[lengths[k], *bands[k]] for k in local], torch.int64, device)
            meta = dict(HAS_BASE=seg.has_base, ALIGN=seg.align, BASE_ALIGN=seg.base_align, OUT_ALIGN=seg.out_align,
                        ROW_ALIGN=min(row_align, seg.align, seg.base_align, seg.out_align))
            args = (seg.anchor, seg.base_anchor, seg.table)
            rest = (seg.n, seg.out_anchor, band, weights, float(lam), kept, bad)
            if block:
                breadcrumbs_kernel[(programs.shape[0],)](*args, to_device(programs, device), *rest, ROW_BLOCK=block,
                                                         num_warps=row_warps(block), **meta)
                continue
            scratch = torch.empty(min(LONG_BATCH, programs.shape[0]), seg.n, 8, dtype=torch.int64, device=device)
            for lo in range(0, programs.shape[0], LONG_BATCH):
                batch = to_device(programs[lo:lo + LONG_BATCH].contiguous(), device)
                long_rows_kernel[(batch.shape[0],)](*args, batch, *rest, scratch, CHUNK=LONG_CHUNK,
                                                    num_warps=LONG_WARPS, **meta)
