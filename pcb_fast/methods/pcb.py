"""PCB-Merging on the streaming engine.

Du et al., "Parameter Competition Balancing for Model Merging", NeurIPS 2024 (arXiv 2410.02396).
``variant="official"`` reproduces the authors' code (docs/design.md 2.2), ``variant="paper"`` the
paper's equations (docs/design.md 2.3); both with the defined edge cases of docs/design.md 2.4.

Passes of the official variant, each one read of the task vectors:
  1. |tau|: the exact clip bounds lo_i, hi_i (tail candidates for a small clip ratio, else level 1
     of a radix select, whose level 2 adds a pass), the NaN/Inf check, a sample of the columns;
  2. scores P, collecting every entry at or above a floor below the keep threshold; the floor
     comes from the sample's scores (else level 1 of the radix select over P, one more pass);
then the exact t_i, M_i from the collected scores, and the merge of the collected entries, block
by block. P is computed per block and never stored for the whole model. When the collected entries
would not fit the source's memory budget, t_i and M_i come from two radix-select passes over P and
a last pass recomputes P to merge (same values, bit for bit).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..core import checks
from ..core.engine import (ColumnSample, Collected, can_collect, dense_sums, each_key, entries, raise_if_not_finite,
                           select_in_bracket, select_threshold, selection_passes, task_ranks)
from ..core.options import plan_passes
from ..core.formulas import EXACT_EXP_MAX_N, clip_indices, keep_index, lambda_column, span_or_inf
from ..core.select import RadixSelect, TailSelect
from ..core.sources import DEFAULT_BLOCK_WIDTH, Block
from ..core.threads import one_thread
from ..cpu import fused as fused_cpu, native
from ..cpu import pcb_blocks as tb
from .linear import pack_index, sorted_in_tensors, values_at
from .spec import MethodSpec, Param, choice

def check_params(n: int, *, ratio=0.1, clamp_ratio=1e-4, inter="sum", variant="official", lambdas=None) -> dict:
    """Validated PCB parameters (ValueError naming the bad value and its valid range)."""
    return dict(
        ratio=checks.check_ratio(ratio),
        clamp_ratio=checks.check_clamp_ratio(clamp_ratio),
        inter=checks.check_choice("inter", inter, checks.INTER_CHOICES),
        variant=checks.check_choice("variant", variant, checks.VARIANT_CHOICES),
        lambdas=checks.check_lambdas(lambdas, n),
    )


def merge_pcb(source, sink, options, *, ratio=0.1, clamp_ratio=1e-4, inter="sum", variant="official", lambdas=None,
              block_width=DEFAULT_BLOCK_WIDTH, record=None, reuse: dict | None = None) -> torch.Tensor:
    """Merge the task vectors of ``source`` with PCB; ``sink`` receives the merged tau_m block by block.

    Returns the number of entries each task kept (scale > 0).

    For the coefficient search (pcb_fast.search): ``record(segment, lo, hi, task, pos, value, den)``
    receives, per block, every entry with a positive weight (its task, position in the block and
    weighted value before lambda_i) and the block's divisor, so that tau_m = sum_i lambda_i value_i
    / den can be recomputed for new lambda_i with the same rounding. ``reuse`` is a dict that keeps
    the statistics that do not depend on ``ratio`` (clip bounds or pair statistics, and the column
    sample) between calls on the same source.
    """
    params = check_params(source.n, ratio=ratio, clamp_ratio=clamp_ratio, inter=inter, variant=variant, lambdas=lambdas)
    sweep_width = source.block_width(c_sweep_width(source.n, block_width), options)
    block_width = source.block_width(block_width, options)
    if params["variant"] == "official":
        # the compiled loops (within a tolerance) only where these options have no C sweeps: where
        # they have but cannot take this merge (more than 80 tasks), the eager path (the same bits)
        if fused_cpu.applies(options) and record is None and not fused_cpu.has_c_loops("pcb", params):
            return _merge_official_fused(source, options, sink, params, block_width, reuse)
        return _merge_official(source, options, sink, params, block_width, record, reuse, sweep_width)
    return _merge_paper(source, options, sink, params, block_width, record, reuse)


C_SWEEP_ENTRIES = 1 << 21  # entries of all tasks per block of PCB's C sweeps at the default width


def c_sweep_width(n: int, block_width: int) -> int:
    """The block width of PCB's C sweeps: ``block_width``, or where it is the default, blocks of about
    C_SWEEP_ENTRIES entries (wider for few tasks: the sweeps form no float32 block, and a block's fixed
    cost, its reads and calls, is paid fewer times; docs/design.md 3.5)."""
    if block_width != DEFAULT_BLOCK_WIDTH:
        return block_width
    return max(block_width, C_SWEEP_ENTRIES // max(n, 1))


def merge_pcb_tensors(source, sink, options, *, ratio=0.1, clamp_ratio=1e-4, inter="sum", variant="official",
                      lambdas=None, block_width=DEFAULT_BLOCK_WIDTH) -> torch.Tensor:
    """:func:`merge_pcb` with scope="tensor" on a pack of small whole tensors (``source``: one pack
    segment, core.engine.run's ``merge_tensors``): each tensor with its own clip bounds, threshold
    and scale, from one read and a few torch ops over the whole pack. The values of merge_pcb on
    each tensor alone, bit for bit: the exact order statistics of each tensor (one sort of (tensor,
    value) keys per statistic) and the eager engine's float32 operations per entry, which its C
    sweeps repeat (a sum over tasks stays within a position). Each key is merged alone where
    merge_pcb would take other operations (the paper variant, whose sums run over a tensor's
    entries; compiled loops) or where a score is NaN (a sum over tasks beyond float32)."""
    params = check_params(source.n, ratio=ratio, clamp_ratio=clamp_ratio, inter=inter, variant=variant,
                          lambdas=lambdas)
    inter = params["inter"]
    alone = dict(params, block_width=block_width)
    if params["variant"] != "official" or (fused_cpu.applies(options) and not fused_cpu.has_c_loops("pcb", params)):
        return each_key(merge_pcb, source, sink, options, **alone)
    n = source.n
    lam = lambda_column(params["lambdas"], n)
    (pack,) = source.segments
    kept = torch.zeros(n, dtype=torch.int64)
    for block in source.blocks(pack.numel, options=options):  # one block: the whole pack
        tv = block.tv
        magnitude = tv.abs()
        raise_if_not_finite(source, options, block, magnitude.amax(1))
        lengths, starts, tensor = pack_index(block.segment.parts)
        # the ranks of each tensor, from its own length (the Python arithmetic of one tensor alone)
        sizes, which = torch.unique(lengths, return_inverse=True)
        ranks = torch.tensor([[*clip_indices(size, params["clamp_ratio"]), keep_index(size, params["ratio"]), size - 1]
                              for size in sizes.tolist()])[which] + starts.unsqueeze(1)  # [tensors, 4] positions

        def at(column: int) -> torch.Tensor:
            return ranks[:, column].expand(n, -1)

        order = sorted_in_tensors(magnitude, tensor)
        clip = tb.ClipStats.from_bounds(values_at(order, at(0)), values_at(order, at(1)))
        clip = clip.columns(tensor)
        scores = tb.official_scores(tv, clip, inter, tb.Workspace(n, tv.shape[1], 4 if inter == "pairwise" else 3))
        if bool(scores.isnan().any()):
            return kept + each_key(merge_pcb, source, sink, options, **alone)
        order = sorted_in_tensors(scores, tensor)
        t, peak = values_at(order, at(2)), values_at(order, at(3))
        # scale = (max(P, t) - t) / (M - t) (docs/design.md 2.2 step 6), as _merge_official's eager merge
        span = span_or_inf(peak - t)[:, tensor]
        t = t[:, tensor]
        kept += (scores > t).sum(1)
        scale = torch.clamp_min_(scores - t, 0).div_(span)
        value = tb.clipped_values(tv, clip.lo, clip.hi).mul_(scale)
        if lam is not None:
            value.mul_(lam)
        num, den = dense_sums(value, scale)
        sink(block.segment, block.lo, block.hi, num / torch.clamp(den, min=1e-12))
    return kept


def default_fused(entries: int, params: dict) -> dict:
    """The fused fields of core.options.RunOptions for a PCB merge of ``entries`` task-vector entries
    with merge's default, fused="auto" (its C sweeps where they build: the same bits)."""
    return fused_cpu.settings("auto", entries, "pcb", params)


def _reused(reuse: dict | None, key: tuple, compute):
    """compute() once per key when a ``reuse`` dict is given."""
    if reuse is None:
        return compute()
    if key not in reuse:
        reuse[key] = compute()
    return reuse[key]


def _record(record, e, weight, value, den) -> None:
    """Pass the entries of ``e`` with a positive weight to ``record``."""
    task, pos = e.index()
    keep = weight.reshape(-1) > 0
    record(e.segment, e.lo, e.hi, task[keep], pos[keep], value.reshape(-1)[keep], den)


def clip_bounds(source, options, clamp_ratio: float, block_width: int, sample: ColumnSample) -> tb.ClipStats:
    """Exact lo_i = sort(|tau_i|)[int(D a)], hi_i = sort(|tau_i|)[int(D (1 - a) - 1)].

    For a small clip ratio both ranks lie in the tails: one pass of :class:`TailSelect`. Otherwise
    two passes of radix select. The first pass also checks for NaN/Inf and fills ``sample``.
    """
    n, D = source.n, source.D
    i_lo, i_hi = clip_indices(D, clamp_ratio)
    tails = _in_tails(source, options, clamp_ratio)
    if tails and native.problem() is None:  # both tails, the check and the sample in one C sweep per block
        return _clip_bounds_c(source, options, block_width, sample, i_lo + 1, D - i_hi)
    ws = tb.Workspace(n, block_width, 1)
    selector = (TailSelect(n, i_lo, D - 1 - i_hi) if tails
                else RadixSelect(n, torch.tensor([[i_lo, i_hi]] * n), D, comm=options.comm))
    compiled = tails and fused_cpu.applies(options)  # |tau|'s extremes per run in one compiled loop
    for block in source.blocks(block_width, options=options):
        if compiled:
            raise_if_not_finite(source, options, block, block.tv.abs().amax(1))
            sample.add(block)
            n, m = block.tv.shape
            body = m - m % TailSelect.CHUNK
            runs = block.tv[:, :body].view(n, body // TailSelect.CHUNK, TailSelect.CHUNK)
            selector.update(block.tv, fused_cpu.magnitude_runs(runs) if body else None, absolute=True)
            continue
        magnitude = torch.abs(block.tv, out=ws.get(block.tv.shape[1])[0])
        raise_if_not_finite(source, options, block, magnitude.amax(1))
        sample.add(block)
        selector.update(magnitude) if tails else selector.count_high(magnitude)
    if not tails:
        selector.find_buckets()
        for block in source.blocks(block_width, options=options):
            selector.count_low(torch.abs(block.tv, out=ws.get(block.tv.shape[1])[0]))
    bounds = selector.values()
    return tb.ClipStats.from_bounds(bounds[:, 0], bounds[:, 1])


def _clip_bounds_c(source, options, block_width: int, sample: ColumnSample, k_low: int,
                   k_high: int) -> tb.ClipStats:
    """:func:`clip_bounds` where both ranks lie in the tails, in one C sweep per block
    (native.ClipTails: the k_low-th smallest and k_high-th largest |tau_i|, max |tau_i| for the
    NaN/Inf check, the sampled columns), from the raw slices where the source has them."""
    n = source.n
    tails = native.ClipTails(n, k_low, k_high)
    for segment, lo, hi, inputs in sweep_inputs(source, options, block_width):
        first = sample.first_column(segment.offset + lo)
        part = torch.empty(n, len(range(first, hi - lo, sample.stride)))
        row_max = tails.update(inputs, first, sample.stride, part)
        if not bool(torch.isfinite(row_max).all()):  # (the block's task vectors only to say where)
            raise_if_not_finite(source, options, Block(segment, lo, hi, sweep_task_vectors(inputs)), row_max)
        sample.parts.append(part)
    bounds = tails.values()
    return tb.ClipStats.from_bounds(bounds[:, 0], bounds[:, 1])


def sweep_task_vectors(inputs) -> torch.Tensor:
    """The float32 task vectors [n, m] of a block of :func:`sweep_inputs` (raw slices: the bits of torch.sub)."""
    if isinstance(inputs, torch.Tensor):
        return inputs
    base = inputs[0].float()
    return torch.stack([torch.sub(model.float(), base) for model in inputs[1:]])


def _in_tails(source, options, clamp_ratio: float) -> bool:
    """Whether :func:`clip_bounds` finds both ranks among tail candidates (one pass), not by radix select."""
    i_lo, i_hi = clip_indices(source.D, clamp_ratio)
    # tail candidates are local; a distributed merge sums histograms over ranks instead
    return max(i_lo + 1, source.D - i_hi) <= max(source.D // 64, 1) and options.comm is None


def clip_passes(source, options, clamp_ratio: float) -> list:
    """What the passes of :func:`clip_bounds` do."""
    return ["clip bounds"] if _in_tails(source, options, clamp_ratio) else ["clip histogram", "clip bounds"]


def _c_loops(source, options, params) -> bool:
    """Whether this merge takes the C sweeps of pcb_loops.c (the eager values bit for bit): fused loops
    chosen (:func:`pcb_fast.cpu.fused.applies`), the C library built, inter "sum" or "normalized_sum", and
    n up to EXACT_EXP_MAX_N (no shift inside exp)."""
    return fused_cpu.applies(options) and fused_cpu.has_c_loops("pcb", params) and source.n <= EXACT_EXP_MAX_N


def candidate_buffers(n: int, block_width: int) -> list:
    """The four output buffers of native.pcb_candidates for blocks of up to ``block_width`` columns."""
    return [torch.empty(n * block_width, dtype=torch.int32)] + [torch.empty(n * block_width) for _ in range(3)]


def sweep_inputs(source, options, block_width: int):
    """(segment, lo, hi, inputs) of every block of one pass, for the C sweeps: the raw slices [base,
    model_0, ...] where the source has them (files, state dicts) and the sweep takes their dtypes (it
    forms tau itself: no float32 block is written), else the block's float32 task vectors."""
    if not hasattr(source, "raw_blocks"):
        for block in source.blocks(block_width, options=options):
            yield block.segment, block.lo, block.hi, block.tv
        return
    buffer = None
    for segment, lo, hi, natives in source.raw_blocks(block_width, options=options):
        if native.raw_slices(natives):
            yield segment, lo, hi, natives
            continue
        # (float64 inputs: rounded to float32 first, then subtracted, as the sources' own blocks)
        if buffer is None or buffer.shape[1] < hi - lo:
            buffer = torch.empty(source.n, hi - lo)
        tv, base = buffer[:, : hi - lo], natives[0].float()
        for i, model in enumerate(natives[1:]):
            tv[i].copy_(model).sub_(base)
        yield segment, lo, hi, tv


def _collector(source, options, clip: tb.ClipStats, inter: str, block_width: int, out: list,
               with_tau: bool = True):
    """``collect_at(floor)`` for :func:`select_threshold`: one pass of the C candidate sweep
    (pcb_loops.c: the entries whose score may reach the floor, by a bound or an approximation against
    a wide margin, and the arguments of their exp and tanh), then torch's exp and tanh on those
    arguments (the eager scores exactly) and the entries whose score reaches the floor:
    :func:`collect_block`'s entries, bit for bit. ``out``: :func:`candidate_buffers`; without
    ``with_tau``, the entries come without their tau (:func:`collect_block_c`)."""

    def collect_at(floor):
        return [collect_block_c(segment, lo, hi, inputs, clip, inter, floor, out, with_tau)
                for segment, lo, hi, inputs in sweep_inputs(source, options, block_width)]

    return collect_at


def _bracket_counter(source, options, clip: tb.ClipStats, inter: str, block_width: int, out: list):
    """``count_blocks(floor, ceiling)`` for :func:`select_threshold` over the budget: every block's
    exact counts around the bracket (core.engine.bracket_counts) from the C candidate sweep, with
    torch's exp and tanh on its candidates (at a positive floor, every entry whose score may reach
    it; else those near the bracket or near a chunk's largest score). The max is exact where it
    reaches the floor, as in the pass that finds t (t >= floor), else only known to lie below it.
    ``out``: :func:`candidate_buffers`."""
    n = source.n

    def count_blocks(floor, ceiling):
        for _, _, _, inputs in sweep_inputs(source, options, block_width):
            above, at_ceiling, at_floor = (torch.zeros(n, dtype=torch.int64) for _ in range(3))
            peak = torch.full((n,), float("-inf"))
            counts, _, _, exp_arg, tanh_arg = native.pcb_candidates(inputs, clip.lo, clip.hi, clip.span, n,
                                                                    inter == "normalized_sum", floor, out, ceiling,
                                                                    above)
            score = exp_arg.exp_().mul_(tanh_arg.tanh_())  # intra * inter, as official_scores, in place
            inside = native.pcb_bracket_counts(counts, score, floor, ceiling, above, at_ceiling, at_floor, peak)
            yield above, at_ceiling, at_floor, inside, peak

    return count_blocks


def collect_block_c(segment, lo: int, hi: int, inputs, clip: tb.ClipStats, inter: str, floor: torch.Tensor,
                    out: list, with_tau: bool = True) -> Collected:
    """core.engine.collect_block of a block's official scores at ``floor``, through the C candidate sweep
    (``inputs``: the block's task vectors or raw slices, see :func:`sweep_inputs`; ``out``: the sweep's
    four buffers, see native.pcb_candidates); the same entries, bit for bit. Without ``with_tau``,
    their tau is left out (None): :func:`gather_tau` reads it again."""
    n = clip.lo.shape[0]
    counts, flat, tau, exp_arg, tanh_arg = native.pcb_candidates(inputs, clip.lo, clip.hi, clip.span, n,
                                                                 inter == "normalized_sum", floor, out)
    score = exp_arg.exp_().mul_(tanh_arg.tanh_())  # intra * inter, as official_scores, in place
    flat, score, tau = native.pcb_keep(counts, flat, score, tau, floor)
    return Collected(segment, lo, hi, n, flat.clone(), score.clone(), tau.clone() if with_tau else None,
                     counts.tolist())


def gather_tau(inputs, c: Collected) -> torch.Tensor:
    """tau of the entries of ``c`` (collected without it) from the block's ``inputs`` of :func:`sweep_inputs`:
    the values the collection would have held."""
    if isinstance(inputs, torch.Tensor):
        return torch.take(inputs, c.flat.long())
    return native.pcb_gather_tau(inputs, c.counts(), c.flat)


SCORES_ONLY_BYTES = 12  # per entry collected without its tau: int32 position, float32 score, and a score copy


def collects_scores_only(source, options, rank) -> bool:
    """Whether a merge over the budget collects its entries without their tau (read again by the
    merge pass from the inputs, in place of scoring every entry again): the collection does not fit
    the budget (core.engine.can_collect), its positions and scores do."""
    if options.comm is not None or options.memory_budget is None or can_collect(source, options, rank):
        return False
    entries = int((source.D - task_ranks(rank, source.n)).sum()) * 1.05 + source.n * 4096
    return entries * SCORES_ONLY_BYTES <= options.memory_budget


def _merge_official(source, options, sink, params, block_width, record=None, reuse=None, sweep_width=None):
    n, D = source.n, source.D
    in_c = _c_loops(source, options, params)
    width = (sweep_width or block_width) if in_c else block_width  # of the C sweeps' blocks (c_sweep_width)
    rank = keep_index(D, params["ratio"])
    # over the budget, where positions and scores fit it: collected without tau, read again to merge
    scores_only = in_c and record is None and collects_scores_only(source, options, rank)
    selecting = replace(options, memory_budget=None) if scores_only else options
    known = reuse is not None and ("clip", params["clamp_ratio"], block_width) in reuse
    plan_passes(options, *([] if known else clip_passes(source, options, params["clamp_ratio"])),
                *selection_passes(source, selecting, rank, ColumnSample(D, n).columns),
                *(["merge"] if scores_only else []))

    def statistics():
        sample = ColumnSample(D, n)
        return clip_bounds(source, options, params["clamp_ratio"], width, sample), sample

    clip, sample = _reused(reuse, ("clip", params["clamp_ratio"], block_width), statistics)
    ws = tb.Workspace(n, block_width, 4 if params["inter"] == "pairwise" else 3)
    # scored column by column: all sampled columns in one call (a workspace of their width)
    sample_scores = sample.scores(lambda tv: tb.official_scores(tv, clip, params["inter"], tb.Workspace(
        n, tv.shape[1], 4 if params["inter"] == "pairwise" else 3)), joined=True)

    def score_blocks():
        for block in source.blocks(block_width, options=options):
            yield block, tb.official_scores(block.tv, clip, params["inter"], ws)

    buffers = candidate_buffers(n, width) if in_c else None
    t, peak, collected, kept = select_threshold(
        source, selecting, score_blocks, rank, sample_scores,
        collect_at=(_collector(source, options, clip, params["inter"], width, buffers, not scores_only)
                    if in_c else None),
        count_blocks=_bracket_counter(source, options, clip, params["inter"], width, buffers) if in_c else None)
    lam = lambda_column(params["lambdas"], n)
    # scale = (max(P, t) - t) / (M - t) (docs/design.md 2.2 step 6); M == t means nothing is kept: scale 0.
    span = span_or_inf(peak - t)
    if in_c and record is None:  # the merge in C, of the collected entries or (over the budget) of each block's
        # entries at or above t: the others have scale 0 and add exact zeros
        if collected is None:
            collected = (collect_block_c(segment, lo, hi, inputs, clip, params["inter"], t, buffers)
                         for segment, lo, hi, inputs in sweep_inputs(source, options, width))
        out, den = torch.empty(width), torch.empty(width)
        if scores_only:  # one more pass, for tau at the collected positions only
            collected = _with_tau(sweep_inputs(source, options, width), collected)
        for c in collected:
            tau_m = native.pcb_merge_entries(c.width, c.counts(), c.flat, c.score, c.tau, t, span, clip.lo, clip.hi,
                                             lam, out[: c.width], den)
            sink(c.segment, c.lo, c.hi, tau_m)
        return kept
    # Collected entries at or below t get scale 0 and add exact zeros: no need to filter them. Over
    # the memory budget nothing was collected: the scores are recomputed in one more pass.
    for e in entries(score_blocks, collected):
        scale = torch.clamp_min_(e.score - e.per_task(t), 0).div_(e.per_task(span))
        value = tb.clipped_values(e.tau, e.per_task(clip.lo), e.per_task(clip.hi)).mul_(scale)
        if record is not None:
            _record(record, e, scale, value, torch.clamp(e.sums(scale)[0], min=1e-12))
        if lam is not None:
            value.mul_(e.per_task(lam))
        num, den = e.sums(value, scale)
        sink(e.segment, e.lo, e.hi, num / torch.clamp(den, min=1e-12))
    return kept


def _with_tau(blocks, collected: list):
    """The collected blocks (without their tau) with it, from one pass over the same ``blocks`` of
    :func:`sweep_inputs`; each block's entries are let go once merged."""
    for segment, lo, hi, inputs in blocks:
        c = collected.pop(0) if collected else None
        if c is None or (c.segment.key, c.lo, c.hi) != (segment.key, lo, hi):
            raise RuntimeError(f"pcb: the merge pass met block {segment.key}[{lo}:{hi}] out of the collection's order")
        yield replace(c, tau=gather_tau(inputs, c))


def _append_inside(inside: list, offset: int, values: torch.Tensor, floor, ceiling) -> None:
    """Append to ``inside[offset + i]`` the values of row i of ``values`` ([n, k]: the flagged columns
    of a block) strictly inside (floor_i, ceiling_i) ([n, 1] each)."""
    keep = (values > floor) & (values < ceiling)
    for i, part in enumerate(values[keep].split(keep.sum(1).tolist())):
        inside[offset + i].append(part)


def fused_clip_bounds(source, options, clamp_ratio: float, block_width: int) -> tuple[tb.ClipStats,
                                                                                      ColumnSample] | None:
    """The exact clip bounds of :func:`clip_bounds` from one compiled pass that counts |tau| around
    the brackets that a column sample gives for both ranks (:func:`select_in_bracket` over 2n rows:
    the lo rank of every task, then the hi rank), with the NaN/Inf check; the sample is read in
    place. None where the sample would need a pass of its own (sources on disk): the caller takes
    :func:`clip_bounds`, whose pass takes the sample too."""
    n, D = source.n, source.D
    sample = ColumnSample(D, n)
    if not sample.take_without_pass(source):
        return None
    i_lo, i_hi = clip_indices(D, clamp_ratio)
    magnitudes = sample.scores(torch.abs)
    ranks = torch.tensor([i_lo] * n + [i_hi] * n)

    def bracket_pass(floor, ceiling):
        counts = torch.zeros(3, 2 * n, dtype=torch.int64)
        inside = [[] for _ in range(2 * n)]
        floor, ceiling = floor.unsqueeze(1), ceiling.unsqueeze(1)
        for block in source.blocks(block_width, options=options):
            row_max, *block_counts, flagged = fused_cpu.clip_bracket(block.tv, floor, ceiling)
            raise_if_not_finite(source, options, block, row_max)
            counts += torch.stack(block_counts)
            values = block.tv[:, fused_cpu.marked(flagged)].abs()  # [n, few columns]
            for rows, offset in ((slice(0, n), 0), (slice(n, 2 * n), n)):  # the lo rank's bracket, then hi's
                _append_inside(inside, offset, values, floor[rows], ceiling[rows])
        return counts[0], counts[1], counts[2], [torch.cat(parts) for parts in inside]

    bounds, _, _ = select_in_bracket(2 * n, D, ranks, torch.cat([magnitudes, magnitudes]), bracket_pass, options)
    return tb.ClipStats.from_bounds(bounds[:n], bounds[n:]), sample


def _merge_official_fused(source, options, sink, params, block_width, reuse=None):
    """The official variant with compiled block loops (pcb_fast.fused_cpu): the clip pass as
    :func:`_merge_official` (with the NaN check and the column sample); one pass that computes the
    scores P of each block and counts them around the bracket that the sample's scores give (the
    exact t_i from the few inside it, :func:`select_in_bracket`; M_i from the same pass); then one
    sweep that computes P again and merges each block. Nothing is collected: memory stays at a few
    blocks."""
    n, D = source.n, source.D
    known = reuse is not None and ("clip", params["clamp_ratio"], block_width) in reuse
    # the clip bounds in one bracket pass where the sample is read in place, else as clip_bounds finds them
    clip = [] if known else ["clip bounds"] if source.holds_columns() else clip_passes(source, options,
                                                                                     params["clamp_ratio"])
    plan_passes(options, *clip, "bracket", "merge")

    def statistics():
        found = fused_clip_bounds(source, options, params["clamp_ratio"], block_width)
        if found is not None:
            return found
        sample = ColumnSample(D, n)
        return clip_bounds(source, options, params["clamp_ratio"], block_width, sample), sample

    clip, sample = _reused(reuse, ("clip", params["clamp_ratio"], block_width), statistics)
    inter = params["inter"]
    ws = tb.Workspace(n, block_width, 4 if inter == "pairwise" else 3)
    # a sample read in place is one part per tensor, which may be wider than the workspace; a part taken
    # from a block shorter than the sample's stride may have no column at all
    sample_scores = sample.scores(lambda tv: torch.cat([tb.official_scores(tv[:, i : i + block_width], clip, inter,
                                                                           ws).clone()
                                                        for i in range(0, tv.shape[1], block_width)]
                                                       or [tv.new_zeros(tv.shape[0], 0)], 1))
    # exp(n N^2 - shift): shift 0 up to EXACT_EXP_MAX_N tasks (x - 0 == x), n beyond (docs/design.md 2.4)
    shift = torch.tensor(float(n) if n > EXACT_EXP_MAX_N else 0.0)
    stats = (clip.lo, clip.hi, clip.span, shift)
    peak = torch.full((n,), float("-inf"))

    def bracket_pass(floor, ceiling):
        nonlocal peak
        peak = torch.full((n,), float("-inf"))
        counts = torch.zeros(3, n, dtype=torch.int64)
        inside = [[] for _ in range(n)]
        floor, ceiling = floor.unsqueeze(1), ceiling.unsqueeze(1)
        for block in source.blocks(block_width, options=options):
            row_max, *block_counts, flagged, scores = fused_cpu.PCB_BRACKET[inter](block.tv, *stats, floor, ceiling)
            peak = torch.maximum(peak, row_max)
            counts += torch.stack(block_counts)
            _append_inside(inside, 0, scores[:, fused_cpu.marked(flagged)], floor, ceiling)
        return counts[0], counts[1], counts[2], [torch.cat(parts) for parts in inside]

    t, greater, _ = select_in_bracket(n, D, keep_index(D, params["ratio"]), sample_scores, bracket_pass, options)
    t = t.unsqueeze(1)
    # scale = (max(P, t) - t) / (M - t) (docs/design.md 2.2 step 6); M == t: nothing kept, scale 0
    keep_span = span_or_inf(peak.unsqueeze(1) - t)
    lam = fused_cpu.weights(lambda_column(params["lambdas"], n), n)
    merge_block = fused_cpu.PCB_BLOCK[inter]
    for block in source.blocks(block_width, options=options):
        sink(block.segment, block.lo, block.hi, merge_block(block.tv, *stats, t, keep_span, lam))
    return greater


def pair_stats(source, options, block_width: int, sample: ColumnSample) -> tb.PairStats:
    """Min/max of tau_i * tau_j for all pairs, then the softmax partition sums (two passes).

    The first pass also checks for NaN/Inf and fills ``sample``.
    """
    n = source.n
    ws = tb.Workspace(n, block_width, 2)
    lo = torch.full((n, n), float("inf"))
    hi = torch.full((n, n), float("-inf"))
    for block in source.blocks(block_width, options=options):
        raise_if_not_finite(source, options, block, block.tv.abs().amax(1))
        sample.add(block)
        products = ws.get(block.tv.shape[1])[0]
        for i in range(n):
            torch.mul(block.tv, block.tv[i], out=products)
            lo[i] = torch.minimum(lo[i], products.amin(1))
            hi[i] = torch.maximum(hi[i], products.amax(1))
    if options.comm is not None:
        options.comm.min_(lo)
        options.comm.max_(hi)
    stats = tb.PairStats.from_min_max(lo, hi)
    # per-block partial sums [blocks, n, n + 1] (inter, then intra), added in block order below
    partials = []
    for block in source.blocks(block_width, options=options):
        m = block.tv.shape[1]
        terms = ws.get(m)[0]
        partial = torch.empty(n, n + 1, dtype=torch.float64)
        for i in range(n):
            normalized = tb.pair_normalized(block.tv, i, stats, terms)
            numerator = tb.intra_numerator(normalized[i], n, float(stats.peak[i, i]), ws.row(m))
            exps = terms.sub_(stats.peak[i].unsqueeze(1)).exp_()
            with one_thread():  # sums longer than torch's grain size would round by thread count
                partial[i, n] = numerator.sum(dtype=torch.float64)
                partial[i, :n] = exps.sum(1, dtype=torch.float64)
        partials.append(partial)
    partials = torch.stack(partials) if partials else torch.zeros(0, n, n + 1, dtype=torch.float64)
    if options.comm is not None:  # every rank adds every block's partials in the same (global) order
        partials = options.comm.gather_in_order(partials)
    z = torch.zeros(n, n + 1, dtype=torch.float64)
    for partial in partials:
        z += partial
    stats.inv_z_inter = (1.0 / z[:, :n]).float()
    stats.inv_z_intra = (1.0 / z[:, n]).float()
    return stats


def _merge_paper(source, options, sink, params, block_width, record=None, reuse=None):
    n, D = source.n, source.D
    known = reuse is not None and ("pairs", block_width) in reuse
    plan_passes(options, *([] if known else ["pair bounds", "partition sums"]),
                *selection_passes(source, options, keep_index(D, params["ratio"]), ColumnSample(D, n).columns))

    def statistics():
        sample = ColumnSample(D, n)
        return pair_stats(source, options, block_width, sample), sample

    stats, sample = _reused(reuse, ("pairs", block_width), statistics)
    ws = tb.Workspace(n, block_width, 2)
    sample_scores = sample.scores(lambda tv: tb.paper_scores(tv, stats, ws))

    def score_blocks():
        for block in source.blocks(block_width, options=options):
            scores = tb.paper_scores(block.tv, stats, ws)
            _raise_if_scores_not_finite(source, options, block, scores)
            yield block, scores

    t, _, collected, kept_counts = select_threshold(
        source, options, score_blocks, keep_index(D, params["ratio"]), sample_scores, keep_ties=True
    )
    lam = lambda_column(params["lambdas"], n)
    # beta * mask, as the reference: entries below t add exact zeros, so none is filtered out
    for e in entries(score_blocks, collected):
        kept_beta = e.score * (e.score >= e.per_task(t))
        value = kept_beta * e.tau
        if record is not None:
            den = e.sums(kept_beta)[0]
            _record(record, e, kept_beta, value, torch.where(den > 0, den, float("inf")))
        if lam is not None:
            value = value * e.per_task(lam)
        num, den = e.sums(value, kept_beta)
        sink(e.segment, e.lo, e.hi, torch.where(den > 0, num / torch.where(den > 0, den, 1.0), 0.0))
    return kept_counts


def _raise_if_scores_not_finite(source, options, block, scores: torch.Tensor) -> None:
    """The paper variant's scores of a block must be finite: its products tau_i * tau_j leave float32's
    range where |tau| passes ~1.8e19 (finite inputs, NaN scores): a one-line error naming the key,
    reported to ``options.errors`` where the run has one."""
    if bool(torch.isfinite(scores).all()):
        return
    message = (f"key {checks.short(block.segment.lead_key, 80)}: pcb's scores (variant='paper') are not finite: products tau_i * tau_j "
               "of the task vectors overflow float32 (|tau| beyond ~1.8e19 among the keys whose statistics it "
               "shares); scale the models down or use variant='official'")
    if options.errors is None:
        raise ValueError(message)
    options.errors.fail(message)


SPEC = MethodSpec(
    name="pcb", merge=merge_pcb, summary="PCB-Merging",
    citation="Du et al., Parameter Competition Balancing for Model Merging, NeurIPS 2024",
    url="https://arxiv.org/abs/2410.02396",
    params=(Param("ratio", 0.1, checks.check_ratio, "keep ratio, 0 < r <= 1"),
            Param("clamp_ratio", 1e-4, checks.check_clamp_ratio, "outlier clip ratio, 0 <= a < 0.5"),
            Param("inter", "sum", choice("inter", checks.INTER_CHOICES), "sum, normalized_sum or pairwise",
                  kind="choice"),
            Param("variant", "official", choice("variant", checks.VARIANT_CHOICES), "official or paper",
                  kind="choice")),
    backends=("torch", "triton", "reference"), loops=("c", "compiled"), searchable=True,
    merge_tensors=merge_pcb_tensors,
    # the paper variant's partition sums are added block by block: its bits depend on the blocks
    packable=lambda params: params.get("variant", "official") == "official")
