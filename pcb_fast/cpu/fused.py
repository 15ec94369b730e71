"""Fused CPU loops: the per-block work of TIES, DARE, DARE-TIES and Breadcrumbs, compiled by
torch.compile (inductor) into vectorised OpenMP loops.

Eager torch makes one memory sweep per op; a TIES block needs a dozen ops, so the eager engine
spends its time re-reading blocks (docs/design.md 3.5). Each function here is plain torch ops without
data-dependent shapes, compiled once per process with dynamic shapes (no recompiling per block
width, number of tasks or parameter value: every varying value is a tensor argument). Written so
that inductor keeps no [n, m] boolean temporaries (it stores them byte by byte, slowly).

The values equal the eager engine's and the literal formulations' (torch.equal: same float32
operations per entry; the sums over tasks are one sequential loop over the tasks; inductor keeps
IEEE semantics on the CPU: no reassociation, no contraction); only the sign of a zero may differ
(compiled sums start from +0). tests/test_fused_cpu.py checks both.

Modes (``fused=`` of merge, merge_checkpoints and the CLI): "on", "off", or "auto" (the default):
on from :data:`AUTO_MIN_ENTRIES` task-vector entries, where compiling pays for itself, when a
tiny function compiles here (a C++ compiler is needed); "auto" falls back to the eager engine with
a warning otherwise, "on" raises :class:`FusedUnavailable`.
"""

from __future__ import annotations

import functools
import warnings

import torch

from ..core import checks, rng

MODES = ("auto", "on", "off")
# n * D from which "auto" fuses: 2^29 entries (2 GiB of fp32 task vectors) take the eager TIES
# about 5 s here and the fused one under 2 s, plus a first compile of 4-10 s per process (less
# with inductor's on-disk cache): below this, compiling does not pay for itself.
AUTO_MIN_ENTRIES = 1 << 29


class FusedUnavailable(ValueError):
    """torch.compile cannot build CPU code here (no C++ compiler, unsupported platform, ...)."""


@functools.lru_cache(maxsize=None)
def _probe() -> str | None:
    """None when a tiny function compiles and runs correctly, else the reason it does not."""
    try:
        compiled = torch.compile(lambda x: (x * 2).sum(0), dynamic=True)
        x = torch.arange(6, dtype=torch.float32).reshape(2, 3)
        if not torch.equal(compiled(x), (x * 2).sum(0)):
            return "a compiled test function gave a wrong result"
    except Exception as e:  # a missing compiler surfaces as any of several inductor errors
        return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    return None


def resolve(mode: str, entries: int) -> bool:
    """Whether a merge of ``entries`` task-vector entries (n * D) runs the fused loops."""
    checks.check_choice("fused", mode, MODES)
    if mode == "off" or (mode == "auto" and entries < AUTO_MIN_ENTRIES):
        return False
    problem = _probe()
    if problem is None:
        return True
    if mode == "on":
        raise FusedUnavailable(f"fused='on' but torch.compile cannot build CPU code here ({problem}); "
                               f"use fused='off' or 'auto'")
    warnings.warn(f"pcb_fast: fused CPU loops unavailable ({problem}); using the eager engine", stacklevel=2)
    return False


def weights(lam, n: int) -> torch.Tensor:
    """The [n, 1] per-task weights the loops multiply by: ``lam``, or ones for None (x * 1.0 == x,
    so the values are those of the eager path, which skips the product)."""
    return torch.ones(n, 1) if lam is None else lam


def applies(source) -> bool:
    """Whether a merge over ``source`` runs the fused loops (chosen, and a single process)."""
    return source.fused and source.comm is None


class Fusable:
    """A block function compiled on its first call (``.eager`` is the plain function)."""

    def __init__(self, fn):
        self.eager = fn
        self._compiled = None
        functools.update_wrapper(self, fn)

    def __call__(self, *args):
        if self._compiled is None:
            self._compiled = torch.compile(self.eager, dynamic=True)
        return self._compiled(*args)


def _sum_rows(x: torch.Tensor) -> torch.Tensor:
    """The sum over tasks; compiled, one sequential loop over the tasks per position (the rounding of
    reference.sum_over_tasks; tested), without specialising the code to the number of tasks."""
    return x.sum(0)


def _row_max_abs(tv: torch.Tensor) -> torch.Tensor:
    return tv.abs().amax(1)  # NaN propagates: the callers' finiteness check


@Fusable
def bracket(tv, floor, ceiling):
    """Where |tau| of each task falls around a bracket [floor, ceiling] ([n, 1] each): (max |tau|,
    count > ceiling, count == ceiling, count == floor, int32 mask of floor < |tau| < ceiling)."""
    a = tv.abs()
    above = (a > ceiling).sum(1)
    at_ceiling = (a == ceiling).sum(1)
    at_floor = (a == floor).sum(1)
    inside = ((a > floor) & (a < ceiling)).to(torch.int32)
    return _row_max_abs(tv), above, at_ceiling, at_floor, inside


@Fusable
def equal_counts(tv, t):
    """[n] entries of each task with |tau| == t."""
    return (tv.abs() == t).sum(1)


def _trimmed(tv, t, cut, lam):
    """TIES trim of a block: tau * kept * lam, keeping |tau| > t, and |tau| == t at positions < cut
    (per task, [n, 1])."""
    a = tv.abs()
    position = torch.arange(tv.shape[1], device=tv.device)
    return tv * ((a > t) | ((a == t) & (position < cut))) * lam


def _dropped(tv, stream, stream_high, lo, threshold, scale, lam):
    """DARE's drop of a block (pcb_fast.rng, bit for bit): (tau * keep / (1 - p) * lam, keep).
    ``stream``/``stream_high`` [n, 1] int64 are each task's stream constant and its mix."""
    index = lo + torch.arange(tv.shape[1], device=tv.device, dtype=torch.int64)
    x = _mix32((index & rng.MASK32) ^ stream)
    x = _mix32(x ^ ((index >> 32) & rng.MASK32) ^ stream_high)
    keep = (x >> 8) >= threshold
    return tv * keep / scale * lam, keep


def _mix32(x):
    x = x ^ (x >> 16)
    x = (x * rng.M1) & rng.MASK32
    x = x ^ (x >> 15)
    x = (x * rng.M2) & rng.MASK32
    return x ^ (x >> 15)


def _elect_and_mean(weighted, lam, fill, divide):
    """TIES' sign election and disjoint mean of a block, before the whole-model zero-sum sign is
    known: (merged values with zero-sum positions given ``fill``, sum of the elected signs,
    number of "undecided" positions, whose value depends on that fill: zero sum, some entry
    non-zero). A block without undecided positions is final whatever the fill.

    The mean is reference_baselines.disjoint_mean with lambdas (which equals the unweighted form
    when lam is all ones); ``divide`` 0 (a 0-dim tensor) gives the sum instead (normalize=False)."""
    total = _sum_rows(weighted)
    sign = torch.sign(total)
    undecided = ((total == 0) & (weighted.abs().amax(0) > 0)).sum()
    positive = torch.where(sign == 0, fill, sign) > 0
    # Written without an [n, m] "agree" mask: inductor would store it as bytes, slowly, between loops.
    num = _sum_rows(torch.where(positive, torch.where(weighted > 0, weighted, 0.0), torch.where(weighted < 0, weighted, 0.0)))
    den = _sum_rows(torch.where(positive, torch.where(weighted > 0, lam, 0.0), torch.where(weighted < 0, lam, 0.0)))
    return num / torch.where((den == 0) | (divide == 0), 1.0, den), sign.sum(dtype=torch.int64), undecided


@Fusable
def ties_block(tv, t, cut, lam, fill, divide):
    """TIES on a block: see :func:`_elect_and_mean`."""
    return _elect_and_mean(_trimmed(tv, t, cut, lam), lam, fill, divide)


@Fusable
def dare_ties_block(tv, stream, stream_high, lo, threshold, scale, lam, fill, divide):
    """DARE-TIES on a block: :func:`_elect_and_mean`, kept entries and max |tau| per task."""
    weighted, keep = _dropped(tv, stream, stream_high, lo, threshold, scale, lam)
    return *_elect_and_mean(weighted, lam, fill, divide), keep.sum(1), _row_max_abs(tv)


@Fusable
def dare_sum(tv, stream, stream_high, lo, threshold, scale, lam):
    """DARE then task arithmetic on a block: (sum over tasks, kept per task, max |tau| per task)."""
    weighted, keep = _dropped(tv, stream, stream_high, lo, threshold, scale, lam)
    return _sum_rows(weighted), keep.sum(1), _row_max_abs(tv)


@Fusable
def band_block(tv, top, low, lam):
    """Breadcrumbs on a block of whole rows, tv [n, rows, L], given each row's band bounds [n, rows, 1]
    (values at descending ranks drop and drop + keep - 1): (sum over tasks of lam * tau in the
    band, [n, rows] int32 flags of the rows where a bound repeats, [n, rows] max |tau|). Exact for
    rows where no bound repeats; the caller redoes the others."""
    a = tv.abs()
    weighted = torch.where((a <= top) & (a >= low), tv, 0.0).reshape(tv.shape[0], -1) * lam
    tied = (((a == top).sum(-1) > 1) | ((a == low).sum(-1) > 1)).to(torch.int32)
    return _sum_rows(weighted), tied, a.amax(-1)
