"""The engine's wiring of methods that merge the weights themselves, one whole tensor at a time.

mergekit's interpolations (SLERP and its kin), Model Stock, NearSwap, SCE, Arcee Fusion and the
Karcher mean work on theta_pre and theta_i, not on task vectors, and take statistics over a whole
tensor (its norm, its direction, its variance). A method of this kind is a function
``merge_tensor(key, base, models, **params) -> theta`` on tensors of one key in the compute dtype
(``base`` of the tensor's shape, or None for a method run without a base; ``models`` a list), and
runs through :func:`merge_weights`: one pass over the source with one key resident at a time, the
result handed to the sink's ``weights(segment, lo, hi, theta)`` (the merged weights themselves: no
theta_pre + lam * tau_m, so that the output is the function's value, rounded once to the output
dtype).

The compute dtype is float32 by default (the inputs' exact values, whatever their dtype); mergekit
computes in the config's ``dtype``, else in the inputs' own dtype (bfloat16 arithmetic on bfloat16
models), which ``compute_dtype`` reproduces ("inputs": each tensor in its inputs' promoted dtype).
"""

from __future__ import annotations

from typing import Callable

import torch

from ..core import checks
from .spec import Param

COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                  "float64": torch.float64}
INPUTS = "inputs"  # each tensor in the promoted dtype of its inputs (mergekit's rule without a config dtype)


def check_compute_dtype(value) -> str:
    return checks.check_choice("compute_dtype", value, tuple(COMPUTE_DTYPES) + (INPUTS,))


COMPUTE_DTYPE = Param("compute_dtype", "float32", check_compute_dtype,
                      "dtype of the arithmetic: float32 (default; exact inputs), bfloat16, float16, float64, "
                      "inputs (each tensor in its inputs' dtype), or mergekit (mergekit's: with --config, the "
                      "config's dtype, else the inputs')", kind="choice")


def compute_dtype_of(setting: str, natives) -> torch.dtype:
    """The dtype a tensor's arithmetic runs in, for ``compute_dtype`` ``setting``."""
    if setting != INPUTS:
        return COMPUTE_DTYPES[setting]
    dtype = natives[0].dtype
    for t in natives[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def merge_weights(source, sink, options, merge_tensor: Callable, params: Callable[[str], dict], *,
                  with_base: bool = True,
                  compute_dtype: str = "float32") -> torch.Tensor:
    """Run ``merge_tensor`` on every key of ``source`` (whole tensors: blocks as wide as the widest
    key); ``params(key)`` gives a key's parameters. ``with_base`` False: the function gets None for
    the base (the source's base then only lends its keys, shapes and side files). Returns the
    entries each model took part in."""
    if not hasattr(source, "raw_blocks") or sink.weights is None:
        raise ValueError("this method merges checkpoints or state dicts on the torch backend only")
    check_compute_dtype(compute_dtype)
    width = whole_tensors(source)
    kept = torch.zeros(source.n, dtype=torch.int64)
    for segment, lo, hi, natives in source.raw_blocks(width, options=options):
        dtype = compute_dtype_of(compute_dtype, natives)
        shape = segment.shape
        base = natives[0].to(torch.float32) if with_base else None
        models = [m.to(torch.float32) for m in natives[1:]]
        _check_finite(source, segment, natives, base, models)
        if dtype != torch.float32:  # (rounded from the inputs themselves, not from float32)
            base = natives[0].to(dtype) if with_base else None
            models = [m.to(dtype) for m in natives[1:]]
        theta = merge_tensor(segment.key, None if base is None else base.view(shape), [m.view(shape) for m in models],
                             **params(segment.key))
        sink.weights(segment, lo, hi, theta.to(dtype).reshape(-1))
        kept += hi - lo
    return kept


def whole_tensors(source) -> int:
    """The block width that makes every block a whole tensor; the source then reads one block ahead
    at most (its reader would otherwise hold several whole tensors of every model)."""
    for reader in (source, getattr(source, "inner", None)):  # (a cached source reads through its inner one)
        if hasattr(reader, "READ_AHEAD"):
            reader.READ_AHEAD = 1
    return max((s.numel for s in source.segments), default=1)


def _check_finite(source, segment, natives, base, models) -> None:
    """NaN or Inf in an input (or a float64 value beyond float32): an error naming the model and key."""
    if base is not None and not bool(torch.isfinite(base).all()):
        raise ValueError(f"base model, key {checks.short(segment.key, 80)}: {checks.non_finite_reason(natives[0])}")
    for task, m in enumerate(models):
        if not bool(torch.isfinite(m).all()):
            raise ValueError(f"{source.where(task, segment)}: {checks.non_finite_reason(natives[task + 1])}")


def model_count(count: int, message: str) -> Callable[[dict, int], None]:
    """A spec's ``check_together`` that the method is given exactly ``count`` models besides the base:
    else ``message`` (formatted with the number ``n`` given) is the error."""

    def check(params: dict, n: int) -> None:
        if n != count:
            raise ValueError(message.format(n=n))

    return check


def no_weights(method: str, lambdas) -> None:
    """Methods whose models carry no weight refuse one (rather than ignore it)."""
    if lambdas is not None:
        raise ValueError(f"method {checks.short(method)} takes no per-model weights (lambdas)")
