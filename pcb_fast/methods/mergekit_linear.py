"""mergekit's ``linear`` with mergekit's rounding, for ``--compute-dtype`` (Wortsman et al., Model
soups, ICML 2022, https://arxiv.org/abs/2203.05482, as mergekit 0.1.5 computes it).

theta = sum_i w_i theta_i / sum_i w_i, each model's tensor in the compute dtype (mergekit's gathered
tensors: the config's ``dtype``, else the inputs' own), the sum accumulated model by model in
float32 (float64 for float64 tensors) and rounded once to the tensors' dtype. pcb_fast's
``average`` computes theta_pre + sum_i w_i tau_i / sum_i w_i instead, which is within one float32
ulp of it; this form gives mergekit's bits. An internal engine form: configs reach it through
``merge_method: linear`` with a compute dtype (pcb_fast.io.mergekit_config).
"""

from __future__ import annotations

import torch

from ..core import checks
from .spec import MethodSpec, Param, flag
from .weight_space import COMPUTE_DTYPE, merge_weights


def linear(models, weights, normalize: bool) -> torch.Tensor:
    """mergekit's weighted sum of ``models`` (tensors of one dtype), over the sum of ``weights`` when
    ``normalize``."""
    first = models[0]
    dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
    coefficients = torch.tensor(weights, dtype=dtype)
    result = torch.zeros_like(first, dtype=dtype)
    for tensor, coefficient in zip(models, coefficients.unbind(0)):
        result.addcmul_(tensor, coefficient)
    if normalize:
        result.div_(coefficients.sum())
    return result.to(first.dtype)


def merge_mergekit_linear(source, sink, options, *, normalize=True, compute_dtype="float32", lambdas=None,
                          block_width=None):
    """mergekit's linear over the models (``lambdas``: their weights, default 1 each), every tensor on its own."""
    checks.check_flag("normalize", normalize)
    weights = [1.0] * source.n if lambdas is None else [float(w) for w in checks.check_lambdas(lambdas, source.n)]
    if normalize and sum(weights) == 0:
        raise ValueError("linear: the weights sum to 0; the weighted mean is undefined")
    return merge_weights(source, sink, options, lambda key, base, models: linear(models, weights, normalize),
                         lambda key: {}, with_base=False, compute_dtype=compute_dtype)


SPEC = MethodSpec(
    name="mergekit_linear", merge=merge_mergekit_linear, summary="Linear", internal=True,
    citation="Wortsman et al., Model soups, ICML 2022 (as mergekit computes it)",
    url="https://arxiv.org/abs/2203.05482",
    params=(Param("normalize", True, flag("normalize"), "divide by the sum of the weights", kind="bool",
                  flag=False), COMPUTE_DTYPE),
    backends=("torch",), mergekit_defaults={"scope": "tensor"},
    single_pass=lambda params: True, uses_statistics=False, weight_space=True)
