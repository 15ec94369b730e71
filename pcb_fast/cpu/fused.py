"""Fused CPU loops: the per-block work of TIES, DARE, DARE-TIES, Breadcrumbs and PCB (official
variant) as one loop per block instead of a dozen torch ops.

TIES, DARE and DARE-TIES run C loops (pcb_fast.cpu.native, ties_loops.c) where a C compiler works:
the eager engine's float32 operations in its order, so the literal formulation's bits (signed zeros
included), every option included, nothing compiled at run time. The functions below dispatch to
them, else to the compiled forms.

The compiled forms: plain torch ops compiled by torch.compile (inductor) into vectorised OpenMP
loops. Eager torch makes one memory sweep per op; a TIES block needs a dozen ops, so the eager engine
spends its time re-reading blocks (docs/design.md 3.5). Each function here is plain torch ops without
data-dependent shapes, compiled once per process with dynamic shapes (no recompiling per block
width, number of tasks or parameter value: every varying value is a tensor argument). Written so
that inductor keeps no [n, m] boolean temporaries (it stores them byte by byte, slowly).

The values equal the eager engine's and the literal formulations' (torch.equal: same float32
operations per entry; the sums over tasks are one sequential loop over the tasks; inductor keeps
IEEE semantics on the CPU: no reassociation, no contraction); only the sign of a zero may differ
(compiled sums start from +0). tests/test_fused_cpu.py checks both.

PCB's official variant has C sweeps too (pcb_loops.c, inter "sum" and "normalized_sum", up to 80
tasks): they score with their own vectorised exp and tanh only to pick the entries near or above a
floor, whose exact scores then come from torch's exp and tanh, so their values are the eager
engine's bit for bit (tests/test_pcb_c.py). PCB's compiled loops (every inter term) are the
exception to the equality: its scores need exp and tanh, which eager torch takes from MKL and
inductor from Sleef (exp, within 1 ulp) or from :func:`_tanh` here (within 1.5 ulp), so the scores
differ from the eager ones by a few ulps and the compiled PCB is held to the tolerance of the
triton backend (docs/design.md 9: values within 2e-5 of max|tau_m|, keep masks equal except where
a score lies within a few ulps of its threshold; the same result on every run and thread count).
tests/test_fused_pcb.py checks it. They run only where the C sweeps do not apply.

Modes (``fused=`` of merge, merge_checkpoints, pcb_merge and the CLI): "on", "off", or "auto" (the
default): the C loops always; compiled ones from :data:`AUTO_MIN_ENTRIES` task-vector entries,
where compiling pays for itself, when a tiny function compiles here (a C++ compiler is needed);
"auto" falls back to the eager engine with a warning otherwise, "on" raises
:class:`FusedUnavailable`. "off": the eager torch ops.
"""

from __future__ import annotations

import functools
import warnings

import torch

from ..core import checks, rng
from . import native

MODES = ("auto", "on", "off")
# n * D from which "auto" fuses: 2^29 entries (2 GiB of fp32 task vectors) take the eager TIES
# about 5 s here and the fused one under 2 s, plus a first compile of 4-10 s per process (less
# with inductor's on-disk cache): below this, compiling does not pay for itself.
AUTO_MIN_ENTRIES = 1 << 29
# PCB's compiled loops (where its C sweeps do not apply) save about 0.6 s per 2^27 entries (n=8,
# D=2^24 through merge: 1.0 s against 1.6 s eager), for a first call of 5.5 s per process with
# inductor's on-disk cache warm (docs/design.md 3.5): "auto" compiles them from 2^31 entries (8 GiB
# of fp32 task vectors), below that the bit-exact eager path stays the default.
AUTO_MIN_ENTRIES_BY_METHOD = {"pcb": 1 << 31}
# the methods with compiled loops; for the others "auto" and "on" change nothing (and compile nothing)
FUSED_METHODS = ("ties", "dare", "dare_ties", "breadcrumbs", "pcb")
# the methods whose loops are also written in C (pcb_fast.cpu.native, ties_loops.c): nothing to compile at
# run time and the eager engine's values bit for bit, so "auto" takes them at any size (PCB's official
# variant too, for some of its options: has_c_loops)
C_METHODS = ("ties", "dare", "dare_ties")


def has_c_loops(method: str, params: dict) -> bool:
    """Whether ``method`` with ``params`` has its loops in C here: TIES, DARE and DARE-TIES (every
    option), PCB's official variant with inter "sum" or "normalized_sum" (pcb_loops.c; n up to
    core.formulas.EXACT_EXP_MAX_N, which the method checks), where the C library builds."""
    if native.problem() is not None:
        return False
    if method == "pcb":
        return (params.get("variant", "official") == "official"
                and params.get("inter", "sum") in ("sum", "normalized_sum"))
    return method in C_METHODS


RECOMPILE_LIMIT = 256  # compiled variants per function (thread counts times shape specialisations)


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


def has_loops(method: str, params: dict) -> bool:
    """Whether ``method`` with ``params`` has fused loops: the C loops take every option of TIES, DARE
    and DARE-TIES; the compiled ones not mergekit's L1 rescale, normalize, a per-tensor band, a drop
    rate per model, nor PCB's paper variant (the methods take the eager path for those)."""
    if method not in FUSED_METHODS:
        return False
    if has_c_loops(method, params):
        return True  # the C loops take every option of TIES, DARE and DARE-TIES
    if method in ("dare", "dare_ties") and (isinstance(params.get("p"), (list, tuple))
                                             or params.get("rescale", "inverse") != "inverse"):
        return False
    if method in ("dare", "breadcrumbs") and params.get("normalize", False):
        return False
    if method == "breadcrumbs" and params.get("band", "row") != "row":
        return False
    return not (method == "pcb" and params.get("variant", "official") != "official")


def resolve(mode: str, entries: int, method: str | None = None, params: dict | None = None) -> bool:
    """Whether a merge of ``entries`` task-vector entries (n * D) by ``method`` with ``params`` runs
    the fused loops."""
    checks.check_choice("fused", mode, MODES)
    if method is not None and not has_loops(method, params or {}):
        return False  # nothing to compile: not even the probe (seconds of inductor start-up per process)
    if mode == "off":
        return False
    if method is not None and has_c_loops(method, params or {}):
        return True
    if mode == "auto" and entries < AUTO_MIN_ENTRIES_BY_METHOD.get(method, AUTO_MIN_ENTRIES):
        return False
    problem = _probe()
    if problem is None:
        return True
    if mode == "on":
        raise FusedUnavailable(f"fused='on' but torch.compile cannot build CPU code here ({problem}); "
                               f"use fused='off' or 'auto'")
    warnings.warn(f"pcb_fast: fused CPU loops unavailable ({problem}); using the eager engine", stacklevel=2)
    return False


def settings(mode: str, entries: int, method: str, params: dict, allowed: bool = True) -> dict:
    """The run options (core/options.py) of a merge of ``entries`` task-vector entries: "fused"
    (:func:`resolve`; ``allowed`` False: never) and "fixed_threads": compiled loops are specialised to
    the thread count (a change would recompile them mid-merge), the C loops are not."""
    fused = allowed and resolve(mode, entries, method, params)
    return {"fused": fused, "fixed_threads": fused and not has_c_loops(method, params)}


def weights(lam, n: int) -> torch.Tensor:
    """The [n, 1] per-task weights the loops multiply by: ``lam``, or ones for None (x * 1.0 == x,
    so the values are those of the eager path, which skips the product)."""
    return torch.ones(n, 1) if lam is None else lam


def applies(source) -> bool:
    """Whether a merge over ``source`` runs the fused loops (chosen, and a single process)."""
    return source.options.fused and source.options.comm is None


class Fusable:
    """A block function compiled on its first call (``.eager`` is the plain function)."""

    def __init__(self, fn):
        self.eager = fn
        self._compiled = None
        functools.update_wrapper(self, fn)

    def __call__(self, *args):
        if self._compiled is None:
            self._compiled = torch.compile(self.eager, dynamic=True)
        # Each thread count is its own compiled variant (a guard of torch.compile), so are n == 1 and
        # m == 1: past torch's default limit of 8 variants it would silently run the function
        # uncompiled (other values for PCB). Raised for the call only, restored after.
        with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
            return self._compiled(*args)


def _sum_rows(x: torch.Tensor) -> torch.Tensor:
    """The sum over tasks; compiled, one sequential loop over the tasks per position (the rounding of
    reference.sum_over_tasks; tested), without specialising the code to the number of tasks."""
    return x.sum(0)


def _row_max_abs(tv: torch.Tensor) -> torch.Tensor:
    return tv.abs().amax(1)  # NaN propagates: the callers' finiteness check


def bracket_inside(tv, floor, ceiling):
    """|tau| of each task of a block around its bracket [floor, ceiling] ([n, 1] each): (max |tau|
    per task, NaN propagating; [3, n] int64 counts of |tau| > ceiling, == ceiling and == floor; a
    list of n tensors, each task's |tau| strictly inside its bracket in position order)."""
    if native.problem() is None:
        return native.bracket(tv, floor, ceiling)
    row_max, *counts, mask = compiled_bracket(tv, floor, ceiling)
    n = tv.shape[0]
    flat = mask.view(-1).nonzero().squeeze(1)
    task = torch.div(flat, mask.shape[1], rounding_mode="floor")
    values = tv[task, flat - task * mask.shape[1]].abs()
    return row_max, torch.stack(counts).long(), list(values.split(torch.bincount(task, minlength=n).tolist()))


def equal_counts(tv, t):
    """[n] entries of each task with |tau| == t ([n, 1])."""
    return native.equal_counts(tv, t) if native.problem() is None else compiled_equal_counts(tv, t)


def ties_block(tv, t, cut, lam, fill, divide):
    """TIES on a block: see :func:`_elect_and_mean` (in C where it builds: the eager values bit for bit)."""
    if native.problem() is None:
        return native.ties_block(tv, t, cut, lam, fill, bool(divide))
    return compiled_ties_block(tv, t, cut, lam, fill, divide)


def dare_ties_block(block, p, seed: int, rescale: str, factors, lam, fill, divide):
    """DARE-TIES on a block (drop probability ``p``, one or a list; ``rescale`` "inverse", or "l1" with
    the [n, 1] ``factors``, or "none"): :func:`_elect_and_mean`, kept entries and max |tau| per task."""
    if native.problem() is None:
        return native.dare_ties_block(block.tv, _drop(block, p, seed, rescale, factors), lam, fill, bool(divide))
    return compiled_dare_ties_block(block.tv, *dare_drop_args(block, p, seed), lam, fill, divide)


def dare_sum(block, p, seed: int, rescale: str, factors, lam):
    """DARE then task arithmetic on a block (options as :func:`dare_ties_block`): (sum over tasks,
    kept per task, max |tau| per task)."""
    if native.problem() is None:
        return native.dare_sum(block.tv, _drop(block, p, seed, rescale, factors), lam)
    return compiled_dare_sum(block.tv, *dare_drop_args(block, p, seed), lam)


@functools.lru_cache(maxsize=4096)
def _streams(seed: int, n: int, key: str) -> tuple:
    """Each task's stream constant for ``key`` and its mix32 (pcb_fast.core.rng)."""
    streams = [rng.stream_constant(seed, i, key) for i in range(n)]
    return streams, [rng.mix32(h) for h in streams]


def _drop(block, p, seed: int, rescale: str, factors) -> tuple:
    """The drop of a block for native.dare_sum / dare_ties_block: the eager drop's operations (rescale
    "inverse": divided by float32(1 - p_i); "l1": multiplied by the factors; "none": by 1)."""
    n = block.tv.shape[0]
    ps = p if isinstance(p, list) else [p] * n
    streams, highs = _streams(seed, n, block.segment.key)
    if rescale == "inverse":
        scales, multiply = [1 - x for x in ps], False
    else:
        scales, multiply = (factors if rescale == "l1" else [1.0] * n), True
    return streams, highs, [rng.keep_threshold(x) for x in ps], block.lo, scales, multiply


def dare_drop_args(block, p: float, seed: int) -> tuple:
    """The drop's arguments of the compiled loops for a block, all tensors (so that no value is
    compiled in): [n, 1] stream constants of (seed, task, key) and their mix32, the block's first
    index, the keep threshold and 1 - p (float32, the divisor of the eager drop)."""
    streams, highs = _streams(seed, block.tv.shape[0], block.segment.key)
    return (torch.tensor(streams, dtype=torch.int64).unsqueeze(1), torch.tensor(highs, dtype=torch.int64).unsqueeze(1),
            torch.tensor(block.lo), torch.tensor(rng.keep_threshold(p)), torch.tensor(1 - p, dtype=torch.float32))


@Fusable
def compiled_bracket(tv, floor, ceiling):
    """Where |tau| of each task falls around a bracket [floor, ceiling] ([n, 1] each): (max |tau|,
    count > ceiling, count == ceiling, count == floor, int32 mask of floor < |tau| < ceiling)."""
    a = tv.abs()
    above = (a > ceiling).sum(1)
    at_ceiling = (a == ceiling).sum(1)
    at_floor = (a == floor).sum(1)
    inside = ((a > floor) & (a < ceiling)).to(torch.int32)
    return _row_max_abs(tv), above, at_ceiling, at_floor, inside


@Fusable
def compiled_equal_counts(tv, t):
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
def compiled_ties_block(tv, t, cut, lam, fill, divide):
    """The compiled form of :func:`ties_block` (where the C loops do not build)."""
    return _elect_and_mean(_trimmed(tv, t, cut, lam), lam, fill, divide)


@Fusable
def compiled_dare_ties_block(tv, stream, stream_high, lo, threshold, scale, lam, fill, divide):
    """The compiled form of :func:`dare_ties_block`."""
    weighted, keep = _dropped(tv, stream, stream_high, lo, threshold, scale, lam)
    return *_elect_and_mean(weighted, lam, fill, divide), keep.sum(1), _row_max_abs(tv)


@Fusable
def compiled_dare_sum(tv, stream, stream_high, lo, threshold, scale, lam):
    """The compiled form of :func:`dare_sum`."""
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


@Fusable
def magnitude_runs(runs):
    """Min and max of |tau| over each run of a block's entries, ``runs`` [n, r, c] (the runs of
    core.select.TailSelect, a view of the block), for PCB's clip pass: two [n, r] tensors."""
    a = runs.abs()
    return a.amin(2), a.amax(2)


def marked(mask: torch.Tensor) -> torch.Tensor:
    """Ascending flat indices of the non-zero entries of a contiguous int32 mask (the few columns
    with entries inside a bracket): torch.nonzero over the mask read as int64 words, half as many
    entries to scan (twice as fast), then the two halves of each marked word."""
    flat = mask.view(-1)
    if flat.numel() % 2:
        return flat.nonzero().squeeze(1)
    words = flat.view(torch.int64).nonzero().squeeze(1) * 2
    candidates = torch.stack([words, words + 1], 1).view(-1)
    return candidates[flat[candidates] != 0]


@Fusable
def clip_bracket(tv, floor, ceiling):
    """|tau| of a block counted around two brackets per task at once, PCB's clip ranks lo (rows 0..n-1
    of ``floor``/``ceiling``, [2n, 1]) and hi (rows n..2n-1): (max |tau| per task, NaN propagating:
    the finiteness check; [2n] int32 counts of |tau| > ceiling, == ceiling and == floor; an int32
    flag per column [m], non-zero where some task's |tau| lies strictly inside its lo or hi bracket:
    the caller looks at those few columns again)."""
    n = tv.shape[0]
    a = tv.abs()
    lo_floor, hi_floor, lo_ceiling, hi_ceiling = floor[:n], floor[n:], ceiling[:n], ceiling[n:]
    above = torch.cat([_count(a > lo_ceiling), _count(a > hi_ceiling)])
    at_ceiling = torch.cat([_count(a == lo_ceiling), _count(a == hi_ceiling)])
    at_floor = torch.cat([_count(a == lo_floor), _count(a == hi_floor)])
    inside = (((a > lo_floor) & (a < lo_ceiling)) | ((a > hi_floor) & (a < hi_ceiling))).to(torch.int32)
    return _row_max_abs(tv), above, at_ceiling, at_floor, inside.amax(0)


def _tanh(x):
    """tanh in float32 within 1.5 ulp (Cephes' tanhf: an odd polynomial below |x| = 0.625, 1 - 2 /
    (exp(2|x|) + 1) above; +-0 stay +-0, large |x| give +-1), twice as fast as the vectorised
    tanh inductor calls (Sleef's, within 1 ulp), which dominated PCB's compiled loops. Neither
    rounds like eager torch.tanh (MKL), so the fused PCB path is held to a tolerance anyway."""
    a = x.abs()
    z = a * a
    small = ((((-5.70498872745e-3 * z + 2.06390887954e-2) * z - 5.37397155531e-2) * z + 1.33314422036e-1) * z
             - 3.33332819422e-1) * z * a + a
    r = torch.where(a < 0.625, small, 1 - 2 / (torch.exp(2 * a) + 1))
    return torch.where(x < 0, -r, r)


def _official_scores(tv, lo, hi, span, shift, inter: str):
    """PCB's official scores P of a block (docs/design.md 2.2 steps 2-5), with the float32 operations
    of pcb_fast.cpu.pcb_blocks.official_scores in the same order: N = (clip(|tau|) - lo) / span,
    intra = exp(N * N * n - shift) (``shift`` 0-dim: 0, or n beyond EXACT_EXP_MAX_N; x - 0 == x), the
    inter term summed over tasks in task order."""
    normalized = (torch.clamp(tv.abs(), lo, hi) - lo) / span
    intra = torch.exp(normalized * normalized * tv.shape[0] - shift)
    if inter == "sum":
        inter_term = _tanh(tv * _sum_rows(tv))
    else:
        signed = torch.sign(tv) * normalized
        if inter == "normalized_sum":
            inter_term = _tanh(tv * _sum_rows(signed))
        else:  # pairwise: sum over j of tanh(N-hat_i * N-hat_j), one sequential loop over j
            inter_term = _tanh(signed.unsqueeze(1) * signed.unsqueeze(0)).sum(1)
    return intra * inter_term


def _count(mask):
    """Per-task counts of a block's [n, m] mask in int32 (a block row holds < 2^31 entries): a third
    faster than int64 counts in inductor's vectorised loops."""
    return mask.to(torch.int32).sum(1, dtype=torch.int32)


def _pcb_bracket(tv, lo, hi, span, shift, floor, ceiling, inter: str):
    p = _official_scores(tv, lo, hi, span, shift, inter)
    inside = ((p > floor) & (p < ceiling)).to(torch.int32)
    return p.amax(1), _count(p > ceiling), _count(p == ceiling), _count(p == floor), inside.amax(0), p


def _pcb_block(tv, lo, hi, span, shift, t, keep_span, lam, inter: str):
    p = _official_scores(tv, lo, hi, span, shift, inter)
    scale = torch.clamp_min(p - t, 0) / keep_span
    value = torch.sign(tv) * torch.clamp(tv.abs(), lo, hi) * scale * lam
    return _sum_rows(value) / torch.clamp_min(_sum_rows(scale), 1e-12)


# One compiled function per inter term, each its own code object: torch.compile keeps its compiled
# variants (and counts them against its recompile limit) per code object.
@Fusable
def pcb_bracket_sum(tv, lo, hi, span, shift, floor, ceiling):
    """PCB's scores P of a block (``lo``, ``hi``, ``span``: the clip statistics, [n, 1]; ``shift``:
    0-dim) counted around a bracket [floor, ceiling] ([n, 1] each): (max P, int32 counts of P >
    ceiling, == ceiling and == floor, an int32 flag per column [m], non-zero where some task's P lies
    strictly inside its bracket, P). A flag per column rather than per entry: an eighth of the
    mask to write and scan at n = 8, and the caller compares the P of the few flagged columns."""
    return _pcb_bracket(tv, lo, hi, span, shift, floor, ceiling, "sum")


@Fusable
def pcb_bracket_normalized_sum(tv, lo, hi, span, shift, floor, ceiling):
    return _pcb_bracket(tv, lo, hi, span, shift, floor, ceiling, "normalized_sum")


@Fusable
def pcb_bracket_pairwise(tv, lo, hi, span, shift, floor, ceiling):
    return _pcb_bracket(tv, lo, hi, span, shift, floor, ceiling, "pairwise")


@Fusable
def pcb_block_sum(tv, lo, hi, span, shift, t, keep_span, lam):
    """PCB's merge of a block given t_i and span_i = M_i - t_i (inf where 0), [n, 1] each: tau_m =
    sum_i (sign(tau) clip(|tau|) * scale_i) * lam_i / max(sum_i scale_i, 1e-12), scale_i =
    max(P_i - t_i, 0) / span_i (docs/design.md 2.2 steps 6-7, the eager path's operations)."""
    return _pcb_block(tv, lo, hi, span, shift, t, keep_span, lam, "sum")


@Fusable
def pcb_block_normalized_sum(tv, lo, hi, span, shift, t, keep_span, lam):
    return _pcb_block(tv, lo, hi, span, shift, t, keep_span, lam, "normalized_sum")


@Fusable
def pcb_block_pairwise(tv, lo, hi, span, shift, t, keep_span, lam):
    return _pcb_block(tv, lo, hi, span, shift, t, keep_span, lam, "pairwise")


PCB_BRACKET = {"sum": pcb_bracket_sum, "normalized_sum": pcb_bracket_normalized_sum, "pairwise": pcb_bracket_pairwise}
PCB_BLOCK = {"sum": pcb_block_sum, "normalized_sum": pcb_block_normalized_sum, "pairwise": pcb_block_pairwise}
