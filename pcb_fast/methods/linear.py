"""Methods that merge by one weighted sum per block: average, task arithmetic, DARE, Breadcrumbs.

Each is one pass over the blocks: an optional per-entry mask (DARE's random drop, Breadcrumbs'
magnitude band), then the sum over tasks in task order, the rounding of the literal formulations
in pcb_fast.reference.baselines, bit for bit.
"""

from __future__ import annotations

import math
import operator
import warnings

import torch

from ..core import checks, rng
from ..core.engine import raise_if_not_finite
from ..core.formulas import lambda_column, sum_over_tasks
from ..core.options import plan_passes
from ..core.select import keys_to_float, order_keys
from ..core.sources import DEFAULT_BLOCK_WIDTH, Block, row_length
from ..core.threads import one_thread
from ..cpu import fused as fused_cpu, native
from .spec import MethodSpec, Param, choice, flag


def normalizing_divisor(lam, n: int, normalize: bool):
    """mergekit's ``normalize: true`` for task arithmetic, DARE and Breadcrumbs: divide the weighted
    sum by the sum of the weights (n without ``lambdas``), or by 1 where that sum is within 1e-8
    of 0; None without ``normalize``."""
    if not checks.check_flag("normalize", normalize):
        return None
    total = float(n) if lam is None else float(lam.sum())
    return 1.0 if abs(total) < 1e-8 else total


def _weighted_sums(source, options, sink, lam, masked=None, divisor=None, whole_rows=False,
                   block_width=DEFAULT_BLOCK_WIDTH):
    """One pass: sink(sum_i lam_i * masked(block)_i [/ divisor]); returns entries kept per task."""
    kept = torch.zeros(source.n, dtype=torch.int64)
    if (masked is None and not whole_rows and sink.from_inputs is not None
            and hasattr(source, "raw_blocks")):
        # merged from the stored inputs to the output's bytes in one sweep (pcb_fast.cpu.native)
        for seg, lo, hi, natives in source.raw_blocks(block_width, options=options):
            if not sink.from_inputs(seg, lo, hi, natives, lam, divisor):  # not finite, or not for the kernel
                _weighted_block(source, options, sink, source.task_vectors(seg, lo, hi, natives), lam, divisor)
            kept += hi - lo
        return kept
    for block in source.blocks(block_width, whole_rows=whole_rows, options=options):
        tv = block.tv
        if masked is not None:
            raise_if_not_finite(source, options, block, tv.abs().amax(1))
            tv, mask = masked(block)
            kept += mask.sum(1)
            sink(block.segment, block.lo, block.hi, _over(sum_over_tasks(tv if lam is None else tv * lam), divisor))
        else:
            kept += tv.shape[1]
            _weighted_block(source, options, sink, block, lam, divisor)
    return kept


def _over(total, divisor):
    return total if divisor is None else total / divisor


def _weighted_block(source, options, sink, block, lam, divisor) -> None:
    tv = block.tv
    total = sum_over_tasks(tv if lam is None else tv * lam)
    # NaN and Inf in any task vector reach the total (x + Inf, 0 * Inf and Inf - Inf are not
    # finite): a finite sum of the total clears the block in one read of m entries, not n * m
    if not math.isfinite(float(total.sum())):
        raise_if_not_finite(source, options, block, tv.abs().amax(1))
    sink(block.segment, block.lo, block.hi, _over(total, divisor))


def merge_average(source, sink, options, *, lambdas=None, block_width=DEFAULT_BLOCK_WIDTH):
    """Weighted mean of the models (Wortsman et al., "Model soups", ICML 2022, uniform soup):
    theta_pre + sum_i w_i tau_i / sum_i w_i, weights ``lambdas`` (default 1; with ``lam=1``, the
    mean of the fine-tuned weights up to rounding)."""
    lam = lambda_column(lambdas, source.n)
    divisor = source.n if lam is None else float(lam.sum())
    if divisor <= 0:
        raise ValueError(f"lambdas={checks.short(lambdas)} sum to {divisor}; average weights must have a positive sum")
    return _weighted_sums(source, options, sink, lam, divisor=divisor, block_width=block_width)


def merge_task_arithmetic(source, sink, options, *, normalize=False, lambdas=None, block_width=DEFAULT_BLOCK_WIDTH):
    """Task arithmetic (Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023):
    theta_pre + lam * sum_i lambda_i tau_i (``normalize``: divided by sum_i lambda_i, mergekit's option)."""
    lam = lambda_column(lambdas, source.n)
    return _weighted_sums(source, options, sink, lam, divisor=normalizing_divisor(lam, source.n, normalize),
                          block_width=block_width)


def check_drop(p) -> float:
    p = checks.as_float("p", p)
    if not (0.0 <= p < 1.0):
        raise ValueError(f"p={checks.short(p)} is out of range; valid: 0 <= p < 1 (the drop probability)")
    return p


def check_drops(p, n: int):
    """One drop probability for every task (a float), or one per task (a list of n floats)."""
    return checks.check_per_task("p", p, n, check_drop)


RESCALE = ("inverse", "l1", "none")
L1_EPS = 1e-7  # mergekit's: below it, a norm is treated as zero and the kept entries are not rescaled


def l1_factors(source, options, keep_mask, block_width: int) -> torch.Tensor:
    """[n, 1] float32 factors of ``rescale="l1"`` (mergekit's ``rescale: true``): per task,
    sum |tau_i| / sum |tau_i * keep_i| over the source (a tensor, or the whole model in global
    scope), 1 where either sum is below 1e-7. One pass, with the NaN/Inf check; ``keep_mask(block)``
    gives the block's [n, m] kept mask. A tensor that fits one block is summed by torch.sum in
    float32 on one thread (the bits of mergekit's ``tensor.abs().sum()`` on one thread, whatever
    the merge's thread count); the block sums of a larger tensor, and
    the tensors of a whole model, are added in float64."""
    n = source.n
    sums = {}  # segment key -> float64 [2, n]: sum |tau|, sum |tau * keep|
    scratch = torch.empty(2, n * block_width)  # reused: fresh temporaries per block cost page faults
    for block in source.blocks(block_width, options=options):
        if block.segment.parts:  # (its tensors would be summed as one: MethodSpec.packable rules this out)
            raise RuntimeError("DARE's L1 factors of a whole model cannot be summed over packs of keys")
        shape = block.tv.shape
        magnitude = torch.abs(block.tv, out=scratch[0, : block.tv.numel()].view(shape))
        raise_if_not_finite(source, options, block, magnitude.amax(1))
        total = sums.setdefault(block.segment.key, torch.zeros(2, n, dtype=torch.float64))
        # |tau * keep| == |tau| * keep for a 0/1 keep; a bool mask is read as uint8 (the same 0/1 values:
        # torch's float * bool takes a much slower promotion path)
        keep = keep_mask(block)
        keep = keep.view(torch.uint8) if keep.dtype == torch.bool else keep
        kept = torch.mul(magnitude, keep, out=scratch[1, : block.tv.numel()].view(shape))
        with one_thread():  # else a row longer than torch's grain size is summed in one part per thread
            # each row reduced as mergekit reduces one tensor (the same bits as row by row, tested)
            total[0] += magnitude.sum(1).double()
            total[1] += kept.sum(1).double()
    # each tensor's sums rounded to float32 (a no-op for a tensor of one block), then added
    before, after = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    for total in sums.values():
        before += total[0].float().double()
        after += total[1].float().double()
    before, after = before.float(), after.float()
    factors = torch.where((before < L1_EPS) | (after < L1_EPS), torch.ones(n), before / after)
    return factors.unsqueeze(1)


def check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed={checks.short(seed)} must be a non-negative integer")
    return seed


def dare_keep(block, p, seed: int) -> torch.Tensor:
    """[n, m] DARE keep mask of a block (``p``: one drop probability, or one per task); in a block of a
    pack of small keys, each entry from its own key's stream at its place in that key."""
    ps = p if isinstance(p, list) else [p] * block.tv.shape[0]
    if block.segment.parts:
        pieces = block.segment.pieces(block.lo, block.hi)  # (columns by itemgetter: many small keys)
        parts, los, starts, ends = (list(map(operator.itemgetter(i), pieces)) for i in (0, 1, 3, 4))
        lengths = torch.tensor(list(map(operator.sub, ends, starts)))
        piece = torch.repeat_interleave(torch.arange(len(pieces)), lengths)
        shift = torch.tensor(list(map(operator.sub, los, starts)))  # place in the key - column
        streams = rng.stream_constants(seed, len(ps), list(map(operator.itemgetter(0), parts)))[:, piece]
        return rng.keep_masks_in_streams(streams, torch.arange(block.tv.shape[1]) + shift[piece], ps)
    if native.problem() is not None:  # no C compiler: the same values from torch's int64 ops
        return rng.keep_masks(seed, block.segment.key, block.lo, block.hi, ps)
    streams = [rng.stream_constant(seed, i, block.segment.key) for i in range(len(ps))]
    return native.dare_keep_masks(block.lo, block.hi - block.lo, streams, [rng.mix32(h) for h in streams],
                                  [rng.keep_threshold(x) for x in ps])


def dare_block(block, p, seed: int, rescale: str = "inverse", factors: torch.Tensor | None = None):
    """(dropped block, keep) for a block: DARE's drop from the counter-based generator, the survivors
    rescaled by 1/(1 - p) (``rescale="inverse"``, the paper's), by the [n, 1] ``factors`` of
    :func:`l1_factors` ("l1", mergekit's), or not at all ("none")."""
    keep = dare_keep(block, p, seed)
    if rescale == "none":
        return block.tv * keep, keep
    if rescale == "l1":
        return block.tv * keep * factors, keep
    if isinstance(p, list):  # 1 - p_i rounded to float32, as the scalar divisor is
        return block.tv * keep / torch.tensor([1 - x for x in p], dtype=torch.float32).unsqueeze(1), keep
    return block.tv * keep / (1 - p), keep


def dare_options(source, options, p, seed, rescale, block_width):
    """Validated (p, seed, rescale, l1 factors or None) of DARE and DARE-TIES."""
    p, seed = check_drops(p, source.n), check_seed(seed)
    checks.check_choice("rescale", rescale, RESCALE)
    factors = None
    if rescale == "l1":
        factors = l1_factors(source, options, lambda block: dare_keep(block, p, seed),
                             source.block_width(block_width, options))
    return p, seed, rescale, factors


def pack_index(parts) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(entries, first position in the pack, tensor of each entry) of the parts of a pack of small keys."""
    lengths = torch.tensor([part.numel for part in parts])
    starts = torch.tensor([part.offset for part in parts])
    return lengths, starts, torch.repeat_interleave(torch.arange(len(parts)), lengths)


def sorted_in_tensors(values: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
    """Each row of float32 ``values`` [n, m] (no NaN) sorted within the tensors of a pack (``tensor``:
    each entry's, ascending), as int64 keys: the tensor in the high 32 bits, above an order-preserving
    code of the value (-0 before +0); :func:`values_at` reads them back."""
    code = order_keys(values).long() + (1 << 31)  # (non-negative: below the tensor's bits)
    return torch.sort((tensor << 32) | code, dim=1).values


def values_at(order: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
    """float32 [n, k]: the values of :func:`sorted_in_tensors` ``order`` at the [n, k] positions ``at``."""
    return keys_to_float((order.gather(1, at) & 0xFFFFFFFF) - (1 << 31))


def dare_packs(source, options, p, seed, rescale, lam):
    """(block, weighted [n, m], keep [n, m], tensor of each entry) of a pack of small whole tensors
    (``source``: one pack segment, scope="tensor"): :func:`dare_weighted` of the whole pack, rescaled
    ("l1") by each tensor's factors, summed as :func:`l1_factors` sums one tensor. Checks p, seed and
    rescale."""
    n = source.n
    p, seed = check_drops(p, n), check_seed(seed)
    checks.check_choice("rescale", rescale, RESCALE)
    (pack,) = source.segments
    for block in source.blocks(pack.numel, options=options):  # one block: the whole pack
        magnitude = block.tv.abs()
        raise_if_not_finite(source, options, block, magnitude.amax(1))
        parts = block.segment.parts
        tensor = pack_index(parts)[2]
        keep = dare_keep(block, p, seed)
        factors = _l1_factors_of_tensors(magnitude, keep, parts)[:, tensor] if rescale == "l1" else None
        yield block, dare_weighted(block, keep, p, rescale, factors, lam), keep, tensor


def dare_weighted(block, keep: torch.Tensor, p, rescale: str, factors, lam: torch.Tensor) -> torch.Tensor:
    """DARE's kept entries of a block (``keep``: :func:`dare_keep`), rescaled and weighted by the [n, 1]
    ``lam``, with the float32 operations of the C loops (pcb_fast.cpu.native: (x * keep) / (1 - p),
    or * factor ("l1"; ``factors`` [n, 1] or per entry), then * lam): a block of a pack, whose
    entries the C loops would take key by key, gets their bits."""
    ps = p if isinstance(p, list) else [p] * block.tv.shape[0]
    dropped = block.tv * keep
    if rescale == "inverse":
        return (dropped / torch.tensor([1 - x for x in ps], dtype=torch.float32).unsqueeze(1)) * lam
    return (dropped * (factors if rescale == "l1" else 1.0)) * lam


def _l1_factors_of_tensors(magnitude: torch.Tensor, keep: torch.Tensor, parts) -> torch.Tensor:
    """[n, tensors] float32: :func:`l1_factors` of each tensor of a pack alone (each tensor's sums are
    torch's sums of its own [n, numel] block, on one thread, as there)."""
    sums = torch.empty(2, magnitude.shape[0], len(parts))
    with one_thread():
        for j, part in enumerate(parts):
            own = magnitude[:, part.offset : part.offset + part.numel].contiguous()
            sums[0, :, j] = own.sum(1)
            sums[1, :, j] = torch.mul(own, keep[:, part.offset : part.offset + part.numel]).sum(1)
    before, after = sums[0], sums[1]
    return torch.where((before < L1_EPS) | (after < L1_EPS), torch.ones(()), before / after)


def merge_dare_tensors(source, sink, options, *, p=0.9, seed=0, rescale="inverse", normalize=False, lambdas=None,
                       block_width=DEFAULT_BLOCK_WIDTH):
    """:func:`merge_dare` with scope="tensor" on a pack of small whole tensors (core.engine.run's
    ``merge_tensors``): :func:`dare_packs`, then the sum over tasks in task order: the values of
    merge_dare on each tensor alone, bit for bit."""
    lam = lambda_column(lambdas, source.n)
    divisor = normalizing_divisor(lam, source.n, normalize)
    kept = torch.zeros(source.n, dtype=torch.int64)
    for block, weighted, keep, _ in dare_packs(source, options, p, seed, rescale, fused_cpu.weights(lam, source.n)):
        kept += keep.sum(1)
        sink(block.segment, block.lo, block.hi, _over(sum_over_tasks(weighted), divisor))
    return kept


def merge_dare(source, sink, options, *, p=0.9, seed=0, rescale="inverse", normalize=False, lambdas=None,
               block_width=DEFAULT_BLOCK_WIDTH):
    """DARE (Yu et al., "Language Models are Super Mario", ICML 2024): drop each entry of each task
    vector with probability p, rescale the survivors by 1/(1-p), then task arithmetic. The drop of
    entry j of key k in task i is a pure function of (seed, i, k, j): see pcb_fast.core.rng.

    mergekit's options: ``p`` per task (a list: mergekit's per-model density is 1 - p),
    ``rescale="l1"`` (the survivors of each task rescaled so that their L1 norm is the task
    vector's, per tensor in scope "tensor"; mergekit's ``rescale: true``) or ``"none"``, and
    ``normalize`` (divide by the sum of the weights)."""
    lam = lambda_column(lambdas, source.n)
    divisor = normalizing_divisor(lam, source.n, normalize)
    if rescale == "l1":
        plan_passes(options, "l1 norms", "merge")
    p, seed, rescale, factors = dare_options(source, options, p, seed, rescale, block_width)
    if fused_cpu.applies(options) and fused_cpu.has_loops("dare", dict(p=p, rescale=rescale,
                                                                       normalize=divisor is not None)):
        # the drop, the sum and the NaN check in one loop per block
        lam = fused_cpu.weights(lambda_column(lambdas, source.n), source.n)
        kept = torch.zeros(source.n, dtype=torch.int64)
        for block in source.blocks(block_width, options=options):
            if block.segment.parts:  # a pack of small keys (global scope): their own streams, the loops' bits
                keep = dare_keep(block, p, seed)
                total = sum_over_tasks(dare_weighted(block, keep, p, rescale, factors, lam))
                keep, row_max = keep.sum(1), block.tv.abs().amax(1)
            else:
                total, keep, row_max = fused_cpu.dare_sum(block, p, seed, rescale, factors, lam)
            raise_if_not_finite(source, options, block, row_max)
            kept += keep
            sink(block.segment, block.lo, block.hi, _over(total, divisor))
        return kept
    return _weighted_sums(source, options, sink, lam, masked=lambda b: dare_block(b, p, seed, rescale, factors),
                          divisor=divisor, block_width=block_width)


def check_band(gamma, beta, band: str = "row") -> tuple[float, float]:
    gamma, beta = checks.as_float("gamma", gamma), checks.as_float("beta", beta)
    if not (0.0 <= gamma < 1.0):
        raise ValueError(f"gamma={checks.short(gamma)} is out of range; valid: 0 <= gamma < 1 (the top fraction dropped)")
    if band == "tensor":  # mergekit's band: the drop shrinks when gamma + beta > 1
        if not (0.0 < beta <= 1.0):
            raise ValueError(f"beta={checks.short(beta)} is out of range; valid: 0 < beta <= 1 (the fraction kept)")
    elif not (0.0 < beta <= 1.0) or gamma + beta > 1.0:
        raise ValueError(f"beta={checks.short(beta)} is out of range; valid: 0 < beta <= 1 - gamma (the fraction kept below the top)")
    return gamma, beta


BANDS = ("row", "tensor")


def check_bands(gamma, beta, band: str, n: int):
    """(gamma, beta): floats, or with ``band="tensor"`` lists of one per task (per-model density)."""
    checks.check_choice("band", band, BANDS)
    lists = isinstance(gamma, (list, tuple)) or isinstance(beta, (list, tuple))
    if not lists:
        return check_band(gamma, beta, band)
    if band != "tensor":
        raise ValueError("gamma and beta per model need band='tensor' (mergekit's band over each tensor)")
    # the lengths first; each (gamma, beta) pair is then checked together
    gammas, betas = (checks.check_per_task(name, value, n, lambda v: v) for name, value in (("gamma", gamma),
                                                                                           ("beta", beta)))
    gammas = gammas if isinstance(gammas, list) else [gammas] * n
    betas = betas if isinstance(betas, list) else [betas] * n
    pairs = [check_band(g, b, band) for g, b in zip(gammas, betas)]
    return [g for g, _ in pairs], [b for _, b in pairs]


def band_bounds(magnitude: torch.Tensor, drop: int, keep: int):
    """Per row of ``magnitude`` [..., L], the values at descending ranks drop and drop + keep - 1
    (keep >= 1), from two order statistics instead of a sort."""
    L = magnitude.shape[-1]
    if drop + keep <= L // 2:  # a partial top-k is cheaper than two order statistics of the row
        best = torch.topk(magnitude, drop + keep, dim=-1, sorted=False).values
        return best.kthvalue(keep, dim=-1, keepdim=True).values, best.amin(-1, keepdim=True)
    return (magnitude.kthvalue(L - drop, dim=-1, keepdim=True).values,
            magnitude.kthvalue(L - drop - keep + 1, dim=-1, keepdim=True).values)


def band_mask(magnitude: torch.Tensor, drop: int, keep: int) -> torch.Tensor:
    """Rows of ``magnitude`` [..., L]: True at the entries of descending rank in [drop, drop + keep),
    ties ranked by position, found from two order statistics per row instead of a sort."""
    if keep == 0:
        return torch.zeros_like(magnitude, dtype=torch.bool)
    top, low = band_bounds(magnitude, drop, keep)
    at_top, at_low = magnitude == top, magnitude == low
    inside = (magnitude <= top) & (magnitude >= low)
    # A boundary value that occurs once in its row sits exactly at its rank (drop, drop + keep - 1):
    # kept. Rows where a boundary value repeats need the rank of each copy, by position.
    tied = (at_top.sum(-1, keepdim=True) > 1) | (at_low.sum(-1, keepdim=True) > 1)
    if bool(tied.any()):
        rows = tied.squeeze(-1)
        sub, sub_inside = magnitude[rows], (magnitude[rows] < top[rows]) & (magnitude[rows] > low[rows])
        for value in (top[rows], low[rows]):
            equal = sub == value
            rank = (sub > value).sum(-1, keepdim=True) + equal.cumsum(-1) - 1
            sub_inside |= equal & (rank >= drop) & (rank < drop + keep)
        inside[rows] = sub_inside
    return inside


def ranked_band(magnitude: torch.Tensor, group: torch.Tensor, sizes: torch.Tensor, drop: torch.Tensor,
                keep: torch.Tensor, last_larger: bool = False) -> torch.Tensor:
    """[n, m] bool: in every group of entries of each row of ``magnitude`` (|tau|, [n, m]; ``group``:
    each entry's, ascending from 0, ``sizes`` [groups] entries each), the entries of descending rank
    in [drop, drop + keep) (``drop``, ``keep``: [groups], or [n, groups]), ties ranked by position, the
    first as the larger (:func:`band_mask`) or, with ``last_larger``, the last (:func:`tensor_band_block`):
    one stable sort of (group, magnitude) keys for a pack of many small tensors or rows."""
    n, m = magnitude.shape
    code = magnitude.view(torch.int32).long()  # |tau| >= 0: its float32 bits order it
    # ascending magnitude (its ascending rank, ties first by position) or descending (its descending rank)
    order = torch.sort((group << 32) | (code if last_larger else 0xFFFFFFFF - code), dim=1, stable=True).indices
    starts = torch.cumsum(sizes, 0) - sizes
    rank = torch.empty_like(order).scatter_(1, order, (torch.arange(m) - starts[group]).expand(n, -1))
    if last_larger:
        rank = sizes[group] - 1 - rank
    drop, keep = drop.reshape(-1, sizes.numel())[:, group], keep.reshape(-1, sizes.numel())[:, group]
    return (rank >= drop) & (rank < drop + keep)


def _pack_rows(block) -> tuple[torch.Tensor, torch.Tensor]:
    """(row of each entry, length of each row) of a block of a pack of whole tensors."""
    lengths, rows = [], []
    for part, lo, hi, _, _ in block.segment.pieces(block.lo, block.hi):
        row = row_length(part.shape)
        lengths.append(row)
        rows.append((hi - lo) // row)
    sizes = torch.repeat_interleave(torch.tensor(lengths), torch.tensor(rows))
    return torch.repeat_interleave(torch.arange(sizes.numel()), sizes), sizes


def breadcrumbs_block(block, gamma: float, beta: float):
    """(tau * band, band) for a block of whole rows: Breadcrumbs' per-row magnitude band (in a block
    of a pack of small keys, each row of each key)."""
    n = block.tv.shape[0]
    if block.segment.parts:
        group, sizes = _pack_rows(block)
        lengths, which = torch.unique(sizes, return_inverse=True)
        bands = torch.tensor([[int(gamma * row), int(beta * row)] for row in lengths.tolist()])[which]
        mask = ranked_band(block.tv.abs(), group, sizes, bands[:, 0], bands[:, 1])
        return block.tv * mask, mask
    row = row_length(block.segment.shape)
    magnitude = block.tv.abs().reshape(n, -1, row)
    mask = band_mask(magnitude, int(gamma * row), int(beta * row)).reshape(n, -1)
    return block.tv * mask, mask


def tensor_band_block(block, gamma, beta):
    """(tau * band, band) for a block holding whole tensors' task vectors ([n, numel], one segment):
    mergekit's Breadcrumbs band over each tensor. Per task (``gamma``, ``beta``: floats or lists of
    n), with N = numel, keep = int(beta N) and drop = min(int(gamma N), N - keep): the entries of
    descending rank [drop, drop + keep) of |tau|, ties ranked as mergekit's stable ascending sort
    ranks them (of equal magnitudes, the later position counts as the larger)."""
    n, N = block.tv.shape
    gammas = gamma if isinstance(gamma, list) else [gamma] * n
    betas = beta if isinstance(beta, list) else [beta] * n
    magnitude = block.tv.abs()
    if block.segment.parts:  # a pack of small whole tensors: each tensor's own band
        sizes = torch.tensor([hi - lo for _, lo, hi, _, _ in block.segment.pieces(block.lo, block.hi)])
        numels, which = torch.unique(sizes, return_inverse=True)
        keep = torch.tensor([[int(b * size) for size in numels.tolist()] for b in betas])
        drop = torch.minimum(torch.tensor([[int(g * size) for size in numels.tolist()] for g in gammas]), numels - keep)
        group = torch.repeat_interleave(torch.arange(sizes.numel()), sizes)
        mask = ranked_band(magnitude, group, sizes, drop[:, which], keep[:, which], last_larger=True)
        return block.tv * mask, mask
    mask = torch.empty(n, N, dtype=torch.bool)
    for i in range(n):
        keep = int(betas[i] * N)
        drop = min(int(gammas[i] * N), N - keep)
        # band_mask ranks ties by position, the first as the larger: on the reversed row, the last
        mask[i] = band_mask(magnitude[i : i + 1].flip(-1), drop, keep).flip(-1)[0]
    return block.tv * mask, mask


def breadcrumbs_blocks(source, options, gamma, beta, band: str, block_width: int):
    """(block, masked block, mask) of every block: whole rows (band "row") or whole tensors ("tensor")."""
    if band == "tensor":
        for block in source.blocks(max(s.numel for s in source.segments), options=options):
            yield block, *tensor_band_block(block, gamma, beta)
    else:
        for block in source.blocks(block_width, whole_rows=True, options=options):
            yield block, *breadcrumbs_block(block, gamma, beta)


def merge_breadcrumbs(source, sink, options, *, gamma=0.01, beta=0.1, band="row", normalize=False, lambdas=None,
                      block_width=DEFAULT_BLOCK_WIDTH):
    """Model Breadcrumbs (Davari & Belilovsky, ECCV 2024): in every row (last dimension) of every
    tensor, drop the int(gamma L) largest |tau| and keep the next int(beta L); then task arithmetic.

    ``band="tensor"`` is mergekit's: the band is taken over each whole tensor (N entries; gamma
    and beta may then be lists, one per task), the drop shrinking so that int(beta N) entries are
    kept; the tensor is read whole. ``normalize``: divide by the sum of the weights (mergekit)."""
    gamma, beta = check_bands(gamma, beta, band, source.n)
    lam = lambda_column(lambdas, source.n)
    divisor = normalizing_divisor(lam, source.n, normalize)
    if band == "tensor":  # (blocks of whole tensors, or of packs of them)
        return _weighted_sums(source, options, sink, lam, masked=lambda b: tensor_band_block(b, gamma, beta),
                              divisor=divisor, block_width=max(max(s.numel for s in source.segments), block_width))
    if fused_cpu.applies(options) and divisor is None:
        return _merge_breadcrumbs_fused(source, options, sink, gamma, beta, fused_cpu.weights(lam, source.n),
                                        block_width)
    return _weighted_sums(source, options, sink, lam, masked=lambda b: breadcrumbs_block(b, gamma, beta),
                          divisor=divisor, whole_rows=True, block_width=block_width)


def _fused_band_bounds(tv: torch.Tensor, drop: int, keep: int):
    """band_bounds of |tv| by the C row select of pcb_fast.cpu.native (same values, no |tv| stored, about
    8x faster), or by torch where that kernel cannot be built."""
    problem = native.problem()
    if problem is None:
        return native.row_order_statistics(tv, drop, drop + keep - 1)
    warnings.warn(f"pcb_fast: native row select unavailable ({problem}); Breadcrumbs places "
                  f"its band with torch.topk (same values, slower)", stacklevel=3)
    return band_bounds(tv.abs(), drop, keep)


def _merge_breadcrumbs_fused(source, options, sink, gamma, beta, lam, block_width):
    """Breadcrumbs with the band's bounds from the native row select and the band, the sum over
    tasks and the NaN check in one compiled loop per block (per key in a block of a pack of small
    keys); rows where a bound repeats (ties ranked by position) are redone with the eager band_mask."""
    kept = torch.zeros(source.n, dtype=torch.int64)
    for block in source.blocks(block_width, whole_rows=True, options=options):
        pieces = [block] if not block.segment.parts else [
            Block(part, lo, hi, block.tv[:, start:end].contiguous())
            for part, lo, hi, start, end in block.segment.pieces(block.lo, block.hi)]
        totals = []
        for piece in pieces:
            total, piece_kept = _fused_band(source, options, piece, gamma, beta, lam)
            totals.append(total)
            kept += piece_kept
        sink(block.segment, block.lo, block.hi, totals[0] if len(totals) == 1 else torch.cat(totals))
    return kept


def _fused_band(source, options, block, gamma, beta, lam):
    """(sum over tasks, kept per task) of :func:`_merge_breadcrumbs_fused` for a block of one key."""
    n = block.tv.shape[0]
    row = row_length(block.segment.shape)
    drop, keep = int(gamma * row), int(beta * row)
    if keep == 0:
        raise_if_not_finite(source, options, block, block.tv.abs().amax(1))
        return torch.zeros(block.tv.shape[1]), torch.zeros(n, dtype=torch.int64)
    tv = block.tv.reshape(n, -1, row)
    top, low = _fused_band_bounds(tv, drop, keep)
    total, tied, row_max = fused_cpu.band_block(tv, top, low, lam)
    raise_if_not_finite(source, options, block, row_max.amax(1))
    kept = torch.full((n,), keep * tv.shape[1])  # exactly `keep` per row where the bounds are single
    redo = tied.any(0).nonzero().flatten()
    if redo.numel():
        sub = tv[:, redo]
        mask = band_mask(sub.abs(), drop, keep)
        kept += mask.sum((1, 2)) - keep * redo.numel()
        total.view(-1, row)[redo] = sum_over_tasks((sub * mask).reshape(n, -1) * lam).view(-1, row)
    return total, kept


NORMALIZE_HELP = "divide by the sum of the weights (mergekit's normalize)"
AVERAGE = MethodSpec(
    name="average", merge=merge_average, summary="Linear (model soup)",
    citation="Wortsman et al., Model soups, ICML 2022", url="https://arxiv.org/abs/2203.05482",
    backends=("torch", "triton", "reference"), mergekit="linear", mergekit_defaults={"scope": "tensor"},
    single_pass=lambda params: True, uses_statistics=False, packable=lambda params: True, merge_tensors=merge_average)
TASK_ARITHMETIC = MethodSpec(
    name="task_arithmetic", merge=merge_task_arithmetic, summary="Task Arithmetic",
    citation="Ilharco et al., Editing Models with Task Arithmetic, ICLR 2023", url="https://arxiv.org/abs/2212.04089",
    params=(Param("normalize", False, flag("normalize"), NORMALIZE_HELP, engine_only=True, kind="bool", flag=False),),
    backends=("torch", "triton", "reference"), mergekit="task_arithmetic",
    mergekit_defaults={"scope": "tensor", "normalize": False}, searchable=True,
    single_pass=lambda params: True, uses_statistics=False, packable=lambda params: True,
    merge_tensors=merge_task_arithmetic)  # (no statistics: a pack's sums are each key's)
DARE_PARAMS = (
    Param("p", 0.9, check_drop, "drop probability", per_model=True),
    Param("seed", 0, check_seed, "seed of the drop mask", kind="int"),
    Param("rescale", "inverse", choice("rescale", RESCALE),
          "inverse (1/(1-p)), l1 (mergekit's rescale: true) or none", engine_only=True, kind="rescale", flag=False),
)
DARE = MethodSpec(
    name="dare", merge=merge_dare, summary="DARE",
    citation="Yu et al., Language Models are Super Mario, ICML 2024", url="https://arxiv.org/abs/2311.03099",
    params=DARE_PARAMS + (Param("normalize", False, flag("normalize"), NORMALIZE_HELP, engine_only=True, kind="bool",
                                flag=False),),
    backends=("torch", "triton", "reference"), loops=("c",), mergekit="dare_linear",
    mergekit_defaults={"scope": "tensor", "density": 1.0, "rescale": "l1", "normalize": False}, searchable=True,
    single_pass=lambda params: params.get("rescale", "inverse") != "l1", merge_tensors=merge_dare_tensors,
    # each entry's drop from its key's stream, also in a pack; the L1 factors of a whole model sum tensor by tensor
    packable=lambda params: params.get("rescale", "inverse") != "l1")
BAND_PARAMS = (
    Param("gamma", 0.01, lambda v: checks.as_float("gamma", v), "top fraction dropped per row", per_model=True),
    Param("beta", 0.1, lambda v: checks.as_float("beta", v), "next fraction kept per row", per_model=True),
    Param("band", "row", choice("band", BANDS), "row (the authors') or tensor (mergekit's)", engine_only=True,
          kind="choice", flag=False),
)


def check_band_params(params: dict, n: int) -> None:
    check_bands(params["gamma"], params["beta"], params["band"], n)


BREADCRUMBS = MethodSpec(
    name="breadcrumbs", merge=merge_breadcrumbs, summary="Model Breadcrumbs",
    citation="Davari & Belilovsky, Model Breadcrumbs, ECCV 2024", url="https://arxiv.org/abs/2312.06795",
    params=BAND_PARAMS + (Param("normalize", False, flag("normalize"), NORMALIZE_HELP, engine_only=True, kind="bool",
                                flag=False),),
    check_together=check_band_params, backends=("torch", "triton", "reference"), loops=("compiled",),
    mergekit="breadcrumbs", packable=lambda params: True,  # (a band lies in one row or tensor: no key shares it)
    merge_tensors=merge_breadcrumbs,
    mergekit_defaults={"scope": "tensor", "density": 1.0, "gamma": 0.01, "band": "tensor", "normalize": False},
    single_pass=lambda params: True)
