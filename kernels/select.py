"""Exact order statistics on the device: a sampled bracket counted in one pass, and a radix select
of four byte-wide levels as the exact fallback (docs/design.md 3.3, 4).

``DeviceBracket``: a column sample of the values gives, per task and rank, a bracket [floor,
ceiling] that holds the rank with overwhelming probability (six standard deviations of the
sample's rank error on each side). One pass counts the values below the floor, at the floor and at
the ceiling, and copies those strictly inside (about 1% of them at a sample of 2^18 columns) to a
buffer, reserving room with one atomic per program, task and rank: no per-entry atomics, and ties
at a bound (exact zeros, quantized values) cost counts only. The counts and a sort of the copied
values give the exact order statistic. If a bracket missed (the counts say so; or the buffer
overflowed), the caller falls back to the radix select below. Several groups (scope "tensor": one
per key) share one bracket pass, each with its own sample, bounds and room in the buffer.

``DeviceSelect``: a float32 maps to an int32 key with the float's order (negatives get every bit but
the sign flipped), read as an unsigned number with the sign bit flipped. Level 1 counts the top
byte of the keys of every task row into [n, 256] int64 histograms; :func:`find_kernel` then finds,
on the device, the bin that holds each wanted rank; levels 2 to 4 count the next byte of the keys
that share the prefix found so far, which pins the exact key after four passes: ``sort(x_i)[rank]``
with no sort and no host round trip. Each program makes its histogram of its tile in the program
(``tl.histogram``) and adds it to the global one with one atomic per non-empty bin, so hot values
(exact zeros, quantized deltas) do not serialize on per-entry atomics. Counts are integers, so the
result does not depend on the order in which programs run. Several ranks per task share the passes.

Kernels that produce the values (|tau|, PCB scores) call :func:`count_values` on their tile, which
dispatches to :func:`bracket_tally` (LEVEL 0) or :func:`radix_count` (LEVELs 1 to 4); the values
are never written to memory, except the few inside a bracket.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .keys import keys_to_float, order_keys
from .tiles import on_device, to_device

BINS_BITS = 8  # bits of the key counted per radix level: 4 levels of 256 bins
BINS = tl.constexpr(1 << BINS_BITS)
LEVELS = 32 // BINS_BITS
INT32_MIN = -(1 << 31)
INT32_MAX = (1 << 31) - 1
# the same bounds for use inside kernels (compiled kernels read only constexpr globals)
KEY_MIN = tl.constexpr(INT32_MIN)
KEY_MAX = tl.constexpr(INT32_MAX)
# copies of a bracket slot's counters: a program adds its counts to copy (tile mod STRIPES), so the
# atomics of a pass's programs spread over STRIPES addresses (8 cache lines) instead of one
TALLY_STRIPES = 64
STRIPES = tl.constexpr(TALLY_STRIPES)


@triton.jit
def order_key(x):
    """int32 key of float32 ``x`` whose signed order is the float order."""
    bits = x.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def radix_count(key, ok, g, i, n, hist_ptr, bucket_ptr, map_ptr, LEVEL: tl.constexpr, R: tl.constexpr,
                BLOCK: tl.constexpr):
    """Count the keys of task ``i`` of group ``g`` over this program's columns (entries where ``ok``)
    by their LEVEL-th byte from the top (of the key as an unsigned number) into the level's
    histograms, at row h n + i where h = map[g] (the group's place among those the select counts; a
    group that is not counted is never launched). The program's histogram is made in the program
    (tl.histogram) and flushed once with one atomic per non-empty bin: no per-entry global atomics.

    Level 1: hist [rows, 256]. Levels 2-4: hist [rows, R, 256], only keys whose higher bytes equal the
    prefix chosen for rank r so far (bucket_ptr: [rows, R] int64).
    """
    unsigned = key ^ KEY_MIN  # the order as unsigned 32-bit numbers (the sign bit flipped)
    digit = (unsigned >> (32 - 8 * LEVEL)) & 0xFF
    row = tl.load(map_ptr + g) * n + i  # int64
    bins = tl.arange(0, BINS)
    if LEVEL == 1:
        _flush(digit, ok, hist_ptr + row * BINS + bins, BLOCK)
    else:
        higher = (unsigned >> (40 - 8 * LEVEL)) & ((1 << (8 * (LEVEL - 1))) - 1)  # the bytes above
        for r in tl.static_range(R):
            prefix = tl.load(bucket_ptr + row * R + r)
            _flush(digit, ok & (higher.to(tl.int64) == prefix), hist_ptr + (row * R + r) * BINS + bins, BLOCK)


@triton.jit
def _flush(digit, ok, at, BLOCK: tl.constexpr):
    """Add this program's histogram of ``digit`` (entries where ``ok``) to the bins at ``at``: one atomic
    per non-empty bin. Entries left out count in bin 0 and are taken off it (tl.histogram's mask
    argument is not in every Triton version this project supports)."""
    counts = tl.histogram(tl.where(ok, digit, 0), BINS)
    left_out = BLOCK - tl.sum(ok.to(tl.int32), axis=0)
    counts = counts - tl.where(tl.arange(0, BINS) == 0, left_out, 0)
    tl.atomic_add(at, counts.to(tl.int64), mask=counts != 0, sem="relaxed")


@triton.jit
def bracket_tally(value, ok, g, i, n, bounds_ptr, tally_ptr, kept_ptr, layout_ptr, copies, tile, tiles_ptr,
                  R: tl.constexpr, TILES: tl.constexpr, BLOCK: tl.constexpr):
    """For each rank r of task i of group g (slot = (g n + i) R + r), with floor f and ceiling c =
    bounds[slot]: count this program's values below f, equal to f and equal to c (c != f) into
    tally[slot, tile mod STRIPES, 0, 2, 3] (the caller sums the copies), and copy those strictly
    between them to the slot's room in ``kept`` (layout[slot] = (first place, capacity)), their places
    reserved with one atomic on tally[slot, 0, 1] (which ends as their number, even past the
    capacity), made only by a program that has some. Ties at a bound cost counts only, so heavy
    ties (exact zeros, quantized values) do not fill the buffer. With TILES, the tile number of each
    copy goes to tiles[the copy's place] and this program's counts at f and c to
    tiles[copies + (tile n R + i R + r) 2 + 0, 1] (TIES' exact top-k counts its ties per tile; a tile
    lies in one group)."""
    stripe = tile % STRIPES
    for r in tl.static_range(R):
        slot = (g * n + i) * R + r
        counts = tally_ptr + (slot * STRIPES + stripe) * 4  # this program's copy of the slot's counters
        floor = tl.load(bounds_ptr + 2 * slot)
        ceiling = tl.load(bounds_ptr + 2 * slot + 1)
        at_floor = tl.sum((ok & (value == floor)).to(tl.int32), axis=0)
        at_ceiling = tl.sum((ok & (value == ceiling)).to(tl.int32), axis=0)
        at_ceiling = tl.where(ceiling != floor, at_ceiling, 0)  # one bound: its ties counted once
        tl.atomic_add(counts, tl.sum((ok & (value < floor)).to(tl.int32), axis=0).to(tl.int64), sem="relaxed")
        tl.atomic_add(counts + 2, at_floor.to(tl.int64), sem="relaxed")
        tl.atomic_add(counts + 3, at_ceiling.to(tl.int64), sem="relaxed")
        inside = ok & (value > floor) & (value < ceiling)
        flags = inside.to(tl.int32)  # 32-bit in the program (BLOCK entries), 64-bit only in the scalars
        found = tl.sum(flags, axis=0)
        # the slot's one reservation counter; a program with nothing to copy skips it (its start unused)
        start = tl.atomic_add(tally_ptr + slot * STRIPES * 4 + 1, found.to(tl.int64), mask=found > 0, sem="relaxed")
        start = tl.where(found > 0, start, 0)
        rank = tl.cumsum(flags, axis=0) - 1  # the entry's place among this program's copies
        cap = tl.load(layout_ptr + 2 * slot + 1)
        room = tl.minimum(tl.maximum(cap - start, 0), BLOCK).to(tl.int32)  # places left in the slot's room
        first = tl.load(layout_ptr + 2 * slot) + start  # 64-bit: the buffer can pass 2^31 entries
        copied = inside & (rank < room)
        tl.store((kept_ptr + first) + rank, value, mask=copied)
        if TILES:
            tl.store((tiles_ptr + first) + rank, (rank * 0 + tile).to(tl.int32), mask=copied)
            at = tiles_ptr + copies + ((tile.to(tl.int64) * n + i) * R + r) * 2
            tl.store(at, at_floor)
            tl.store(at + 1, at_ceiling)


@triton.jit
def count_values(value, ok, g, i, n, tile, hist_ptr, bucket_ptr, map_ptr, bounds_ptr, tally_ptr, kept_ptr,
                 layout_ptr, copies, tiles_ptr, LEVEL: tl.constexpr, R: tl.constexpr, TILES: tl.constexpr,
                 BLOCK: tl.constexpr):
    """Count task i's float32 values (where ``ok``) of group g (the scope group: 0 in global scope,
    the part with scope "tensor") for the select in use: a bracket (LEVEL 0) or a radix-select level
    (1, 2). ``tile``: this program's tile number (recorded by a bracket with TILES)."""
    if LEVEL == 0:
        bracket_tally(value, ok, g, i, n, bounds_ptr, tally_ptr, kept_ptr, layout_ptr, copies, tile, tiles_ptr, R,
                      TILES, BLOCK)
    else:
        radix_count(order_key(value), ok, g, i, n, hist_ptr, bucket_ptr, map_ptr, LEVEL, R, BLOCK)


@triton.jit
def group_of(part, PER_PART: tl.constexpr):
    """The statistics' group of a program's part: the part itself with scope "tensor", else 0."""
    if PER_PART:
        g = part
    else:
        g = part * 0
    return g


@triton.jit
def find_kernel(hist_ptr, rank_ptr, index_ptr, below_ptr, R: tl.constexpr, PER_ROW: tl.constexpr):
    """For program q (task q // R, rank q % R): the histogram bin holding the rank, and the count of
    entries in the bins before it. Level-1 histograms are per task (PER_ROW=False), the others per
    (task, rank) (PER_ROW=True)."""
    q = tl.program_id(0).to(tl.int64)
    row = q if PER_ROW else q // R
    rank = tl.load(rank_ptr + q)
    counts = tl.load(hist_ptr + row * BINS + tl.arange(0, BINS))
    cumulative = tl.cumsum(counts, axis=0)
    # cumulative counts never decrease: the bin holding the rank is the number of bins whose
    # cumulative count does not exceed it, and the count before it is their largest one
    at_or_below = cumulative <= rank
    tl.store(index_ptr + q, tl.sum(at_or_below.to(tl.int64), axis=0))
    tl.store(below_ptr + q, tl.max(tl.where(at_or_below, cumulative, 0), axis=0))


class DeviceSelect:
    """Exact ``sort(x_i)[ranks[i, r]]`` for n streamed rows and R ranks per row, on the device: a radix
    select of LEVELS (4) passes, each counting one byte of the keys (from the top) into 256 bins.

    Usage: every pass over the rows calls a counting kernel with :meth:`kernel_args`; between passes
    call :meth:`next_level` (:attr:`LEVELS` passes in all; :meth:`passes` runs the loop); then
    :meth:`values` gives the [n, R] float32 statistics and :meth:`count_above` the number of entries
    above (or at and above) each one. The histograms are [n, R, 256] int64: a few KB per row.
    """

    LEVELS = LEVELS

    def __init__(self, ranks, lengths, device, groups=None):
        """``ranks`` [rows, R]; ``lengths``: the rows' length (an int, or one per row). ``groups``: for
        each group g of the scope (column "index" of the launch table; kernels launched with
        PER_PART), the place h of its rows h n + i among ``ranks``' rows (default: one group, 0)."""
        ranks = torch.as_tensor(ranks, dtype=torch.int64)  # checked on the host: no device synchronisation
        limit = torch.as_tensor(lengths, dtype=torch.int64).view(-1, 1)
        if bool((ranks < 0).any()) or bool((ranks >= limit).any()):
            raise ValueError(f"ranks {ranks.tolist()} out of range for rows of length {lengths}")
        self.ranks = to_device(ranks, device)
        self.n, self.R = self.ranks.shape
        self.length = lengths if isinstance(lengths, int) else to_device(limit, device)
        self.device = torch.device(device)
        self.map = on_device([0] if groups is None else list(groups), torch.int64, device)
        self.level = 1
        self.hist = torch.zeros(self.n, BINS, dtype=torch.int64, device=device)  # level 1: per row
        self.buckets = torch.zeros(self.n, self.R, dtype=torch.int64, device=device)  # the prefix chosen so far
        self.local_ranks = self.ranks  # each rank among the entries with that prefix
        self.below = torch.zeros(self.n, self.R, dtype=torch.int64, device=device)  # entries below the prefix

    def kernel_args(self) -> dict:
        """The keyword arguments of a counting kernel (:func:`count_values`) at the current level."""
        return dict(_unused_bracket_args(self.device), hist_ptr=self.hist, bucket_ptr=self.buckets, map_ptr=self.map,
                    LEVEL=self.level, R=self.R)

    def _find(self):
        """(bin, entries in the bins below it) of each (row, rank) at the current level."""
        index = torch.empty(self.n * self.R, dtype=torch.int64, device=self.device)
        below = torch.empty_like(index)
        find_kernel[(self.n * self.R,)](self.hist, self.local_ranks.contiguous(), index, below, R=self.R,
                                        PER_ROW=self.level > 1)
        return index.view(self.n, self.R), below.view(self.n, self.R)

    def next_level(self) -> None:
        """Extend each rank's prefix by the bin holding it at this level; start the next level."""
        if self.level >= LEVELS:
            raise RuntimeError(f"next_level() called after level {LEVELS}")
        index, below = self._find()
        self.buckets = (self.buckets << BINS_BITS) | index
        self.below = self.below + below
        self.local_ranks = self.local_ranks - below
        self.hist = torch.zeros(self.n, self.R, BINS, dtype=torch.int64, device=self.device)
        self.level += 1

    def _finish(self):
        if self.level != LEVELS:
            raise RuntimeError(f"values() needs all {LEVELS} levels counted")
        if not hasattr(self, "last"):
            self.last, below = self._find()
            self.smaller = self.below + below  # entries whose key is below the statistic's key
            self.equal = torch.gather(self.hist.view(self.n * self.R, BINS), 1,
                                      self.last.view(-1, 1)).view(self.n, self.R)
        return self.last

    def values(self) -> torch.Tensor:
        """The selected order statistics, float32 [n, R] on the device."""
        unsigned = (self.buckets << BINS_BITS) | self._finish()
        return keys_to_float(unsigned - (1 << 31))  # the sign bit flipped back: the int32 order key

    def count_above(self, inclusive: bool) -> torch.Tensor:
        """[n, R] int64: entries > each statistic, or >= it with ``inclusive``."""
        self._finish()
        return self.length - (self.smaller if inclusive else self.smaller + self.equal)


def _unused_bracket_args(device) -> dict:
    return dict(bounds_ptr=torch.zeros(2, device=device), tally_ptr=torch.zeros(2, dtype=torch.int64, device=device),
                kept_ptr=torch.zeros(1, device=device), layout_ptr=torch.zeros(2, dtype=torch.int64, device=device),
                copies=1, tiles_ptr=torch.zeros(1, dtype=torch.int32, device=device), TILES=False)


SAMPLE_ALL = 1 << 16  # groups of at most this many entries per task are sampled whole (the bracket is exact)
KEY_SAMPLE_COLUMNS = 1 << 16  # columns sampled per key with scope "tensor" (a sample per key, sorted at once)
# columns sampled from a group of D entries per task: one in 2048, within these bounds. A bracket spans
# about 12 sqrt(q (1 - q) / columns) of the entries, so a larger sample of a large model keeps the copies
# (the bracket's buffer) small: ~0.2% of a 7B model's entries per task at the keep threshold
SAMPLE_COLUMNS = (1 << 18, 1 << 22)
SIGMAS = 6  # a bracket's half-width in standard deviations of the sample's rank error (plus 8 ranks)
ROOM_FACTOR = 1.25  # a slot's room: this many times the copies its bracket should receive on this rank ...
ROOM_SLACK = 4096  # ... plus this many
CHUNK = 1 << 21  # sample values sorted, or copies resolved, at once: bounds the temporaries
SORT_BYTES = 32  # device bytes per sample value of a chunk being sorted (gathered, keyed, sorted, its order)
RESOLVE_BYTES = 48  # device bytes per copy of a chunk being resolved (keys, digits, masks, bins)


def sample_stride(D: int, columns: int | None = None) -> int:
    """One column in ``stride`` of a group of D entries per task goes into the sample: all of them up
    to SAMPLE_ALL, else an odd stride (never aligned with power-of-two shapes) giving about
    ``columns`` columns (default: D / 2048 within SAMPLE_COLUMNS; at least one in 17)."""
    if columns is None:
        columns = min(max(D >> 11, SAMPLE_COLUMNS[0]), SAMPLE_COLUMNS[1])
    return 1 if D <= SAMPLE_ALL else max(17, (D // columns) | 1)


def bracket_window(rank: int, length: int, s: int) -> tuple:
    """The sample ranks (lo, hi) bracketing ``rank`` of ``length`` entries, from a sample of ``s``
    (either may fall outside [0, s): that side of the bracket is then open)."""
    q = rank / length
    margin = SIGMAS * math.sqrt(s * q * (1 - q)) + 8
    return math.floor(q * s - margin), math.ceil(q * s + margin)


def bracket_plan(ranks: list, lengths: list, sizes: list, n: int, local: list | None = None, tiles: int = 0) -> dict:
    """The device memory of a bracket pass on one rank (:class:`DeviceBracket` allocates by it).

    ``ranks``: R ranks per group; ``lengths``: each group's entries per task over every rank;
    ``sizes``: each group's sampled columns; ``local``: each group's entries per task on this rank
    (default ``lengths``); ``tiles``: the tiles of a TIES exact top-k bracket (0: none). Each slot
    (group, task, rank) gets a room of ROOM_FACTOR times this rank's share of the entries its
    group's widest bracket spans, plus ROOM_SLACK, at most the rank's entries. Returns {"caps":
    each group's room per slot, "copies": the buffer's entries, "bytes": the most the bracket holds
    at once (its sample and scores, plus either a chunk's sort or the buffer, its counts, the tiles
    and a chunk's resolve)}."""
    local = list(lengths) if local is None else list(local)
    R = len(ranks[0])
    caps = []
    for group, length, own, s in zip(ranks, lengths, local, sizes):
        widest = 1
        for rank in group:
            lo, hi = bracket_window(rank, length, s)
            widest = max(widest, min(hi, s - 1) - max(lo, 0) + 1)
        caps.append(max(0, min(own, math.ceil(ROOM_FACTOR * widest * own / max(s, 1)) + ROOM_SLACK)))
    copies = sum(caps) * n * R
    slots = len(lengths) * n * R
    values = n * sum(sizes)
    sorting = 4 * values + min(values, max([CHUNK, *sizes])) * SORT_BYTES  # a chunk holds whole rows
    counting = 4 * copies + (96 + 32 * TALLY_STRIPES) * slots + (4 * (copies + tiles * n * R * 2) if tiles else 0) \
        + min(copies, CHUNK) * RESOLVE_BYTES
    return {"caps": caps, "copies": copies, "bytes": 4 * values + max(sorting, counting)}


def _sorted_rows(flat: torch.Tensor, sizes: list, n: int) -> tuple:
    """Every group's sample rows sorted: (values, row_start) where row (g, i) (g n + i) holds the
    s_g sorted values of task i's columns of group g at values[row_start[g n + i]:][:s_g]. ``flat``:
    [n, S], the groups' columns side by side. Rows are sorted CHUNK values at a time (whole rows),
    by one sort of 64-bit (row, order key) pairs each."""
    device = flat.device
    offsets = [0]
    for size in sizes:
        offsets.append(offsets[-1] + size)
    rows = [(g, i) for g in range(len(sizes)) for i in range(n)]
    row_start, total = [], 0
    for g, i in rows:
        row_start.append(total)
        total += sizes[g]
    out = torch.empty(total, dtype=torch.float32, device=device)
    k = 0
    while k < len(rows):
        chunk, count = [], 0
        while k < len(rows) and (not chunk or count + sizes[rows[k][0]] <= CHUNK):
            chunk.append(rows[k])
            count += sizes[rows[k][0]]
            k += 1
        values = torch.cat([flat[i, offsets[g]:offsets[g + 1]].float() for g, i in chunk]) + 0.0  # -0.0 -> 0.0
        row = to_device(torch.repeat_interleave(torch.arange(len(chunk)), torch.tensor([sizes[g] for g, _ in chunk]),
                                                output_size=count), device)
        pairs = (row << 32) | ((order_keys(values).to(torch.int64) + (1 << 31)) & 0xFFFFFFFF)
        del row, values
        keys = torch.sort(pairs).values & 0xFFFFFFFF
        del pairs
        first = row_start[k - len(chunk)]
        out[first:first + count] = keys_to_float(keys - (1 << 31))
    return out, row_start


class DeviceBracket:
    """Exact ``sort(x_i)[ranks[r]]`` for n streamed rows, from one counting pass around a bracket
    taken from a column sample ([n, s] float32, the values of every s-th column).

    Several groups at once (scope "tensor": each part its own group, kernels launched with PER_PART):
    ``ranks`` a list of G lists of R ranks, ``length`` a list of G lengths, ``sample`` a list of G
    [n, s_g] samples, or one [n, S] tensor of them side by side with the list of the s_g; every
    statistic then has a leading group dimension. ``local``: each group's entries on this rank (a
    distributed merge; default ``length``): the rooms of the copies are sized by them
    (:func:`bracket_plan`).

    Usage: every pass over the rows calls a counting kernel with :meth:`kernel_args` (LEVEL 0);
    then :meth:`resolve` says whether every bracket held (one host synchronisation;
    :attr:`missed` lists the groups where one did not); where they held, :meth:`values` and
    :meth:`count_above` answer as :class:`DeviceSelect`'s do (float order); where not, select with
    :class:`DeviceSelect` instead. With ``tiles`` (the number of tiles of the pass; ``tile_groups``
    [tiles] the group of each tile when grouped), :meth:`equal_per_tile` also counts the entries
    equal to each statistic per tile.
    """

    def __init__(self, ranks, length, sample, tiles: int = 0, tile_groups: torch.Tensor | None = None,
                 local=None):
        self.grouped = not isinstance(length, int)
        ranks, lengths = (ranks, list(length)) if self.grouped else ([ranks], [length])
        if local is not None:
            local = list(local) if self.grouped else [local]
        if isinstance(sample, tuple):  # ([n, S] columns of every group side by side, each group's count)
            flat, sizes = sample
        else:
            samples = list(sample) if self.grouped else [sample]
            flat, sizes = torch.cat([x.float() for x in samples], 1), [int(x.shape[1]) for x in samples]
        ranks = [list(r) for r in ranks]
        device = flat.device
        self.G, self.R, self.n = len(lengths), len(ranks[0]), flat.shape[0]
        for group, length_g in zip(ranks, lengths):
            if any(r < 0 or r >= length_g for r in group):
                raise ValueError(f"ranks {group} out of range for rows of length {length_g}")
        self.device = device
        G, R, n = self.G, self.R, self.n
        self.ranks = on_device(ranks, torch.int64, device).view(G, 1, R).expand(G, n, R)
        self.length = on_device(lengths, torch.int64, device).view(G, 1, 1)
        ordered, row_start = _sorted_rows(flat, list(sizes), n)
        index, low_open, high_open = [], [], []
        for g in range(G):
            s = sizes[g]
            for rank in ranks[g]:
                lo, hi = bracket_window(rank, lengths[g], s)
                for i in range(n):
                    first = row_start[g * n + i]
                    index.append([first + max(lo, 0), first + min(hi, s - 1)])
                    low_open.append(lo < 0)
                    high_open.append(hi >= s)
        index = on_device(index, torch.int64, device).view(G, R, n, 2).transpose(1, 2)
        bounds = ordered[index]  # [G, n, R, 2]
        del ordered
        low_open = on_device(low_open, torch.bool, device).view(G, R, n).transpose(1, 2)
        high_open = on_device(high_open, torch.bool, device).view(G, R, n).transpose(1, 2)
        bounds[..., 0] = torch.where(low_open, -math.inf, bounds[..., 0])
        bounds[..., 1] = torch.where(high_open, math.inf, bounds[..., 1])
        self.bounds = bounds.contiguous()
        # each slot (g, i, r) has a room of its group's capacity in one flat buffer
        self.plan = bracket_plan(ranks, lengths, list(sizes), n, local, tiles)
        slot_caps = torch.tensor(self.plan["caps"], dtype=torch.int64).repeat_interleave(n * R)
        starts = torch.cumsum(slot_caps, 0) - slot_caps
        self._starts, self._caps = starts.tolist(), slot_caps.tolist()  # on the host: chunks are cut by them
        self.layout = to_device(torch.stack([starts, slot_caps], 1), device)
        self.caps = self.layout[:, 1].view(G, n, R)
        self.copies = int(slot_caps.sum())
        # below, inside, at f, at c; STRIPES copies of each slot's counters, summed by resolve() into tally
        self.stripes = torch.zeros(G, n, R, TALLY_STRIPES, 4, dtype=torch.int64, device=device)
        self.kept = torch.empty(max(self.copies, 1), device=device)
        # with tiles: the tile of each copy, then the counts at each bound per tile [tiles, n, R, 2]
        size = self.copies + tiles * n * R * 2 if tiles else 1
        self.tiles = torch.zeros(size, dtype=torch.int32, device=device)
        self.tile_count = tiles
        self.tile_groups = tile_groups
        self.missed = []

    def kernel_args(self) -> dict:
        """The keyword arguments of a counting kernel (:func:`count_values`)."""
        return dict(hist_ptr=self.stripes, bucket_ptr=self.stripes, map_ptr=self.stripes, bounds_ptr=self.bounds,
                    tally_ptr=self.stripes, kept_ptr=self.kept, layout_ptr=self.layout, copies=self.copies,
                    tiles_ptr=self.tiles, LEVEL=0, R=self.R, TILES=self.tile_count > 0)

    def _out(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.grouped else x[0]

    def _chunks(self):
        """(first slot, last slot + 1, first copy, last copy + 1) of consecutive rooms, CHUNK copies at
        most (a larger room alone, in pieces)."""
        slots = len(self._caps)
        a = 0
        while a < slots:
            start = self._starts[a]
            if self._caps[a] >= CHUNK:  # one large room, in pieces
                for lo in range(start, start + self._caps[a], CHUNK):
                    yield a, a + 1, lo, min(lo + CHUNK, start + self._caps[a])
                a += 1
                continue
            b = a
            while b < slots and self._starts[b] + self._caps[b] - start <= CHUNK:
                b += 1
            yield a, b, start, self._starts[b - 1] + self._caps[b - 1]
            a = b

    def _copies(self, a: int, b: int, lo: int, hi: int) -> tuple:
        """The copies in places [lo, hi) (rooms of slots [a, b)): (values, slot of each (a scalar
        for one slot), valid: the places that hold this rank's copies)."""
        values = self.kept[lo:hi]
        starts = self.layout[:, 0]
        if b - a == 1:
            slot = a
            place = torch.arange(lo, hi, device=self.device) - self._starts[a]
            valid = place < self._inside_here[a]
        else:
            slot = torch.repeat_interleave(torch.arange(a, b, device=self.device), self.layout[a:b, 1],
                                           output_size=hi - lo)
            valid = torch.arange(lo, hi, device=self.device) - starts[slot] < self._inside_here[slot]
        return values, slot, valid

    def resolve(self, comm=None) -> bool:
        """After the pass: whether every rank lay in its bracket (with every entry strictly inside copied);
        the groups where one did not go to :attr:`missed`. Finds the statistics of the groups whose
        brackets held by a radix select over the copies (four levels of 256-bin histograms of their
        order keys), chunk by chunk. Distributed (``comm``, every rank with the same sample, hence the
        same brackets): the counts and each level's histograms are summed over the ranks (no copy
        leaves its rank), so the statistics are those of the whole model."""
        self.tally = self.stripes.sum(3)  # [G, n, R, 4]
        inside_here = self.tally[..., 1]
        room_ok = inside_here <= self.caps  # every copy of this rank kept in its room
        if comm is not None:
            room_ok = comm.sum_((~room_ok).to(torch.int64)) == 0
            self.tally = comm.sum_(self.tally.clone())
        below, inside, at_floor, at_ceiling = self.tally.unbind(3)
        held = (below <= self.ranks) & (self.ranks < below + at_floor + inside + at_ceiling) & room_ok
        held_groups = held.view(self.G, -1).all(1).tolist()  # one synchronisation
        self.missed = [g for g, ok in enumerate(held_groups) if not ok]
        self.below, self.inside, self.at_floor, self.at_ceiling = below, inside, at_floor, at_ceiling
        self._inside_here = torch.minimum(inside_here, self.caps).reshape(-1)
        place = self.ranks - below - at_floor  # the rank among the copies (negative: at the floor)
        self.case = torch.where(place < 0, 0, torch.where(place < inside, 1, 2))  # at floor, inside, at ceiling
        slots = self.G * self.n * self.R
        wanted = torch.minimum(place.clamp_min(0), (inside - 1).clamp_min(0)).reshape(-1)  # rank among copies
        prefix = torch.zeros(slots, dtype=torch.int64, device=self.device)
        smaller = torch.zeros(slots, dtype=torch.int64, device=self.device)
        for level in range(1, LEVELS + 1):
            hist = torch.zeros(slots, 256, dtype=torch.int64, device=self.device)
            for a, b, lo, hi in self._chunks():
                values, slot, valid = self._copies(a, b, lo, hi)
                unsigned = (order_keys(values + 0.0).to(torch.int64) + (1 << 31)) & 0xFFFFFFFF  # -0.0 as 0.0
                if level > 1:
                    valid &= (unsigned >> (40 - 8 * level)) == prefix[slot]
                digit = (unsigned >> (32 - 8 * level)) & 0xFF
                del unsigned
                # integer scatter-adds (no host synchronisation, the same counts whatever the order)
                index = digit if b - a == 1 else (slot - a) * 256 + digit
                hist[a:b].view(-1).scatter_add_(0, index, valid.to(torch.int64))
            if comm is not None:
                comm.sum_(hist)
            cumulative = hist.cumsum(1)
            at_or_below = cumulative <= wanted.unsqueeze(1)
            found = at_or_below.sum(1)  # the bin holding the wanted rank
            before = torch.where(at_or_below, cumulative, 0).amax(1)  # copies in the bins below it
            prefix = (prefix << 8) | found
            smaller += before
            wanted = wanted - before
            self._equal = hist.gather(1, found.clamp_max(255).unsqueeze(1)).view(-1)
        self._smaller = smaller.view(self.G, self.n, self.R)
        self._equal = self._equal.view(self.G, self.n, self.R)
        found_value = keys_to_float(prefix - (1 << 31)).view(self.G, self.n, self.R)
        self._values = torch.where(self.case == 0, self.bounds[..., 0],
                                   torch.where(self.case == 1, found_value, self.bounds[..., 1]))
        return not self.missed

    def values(self) -> torch.Tensor:
        """The selected order statistics, float32 [n, R] ([G, n, R] grouped) on the device."""
        return self._out(self._values)

    def count_above(self, inclusive: bool) -> torch.Tensor:
        """[n, R] ([G, n, R]) int64: entries > each statistic, or >= it with ``inclusive`` (float comparisons)."""
        copies = self._smaller if inclusive else self._smaller + self._equal  # copies < t, or <= t
        below_t = self.below + torch.where(  # entries < t (inclusive) or <= t
            self.case == 0, 0 if inclusive else self.at_floor,
            torch.where(self.case == 1, self.at_floor + copies,
                        self.at_floor + self.inside + (0 if inclusive else self.at_ceiling)))
        return self._out(self.length - below_t)

    def equal_per_tile(self, tiles: int) -> torch.Tensor:
        """[tiles, n] int64: the entries of each tile equal to each task's first statistic (needs the
        bracket built with ``tiles``): counts at a bound, or this rank's copies (which hold every
        entry strictly inside the bracket) by their tile, chunk by chunk."""
        if not self.tile_count:
            raise RuntimeError("equal_per_tile() needs a bracket built with tiles=")
        n, R = self.n, self.R
        at = self.tiles[self.copies:].view(self.tile_count, n, R, 2)[:tiles, :, 0].long()  # [tiles, n, 2]
        inside = torch.zeros(tiles * n, dtype=torch.int64, device=self.device)
        value = self._values.reshape(-1)
        for a, b, lo, hi in self._chunks():
            values, slot, valid = self._copies(a, b, lo, hi)
            slot = torch.full_like(valid, a, dtype=torch.int64) if b - a == 1 else slot
            equal = valid & ((slot % R) == 0) & (values == value[slot])
            index = torch.where(equal, self.tiles[lo:hi].long() * n + (slot // R) % n, 0)
            inside.scatter_add_(0, index, equal.to(torch.int64))
        inside = inside.view(tiles, n)
        groups = (self.tile_groups.to(self.device) if self.tile_groups is not None
                  else torch.zeros(tiles, dtype=torch.int64, device=self.device))
        case = self.case[:, :, 0][groups]  # [tiles, n]: the case of each tile's group
        return torch.where(case == 0, at[..., 0], torch.where(case == 1, inside, at[..., 1]))
