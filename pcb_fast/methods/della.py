"""DELLA: drop by magnitude rank, then merge (Deep et al., "DELLA-Merging: Reducing Interference in
Model Merging through Magnitude-Based Sampling", 2024; mergekit's ``della`` and ``della_linear``),
per tensor.

Per model and tensor (as mergekit's MAGPRUNE, with its per-row ranks): the task vector tau_i is
viewed as rows (a 1-D tensor as one row; else rows along dimension 1); within each row the entries'
ranks by |tau| (1 for the smallest) are min-max normalised to r in [0, 1], and each entry is kept
with probability density_i - epsilon_i + 2 epsilon_i r, so larger changes survive more often. The
survivors are rescaled so that the tensor's L1 norm is unchanged (``rescale="l1"``, mergekit's
``rescale: true``; "none": not rescaled). Then, as mergekit's generalized task arithmetic: the
weighted task vectors, the sign election of TIES (``della``: entries agreeing with the sign of the
sum, + on a tie, divided by the sum of their weights when ``normalize``) or their plain sum
(``della_linear``, divided by the sum of the weights when ``normalize``).

The draws come from pcb_fast's counter-based generator (pcb_fast.core.rng): entry j of key k in
task i is kept when its 24-bit draw u / 2^24 < its probability, a pure function of (seed, i, k, j)
(torch.bernoulli's stream, mergekit's, cannot be reproduced). Float32 arithmetic on the exact task
vectors; sums over a tensor on one thread.
"""

from __future__ import annotations

import torch

from ..core import checks, rng
from ..core.threads import one_thread
from .linear import L1_EPS, check_seed
from .spec import MethodSpec, Param, choice, flag
from .weight_space import whole_tensors

RESCALE = ("l1", "none")


def check_density(value) -> float:
    value = checks.as_float("density", value)
    if not value > 0:
        raise ValueError(f"density={checks.short(value)} is out of range; valid: 0 < density (the fraction kept; >= 1 keeps all)")
    return value


def check_epsilon(value) -> float:
    value = checks.as_float("epsilon", value)
    if not value >= 0:
        raise ValueError(f"epsilon={checks.short(value)} is out of range; valid: 0 <= epsilon")
    return value


def check_together(params: dict, n: int) -> None:
    densities = params["density"] if isinstance(params["density"], list) else [params["density"]] * n
    epsilons = params["epsilon"] if isinstance(params["epsilon"], list) else [params["epsilon"]] * n
    for d, e in zip(densities, epsilons):
        if d < 1 and (d + e >= 1 or d - e <= 0):
            raise ValueError(f"epsilon={checks.short(e)} with density={checks.short(d)}: density +/- epsilon must lie in (0, 1)")


def magprune(delta: torch.Tensor, density: float, epsilon: float, rescale: str, draws: torch.Tensor) -> torch.Tensor:
    """DELLA's drop of one task-vector tensor (float32); ``draws``: its int64 24-bit draws, flat."""
    if density >= 1:
        return delta
    shape = delta.shape
    rows = delta.unsqueeze(0) if delta.dim() < 2 else delta
    ranks = torch.argsort(rows.abs(), dim=1, descending=False).argsort(dim=1).to(torch.float32) + 1
    low, high = ranks.min(dim=1, keepdim=True).values, ranks.max(dim=1, keepdim=True).values
    probs = (density - epsilon) + ((ranks - low) / (high - low)).clamp(0, 1) * 2 * epsilon
    keep = ((draws.view(rows.shape).to(torch.float32) / (1 << 24)) < probs).to(torch.float32)
    masked = rows * keep
    if rescale == "l1":
        with one_thread():  # (mergekit's sums, on one thread: the same bits whatever the thread count)
            before, after = rows.abs().sum(), masked.abs().sum()
        if not (before < L1_EPS or after < L1_EPS):
            masked = masked * (before / after)
    return masked.reshape(shape)


def _merge_della(source, options, sink, *, density, epsilon, seed, rescale, normalize, consensus: bool, lambdas):
    n = source.n
    densities = checks.check_per_task("density", density, n, check_density)
    epsilons = checks.check_per_task("epsilon", epsilon, n, check_epsilon)
    densities = densities if isinstance(densities, list) else [densities] * n
    epsilons = epsilons if isinstance(epsilons, list) else [epsilons] * n
    check_together({"density": densities, "epsilon": epsilons}, n)
    seed = check_seed(seed)
    checks.check_choice("rescale", rescale, RESCALE)
    checks.check_flag("normalize", normalize)
    lambdas = checks.check_lambdas(lambdas, n) or [1.0] * n
    kept = torch.zeros(n, dtype=torch.int64)
    for block in source.blocks(whole_tensors(source), options=options):
        seg, tv = block.segment, block.tv
        if not bool(torch.isfinite(tv).all()):
            from ..core.engine import raise_if_not_finite

            raise_if_not_finite(source, options, block, tv.abs().amax(1))
        deltas = torch.empty((n, *seg.shape))
        for i in range(n):
            draws = rng.uniform24(seed, i, seg.key, 0, seg.numel) if densities[i] < 1 else None
            deltas[i] = magprune(tv[i].view(seg.shape), densities[i], epsilons[i], rescale, draws)
            kept[i] += int((deltas[i] != 0).sum())
        sink(seg, 0, seg.numel, weighted_merge(deltas, lambdas, consensus, normalize).reshape(-1))
    return kept


def weighted_merge(deltas: torch.Tensor, weights: list, consensus: bool, normalize: bool) -> torch.Tensor:
    """mergekit's last steps of generalized task arithmetic on the [n, ...] sparsified task vectors
    (in their dtype, in place): weighted; TIES' sign election (``consensus``: the entries agreeing
    with the sign of the sum, + on a tie) or the plain sum; divided by the sum of the (agreeing)
    weights when ``normalize`` (1 where that sum is 0, or within 1e-8 of 0 without election)."""
    w = torch.tensor(weights, dtype=deltas.dtype).view(-1, *([1] * (deltas.dim() - 1)))
    deltas.mul_(w)
    if consensus:
        mask = deltas.sign() == (deltas.sum(dim=0) >= 0).to(deltas.dtype) * 2 - 1
        mixed = (deltas * mask).sum(dim=0)
        divisor = (w * mask).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = deltas.sum(dim=0)
        divisor = w.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed /= divisor
    return mixed


def merge_della(source, sink, options, *, density=1.0, epsilon=0.15, seed=0, rescale="l1", normalize=True, lambdas=None,
                block_width=None):
    """DELLA (mergekit's ``della``): MAGPRUNE's drop, then TIES' sign election, per tensor."""
    return _merge_della(source, options, sink, density=density, epsilon=epsilon, seed=seed, rescale=rescale,
                        normalize=normalize, consensus=True, lambdas=lambdas)


def merge_della_linear(source, sink, options, *, density=1.0, epsilon=0.15, seed=0, rescale="l1", normalize=False,
                       lambdas=None, block_width=None):
    """Linear DELLA (mergekit's ``della_linear``): MAGPRUNE's drop, then the weighted sum, per tensor."""
    return _merge_della(source, options, sink, density=density, epsilon=epsilon, seed=seed, rescale=rescale,
                        normalize=normalize, consensus=False, lambdas=lambdas)


def _params(normalize: bool) -> tuple:
    return (Param("density", 1.0, check_density, "mean fraction kept per model", per_model=True),
            Param("epsilon", 0.15, check_epsilon, "spread of the keep probabilities around density", per_model=True),
            Param("seed", 0, check_seed, "seed of the drops", kind="int"),
            Param("rescale", "l1", choice("rescale", RESCALE), "l1 (mergekit's rescale: true) or none",
                  kind="rescale", flag=False),
            Param("normalize", normalize, flag("normalize"), "divide by the sum of the (agreeing) weights",
                  kind="bool", flag=False))


DELLA = MethodSpec(
    name="della", merge=merge_della, summary="DELLA",
    citation="Deep et al., DELLA-Merging: Reducing Interference in Model Merging through Magnitude-Based "
    "Sampling, 2024", url="https://arxiv.org/abs/2406.11617", params=_params(True), check_together=check_together,
    backends=("torch",), mergekit="della",
    mergekit_defaults={"scope": "tensor", "density": 1.0, "epsilon": 0.15, "rescale": "l1", "normalize": True})
DELLA_LINEAR = MethodSpec(
    name="della_linear", merge=merge_della_linear, summary="Linear DELLA",
    citation="Deep et al., DELLA-Merging (the weighted sum instead of the sign election), 2024",
    url="https://arxiv.org/abs/2406.11617", params=_params(False), check_together=check_together,
    backends=("torch",), mergekit="della_linear",
    mergekit_defaults={"scope": "tensor", "density": 1.0, "epsilon": 0.15, "rescale": "l1", "normalize": False})
