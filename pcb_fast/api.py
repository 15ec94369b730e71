"""Public API: ``pcb_merge`` for task-vector matrices, ``merge`` for state dicts."""

from __future__ import annotations

import warnings
from typing import Sequence

import torch

from . import reference
from .core import checks, engine
from .core.backends import resolve_backend
from .core.formulas import merged_weights
from .core.numerics import warm_up_exp
from .core.options import RunOptions
from .core.sinks import Sink, pieces_at
from .core.sources import DEFAULT_BLOCK_WIDTH, MatrixSource, StateDictSource, flat
from .core.threads import CpuThreads, check_threads
from .cpu import fused as fused_cpu
from .gpu import backend as triton_backend
from .io.checkpoints import StateDictCheckpoint, check_models_match, split_keys
from .io.running_stats import check_mode as check_running_stats_mode
from .io.running_stats import merge_running_stats, running_stat_keys
from .io.tied import check_tied, same_as_base, tied_groups
from .methods import SPECS, check_method_params, spec_of
from .methods.pcb import check_params as check_pcb_params


@torch.no_grad()  # inputs that require grad are read as data
def pcb_merge(task_vectors, *, ratio=0.1, clamp_ratio=1e-4, inter="sum", variant="official", lambdas=None,
              backend="auto", block_width=DEFAULT_BLOCK_WIDTH, report: dict | None = None,
              threads="auto", fused="auto") -> torch.Tensor:
    """Merged task vector tau_m (float32, [D]) of PCB-Merging for a [n, D] tensor or n 1-D tensors.

    ``variant="official"`` is the authors' code (docs/design.md 2.2), ``"paper"`` the paper's equations.
    ``lambdas`` weight the tasks inside the weighted mean (step 7). Global statistics over all D.
    Tensors on a CUDA device run on the triton backend (``backend="auto"``).
    If ``report`` is a dict, it receives "kept" (entries kept per task) and "entries" (D).
    ``threads``: CPU threads of the torch backend, "auto" (the cores other processes leave free, looked
    at again during the merge) or a number; torch's own setting is restored afterwards.
    ``fused``: as for :func:`merge` ("auto": PCB's C sweeps where they build, the reference's bits;
    "off": the eager torch ops, the same bits).
    """
    check_threads(threads)
    checks.check_block_width(block_width)
    checks.check_choice("fused", fused, fused_cpu.MODES)
    rows = checks.task_vector_rows(task_vectors)
    device = checks.common_device((f"task vector {i}", r) for i, r in enumerate(rows))
    backend = resolve_backend(backend, device)
    if backend == "triton":
        if len({r.dtype for r in rows}) > 1:
            rows = [r.float() for r in rows]
        out = torch.empty(rows[0].numel(), device=device)
        info = triton_backend.pcb_merge_matrix(rows, out, ratio=ratio, clamp_ratio=clamp_ratio, inter=inter,
                                               variant=variant, lambdas=lambdas)
        if report is not None:
            report.update(info)
        return out
    if backend == "reference":
        return pcb_reference(task_vectors, ratio=ratio, clamp_ratio=clamp_ratio, inter=inter, variant=variant,
                             lambdas=lambdas)
    source = MatrixSource(task_vectors)
    out = torch.empty(source.D)

    def sink(segment, lo, hi, values):
        out[segment.offset + lo : segment.offset + hi] = values

    with CpuThreads(threads) as cpu_threads:
        options = RunOptions(threads=cpu_threads, **fused_cpu.settings(fused, source.n * source.D, "pcb",
                                                                       dict(variant=variant, inter=inter)))
        info = engine.run(SPECS["pcb"].merge, source, sink, options=options, ratio=ratio, clamp_ratio=clamp_ratio,
                          inter=inter, variant=variant, lambdas=lambdas, block_width=block_width)
    if report is not None:
        report.update(info)
    return out


@torch.no_grad()
def pcb_reference(task_vectors, *, ratio=0.1, clamp_ratio=1e-4, inter="sum", variant="official",
                  lambdas=None) -> torch.Tensor:
    """PCB-Merging by the literal, sort-based oracle (pcb_fast.reference): the authors' code for
    ``variant="official"``, the paper's equations for ``"paper"``. Same arguments and checks as
    :func:`pcb_merge`; slow and memory-hungry by design (the yardstick of tests and benchmarks)."""
    rows = checks.task_vector_rows(task_vectors)
    params = check_pcb_params(len(rows), ratio=ratio, clamp_ratio=clamp_ratio, inter=inter, variant=variant,
                              lambdas=lambdas)
    checks.check_all_finite((f"task vector {i}", row) for i, row in enumerate(rows))
    tv = task_vectors.float() if isinstance(task_vectors, torch.Tensor) else torch.stack([r.float() for r in rows])
    return _reference_pcb(tv, params)


def _reference_pcb(tv: torch.Tensor, params: dict) -> torch.Tensor:
    """The PCB oracle on a validated float32 [n, D] matrix."""
    warm_up_exp()  # the oracle computes exp as the engine does: after the warm-up (core/numerics.py)
    if params["variant"] == "paper":
        return reference.pcb_paper(tv, ratio=params["ratio"], lambdas=params["lambdas"])
    return reference.pcb_official(tv, ratio=params["ratio"], clamp_ratio=params["clamp_ratio"], inter=params["inter"],
                                  lambdas=params["lambdas"])


@torch.no_grad()
def merge(base: dict, models: Sequence[dict], *, method="pcb", lam=1.0, lambdas=None, scope="global",
          exclude=(), backend="auto", block_width=DEFAULT_BLOCK_WIDTH, report: dict | None = None,
          model_names=None, max_memory=None, fused="auto", threads="auto", running_stats="average",
          **method_params) -> dict:
    """Merge fine-tuned state dicts ``models`` of ``base``: theta = theta_pre + lam * tau_m.

    Floating keys not matching an ``exclude`` regex are merged; the rest are copied from ``base``.
    Statistics are taken over all merged entries (``scope="global"``) or per tensor. The output has
    the base's dtypes. ``method_params`` go to the method: pcb (ratio, clamp_ratio, inter, variant),
    average, task_arithmetic (normalize), ties (density, sign_ties, topk, normalize, min_keep), dare (p,
    seed, rescale, normalize), dare_ties (p, seed, sign_ties, rescale, normalize), breadcrumbs (gamma,
    beta, band, normalize), breadcrumbs_ties (gamma, beta, band, sign_ties, normalize); density, p,
    gamma and beta may be lists with one value per model. ``segment_params`` (scope "tensor"): a
    function of a key giving that tensor's parameters (see pcb_fast.core.engine.run).
    If ``report`` is a dict, it receives "kept" (entries kept per task), "entries" (merged entries),
    "merged_keys" and "copied_keys". ``model_names`` name the models in error messages.
    ``max_memory`` (bytes, or e.g. "1GB"; default no limit) bounds the entries the engine collects
    between passes; above it, thresholds come from radix-select passes and the merge recomputes
    its scores in one more pass (the same result, bit for bit).
    ``threads``: CPU threads of the torch backend, "auto" (the cores other processes leave free, looked
    at again during the merge) or a number; torch's own setting is restored afterwards.
    ``fused`` ("auto", "on", "off"): on the torch backend, run the per-block work of TIES, DARE,
    DARE-TIES and PCB's official variant (inter "sum", "normalized_sum") as C loops (pcb_fast.cpu.native:
    the same bits; where no C compiler works, loops compiled by torch.compile, the same values), and
    Breadcrumbs and PCB's pairwise term through compiled loops (PCB: values within 2e-5 of
    max|tau_m| of the bit-exact eager path, inductor's exp and tanh round differently; docs/design.md
    9); "auto": the C loops always, compiled ones for merges of at least 2^29 task-vector entries
    (PCB: 2^31), where compiling pays for itself; "off": the eager torch ops.
    ``running_stats``: BatchNorm's running_mean/running_var (beside num_batches_tracked) are not task
    vectors: "average" (default) takes the models' mean weighted by ``lambdas``, "base" the base's
    (pcb_fast/io/running_stats.py).
    """
    spec = spec_of(method)
    models = list(models)
    check_method_params(method, len(models), lam, lambdas, scope, method_params)  # before any heavy work
    lam = checks.check_lam(lam)
    budget = None if max_memory is None else checks.parse_size(max_memory, "max_memory")
    checks.check_choice("fused", fused, fused_cpu.MODES)
    check_threads(threads)
    checks.check_block_width(block_width)
    check_running_stats_mode(running_stats)
    models, names, merged_keys, copied_keys, device = check_state_dicts(base, models, exclude, model_names)
    stat_keys = running_stat_keys(base, merged_keys)  # averaged, not merged as task vectors
    merged_keys = [k for k in merged_keys if k not in stat_keys]
    backend = resolve_backend(backend, device)
    if backend not in spec.backends:
        raise ValueError(f"method {checks.short(method)} runs on backends {', '.join(map(repr, spec.backends))} in this "
                         f"version, not on {checks.short(backend)}")
    if backend == "triton":
        spec.for_kernels(method_params)  # before any heavy work
    # tied parameters are merged once, under their first name (io/tied.py)
    aliases = check_tied(base, models, names, merged_keys)
    merged_keys = [k for k in merged_keys if k not in aliases]
    lambdas = checks.check_lambdas(lambdas, len(models))
    stats = merge_running_stats(base, models, stat_keys, lambdas, running_stats, names)  # over every model given
    models, names, lambdas, dropped, method_params = _without_base_copies(base, models, names, lambdas, merged_keys,
                                                                          method, method_params)

    out = {}
    for keys in [[k] for k in copied_keys] + tied_groups({k: base[k] for k in copied_keys}):
        clone = base[keys[0]].clone()  # tied copied keys stay one tensor
        out.update({k: clone for k in keys})
    if report is not None:
        report.update(merged_keys=merged_keys, copied_keys=copied_keys, aliases=aliases, dropped_models=dropped,
                      running_stat_keys=stat_keys)
    out.update(stats)
    if merged_keys:
        info = _merge_keys(base, models, names, merged_keys, out, device, method=method, backend=backend, lam=lam,
                           lambdas=lambdas, scope=scope, block_width=block_width, budget=budget, fused=fused,
                           threads=threads, **method_params)
        if report is not None:
            report.update(info)
    for alias, key in aliases.items():
        out[alias] = out[key]
    return {k: out[k] for k in base}


def _without_base_copies(base, models, names, lambdas, merged_keys, method, params=None):
    """The task list without the models that equal the base (mergekit's habit when the base is listed
    among the models: a zero task vector would otherwise count as a task in every statistic). The
    average keeps them: there the base is one of the models averaged. Returns (models, names,
    lambdas, names of the dropped models, method parameters with their per-task values
    (lists, and the ``take`` of segment_params) restricted to the models kept)."""
    params = {} if params is None else params
    if method == "average" or SPECS[method].weight_space:  # (weight-space methods: their inputs, as given)
        return models, names, lambdas, [], params
    copies = [i for i, m in enumerate(models) if same_as_base(base, m, merged_keys)]
    if not copies or len(copies) == len(models):  # nothing to drop, or nothing would be left to merge
        return models, names, lambdas, [], params
    warnings.warn(f"pcb_fast: {', '.join(names[i] for i in copies)} equal{'s' if len(copies) == 1 else ''} the base "
                  f"model: left out of the merge (a zero task vector is no task)", stacklevel=3)
    keep = [i for i in range(len(models)) if i not in copies]
    return ([models[i] for i in keep], [names[i] for i in keep],
            None if lambdas is None else [lambdas[i] for i in keep], [names[i] for i in copies],
            keep_tasks(params, keep, len(models)))


def keep_tasks(params: dict, keep: list, n: int) -> dict:
    """Method parameters restricted to the tasks ``keep`` of ``n``: per-task values (lists of n, and
    the ``take`` of segment_params) keep those entries; shared values stay as they are."""
    def kept(value):
        if isinstance(value, (list, tuple)) and len(value) == n:
            return [value[i] for i in keep]
        return value.take(keep) if hasattr(value, "take") else value

    return {name: kept(value) for name, value in params.items()}


def _merge_keys(base, models, names, merged_keys, out, device, *, method, backend, lam, lambdas, scope, block_width,
                budget, fused, threads="auto", **method_params) -> dict:
    """Merge ``merged_keys`` into ``out`` on ``backend``; returns what the backend reports."""
    if backend == "reference":
        _reference_merge(base, models, merged_keys, out, method=method, lam=lam, lambdas=lambdas, scope=scope,
                         **method_params)
        return {}
    if backend == "triton":
        for key in merged_keys:
            out[key] = torch.empty(base[key].shape, dtype=base[key].dtype, device=device)
        method_params = SPECS[method].for_kernels(method_params)
        return triton_backend.merge_state_dicts(base, models, merged_keys, out, names, lam=lam, scope=scope,
                                                lambdas=lambdas, method=method, **method_params)
    for key in merged_keys:  # contiguous whatever the base's layout: written flat, in the base's index order
        out[key] = torch.empty_like(base[key], memory_format=torch.contiguous_format)
    flat_out = {key: flat(out[key]) for key in merged_keys}
    flat_base = {key: flat(base[key]) for key in merged_keys}

    def tau(segment, lo, hi, tau_m):
        if segment.parts:  # a pack of small keys (core.sources.pack_segments): one sweep, then a copy per key
            keys = [part.key for part in segment.parts]
            theta = merged_weights(torch.cat([flat_base[key] for key in keys]), lam, tau_m)
            values = theta.to(flat_out[keys[0]].dtype)
            try:
                checks.check_merged(keys[0], theta, values)
            except ValueError:  # the key that holds the bad value says so
                for part, _, _, start, end in segment.pieces(lo, hi):
                    checks.check_merged(part.key, theta[start:end], values[start:end])
                raise
            for key, piece in zip(keys, values.split([part.numel for part in segment.parts])):
                flat_out[key].copy_(piece)
            return
        theta = merged_weights(flat_base[segment.key][lo:hi], lam, tau_m)
        values = flat_out[segment.key][lo:hi]
        values.copy_(theta)
        checks.check_merged(segment.key, theta, values)

    def weights(segment, lo, hi, theta):  # the merged weights themselves (pcb_fast.methods.weight_space)
        values = flat_out[segment.key][lo:hi]
        values.copy_(theta)
        checks.check_merged(segment.key, theta, values)

    def patchable(segment, lo, hi, tau_m, positions, other, room):
        tau(segment, lo, hi, tau_m)
        positions, other = room.hold(positions), room.hold(other)

        def patch():
            for part, at, taken in pieces_at(segment, lo, hi, positions):
                theta = merged_weights(flat_base[part.key][at], lam, other[taken])
                values = theta.to(flat_out[part.key].dtype)
                checks.check_merged(part.key, theta, values)
                flat_out[part.key][at] = values

        return patch

    sink = Sink(tau, weights=weights, patchable=patchable)
    source = StateDictSource(base, models, merged_keys, names)
    spec = SPECS[method]
    with CpuThreads(threads) as cpu_threads:
        options = RunOptions(memory_budget=budget, threads=cpu_threads,
                             pack_keys=scope == "global" and spec.packable(method_params),
                             **fused_cpu.settings(fused, source.n * source.D, method, method_params))
        return engine.run(spec.merge, source, sink, options=options, scope=scope, merge_tensors=spec.merge_tensors,
                          lambdas=lambdas, block_width=block_width, **method_params)


def check_state_dicts(base: dict, models, exclude=(), model_names=None):
    """Validate a base and its fine-tuned state dicts before any heavy work (docs/design.md 2.1).

    Returns (models as a list, model names, merged keys, copied keys, the tensors' device).
    """
    if not isinstance(base, dict):
        raise ValueError(f"base is a {type(base).__name__}, expected a state dict (dict of tensors)")
    models = list(models)
    checks.check_n_models(len(models))
    exclude = checks.check_exclude(exclude)
    names = list(model_names) if model_names is not None else [f"model {i}" for i in range(len(models))]
    base_checkpoint = StateDictCheckpoint(base, "base model")
    merged_keys, copied_keys = split_keys(base_checkpoint, exclude)
    check_models_match(base_checkpoint, [StateDictCheckpoint(m, name) for m, name in zip(models, names)], merged_keys)
    tensors = [sd[k] for sd in [base] + models for k in merged_keys]
    device = tensors[0].device if tensors else torch.device("cpu")
    if any(t.device != device for t in tensors):  # (named only then: a model may have hundreds of thousands of keys)
        checks.common_device(
            [(f"base model, key {checks.short(k, 80)}", base[k]) for k in merged_keys]
            + [(f"{name}, key {checks.short(k, 80)}", m[k]) for name, m in zip(names, models) for k in merged_keys])
    checks.check_all_finite(zip(merged_keys, map(base.__getitem__, merged_keys)),
                            label=lambda key: f"base model, key {checks.short(key, 80)}")
    return models, names, merged_keys, copied_keys, device


def _reference_merge(base, models, merged_keys, out, *, method, lam, lambdas, scope, segment_params=None, **params):
    """The reference path for state dicts: flatten, merge with the literal formulation, unflatten.
    ``segment_params`` (scope "tensor"): each key's own parameters, lambdas and lam (engine.run)."""
    lambdas = checks.check_lambdas(lambdas, len(models))
    groups = [merged_keys] if scope == "global" else [[k] for k in merged_keys]
    for keys in groups:
        own, own_lambdas, scale = params, lambdas, None
        if segment_params is not None:
            own = dict(params, **segment_params(keys[0]))
            own_lambdas, scale = own.pop("lambdas", lambdas), own.pop("lam", None)
        tv = torch.stack([torch.cat([(m[k].float() - base[k].float()).reshape(-1) for k in keys]) for m in models])
        if method == "pcb":
            tau_m = _reference_pcb(tv, check_pcb_params(len(models), lambdas=own_lambdas, **own))
        else:
            segments = [(k, tuple(base[k].shape)) for k in keys]
            tau_m = reference.BASELINES[method](tv, lambdas=own_lambdas, segments=segments, **own)
        if scale is not None:
            tau_m = float(scale) * tau_m
        offset = 0
        for k in keys:
            numel = base[k].numel()
            theta = merged_weights(base[k].reshape(-1), lam, tau_m[offset : offset + numel])
            out[k] = theta.to(base[k].dtype).view(base[k].shape)
            checks.check_merged(k, theta, out[k])
            offset += numel
