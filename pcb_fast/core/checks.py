"""Validation of merge parameters and inputs: one clear ValueError per bad value."""

from __future__ import annotations

import math
import re
from typing import Sequence

import torch

INTER_CHOICES = ("sum", "normalized_sum", "pairwise")
VARIANT_CHOICES = ("official", "paper")
SCOPE_CHOICES = ("global", "tensor")
FLOAT32_MAX = torch.finfo(torch.float32).max  # the merge computes in float32


def check_choice(name: str, value, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name}={short(value)} is not valid; choose one of {', '.join(map(repr, choices))}")
    return value


def check_flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name}={short(value)} must be true or false")
    return value


def check_ratio(ratio) -> float:
    """Keep ratio r: 0 < r <= 1."""
    r = as_float("ratio", ratio)
    if not (0.0 < r <= 1.0):
        raise ValueError(f"ratio={short(ratio)} is out of range; valid: 0 < ratio <= 1")
    return r


def check_clamp_ratio(clamp_ratio) -> float:
    """Outlier ratio a: 0 <= a < 0.5."""
    a = as_float("clamp_ratio", clamp_ratio)
    if not (0.0 <= a < 0.5):
        raise ValueError(f"clamp_ratio={short(clamp_ratio)} is out of range; valid: 0 <= clamp_ratio < 0.5")
    return a


def check_lam(lam) -> float:
    value = as_float("lam", lam)
    if not math.isfinite(value):
        raise ValueError(f"lam={short(lam)} must be a finite number")
    if abs(value) > FLOAT32_MAX:
        raise ValueError(f"lam={short(lam)} is beyond the float32 range the merge computes in (|lam| <= {FLOAT32_MAX:.3g})")
    return value


def check_lambdas(lambdas, n: int) -> list[float] | None:
    """Per-task coefficients: None (all 1) or n finite numbers."""
    if lambdas is None:
        return None
    if isinstance(lambdas, torch.Tensor):
        lambdas = lambdas.detach().cpu().reshape(-1).tolist()
    try:
        values = [float(x) for x in lambdas]
    except OverflowError:
        raise ValueError(f"lambdas={short(lambdas)}: a value is beyond the range of a float") from None
    except (TypeError, ValueError):
        raise ValueError(f"lambdas={short(lambdas)} must be a sequence of {n} numbers") from None
    if len(values) != n:
        raise ValueError(f"lambdas has {len(values)} values but there are {n} models; give one per model")
    bad = [v for v in values if not math.isfinite(v)]
    if bad:
        raise ValueError(f"lambdas={short(values)} must all be finite numbers")
    bad = [v for v in values if abs(v) > FLOAT32_MAX]
    if bad:
        raise ValueError(f"lambdas: {short(bad[0])} is beyond the float32 range the merge computes in "
                         f"(|lambda| <= {FLOAT32_MAX:.3g})")
    return values


def check_per_task(name: str, value, n: int, check):
    """One value for every task, or a list of n (one per model), each validated by ``check``."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} values but there are {n} models; give one per model")
        return [check(v) for v in value]
    return check(value)


def check_n_models(n: int) -> int:
    if n < 1:
        raise ValueError(f"n={n}: at least one fine-tuned model (task vector) is needed; valid: n >= 1")
    return n


def check_float_tensor(what: str, t) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{what} is a {type(t).__name__}, expected a torch.Tensor")
    if t.layout != torch.strided:
        raise ValueError(f"{what} is a {t.layout} tensor; only dense tensors are merged (call .to_dense())")
    if not t.is_floating_point():
        raise ValueError(f"{what} has dtype {t.dtype}; valid: a floating dtype (float32, float16, bfloat16, float64)")
    return t


def task_vector_rows(task_vectors) -> list[torch.Tensor]:
    """The n validated 1-D rows (views) of a [n, D] floating tensor or of a list of n tensors."""
    if isinstance(task_vectors, (list, tuple)):
        check_n_models(len(task_vectors))
        rows = [check_float_tensor(f"task vector {i}", t).reshape(-1) for i, t in enumerate(task_vectors)]
        sizes = [r.numel() for r in rows]
        if len(set(sizes)) != 1:
            raise ValueError(f"task vectors have different sizes {sizes}; all must have the same number of entries")
    else:
        tv = check_float_tensor("task_vectors", task_vectors)
        if tv.dim() != 2:
            raise ValueError(f"task_vectors has shape {tuple(tv.shape)}; expected [n, D] or a list of n 1-D tensors")
        check_n_models(tv.shape[0])
        rows = list(tv)
    if rows[0].numel() < 1:
        raise ValueError(f"task vectors have D={rows[0].numel()} entries; valid: D >= 1")
    return rows


def common_device(named) -> torch.device:
    """The one device of the (what, tensor) pairs ``named``; an error names two that differ."""
    first_what, device = None, None
    for what, t in named:
        if device is None:
            first_what, device = what, t.device
        elif t.device != device:
            raise ValueError(f"{what} is on {t.device} but {first_what} is on {device}; all tensors must be on one device")
    return device if device is not None else torch.device("cpu")


def non_finite_reason(t: torch.Tensor) -> str | None:
    """None when every value of ``t`` is finite in float32, else what is wrong with it (float64
    values beyond the float32 range are finite, but not for a merge computed in float32)."""
    if not bool(torch.isfinite(t).all()):
        return "contains NaN or Inf; every input value must be finite"
    if t.dtype == torch.float64 and t.numel():
        largest = float(t.abs().max())
        if largest > FLOAT32_MAX:
            return (f"holds values beyond the float32 range the merge computes in (|value| up to {largest:.3g}); "
                    "every input value must fit float32")
    return None


def check_finite(what: str, t: torch.Tensor) -> None:
    reason = non_finite_reason(t)
    if reason is not None:
        raise ValueError(f"{what} {reason}")


SMALL_TENSOR = 1 << 12  # entries: tensors below this are checked together, in runs of at most FINITE_RUN entries
FINITE_RUN = 1 << 20


def check_all_finite(named, label=None) -> None:
    """:func:`check_finite` on each (what, tensor) of ``named`` with one device synchronisation for
    all of them (not one per tensor: a model of many small tensors on a GPU would wait for each),
    small tensors of one dtype and device checked together, then, only where some value fails,
    tensor by tensor to name the first. ``label(what)``, where given, names a tensor (asked only
    for an error)."""
    named = list(named)
    flags, wide, runs = [], [], {}
    for _, t in named:
        if t.numel() >= SMALL_TENSOR:
            flags.append(torch.isfinite(t).all())
            if t.dtype == torch.float64:
                wide.append(t.abs().max())
            continue
        run = runs.setdefault((t.dtype, t.device), [[], 0])
        run[0].append(t if t.dim() == 1 else t.reshape(-1))
        run[1] += t.numel()
        if run[1] >= FINITE_RUN:
            _check_run(run, flags, wide)
    for run in runs.values():
        _check_run(run, flags, wide)
    if not flags or (bool(torch.stack(flags).all())
                     and not (wide and float(torch.stack(wide).max()) > FLOAT32_MAX)):
        return
    for what, t in named:
        check_finite(what if label is None else label(what), t)


def _check_run(run: list, flags: list, wide: list) -> None:
    """The flags of check_all_finite for a run of small tensors [tensors, entries], emptied."""
    if run[1]:
        values = torch.cat(run[0])
        flags.append(torch.isfinite(values).all())
        if values.dtype == torch.float64:
            wide.append(values.abs().max())
    run[0], run[1] = [], 0


def check_merged(key: str, theta: torch.Tensor, out: torch.Tensor) -> None:
    """Merged values ``out`` (``theta`` before the cast to the output dtype) must be finite: finite
    inputs can still overflow (a large lam, values near the float32 limit, a float16 output)."""
    # NaN and +-Inf propagate through a sum (Inf - Inf is NaN): a finite sum, one read without a
    # temporary, proves every value finite; a sum that overflows is checked entry by entry
    if math.isfinite(float(out.sum(dtype=torch.float64 if out.dtype == torch.float64 else torch.float32))):
        return
    if bool(torch.isfinite(out).all()):
        return
    if not bool(torch.isfinite(theta).all()):
        raise ValueError(f"key {short(key, 80)}: the merged values overflow {theta.dtype} (theta_pre + lam * tau_m beyond "
                         f"{torch.finfo(theta.dtype).max:.3g}) although every input is finite; lower lam or lambdas")
    largest = float(theta.abs().max())
    raise ValueError(f"key {short(key, 80)}: merged values up to {largest:.3g} exceed the range of {out.dtype} "
                     f"(largest {torch.finfo(out.dtype).max:.3g}); choose a wider output dtype")


def short(value, limit: int = 60) -> str:
    """``repr(value)`` cut to about ``limit`` characters: a message quotes a value, never all of a huge one."""
    if isinstance(value, (list, tuple, dict, set)) and len(value) > limit:
        return f"<a {type(value).__name__} of {len(value)} items>"
    try:
        text = repr(value)
    except ValueError:  # an integer of more digits than Python converts
        return f"<a {type(value).__name__} too large to print>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def as_float(name: str, value) -> float:
    if isinstance(value, bool):
        raise ValueError(f"{name}={short(value)} must be a number")
    try:
        return float(value)
    except OverflowError:
        raise ValueError(f"{name}={short(value)} is beyond the range of a float") from None
    except (TypeError, ValueError):
        raise ValueError(f"{name}={short(value)} must be a number") from None


def check_block_width(block_width) -> int:
    """Entries per block: a positive integer."""
    if isinstance(block_width, bool) or not isinstance(block_width, int) or block_width < 1:
        raise ValueError(f"block_width={short(block_width)} is not valid; use a positive integer (entries per block)")
    return block_width


def check_exclude(exclude) -> tuple:
    """Exclude patterns: None (nothing excluded), one regular expression, or a sequence of them."""
    if exclude is None:
        return ()
    if isinstance(exclude, str):
        return (exclude,)
    try:
        patterns = tuple(exclude)
    except TypeError:
        raise ValueError(f"exclude={short(exclude)} must be a regular expression or a list of them") from None
    bad = [p for p in patterns if not isinstance(p, str)]
    if bad:
        raise ValueError(f"exclude: {short(bad[0])} is a {type(bad[0]).__name__}, not a regular expression (a string)")
    return patterns


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text, what: str) -> int:
    """Bytes of a size such as 2GB, 512MiB, 1.5e9 or an int."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        try:
            value, unit = float(text), ""
        except OverflowError:  # an int beyond float range
            value, unit = math.inf, ""
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
        if not match or match.group(2).upper() not in _UNITS:
            raise ValueError(f"{what}={short(text)} is not a size; write it as a number of bytes or with a unit "
                             "(e.g. 2GB, 512MiB)")
        value, unit = float(match.group(1)), match.group(2).upper()
    value *= _UNITS[unit]
    if not math.isfinite(value):
        raise ValueError(f"{what}={short(text)} is not a finite size; write it as a number of bytes or with a unit "
                         "(e.g. 2GB, 512MiB)")
    size = int(value)
    if size < 0:
        raise ValueError(f"{what}={short(text)} must not be negative")
    return size
