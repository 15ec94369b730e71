"""SLERP: spherical linear interpolation of two models, per tensor (Shoemake, "Animating rotation
with quaternion curves", SIGGRAPH 1985; mergekit's ``slerp``).

For a tensor with base values v0 and the other model's v1 (each flattened), at ``t`` in [0, 1]:
the angle between them is theta = acos(clamp(<v0/|v0|, v1/|v1|>, -1, 1)) (a norm at or below
``eps`` counts as 1), and

    slerp = sin((1 - t) theta) / sin(theta) * v0 + sin(t theta) / sin(theta) * v1,

or the plain lerp (1 - t) v0 + t v1 where |cos theta| > ``dot_threshold`` (nearly colinear or
opposite tensors, where the sines vanish). t = 0 gives the base, t = 1 the other model.

mergekit 0.1.5's numerics, bit for bit: float32 arithmetic on the exact float32 values of the
inputs; the norms as the norm of the norms of chunks of 2^20 entries; the dot product as the sum
of the chunks' sums of the normalised products; the coefficients as float32 [1, 1] tensors; the
sums reduced on one thread (so the bits do not depend on the thread count).
"""

from __future__ import annotations

import math

import torch

from ..core.checks import short
from ..core.threads import one_thread
from .spec import MethodSpec, Param
from .weight_space import COMPUTE_DTYPE, merge_weights, model_count, no_weights

CHUNK = 1 << 20  # entries per chunk of the norms and the dot product (mergekit's, for one tensor at a time)
DOT_THRESHOLD = 0.9995
EPS = 1e-8


def check_t(t) -> float | None:
    if t is None:  # (required: the spec says so, and the merge asks for it per tensor)
        return None
    if isinstance(t, bool):
        raise ValueError(f"t={short(t)} must be a number")
    try:
        t = float(t)
    except (TypeError, ValueError):
        raise ValueError(f"t={short(t)} must be a number (0: the base model, 1: the other model)") from None
    if not math.isfinite(t):
        raise ValueError(f"t={short(t)} must be a finite number (0: the base model, 1: the other model)")
    return t


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor, dot_threshold: float = DOT_THRESHOLD,
          eps: float = EPS) -> torch.Tensor:
    """SLERP of two tensors of one shape and dtype at ``t`` (a float), computed in float32 (float64
    for float64 tensors), as a tensor of their dtype (the result rounded once, as mergekit stores it)."""
    dtype = torch.float64 if v0.dtype == torch.float64 else torch.float32
    a, b = v0.reshape(1, -1).to(dtype), v1.reshape(1, -1).to(dtype)
    t = torch.tensor([[t]], dtype=dtype)
    if a.shape[1] == 0:
        return ((1 - t) * a + t * b).reshape(v0.shape).to(v0.dtype)
    starts = range(0, a.shape[1], CHUNK)
    with one_thread():
        norm_a = _norm_of_chunks(a, starts, eps)
        norm_b = _norm_of_chunks(b, starts, eps)
        parts = [(a[:, s : s + CHUNK] / norm_a * (b[:, s : s + CHUNK] / norm_b)).sum(dim=1, keepdim=True)
                 for s in starts]
        dot = torch.stack(parts).sum(dim=0).clamp(-1, 1)
    colinear = dot.abs() > dot_threshold
    theta = torch.acos(torch.where(colinear, 0, dot))
    sin_theta = torch.sin(theta)
    coef_a = torch.where(colinear, 1 - t, torch.sin((1 - t) * theta) / sin_theta)
    coef_b = torch.where(colinear, t, torch.sin(t * theta) / sin_theta)
    out = torch.empty_like(v0).reshape(1, -1)
    for s in starts:
        out[:, s : s + CHUNK] = coef_a * a[:, s : s + CHUNK] + coef_b * b[:, s : s + CHUNK]
    return out.reshape(v0.shape)


def _norm_of_chunks(x: torch.Tensor, starts, eps: float) -> torch.Tensor:
    """[1, 1] L2 norm of a [1, m] row as the norm of its chunks' norms, 1 where at most ``eps``."""
    norms = torch.stack([torch.linalg.vector_norm(x[:, s : s + CHUNK], dim=1, keepdim=True) for s in starts])
    norm = torch.linalg.vector_norm(norms, dim=0)
    return torch.where(norm > eps, norm, 1)


check_two_models = model_count(1, "slerp interpolates the base model and exactly one other model; got {n} others")


def merge_slerp(source, sink, options, *, t=None, compute_dtype="float32", lambdas=None, block_width=None):
    """SLERP of the base model (t = 0) and one other model (t = 1), every tensor on its own."""
    no_weights("slerp", lambdas)
    check_two_models({}, source.n)
    if t is None:  # (a filter list that matches none of a tensor's names, and no value without filter)
        keys = ", ".join(short(s.key, 80) for s in source.segments[:3])
        raise ValueError(f"slerp needs t for every tensor; none is given for {keys} (give a value without filter)")
    t = check_t(t)
    return merge_weights(source, sink, options, lambda key, base, models: slerp(t, base, models[0]), lambda key: {},
                         compute_dtype=compute_dtype)


SPEC = MethodSpec(
    name="slerp", merge=merge_slerp, summary="SLERP", citation="Shoemake, Animating rotation with quaternion "
    "curves, SIGGRAPH 1985", url="https://en.wikipedia.org/wiki/Slerp",
    params=(Param("t", None, check_t, "interpolation factor: 0 gives the base model, 1 the other model",
                  required=True), COMPUTE_DTYPE),
    check_together=check_two_models, backends=("torch",), mergekit="slerp", mergekit_defaults={"scope": "tensor"},
    single_pass=lambda params: True, uses_statistics=False, weight_space=True)
