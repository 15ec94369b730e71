"""Oracles of the baseline methods: literal formulations on a whole [n, D] task-vector matrix.

The oracles of the tests and the "authors' formulation" side of the benchmarks: full sorts and
kthvalue over whole rows, dense [n, D] temporaries, written to be obviously right, and sharing no
code with the engine (docs/design.md 5, 9). Sums over tasks run in task order, as in
pcb_fast.reference.pcb. ``segments`` lists (key, shape) of the row's pieces in order; only the
methods that need the key (DARE's generator) or the shape (Breadcrumbs' rows) use it. Arguments are
checked by the public entry points before they get here.
"""

from __future__ import annotations

import math
import zlib

import numpy as np
import torch


def _task_order_sum(x: torch.Tensor) -> torch.Tensor:
    """x[0] + x[1] + ... + x[n-1], added left to right."""
    total = x[0].clone()
    for i in range(1, x.shape[0]):
        total = total + x[i]
    return total


def _weights(lambdas, n: int, device=None):
    """The per-task coefficients as an [n, 1] column, or None."""
    return None if lambdas is None else torch.tensor([float(v) for v in lambdas], dtype=torch.float32,
                                                     device=device).view(n, 1)


def average(tv, *, lambdas=None, segments=None) -> torch.Tensor:
    """Weighted mean of the task vectors, weights ``lambdas`` (default 1) normalised to sum 1."""
    lam = _weights(lambdas, tv.shape[0], tv.device)
    if lam is None:
        return _task_order_sum(tv) / tv.shape[0]
    return _task_order_sum(tv * lam) / float(lam.sum())


def _normalized(total: torch.Tensor, lambdas, n: int, normalize: bool) -> torch.Tensor:
    """mergekit's ``normalize``: the weighted sum divided by the sum of the weights (1 where that
    sum is within 1e-8 of 0)."""
    if not normalize:
        return total
    weight = float(n) if lambdas is None else float(_weights(lambdas, n).sum())
    return total / (1.0 if abs(weight) < 1e-8 else weight)


def task_arithmetic(tv, *, normalize=False, lambdas=None, segments=None) -> torch.Tensor:
    """Ilharco et al. 2023: sum_i lambda_i tau_i (``lam`` is applied by the caller)."""
    lam = _weights(lambdas, tv.shape[0], tv.device)
    return _normalized(_task_order_sum(tv if lam is None else tv * lam), lambdas, tv.shape[0], normalize)


def _per_task(value, n: int) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


def magnitude_mask(tv: torch.Tensor, density, topk: str = "threshold", min_keep: int = 0) -> torch.Tensor:
    """TIES trim, task by task (``density``: one, or one per task). "threshold" (authors' code):
    |tau| >= kthvalue(|tau|, D - k), ties kept; "exact" (mergekit): exactly k entries, ties at the
    threshold by position; k = int(D * density), at least ``min_keep`` (mergekit: 1), at most D."""
    n, D = tv.shape
    mask = torch.zeros_like(tv, dtype=torch.bool)
    for i, density in enumerate(_per_task(density, n)):
        keep = min(D, max(min_keep, int(D * density)))
        magnitude = tv[i].abs()
        if topk == "threshold":
            if keep >= D:
                mask[i] = True
            else:
                mask[i] = magnitude >= magnitude.kthvalue(D - keep).values
        else:
            mask[i, torch.sort(magnitude, descending=True, stable=True).indices[:keep]] = True
    return mask


def elect_and_merge(trimmed: torch.Tensor, lam, sign_ties: str, normalize: bool = True) -> torch.Tensor:
    """TIES' sign election and disjoint mean (authors' resolve_sign and disjoint_merge).

    The elected sign of a position is the sign of the sum of the (weighted) trimmed values; where
    that sum is 0, the authors give the majority sign of the whole model (the sign of the sum of
    the elected signs), mergekit +1 (``sign_ties="positive"``). The mean runs over the entries that
    agree with it; with ``lam`` it divides by the sum of the agreeing weights (mergekit's form).
    """
    weighted = trimmed if lam is None else trimmed * lam
    sign = torch.sign(_task_order_sum(weighted))
    majority = torch.sign(sign.sum()) if sign_ties == "majority" else torch.tensor(1.0, device=sign.device)
    sign = torch.where(sign == 0, majority, sign)
    agree = torch.where(sign > 0, weighted > 0, weighted < 0)
    total = _task_order_sum(weighted * agree)
    if not normalize:  # mergekit's normalize: false: the sum of the agreeing entries
        return total
    if lam is None:
        return total / torch.clamp(_task_order_sum(agree.float()), min=1)
    weight = _task_order_sum(agree.float() * lam)
    return total / torch.where(weight == 0, 1.0, weight)


def ties(tv, *, density=0.2, sign_ties="majority", topk="threshold", normalize=True, min_keep=0, lambdas=None,
         segments=None):
    """Yadav et al. 2023 (TIES-Merging): trim, elect sign, disjoint mean."""
    return elect_and_merge(tv * magnitude_mask(tv, density, topk, min_keep), _weights(lambdas, tv.shape[0], tv.device),
                           sign_ties, normalize)


# ---- DARE's drops: the counter-based hash of docs/design.md 5.4, written here in numpy's uint32
# arithmetic (wrapping multiplies), independently of the engine's int64 form in pcb_fast.core.rng.

_M1, _M2 = np.uint32(0x21F0AAAD), np.uint32(0x735A2D97)


def _mix(x):
    """Two rounds of xorshift-multiply on uint32 (arrays or numpy scalars)."""
    with np.errstate(over="ignore"):
        x = x ^ (x >> np.uint32(16))
        x = x * _M1
        x = x ^ (x >> np.uint32(15))
        x = x * _M2
        return x ^ (x >> np.uint32(15))


def dare_keep(seed: int, task: int, key: str, numel: int, p: float) -> torch.Tensor:
    """Bool mask over entries 0..numel-1 of ``key`` in task ``task``: True where DARE keeps it.

    Entry j's 24-bit draw is the top 24 bits of mix(mix(j_lo ^ h) ^ j_hi ^ mix(h)), with h the
    stream constant of (seed, task, key); it is kept when the draw is at least round(p * 2^24)."""
    u32 = np.uint32
    h = _mix(u32(seed & 0xFFFFFFFF))
    h = _mix(h ^ u32((seed >> 32) & 0xFFFFFFFF))
    h = _mix(h ^ u32(task & 0xFFFFFFFF))
    h = _mix(h ^ u32(zlib.crc32(key.encode("utf-8"))))
    index = np.arange(numel, dtype=np.uint64)
    x = _mix((index & np.uint64(0xFFFFFFFF)).astype(np.uint32) ^ h)
    x = _mix(x ^ (index >> np.uint64(32)).astype(np.uint32) ^ _mix(h))
    draw = x >> u32(8)
    return torch.from_numpy(draw >= round(p * (1 << 24)))


def _l1_rescaled(tv: torch.Tensor, masked: torch.Tensor, segments) -> torch.Tensor:
    """mergekit's ``rescale: true``: each task's masked vector times sum|tau_i| / sum|masked_i|,
    unscaled where either sum is below 1e-7. Sums: torch.sum of each tensor in float32 (mergekit's
    ``tensor.abs().sum()``), the tensors' sums added in float64 and rounded to float32."""
    out = masked.clone()
    for i in range(tv.shape[0]):
        before = after = 0.0
        offset = 0
        for _, shape in segments:
            numel = math.prod(shape)
            before += float(tv[i, offset : offset + numel].abs().sum())
            after += float(masked[i, offset : offset + numel].abs().sum())
            offset += numel
        before, after = (torch.tensor(x, dtype=torch.float32, device=tv.device) for x in (before, after))
        if before >= 1e-7 and after >= 1e-7:
            out[i] = masked[i] * (before / after)
    return out


def dare_masked(tv: torch.Tensor, p, seed: int, segments, rescale: str = "inverse") -> torch.Tensor:
    """DARE (Yu et al. 2024): drop each entry with probability p (one, or one per task), rescale
    survivors by 1/(1-p) ("inverse"), to the task vector's L1 norm ("l1", mergekit), or not ("none")."""
    ps = _per_task(p, tv.shape[0])
    keep = torch.cat([torch.stack([dare_keep(seed, i, key, math.prod(shape), ps[i]) for i in range(tv.shape[0])])
                      for key, shape in segments], dim=1).to(tv.device)
    if rescale == "none":
        return tv * keep
    if rescale == "l1":
        return _l1_rescaled(tv, tv * keep, segments)
    if isinstance(p, (list, tuple)):
        return tv * keep / torch.tensor([[1 - x] for x in ps], dtype=torch.float32, device=tv.device)
    return tv * keep / (1 - p)


def dare(tv, *, p=0.9, seed=0, rescale="inverse", normalize=False, lambdas=None, segments=None):
    """DARE then task arithmetic."""
    return task_arithmetic(dare_masked(tv, p, seed, segments, rescale), normalize=normalize, lambdas=lambdas)


def dare_ties(tv, *, p=0.9, seed=0, sign_ties="majority", rescale="inverse", normalize=True, lambdas=None,
              segments=None):
    """DARE then TIES sign election and disjoint mean (DARE's drop replaces the magnitude trim)."""
    return elect_and_merge(dare_masked(tv, p, seed, segments, rescale), _weights(lambdas, tv.shape[0], tv.device), sign_ties,
                           normalize)


def breadcrumbs_mask(tv, gamma, beta, band: str, segments) -> torch.Tensor:
    """Model Breadcrumbs' band. ``band="row"`` (the paper): in every row (last dim) of every tensor,
    drop the int(gamma L) largest |tau| and keep the next int(beta L) (ties by position; a scalar is
    one row of one entry). ``band="tensor"`` (mergekit's magnitude_outliers, literally): per tensor of
    N entries and per task, sort |tau| ascending (stable), keep the entries at ascending positions
    [n_bot, n_bot + int(beta N)) with n_bot = max(0, N - int(beta N) - int(gamma N))."""
    masks, offset = [], 0
    n = tv.shape[0]
    for _, shape in segments:
        numel = math.prod(shape)
        if band == "tensor":
            mask = torch.zeros(n, numel, dtype=torch.bool)
            for i, (g, b) in enumerate(zip(_per_task(gamma, n), _per_task(beta, n))):
                target, top = int(b * numel), int(g * numel)
                bottom = max(0, numel - target - top)
                order = torch.sort(tv[i, offset : offset + numel].abs(), stable=True).indices
                mask[i, order[bottom : bottom + target]] = True
            masks.append(mask)
            offset += numel
            continue
        row = shape[-1] if len(shape) else 1
        block = tv[:, offset : offset + numel].reshape(n, -1, row)
        drop, keep = int(gamma * row), int(beta * row)
        order = torch.sort(block.abs(), dim=2, descending=True, stable=True).indices
        rank = torch.empty_like(order).scatter_(2, order, torch.arange(row).expand_as(order))
        masks.append(((rank >= drop) & (rank < drop + keep)).reshape(n, numel))
        offset += numel
    return torch.cat(masks, dim=1)


def breadcrumbs(tv, *, gamma=0.01, beta=0.1, band="row", normalize=False, lambdas=None, segments=None):
    """Davari & Belilovsky 2024 (Model Breadcrumbs): the band of :func:`breadcrumbs_mask`, then task
    arithmetic."""
    return task_arithmetic(tv * breadcrumbs_mask(tv, gamma, beta, band, segments), normalize=normalize,
                           lambdas=lambdas)


def breadcrumbs_ties(tv, *, gamma=0.01, beta=0.1, band="row", sign_ties="majority", normalize=True, lambdas=None,
                     segments=None):
    """mergekit's breadcrumbs_ties: the Breadcrumbs band, then TIES' election and disjoint mean."""
    return elect_and_merge(tv * breadcrumbs_mask(tv, gamma, beta, band, segments), _weights(lambdas, tv.shape[0], tv.device),
                           sign_ties, normalize)


METHODS = {
    "average": average,
    "task_arithmetic": task_arithmetic,
    "ties": ties,
    "dare": dare,
    "dare_ties": dare_ties,
    "breadcrumbs": breadcrumbs,
    "breadcrumbs_ties": breadcrumbs_ties,
}
