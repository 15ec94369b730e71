"""TIES and DARE-TIES on the device: trim (or drop), sign election, disjoint mean (DESIGN.md 5).

Two passes after the trim threshold is known (the |tau| radix select of select.py):
- ``sign_kernel`` sums the elected signs of its tile into one int64 counter (the whole model's
  majority sign, for positions whose sum is zero), an integer atomic;
- ``ties_merge_kernel`` recomputes the trimmed weighted vectors and their elected signs, keeps the
  entries that agree, and writes base + lam * (sum of the agreeing values / sum of their weights).
The trim keeps |tau_i| >= t_i (the authors' kthvalue threshold); DARE-TIES replaces it by DARE's
counter-based drop and rescale.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .linear import dare_keep, flag_bad
from .tiles import Rows, launch_config, load_tau, sign


@triton.jit
def weighted_tile(x_ptr, offsets_ptr, base_ptr, n, m, t_ptr, weight_ptr, streams_ptr, threshold, keep_scale,
                  HAS_BASE: tl.constexpr, DARE: tl.constexpr, NT: tl.constexpr, BLOCK: tl.constexpr):
    """(weighted tau, valid, rows, row_ok, cols, col_ok, weight) of a tile after the trim or drop."""
    tau, valid, rows, row_ok, cols, col_ok = load_tau(x_ptr, offsets_ptr, base_ptr, n, m, HAS_BASE, NT, BLOCK)
    if DARE:
        kept = dare_keep(cols, rows, row_ok, streams_ptr, n, threshold)
        tau = tau * kept.to(tl.float32) / keep_scale
    else:
        t = tl.load(t_ptr + rows, mask=row_ok, other=0.0)[:, None]
        tau = tau * (tl.abs(tau) >= t).to(tl.float32)
    weight = tl.load(weight_ptr + rows, mask=row_ok, other=0.0)[:, None]
    return tl.where(valid, tau * weight, 0.0), valid, rows, row_ok, cols, col_ok, weight


@triton.jit
def sign_kernel(x_ptr, offsets_ptr, base_ptr, n, m, t_ptr, weight_ptr, streams_ptr, threshold, keep_scale,
                total_ptr, kept_ptr, bad_ptr, HAS_BASE: tl.constexpr, DARE: tl.constexpr, NT: tl.constexpr,
                BLOCK: tl.constexpr):
    tau, valid, rows, row_ok, cols, col_ok = load_tau(x_ptr, offsets_ptr, base_ptr, n, m, HAS_BASE, NT, BLOCK)
    flag_bad(tau, valid, rows, row_ok, bad_ptr)
    weighted, valid, rows, row_ok, cols, col_ok, weight = weighted_tile(
        x_ptr, offsets_ptr, base_ptr, n, m, t_ptr, weight_ptr, streams_ptr, threshold, keep_scale, HAS_BASE, DARE,
        NT, BLOCK)
    if DARE:
        kept = valid & dare_keep(cols, rows, row_ok, streams_ptr, n, threshold)
    else:
        kept = valid & (tl.abs(tau) >= tl.load(t_ptr + rows, mask=row_ok, other=0.0)[:, None])
    tl.atomic_add(kept_ptr + rows, tl.sum(kept.to(tl.int64), axis=1), mask=row_ok, sem="relaxed")
    elected = sign(tl.sum(weighted, axis=0))
    tl.atomic_add(total_ptr, tl.sum(tl.where(col_ok, elected, 0.0), axis=0).to(tl.int64), sem="relaxed")


@triton.jit
def ties_merge_kernel(x_ptr, offsets_ptr, base_ptr, out_ptr, n, m, t_ptr, weight_ptr, streams_ptr, threshold,
                      keep_scale, fill_ptr, lam, HAS_BASE: tl.constexpr, WRITE_THETA: tl.constexpr,
                      DARE: tl.constexpr, NT: tl.constexpr, BLOCK: tl.constexpr):
    weighted, valid, rows, row_ok, cols, col_ok, weight = weighted_tile(
        x_ptr, offsets_ptr, base_ptr, n, m, t_ptr, weight_ptr, streams_ptr, threshold, keep_scale, HAS_BASE, DARE,
        NT, BLOCK)
    elected = sign(tl.sum(weighted, axis=0))
    elected = tl.where(elected == 0, tl.load(fill_ptr), elected)[None, :]
    agree = valid & tl.where(elected > 0, weighted > 0, weighted < 0)
    num = tl.sum(tl.where(agree, weighted, 0.0), axis=0)
    den = tl.sum(tl.where(agree, weight, 0.0), axis=0)
    tau_m = num / tl.where(den == 0, 1.0, den)
    if WRITE_THETA:
        tau_m = tl.load(base_ptr + cols, mask=col_ok, other=0.0).to(tl.float32) + lam * tau_m
    tl.store(out_ptr + cols, tau_m.to(out_ptr.dtype.element_ty), mask=col_ok)


def _mask_args(rows: Rows, threshold: torch.Tensor | None, dare: tuple | None):
    """(t, streams, threshold int, keep scale) for the kernels: a trim threshold or DARE's drop."""
    if dare is not None:
        streams, p = dare
        return streams, streams, int(round(p * (1 << 24))), float(1 - p)
    return threshold, threshold, 0, 1.0


def sign_pass(rows: Rows, weights: torch.Tensor, total: torch.Tensor, kept: torch.Tensor, bad: torch.Tensor,
              threshold: torch.Tensor | None = None, dare: tuple | None = None) -> None:
    """Add the elected signs of ``rows`` to ``total`` (int64 [1]), the kept entries per task to
    ``kept`` (int64 [n]) and NaN/Inf flags to ``bad``. Trim by ``threshold`` [n] or by ``dare``
    = (streams, p) (see linear.linear_pass)."""
    grid, base, meta = launch_config(rows, weights, total, kept, bad)
    t, streams, limit, scale = _mask_args(rows, threshold, dare)
    sign_kernel[grid](rows.anchor, rows.offsets, base, rows.n, rows.m, t, weights, streams, limit, scale, total, kept,
                      bad, DARE=dare is not None, **meta)


def ties_merge_pass(rows: Rows, out: torch.Tensor, weights: torch.Tensor, fill: torch.Tensor, lam: float,
                    threshold: torch.Tensor | None = None, dare: tuple | None = None) -> None:
    """Write the disjoint mean (base + lam * it, with a base) of ``rows`` into ``out``; ``fill``
    (float32 [1]) is the sign given to positions whose elected sign is zero."""
    out_flat = out.view(-1)
    grid, base, meta = launch_config(rows, out, weights, fill)
    t, streams, limit, scale = _mask_args(rows, threshold, dare)
    ties_merge_kernel[grid](rows.anchor, rows.offsets, base, out_flat, rows.n, rows.m, t, weights, streams, limit,
                            scale, fill, float(lam), WRITE_THETA=rows.base is not None, DARE=dare is not None, **meta)
