"""Literal formulations of the baseline methods on a whole [n, D] task-vector matrix.

The oracles of the tests and the "authors' formulation" side of the benchmarks: full sorts and
kthvalue over whole rows, dense [n, D] temporaries, written to be obviously right. Sums over tasks
run in task order (see pcb_fast.reference). ``segments`` lists (key, shape) of the row's pieces in
order; only methods that need the key (DARE's generator) or the shape (Breadcrumbs' rows) use it.
"""

from __future__ import annotations

import math

import torch

from . import checks, rng
from .reference import _as_matrix, sum_over_tasks
from .sources import row_length


def _lambda_column(lambdas, n):
    lambdas = checks.check_lambdas(lambdas, n)
    return None if lambdas is None else torch.tensor(lambdas, dtype=torch.float32).unsqueeze(1)


def average(task_vectors, *, lambdas=None, segments=None) -> torch.Tensor:
    """Weighted mean of the task vectors, weights ``lambdas`` (default 1) normalised to sum 1."""
    tv = _as_matrix(task_vectors)
    lam = _lambda_column(lambdas, tv.shape[0])
    if lam is None:
        return sum_over_tasks(tv) / tv.shape[0]
    return sum_over_tasks(tv * lam) / float(lam.sum())


def task_arithmetic(task_vectors, *, lambdas=None, segments=None) -> torch.Tensor:
    """Ilharco et al. 2023: sum_i lambda_i tau_i (``lam`` is applied by the caller)."""
    tv = _as_matrix(task_vectors)
    lam = _lambda_column(lambdas, tv.shape[0])
    return sum_over_tasks(tv if lam is None else tv * lam)


def magnitude_mask(tv: torch.Tensor, density: float, topk: str = "threshold") -> torch.Tensor:
    """TIES trim. "threshold" (authors' code): |tau| >= kthvalue(|tau|, D - int(D * density)), ties
    kept; "exact" (mergekit): exactly int(D * density) entries, ties at the threshold by position."""
    n, D = tv.shape
    keep = int(D * density)
    magnitude = tv.abs()
    if topk == "threshold":
        if keep >= D:
            return torch.ones_like(tv, dtype=torch.bool)
        kth = magnitude.kthvalue(D - keep, dim=1, keepdim=True).values
        return magnitude >= kth
    order = torch.sort(magnitude, dim=1, descending=True, stable=True).indices[:, :keep]
    return torch.zeros_like(tv, dtype=torch.bool).scatter_(1, order, True)


def elected_signs(weighted: torch.Tensor) -> torch.Tensor:
    """TIES sign election per position: sign of the sum over tasks (0 where it is 0)."""
    return torch.sign(sum_over_tasks(weighted))


def zero_sign_fill(sign_total, sign_ties: str) -> torch.Tensor:
    """The sign given to zero-sum positions: the majority elected sign of the whole model
    (authors' resolve_zero_signs, from the sum of the elected signs) or +1 (mergekit)."""
    return torch.sign(torch.as_tensor(sign_total, dtype=torch.float32)) if sign_ties == "majority" else torch.ones(())


def disjoint_mean(weighted: torch.Tensor, sign: torch.Tensor, fill: torch.Tensor, lam) -> torch.Tensor:
    """Mean of the entries agreeing with the elected sign (authors' disjoint_merge; with ``lam``,
    mergekit's weighted form: divide by the sum of the agreeing weights)."""
    sign = torch.where(sign == 0, fill, sign)
    agree = torch.where(sign > 0, weighted > 0, weighted < 0)
    selected = weighted * agree
    if lam is None:
        return sum_over_tasks(selected) / torch.clamp(sum_over_tasks(agree.float()), min=1)
    weight = sum_over_tasks(agree.float() * lam)
    return sum_over_tasks(selected) / torch.where(weight == 0, 1.0, weight)


def elect_and_merge(trimmed: torch.Tensor, lam, sign_ties: str) -> torch.Tensor:
    """TIES sign election and disjoint mean on trimmed task vectors."""
    weighted = trimmed if lam is None else trimmed * lam
    sign = elected_signs(weighted)
    return disjoint_mean(weighted, sign, zero_sign_fill(sign.sum(), sign_ties), lam)


def ties(task_vectors, *, density=0.2, sign_ties="majority", topk="threshold", lambdas=None, segments=None):
    """Yadav et al. 2023 (TIES-Merging): trim, elect sign, disjoint mean."""
    tv = _as_matrix(task_vectors)
    lam = _lambda_column(lambdas, tv.shape[0])
    return elect_and_merge(tv * magnitude_mask(tv, density, topk), lam, sign_ties)


def dare_masked(tv: torch.Tensor, p: float, seed: int, segments) -> torch.Tensor:
    """DARE (Yu et al. 2024): drop each entry with probability p, rescale survivors by 1/(1-p)."""
    keep = torch.cat([torch.stack([rng.keep_mask(seed, i, key, 0, math.prod(shape), p) for i in range(tv.shape[0])], dim=0)
                      for key, shape in segments], dim=1)
    return tv * keep / (1 - p)


def dare(task_vectors, *, p=0.9, seed=0, lambdas=None, segments=None):
    """DARE then task arithmetic."""
    tv = _as_matrix(task_vectors)
    return task_arithmetic(dare_masked(tv, p, seed, segments), lambdas=lambdas)


def dare_ties(task_vectors, *, p=0.9, seed=0, sign_ties="majority", lambdas=None, segments=None):
    """DARE then TIES sign election and disjoint mean (DARE's drop replaces the magnitude trim)."""
    tv = _as_matrix(task_vectors)
    return elect_and_merge(dare_masked(tv, p, seed, segments), _lambda_column(lambdas, tv.shape[0]), sign_ties)


def breadcrumbs(task_vectors, *, gamma=0.01, beta=0.1, lambdas=None, segments=None):
    """Davari & Belilovsky 2024 (Model Breadcrumbs): in every row (last dim) of every tensor, drop
    the int(gamma L) largest |tau| and keep the next int(beta L) (ties by position); then task
    arithmetic."""
    tv = _as_matrix(task_vectors)
    masks, offset = [], 0
    for _, shape in segments:
        numel = math.prod(shape)
        row = row_length(shape)
        block = tv[:, offset : offset + numel].reshape(tv.shape[0], -1, row)
        drop, keep = int(gamma * row), int(beta * row)
        order = torch.sort(block.abs(), dim=2, descending=True, stable=True).indices
        rank = torch.empty_like(order).scatter_(2, order, torch.arange(row).expand_as(order))
        masks.append(((rank >= drop) & (rank < drop + keep)).reshape(tv.shape[0], numel))
        offset += numel
    return task_arithmetic(tv * torch.cat(masks, dim=1), lambdas=lambdas)


METHODS = {
    "average": average,
    "task_arithmetic": task_arithmetic,
    "ties": ties,
    "dare": dare,
    "dare_ties": dare_ties,
    "breadcrumbs": breadcrumbs,
}
