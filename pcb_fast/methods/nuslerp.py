"""NuSLERP: spherical interpolation of two models, or of their task vectors around a base
(mergekit's ``nuslerp``), per tensor.

The two models' weights w_0, w_1 give t = w_1 / (w_0 + w_1) (0.5 where the sum is within 1e-6 of
0). Without a base the two tensors are interpolated, with one their differences from it (the base
then added back). ``nuslerp_flatten`` (default true): the tensor as one vector; else per row
(``nuslerp_row_wise`` false: the last dimension) or per column (true: the first). Where
1 - cos^2 <= 1e-16 (colinear), the plain lerp. mergekit 0.1.5's operations, in the compute dtype.
"""

from __future__ import annotations

import torch

from ..core import checks
from .spec import MethodSpec, Param, flag
from .weight_space import COMPUTE_DTYPE, merge_weights, model_count


def nuslerp(t: float, v0: torch.Tensor, v1: torch.Tensor, dim: int = -1, eps: float = 1e-8,
            flatten: bool = False) -> torch.Tensor:
    """Spherical interpolation of ``v0`` (t = 0) and ``v1`` (t = 1) over the chosen vectors."""
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif dim != -1:
        v0, v1 = v0.transpose(dim, -1), v1.transpose(dim, -1)
    u0 = v0 / torch.norm(v0, dim=-1, keepdim=True).clamp(min=1e-7)
    u1 = v1 / torch.norm(v1, dim=-1, keepdim=True).clamp(min=1e-7)
    cos = torch.sum(u0 * u1, dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= eps**2
    theta = torch.acos(torch.where(colinear, 0, cos))
    result = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    result = torch.where(colinear, (1 - t) * v0 + t * v1, result)
    if dim != -1 and not flatten:
        result = result.transpose(dim, -1)
    return result.reshape(shape)


def interpolation_factor(weights) -> float:
    """mergekit's t of two models' weights (Python floats)."""
    total = sum(weights)
    return 0.5 if abs(total) < 1e-6 else weights[1] / total


check_two_models = model_count(2, "nuslerp interpolates exactly two models (besides an optional base); got {n}")


def merge_nuslerp(source, sink, options, *, nuslerp_row_wise=False, nuslerp_flatten=True, with_base=True,
                  compute_dtype="float32", lambdas=None, block_width=None):
    """NuSLERP of two models (``lambdas``: their weights, default 1 each), every tensor on its own;
    ``with_base`` false: the models themselves, not their task vectors."""
    check_two_models({}, source.n)
    for name, value in (("nuslerp_row_wise", nuslerp_row_wise), ("nuslerp_flatten", nuslerp_flatten),
                        ("with_base", with_base)):
        checks.check_flag(name, value)
    weights = [1.0, 1.0] if lambdas is None else [float(w) for w in checks.check_lambdas(lambdas, 2)]
    t = interpolation_factor(weights)
    dim = 0 if nuslerp_row_wise else -1

    def merge_tensor(key, base, models):
        if base is None:
            return nuslerp(t, models[0], models[1], dim=dim, flatten=nuslerp_flatten)
        return base + nuslerp(t, models[0] - base, models[1] - base, dim=dim, flatten=nuslerp_flatten)

    return merge_weights(source, sink, options, merge_tensor, lambda key: {}, with_base=with_base,
                         compute_dtype=compute_dtype)


WITH_BASE = Param("with_base", True, flag("with_base"), "work around the base model (false: a config without "
                  "base_model)", kind="bool", flag=False)
SPEC = MethodSpec(
    name="nuslerp", merge=merge_nuslerp, summary="NuSLERP",
    citation="mergekit's NuSLERP (spherical interpolation of two models or task vectors)",
    url="https://github.com/arcee-ai/mergekit",
    params=(Param("nuslerp_row_wise", False, flag("nuslerp_row_wise"), "interpolate columns (first dimension)",
                  kind="bool", flag=False),
            Param("nuslerp_flatten", True, flag("nuslerp_flatten"), "interpolate the whole tensor as one vector",
                  kind="bool", flag=False), WITH_BASE, COMPUTE_DTYPE),
    check_together=check_two_models, backends=("torch",), mergekit="nuslerp", mergekit_defaults={"scope": "tensor"},
    single_pass=lambda params: True, uses_statistics=False, weight_space=True)
