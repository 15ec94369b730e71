"""NearSwap: take the other model's value where it is near the base's (alchemonaut,
QuartetAnemoi-70B-t0.0001; mergekit's ``nearswap``), per entry.

weight = clamp(t / max(|theta_pre - theta_1|, 1e-6), 0, 1); theta = weight theta_1 + (1 - weight) theta_pre:
entries closer than t take the other model's value, farther ones move toward it by t / distance.
mergekit 0.1.5's operations, in the compute dtype.
"""

from __future__ import annotations

import torch

from ..core.checks import short
from .slerp import check_t
from .spec import MethodSpec, Param
from .weight_space import COMPUTE_DTYPE, merge_weights, model_count, no_weights


def nearswap(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """NearSwap of the base values ``a`` toward the other model's ``b`` with distance ``t``."""
    weight = (t / torch.abs(a - b).clamp(min=1e-6)).clamp(min=0, max=1)
    return weight * b + (1 - weight) * a


check_one_other = model_count(1, "nearswap takes the base model and exactly one other model; got {n} others")


def merge_nearswap(source, sink, options, *, t=None, compute_dtype="float32", lambdas=None, block_width=None):
    """NearSwap of the base model toward one other model, every tensor on its own."""
    no_weights("nearswap", lambdas)
    check_one_other({}, source.n)
    if t is None:
        raise ValueError(f"nearswap needs t for every tensor; none is given for {short(source.segments[0].key, 80)}")
    t = check_t(t)
    return merge_weights(source, sink, options, lambda key, base, models: nearswap(t, base, models[0]), lambda key: {},
                         compute_dtype=compute_dtype)


SPEC = MethodSpec(
    name="nearswap", merge=merge_nearswap, summary="NearSwap",
    citation="alchemonaut, QuartetAnemoi-70B-t0.0001 (NearSwap)",
    url="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
    params=(Param("t", None, check_t, "similarity threshold: each entry takes the other model with weight "
                  "min(1, t / |base - other|), so entries within t of the base take its value", required=True),
            COMPUTE_DTYPE),
    check_together=check_one_other, backends=("torch",), mergekit="nearswap", mergekit_defaults={"scope": "tensor"},
    single_pass=lambda params: True, uses_statistics=False, weight_space=True)
