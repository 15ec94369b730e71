"""PCB-Merging on the streaming engine.

Du et al., "Parameter Competition Balancing for Model Merging", NeurIPS 2024 (arXiv 2410.02396).
``variant="official"`` reproduces the authors' code (DESIGN.md 2.2), ``variant="paper"`` the
paper's equations (DESIGN.md 2.3); both with the defined edge cases of DESIGN.md 2.4.

Passes of the official variant, each one read of the task vectors:
  1. level-1 radix histogram of |tau| for the clip ranks lo, hi (and the NaN/Inf check);
  2. level-2 histogram of |tau|: exact lo_i, hi_i;
  3. scores P, level-1 histogram for the keep rank;
  4. scores P again, collecting the entries at or above the threshold's bucket;
then t_i, M_i from the collected scores and the merge of the collected entries, block by block.
"""

from __future__ import annotations

import torch

from .. import checks, torch_backend as tb
from ..engine import raise_if_not_finite, select_threshold, task_slices
from ..reference import clip_indices, keep_index
from ..select import RadixSelect
from ..sources import DEFAULT_BLOCK_WIDTH

PARAMS = ("ratio", "clamp_ratio", "inter", "variant")


def check_params(n: int, *, ratio=0.1, clamp_ratio=1e-4, inter="sum", variant="official", lambdas=None) -> dict:
    """Validated PCB parameters (ValueError naming the bad value and its valid range)."""
    return dict(
        ratio=checks.check_ratio(ratio),
        clamp_ratio=checks.check_clamp_ratio(clamp_ratio),
        inter=checks.check_choice("inter", inter, checks.INTER_CHOICES),
        variant=checks.check_choice("variant", variant, checks.VARIANT_CHOICES),
        lambdas=checks.check_lambdas(lambdas, n),
    )


def merge_pcb(source, sink, *, ratio=0.1, clamp_ratio=1e-4, inter="sum", variant="official", lambdas=None,
              block_width=DEFAULT_BLOCK_WIDTH) -> None:
    """Merge the task vectors of ``source`` with PCB; ``sink`` receives the merged tau_m block by block."""
    params = check_params(source.n, ratio=ratio, clamp_ratio=clamp_ratio, inter=inter, variant=variant, lambdas=lambdas)
    if params["variant"] == "official":
        _merge_official(source, sink, params, block_width)
    else:
        _merge_paper(source, sink, params, block_width)


def clip_bounds(source, clamp_ratio: float, block_width: int) -> tb.ClipStats:
    """Exact lo_i = sort(|tau_i|)[int(D a)], hi_i = sort(|tau_i|)[int(D (1 - a) - 1)] (passes 1-2)."""
    n, D = source.n, source.D
    ws = tb.Workspace(n, block_width, 1)
    selector = RadixSelect(n, torch.tensor([clip_indices(D, clamp_ratio)] * n), D)
    for block in source.blocks(block_width):
        magnitude = torch.abs(block.tv, out=ws.get(block.tv.shape[1])[0])
        raise_if_not_finite(source, block, magnitude.amax(1))
        selector.count_high(magnitude)
    selector.find_buckets()
    for block in source.blocks(block_width):
        selector.count_low(torch.abs(block.tv, out=ws.get(block.tv.shape[1])[0]))
    bounds = selector.values()
    return tb.ClipStats.from_bounds(bounds[:, 0], bounds[:, 1])


def _merge_official(source, sink, params, block_width):
    n, D = source.n, source.D
    clip = clip_bounds(source, params["clamp_ratio"], block_width)
    ws = tb.Workspace(n, block_width, 4 if params["inter"] == "pairwise" else 3)

    def score_blocks():
        for block in source.blocks(block_width):
            yield block, tb.official_scores(block.tv, clip, params["inter"], ws)

    t, peak, collected = select_threshold(source, score_blocks, keep_index(D, params["ratio"]))
    lambdas = params["lambdas"]
    for c in collected:
        m = c.hi - c.lo
        num, den = torch.zeros(m), torch.zeros(m)
        for i, rows in task_slices(c):
            score = c.score[rows]
            kept = score > t[i]
            pos = c.pos[rows][kept]
            # scale = (P - t) / (M - t) on kept entries, 0 elsewhere (DESIGN 2.2 step 6)
            scale = (score[kept] - t[i]) / (peak[i] - t[i])
            value = tb.clipped_values(c.tau[rows][kept], clip.lo[i, 0], clip.hi[i, 0]) * scale
            if lambdas is not None:
                value = value * lambdas[i]
            num.index_add_(0, pos, value)
            den.index_add_(0, pos, scale)
        sink(c.segment, c.lo, c.hi, num / torch.clamp(den, min=1e-12))


def pair_stats(source, block_width: int) -> tb.PairStats:
    """Min/max of tau_i * tau_j for all pairs, then the softmax partition sums (two passes)."""
    n = source.n
    ws = tb.Workspace(n, block_width, 2)
    lo = torch.full((n, n), float("inf"))
    hi = torch.full((n, n), float("-inf"))
    for block in source.blocks(block_width):
        raise_if_not_finite(source, block, block.tv.abs().amax(1))
        products = ws.get(block.tv.shape[1])[0]
        for i in range(n):
            torch.mul(block.tv, block.tv[i], out=products)
            lo[i] = torch.minimum(lo[i], products.amin(1))
            hi[i] = torch.maximum(hi[i], products.amax(1))
    stats = tb.PairStats.from_min_max(lo, hi)
    z_inter = torch.zeros(n, n, dtype=torch.float64)
    z_intra = torch.zeros(n, dtype=torch.float64)
    for block in source.blocks(block_width):
        m = block.tv.shape[1]
        terms = ws.get(m)[0]
        for i in range(n):
            normalized = tb.pair_normalized(block.tv, i, stats, terms)
            z_intra[i] += tb.intra_numerator(normalized[i], n, float(stats.peak[i, i]), ws.row(m)).sum(dtype=torch.float64)
            z_inter[i] += terms.sub_(stats.peak[i].unsqueeze(1)).exp_().sum(1, dtype=torch.float64)
    stats.inv_z_inter = (1.0 / z_inter).float()
    stats.inv_z_intra = (1.0 / z_intra).float()
    return stats


def _merge_paper(source, sink, params, block_width):
    n, D = source.n, source.D
    stats = pair_stats(source, block_width)
    ws = tb.Workspace(n, block_width, 2)

    def score_blocks():
        for block in source.blocks(block_width):
            yield block, tb.paper_scores(block.tv, stats, ws)

    t, _, collected = select_threshold(source, score_blocks, keep_index(D, params["ratio"]))
    lambdas = params["lambdas"]
    for c in collected:
        m = c.hi - c.lo
        num, den = torch.zeros(m), torch.zeros(m)
        for i, rows in task_slices(c):
            beta = c.score[rows]
            kept = beta >= t[i]
            pos, beta = c.pos[rows][kept], beta[kept]
            value = beta * c.tau[rows][kept]
            if lambdas is not None:
                value = value * lambdas[i]
            num.index_add_(0, pos, value)
            den.index_add_(0, pos, beta)
        sink(c.segment, c.lo, c.hi, torch.where(den > 0, num / torch.where(den > 0, den, 1.0), 0.0))
