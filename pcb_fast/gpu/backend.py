"""The triton backend: PCB's passes as Triton kernels on the task rows' device (docs/design.md 3.5, 4).

Official variant, three reads of the inputs per scope group and no task vector or score ever
written: |tau| counted around the clip bounds' sampled brackets (with the NaN/Inf check), P counted
around the keep threshold's bracket (and its max M_i), then the merge pass. The paper variant, four:
pair min/max, softmax partition sums, beta around its bracket, merge. TIES, three: |tau| around the
trim's bracket (for the exact top-k, it also records the tile of each copy and each tile's counts at
the bounds, from which the ties at t are counted per tile), signs, merge. The brackets come from a column sample of the task
vectors (gathered by one kernel launch, kernels.tiles.sample_columns: a small fraction of a read); ties at a
bracket's bounds cost counts only;
a bracket the counts show missed (or whose buffer overflowed) costs the four passes of the exact
radix select instead (for the keys of that bracket alone). Statistics
stay on the device; the host synchronises after the first pass to report bad values and after each
bracket pass to check it. Every part (merged key) goes into one launch per pass (kernels.tiles.Segments;
per combination of dtypes, full tiles and last tiles apart), whatever the scope: with
``scope="tensor"`` the kernels keep each part's statistics apart (PER_PART), and one bracket pass
serves every key (a sample per key), so a model of many keys costs no more launches or
synchronisations than one key. Breadcrumbs runs a program per row (kernels.breadcrumbs).

Distributed (pcb_fast.io.distributed, NCCL with a GPU per rank): the parts are this rank's keys and a
``Comm`` combines the statistics of the whole model (``entries`` per task) with exact collectives: the
column sample gathered (every rank then brackets alike), the bracket's counts summed and so are the
histograms of the radix select over each rank's copies (no copy leaves its rank; rooms sized by the
rank's own entries), the radix histograms summed where a bracket missed, min/max of
M_i and the paper's pairs, the paper's partition partials gathered in key order, TIES' sign total and
its ties before each rank; a rank holding no key makes the same collectives. So a distributed merge
reads its inputs as often as one process does (official PCB: 3 times). With ``scope="tensor"`` a key's statistics stay on its rank. Bad data is
recorded (``comm.fail``) and raised on every rank at the next collective.

Kernels sum over tasks in task order and divide with correct rounding (div_rn), but fuse
multiply-adds and use the device's exp and tanh, so PCB's results agree with the reference within
the tolerance of docs/design.md 9, not bit for bit;
TIES' sign election runs without fused multiply-adds and equals the CPU's.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ..core import checks
from ..core.formulas import clip_indices, keep_index, lambda_column, span_or_inf
from ..methods import SPECS


@dataclass
class Part:
    """One merged key (or the whole matrix): its task rows and where its merged values go."""

    key: str
    rows: object  # pcb_fast.kernels.tiles.Rows
    out: torch.Tensor  # [numel]: theta (rows with a base) or tau_m (rows of task vectors)
    names: list  # model names for error messages
    start: int | None = None  # its first position in the whole model (distributed: among every rank's keys)


@contextmanager
def _timed(profile: dict | None, name: str, device):
    """Add the seconds of the enclosed pass to profile[name] (synchronising the device), if asked."""
    if profile is None:
        yield
        return
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    yield
    sync()
    profile[name] = profile.get(name, 0.0) + time.perf_counter() - start


def _raise_if_bad(parts: list, bad: torch.Tensor, comm=None) -> None:
    """bad [len(parts), n] int32 flags from the first pass: name the first bad model and key (raised,
    or, in a distributed merge, recorded with ``comm.fail`` and raised by every rank at the next
    collective)."""
    if bad.numel() and bool(bad.any()):
        g, task = (int(v) for v in bad.nonzero()[0])
        part = parts[g]
        where = part.names[task] if part.key is None else f"{part.names[task]}, key {checks.short(part.key, 80)}"
        message = f"{where}: contains NaN or Inf; every input value must be finite"
        if comm is None:
            raise ValueError(message)
        comm.fail(message)


@dataclass
class Batch:
    """The scope groups of a merge, run together: one launch per pass for all of them (docs/design.md 4).

    ``groups``: the whole model (scope "global": one group), or each key alone (scope "tensor": the
    kernels run with PER_PART, each part's statistics at its own index); ``entries``: each group's
    entries per task, over every rank; ``comm``: combines the statistics over the ranks of a
    distributed merge (global scope; None otherwise); ``errors``: the distributed merge's comm, which
    records bad data (None in one process)."""

    parts: list
    entries: list
    per_part: bool
    comm: object = None
    errors: object = None
    n: int = 0
    device: object = None

    @property
    def G(self) -> int:
        return len(self.entries)

    def local_entries(self) -> list:
        """Each group's entries per task on this rank (its own keys): what a bracket's rooms hold."""
        return [p.rows.m for p in self.parts] if self.per_part else [sum(p.rows.m for p in self.parts)]

    def tile_counts(self) -> list:
        """Tiles of each group (consecutive, in position order)."""
        from ..kernels.tiles import programs

        tiles = [programs(p.rows) for p in self.parts]
        return tiles if self.per_part else [sum(tiles)]


def _batch(parts: list, scope: str, comm, entries: int | None, n: int, device) -> Batch:
    """The parts as one Batch: one group (global; ``entries``: the whole model's entries per task,
    every rank's keys, default the parts') or a group per key, whose statistics never leave its rank."""
    if scope == "global":
        return Batch(parts, [sum(p.rows.m for p in parts) if entries is None else entries], False, comm, comm, n,
                     device)
    return Batch(parts, [p.rows.m for p in parts], True, None, comm, n, device)


def _sum_kept(kept_local: torch.Tensor, comm) -> torch.Tensor:
    """Kept counts of this rank's keys summed over the ranks (also where every rank agrees that none failed)."""
    return kept_local if comm is None else comm.sum_(kept_local)


def merge_pcb(parts: list, n: int, *, ratio=0.1, clamp_ratio=1e-4, inter="sum", variant="official",
              lambdas=None, lam=1.0, scope="global", profile: dict | None = None, comm=None,
              entries: int | None = None, device=None) -> dict:
    """Run PCB over ``parts`` and write every part's ``out``. Returns {"kept", "entries"}.

    With a ``profile`` dict, the seconds of each pass are added to it by name (the device is
    synchronised around every pass, which costs a little). Distributed: ``comm``, the whole model's
    ``entries`` per task and this rank's ``device`` (``parts`` may then be empty).
    """
    from ..kernels import select as ks  # imported here: triton is an optional dependency

    from ..methods.pcb import check_params

    params = check_params(n, ratio=ratio, clamp_ratio=clamp_ratio, inter=inter, variant=variant, lambdas=lambdas)
    checks.check_choice("scope", scope, checks.SCOPE_CHOICES)
    device = parts[0].rows.device if device is None else torch.device(device)
    weights = lambda_column(params["lambdas"], n, device, ones=True).view(-1)
    batch = _batch(parts, scope, comm, entries, n, device)
    run = _official if params["variant"] == "official" else _paper
    kept = run(batch, n, params, weights, lam, ks, lambda name: _timed(profile, name, device), device)
    if batch.comm is None:  # counted over this rank's keys (a distributed global select counts every rank's)
        kept = _sum_kept(kept, comm)
    return {"kept": kept.tolist(), "entries": sum(p.rows.m for p in parts) if entries is None else entries}


def _samples(batch: Batch, segments: list) -> tuple:
    """The column sample of every group (docs/design.md 3.3) and the group of each column: [n, S] float32
    task-vector columns at the positions (counted across the group's parts, from each part's start in
    the whole model) that are multiples of the group's stride: ~2^18 columns for the whole model,
    ~2^16 per key per tensor (all of a key's columns up to 2^16). Gathered by one kernel launch per
    Segments (kernels.tiles.sample_columns); distributed, every rank's columns gathered, so that
    every rank brackets alike. Returns ([n, S] columns, group by group; the groups' column counts;
    [S] group of each column)."""
    from ..kernels import select as ks
    from ..kernels.tiles import sample_columns, to_device

    picks, sizes, position = [], [], 0
    for part in batch.parts:
        m = part.rows.m
        if batch.per_part:
            stride, first = ks.sample_stride(m, ks.KEY_SAMPLE_COLUMNS), 0
        else:
            stride = ks.sample_stride(batch.entries[0])
            start = position if part.start is None or batch.comm is None else part.start
            first = (-start) % stride
            position += m
        count = max(0, -(-(m - first) // stride))
        picks.append((first, stride, count))
        sizes.append(count)
    sample = sample_columns(segments, picks, batch.n, batch.device)
    if not batch.per_part:
        if batch.comm is not None:  # every rank's columns (their order does not matter: brackets sort them)
            sample = batch.comm.gather_in_order(sample.T.contiguous()).T.contiguous()
        sizes = [sample.shape[1]]
    groups = to_device(torch.repeat_interleave(torch.arange(batch.G), torch.tensor(sizes, dtype=torch.int64)), batch.device)
    return sample, sizes, groups


def _segments(batch: Batch, only: list | None = None) -> list:
    """The parts of a batch (or of its groups ``only``) as kernels.tiles.Segments: one launch per pass for
    all of them (per combination of dtypes)."""
    from ..kernels.tiles import segment

    parts = batch.parts if only is None else [batch.parts[g] for g in only]
    return segment([p.rows for p in parts], [p.out for p in parts], per_part=batch.per_part, indices=only)


class Selected:
    """Order statistics of every group of a batch: ``values`` [G, n, R], ``above[inclusive]`` [G, n, R]
    (entries above each, or at and above it); ``bracket``: the DeviceBracket of the pass (None when
    every group took the radix select), ``missed``: the groups whose brackets missed."""

    def __init__(self, bracket, missed: list):
        self.bracket, self.missed = bracket, missed
        if bracket is not None:
            self.values = bracket.values().clone()
            self.above = {inclusive: bracket.count_above(inclusive) for inclusive in (False, True)}

    def fill(self, groups: list, select, shape: tuple) -> None:
        """Take the statistics of ``groups`` from a DeviceSelect over their rows."""
        values = select.values().view(len(groups), *shape[1:])
        above = {inclusive: select.count_above(inclusive).view(len(groups), *shape[1:]) for inclusive in (False, True)}
        if self.bracket is None:
            self.values, self.above = values, above
            return
        from ..kernels.tiles import on_device

        index = on_device(groups, torch.int64, values.device)
        self.values[index] = values
        for inclusive in (False, True):
            self.above[inclusive][index] = above[inclusive]


def _select(batch: Batch, segments, ranks: list, samples, count, timed, name: str, n: int, device, tiles: int = 0,
            after_first=None) -> Selected:
    """Exact order statistics ``ranks`` (a list of R ranks per group) of every task of every group: one
    pass around the sampled brackets for all groups, then, for the groups where a bracket missed, the
    four passes of the radix select (over their parts only). ``count(seg, select)`` runs the counting
    pass over one Segments; ``after_first`` (the NaN/Inf report) runs after the first pass, before
    any bracket is trusted; ``samples()`` gives the groups' column samples. Distributed
    (``batch.comm``): the sample is the whole model's (gathered), so every rank brackets alike; the
    bracket's counts are summed and its copies gathered over the ranks, and so are the radix
    select's histograms where a bracket missed."""
    from ..kernels import select as ks
    from ..kernels.tiles import to_device

    G, R = batch.G, len(ranks[0])
    groups = None
    if tiles and batch.per_part:
        groups = to_device(torch.repeat_interleave(torch.arange(G), torch.tensor(batch.tile_counts())), device)
    bracket = ks.DeviceBracket(ranks, batch.entries, samples(), tiles, groups, local=batch.local_entries())
    with timed(name):
        for seg in segments:
            count(seg, bracket)
    if after_first is not None:
        after_first()  # distributed: recorded, and raised by every rank at the first sum of resolve
    bracket.resolve(batch.comm)
    selected = Selected(bracket, bracket.missed)
    if not bracket.missed:
        return selected
    missed = selected.missed
    place = [0] * G  # each missed group's rows among the select's
    for h, g in enumerate(missed):
        place[g] = h
    lengths = [batch.entries[g] for g in missed for _ in range(n)]
    select = ks.DeviceSelect([ranks[g] for g in missed for _ in range(n)], lengths[0] if G == 1 else lengths,
                             device, groups=place)
    fallback = segments if len(missed) == G else _segments(batch, only=missed)
    for level in range(1, select.LEVELS + 1):
        with timed(f"{name} radix level {level}"):
            for seg in fallback:
                count(seg, select)
        if batch.comm is not None:
            batch.comm.sum_(select.hist)
        if level < select.LEVELS:
            select.next_level()
    selected.fill(missed, select, (G, n, R))
    return selected


def _official_sample_scores(sample: torch.Tensor, clip: tuple, inter: str, n: int,
                            groups: torch.Tensor) -> torch.Tensor:
    """P of the sampled columns ([n, S]; ``groups`` [S] the group of each), with torch's exp and tanh:
    close to the kernels' scores, which is all a bracket needs (its counts are exact whatever the
    guess). ``clip`` = (lo, hi, span), [G, n] each."""
    lo, hi, span = (c[groups].T for c in clip)  # [n, S]: each column's group's bounds
    normalized = (torch.minimum(torch.maximum(sample.abs(), lo), hi) - lo) / span
    intra = torch.exp(normalized * normalized * n)
    if inter == "sum":
        term = torch.tanh(sample * sample.sum(0))
    elif inter == "normalized_sum":
        term = torch.tanh(sample * (torch.sign(sample) * normalized).sum(0))
    else:
        signed = torch.sign(sample) * normalized
        term = torch.zeros_like(sample)
        for j in range(n):
            term += torch.tanh(signed * signed[j])
    return intra * term


def _official(batch: Batch, n, params, weights, lam, ks, timed, device):
    """Official PCB over every group of ``batch``; returns the kept entries per task [n]."""
    from ..kernels import merge as km, score as kscore

    G = batch.G
    segments = _segments(batch)
    sample, sizes, groups = _samples(batch, segments)
    bad = torch.zeros(len(batch.parts), n, dtype=torch.int32, device=device)
    bounds = _select(batch, segments, [list(clip_indices(D, params["clamp_ratio"])) for D in batch.entries],
                     lambda: (sample.abs(), sizes), lambda seg, sel: kscore.magnitude_pass(seg, sel, bad), timed,
                     "magnitude", n, device, after_first=lambda: _raise_if_bad(batch.parts, bad, batch.errors)).values
    hi = bounds[..., 1].contiguous()  # [G, n]
    lo = torch.minimum(bounds[..., 0], hi).contiguous()  # clamp with lo > hi clamps everything to hi
    clip = (lo, hi, span_or_inf(hi - lo))

    peak = torch.full((G, n), ks.INT32_MIN, dtype=torch.int32, device=device)
    score = lambda seg, sel: kscore.official_pass(seg, sel, peak, clip, params["inter"])  # noqa: E731
    sample_scores = lambda: (_official_sample_scores(sample, clip, params["inter"], n, groups), sizes)  # noqa: E731
    select = _select(batch, segments, [[keep_index(D, params["ratio"])] for D in batch.entries], sample_scores, score,
                     timed, "score", n, device)
    del sample
    if batch.comm is not None:
        batch.comm.max_(peak)  # M_i over every rank (order keys: exact)
    t = select.values[..., 0].contiguous()
    span = span_or_inf(ks.keys_to_float(peak) - t)  # M == t: nothing is kept
    with timed("merge"):
        for seg in segments:
            km.merge_pass(seg, None, "official", clip, t, span, weights, lam, params["inter"])
    return select.above[False][..., 0].sum(0)


def _paper_sample_scores(sample: torch.Tensor, pairs: tuple, inv_z: tuple, n: int,
                         groups: torch.Tensor) -> torch.Tensor:
    """beta of the sampled columns ([n, S]; ``groups`` [S] the group of each; as the kernels compute it,
    with torch's exp), for the bracket. ``pairs`` [G, n, n] each, ``inv_z`` ([G, n, n], [G, n])."""
    lo, span, peak = pairs
    inv_inter, inv_intra = inv_z
    beta = torch.empty_like(sample)
    for i in range(n):
        column = lambda x: x[:, i][groups].T  # noqa: E731 - [G, n, n] -> [n, S]: row j of pair (i, j)
        normalized = (sample * sample[i] - column(lo)) / column(span)  # row j: Norm(tau_j tau_i)
        inter = (torch.exp(normalized - column(peak)) * column(inv_inter)).sum(0)
        intra = torch.exp(normalized[i] * n - n * peak[:, i, i][groups]) * inv_intra[:, i][groups]
        beta[i] = intra * inter
    return beta


def _paper(batch: Batch, n, params, weights, lam, ks, timed, device):
    """The paper variant over every group of ``batch``; returns the kept entries per task [n]."""
    from ..kernels import merge as km, score as kscore

    G = batch.G
    lo_key = torch.full((G, n, n), ks.INT32_MAX, dtype=torch.int32, device=device)
    hi_key = torch.full((G, n, n), ks.INT32_MIN, dtype=torch.int32, device=device)
    bad = torch.zeros(len(batch.parts), n, dtype=torch.int32, device=device)
    segments = _segments(batch)
    with timed("pair min/max"):
        for seg in segments:
            kscore.pair_minmax_pass(seg, lo_key, hi_key, bad)
    _raise_if_bad(batch.parts, bad, batch.errors)
    if batch.comm is not None:  # the pairs' extremes over every rank (order keys: exact)
        batch.comm.min_(lo_key)
        batch.comm.max_(hi_key)
    lo, hi = ks.keys_to_float(lo_key), ks.keys_to_float(hi_key)
    span = hi - lo
    peak = (span > 0).float()  # max of a normalised pair: 1, or 0 for a constant pair
    pairs = (lo.contiguous(), span_or_inf(hi - lo).contiguous(), peak.contiguous())

    total = sum(seg.tiles for seg in segments)
    inter = torch.empty(total, n, n, device=device)
    intra = torch.empty(total, n, device=device)
    with timed("partition sums"):
        for seg in segments:
            kscore.partition_pass(seg, pairs, inter, intra)
        if batch.comm is not None:  # every rank's partials, in key order: the tiles of one process
            inter, intra = batch.comm.gather_in_order(inter), batch.comm.gather_in_order(intra)
        # each group's partials (its tiles are consecutive) summed in float64 (accumulated, no float64
        # copy of the [tiles, n, n] partials), in one fixed order: the same sums from run to run
        sums_inter, sums_intra, first = [], [], 0
        for tiles in ([inter.shape[0]] if G == 1 else batch.tile_counts()):
            sums_inter.append(inter[first:first + tiles].sum(0, dtype=torch.float64))
            sums_intra.append(intra[first:first + tiles].sum(0, dtype=torch.float64))
            first += tiles
        inv_z = ((1.0 / torch.stack(sums_inter)).float().contiguous(), (1.0 / torch.stack(sums_intra)).float().contiguous())

    def sample_scores():
        sample, sizes, groups = _samples(batch, segments)
        return _paper_sample_scores(sample, pairs, inv_z, n, groups), sizes

    beta = lambda seg, sel: kscore.paper_pass(seg, sel, pairs, inv_z)  # noqa: E731
    select = _select(batch, segments, [[keep_index(D, params["ratio"])] for D in batch.entries], sample_scores, beta,
                     timed, "score", n, device)
    t = select.values[..., 0].contiguous()
    with timed("merge"):
        for seg in segments:
            km.merge_pass(seg, None, "paper", pairs + inv_z, t, None, weights, lam)
    return select.above[True][..., 0].sum(0)


def pcb_merge_matrix(task_vectors, out: torch.Tensor, pad: bool | None = None, **params) -> dict:
    """PCB of an [n, D] tensor (or n 1-D tensors) of task vectors into ``out`` [D] (tau_m).

    Rows whose starts are not 16 bytes apart (an [n, D] matrix of odd D, as the authors' ViT-B/32
    size) would load element by element; ``pad`` copies them first into rows padded to 16 bytes (one
    more read and write of the inputs, then vector loads in every pass). Default: on a CUDA device
    whose free memory holds twice the copy; never on a CPU."""
    from ..kernels.tiles import Rows

    rows_list = list(task_vectors)
    rows = Rows.from_tensors(rows_list)
    if rows.align * rows.anchor.element_size() < 16 and _pad_rows(rows, pad):
        rows = Rows.from_tensors(padded_rows(rows.tensors))
    names = [f"task vector {i}" for i in range(rows.n)]
    return merge_pcb([Part(None, rows, out, names)], rows.n, **params)


def _pad_rows(rows, pad: bool | None) -> bool:
    if pad is not None:
        return pad
    if rows.device.type != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info(rows.device)
    return free >= 2 * rows.n * rows.m * rows.anchor.element_size()


def padded_rows(tensors: list) -> list:
    """Copies of equal-length 1-D ``tensors`` as the rows of one buffer whose rows start 16 bytes
    apart (each row padded), so that the kernels load them as 128-bit vectors."""
    first = tensors[0]
    per = 16 // first.element_size()
    width = -(-first.numel() // per) * per
    buffer = torch.empty(len(tensors), width, dtype=first.dtype, device=first.device)
    for i, t in enumerate(tensors):
        buffer[i, :t.numel()].copy_(t)
    return [buffer[i, :first.numel()] for i in range(len(tensors))]


def merge_state_dicts(base: dict, models: list, merged_keys: list, out: dict, names: list, *, lam: float,
                      scope: str, lambdas=None, method: str = "pcb", comm=None, entries: int | None = None,
                      device=None, starts: dict | None = None, **params) -> dict:
    """A merge of state dicts on one device: tau = theta_i - theta_pre formed in the kernels; writes
    out[key] = theta_pre + lam * tau_m in the base's dtype for every merged key. Distributed
    (pcb_fast.drivers.distributed.merge_on_device): ``merged_keys`` are this rank's (maybe none), ``comm``
    combines the statistics of the whole model, ``entries`` per task, on this rank's ``device``;
    ``starts``: each key's first position in the whole model (for the column sample)."""
    from ..kernels.tiles import Rows

    parts = []
    for key in merged_keys:
        tensors = [m[key] for m in models]
        if len({t.dtype for t in tensors}) > 1:  # kernels read one dtype per key
            tensors = [t.float() for t in tensors]
        parts.append(Part(key, Rows.from_tensors(tensors, base=base[key]), out[key], names,
                          None if starts is None else starts[key]))
    where = dict(comm=comm, entries=entries, device=device)
    if method != "pcb":
        return merge_baseline(parts, len(models), method, lam=lam, scope=scope, lambdas=lambdas, **where, **params)
    return merge_pcb(parts, len(models), lam=lam, scope=scope, lambdas=lambdas, **where, **params)


# the methods whose specs name the triton backend, PCB apart
BASELINES = tuple(name for name, spec in SPECS.items() if "triton" in spec.backends and name != "pcb")


def _dare_streams(seed: int, n: int, keys: list, device) -> torch.Tensor:
    """[len(keys), 2n] int64: DARE's stream constant of (seed, task, key) for every task of every key,
    then its mix32 (built on the host, one copy to the device)."""
    from ..core import rng

    table = []
    for key in keys:
        streams = [rng.stream_constant(seed, i, key) for i in range(n)]
        table.append(streams + [rng.mix32(h) for h in streams])
    from ..kernels.tiles import on_device

    return on_device(table, torch.int64, device)


def merge_baseline(parts: list, n: int, method: str, *, lambdas=None, lam=1.0, scope="global", comm=None,
                   entries: int | None = None, device=None, **params) -> dict:
    """Average, task arithmetic, DARE, TIES (threshold or exact top-k) and DARE-TIES on the kernels,
    Breadcrumbs by its row kernels (kernels.breadcrumbs); writes every part's ``out``. Returns
    {"kept", "entries"}. Distributed: ``comm``, ``entries`` and ``device`` as for :func:`merge_pcb`."""
    from ..kernels import linear as kl, ties as kt
    from ..methods.linear import check_drop, check_seed
    from ..methods.ties import SIGN_TIES, TOPK, check_density

    if method not in BASELINES:
        raise ValueError(f"method {checks.short(method)} runs on backends 'torch' and 'reference' in this version; the triton "
                         f"backend runs 'pcb', {', '.join(map(repr, BASELINES))}")
    checks.check_choice("scope", scope, checks.SCOPE_CHOICES)
    lambdas = checks.check_lambdas(lambdas, n)
    device = parts[0].rows.device if device is None else torch.device(device)
    weights = lambda_column(lambdas, n, device, ones=True).view(-1)
    total_entries = sum(p.rows.m for p in parts) if entries is None else entries
    if method == "breadcrumbs":
        return _breadcrumbs(parts, n, weights, lam, comm=comm, entries=total_entries, **params)
    kept = torch.zeros(n, dtype=torch.int64, device=device)  # of this rank's keys (summed over ranks at the end)
    bad = torch.zeros(len(parts), n, dtype=torch.int32, device=device)
    dare = None
    if method in ("dare", "dare_ties"):
        p, seed = check_drop(params.pop("p", 0.9)), check_seed(params.pop("seed", 0))
        # ([parts, 2n] stream constants of the parts' keys, p), for the parts of a group
        dare = lambda group: (_dare_streams(seed, n, [part.key or "task_vector" for part in group], device), p)  # noqa: E731
    sign_ties = checks.check_choice("sign_ties", params.pop("sign_ties", "majority"), SIGN_TIES)
    if method == "ties":
        density = check_density(params.pop("density", 0.2))
        topk = checks.check_choice("topk", params.pop("topk", "threshold"), TOPK)
    if params:
        raise ValueError(f"method {checks.short(method)} has no parameter {checks.short(sorted(params)[0])}")
    if method in ("average", "task_arithmetic", "dare"):
        divisor = 1.0
        if method == "average":
            divisor = float(n) if lambdas is None else float(sum(lambdas))
            if divisor <= 0:
                raise ValueError(f"lambdas={checks.short(lambdas)} sum to {divisor}; average weights must have a positive sum")
        drop = dare(parts) if dare is not None and parts else None
        for seg in _segments(_batch(parts, "global", None, None, n, device)):
            kl.linear_pass(seg, None, weights, divisor, lam, bad, kept, drop)
        _raise_if_bad(parts, bad, comm)
        if dare is None:
            kept += sum(p.rows.m for p in parts)
        return {"kept": _sum_kept(kept, comm).tolist(), "entries": total_entries}

    batch = _batch(parts, scope, comm, entries, n, device)
    segments = _segments(batch)
    trim = kt.Trim(threshold=None)
    if method == "ties":
        trim = _ties_trim(batch, segments, n, density, topk, bad, device)
    if dare is not None:  # DARE-TIES: the stream constants of every part, [parts, 2n]
        trim = kt.Trim(dare=dare(parts) if parts else (torch.zeros(1, 2 * n, dtype=torch.int64, device=device), 0.0))
    total = torch.zeros(batch.G, dtype=torch.int64, device=device)  # elected signs summed, per group
    for seg in segments:
        kt.sign_pass(seg, weights, total, kept, bad, trim)
    _raise_if_bad(parts, bad, comm)
    if batch.comm is not None:
        batch.comm.sum_(total)  # the whole model's sum of elected signs
    fill = torch.sign(total.float()) if sign_ties == "majority" else torch.ones(batch.G, device=device)
    for seg in segments:
        kt.ties_merge_pass(seg, None, weights, fill, lam, trim)
    return {"kept": _sum_kept(kept, comm).tolist(), "entries": total_entries}


def _ties_trim(batch: Batch, segments, n, density, topk, bad, device):
    """The TIES trim of every group of ``batch``: t_i, the order statistic of |tau_i| at rank D - k - 1
    (keep >= t, as the authors) or D - k (keep > t plus the first equal entries of the group, exactly
    k), from one pass around sampled brackets (or the radix select's four for the groups where one
    missed; distributed, the radix select with histograms summed over ranks). ``bad``: [parts, n] flags."""
    from ..kernels import score as kscore, ties as kt
    from ..kernels.tiles import on_device, to_device

    keeps = [int(D * density) for D in batch.entries]
    ranks = [D - k - 1 if topk == "threshold" else D - k for D, k in zip(batch.entries, keeps)]
    # a group keeping everything (|tau| >= 0) or nothing (|tau| >= inf) needs no select
    fixed = {g: 0.0 if r < 0 else float("inf") for g, r in enumerate(ranks) if r < 0 or r >= batch.entries[g]}
    if len(fixed) == batch.G:  # the sign pass checks NaN/Inf
        return kt.Trim(threshold=on_device([[fixed[g]] * n for g in range(batch.G)], torch.float32, device))
    tiles = sum(seg.tiles for seg in segments)
    select = _select(batch, segments, [[min(max(r, 0), D - 1)] for r, D in zip(ranks, batch.entries)],
                     lambda: _magnitude_sample(batch, segments), lambda seg, sel: kscore.magnitude_pass(seg, sel, bad),
                     lambda name: _no_timer(), "magnitude", n, device, tiles=tiles if topk == "exact" else 0,
                     after_first=lambda: _raise_if_bad(batch.parts, bad, batch.errors))
    threshold = select.values[..., 0].clone()  # [G, n]
    for g, value in fixed.items():
        threshold[g] = value
    threshold = threshold.contiguous()
    if topk == "threshold":
        return kt.Trim(threshold=threshold)
    counts = torch.zeros(tiles + 1, n, dtype=torch.int64, device=device)
    if select.bracket is not None and not select.missed:  # ties at t: per tile at a bound, or copied with their tile
        counts[1:] = select.bracket.equal_per_tile(tiles)
    else:  # a radix select's fallback: one more pass counts them
        for seg in segments:
            kt.equal_counts(seg, threshold, counts[1:])
    cumulative = counts.cumsum(0)  # cumulative[k]: equal entries in tiles before k, in position order
    first_tile = to_device(torch.repeat_interleave(torch.cumsum(torch.tensor([0] + batch.tile_counts()[:-1]), 0),
                                                   torch.tensor(batch.tile_counts())), device)
    before = cumulative[:-1] - cumulative[first_tile]  # ... of the tile's own group
    if batch.comm is not None:  # and in the keys of the ranks before this one
        before = before + batch.comm.before_me(counts.sum(0)).unsqueeze(0)
    before = before.contiguous()
    budget = on_device(keeps, torch.int64, device).view(-1, 1) - select.above[False][..., 0]
    for g in fixed:  # exact: keeping nothing (a rank below 0 never comes with topk="exact")
        budget[g] = 0
    budget = budget.contiguous()
    return kt.Trim(threshold=threshold, exact=(before, budget))


def _magnitude_sample(batch: Batch, segments: list) -> tuple:
    """|tau| of the column sample and the groups' column counts (the brackets' input)."""
    sample, sizes, _ = _samples(batch, segments)
    return sample.abs(), sizes


@contextmanager
def _no_timer():
    yield


def _breadcrumbs(parts: list, n: int, weights: torch.Tensor, lam: float, gamma=0.01, beta=0.1, comm=None,
                 entries: int = 0) -> dict:
    """Breadcrumbs: the band of every row found by kernels.breadcrumbs (one program per row, one launch per
    row-length class and dtypes; rows longer than a program holds read in chunks; no [n, m] temporary),
    then the sum over tasks in task order, as the torch backend computes it."""
    from ..kernels.breadcrumbs import breadcrumbs_pass
    from ..methods.linear import check_band
    from ..core.sources import row_length

    gamma, beta = check_band(gamma, beta)
    kept = torch.zeros(n, dtype=torch.int64, device=weights.device)
    bad = torch.zeros(len(parts), n, dtype=torch.int32, device=weights.device)
    lengths = [row_length(tuple(part.out.shape)) for part in parts]
    if parts:
        breadcrumbs_pass([p.rows for p in parts], [p.out for p in parts], lengths,
                         [(int(gamma * length), int(beta * length)) for length in lengths], weights, lam, kept, bad,
                         list(range(len(parts))))
    _raise_if_bad(parts, bad, comm)
    return {"kept": _sum_kept(kept, comm).tolist(), "entries": entries or sum(p.rows.m for p in parts)}
