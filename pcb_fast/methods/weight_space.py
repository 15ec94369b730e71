"""The engine's wiring of methods that merge the weights themselves, one whole tensor at a time.

mergekit's interpolations (SLERP and its kin) and selections work on theta_pre and theta_i, not
on task vectors, and take statistics over a whole tensor (its norm, its direction). A method of
this kind is a function ``merge_tensor(key, base, models, **params) -> theta`` on float32 tensors
of one key (``base`` [numel], ``models`` [n, numel], flat in the tensor's index order), and runs
through :func:`merge_weights`: one pass over the source with one key resident at a time, the
result handed to the sink's ``weights(segment, lo, hi, theta)`` (the merged weights themselves:
no theta_pre + lam * tau_m, so that the output is the function's value, rounded once to the
output dtype).
"""

from __future__ import annotations

from typing import Callable

import torch

from ..core import checks


def merge_weights(source, sink, merge_tensor: Callable, params: Callable[[str], dict]) -> torch.Tensor:
    """Run ``merge_tensor`` on every key of ``source`` (whole tensors: blocks as wide as the widest
    key); ``params(key)`` gives a key's parameters. Returns the entries each model took part in."""
    if not hasattr(source, "raw_blocks") or getattr(sink, "weights", None) is None:
        raise ValueError("this method merges checkpoints or state dicts on the torch backend only")
    width = max((s.numel for s in source.segments), default=1)
    kept = torch.zeros(source.n, dtype=torch.int64)
    for segment, lo, hi, natives in source.raw_blocks(width):
        base = natives[0].to(torch.float32)
        models = torch.stack([m.to(torch.float32) for m in natives[1:]])
        _check_finite(source, segment, natives, base, models)
        theta = merge_tensor(segment.key, base, models, **params(segment.key))
        sink.weights(segment, lo, hi, theta.reshape(-1))
        kept += hi - lo
    return kept


def _check_finite(source, segment, natives, base, models) -> None:
    """NaN or Inf in an input (or a float64 value beyond float32): an error naming the model and key."""
    if not bool(torch.isfinite(base).all()):
        raise ValueError(f"base model, key {segment.key!r}: {checks.non_finite_reason(natives[0])}")
    bad = ~torch.isfinite(models).all(dim=1)
    if bool(bad.any()):
        task = int(bad.nonzero()[0, 0])
        raise ValueError(f"{source.where(task, segment)}: {checks.non_finite_reason(natives[task + 1])}")


def no_weights(method: str, lambdas) -> None:
    """Methods whose models carry no weight refuse one (rather than ignore it)."""
    if lambdas is not None:
        raise ValueError(f"method {method!r} takes no per-model weights (lambdas)")
