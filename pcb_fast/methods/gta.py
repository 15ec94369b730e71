"""mergekit's generalized task arithmetic, one tensor at a time in any compute dtype: its
``task_arithmetic``, ``ties``, ``dare_linear``, ``dare_ties``, ``breadcrumbs``, ``breadcrumbs_ties``,
``della`` and ``della_linear`` with mergekit 0.1.5's operations in their order, for a merge that asks
for mergekit's arithmetic (``--compute-dtype``: bfloat16 arithmetic on bfloat16 models, rounding
every intermediate result as mergekit does).

The engine's own methods (ties.py, linear.py, della.py) compute in float32 on exact task vectors;
this module is their counterpart at a lower precision, a weight-space method (weight_space.py).
Per model: tau_i = theta_i - theta_pre in the compute dtype; its sparsification (``magnitude``:
the k = max(1, int(density N)) largest |tau| by torch.argsort, mergekit's choice among equal
magnitudes included; ``random``: DARE's drop from pcb_fast's counter generator, as the engine's DARE
draws it; ``magnitude_outliers``: Breadcrumbs' band of the ascending sort; ``della_magprune``:
MAGPRUNE, methods/della.py), rescaled to the tensor's L1 norm with ``rescale``; the weights; the
sign election (``consensus``) or the plain sum; ``normalize``; ``lam``; theta_pre + the sum.
"""

from __future__ import annotations

import torch

from ..core import checks, rng
from ..core.threads import one_thread
from .della import check_epsilon, check_together as check_della, weighted_merge
from .linear import L1_EPS, check_seed
from .spec import MethodSpec, Param, choice, flag
from .weight_space import COMPUTE_DTYPE, merge_weights

# mergekit's name -> (sparsification, sign election)
KINDS = {"task_arithmetic": (None, False), "ties": ("magnitude", True), "dare_linear": ("random", False),
         "dare_ties": ("random", True), "breadcrumbs": ("magnitude_outliers", False),
         "breadcrumbs_ties": ("magnitude_outliers", True), "della": ("della_magprune", True),
         "della_linear": ("della_magprune", False)}


def _rescaled(tensor, mask, rescale: bool):
    masked = tensor * mask
    if not rescale:
        return masked
    with one_thread():  # (mergekit's sums, on one thread: the same bits whatever the thread count)
        before, after = tensor.abs().sum(), masked.abs().sum()
    if before < L1_EPS or after < L1_EPS:
        return masked
    return masked * (before / after)


def sparsify(tau, kind, density, rescale, *, gamma=0.0, epsilon=0.0, seed=0, task=0, key=""):
    """mergekit's sparsification of one task-vector tensor (in its dtype)."""
    if kind is None or density >= 1:
        return tau
    if kind == "magnitude":
        if density <= 0 or tau.numel() == 0:
            return torch.zeros_like(tau)
        k = max(1, int(density * tau.numel()))
        mask = torch.zeros(tau.numel(), dtype=tau.dtype)
        mask[torch.argsort(tau.abs().reshape(-1).float(), descending=True)[:k]] = 1
        return _rescaled(tau, mask.reshape_as(tau), rescale)
    work = tau.dtype if tau.dtype == torch.bfloat16 else torch.float32
    if kind == "random":
        keep = rng.keep_mask(seed, task, key, 0, tau.numel(), max(0.0, 1.0 - density)).view(tau.shape).to(work)
        return _rescaled(tau.to(work), keep, rescale).to(tau.dtype)
    if kind == "magnitude_outliers":
        n = tau.numel()
        keep, top = int(density * n), int(gamma * n)
        low = max(0, n - keep - top)
        mask = torch.zeros(n, dtype=tau.dtype)
        mask[torch.sort(tau.abs().reshape(-1).float(), descending=False).indices[low : low + keep]] = 1
        return _rescaled(tau, mask.reshape_as(tau), rescale)
    if density <= 0:  # della_magprune
        return torch.zeros_like(tau)
    rows = tau.unsqueeze(0) if tau.dim() < 2 else tau
    ranks = torch.argsort(rows.abs(), dim=1, descending=False).argsort(dim=1).to(work) + 1
    low, high = ranks.min(dim=1, keepdim=True).values, ranks.max(dim=1, keepdim=True).values
    probs = (density - epsilon) + ((ranks - low) / (high - low)).clamp(0, 1) * 2 * epsilon
    draws = rng.uniform24(seed, task, key, 0, tau.numel()).view(rows.shape).to(torch.float32) / (1 << 24)
    keep = (draws < probs.float()).to(work)
    return _rescaled(rows.to(work), keep, rescale).to(tau.dtype).reshape(tau.shape)


def gta(key, base, models, *, method, weights, density, gamma, epsilon, normalize, rescale, lam, seed):
    """mergekit's GeneralizedTaskArithmeticMerge.merge_group of one tensor (``method``: its name)."""
    kind, consensus = KINDS[method]
    deltas = base.new_empty((len(models), *base.shape))
    for i, model in enumerate(models):
        deltas[i] = sparsify(model - base, kind, density[i], rescale, gamma=gamma[i], epsilon=epsilon[i], seed=seed,
                             task=i, key=key)
    mixed = weighted_merge(deltas, weights, consensus, normalize)
    if lam != 1:
        mixed *= lam
    return (base + mixed).to(base.dtype)


def merge_gta(source, sink, options, *, mergekit_method="ties", density=1.0, gamma=0.01, epsilon=0.15, normalize=False,
              rescale="none", mergekit_lambda=1.0, seed=0, compute_dtype="float32", lambdas=None, block_width=None):
    """mergekit's generalized task arithmetic ``mergekit_method`` per tensor in ``compute_dtype``."""
    n = source.n
    method = checks.check_choice("mergekit_method", mergekit_method, tuple(KINDS))
    if KINDS[method][0] == "della_magprune":
        check_della({"density": [d for d in density] if isinstance(density, list) else density,
                     "epsilon": epsilon}, n)

    def per_model(name, value, check):
        value = checks.check_per_task(name, value, n, check)
        return value if isinstance(value, list) else [value] * n

    density = per_model("density", density, lambda v: checks.as_float("density", v))
    gamma = per_model("gamma", gamma, lambda v: checks.as_float("gamma", v))
    epsilon = per_model("epsilon", epsilon, check_epsilon)
    weights = [1.0] * n if lambdas is None else [float(w) for w in checks.check_lambdas(lambdas, n)]
    checks.check_flag("normalize", normalize)
    checks.check_choice("rescale", rescale, RESCALE)
    lam, seed = checks.as_float("mergekit_lambda", mergekit_lambda), check_seed(seed)

    def merge_tensor(key, base, models):
        return gta(key, base, models, method=method, weights=weights, density=density, gamma=gamma, epsilon=epsilon,
                   normalize=normalize, rescale=rescale == "l1", lam=lam, seed=seed)

    return merge_weights(source, sink, options, merge_tensor, lambda key: {}, compute_dtype=compute_dtype)


RESCALE = ("l1", "none")
SPEC = MethodSpec(
    name="gta", merge=merge_gta, summary="mergekit's generalized task arithmetic", internal=True,
    citation="Ilharco et al. 2023; Yadav et al. 2023; Yu et al. 2024; Davari & Belilovsky 2024; Deep et al. 2024 "
    "(as mergekit composes them)", url="https://github.com/arcee-ai/mergekit",
    params=(Param("mergekit_method", "ties", choice("mergekit_method", tuple(KINDS)), "mergekit's method",
                  kind="choice", flag=False),
            Param("density", 1.0, lambda v: checks.as_float("density", v), "fraction kept", per_model=True,
                  flag=False),
            Param("gamma", 0.01, lambda v: checks.as_float("gamma", v), "Breadcrumbs' top fraction dropped",
                  per_model=True, flag=False),
            Param("epsilon", 0.15, check_epsilon, "DELLA's spread", per_model=True, flag=False),
            Param("normalize", False, flag("normalize"), "divide by the sum of the weights", kind="bool", flag=False),
            Param("rescale", "none", choice("rescale", RESCALE), "l1 or none", kind="rescale", flag=False),
            Param("mergekit_lambda", 1.0, lambda v: checks.as_float("mergekit_lambda", v), "mergekit's lambda",
                  flag=False),
            Param("seed", 0, check_seed, "seed of the drops", kind="int", flag=False), COMPUTE_DTYPE),
    backends=("torch",), single_pass=lambda params: True, uses_statistics=False, weight_space=True)
