"""Model Stock (Jang et al., "Model Stock: All we need is just a few fine-tuned models", ECCV 2024;
mergekit's ``model_stock``), per tensor.

With k >= 2 fine-tunes and the base w_0, the offsets d_i = w_i - w_0 and cos = the mean over pairs
of <d_i, d_j> / max(|d_i| |d_j|, 1e-6) (clamped to [-1, 1]), t = k cos / (1 + (k - 1) cos) and
theta = t mean_i(w_i) + (1 - t) w_0; t = 0 (the base) where the denominator is within 1e-6 of 0.
``filter_wise``: one cos per row (the last dimension) instead of one per tensor. mergekit 0.1.5's
operations, in the compute dtype.
"""

from __future__ import annotations

import torch

from ..core import checks
from .spec import MethodSpec, Param, flag
from .weight_space import COMPUTE_DTYPE, merge_weights, no_weights


def model_stock(base: torch.Tensor, models: list, filter_wise: bool = False) -> torch.Tensor:
    """Model Stock of fine-tuned tensors ``models`` (at least 2) around ``base``."""
    shape = base.shape
    if filter_wise:
        w0, ws = (base.unsqueeze(0), [w.unsqueeze(0) for w in models]) if base.dim() == 1 else (base, models)
    else:
        w0, ws = base.reshape(-1), [w.reshape(-1) for w in models]
    offsets = [w - w0 for w in ws]
    cosines = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1 :]:
            norms = torch.norm(a, dim=-1) * torch.norm(b, dim=-1)
            cosines.append(((a * b).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    k = len(ws)
    denominator = 1 + (k - 1) * cos
    singular = denominator.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(cos),
                    (k * cos) / torch.where(singular, torch.ones_like(denominator), denominator))
    return (t * (sum(ws) / k) + (1 - t) * w0).reshape(shape)


def check_two_or_more(params: dict, n: int) -> None:
    if n < 2:
        raise ValueError(f"model_stock needs at least two fine-tuned models besides the base; got {n}")


def merge_model_stock(source, sink, options, *, filter_wise=False, compute_dtype="float32", lambdas=None,
                      block_width=None):
    """Model Stock of the fine-tuned models around the base, every tensor on its own."""
    no_weights("model_stock", lambdas)
    check_two_or_more({}, source.n)
    checks.check_flag("filter_wise", filter_wise)
    return merge_weights(source, sink, options, lambda key, base, models: model_stock(base, models, filter_wise),
                         lambda key: {}, compute_dtype=compute_dtype)


SPEC = MethodSpec(
    name="model_stock", merge=merge_model_stock, summary="Model Stock",
    citation="Jang et al., Model Stock: All we need is just a few fine-tuned models, ECCV 2024",
    url="https://arxiv.org/abs/2403.19522",
    params=(Param("filter_wise", False, flag("filter_wise"), "one interpolation ratio per row (last dimension)",
                  kind="bool", flag=False), COMPUTE_DTYPE),
    check_together=check_two_or_more, backends=("torch",), mergekit="model_stock",
    mergekit_defaults={"scope": "tensor"}, single_pass=lambda params: True, uses_statistics=False, weight_space=True)
