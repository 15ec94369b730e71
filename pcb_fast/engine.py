"""The engine: scope handling and the passes shared by selection-based methods (DESIGN.md 3).

A method is a function ``method(source, sink, **params)`` that makes passes over
``source.blocks()`` and calls ``sink(segment, lo, hi, merged_task_vector_block)`` once per block.
``run`` applies it to the whole source (scope="global": statistics over every merged entry) or to
each segment alone (scope="tensor").

Selecting the keep threshold t_i = sort(s_i)[k] of a score row and merging only the entries above
it is common to PCB, TIES and others. The engine does it in two passes: level 1 of the radix select
finds the 16-bit bucket holding rank k; the next pass collects every entry whose score is at or
above that bucket's floor (the kept entries plus the bucket itself, about ratio of each row) with
its position and task-vector value. The exact t_i is then an order statistic of the collected
scores, and the merge reads only collected entries, so the scores are computed twice in all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from . import checks
from .select import RadixSelect, bucket_floor
from .sources import Segment, TaskVectorSource

Sink = Callable[[Segment, int, int, torch.Tensor], None]


def run(method: Callable, source: TaskVectorSource, sink: Sink, *, scope: str = "global", **params) -> None:
    """Run ``method`` over ``source`` with statistics per model (global) or per tensor."""
    checks.check_choice("scope", scope, checks.SCOPE_CHOICES)
    if scope == "global":
        method(source, sink, **params)
    else:
        for segment in source.segments:
            method(source.restrict(segment), sink, **params)


def raise_if_not_finite(source: TaskVectorSource, block, row_max: torch.Tensor) -> None:
    """``row_max`` is a per-task max over the block (NaN propagates): name the bad model and key."""
    bad = ~torch.isfinite(row_max)
    if bool(bad.any()):
        task = int(bad.nonzero()[0, 0])
        raise ValueError(f"{source.where(task, block.segment)}: contains NaN or Inf; every input value must be finite")


@dataclass
class Collected:
    """The entries of one block whose score reached the floor: task-major, ``counts[i]`` per task."""

    segment: Segment
    lo: int
    hi: int
    counts: list
    pos: torch.Tensor  # int32 position inside the block
    score: torch.Tensor  # float32
    tau: torch.Tensor  # float32 raw task-vector value


def collect_block(block, scores: torch.Tensor, floor: torch.Tensor) -> Collected:
    """Keep the entries of a [n, m] block with ``scores >= floor`` (per task), with their tau."""
    n, m = scores.shape
    mask = scores >= floor.unsqueeze(1)
    flat = mask.view(-1).nonzero().squeeze(1)
    task = torch.div(flat, m, rounding_mode="floor")
    pos = flat - task * m
    counts = mask.sum(1).tolist()
    return Collected(block.segment, block.lo, block.hi, counts, pos.to(torch.int32), scores.view(-1)[flat], block.tv[task, pos])


def select_threshold(
    source: TaskVectorSource, score_blocks: Callable, rank: int
) -> tuple[torch.Tensor, torch.Tensor, list[Collected]]:
    """Exact t_i = sort(score_i)[rank] and M_i = max(score_i) for every task, with the collected entries.

    ``score_blocks()`` yields (block, scores [n, m]) and is called twice (level 1, then collect).
    """
    n, D = source.n, source.D
    selector = RadixSelect(n, torch.full((n, 1), rank), D)
    for _, scores in score_blocks():
        selector.count_high(scores)
    floor = bucket_floor(selector.find_buckets()[:, 0])
    collected = [collect_block(block, scores, floor) for block, scores in score_blocks()]
    per_task = [[] for _ in range(n)]
    for c in collected:
        for i, rows in task_slices(c):
            per_task[i].append(c.score[rows])
    thresholds, maxima = [], []
    for i in range(n):
        values = torch.cat(per_task[i])
        # Every entry below the floor is below every collected one, so rank shifts by their number.
        local = rank - (D - values.numel())
        thresholds.append(torch.kthvalue(values, local + 1).values)
        maxima.append(values.max())
    return torch.stack(thresholds), torch.stack(maxima), collected


def task_slices(c: Collected):
    """(task, slice) of each task's entries in a :class:`Collected` block."""
    start = 0
    for i, count in enumerate(c.counts):
        yield i, slice(start, start + count)
        start += count
