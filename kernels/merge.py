"""The final pass: recompute the score, scale, weighted mean, lam, base add, dtype cast (docs/design.md 4).

One program per BLOCK columns loops over the tasks and writes BLOCK merged entries:
- official (docs/design.md 2.2 steps 6-8): scale_i = max(P_i - t_i, 0) / (M_i - t_i),
  tau_m = sum_i lambda_i tau~_i scale_i / max(sum_i scale_i, 1e-12);
- paper (docs/design.md 2.3): b_i = beta_i [beta_i >= t_i], tau_m = sum_i lambda_i b_i tau_i / sum_i b_i (0 if 0);
sums in task order; then out = base + lam * tau_m cast to the output's dtype (or tau_m alone when
there is no base), with the base read once. The per-task lambda_i are read from device memory, so a
coefficient search reruns this pass alone with new lambda_i on the cached statistics.
"""

from __future__ import annotations

import torch
import triton.language as tl
import triton

from .score import INTER_CODES, column_term, official_score, paper_score
from .select import group_of
from .tiles import as_segments, load_base, load_row, locate, store_out, theta

VARIANT_CODES = {"official": 0, "paper": 1}


def tail_warps(variant: int, inter: int) -> int:
    """tiles.warps of the merge's last tiles (codes of VARIANT_CODES and score.INTER_CODES). From
    benchmarks/kernel_report.py on triton 3.6 and 3.9: at 16 warps float64 rows spilled (16-24 bytes)
    on one version or the other; 8 spilled only with the pairwise inter term (float64, 3.9), 32 only
    with normalized_sum."""
    return 32 if variant == 0 and inter == INTER_CODES["pairwise"] else 8


@triton.jit
def merge_kernel(x_ptr, base_ptr, table_ptr, programs_ptr, n, out_ptr,
                 s0_ptr, s1_ptr, s2_ptr, s3_ptr, s4_ptr,
                 t_ptr, span_ptr, lambda_ptr, lam,
                 HAS_BASE: tl.constexpr, VARIANT: tl.constexpr, INTER: tl.constexpr, PER_PART: tl.constexpr,
                 ALIGN: tl.constexpr, BASE_ALIGN: tl.constexpr, OUT_ALIGN: tl.constexpr, FULL: tl.constexpr,
                 BLOCK: tl.constexpr):
    """s0..s4: official (clip lo, hi, span, -, -) [groups, n]; paper (pair lo, span, peak, 1/Z_inter
    [groups, n, n], 1/Z_intra [groups, n]); t, span [groups, n] (PER_PART: a group per part)."""
    cols, col_ok, offsets_ptr, base_off, out_off, tile, part = locate(table_ptr, programs_ptr, n, FULL, BLOCK)
    g = group_of(part, PER_PART)
    t_ptr += g * n
    span_ptr += g * n
    if VARIANT == 0:
        s0_ptr += g * n
        s1_ptr += g * n
        s2_ptr += g * n
    else:
        s0_ptr += g * n * n
        s1_ptr += g * n * n
        s2_ptr += g * n * n
        s3_ptr += g * n * n
        s4_ptr += g * n
    base = load_base(base_ptr, base_off, cols, col_ok, HAS_BASE, BASE_ALIGN, BLOCK)
    num = tl.zeros([BLOCK], dtype=tl.float32)
    den = tl.zeros([BLOCK], dtype=tl.float32)
    if VARIANT == 0:
        column = column_term(x_ptr, offsets_ptr, base, cols, col_ok, n, s0_ptr, s1_ptr, s2_ptr, HAS_BASE, INTER,
                             ALIGN, BLOCK)
        for i in range(n):
            tau = load_row(x_ptr, offsets_ptr, base, i, cols, col_ok, HAS_BASE, ALIGN)
            score, clipped = official_score(tau, i, column, x_ptr, offsets_ptr, base, cols, col_ok, n, s0_ptr,
                                            s1_ptr, s2_ptr, HAS_BASE, INTER, ALIGN)
            t = tl.load(t_ptr + i)
            span = tl.load(span_ptr + i)  # inf when M == t
            scale = tl.where(col_ok, tl.math.div_rn(tl.maximum(score - t, 0.0), span), 0.0)
            num += clipped * scale * tl.load(lambda_ptr + i)
            den += scale
        tau_m = tl.math.div_rn(num, tl.maximum(den, 1e-12))
    else:
        for i in range(n):
            tau = load_row(x_ptr, offsets_ptr, base, i, cols, col_ok, HAS_BASE, ALIGN)
            beta = paper_score(tau, i, x_ptr, offsets_ptr, base, cols, col_ok, n, s0_ptr, s1_ptr, s2_ptr, s3_ptr,
                               s4_ptr, HAS_BASE, ALIGN)
            kept = tl.where(col_ok & (beta >= tl.load(t_ptr + i)), beta, 0.0)
            num += kept * tau * tl.load(lambda_ptr + i)
            den += kept
        tau_m = tl.where(den > 0, tl.math.div_rn(num, tl.where(den > 0, den, 1.0)), 0.0)
    tau_m = theta(tau_m, base, base_ptr, base_off, cols, col_ok, lam, out_ptr, HAS_BASE, BASE_ALIGN)
    store_out(out_ptr, out_off, cols, col_ok, tau_m, OUT_ALIGN)


def merge_pass(rows, out: torch.Tensor | None, variant: str, stats: tuple, threshold: torch.Tensor,
               span: torch.Tensor | None, lambdas: torch.Tensor, lam: float, inter: str = "sum") -> None:
    """Write the merged entries of ``rows`` (a tiles.Segments with its outputs, or one tiles.Rows and
    ``out`` [m], any float dtype).

    With a base in ``rows``, out = base + lam * tau_m; without, out = tau_m. ``stats``: official
    (lo, hi, span) [n]; paper (lo, span, peak, 1/Z_inter, 1/Z_intra). ``threshold`` t [n];
    ``span`` M - t [n] (inf where 0; official only); ``lambdas`` [n] float32.
    """
    seg = as_segments(rows, out)
    seg.check(seg.out_anchor, threshold, lambdas, *stats)
    padded = list(stats) + [threshold] * (5 - len(stats))  # unused pointer slots
    seg.launch(merge_kernel, seg.out_anchor, *padded, threshold, span if span is not None else threshold, lambdas,
               float(lam), VARIANT=VARIANT_CODES[variant], INTER=INTER_CODES[inter], PER_PART=seg.per_part,
               OUT_ALIGN=seg.out_align, tail_warps=tail_warps(VARIANT_CODES[variant], INTER_CODES[inter]))
