"""TIES-Merging and DARE-TIES on the streaming engine.

Yadav et al., "TIES-Merging: Resolving Interference When Merging Models", NeurIPS 2023. As the
authors' code: per task keep |tau_i| >= kthvalue(|tau_i|, D - int(D * density)) (global over the
model by default), elect the sign of the sum of the trimmed vectors per position, give zero-sum
positions the majority elected sign of the whole model, and average the entries that agree.
mergekit's habits are options: ``scope="tensor"``, ``sign_ties="positive"`` (zero sum -> +1),
``topk="exact"`` (exactly int(D * density) entries; ties at the threshold by position).

Passes: |tau| with a column sample; the collection of the entries above the sampled floor (exact
threshold as in PCB); then two sweeps over the collected entries, block by block: the elected
signs and their whole-model sum, then the disjoint mean. When the collected entries would not fit
the source's memory budget, the threshold comes from two radix-select passes and the two sweeps
read the task vectors again, as DARE-TIES does: it replaces the trim by DARE's random drop and makes
two passes over the task vectors (signs, then the mean).

With fused CPU loops (``options.fused``, pcb_fast.cpu.fused) both take another route that collects
nothing: the threshold from counts around a sampled bracket, then a single sweep that trims (or
drops), elects and merges each block; the entries whose value depends on the whole model's
majority sign (known at the end) are patched where it was guessed wrong.
"""

from __future__ import annotations

import torch

from ..core import checks
from ..core.engine import (ColumnSample, raise_if_not_finite, select_in_bracket, select_threshold, selection_passes,
                           sum_kept)
from ..core.options import add_passes, plan_passes
from ..core.formulas import disjoint_mean, elected_signs, lambda_column, sum_over_tasks, zero_sign_fill
from ..core.sinks import PATCH_BYTES, PatchRoom, as_sink
from ..core.sources import DEFAULT_BLOCK_WIDTH, Block
from ..cpu import fused as fused_cpu
from .linear import (BAND_PARAMS, DARE, DARE_PARAMS, breadcrumbs_blocks, check_band_params, check_bands, dare_block,
                     dare_keep, dare_options, dare_packs, dare_weighted, pack_index, sorted_in_tensors, values_at)
from .pcb import sweep_inputs, sweep_task_vectors
from .spec import MethodSpec, Param, choice, flag

SIGN_TIES = ("majority", "positive")
TOPK = ("threshold", "exact")


def check_density(density) -> float:
    d = checks.as_float("density", density)
    if not (0.0 < d <= 1.0):
        raise ValueError(f"density={checks.short(density)} is out of range; valid: 0 < density <= 1 (the fraction kept)")
    return d


def check_densities(density, n: int):
    """One density for every task (a float), or one per task (a list of n floats: per-model density)."""
    return checks.check_per_task("density", density, n, check_density)


def check_min_keep(min_keep) -> int:
    if isinstance(min_keep, bool) or not isinstance(min_keep, int) or min_keep < 0:
        raise ValueError(f"min_keep={checks.short(min_keep)} must be a non-negative integer (mergekit keeps at least 1)")
    return min_keep


def keep_counts(D: int, density, min_keep: int, n: int) -> torch.Tensor:
    """[n] int64 entries each task keeps: int(D * density_i), at least ``min_keep`` (at most D)."""
    densities = density if isinstance(density, list) else [density] * n
    return torch.tensor([min(D, max(min_keep, int(D * d))) for d in densities], dtype=torch.int64)


class Trim:
    """The TIES trim of a source: construction runs the passes that find each task's threshold (the
    NaN/Inf check and column sample, then :func:`select_threshold`); then either
    :meth:`collected_blocks` yields (Collected block, task of each entry, kept mask of its entries),
    or, when the collected entries would not fit the source's memory budget (:attr:`dense`),
    :meth:`dense_blocks` yields (block, kept mask [n, m]) on every sweep over the task vectors.
    ``sweeps``: what the caller's sweeps over :meth:`dense_blocks` do (announced with the trim's passes).
    """

    def __init__(self, source, options, density, topk: str, block_width: int, min_keep: int = 0,
                 sweeps: tuple = ("signs", "merge")):
        self.source, self.options, self.topk, self.block_width = source, options, topk, block_width
        n, D = source.n, source.D
        # [n] entries kept per task: int(D * density_i) (a density per task, or one for all)
        self.keep = keep_counts(D, density, min_keep, n)
        self._buffer = torch.empty(n * block_width)
        sample = ColumnSample(D, n)
        # "threshold": t = sort(|tau|)[D - keep - 1], keep >= t; "exact": t = sort(|tau|)[D - keep], keep > t
        # plus the first entries equal to t (by position) up to exactly `keep`.
        ranks = D - self.keep - 1 if topk == "threshold" else D - self.keep
        self.collected = None
        self._tie_budget = None  # topk="exact" over the budget: entries equal to t each task still keeps
        # every entry kept (True), none (False: exact top-0), or a threshold to find (None)
        self.everything = True if bool((ranks < 0).all()) else False if bool((ranks >= D).all()) else None
        if self.everything is None:
            # A task keeping everything (rank -1: t = min, all >= t) or, exactly, nothing (rank D:
            # t = max, no entry above it and no tie budget) among others: clamping gives the same.
            ranks = ranks.clamp(0, D - 1)
            then = ("tie counts", *sweeps) if topk == "exact" else sweeps  # (the sweeps where nothing is collected)
            plan_passes(options, "sample", *selection_passes(source, options, ranks, sample.columns, then))
        else:
            plan_passes(options, "sample", *sweeps)
        for block in source.blocks(block_width, options=options):  # NaN/Inf check and column sample
            raise_if_not_finite(source, options, block, self._magnitude(block.tv).amax(1))
            sample.add(block)
        if self.everything is None:
            sample_scores = sample.scores(lambda tv: self._magnitude(tv).clone())
            self.t, _, self.collected, self.at_or_above = select_threshold(
                source, options, self._magnitude_blocks, ranks, sample_scores, keep_ties=True)

    @property
    def dense(self) -> bool:
        """True when the sweeps read the task vectors again (nothing was collected)."""
        return self.collected is None

    def _magnitude(self, tv: torch.Tensor) -> torch.Tensor:
        return torch.abs(tv, out=self._buffer[: tv.numel()].view(tv.shape))

    def _magnitude_blocks(self):
        for block in self.source.blocks(self.block_width, options=self.options):
            yield block, self._magnitude(block.tv)

    def dense_blocks(self):
        """(block, kept mask [n, m]) for every block of the source (one pass)."""
        if self.everything is not None:
            for block in self.source.blocks(self.block_width, options=self.options):
                yield block, torch.full(block.tv.shape, self.everything, dtype=torch.bool)
            return
        column = self.t.unsqueeze(1)
        budget = None
        if self.topk == "exact":  # ties at t are kept by position: after those of the ranks before this one
            if self._tie_budget is None:  # counted once, for every sweep
                equal = _equal_counts(self._magnitude_blocks, column)
                comm = self.options.comm
                if comm is not None:
                    before = comm.before_me(equal.clone())
                    equal = comm.sum_(equal.clone())
                    self._tie_budget = self.keep - (self.at_or_above - equal) - before
                else:
                    self._tie_budget = self.keep - (self.at_or_above - equal)
            budget = self._tie_budget.clone()
        for block, magnitude in self._magnitude_blocks():
            if budget is None:
                yield block, magnitude >= column
                continue
            equal = magnitude == column
            order = torch.cumsum(equal, dim=1)  # 1-based rank of each equal entry in the row so far
            kept = (magnitude > column) | (equal & (order <= budget.unsqueeze(1)))
            budget = budget - (equal & kept).sum(1)
            yield block, kept

    def collected_blocks(self):
        """(Collected block, task of each entry, kept mask of its entries) for every collected block."""
        t, n = self.t, self.source.n
        if self.topk == "threshold":
            for c in self.collected:
                task = c.task()
                yield c, task, c.score >= t[task]
            return
        above = torch.zeros(n, dtype=torch.int64)
        for c in self.collected:
            task = c.task()
            above += torch.bincount(task[c.score > t[task]], minlength=n)
        budget = self.keep - above  # entries equal to t still to keep, per task, in position order
        for c in self.collected:
            task = c.task()
            equal = c.score == t[task]
            # 1-based count of the equal entries of each task so far in this block (entries are task-major)
            order = torch.cat([torch.cumsum(part.long(), 0) for part in equal.split(c.counts())])
            kept = (c.score > t[task]) | (equal & (order <= budget[task]))
            budget -= torch.bincount(task[equal & kept], minlength=n)
            yield c, task, kept


def _equal_counts(score_blocks, column: torch.Tensor) -> torch.Tensor:
    """Entries of each task equal to its threshold (one pass)."""
    counts = torch.zeros(column.shape[0], dtype=torch.int64)
    for _, magnitude in score_blocks():
        counts += (magnitude == column).sum(1)
    return counts


def merge_ties(source, sink, options, *, density=0.2, sign_ties="majority", topk="threshold", normalize=True,
               min_keep=0, lambdas=None, block_width=DEFAULT_BLOCK_WIDTH):
    """TIES-Merging; ``sink`` receives tau_m block by block. Returns entries kept per task.

    ``density``: one for all tasks or a list with one per task (each task keeps its own count).
    ``normalize=False`` (mergekit's option): the sum of the agreeing entries instead of their mean.
    ``min_keep``: every task keeps at least this many entries (mergekit: 1).

    Both sweeps read only the collected entries (the kept ones and a thin margin below the
    threshold) and sum them per position in task order, the rounding of the literal formulation.
    Over the memory budget, both sweeps read the task vectors again instead (dense blocks).
    """
    density = check_densities(density, source.n)
    checks.check_choice("sign_ties", sign_ties, SIGN_TIES)
    checks.check_choice("topk", topk, TOPK)
    normalize, min_keep = checks.check_flag("normalize", normalize), check_min_keep(min_keep)
    lam = lambda_column(lambdas, source.n)
    block_width = source.block_width(block_width, options)
    if fused_cpu.applies(options):
        return _merge_ties_fused(source, options, sink, density, sign_ties, topk, lam, block_width, normalize, min_keep)
    kept_counts = torch.zeros(source.n, dtype=torch.int64)
    trim = Trim(source, options, density, topk, block_width, min_keep)
    if trim.dense:

        def weighted_blocks(first_sweep: bool):
            for block, kept in trim.dense_blocks():
                if first_sweep:
                    kept_counts.add_(kept.sum(1))
                value = block.tv * kept
                yield block.segment, block.lo, block.hi, value if lam is None else value * lam

        _elect_and_merge(weighted_blocks, sink, lam, sign_ties, options.comm, normalize)
        return kept_counts
    trimmed, sign_total = [], 0
    for c, task, kept in trim.collected_blocks():
        # Collected entries that are not kept count as zeros, as in the literal tau * mask: adding
        # them changes no sum and they never agree with a sign, so no compaction is needed.
        value = c.tau * kept if lam is None else c.tau * kept * lam[task, 0]
        kept_counts += torch.bincount(task[kept], minlength=source.n)
        sign = torch.sign(sum_kept(c, task, value)[0])
        sign_total += int(sign.sum())
        trimmed.append((c, task, value, sign))
    fill = zero_sign_fill(sign_total, sign_ties)
    for c, task, value, sign in trimmed:
        sign = torch.where(sign == 0, fill, sign)
        agree = torch.where(sign[c.flat - task * c.width] > 0, value > 0, value < 0)
        if not normalize:  # mergekit's normalize: false: the sum of the agreeing entries
            sink(c.segment, c.lo, c.hi, sum_kept(c, task, value * agree)[0])
            continue
        weight = agree.float() if lam is None else agree * lam[task, 0]
        num, den = sum_kept(c, task, value * agree, weight)
        den = torch.clamp(den, min=1) if lam is None else torch.where(den == 0, 1.0, den)
        sink(c.segment, c.lo, c.hi, num / den)
    return kept_counts


def merge_ties_tensors(source, sink, options, *, density=0.2, sign_ties="majority", topk="threshold", normalize=True,
                       min_keep=0, lambdas=None, block_width=DEFAULT_BLOCK_WIDTH):
    """:func:`merge_ties` with scope="tensor" on a pack of small whole tensors (``source``: one pack
    segment, core.engine.run's ``merge_tensors``): each tensor with its own thresholds and sign
    fill, from one read and a few torch ops over the whole pack. The values of merge_ties on each
    tensor alone, bit for bit: the same trim (the exact order statistic of each tensor's |tau|,
    found by one sort of (tensor, |tau|) keys; ties at it kept by position for topk="exact") and the
    same float32 operations, in the same order, as the C loop of ties_block."""
    n = source.n
    density = check_densities(density, n)
    checks.check_choice("sign_ties", sign_ties, SIGN_TIES)
    checks.check_choice("topk", topk, TOPK)
    normalize, min_keep = checks.check_flag("normalize", normalize), check_min_keep(min_keep)
    lam = fused_cpu.weights(lambda_column(lambdas, n), n)
    (pack,) = source.segments
    kept_counts = torch.zeros(n, dtype=torch.int64)
    for block in source.blocks(pack.numel, options=options):  # one block: the whole pack
        magnitude = block.tv.abs()
        raise_if_not_finite(source, options, block, magnitude.amax(1))
        parts = block.segment.parts
        lengths, starts, tensor = pack_index(parts)  # (tensor: each entry's)
        # entries kept per task and tensor, int(numel * density_i) within [min_keep, numel], as keep_counts
        densities = torch.tensor(density if isinstance(density, list) else [density] * n, dtype=torch.float64)
        keep = torch.minimum((lengths.double() * densities.unsqueeze(1)).long().clamp(min=min_keep), lengths)
        # t = sort(|tau|)[rank] per task and tensor, ranks clamped as the engine clamps them (merge_ties)
        rank = (lengths - keep - (1 if topk == "threshold" else 0)).clamp(min=0)
        rank = torch.minimum(rank, (lengths - 1).clamp(min=0))
        at = (starts + rank).clamp(max=block.tv.shape[1] - 1)
        t = values_at(sorted_in_tensors(magnitude, tensor), at)[:, tensor]
        if topk == "threshold":
            kept = magnitude >= t
        else:  # the entries above t, then those equal to it by position until the tensor keeps `keep`
            above, equal = magnitude > t, (magnitude == t).long()
            greater = torch.zeros_like(keep).index_add_(1, tensor, above.long())
            seen = equal.cumsum(1)
            before = (seen - equal).gather(1, starts.clamp(max=block.tv.shape[1] - 1).expand(n, -1))
            kept = above | (equal.bool() & (seen - before[:, tensor] <= (keep - greater)[:, tensor]))
        kept_counts += kept.sum(1)
        values = _elect_in_tensors((block.tv * kept) * lam, lam, tensor, len(parts), sign_ties, normalize)
        sink(block.segment, block.lo, block.hi, values)
    return kept_counts


def _elect_in_tensors(weighted, lam, tensor, count: int, sign_ties: str, normalize: bool) -> torch.Tensor:
    """TIES' election and disjoint mean (or sum) of the weighted entries [n, m] of a pack of ``count``
    tensors (``tensor``: each entry's), a tensor's majority sign filling its zero sums: the float32
    operations of the C loop (native.ties_block), in its order."""
    total = sum_over_tasks(weighted)
    if sign_ties == "majority":  # each tensor's majority elected sign
        signs = torch.zeros(count, dtype=torch.int64).index_add_(0, tensor, (total > 0).long() - (total < 0).long())
        fill = torch.sign(signs.float())[tensor]
    else:
        fill = torch.ones(())
    return _agreeing_mean(weighted, lam, total, fill, normalize)


def _elect(weighted, lam, total, fill, normalize: bool) -> tuple:
    """TIES' election and disjoint mean (or sum) of weighted entries [n, m] whose sum over tasks is
    ``total``, a [] ``fill`` filling the zero sums, and what the C loop (native.ties_block) returns
    beside the values: the sum of the elected signs, the undecided positions (zero sum, some entry
    non-zero; ascending int32) and their values under the other fill (-1 for a positive fill, else +1)."""
    undecided = ((total == 0) & (weighted.abs().amax(0) > 0)).nonzero().flatten()
    other = torch.tensor(-1.0 if bool(fill > 0) else 1.0)
    others = _agreeing_mean(weighted[:, undecided], lam, total[undecided], other, normalize)
    signs = int((total > 0).sum()) - int((total < 0).sum())
    return _agreeing_mean(weighted, lam, total, fill, normalize), signs, undecided.to(torch.int32), others


def _agreeing_mean(weighted, lam, total, fill, normalize: bool) -> torch.Tensor:
    """The mean (or, without ``normalize``, sum) of the weighted entries [n, m] that agree with the sign
    of ``total`` (``fill``, one or one per entry, where it is 0; a zero fill elects as -1 does): the
    float32 operations of the C loop (native.ties_block), in its order."""
    elected = torch.where(total > 0, 1.0, torch.where(total < 0, -1.0, fill))
    agree = torch.where(elected > 0, weighted > 0, weighted < 0).float()
    num, den = weighted[0] * agree[0], agree[0] * lam[0]
    for i in range(1, weighted.shape[0]):
        num = num + weighted[i] * agree[i]
        den = den + agree[i] * lam[i]
    return num / torch.where(den == 0, 1.0, den) if normalize else num


def merge_dare_ties_tensors(source, sink, options, *, p=0.9, seed=0, sign_ties="majority", rescale="inverse",
                            normalize=True, lambdas=None, block_width=DEFAULT_BLOCK_WIDTH):
    """:func:`merge_dare_ties` with scope="tensor" on a pack of small whole tensors (core.engine.run's
    ``merge_tensors``): each entry's drop from its own key's stream (pcb_fast.core.rng), each
    tensor's L1 factors (summed per tensor as l1_factors sums one) and majority sign, then the
    float32 operations of the C loop (native.dare_ties_block), in its order: the values of
    merge_dare_ties on each tensor alone, bit for bit."""
    n = source.n
    checks.check_choice("sign_ties", sign_ties, SIGN_TIES)
    normalize = checks.check_flag("normalize", normalize)
    lam = fused_cpu.weights(lambda_column(lambdas, n), n)
    kept_counts = torch.zeros(n, dtype=torch.int64)
    for block, weighted, keep, tensor in dare_packs(source, options, p, seed, rescale, lam):
        kept_counts += keep.sum(1)
        values = _elect_in_tensors(weighted, lam, tensor, len(block.segment.parts), sign_ties, normalize)
        sink(block.segment, block.lo, block.hi, values)
    return kept_counts


ALL_TIES = 1 << 62  # a cut past every position: every entry equal to the threshold is kept


def _merge_ties_fused(source, options, sink, density, sign_ties, topk, lam, block_width, normalize=True, min_keep=0):
    """TIES with compiled block loops (pcb_fast.cpu.fused): the column sample (read in place from
    in-memory sources, else one pass); one pass counting |tau| around the sampled bracket, with the
    NaN check (the exact threshold comes from the few entries inside the bracket, and for
    topk="exact" the entries equal to it per block from the same counts); then one sweep that
    trims, elects and merges. Nothing is collected but the entries inside the bracket (about 1%)."""
    n, D = source.n, source.D
    keep = keep_counts(D, density, min_keep, n)
    lam = fused_cpu.weights(lam, n)
    ranks = D - keep - 1 if topk == "threshold" else D - keep
    edge = bool((ranks < 0).all()) or bool((ranks >= D).all())
    guess = None
    if edge:  # every entry kept (t below them all), or none (exact top-0)
        everything = bool((ranks < 0).all())
        plan_passes(options, "check", "merge")
        for block in source.blocks(block_width, options=options):
            raise_if_not_finite(source, options, block, block.tv.abs().amax(1))
        t = torch.full((n, 1), float("-inf") if everything else float("inf"))
        greater = kept = torch.full((n,), D if everything else 0)
    else:
        rank = ranks.clamp(0, D - 1)  # a task keeping all or (exactly) none among others: see Trim
        sample = ColumnSample(D, n)
        taken = sample.take_without_pass(source)
        plan_passes(options, *([] if taken else ["sample"]), "bracket", "merge")
        if not taken:
            for segment, lo, hi, inputs in sweep_inputs(source, options, block_width):
                sample.add_inputs(segment, lo, inputs)

        last_pass = []  # the bracket and, per block, the counts and inside values of the latest pass

        def bracket_pass(floor, ceiling):
            counts = torch.zeros(3, n, dtype=torch.int64)
            inside = [[] for _ in range(n)]
            last_pass[:] = [(floor.clone(), ceiling.clone())]
            for segment, lo, hi, inputs in sweep_inputs(source, options, block_width):
                row_max, block_counts, values = fused_cpu.bracket_inside(inputs, floor.unsqueeze(1),
                                                                         ceiling.unsqueeze(1))
                _check_finite(source, options, segment, lo, hi, inputs, row_max)
                counts += block_counts
                for i, part in enumerate(values):
                    inside[i].append(part)
                last_pass.append((block_counts, values))
            return counts[0], counts[1], counts[2], [torch.cat(parts) for parts in inside]

        t, greater, at_least = select_in_bracket(n, D, rank, sample.scores(torch.abs), bracket_pass, options)
        t = t.unsqueeze(1)
        kept = at_least if topk == "threshold" else keep.clone()
        guess = guess_fill(torch.cat(sample.parts, dim=1) if sample.parts else torch.zeros(n, 0), t, lam, sign_ties)
    # topk="exact": the entries equal to t are kept by position, from the counts of the bracket pass
    cuts = None if topk == "threshold" or edge else _exact_cuts(_equal_per_block(last_pass, t[:, 0]), keep - greater)
    every = torch.full((n, 1), ALL_TIES)

    divide = torch.tensor(1.0 if normalize else 0.0)

    def merge_block(number, segment, lo, inputs, fill):
        return fused_cpu.ties_block(inputs, t, every if cuts is None else cuts(number, inputs, t), lam, fill, divide)

    sweep_with_fill(source, options, sink, merge_block, sign_ties, block_width, guess)
    return kept


def _task_row(inputs, i: int) -> torch.Tensor:
    """Task ``i``'s float32 tau of a block's ``inputs`` (its task vectors, or raw slices of
    methods.pcb.sweep_inputs: formed with the bits of the sources' blocks)."""
    if isinstance(inputs, torch.Tensor):
        return inputs[i]
    return inputs[1 + i].float() - inputs[0].float()


def _check_finite(source, options, segment, lo: int, hi: int, inputs, row_max: torch.Tensor) -> None:
    """raise_if_not_finite for a block of :func:`methods.pcb.sweep_inputs` (its task vectors formed
    only where some value is not finite, to say where)."""
    if bool(torch.isfinite(row_max).all()):
        return
    raise_if_not_finite(source, options, Block(segment, lo, hi, sweep_task_vectors(inputs)), row_max)


def sweep_with_fill(source, options, sink, merge_block, sign_ties: str, block_width: int, guess=None) -> None:
    """One sweep of TIES' election and disjoint mean. ``merge_block(number, segment, lo, inputs, fill)``
    returns (values, sum of the elected signs, undecided positions, their values under the other
    fill) for block ``number`` (entries of ``segment`` from ``lo`` on; ``inputs``: its task vectors or
    raw slices, methods.pcb.sweep_inputs) and a zero-sum sign ``fill``: the undecided positions (zero
    sum, some entry non-zero: exact cancellations, common with bf16 weights) are the only ones whose
    value depends on the fill. The fill is the
    whole model's majority sign (``sign_ties="majority"``), known only after the sweep, or +1
    (mergekit). Every block is merged with ``guess`` (a [] tensor; +1 without one) and sunk at once,
    with its values under the other fill where the sink takes them (``Sink.patchable``, within the
    memory budget); where the model's fill turns out otherwise, those are patched in, and the
    blocks whose values could not be held are read (those only), merged and sunk again (a sink may
    then receive such a block twice: the second values count)."""
    sink = as_sink(sink)
    guess = torch.ones(()) if guess is None else guess
    sign_total, patches, merge_again, room = 0, [], [], PatchRoom()
    budget = options.memory_budget
    patchable = sink.patchable if sign_ties == "majority" else None  # (else the fill is +1, known: no patch)
    for number, (segment, lo, hi, inputs) in enumerate(sweep_inputs(source, options, block_width)):
        values, signs, positions, others = merge_block(number, segment, lo, inputs, guess)
        sign_total += int(signs)
        cost = positions.numel() * PATCH_BYTES
        if cost and patchable is not None and (budget is None or room.nbytes + cost <= budget):
            patches.append(patchable(segment, lo, hi, values, positions, others, room))
            continue
        if cost:
            merge_again.append(number)
        sink(segment, lo, hi, values)
    fill = zero_sign_fill(sign_total, sign_ties)
    if bool(fill > 0) == bool(guess > 0):  # (a zero fill elects as -1 does: the negative entries agree)
        return
    for patch in patches:
        patch()
    if merge_again:
        add_passes(options, "merge", why="sign of zero sums guessed wrong, re-merging undecided blocks")
        for number, block in zip(merge_again, source.blocks(block_width, options=options, only=merge_again)):
            sink(block.segment, block.lo, block.hi, merge_block(number, block.segment, block.lo, block.tv, fill)[0])


def guess_fill(columns: torch.Tensor, t: torch.Tensor, lam: torch.Tensor, sign_ties: str) -> torch.Tensor:
    """The zero-sum fill TIES will most likely find, from a column sample [n, s] of the task vectors
    and the thresholds t [n, 1]: the sign of the sample's elected signs summed (+1 for mergekit's
    rule, or when the sample says nothing). A guess only: :func:`sweep_with_fill` checks it."""
    if sign_ties != "majority" or columns.numel() == 0:
        return torch.ones(())
    total = elected_signs(columns * (columns.abs() >= t) * lam).sum()
    return torch.sign(total) if bool(total != 0) else torch.ones(())


def _equal_per_block(last_pass: list, t: torch.Tensor) -> list:
    """[n] entries equal to t in each block, from the bracket pass that found t: its count at a bound
    when t is one, else the inside values equal to it."""
    (floor, ceiling), *blocks = last_pass
    equal = []
    for counts, inside in blocks:
        at = torch.stack([(part == value).sum() for part, value in zip(inside, t.tolist())])
        equal.append(torch.where(t == ceiling, counts[1], torch.where(t == floor, counts[2], at)))
    return equal


def _exact_cuts(equal_per_block: list, budget: torch.Tensor):
    """topk="exact": ``cut(number, inputs, t)``, the [n, 1] position in block ``number`` below which the
    entries equal to t are kept, so that each task keeps ``budget`` of them, the first by position
    (from the counts per block; the block where a task's budget runs out is searched when merged)."""
    budget = budget.clone()
    plans = []
    for equal in equal_per_block:
        cut = torch.where(budget >= equal, ALL_TIES, 0).unsqueeze(1)
        partial = [(i, int(budget[i])) for i in ((budget > 0) & (budget < equal)).nonzero().flatten().tolist()]
        budget -= torch.minimum(budget, equal)
        plans.append((cut, partial))

    def cut_of(number: int, inputs, t: torch.Tensor):
        cut, partial = plans[number]
        if partial:
            cut = cut.clone()
            for i, left in partial:
                positions = (_task_row(inputs, i).abs() == t[i]).nonzero().flatten()
                cut[i, 0] = int(positions[left - 1]) + 1
        return cut

    return cut_of


def merge_dare_ties(source, sink, options, *, p=0.9, seed=0, sign_ties="majority", rescale="inverse", normalize=True,
                    lambdas=None, block_width=DEFAULT_BLOCK_WIDTH):
    """DARE-TIES (Yu et al. 2024 with Yadav et al. 2023): DARE's random drop and rescale, then TIES'
    sign election and disjoint mean (the drop replaces TIES' magnitude trim, as in mergekit).

    mergekit's options: ``p`` per task, ``rescale`` ("l1" or "none", see
    :func:`pcb_fast.methods.linear.merge_dare`), ``normalize=False`` (the sum of the agreeing entries,
    mergekit's default for dare_ties, instead of their mean)."""
    checks.check_choice("sign_ties", sign_ties, SIGN_TIES)
    normalize = checks.check_flag("normalize", normalize)
    lam = lambda_column(lambdas, source.n)
    fused = fused_cpu.applies(options) and fused_cpu.has_loops("dare_ties", dict(p=p, rescale=rescale))
    plan_passes(options, *(["l1 norms"] if rescale == "l1" else []), *(["merge"] if fused else ["signs", "merge"]))
    p, seed, rescale, factors = dare_options(source, options, p, seed, rescale, block_width)
    if fused:
        return _merge_dare_ties_fused(source, options, sink, p, seed, rescale, factors, sign_ties, lam, block_width,
                                      normalize)
    kept_counts = torch.zeros(source.n, dtype=torch.int64)

    def weighted_blocks(first_sweep: bool):
        for block in source.blocks(block_width, options=options):
            dropped, keep = dare_block(block, p, seed, rescale, factors)
            if first_sweep:  # the NaN/Inf check and the counts need one sweep only
                raise_if_not_finite(source, options, block, block.tv.abs().amax(1))
                kept_counts.add_(keep.sum(1))
            yield block.segment, block.lo, block.hi, dropped if lam is None else dropped * lam

    _elect_and_merge(weighted_blocks, sink, lam, sign_ties, options.comm, normalize)
    return kept_counts


def merge_breadcrumbs_ties(source, sink, options, *, gamma=0.01, beta=0.1, band="row", sign_ties="majority",
                           normalize=True, lambdas=None, block_width=DEFAULT_BLOCK_WIDTH):
    """Breadcrumbs-TIES (mergekit's breadcrumbs_ties): Model Breadcrumbs' magnitude band
    (:func:`pcb_fast.methods.linear.merge_breadcrumbs`, per row or, ``band="tensor"``, per tensor)
    replaces TIES' trim, then TIES' sign election and disjoint mean (``normalize=False``: the sum
    of the agreeing entries, mergekit's default for this method)."""
    gamma, beta = check_bands(gamma, beta, band, source.n)
    checks.check_choice("sign_ties", sign_ties, SIGN_TIES)
    normalize = checks.check_flag("normalize", normalize)
    lam = lambda_column(lambdas, source.n)
    kept_counts = torch.zeros(source.n, dtype=torch.int64)
    plan_passes(options, "signs", "merge")

    def weighted_blocks(first_sweep: bool):
        for block, masked, mask in breadcrumbs_blocks(source, options, gamma, beta, band, block_width):
            if first_sweep:
                raise_if_not_finite(source, options, block, block.tv.abs().amax(1))
                kept_counts.add_(mask.sum(1))
            yield block.segment, block.lo, block.hi, masked if lam is None else masked * lam

    _elect_and_merge(weighted_blocks, sink, lam, sign_ties, options.comm, normalize)
    return kept_counts


def _merge_dare_ties_fused(source, options, sink, p, seed, rescale, factors, sign_ties, lam, block_width,
                           normalize=True):
    """DARE-TIES with compiled block loops: the drop, the election, the mean and the NaN check in
    one sweep (the values of undecided positions patched where the fill guessed was wrong, see
    :func:`sweep_with_fill`)."""
    n = source.n
    lam = fused_cpu.weights(lam, n)
    kept_counts, counted = torch.zeros(n, dtype=torch.int64), set()
    divide = torch.tensor(1.0 if normalize else 0.0)

    def merge_block(number, segment, lo, inputs, fill):
        if segment.parts:  # a pack of small keys (global scope): their own streams, the loop's bits
            tv = sweep_task_vectors(inputs)
            block = Block(segment, lo, lo + tv.shape[1], tv)
            keep = dare_keep(block, p, seed)
            weighted = dare_weighted(block, keep, p, rescale, factors, lam)
            values, signs, positions, others = _elect(weighted, lam, sum_over_tasks(weighted), fill, normalize)
            kept, row_max = keep.sum(1), tv.abs().amax(1)
        else:
            values, signs, positions, others, kept, row_max = fused_cpu.dare_ties_block(
                inputs, segment, lo, p, seed, rescale, factors, lam, fill, divide)
        if number not in counted:  # a block merged again is counted once
            counted.add(number)
            _check_finite(source, options, segment, lo, lo + values.numel(), inputs, row_max)
            kept_counts.add_(kept)
        return values, signs, positions, others

    sweep_with_fill(source, options, sink, merge_block, sign_ties, block_width)
    return kept_counts


def _elect_and_merge(weighted_blocks, sink, lam, sign_ties: str, comm=None, normalize: bool = True) -> None:
    """Two sweeps over dense [n, m] blocks: the whole-model sum of the elected signs, then the
    disjoint mean (or, without ``normalize``, sum) per block (the literal formulation's functions,
    block by block)."""
    sign_total = torch.zeros((), dtype=torch.int64)
    for *_, weighted in weighted_blocks(True):
        sign_total += elected_signs(weighted).sum().long()
    if comm is not None:
        comm.sum_(sign_total)
    fill = zero_sign_fill(int(sign_total), sign_ties)
    for segment, lo, hi, weighted in weighted_blocks(False):
        sink(segment, lo, hi, disjoint_mean(weighted, elected_signs(weighted), fill, lam, normalize))


SIGN_TIES_PARAM = Param("sign_ties", "majority", choice("sign_ties", SIGN_TIES),
                        "the sign of a zero sum: majority (the authors') or positive (mergekit's)", kind="choice")


def _normalize(default: bool) -> Param:
    return Param("normalize", default, flag("normalize"),
                 "the mean of the agreeing entries (true) or their sum (false)", engine_only=True, kind="bool",
                 flag=False)


TIES = MethodSpec(
    name="ties", merge=merge_ties, summary="TIES",
    citation="Yadav et al., TIES-Merging, NeurIPS 2023", url="https://arxiv.org/abs/2306.01708",
    params=(Param("density", 0.2, check_density, "kept fraction per task", per_model=True), SIGN_TIES_PARAM,
            Param("topk", "threshold", choice("topk", TOPK),
                  "threshold (the authors' kthvalue) or exact (mergekit's count)", kind="choice"),
            _normalize(True),
            Param("min_keep", 0, check_min_keep, "entries every task keeps at least (mergekit: 1)", engine_only=True,
                  kind="int", flag=False)),
    merge_tensors=merge_ties_tensors, backends=("torch", "triton", "reference"), loops=("c",), mergekit="ties",
    mergekit_defaults={"scope": "tensor", "density": 1.0, "sign_ties": "positive", "topk": "exact", "min_keep": 1,
                       "normalize": True},
    searchable=True, packable=lambda params: True)
DARE_TIES = MethodSpec(
    name="dare_ties", merge=merge_dare_ties, summary="DARE TIES",
    citation="Yu et al., Language Models are Super Mario, ICML 2024", url="https://arxiv.org/abs/2311.03099",
    params=DARE_PARAMS + (SIGN_TIES_PARAM, _normalize(True)), merge_tensors=merge_dare_ties_tensors,
    packable=DARE.packable,  # (as DARE's: each entry's drop from its key's stream)
    backends=("torch", "triton", "reference"), loops=("c",), mergekit="dare_ties",
    mergekit_defaults={"scope": "tensor", "density": 1.0, "sign_ties": "positive", "rescale": "l1",
                       "normalize": False})
BREADCRUMBS_TIES = MethodSpec(
    name="breadcrumbs_ties", merge=merge_breadcrumbs_ties, summary="Model Breadcrumbs with TIES",
    citation="Davari & Belilovsky, Model Breadcrumbs, ECCV 2024", url="https://arxiv.org/abs/2312.06795",
    params=BAND_PARAMS + (SIGN_TIES_PARAM, _normalize(True)), check_together=check_band_params,
    mergekit="breadcrumbs_ties",
    mergekit_defaults={"scope": "tensor", "density": 1.0, "gamma": 0.01, "band": "tensor", "sign_ties": "positive",
                       "normalize": False})
