"""Arcee Fusion: take the other model's changes where they matter most (Arcee AI; mergekit's
``arcee_fusion``), per tensor.

Importance of an entry: |theta_1 - theta_pre| times the KL divergence of softmax(theta_1) from
softmax(theta_pre) along the last dimension (each + 1e-8). The entries whose importance reaches
median + 1.5 (q3 - q1) (quantiles by index int(q (N - 1)) into the sorted importances) take the
other model's value; the rest keep the base's. mergekit 0.1.5's operations, in the compute dtype.
mergekit estimates the quantiles of tensors over 10^6 entries from a random sample (torch's
global generator); pcb_fast takes them from every entry, so such tensors may differ.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .spec import MethodSpec
from .weight_space import COMPUTE_DTYPE, merge_weights, model_count, no_weights


def importance(theta: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    p = F.softmax(theta, dim=-1) + 1e-8
    q = F.softmax(base, dim=-1) + 1e-8
    return (theta - base).abs() * torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)


def arcee_fusion(base: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    scores = importance(other, base)
    ordered, _ = torch.sort(scores.reshape(-1))
    q1, median, q3 = ordered[(torch.tensor([0.25, 0.5, 0.75]) * (ordered.numel() - 1)).long()]
    mask = (scores >= median + 1.5 * (q3 - q1)).float()
    return base + (other - base) * mask


check_one_other = model_count(1, "arcee_fusion takes the base model and exactly one other model; got {n} others")


def merge_arcee_fusion(source, sink, options, *, compute_dtype="float32", lambdas=None, block_width=None):
    """Arcee Fusion of the base model and one other model, every tensor on its own."""
    no_weights("arcee_fusion", lambdas)
    check_one_other({}, source.n)
    return merge_weights(source, sink, options, lambda key, base, models: arcee_fusion(base, models[0]), lambda key: {},
                         compute_dtype=compute_dtype)


SPEC = MethodSpec(
    name="arcee_fusion", merge=merge_arcee_fusion, summary="Arcee Fusion",
    citation="Arcee AI, Arcee Fusion (mergekit's arcee_fusion)", url="https://arcee.ai",
    params=(COMPUTE_DTYPE,), check_together=check_one_other, backends=("torch",), mergekit="arcee_fusion",
    mergekit_defaults={"scope": "tensor"}, single_pass=lambda params: True, uses_statistics=False, weight_space=True)
