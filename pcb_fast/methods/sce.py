"""SCE: select, calculate, erase (Wan et al., "FuseChat: Knowledge Fusion of Chat Models", 2024;
mergekit's ``sce``), per tensor.

Task vectors tau_i = theta_i - theta_pre. Select: with ``select_topk`` < 1, keep the entries whose
variance across the models is among the int(select_topk * nonzero) largest. Calculate: each model's
weight is its mean tau^2 over the tensor, normalised to sum 1 (uniform where the sum is below
1e-6). Erase: drop entries whose sign disagrees with the sign of sum_i tau_i (+ on a tie). Then
theta = theta_pre + sum_i w_i m_i tau_i / max(sum_i w_i m_i, 1e-6). mergekit 0.1.5's operations,
in the compute dtype (mergekit's ``int8_mask`` changes no value).
"""

from __future__ import annotations

import torch

from ..core import checks
from .spec import MethodSpec, Param
from .weight_space import COMPUTE_DTYPE, merge_weights, no_weights


def sign_consensus(tvs: torch.Tensor) -> torch.Tensor:
    """Bool mask of the entries whose sign is that of the sum over the models (+1 for a zero sum)."""
    sign = tvs.sign()
    majority = (tvs.sum(dim=0) >= 0).to(tvs.dtype) * 2 - 1
    return sign == majority


def variance_mask(tvs: torch.Tensor, density: float) -> torch.Tensor:
    """0/1 mask (of the tensor's shape and dtype) of the entries with the int(density * nonzero)
    largest variances across the models."""
    if density <= 0:
        return torch.zeros_like(tvs[0])
    if density >= 1:
        return torch.ones_like(tvs[0])
    var = torch.var(tvs, dim=0, unbiased=False)
    k = int(torch.count_nonzero(var) * density)
    if k == 0:
        return torch.zeros_like(var)
    _, indices = torch.topk(var.abs().view(-1), k=k, largest=True)
    mask = torch.zeros_like(var)
    mask.view(-1)[indices] = 1
    return mask


def sce(base: torch.Tensor, models: list, select_topk: float = 1.0) -> torch.Tensor:
    """SCE of the fine-tuned ``models`` around ``base``."""
    if not models:
        return base
    tvs = torch.stack([m - base for m in models], dim=0)
    if select_topk < 1:
        tvs = tvs * variance_mask(tvs, select_topk).unsqueeze(0)
    erase = sign_consensus(tvs)
    weights = tvs.square().reshape(tvs.shape[0], -1).mean(dim=1)
    total = torch.sum(weights).item()
    weights = torch.ones_like(weights) / weights.shape[0] if abs(total) < 1e-6 else weights / total
    while weights.dim() < tvs.dim():
        weights = weights.unsqueeze(-1)
    kept = weights * erase
    return base + (tvs * kept).sum(dim=0) / torch.sum(kept, dim=0).clamp(min=1e-6)


def merge_sce(source, sink, options, *, select_topk=1.0, compute_dtype="float32", lambdas=None, block_width=None):
    """SCE of the fine-tuned models around the base, every tensor on its own."""
    no_weights("sce", lambdas)
    select_topk = checks.as_float("select_topk", select_topk)
    return merge_weights(source, sink, options, lambda key, base, models: sce(base, models, select_topk),
                         lambda key: {},
                         compute_dtype=compute_dtype)


SPEC = MethodSpec(
    name="sce", merge=merge_sce, summary="SCE",
    citation="Wan et al., FuseChat: Knowledge Fusion of Chat Models, 2024", url="https://arxiv.org/abs/2408.07990",
    params=(Param("select_topk", 1.0, lambda v: checks.as_float("select_topk", v),
                  "fraction of the entries with the largest variance across models kept", flag=False),
            COMPUTE_DTYPE),
    backends=("torch",), mergekit="sce", mergekit_defaults={"scope": "tensor"},
    single_pass=lambda params: True, uses_statistics=False, weight_space=True)
