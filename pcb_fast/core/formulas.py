"""The formulas that the engine, the methods and the backends share (docs/design.md 2, 5).

Each one is the single home of a rule that more than one fast path applies: the authors' rank
arithmetic, the task-order sums, TIES' election, the "zero span normalises to 0" rule. The
reference oracles (pcb_fast.reference) write the same rules again in their own literal form and
import nothing from here, so that the tests compare two independent implementations.
"""

from __future__ import annotations

import torch

from . import checks

# exp(n * x) with x in [0, 1] overflows float32 for n > 88; up to this n it is computed exactly,
# beyond it the exponent is shifted by -n (a per-row factor that the min-max of step 6 cancels).
EXACT_EXP_MAX_N = 80


def keep_index(D: int, ratio: float) -> int:
    """Ascending rank of the keep threshold t: ``int(D * (1 - ratio))`` (authors' rounding)."""
    return min(int(D * (1 - ratio)), D - 1)


def clip_indices(D: int, clamp_ratio: float) -> tuple[int, int]:
    """Ascending ranks (lo, hi) of the outlier clip: ``int(D*a)`` and ``int(D*(1-a) - 1)``."""
    return int(D * clamp_ratio), int(D * (1 - clamp_ratio) - 1)


def span_or_inf(span: torch.Tensor) -> torch.Tensor:
    """``span`` with every non-positive entry replaced by +inf, so that (x - lo) / span is 0 for a
    constant row or pair instead of NaN (docs/design.md 2.4)."""
    return torch.where(span > 0, span, torch.full_like(span, float("inf")))


def merged_weights(base: torch.Tensor, lam: float, tau_m: torch.Tensor) -> torch.Tensor:
    """theta = theta_pre + lam * tau_m, in float32 (bf16/fp16/fp32 bases) or in float64 for a float64
    base, whose values are then never rounded to float32 (tau_m itself is float32)."""
    base = base.to(torch.promote_types(base.dtype, torch.float32))
    return base + tau_m if lam == 1 else base + lam * tau_m  # 1.0 * x == x: one sweep fewer, same bits


def lambda_column(lambdas, n: int, device=None, ones: bool = False):
    """[n, 1] float32 per-task weights (validated); for ``lambdas=None``, None (the eager paths skip
    the product) or, with ``ones``, a column of ones (for kernels that always multiply)."""
    lambdas = checks.check_lambdas(lambdas, n)
    if lambdas is None:
        return torch.ones(n, 1, device=device) if ones else None
    return torch.tensor(lambdas, dtype=torch.float32, device=device).unsqueeze(1)


def sum_over_tasks(x: torch.Tensor) -> torch.Tensor:
    """Sum of the rows of ``x`` in task order: ``x[0] + x[1] + ...`` (a fixed rounding order)."""
    if x.shape[0] == 1:
        return x[0].clone()
    acc = torch.add(x[0], x[1])  # x[0] + x[1] without a copy of x[0] first
    for row in x[2:]:
        acc += row
    return acc


def elected_signs(weighted: torch.Tensor) -> torch.Tensor:
    """TIES sign election per position: sign of the sum over tasks (0 where it is 0)."""
    return torch.sign(sum_over_tasks(weighted))


def zero_sign_fill(sign_total, sign_ties: str) -> torch.Tensor:
    """The sign given to zero-sum positions: the majority elected sign of the whole model
    (authors' resolve_zero_signs, from the sum of the elected signs) or +1 (mergekit)."""
    if sign_ties == "majority":
        return torch.sign(torch.as_tensor(sign_total, dtype=torch.float32))
    return torch.ones(())


def disjoint_mean(weighted: torch.Tensor, sign: torch.Tensor, fill: torch.Tensor, lam,
                  normalize: bool = True) -> torch.Tensor:
    """Mean of the entries agreeing with the elected sign (authors' disjoint_merge; with ``lam``,
    mergekit's weighted form: divide by the sum of the agreeing weights); without ``normalize``
    (mergekit's option), their sum."""
    sign = torch.where(sign == 0, fill, sign)
    agree = torch.where(sign > 0, weighted > 0, weighted < 0)
    selected = weighted * agree
    if not normalize:
        return sum_over_tasks(selected)
    if lam is None:
        return sum_over_tasks(selected) / torch.clamp(sum_over_tasks(agree.float()), min=1)
    weight = sum_over_tasks(agree.float() * lam)
    return sum_over_tasks(selected) / torch.where(weight == 0, 1.0, weight)
