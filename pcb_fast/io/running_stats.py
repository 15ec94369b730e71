"""Running statistics of normalisation layers: averaged, not merged as task vectors.

BatchNorm's ``running_mean`` and ``running_var`` are floating buffers, but they are estimates of
the activations' moments, not learned weights: merged as task vectors (base + lam * sum of
changes) a variance can turn negative and the model's outputs NaN. A key is such a statistic when
its name ends in ``.running_mean`` or ``.running_var`` and the base holds the same layer's
``.num_batches_tracked`` (the counter every ``torch.nn.modules.batchnorm._NormBase`` with
``track_running_stats`` keeps). By default the merged statistic is the mean of the models' values
weighted by their ``lambdas`` (a convex combination: a variance stays non-negative);
``running_stats="base"`` takes the base's.
"""

from __future__ import annotations

import operator

import torch

from ..core import checks

MODES = ("average", "base")
SUFFIXES = (".running_mean", ".running_var")


def running_stat_keys(base: dict, keys) -> list:
    """The keys of ``keys`` that are running statistics of a layer that tracks them in ``base``."""
    found = []
    for key in filter(operator.methodcaller("endswith", SUFFIXES), keys):  # (a model may have hundreds of thousands)
        for suffix in SUFFIXES:
            if key.endswith(suffix) and key[: -len(suffix)] + ".num_batches_tracked" in base:
                found.append(key)
    return found


def check_mode(mode) -> str:
    if mode not in MODES:
        raise ValueError(f"running_stats={checks.short(mode)} is not valid; choose 'average' (the models' weighted mean) or "
                         "'base' (the base model's)")
    return mode


def merge_running_stats(base: dict, models, keys, lambdas, mode: str, names=None) -> dict:
    """{key: merged value} of the running statistics ``keys``: the base's (``mode="base"``) or the
    mean of the models' values weighted by ``lambdas`` (all 1 when None), in the base's dtype.
    NaN/Inf in a model's statistic is a ValueError naming the model (``names``) and the key."""
    if mode == "average":
        for i, model in enumerate(models):
            for key in keys:
                checks.check_finite(f"{names[i] if names else f'model {i}'}, key {checks.short(key, 80)}", model[key])
    if mode == "base" or not keys:
        return {key: base[key].clone() for key in keys}
    weights = [1.0] * len(models) if lambdas is None else [float(w) for w in lambdas]
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"running statistics ({checks.short(keys[0], 80)}) are averaged with the models' lambdas, "
                         f"which must be non-negative with a positive sum (got {weights}); pass running_stats='base' to "
                         "keep the base model's")
    total = sum(weights)
    out = {}
    for key in keys:
        wide = torch.float64 if base[key].dtype == torch.float64 else torch.float32
        acc = torch.zeros(base[key].shape, dtype=wide, device=base[key].device)
        for model, w in zip(models, weights):
            acc.add_(model[key].to(wide), alpha=w / total)
        out[key] = acc.to(base[key].dtype)
    return out
