"""Methods that merge by one weighted sum per block: average, task arithmetic, DARE, Breadcrumbs.

Each is one pass over the blocks: an optional per-entry mask (DARE's random drop, Breadcrumbs'
magnitude band), then the sum over tasks in task order, the rounding of the literal formulations
in pcb_fast.reference_baselines, bit for bit.
"""

from __future__ import annotations

import warnings

import torch

from ..core import checks, rng
from ..core.engine import raise_if_not_finite
from ..core.formulas import lambda_column, sum_over_tasks
from ..core.sources import DEFAULT_BLOCK_WIDTH, row_length
from ..cpu import fused as fused_cpu, native


def _weighted_sums(source, sink, lam, masked=None, divisor=None, whole_rows=False, block_width=DEFAULT_BLOCK_WIDTH):
    """One pass: sink(sum_i lam_i * masked(block)_i [/ divisor]); returns entries kept per task."""
    kept = torch.zeros(source.n, dtype=torch.int64)
    for block in source.blocks(block_width, whole_rows=whole_rows):
        tv = block.tv
        raise_if_not_finite(source, block, tv.abs().amax(1))
        if masked is not None:
            tv, mask = masked(block)
            kept += mask.sum(1)
        else:
            kept += tv.shape[1]
        total = sum_over_tasks(tv if lam is None else tv * lam)
        sink(block.segment, block.lo, block.hi, total if divisor is None else total / divisor)
    return kept


def merge_average(source, sink, *, lambdas=None, block_width=DEFAULT_BLOCK_WIDTH):
    """Weighted mean of the models (Wortsman et al., "Model soups", ICML 2022, uniform soup):
    theta_pre + sum_i w_i tau_i / sum_i w_i, weights ``lambdas`` (default 1; with ``lam=1``, the
    mean of the fine-tuned weights up to rounding)."""
    lam = lambda_column(lambdas, source.n)
    divisor = source.n if lam is None else float(lam.sum())
    if divisor <= 0:
        raise ValueError(f"lambdas={lambdas!r} sum to {divisor}; average weights must have a positive sum")
    return _weighted_sums(source, sink, lam, divisor=divisor, block_width=block_width)


def merge_task_arithmetic(source, sink, *, lambdas=None, block_width=DEFAULT_BLOCK_WIDTH):
    """Task arithmetic (Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023):
    theta_pre + lam * sum_i lambda_i tau_i."""
    return _weighted_sums(source, sink, lambda_column(lambdas, source.n), block_width=block_width)


def check_drop(p) -> float:
    p = checks.as_float("p", p)
    if not (0.0 <= p < 1.0):
        raise ValueError(f"p={p!r} is out of range; valid: 0 <= p < 1 (the drop probability)")
    return p


def check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed={seed!r} must be a non-negative integer")
    return seed


def dare_block(block, p: float, seed: int):
    """(tau * keep / (1 - p), keep) for a block: DARE's drop from the counter-based generator."""
    keep = torch.stack([rng.keep_mask(seed, i, block.segment.key, block.lo, block.hi, p)
                        for i in range(block.tv.shape[0])])
    return block.tv * keep / (1 - p), keep


def dare_drop_args(block, p: float, seed: int) -> tuple:
    """The drop's arguments of pcb_fast.fused_cpu for a block, all tensors (so that no value is
    compiled in): [n, 1] stream constants of (seed, task, key) and their mix32, the block's first
    index, the keep threshold and 1 - p (float32, the divisor of the eager drop)."""
    streams = [rng.stream_constant(seed, i, block.segment.key) for i in range(block.tv.shape[0])]
    return (torch.tensor(streams, dtype=torch.int64).unsqueeze(1),
            torch.tensor([rng.mix32(h) for h in streams], dtype=torch.int64).unsqueeze(1),
            torch.tensor(block.lo), torch.tensor(rng.keep_threshold(p)), torch.tensor(1 - p, dtype=torch.float32))


def merge_dare(source, sink, *, p=0.9, seed=0, lambdas=None, block_width=DEFAULT_BLOCK_WIDTH):
    """DARE (Yu et al., "Language Models are Super Mario", ICML 2024): drop each entry of each task
    vector with probability p, rescale the survivors by 1/(1-p), then task arithmetic. The drop of
    entry j of key k in task i is a pure function of (seed, i, k, j): see pcb_fast.rng."""
    p, seed = check_drop(p), check_seed(seed)
    if fused_cpu.applies(source):  # the drop, the sum and the NaN check in one compiled loop per block
        lam = fused_cpu.weights(lambda_column(lambdas, source.n), source.n)
        kept = torch.zeros(source.n, dtype=torch.int64)
        for block in source.blocks(block_width):
            total, keep, row_max = fused_cpu.dare_sum(block.tv, *dare_drop_args(block, p, seed), lam)
            raise_if_not_finite(source, block, row_max)
            kept += keep
            sink(block.segment, block.lo, block.hi, total)
        return kept
    return _weighted_sums(source, sink, lambda_column(lambdas, source.n), masked=lambda b: dare_block(b, p, seed),
                          block_width=block_width)


def check_band(gamma, beta) -> tuple[float, float]:
    gamma, beta = checks.as_float("gamma", gamma), checks.as_float("beta", beta)
    if not (0.0 <= gamma < 1.0):
        raise ValueError(f"gamma={gamma!r} is out of range; valid: 0 <= gamma < 1 (the top fraction dropped)")
    if not (0.0 < beta <= 1.0) or gamma + beta > 1.0:
        raise ValueError(f"beta={beta!r} is out of range; valid: 0 < beta <= 1 - gamma (the fraction kept below the top)")
    return gamma, beta


def band_bounds(magnitude: torch.Tensor, drop: int, keep: int):
    """Per row of ``magnitude`` [..., L], the values at descending ranks drop and drop + keep - 1
    (keep >= 1), from two order statistics instead of a sort."""
    L = magnitude.shape[-1]
    if drop + keep <= L // 2:  # a partial top-k is cheaper than two order statistics of the row
        best = torch.topk(magnitude, drop + keep, dim=-1, sorted=False).values
        return best.kthvalue(keep, dim=-1, keepdim=True).values, best.amin(-1, keepdim=True)
    return (magnitude.kthvalue(L - drop, dim=-1, keepdim=True).values,
            magnitude.kthvalue(L - drop - keep + 1, dim=-1, keepdim=True).values)


def band_mask(magnitude: torch.Tensor, drop: int, keep: int) -> torch.Tensor:
    """Rows of ``magnitude`` [..., L]: True at the entries of descending rank in [drop, drop + keep),
    ties ranked by position, found from two order statistics per row instead of a sort."""
    if keep == 0:
        return torch.zeros_like(magnitude, dtype=torch.bool)
    top, low = band_bounds(magnitude, drop, keep)
    at_top, at_low = magnitude == top, magnitude == low
    inside = (magnitude <= top) & (magnitude >= low)
    # A boundary value that occurs once in its row sits exactly at its rank (drop, drop + keep - 1):
    # kept. Rows where a boundary value repeats need the rank of each copy, by position.
    tied = (at_top.sum(-1, keepdim=True) > 1) | (at_low.sum(-1, keepdim=True) > 1)
    if bool(tied.any()):
        rows = tied.squeeze(-1)
        sub, sub_inside = magnitude[rows], (magnitude[rows] < top[rows]) & (magnitude[rows] > low[rows])
        for value in (top[rows], low[rows]):
            equal = sub == value
            rank = (sub > value).sum(-1, keepdim=True) + equal.cumsum(-1) - 1
            sub_inside |= equal & (rank >= drop) & (rank < drop + keep)
        inside[rows] = sub_inside
    return inside


def breadcrumbs_block(block, gamma: float, beta: float):
    """(tau * band, band) for a block of whole rows: Breadcrumbs' per-row magnitude band."""
    n = block.tv.shape[0]
    row = row_length(block.segment.shape)
    magnitude = block.tv.abs().reshape(n, -1, row)
    mask = band_mask(magnitude, int(gamma * row), int(beta * row)).reshape(n, -1)
    return block.tv * mask, mask


def merge_breadcrumbs(source, sink, *, gamma=0.01, beta=0.1, lambdas=None, block_width=DEFAULT_BLOCK_WIDTH):
    """Model Breadcrumbs (Davari & Belilovsky, ECCV 2024): in every row (last dimension) of every
    tensor, drop the int(gamma L) largest |tau| and keep the next int(beta L); then task arithmetic."""
    gamma, beta = check_band(gamma, beta)
    if fused_cpu.applies(source):
        return _merge_breadcrumbs_fused(source, sink, gamma, beta, lambda_column(lambdas, source.n), block_width)
    return _weighted_sums(source, sink, lambda_column(lambdas, source.n),
                          masked=lambda b: breadcrumbs_block(b, gamma, beta), whole_rows=True, block_width=block_width)


def _fused_band_bounds(tv: torch.Tensor, drop: int, keep: int):
    """band_bounds of |tv| by the C row select of pcb_fast.native (same values, no |tv| stored, about
    8x faster), or by torch where that kernel cannot be built here."""
    problem = native.problem()
    if problem is None:
        return native.row_order_statistics(tv, drop, drop + keep - 1)
    warnings.warn(f"pcb_fast: native row select unavailable ({problem}); Breadcrumbs places "
                  f"its band with torch.topk (same values, slower)", stacklevel=3)
    return band_bounds(tv.abs(), drop, keep)


def _merge_breadcrumbs_fused(source, sink, gamma, beta, lam, block_width):
    """Breadcrumbs with the band's bounds from the native row select and the band, the sum over
    tasks and the NaN check in one compiled loop per block; rows where a bound repeats (ties ranked
    by position) are redone with the eager band_mask."""
    n = source.n
    lam = fused_cpu.weights(lam, n)
    kept = torch.zeros(n, dtype=torch.int64)
    for block in source.blocks(block_width, whole_rows=True):
        row = row_length(block.segment.shape)
        drop, keep = int(gamma * row), int(beta * row)
        if keep == 0:
            raise_if_not_finite(source, block, block.tv.abs().amax(1))
            sink(block.segment, block.lo, block.hi, torch.zeros(block.tv.shape[1]))
            continue
        tv = block.tv.reshape(n, -1, row)
        top, low = _fused_band_bounds(tv, drop, keep)
        total, tied, row_max = fused_cpu.band_block(tv, top, low, lam)
        raise_if_not_finite(source, block, row_max.amax(1))
        kept += keep * tv.shape[1]  # exactly `keep` per row where the bounds are single
        redo = tied.any(0).nonzero().flatten()
        if redo.numel():
            sub = tv[:, redo]
            mask = band_mask(sub.abs(), drop, keep)
            kept += mask.sum((1, 2)) - keep * redo.numel()
            total.view(-1, row)[redo] = sum_over_tasks((sub * mask).reshape(n, -1) * lam).view(-1, row)
        sink(block.segment, block.lo, block.hi, total)
    return kept
