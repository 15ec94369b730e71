"""The engine: scope handling and the passes shared by selection-based methods (docs/design.md 3.2, 3.3).

A method is a function ``method(source, sink, options, **params)`` that makes passes over
``source.blocks(options=options)`` (``options``: the run's settings, core/options.py) and calls
``sink(segment, lo, hi, merged_task_vector_block)`` once per block.
``run`` applies it to the whole source (scope="global": statistics over every merged entry) or to
each segment alone (scope="tensor").

Selecting the keep threshold t_i = sort(s_i)[k] of a score row and merging only the entries above
it is common to PCB, TIES and others (:func:`select_threshold`). A floor at or below t_i comes from
the scores of a column sample taken during an earlier pass (or, when the sample is too small or
its floor turns out too high, from level 1 of the exact radix select: one more pass). One pass then
collects every entry whose score reaches the floor (about ``ratio`` of each row) with its position
and task-vector value. The count of entries below the floor turns rank k into a rank among the
collected scores, so t_i is exact; the merge reads only the collected entries.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable

import torch

from ..cpu.native import (collect as native_collect, collected_split as native_collected_split,
                          problem as native_problem, row_order_statistics)
from . import checks
from .numerics import warm_up_exp
from .options import RunOptions, add_passes, plan_passes
from .select import RadixSelect, bucket_floor
from .sinks import Sink, as_sink
from .sources import Block, Segment, TaskVectorSource


# scope="tensor": keys of fewer entries (and fewer than a block's) are merged in packs of at most this many
# (merge_tensors of run)
TENSOR_PACK_WIDTH = 1 << 13


def run(method: Callable, source: TaskVectorSource, sink: Sink, *, options: RunOptions | None = None,
        scope: str = "global", segment_params: Callable | None = None, merge_tensors: Callable | None = None,
        **params) -> dict:
    """Run ``method`` over ``source`` with statistics per model (global) or per tensor, into ``sink``
    (a core.sinks.Sink, or a plain function that takes task vectors), with the run's ``options``
    (core/options.py; default: no budget, no progress, one process).

    ``segment_params`` (scope="tensor" only): a function of a segment's key giving the parameters
    that vary by tensor (mergekit's filters and gradients); they update ``params`` for that
    segment. Besides the method's own parameters it may give "lambdas" and "lam": the merged block
    is then multiplied by that tensor's lam before the sink, so a sink that adds theta_pre +
    1.0 * block writes exactly theta_pre + lam * tau_m.

    ``merge_tensors`` (scope="tensor"; the method's spec offers it): the method on a pack of small
    whole tensors (:meth:`TaskVectorSource.packs`, runs of keys with the same parameters), each
    with its own statistics, in one go: the values of ``method`` on each key alone, bit for bit,
    without the fixed cost of a key's passes. Single-process runs only.

    Returns {"kept": [n] number of entries each task contributed, "entries": merged entries}.
    """
    checks.check_choice("scope", scope, checks.SCOPE_CHOICES)
    if segment_params is not None and scope != "tensor":
        raise ValueError(f"parameters that vary by tensor ({segment_params}) need scope='tensor', "
                         f"but scope={checks.short(scope)}")
    warm_up_exp()
    sink = as_sink(sink)
    options = RunOptions() if options is None else options
    if scope == "global":
        parts = [(source, params, False)]
    else:  # one restricted source at a time, so that what a part holds (a cache) is freed after it
        together = merge_tensors is not None and options.comm is None and options.errors is None
        parts = _tensor_parts(source, params, segment_params, together)
    kept = torch.zeros(source.n, dtype=torch.int64)
    bar = _tensors_bar(source, options) if scope == "tensor" else None
    part_options = options
    if scope == "tensor":  # one tensor's statistics live on the rank that holds it; one bar for the run
        part_options = replace(options, comm=None, progress=None if bar is not None else options.progress)
    if scope == "global":
        plan_passes(options, "merge")  # a method that makes more passes says so before its first
    try:
        for part, own, packed in parts:
            lam = None
            if segment_params is not None:
                own = dict(own)
                lam = own.pop("lam", None)
            kept += (merge_tensors if packed else method)(
                part, sink if lam is None else _scaled_sink(sink, checks.check_lam(lam)), part_options, **own)
            if bar is not None:
                bar.update(part.D * part.bytes_per_entry())
    finally:
        if bar is not None:
            bar.close()
    if options.comm is not None:
        options.comm.sum_(kept)  # also where every rank agrees that no rank failed
    return {"kept": kept.tolist(), "entries": source.D}


def each_key(method: Callable, source: TaskVectorSource, sink: Sink, options: RunOptions, **params) -> torch.Tensor:
    """``method`` on every key of a pack alone (``source``: one pack segment): a ``merge_tensors`` of
    :func:`run` for parameters whose values it does not reproduce from the whole pack. Returns the
    entries kept per task."""
    (pack,) = source.segments
    kept = torch.zeros(source.n, dtype=torch.int64)
    for part in pack.parts:
        kept += method(source.restrict(part), sink, options, **params)
    return kept


def _tensor_parts(source: TaskVectorSource, params: dict, segment_params: Callable | None, together: bool):
    """(restricted source, its parameters, whether it is a pack) of every part of a scope="tensor" run:
    each key alone or, ``together``, runs of small keys that share their parameters as packs."""
    def own(key):
        return dict(params, **segment_params(key)) if segment_params is not None else params

    if not together:
        for segment in source.segments:
            yield source.restrict(segment), own(segment.key), False
        return
    # (no wider than a block: a pack is read as one, and a method may read it in blocks of its width)
    for segment in source.packs(min(TENSOR_PACK_WIDTH, params.get("block_width", TENSOR_PACK_WIDTH))):
        if not segment.parts:
            yield source.restrict(segment), own(segment.key), False
            continue
        if segment_params is None:
            yield source.restrict(segment), params, True
            continue
        run, shared = [], None
        for part in segment.parts + (None,):  # (a last None closes the last run)
            mine = own(part.key) if part is not None else None
            if run and mine != shared:
                if len(run) == 1:
                    yield source.restrict(run[0]), shared, False
                else:
                    total = sum(p.numel for p in run)
                    yield source.restrict(Segment((run[0].key, run[-1].key), (total,), total, run[0].offset,
                                                  tuple(run))), shared, True
                run = []
            run.append(part)
            shared = mine


def _tensors_bar(source: TaskVectorSource, options: RunOptions):
    """The whole-run bar of a per-tensor merge, where the progress callback offers one (PassBars)."""
    tensors = getattr(options.progress, "tensors", None)
    if tensors is None:
        return None
    return tensors(sum(seg.numel * source.bytes_per_entry(seg) for seg in source.segments), len(source.segments))


def _scaled_sink(sink: Sink, lam: float) -> Sink:
    """``sink`` receiving lam * tau_m (a tensor's own lam, see :func:`run`); task vectors only, and
    patches (its other ways in would not apply that lam)."""

    def scaled(segment, lo, hi, tau_m):
        sink(segment, lo, hi, lam * tau_m)

    def patchable(segment, lo, hi, tau_m, positions, other, room):
        return sink.patchable(segment, lo, hi, lam * tau_m, positions, lam * other, room)

    return Sink(scaled, patchable=patchable if sink.patchable is not None else None)


def task_ranks(rank, n: int) -> torch.Tensor:
    """[n] int64 ranks, one per task, from one rank for all or a sequence of n."""
    return torch.as_tensor(rank, dtype=torch.int64).expand(n).clone()


def raise_if_not_finite(source: TaskVectorSource, options: RunOptions, block, row_max: torch.Tensor) -> None:
    """``row_max`` is a per-task max over the block (NaN propagates): name the bad model and key
    (reported to ``options.errors`` where the run has one: raised on every rank at the next collective)."""
    bad = ~torch.isfinite(row_max)
    if bool(bad.any()):
        part = _first_bad_key(block) if block.segment.parts else None
        if part is not None:  # a pack: its first key with a value that is not finite, as unpacked
            block, bad = part, ~torch.isfinite(part.tv).all(1)
        task = int(bad.nonzero()[0, 0])
        message = (source.base_problem(block)
                   or f"{source.where(task, block.segment)}: {source.why_not_finite(task, block)}")
        if options.errors is None:
            raise ValueError(message)
        options.errors.fail(message)


def _first_bad_key(block) -> Block | None:
    """The block of a pack's first key holding a value that is not finite (its entries of ``block``)."""
    columns = (~torch.isfinite(block.tv).all(0)).nonzero()
    if not columns.numel():
        return None
    column = int(columns[0, 0])
    for part, lo, hi, start, end in block.segment.pieces(block.lo, block.hi):
        if start <= column < end:
            return Block(part, lo, hi, block.tv[:, start:end])
    return None


@dataclass
class Collected:
    """The entries of one [n, m] block whose score reached the floor, in task-major order."""

    segment: Segment
    lo: int
    hi: int
    n: int
    flat: torch.Tensor  # int32 index task * m + position, ascending (a block holds < 2^31 entries)
    score: torch.Tensor  # float32
    tau: torch.Tensor  # float32 raw task-vector value
    sizes: list | None = None  # entries of each task, where the collection knows them already

    @property
    def width(self) -> int:
        return self.hi - self.lo

    def task(self) -> torch.Tensor:
        """Task index of every entry."""
        return torch.div(self.flat, self.width, rounding_mode="floor")

    def counts(self) -> list:
        """Number of entries of each task."""
        if self.sizes is not None:
            return self.sizes
        ends = torch.searchsorted(self.flat, torch.arange(1, self.n + 1, dtype=torch.int32) * self.width)
        return torch.diff(ends, prepend=ends.new_zeros(1)).tolist()


def collect_block(block, scores: torch.Tensor, floor: torch.Tensor) -> Collected:
    """Keep the entries of a [n, m] block with ``scores >= floor`` (per task), with their tau."""
    n, m = scores.shape
    if (native_problem() is None and scores.dtype == block.tv.dtype == torch.float32 and n * m < 1 << 31
            and scores.device.type == "cpu"):
        return Collected(block.segment, block.lo, block.hi, n, *native_collect(scores, block.tv, floor))
    flat = (scores >= floor.unsqueeze(1)).view(-1).nonzero().squeeze(1)
    # take() indexes the row-major (task-major) order of a view too: no [task, position] pairs needed
    return Collected(block.segment, block.lo, block.hi, n, flat.to(torch.int32), torch.take(scores, flat),
                     torch.take(block.tv, flat))


def sum_kept(c: Collected, task: torch.Tensor, value: torch.Tensor, weight: torch.Tensor | None = None):
    """(num, den) of one block: the sums of ``value`` and ``weight`` of the collected entries per
    position, in task order (the reference's rounding, bit for bit). ``task``: each entry's task;
    den is None without ``weight``.

    Entries a method drops carry value and weight 0: adding them changes no sum.
    """
    pos = c.flat - task * c.width
    counts = torch.bincount(task, minlength=c.n).tolist()
    num = torch.zeros(c.width)
    den = None if weight is None else torch.zeros(c.width)
    for p, v in zip(pos.split(counts), value.split(counts)):
        num.index_add_(0, p, v)  # positions are unique within a task: no ordering question inside
    if weight is not None:
        for p, w in zip(pos.split(counts), weight.split(counts)):
            den.index_add_(0, p, w)
    return num, den


def dense_sums(value: torch.Tensor, weight: torch.Tensor | None = None):
    """(num, den): the sums over tasks of [n, m] ``value`` and ``weight``, in task order from +0 (the
    rounding, and the sign of zero, of :func:`sum_kept` when every entry is collected); den is None
    without ``weight``."""
    num = torch.zeros(value.shape[1])
    for row in value:
        num.add_(row)
    if weight is None:
        return num, None
    den = torch.zeros(value.shape[1])
    for row in weight:
        den.add_(row)
    return num, den


@dataclass
class Entries:
    """The entries one merge step of a block works on, with the same operations whether they are a
    whole [n, m] block (``collected`` None: the merge recomputed the scores) or the entries collected
    from it (1-D, task-major), so that a method writes its merge once for both."""

    segment: Segment
    lo: int
    hi: int
    score: torch.Tensor  # [n, m], or [E] collected
    tau: torch.Tensor  # raw task-vector values, same shape as score
    collected: Collected | None = None

    def per_task(self, values: torch.Tensor) -> torch.Tensor:
        """A per-task quantity ([n] or [n, 1]) broadcast to the entries."""
        values = values.reshape(-1)
        return values.unsqueeze(1) if self.collected is None else values[self._task]

    def sums(self, value: torch.Tensor, weight: torch.Tensor | None = None):
        """(num, den) per position of the block, in task order (:func:`dense_sums`, :func:`sum_kept`)."""
        if self.collected is None:
            return dense_sums(value, weight)
        return sum_kept(self.collected, self._task, value, weight)

    def index(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(task, position in the block) of every entry, flat and task-major."""
        if self.collected is None:
            n, m = self.score.shape
            return torch.arange(n).repeat_interleave(m), torch.arange(m).repeat(n)
        return self._task, self.collected.flat - self._task * self.collected.width

    def __post_init__(self):
        self._task = None if self.collected is None else self.collected.task()


def entries(score_blocks: Callable, collected: list[Collected] | None):
    """The :class:`Entries` of every block: the collected ones, or, where nothing was collected (over
    the memory budget), every entry of the blocks that ``score_blocks()`` yields in one more pass."""
    if collected is None:
        for block, scores in score_blocks():
            yield Entries(block.segment, block.lo, block.hi, scores, block.tv)
    else:
        for c in collected:
            yield Entries(c.segment, c.lo, c.hi, c.score, c.tau, c)


NATIVE_SELECT_MIN = 1 << 15  # entries per row from which the C select beats torch.kthvalue (docs/design.md 3.5)
MIN_SAMPLE = 4096  # below this many sampled entries per task, level 1 of the radix select is cheap


class ColumnSample:
    """A systematic sample of the task-vector columns, taken during a first pass over the blocks.

    One column in ``stride`` (odd, at least 17, so that it does not align with power-of-two
    shapes; larger for long rows, keeping about 2^18 columns): enough to place a quantile of the
    scores within a fraction of a percent, at a small fraction of a pass.
    """

    def __init__(self, D: int, n: int = 0):
        self.stride = max(17, (D >> 18) | 1)
        self.parts = []
        self.n = n
        self.columns = -(-D // self.stride)  # the columns it holds once taken (offsets 0, stride, ...)

    def first_column(self, start: int) -> int:
        """The first sampled column of a block that starts at row offset ``start``, counted from it."""
        return (-start) % self.stride

    def add(self, block) -> None:
        self.parts.append(block.tv[:, self.first_column(block.start) :: self.stride].clone())

    def add_inputs(self, segment, lo: int, inputs) -> None:
        """:meth:`add` for the block of ``segment`` from entry ``lo`` on given as its float32 task vectors
        [n, m] or its raw slices [base, model_0, ...] (float32, bfloat16 or float16): tau of the
        sampled columns only, formed with the bits of the sources' blocks (torch.sub of exact values)."""
        if isinstance(inputs, torch.Tensor):
            self.add(Block(segment, lo, lo + inputs.shape[1], inputs))
            return
        first = self.first_column(segment.offset + lo)
        base = inputs[0][first :: self.stride].float()
        self.parts.append(torch.stack([model[first :: self.stride].float() - base for model in inputs[1:]]))

    def take_without_pass(self, source) -> bool:
        """Take the same sample straight from a source that holds its task vectors in memory (no
        pass over the blocks); False when the source needs a pass."""
        columns = source.strided_columns(self.stride)
        if columns is None:
            return False
        self.parts = columns
        return True

    def scores(self, score_fn: Callable, joined: bool = False) -> torch.Tensor:
        """[n, s] scores of the sampled columns; ``score_fn`` maps a [n, m] block to its scores. With
        ``joined``, one call on all the sampled columns (for scores computed column by column: the
        same values as part by part, one call instead of one per block)."""
        if not self.parts:  # a rank of a distributed merge may hold no key
            return torch.zeros(self.n, 0)
        if joined:
            return score_fn(torch.cat(self.parts, dim=1)).clone()
        return torch.cat([score_fn(part).clone() for part in self.parts], dim=1)


def bounds_from_sample(sample_scores: torch.Tensor, rank, D: int):
    """Per-task (floor, ceiling) that, with overwhelming probability, bracket sort(score_i)[rank_i]
    (``rank``: one for all tasks, or [n]).

    A guess from a sample, six standard deviations on each side; callers check it. None when the
    sample is too small to say anything.
    """
    n, s = sample_scores.shape
    if s < MIN_SAMPLE:
        return None
    ranks = task_ranks(rank, n).tolist()
    groups = {}  # the rows of each distinct rank: one kthvalue per rank, not per row
    for i, r in enumerate(ranks):
        groups.setdefault(r, []).append(i)
    if len(groups) == 1:
        return _sample_bounds(sample_scores, ranks[0], D)
    floor, ceiling = torch.empty(n), torch.empty(n)
    for r, rows in groups.items():
        floor[rows], ceiling[rows] = _sample_bounds(sample_scores[rows], r, D)
    return floor, ceiling


def _sample_bounds(sample_scores: torch.Tensor, rank: int, D: int, widen: float = 1.0):
    n, s = sample_scores.shape
    q = rank / D
    margin = (6 * math.sqrt(s * q * (1 - q)) + 8) * widen
    lo, hi = math.floor(q * s - margin), math.ceil(q * s + margin)
    both = _native_row_bounds(sample_scores, s - 1 - hi, s - 1 - lo) if lo >= 0 and hi < s else None
    if both is not None:  # both bounds in one C call per row
        ceiling, floor = both
        return floor.reshape(n), ceiling.reshape(n)
    floor = _order_statistic(sample_scores, lo + 1) if lo >= 0 else torch.full((n,), float("-inf"))
    ceiling = _order_statistic(sample_scores, hi + 1) if hi < s else torch.full((n,), float("inf"))
    return floor, ceiling


def _native_select_takes(values: torch.Tensor) -> bool:
    """Whether the C radix select (pcb_fast.cpu.native.row_order_statistics) takes ``values`` and beats
    torch on them: rows of many float32 values on the CPU, the library built."""
    return (values.shape[-1] >= NATIVE_SELECT_MIN and values.dtype == torch.float32 and values.device.type == "cpu"
            and native_problem() is None)


def _native_select_applies(values: torch.Tensor) -> bool:
    """Whether the C radix select (which ranks |x|) gives the order statistics of ``values``: values it
    takes (:func:`_native_select_takes`) that are non-negative (magnitudes)."""
    return _native_select_takes(values) and bool(values.min() >= 0)


def _native_row_bounds(values: torch.Tensor, rank_a: int, rank_b: int):
    """The values at descending ranks ``rank_a`` and ``rank_b`` of every row ([n, 1] each) by the C radix
    select, also for rows with negative values (PCB's scores): clipped at 0, the positive values keep
    their ranks, so answers that are positive are the rows' own. None where the select does not
    apply or an answer is not positive (torch then ranks the values themselves)."""
    if not _native_select_takes(values):
        return None
    low = values.min()
    if bool(torch.isnan(low)):  # (min propagates NaN)
        return None
    if bool(low >= 0):
        return row_order_statistics(values, rank_a, rank_b)
    a, b = row_order_statistics(values.clamp_min(0), rank_a, rank_b)
    return (a, b) if bool((a > 0).all()) and bool((b > 0).all()) else None


def _order_statistic(x: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th smallest value (1-based) of every row: kthvalue, or near either end of the row (PCB's
    clip ranks) a partial top-k, four times faster; the same values."""
    s = x.shape[1]
    if k <= s // 64:
        return torch.topk(x, k, dim=1, largest=False).values[:, -1]
    if s - k + 1 <= s // 64:  # the (s - k + 1)-th largest
        return torch.topk(x, s - k + 1, dim=1).values[:, -1]
    return torch.kthvalue(x, k, dim=1).values


def kth_smallest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th smallest (1-based) of a 1-D float32 tensor, as a 0-dim tensor: torch.kthvalue, or for
    many non-negative values (magnitudes) the C radix select of pcb_fast.cpu.native (the same value;
    a zero comes back as +0)."""
    size = values.numel()
    if _native_select_applies(values):
        return row_order_statistics(values.reshape(1, -1), size - k, size - k)[0].reshape(())
    return torch.kthvalue(values, k).values


def selection_passes(source: TaskVectorSource, options: RunOptions, rank, columns: int,
                     then: tuple = ("merge",)) -> list:
    """What the passes of :func:`select_threshold` do, in order, where no sampled bound misses (the
    run adds a pass where one does): with a sample of ``columns`` columns (:attr:`ColumnSample.columns`;
    0 without one), the entries collected in one pass, or counted around a bracket, or two passes
    of the radix select; ``then``: the method's passes after it where nothing is collected."""
    sampled = columns >= MIN_SAMPLE
    if can_collect(source, options, task_ranks(rank, source.n)):
        return ["score and collect"] if sampled else ["histogram", "score and collect"]
    if sampled and options.comm is None:
        return ["bracket", *then]
    return ["histogram", "threshold", *then]


def select_threshold(
    source: TaskVectorSource, options: RunOptions, score_blocks: Callable, rank,
    sample_scores: torch.Tensor | None = None, keep_ties: bool = False, collect_at: Callable | None = None,
    count_blocks: Callable | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[Collected], torch.Tensor]:
    """Exact t_i = sort(score_i)[rank_i] and M_i = max(score_i) for every task, the collected entries,
    and the number of kept entries per task (score > t, or score >= t with ``keep_ties``). ``rank``:
    one rank for every task, or [n] (per-task keep counts, e.g. TIES with a density per model).

    ``score_blocks()`` yields (block, scores [n, m]). The floor below which nothing is collected comes
    from ``sample_scores`` (scores of a sample of the entries) when given, saving a pass; it is
    verified after collecting, and if it was too high for some task, level 1 of the exact radix
    select provides it instead (one more pass).

    When the collected entries would not fit ``options.memory_budget``, nothing is collected: t and M
    come from the two passes of the radix select, and the collected list is None (the method then
    recomputes its scores in a merge pass).

    ``collect_at(floor)``, where given, returns the collected blocks at a floor ([n]) in one pass of
    the method's own (the entries of :func:`collect_block` over ``score_blocks()``, exactly), in place
    of scoring whole blocks and collecting from them; ``count_blocks(floor, ceiling)``, where given,
    yields every block's counts around a bracket (see :func:`threshold_in_bracket`).
    """
    n, D = source.n, source.D
    ranks = task_ranks(rank, n)
    if not can_collect(source, options, ranks):
        found = threshold_in_bracket(source, options, score_blocks, ranks, sample_scores, keep_ties, count_blocks)
        t, peak, kept = (found if found is not None
                         else threshold_by_radix(source, options, score_blocks, ranks, keep_ties))
        return t, peak, None, kept
    guess = None if sample_scores is None else bounds_from_sample(sample_scores, ranks, D)
    floor, ceiling = guess if guess is not None else (None, torch.full((n,), float("inf")))
    if floor is not None:
        collected, summary = collect(score_blocks, floor, n, collect_at, ceiling)
        if any(size < D - int(r) for size, r in zip(summary.sizes, ranks.tolist())):
            floor = None  # the sampled floor was above the threshold for some task
            add_passes(options, "histogram", "score and collect", why="sampled floor too high, re-reading")
    if floor is None:
        selector = RadixSelect(n, ranks.unsqueeze(1), D)
        for _, scores in score_blocks():
            selector.count_high(scores)
        collected, summary = collect(score_blocks, bucket_floor(selector.find_buckets()[:, 0]), n, collect_at,
                                     ceiling)
    thresholds, kept = [], []
    for i, rank in enumerate(ranks.tolist()):
        # Every entry below the floor is below every collected one, so the rank shifts by their number.
        local = rank - (D - summary.sizes[i])
        # Most collected entries lie above the sampled ceiling: select among the rest when t is there.
        below = summary.below(i)
        if local < below.numel():  # t <= ceiling: the entries above it are above t
            t = kth_smallest(below, local + 1)
            count = summary.above[i] + ((below >= t) if keep_ties else (below > t)).sum()
        else:
            values = summary.values(i)
            t = kth_smallest(values, local + 1)
            count = ((values >= t) if keep_ties else (values > t)).sum()
        thresholds.append(t)
        kept.append(count)
    return torch.stack(thresholds), summary.maxima, collected, torch.stack(kept)


def select_in_bracket(n: int, D: int, rank, sample_scores: torch.Tensor | None, bracket_pass: Callable,
                      options: RunOptions | None = None):
    """Exact t_i = sort(score_i)[rank_i] per task (``rank``: one for all, or [n]) from one pass that
    counts around a sampled bracket.

    ``bracket_pass(floor, ceiling)`` ([n] each) makes a pass and returns, per task, the numbers of
    scores > ceiling, == ceiling and == floor ([n] int64 each), and the list of the n tensors of
    scores strictly inside (floor, ceiling). In ascending order a row is: below the floor, at the
    floor, inside, at the ceiling, above; so t is found among the few inside values, and ties at
    the bounds (quantized or sparse task vectors) cost counts only. Where the sampled bracket
    misses t (improbable: six standard deviations), the pass is repeated with a bracket that lies
    on the missed side of the old one (:func:`_widened`): a retry holds about as many values as a
    first pass, never a whole side of the row (a pass the run's ``options`` add to its progress bars).
    Returns (t, greater, at_least): [n] thresholds and the counts of scores > t and >= t.
    """
    ranks = task_ranks(rank, n).tolist()
    guess = None if sample_scores is None else bounds_from_sample(sample_scores, ranks, D)
    # fresh tensors either way (kthvalue results or full): moved in place below when they miss
    floor, ceiling = guess if guess is not None else (torch.full((n,), float("-inf")), torch.full((n,), float("inf")))
    widen = [1.0] * n
    while True:
        above, at_ceiling, at_floor, inside = bracket_pass(floor, ceiling)
        t, greater, at_least, missed = torch.zeros(n), torch.zeros(n, dtype=torch.int64), torch.zeros(n, dtype=torch.int64), False
        for i in range(n):
            at_f = int(at_floor[i]) if floor[i] < ceiling[i] else 0  # one group when the bounds are equal
            at_c, top, values = int(at_ceiling[i]), int(above[i]), inside[i]
            below = D - top - at_c - at_f - values.numel()
            r = ranks[i] - below  # rank of t among the entries from the floor up
            if r < 0:  # t lies below the floor
                floor[i], ceiling[i], widen[i] = _widened(sample_scores, i, ranks[i], D, widen[i], floor[i], below=True)
                missed = True
            elif r < at_f:
                t[i], greater[i], at_least[i] = floor[i], D - below - at_f, D - below
            elif r < at_f + values.numel():
                v = kth_smallest(values, r - at_f + 1)
                t[i] = v
                greater[i] = top + at_c + int((values > v).sum())
                at_least[i] = top + at_c + int((values >= v).sum())
            elif r < at_f + values.numel() + at_c:
                t[i], greater[i], at_least[i] = ceiling[i], top, top + at_c
            else:  # t lies above the ceiling
                floor[i], ceiling[i], widen[i] = _widened(sample_scores, i, ranks[i], D, widen[i], ceiling[i],
                                                           below=False)
                missed = True
        if not missed:
            return t, greater, at_least
        if options is not None:
            add_passes(options, why="bracket missed, re-reading")


def _widened(sample_scores, i: int, rank: int, D: int, widen: float, bound, below: bool):
    """The next (floor, ceiling, widen) of task i after its bracket missed t on one side: the old bound
    that t lies beyond becomes the other end (every entry at or past it is known to lie past t),
    and the sample gives the new far end with a margin four times wider (open, +-inf, where the
    sample runs out). The values held by the next pass are those between the two, not a whole side
    of the row."""
    bound, widen = float(bound), widen * 4  # a number, not a view of the tensor the caller updates
    bounds = None
    if sample_scores is not None and sample_scores.shape[1] >= MIN_SAMPLE:
        bounds = _sample_bounds(sample_scores[i : i + 1], rank, D, widen)
    if below:
        far = float(bounds[0][0]) if bounds is not None else float("-inf")
        return (far if far < bound else float("-inf")), bound, widen
    far = float(bounds[1][0]) if bounds is not None else float("inf")
    return bound, (far if far > bound else float("inf")), widen


COLLECTED_BYTES = 16  # per collected entry: int32 position, float32 score and tau, and a score copy


def can_collect(source: TaskVectorSource, options: RunOptions, rank) -> bool:
    """Whether the entries above rank ``rank`` (one, or [n]) of every task (with a margin) fit the
    run's budget."""
    if options.comm is not None:
        return False  # distributed: thresholds from histograms summed over ranks
    if options.memory_budget is None:
        return True
    entries = int((source.D - task_ranks(rank, source.n)).sum()) * 1.05 + source.n * 4096
    return entries * COLLECTED_BYTES <= options.memory_budget


class _BracketTooWide(Exception):
    """The values inside a bracket would not fit the memory budget."""


def bracket_counts(scores: torch.Tensor, floor: torch.Tensor, ceiling: torch.Tensor) -> tuple:
    """A block's scores [n, m] around a bracket ([n] each): per task the numbers > ceiling, == ceiling
    and == floor ([n] int64 each), the list of each task's scores strictly inside, and the max."""
    f, c = floor.unsqueeze(1), ceiling.unsqueeze(1)
    between = (scores > f) & (scores < c)
    return ((scores > c).sum(1), (scores == c).sum(1), (scores == f).sum(1),
            list(scores[between].split(between.sum(1).tolist())), scores.amax(1))


def threshold_in_bracket(source: TaskVectorSource, options: RunOptions, score_blocks: Callable, rank, sample_scores,
                         keep_ties: bool, count_blocks: Callable | None = None):
    """(t, M, kept) from one pass counting around the bracket that ``sample_scores`` give
    (:func:`select_in_bracket`: counts, plus the few values inside, about 1% of the entries), or
    None where that cannot work: no sample large enough, a distributed merge (whose thresholds come
    from histograms summed over ranks), or values inside the bracket that would not fit the budget
    (a bracket the sample missed, opened on one side). Exact, like the radix select, in one pass
    instead of two. ``count_blocks(floor, ceiling)``, where given, yields :func:`bracket_counts` of
    every block (a method's own sweep; the same counts), in place of scoring whole blocks."""
    n, D = source.n, source.D
    if options.comm is not None or sample_scores is None or sample_scores.shape[1] < MIN_SAMPLE:
        return None  # (bounds_from_sample would have no bracket to give)
    room = None if options.memory_budget is None else options.memory_budget // 4  # float32 values inside
    peak = None  # per task, from the last bracket pass

    def bracket_pass(floor, ceiling):
        nonlocal peak
        above, at_ceiling, at_floor = (torch.zeros(n, dtype=torch.int64) for _ in range(3))
        inside, held = [[] for _ in range(n)], 0
        peak = torch.full((n,), float("-inf"))
        blocks = (count_blocks(floor, ceiling) if count_blocks is not None
                  else (bracket_counts(scores, floor, ceiling) for _, scores in score_blocks()))
        for block_above, block_at_ceiling, block_at_floor, parts, block_peak in blocks:
            above += block_above
            at_ceiling += block_at_ceiling
            at_floor += block_at_floor
            held += sum(part.numel() for part in parts)
            if room is not None and held > room:
                raise _BracketTooWide
            for i, part in enumerate(parts):
                if part.numel():
                    inside[i].append(part)
            peak = torch.maximum(peak, block_peak)
        return above, at_ceiling, at_floor, [torch.cat(parts) if parts else torch.zeros(0) for parts in inside]

    try:
        t, greater, at_least = select_in_bracket(n, D, rank, sample_scores, bracket_pass, options)
    except _BracketTooWide:
        add_passes(options, "histogram", "threshold", why="bracket too wide for the memory budget")
        return None
    return t, peak, at_least if keep_ties else greater


def threshold_by_radix(source: TaskVectorSource, options: RunOptions, score_blocks: Callable, rank, keep_ties: bool):
    """(t, M, kept) by two passes of the exact radix select: no memory beyond the histograms."""
    n = source.n
    selector = RadixSelect(n, task_ranks(rank, n).unsqueeze(1), source.D, comm=options.comm)
    peak = torch.full((n,), float("-inf"))
    for _, scores in score_blocks():
        selector.count_high(scores)
        peak = torch.maximum(peak, scores.amax(1))
    if options.comm is not None:
        options.comm.max_(peak)
    selector.find_buckets()
    for _, scores in score_blocks():
        selector.count_low(scores)
    return selector.values()[:, 0], peak, selector.count_above(inclusive=keep_ties)[:, 0]


@dataclass
class CollectedScores:
    """What :func:`select_threshold` needs of every task's collected scores, gathered block by block
    without joining them: how many (``sizes``), how many exceed the sampled ceiling (``above``), their
    maximum, and the few at or below the ceiling (:meth:`below`); :meth:`values` joins them all (when
    the sample's bracket missed)."""

    collected: list
    sizes: list
    above: torch.Tensor  # [n] int64
    maxima: torch.Tensor  # [n] float32
    parts_below: list  # per task, the blocks' scores at or below the ceiling

    def below(self, i: int) -> torch.Tensor:
        parts = self.parts_below[i]
        return torch.cat(parts) if parts else torch.zeros(0)

    def values(self, i: int) -> torch.Tensor:
        return torch.cat([c.score.split(c.counts())[i] for c in self.collected])


def collect(score_blocks: Callable, floor: torch.Tensor, n: int, collect_at: Callable | None = None,
            ceiling: torch.Tensor | None = None):
    """One pass: the collected blocks (by ``collect_at(floor)`` where given, see
    :func:`select_threshold`) and their :class:`CollectedScores` around ``ceiling`` ([n]; none: +inf)."""
    if collect_at is not None:
        collected = collect_at(floor)
    else:
        collected = [collect_block(block, scores, floor) for block, scores in score_blocks()]
    top = (torch.full((n,), float("inf")) if ceiling is None else ceiling).float().contiguous()
    sizes, above, maxima = [0] * n, torch.zeros(n, dtype=torch.int64), torch.full((n,), float("-inf"))
    parts_below = [[] for _ in range(n)]
    for c in collected:
        counts = c.counts()
        sizes = [a + b for a, b in zip(sizes, counts)]
        if native_problem() is None and c.score.dtype == torch.float32:
            parts = native_collected_split(torch.tensor(counts), c.score, top, above, maxima)
        else:
            parts = []
            for i, part in enumerate(c.score.split(counts)):
                above[i] += (part > top[i]).sum()
                if part.numel():
                    maxima[i] = torch.maximum(maxima[i], part.max())
                parts.append(part[part <= top[i]])
        for i, part in enumerate(parts):
            if part.numel():
                parts_below[i].append(part)
    return collected, CollectedScores(collected, sizes, above, maxima, parts_below)
