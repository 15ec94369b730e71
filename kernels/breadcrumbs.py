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
entries, another flags NaN/Inf. Rows longer than ROW_MAX are left to the caller.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .tiles import segment, theta, to_output

ROW_MAX = 1 << 12  # the longest row a program holds in registers without spilling (longer: torch, row by row)


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
    """Write Breadcrumbs' merge of every part (kernels.tiles.Rows, rows of ``lengths[k]`` <= row_max
    entries) into ``outs``: bands[k] = (drop, keep) per row; ``kept`` [n] int64 counts the kept
    entries, bad[indices[k], i] flags NaN/Inf of task i. One launch per row length class and dtypes."""
    classes = {}
    for k, length in enumerate(lengths):
        if length > row_max(parts[k]):
            raise ValueError(f"rows of {length} entries; the kernel takes at most {row_max(parts[k])} here")
        classes.setdefault(row_block(length), []).append(k)
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
                                    torch.arange(int(counts.sum())) - first], 1).contiguous().to(device)
            band = torch.tensor([[lengths[k], *bands[k]] for k in local], dtype=torch.int64).to(device)
            breadcrumbs_kernel[(programs.shape[0],)](
                seg.anchor, seg.base_anchor, seg.table, programs, seg.n, seg.out_anchor, band, weights, float(lam),
                kept, bad, HAS_BASE=seg.has_base, ALIGN=seg.align, BASE_ALIGN=seg.base_align, OUT_ALIGN=seg.out_align,
                ROW_ALIGN=min(row_align, seg.align, seg.base_align, seg.out_align), ROW_BLOCK=block,
                num_warps=row_warps(block))

