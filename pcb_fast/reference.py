"""The reference path: PCB-Merging written literally, with full sorts, on a whole [n, D] matrix.

This is the oracle every fast path is tested against, and the "authors' formulation" every
benchmark compares with. It follows the authors' code (github duguodong7/pcb-merging) line by line
for ``variant="official"`` and the paper's equations for ``variant="paper"`` (DESIGN.md 2.2-2.4).
It is meant to be obviously right, not fast: it sorts every row and holds several [n, D] matrices.

Two deliberate, documented departures from the authors' code:
- sums over tasks run in task order (task 0 + task 1 + ...); ``torch.sum(dim=0)`` may round the
  last bit differently, and a fixed order is what lets the streaming engine match bit for bit;
- the cases where their code yields NaN or overflows are defined as in DESIGN.md 2.4.
"""

from __future__ import annotations

import torch

from . import checks
from .numerics import warm_up_exp

# exp(n * x) with x in [0, 1] overflows float32 for n > 88; up to this n it is computed exactly.
EXACT_EXP_MAX_N = 80


def keep_index(D: int, ratio: float) -> int:
    """Ascending rank of the keep threshold t: ``int(D * (1 - ratio))`` (authors' rounding)."""
    return min(int(D * (1 - ratio)), D - 1)


def clip_indices(D: int, clamp_ratio: float) -> tuple[int, int]:
    """Ascending ranks (lo, hi) of the outlier clip: ``int(D*a)`` and ``int(D*(1-a) - 1)``."""
    return int(D * clamp_ratio), int(D * (1 - clamp_ratio) - 1)


def sum_over_tasks(x: torch.Tensor) -> torch.Tensor:
    """Sum of the rows of ``x`` in task order: ``x[0] + x[1] + ...`` (a fixed rounding order)."""
    acc = x[0].clone()
    for row in x[1:]:
        acc += row
    return acc


def minmax_normalize(x: torch.Tensor) -> torch.Tensor:
    """Per-row (x - min) / (max - min); a row with max == min normalises to 0 (not NaN)."""
    mn = x.amin(dim=1, keepdim=True)
    mx = x.amax(dim=1, keepdim=True)
    span = mx - mn
    return torch.where(span > 0, (x - mn) / span, torch.zeros((), dtype=x.dtype))


def intra_term(normalized: torch.Tensor, n: int) -> torch.Tensor:
    """exp(n * N^2); for n > 80 shifted by -n, a per-row factor that step 6 cancels."""
    z = n * normalized**2
    if n > EXACT_EXP_MAX_N:
        z = z - n
    return torch.exp(z)


def pcb_official(
    task_vectors: torch.Tensor,
    *,
    ratio: float = 0.1,
    clamp_ratio: float = 1e-4,
    inter: str = "sum",
    lambdas=None,
) -> torch.Tensor:
    """PCB-Merging as the authors' code computes it (DESIGN.md 2.2); returns the merged [D] vector."""
    tv = _as_matrix(task_vectors)
    n, D = tv.shape
    ratio = checks.check_ratio(ratio)
    clamp_ratio = checks.check_clamp_ratio(clamp_ratio)
    warm_up_exp()
    checks.check_choice("inter", inter, checks.INTER_CHOICES)
    lambdas = checks.check_lambdas(lambdas, n)

    # Step 1: clip |tau| to its [a, 1-a] quantiles, found by a full sort of each row.
    magnitude = tv.abs()
    sorted_mag = torch.sort(magnitude, dim=1).values
    i_lo, i_hi = clip_indices(D, clamp_ratio)
    lo = sorted_mag[:, i_lo : i_lo + 1]
    hi = sorted_mag[:, i_hi : i_hi + 1]
    # torch.clamp(x, lo, hi) with lo > hi sets everything to hi; the authors' code inherits that.
    magnitude = torch.clamp(magnitude, torch.minimum(lo, hi), hi)
    clipped = torch.sign(tv) * magnitude

    # Steps 2-5: intra-balancing times inter-balancing.
    normalized = minmax_normalize(magnitude)
    intra = intra_term(normalized, n)
    if inter == "sum":
        inter_score = torch.tanh(tv * sum_over_tasks(tv))
    else:
        signed = torch.sign(tv) * normalized
        if inter == "normalized_sum":
            inter_score = torch.tanh(tv * sum_over_tasks(signed))
        else:  # pairwise
            inter_score = torch.tanh(signed * signed[0])
            for j in range(1, n):
                inter_score += torch.tanh(signed * signed[j])
    score = intra * inter_score

    # Step 6: keep the top ratio of each row, rescaled to [0, 1] between threshold and max.
    sorted_score = torch.sort(score, dim=1).values
    k = keep_index(D, ratio)
    t = sorted_score[:, k : k + 1]
    m = sorted_score[:, D - 1 : D]
    scale = minmax_normalize(torch.clamp(score, t, m))

    # Step 7: weighted mean of the clipped task vectors.
    weighted = clipped * scale
    if lambdas is not None:
        weighted = weighted * torch.tensor(lambdas, dtype=torch.float32).unsqueeze(1)
    return sum_over_tasks(weighted) / torch.clamp(sum_over_tasks(scale), min=1e-12)


def pcb_paper(task_vectors: torch.Tensor, *, ratio: float = 0.1, lambdas=None) -> torch.Tensor:
    """PCB-Merging as the paper's equations read (DESIGN.md 2.3); returns the merged [D] vector."""
    tv = _as_matrix(task_vectors)
    n, D = tv.shape
    ratio = checks.check_ratio(ratio)
    lambdas = checks.check_lambdas(lambdas, n)
    beta = paper_scores(tv)
    k = keep_index(D, ratio)
    t = torch.sort(beta, dim=1).values[:, k : k + 1]
    kept_beta = beta * (beta >= t)
    weighted = kept_beta * tv
    if lambdas is not None:
        weighted = weighted * torch.tensor(lambdas, dtype=torch.float32).unsqueeze(1)
    num = sum_over_tasks(weighted)
    den = sum_over_tasks(kept_beta)
    return torch.where(den > 0, num / torch.where(den > 0, den, 1.0), 0.0)


def paper_scores(tv: torch.Tensor) -> torch.Tensor:
    """beta = Softmax_D(n Norm(tau_i^2)) * sum_j Softmax_D(Norm(tau_i tau_j)), [n, D] (DESIGN 2.3)."""
    n = tv.shape[0]
    warm_up_exp()
    intra = torch.softmax(n * minmax_normalize(tv * tv), dim=1)
    inter = torch.softmax(minmax_normalize(tv * tv[0]), dim=1)
    for j in range(1, n):
        inter += torch.softmax(minmax_normalize(tv * tv[j]), dim=1)
    return intra * inter


def pcb_reference(task_vectors, *, ratio=0.1, clamp_ratio=1e-4, inter="sum", variant="official", lambdas=None):
    """Dispatch to :func:`pcb_official` or :func:`pcb_paper` by ``variant``."""
    checks.check_choice("variant", variant, checks.VARIANT_CHOICES)
    if variant == "paper":
        return pcb_paper(task_vectors, ratio=ratio, lambdas=lambdas)
    return pcb_official(task_vectors, ratio=ratio, clamp_ratio=clamp_ratio, inter=inter, lambdas=lambdas)


def _as_matrix(task_vectors) -> torch.Tensor:
    """A [n, D] float32 matrix from a [n, D] tensor or a list of n 1-D tensors (validated)."""
    rows = checks.task_vector_rows(task_vectors)
    for i, row in enumerate(rows):
        checks.check_finite(f"task vector {i}", row)
    if isinstance(task_vectors, torch.Tensor):
        return task_vectors.float()  # no copy for a float32 matrix
    return torch.stack([row.float() for row in rows])
