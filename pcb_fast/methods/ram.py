"""RAM and RAM+: Reinforced Agent Merging (arXiv 2601.13572; mergekit's ``ram`` and ``ramplus_tl``),
per tensor.

For RL-trained agents whose updates are sparse. Task vectors tau_i = theta_i - theta_pre; an entry
of tau_i counts as changed where |tau_i| > epsilon (others count as 0), and c is the number of
models that changed it. An entry changed by one model alone takes that model's change; one changed
by several takes their mean: theta = theta_pre + sum_i tau_i m_i (u + o / max(c, 1)), with m_i
the changed mask, u = [c == 1] and o = [c > 1].

RAM+ (tensor-local, ``ramplus_tl``) scales each model's unique changes up by
lambda_i = 1 + r clamp(rho_i, 0, alpha), rho_i = (changed entries of model i that others changed
too) / max(changed entries it alone changed, epsilon), counted over the tensor.

mergekit 0.1.5's operations in its order, in the compute dtype (RAM+'s lambda_i is float32, so
its unique changes, the sum and the result are float32 whatever the inputs).
"""

from __future__ import annotations

import torch

from ..core import checks
from .spec import MethodSpec, Param
from .weight_space import COMPUTE_DTYPE, merge_weights, no_weights


def changes(base: torch.Tensor, models: list, epsilon: float):
    """[n, N] task vectors zeroed where not changed (|tau| <= epsilon), the [n, N] changed mask, and
    the [1, N] masks of entries changed by one model alone and by several, and [1, N] counts."""
    tau = torch.stack([m - base for m in models], dim=0).view(len(models), -1)
    changed = tau.abs() > epsilon
    count = changed.sum(dim=0, keepdim=True)
    return tau * changed, changed, count == 1, count > 1, count


def ram(base: torch.Tensor, models: list, epsilon: float = 1e-5) -> torch.Tensor:
    """RAM of the fine-tuned ``models`` around ``base``: unique changes kept, shared ones averaged."""
    if not models:
        return base
    tau, _, unique, shared, count = changes(base, models, epsilon)
    merged = (tau * unique + tau * shared / count.clamp(min=1)).sum(dim=0, keepdim=True)
    return base + merged.reshape_as(base)


def ramplus_tl(base: torch.Tensor, models: list, r: float = 0.1, alpha: float = 0.2,
               epsilon: float = 1e-5) -> torch.Tensor:
    """RAM+ (tensor-local): RAM with each model's unique changes scaled by its lambda_i."""
    if not models:
        return base
    tau, changed, unique, shared, count = changes(base, models, epsilon)
    overlap = (changed & shared).sum(dim=1) / (changed & unique).sum(dim=1).clamp(min=epsilon)
    lam = 1 + r * overlap.clamp(min=0, max=alpha)
    merged = (tau * unique * lam.unsqueeze(-1) + tau * shared / count.clamp(min=1)).sum(dim=0, keepdim=True)
    return base + merged.reshape_as(base)


def merge_ram(source, sink, options, *, epsilon=1e-5, compute_dtype="float32", lambdas=None, block_width=None):
    """RAM of the fine-tuned models around the base, every tensor on its own."""
    no_weights("ram", lambdas)
    epsilon = _number("epsilon", epsilon)
    return merge_weights(source, sink, options, lambda key, base, models: ram(base, models, epsilon),
                         lambda key: {}, compute_dtype=compute_dtype)


def merge_ramplus_tl(source, sink, options, *, r=0.1, alpha=0.2, epsilon=1e-5, compute_dtype="float32", lambdas=None,
                     block_width=None):
    """RAM+ (tensor-local) of the fine-tuned models around the base, every tensor on its own."""
    no_weights("ramplus_tl", lambdas)
    r, alpha, epsilon = _number("r", r), _number("alpha", alpha), _number("epsilon", epsilon)
    return merge_weights(source, sink, options, lambda key, base, models: ramplus_tl(base, models, r, alpha, epsilon),
                         lambda key: {}, compute_dtype=compute_dtype)


def _number(name: str, value) -> float:
    value = checks.as_float(name, value)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{name}={checks.short(value)} must be a finite number")
    return value


def _param(name, default, text):
    return Param(name, default, lambda v: _number(name, v), text)


EPSILON = _param("epsilon", 1e-5, "an entry counts as changed by a model where |theta_i - theta_pre| > epsilon")
CITATION = "Reinforced Agent Merging, arXiv 2601.13572"
URL = "https://arxiv.org/abs/2601.13572"

RAM = MethodSpec(
    name="ram", merge=merge_ram, summary="RAM", citation=CITATION, url=URL, params=(EPSILON, COMPUTE_DTYPE),
    backends=("torch",), mergekit="ram", mergekit_defaults={"scope": "tensor"},
    single_pass=lambda params: True, uses_statistics=False, weight_space=True)

RAMPLUS_TL = MethodSpec(
    name="ramplus_tl", merge=merge_ramplus_tl, summary="RAM+ (tensor-local)", citation=CITATION, url=URL,
    params=(_param("r", 0.1, "gain of the unique changes: lambda_i = 1 + r clamp(rho_i, 0, alpha)"),
            _param("alpha", 0.2, "cap of rho_i, model i's shared over unique changed entries in the tensor"),
            EPSILON, COMPUTE_DTYPE),
    backends=("torch",), mergekit="ramplus_tl", mergekit_defaults={"scope": "tensor"},
    single_pass=lambda params: True, uses_statistics=False, weight_space=True)
