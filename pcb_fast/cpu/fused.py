"""Fused CPU loops: the per-block work of TIES, DARE, DARE-TIES, Breadcrumbs and PCB (official
variant) as one loop per block instead of a dozen torch ops (eager torch makes one memory sweep
per op, so the eager engine spends its time re-reading blocks: docs/design.md 3.5).

Two tiers, each where no other one applies (docs/design.md 3.5 says which platform needs which):

- C loops (pcb_fast.cpu.native): TIES, DARE and DARE-TIES (ties_loops.c, every option) and PCB's
  official variant with inter "sum" or "normalized_sum" (pcb_loops.c, up to 80 tasks). They run
  the eager engine's float32 operations in its order, so they give its bits (signed zeros
  included), and nothing is compiled at run time. Where no C compiler works these methods take
  the eager engine: torch.compile would need a compiler too.
- Compiled loops (torch.compile, inductor's vectorised OpenMP loops): Breadcrumbs, and PCB where
  its C sweeps do not apply (the pairwise inter term, more than 80 tasks). Plain torch ops
  without data-dependent shapes, compiled once per process with dynamic shapes (every varying
  value is a tensor argument), written so that inductor keeps no [n, m] boolean temporaries (it
  stores them byte by byte, slowly). Breadcrumbs' values equal the eager ones (torch.equal: the
  same float32 operations per entry; sums over tasks are one sequential loop; only the sign of a
  zero may differ). PCB's scores need exp and tanh, which eager torch takes from MKL and inductor
  from Sleef (exp, within 1 ulp) or from :func:`_tanh` here (within 1.5 ulp), so the compiled PCB
  is held to the tolerance of the triton backend (docs/design.md 9); tests/test_fused_pcb.py.

PCB's C sweeps score with their own vectorised exp and tanh only to pick the entries near or above
a floor, whose exact scores then come from torch's exp and tanh: the eager engine's values bit for
bit (tests/test_pcb_c.py).

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
# n * D from which "auto" compiles loops: below it, the first compile of each process (seconds)
# costs more than the compiled loops save (docs/configuration.md, docs/design.md 3.5).
AUTO_MIN_ENTRIES = 1 << 29
# PCB's compiled loops (where its C sweeps do not apply) save less per entry for a longer compile:
# "auto" compiles them from 8 GiB of fp32 task vectors; below that the bit-exact eager path stays.
AUTO_MIN_ENTRIES_BY_METHOD = {"pcb": 1 << 31}
# the methods with compiled loops; for the others "auto" and "on" change nothing (and compile nothing)
FUSED_METHODS = ("ties", "dare", "dare_ties", "breadcrumbs", "pcb")
# the methods whose loops are written only in C (pcb_fast.cpu.native, ties_loops.c): nothing to compile at
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
    """fused="on" but neither the C loops nor torch.compile build here (no compiler, unsupported
    platform, ...)."""


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
    """Whether ``method`` with ``params`` has fused loops: TIES, DARE and DARE-TIES (every option)
    where the C loops build; Breadcrumbs with its per-row band; PCB's official variant (the methods
    take the eager path otherwise)."""
    if method not in FUSED_METHODS:
        return False
    if has_c_loops(method, params):
        return True
    if method in C_METHODS:
        return False  # no other fused tier: the eager engine
    if method == "breadcrumbs":
        return not params.get("normalize", False) and params.get("band", "row") == "row"
    return params.get("variant", "official") == "official"


def resolve(mode: str, entries: int, method: str | None = None, params: dict | None = None) -> bool:
    """Whether a merge of ``entries`` task-vector entries (n * D) by ``method`` with ``params`` runs
    the fused loops."""
    checks.check_choice("fused", mode, MODES)
    params = params or {}
    if method in C_METHODS and (c_problem := native.problem()) is not None:  # (no build for other methods)
        return _unavailable(mode, f"its C loops do not build here ({c_problem})")
    if method is not None and not has_loops(method, params):
        return False  # nothing to compile: not even the probe (seconds of inductor start-up per process)
    if mode == "off":
        return False
    if method is not None and has_c_loops(method, params):
        return True
    if mode == "auto" and entries < AUTO_MIN_ENTRIES_BY_METHOD.get(method, AUTO_MIN_ENTRIES):
        return False
    problem = _probe()
    return True if problem is None else _unavailable(mode, f"torch.compile cannot build CPU code here ({problem})")


def _unavailable(mode: str, why: str) -> bool:
    """No fused loops: "on" raises, "auto" warns and takes the eager engine, "off" takes it silently."""
    if mode == "on":
        raise FusedUnavailable(f"fused='on' but {why}; use fused='off' or 'auto'")
    if mode == "auto":
        warnings.warn(f"pcb_fast: fused CPU loops unavailable ({why}); using the eager engine", stacklevel=3)
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


def applies(options) -> bool:
    """Whether a run with these ``options`` (core/options.py) runs the fused loops (chosen, and a single process)."""
    return options.fused and options.comm is None


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
    """|tau| of each task of a block (float32 task vectors or raw slices, see native.ties_block) around
    its bracket [floor, ceiling] ([n, 1] each): (max |tau|
    per task, NaN propagating; [3, n] int64 counts of |tau| > ceiling, == ceiling and == floor; a
    list of n tensors, each task's |tau| strictly inside its bracket in position order)."""
    return native.bracket(tv, floor, ceiling)


def equal_counts(tv, t):
    """[n] entries of each task with |tau| == t ([n, 1])."""
    return native.equal_counts(tv, t)


def ties_block(tv, t, cut, lam, fill, divide):
    """TIES on a block (native.ties_block: the eager values bit for bit)."""
    return native.ties_block(tv, t, cut, lam, fill, bool(divide))


def dare_ties_block(tv, segment, lo: int, p, seed: int, rescale: str, factors, lam, fill, divide):
    """DARE-TIES on the block of ``segment`` from entry ``lo`` on (``tv``: its float32 task vectors or raw
    slices, see native.ties_block; drop probability ``p``, one or a list; ``rescale`` "inverse", or
    "l1" with the [n, 1] ``factors``, or "none"): native.dare_ties_block's election and mean, kept
    entries and max |tau| per task."""
    n = tv.shape[0] if isinstance(tv, torch.Tensor) else len(tv) - 1
    return native.dare_ties_block(tv, _drop(n, segment.key, lo, p, seed, rescale, factors), lam, fill, bool(divide))


def dare_sum(block, p, seed: int, rescale: str, factors, lam):
    """DARE then task arithmetic on a block (options as :func:`dare_ties_block`): (sum over tasks,
    kept per task, max |tau| per task)."""
    return native.dare_sum(block.tv, _drop(block.tv.shape[0], block.segment.key, block.lo, p, seed, rescale, factors),
                           lam)


@functools.lru_cache(maxsize=4096)
def _streams(seed: int, n: int, key: str) -> tuple:
    """Each task's stream constant for ``key`` and its mix32 (pcb_fast.core.rng)."""
    streams = [rng.stream_constant(seed, i, key) for i in range(n)]
    return streams, [rng.mix32(h) for h in streams]


def _drop(n: int, key: str, lo: int, p, seed: int, rescale: str, factors) -> tuple:
    """The drop of a block of ``n`` tasks (entries of ``key`` from ``lo`` on) for native.dare_sum /
    dare_ties_block: the eager drop's operations (rescale "inverse": divided by float32(1 - p_i);
    "l1": multiplied by the factors; "none": by 1)."""
    ps = p if isinstance(p, list) else [p] * n
    streams, highs = _streams(seed, n, key)
    if rescale == "inverse":
        scales, multiply = [1 - x for x in ps], False
    else:
        scales, multiply = (factors if rescale == "l1" else [1.0] * n), True
    return streams, highs, [rng.keep_threshold(x) for x in ps], lo, scales, multiply


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
