"""Multi-SLERP: barycentric interpolation of several models on a hypersphere (Goddard,
"Multi-SLERP"; mergekit's ``multislerp``), per tensor.

The tensors (or, with a base, their differences from it) are flattened and projected to the unit
sphere; their weighted mean direction m (weights normalised to sum 1 unless ``normalize_weights``
is false) is the tangent point; the weighted sum of the tangent vectors u_i - <u_i, m> m is mapped
back by the exponential map, scaled by the weighted mean norm, and the base added back. One model:
that model. A zero mean direction: the lerp of two models, an error for more. mergekit 0.1.5's
operations, in the compute dtype.
"""

from __future__ import annotations

import torch

from ..core import checks
from .nuslerp import WITH_BASE
from .spec import MethodSpec, Param, flag
from .weight_space import COMPUTE_DTYPE, merge_weights


def multislerp(base, models: list, weights: list, normalize_weights: bool = True, eps: float = 1e-8):
    """Multi-SLERP of ``models`` with ``weights`` (floats) around ``base`` (or None)."""
    if len(models) == 1:
        return models[0]
    tensors = torch.stack(models, dim=0)
    if base is not None:
        tensors -= base
    flat = tensors.view(tensors.shape[0], -1)
    w = torch.tensor(weights, dtype=tensors.dtype)
    if normalize_weights:
        w = w / w.sum()
    norms = torch.norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * w.view(-1, 1)).sum(0)
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        if tensors.shape[0] == 2:
            out = (tensors[0] * w[0] + tensors[1] * w[1]).view(tensors.shape[1:])
            return out if base is None else out + base
        raise ValueError("multislerp: the weighted sum of the models' directions is zero (opposite models with "
                         "weights that balance out); use other weights")
    mean = mean / mean_norm
    tangents = units - (units * mean).sum(-1, keepdim=True) * mean
    tangent = (tangents * w.view(-1, 1)).sum(0)
    tangent_norm = torch.norm(tangent) + eps
    result = mean * torch.cos(tangent_norm) + tangent * (torch.sin(tangent_norm) / tangent_norm)
    result = (result * (norms.squeeze(-1) * w).sum()).view(tensors.shape[1:])
    return result if base is None else result + base


def merge_multislerp(source, sink, options, *, normalize_weights=True, eps=1e-8, with_base=True,
                     compute_dtype="float32", lambdas=None, block_width=None):
    """Multi-SLERP of the models (``lambdas``: their weights, default 1 each), every tensor on its own."""
    checks.check_flag("normalize_weights", normalize_weights)
    checks.check_flag("with_base", with_base)
    eps = checks.as_float("eps", eps)
    weights = [1.0] * source.n if lambdas is None else [float(w) for w in checks.check_lambdas(lambdas, source.n)]

    def merge_tensor(key, base, models):
        try:
            return multislerp(base, models, weights, normalize_weights, eps)
        except ValueError as e:
            raise ValueError(f"key {checks.short(key, 80)}: {e}") from None

    return merge_weights(source, sink, options, merge_tensor, lambda key: {}, with_base=with_base,
                         compute_dtype=compute_dtype)


SPEC = MethodSpec(
    name="multislerp", merge=merge_multislerp, summary="Multi-SLERP",
    citation="Goddard, Multi-SLERP", url="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
    params=(Param("normalize_weights", True, flag("normalize_weights"), "divide the weights by their sum",
                  kind="bool", flag=False),
            Param("eps", 1e-8, lambda v: checks.as_float("eps", v), "added to norms", flag=False),
            WITH_BASE, COMPUTE_DTYPE),
    backends=("torch",), mergekit="multislerp", mergekit_defaults={"scope": "tensor"},
    single_pass=lambda params: True, uses_statistics=False, weight_space=True)
