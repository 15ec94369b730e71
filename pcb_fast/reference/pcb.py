"""The PCB oracle: PCB-Merging written literally, with full sorts, on a whole [n, D] matrix.

This is what every fast path is tested against, and the "authors' formulation" every benchmark
compares with. It follows the authors' code (github duguodong7/pcb-merging) line by line for
``variant="official"`` (docs/design.md 2.2) and the paper's equations for ``variant="paper"``
(docs/design.md 2.3). It is meant to be obviously right, not fast: it sorts every row and holds
several [n, D] matrices.

It shares no code with the engine: every helper below is its own, written in the literal form
(whole rows, sorts). Arguments are checked by the public entry points (``pcb_fast.pcb_reference``,
``merge(..., backend="reference")``) before they get here; the matrix is float32 and finite.

Two deliberate, documented departures from the authors' code (docs/design.md 2.4, 2.5):
- sums over tasks run in task order (task 0 + task 1 + ...); ``torch.sum(dim=0)`` may round the
  last bit differently, and a fixed order is what lets the streaming engine match bit for bit;
- the cases where their code yields NaN or overflows are defined as in docs/design.md 2.4.
"""

from __future__ import annotations

import torch


def _task_order_sum(x: torch.Tensor) -> torch.Tensor:
    """x[0] + x[1] + ... + x[n-1], added left to right."""
    total = x[0].clone()
    for i in range(1, x.shape[0]):
        total = total + x[i]
    return total


def _minmax(x: torch.Tensor) -> torch.Tensor:
    """Per-row (x - min) / (max - min); a constant row gives 0, where the authors' code gives NaN."""
    low = x.min(dim=1, keepdim=True).values
    high = x.max(dim=1, keepdim=True).values
    span = high - low
    return torch.where(span > 0, (x - low) / span, torch.zeros((), dtype=x.dtype))


def _weights(lambdas, n: int, device):
    """The per-task coefficients as an [n, 1] column on the task vectors' device, or None."""
    if lambdas is None:
        return None
    return torch.tensor([float(v) for v in lambdas], dtype=torch.float32, device=device).view(n, 1)


def pcb_official(tv: torch.Tensor, *, ratio: float = 0.1, clamp_ratio: float = 1e-4, inter: str = "sum",
                 lambdas=None) -> torch.Tensor:
    """PCB-Merging as the authors' code computes it (docs/design.md 2.2); [n, D] -> merged [D]."""
    n, D = tv.shape

    # Step 1: clip |tau| to its [a, 1-a] quantiles, read off a full sort of each row, with the
    # authors' indices: Python int() of the float products.
    magnitude = tv.abs()
    ordered = torch.sort(magnitude, dim=1).values
    lo = ordered[:, int(D * clamp_ratio)].unsqueeze(1)
    hi = ordered[:, int(D * (1 - clamp_ratio) - 1)].unsqueeze(1)
    # torch.clamp(x, lo, hi) with lo > hi sets everything to hi; the authors' code inherits that.
    magnitude = torch.clamp(magnitude, torch.minimum(lo, hi), hi)
    clipped = torch.sign(tv) * magnitude

    # Steps 2-3: intra-balancing exp(n N^2); beyond n = 80 the exponent is shifted by -n, a
    # per-row factor that step 6 cancels (exp(88) overflows float32).
    normalized = _minmax(magnitude)
    exponent = n * normalized**2
    if n > 80:
        exponent = exponent - n
    intra = torch.exp(exponent)

    # Step 4: inter-balancing.
    if inter == "sum":
        inter_score = torch.tanh(tv * _task_order_sum(tv))
    elif inter == "normalized_sum":
        inter_score = torch.tanh(tv * _task_order_sum(torch.sign(tv) * normalized))
    elif inter == "pairwise":
        signed = torch.sign(tv) * normalized
        inter_score = torch.tanh(signed * signed[0])
        for j in range(1, n):
            inter_score = inter_score + torch.tanh(signed * signed[j])
    else:
        raise ValueError(f"inter={inter!r} is not one of 'sum', 'normalized_sum', 'pairwise'")
    score = intra * inter_score  # step 5

    # Step 6: keep the top ratio of each row, rescaled to [0, 1] between threshold and max; the
    # min-max maps entries equal to t to 0 (the authors' off-by-one, kept on purpose).
    ordered = torch.sort(score, dim=1).values
    t = ordered[:, min(int(D * (1 - ratio)), D - 1)].unsqueeze(1)
    top = ordered[:, D - 1].unsqueeze(1)
    scale = _minmax(torch.clamp(score, t, top))

    # Step 7: weighted mean of the clipped task vectors.
    weighted = clipped * scale
    lam = _weights(lambdas, n, tv.device)
    if lam is not None:
        weighted = weighted * lam
    return _task_order_sum(weighted) / torch.clamp(_task_order_sum(scale), min=1e-12)


def paper_scores(tv: torch.Tensor) -> torch.Tensor:
    """beta = Softmax_D(n Norm(tau_i^2)) * sum_j Softmax_D(Norm(tau_i tau_j)), [n, D]
    (docs/design.md 2.3)."""
    n = tv.shape[0]
    intra = torch.softmax(n * _minmax(tv * tv), dim=1)
    inter = torch.softmax(_minmax(tv * tv[0]), dim=1)
    for j in range(1, n):
        inter = inter + torch.softmax(_minmax(tv * tv[j]), dim=1)
    return intra * inter


def pcb_paper(tv: torch.Tensor, *, ratio: float = 0.1, lambdas=None) -> torch.Tensor:
    """PCB-Merging as the paper's equations read (docs/design.md 2.3); [n, D] -> merged [D]."""
    n, D = tv.shape
    beta = paper_scores(tv)
    t = torch.sort(beta, dim=1).values[:, min(int(D * (1 - ratio)), D - 1)].unsqueeze(1)
    kept_beta = beta * (beta >= t)
    weighted = kept_beta * tv
    lam = _weights(lambdas, n, tv.device)
    if lam is not None:
        weighted = weighted * lam
    num = _task_order_sum(weighted)
    den = _task_order_sum(kept_beta)
    return torch.where(den > 0, num / torch.where(den > 0, den, 1.0), 0.0)
