"""The Karcher mean: the Riemannian (geodesic) mean of the models' directions on the unit sphere,
scaled by their mean norm (mergekit's ``karcher``), per tensor.

Every input counts equally (the base too, when the config names one, as mergekit adds it). From the
normalised mean of the unit tensors, up to ``max_iter`` steps along the mean of the log maps
theta_i / sin(theta_i) (u_i - cos(theta_i) m), stopping when that step is shorter than ``tol``;
inputs with norm at most ``tol`` are left out of the direction. mergekit 0.1.5's operations, in the
compute dtype (norms in float32, float64 for float64 tensors).
"""

from __future__ import annotations

import torch

from ..core import checks
from .spec import MethodSpec, Param
from .weight_space import COMPUTE_DTYPE, merge_weights, no_weights


def karcher_mean(tensors: list, alphas: list, max_iter: int = 10, tol: float = 1e-5) -> torch.Tensor:
    """The weighted Karcher mean of ``tensors`` (``alphas``: floats)."""
    if len(tensors) == 1:
        return tensors[0]
    dtype = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    norms, units = [], []
    for x in tensors:
        norm = torch.linalg.vector_norm(x.to(dtype))
        norms.append(norm)
        units.append(torch.zeros_like(x) if norm.item() == 0.0 else (x / norm).to(x.dtype))
    valid = [i for i, norm in enumerate(norms) if norm.item() > tol]
    if not valid:
        return sum(x * 0 for x in tensors)
    total = sum(alphas[i] for i in valid)
    weights = [alphas[i] / total for i in valid]
    valid_units = [units[i] for i in valid]
    mean = torch.zeros_like(valid_units[0])
    for alpha, unit in zip(weights, valid_units):
        mean += alpha * unit
    mean_norm = torch.linalg.vector_norm(mean.to(dtype))
    mean = valid_units[0].clone() if mean_norm.item() < tol else (mean / mean_norm).to(mean.dtype)
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for alpha, unit in zip(weights, valid_units):
            dot = torch.clamp(torch.dot(mean.flatten(), unit.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            tangent += alpha * (theta / torch.sin(theta)) * (unit - dot * mean)
        tangent_norm = torch.linalg.vector_norm(tangent.to(dtype))
        if tangent_norm.item() < tol:
            break
        mean = (torch.cos(tangent_norm) * mean + torch.sin(tangent_norm) * (tangent / tangent_norm)).to(mean.dtype)
        unit_norm = torch.linalg.vector_norm(mean.to(dtype))
        if unit_norm.item() > tol:
            mean = (mean / unit_norm).to(mean.dtype)
    return sum(alpha * norm for alpha, norm in zip(alphas, norms)) * mean


def check_max_iter(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"max_iter={checks.short(value)} must be a non-negative integer")
    return value


def merge_karcher(source, sink, options, *, max_iter=10, tol=1e-5, compute_dtype="float32", lambdas=None,
                  block_width=None):
    """The Karcher mean of the models (every one an input: the source's base only lends its keys)."""
    no_weights("karcher", lambdas)
    max_iter, tol = check_max_iter(max_iter), checks.as_float("tol", tol)
    alphas = [1.0 / source.n] * source.n
    return merge_weights(source, sink, options, lambda key, base, models: karcher_mean(models, alphas, max_iter, tol),
                         lambda key: {}, with_base=False, compute_dtype=compute_dtype)


SPEC = MethodSpec(
    name="karcher", merge=merge_karcher, summary="Karcher Mean",
    citation="Karcher, Riemannian center of mass and mollifier smoothing, 1977 (mergekit's karcher)",
    url="https://arxiv.org/abs/2603.04972",
    params=(Param("max_iter", 10, check_max_iter, "iterations of the mean on the sphere", kind="int", flag=False),
            Param("tol", 1e-5, lambda v: checks.as_float("tol", v), "convergence tolerance", flag=False),
            COMPUTE_DTYPE),
    backends=("torch",), mergekit="karcher", mergekit_defaults={"scope": "tensor"},
    single_pass=lambda params: True, uses_statistics=False, weight_space=True)
