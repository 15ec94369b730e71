"""Public API: ``pcb_merge`` for task-vector matrices, ``merge`` for state dicts."""

from __future__ import annotations

from typing import Sequence

import torch

from . import checks, engine, fused_cpu, reference, reference_baselines, triton_backend
from .backends import resolve_backend
from .methods import METHODS
from .checkpoints import StateDictCheckpoint, check_models_match, split_keys
from .sources import DEFAULT_BLOCK_WIDTH, MatrixSource, StateDictSource


def pcb_merge(task_vectors, *, ratio=0.1, clamp_ratio=1e-4, inter="sum", variant="official", lambdas=None,
              backend="auto", block_width=DEFAULT_BLOCK_WIDTH, report: dict | None = None) -> torch.Tensor:
    """Merged task vector tau_m (float32, [D]) of PCB-Merging for a [n, D] tensor or n 1-D tensors.

    ``variant="official"`` is the authors' code (DESIGN 2.2), ``"paper"`` the paper's equations.
    ``lambdas`` weight the tasks inside the weighted mean (step 7). Global statistics over all D.
    Tensors on a CUDA device run on the triton backend (``backend="auto"``).
    If ``report`` is a dict, it receives "kept" (entries kept per task) and "entries" (D).
    """
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
        return reference.pcb_reference(task_vectors, ratio=ratio, clamp_ratio=clamp_ratio, inter=inter,
                                        variant=variant, lambdas=lambdas)
    source = MatrixSource(task_vectors)
    out = torch.empty(source.D)

    def sink(segment, lo, hi, values):
        out[segment.offset + lo : segment.offset + hi] = values

    info = engine.run(METHODS["pcb"][0], source, sink, ratio=ratio, clamp_ratio=clamp_ratio, inter=inter,
                      variant=variant, lambdas=lambdas, block_width=block_width)
    if report is not None:
        report.update(info)
    return out


def merge(base: dict, models: Sequence[dict], *, method="pcb", lam=1.0, lambdas=None, scope="global",
          exclude=(), backend="auto", block_width=DEFAULT_BLOCK_WIDTH, report: dict | None = None,
          model_names=None, max_memory=None, fused="auto", **method_params) -> dict:
    """Merge fine-tuned state dicts ``models`` of ``base``: theta = theta_pre + lam * tau_m.

    Floating keys not matching an ``exclude`` regex are merged; the rest are copied from ``base``.
    Statistics are taken over all merged entries (``scope="global"``) or per tensor. The output has
    the base's dtypes. ``method_params`` go to the method: pcb (ratio, clamp_ratio, inter, variant),
    average, task_arithmetic, ties (density, sign_ties, topk), dare (p, seed), dare_ties (p, seed,
    sign_ties), breadcrumbs (gamma, beta).
    If ``report`` is a dict, it receives "kept" (entries kept per task), "entries" (merged entries),
    "merged_keys" and "copied_keys". ``model_names`` name the models in error messages.
    ``max_memory`` (bytes, or e.g. "1GB"; default no limit) bounds the entries the engine collects
    between passes; above it, thresholds come from radix-select passes and the merge recomputes
    its scores in one more pass (the same result, bit for bit).
    ``fused`` ("auto", "on", "off"): on the torch backend, run TIES, DARE, DARE-TIES and Breadcrumbs through
    loops compiled by torch.compile (pcb_fast.fused_cpu; the same values; "auto": for merges of at
    least 2^29 task-vector entries, where compiling pays for itself).
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not valid; choose one of {', '.join(map(repr, METHODS))}")
    merge_fn, accepted = METHODS[method]
    unknown = sorted(set(method_params) - set(accepted))
    if unknown:
        raise ValueError(f"method {method!r} has no parameter {unknown[0]!r}; valid: {', '.join(accepted)}")
    lam = checks.check_lam(lam)
    checks.check_choice("scope", scope, checks.SCOPE_CHOICES)
    budget = None if max_memory is None else checks.parse_size(max_memory, "max_memory")
    checks.check_choice("fused", fused, fused_cpu.MODES)
    models, names, merged_keys, copied_keys, device = check_state_dicts(base, models, exclude, model_names)
    backend = resolve_backend(backend, device)
    if backend == "triton" and method not in ("pcb",) + triton_backend.BASELINES:
        raise ValueError(f"method {method!r} runs on backends 'torch' and 'reference' in this version; the triton "
                         f"backend runs 'pcb', {', '.join(map(repr, triton_backend.BASELINES))}")

    out = {key: base[key].clone() for key in copied_keys}
    if report is not None:
        report.update(merged_keys=merged_keys, copied_keys=copied_keys)
    if not merged_keys:
        return out
    if backend == "reference":
        _reference_merge(base, models, merged_keys, out, method=method, lam=lam, lambdas=lambdas, scope=scope,
                         **method_params)
        return {k: out[k] for k in base}
    if backend == "triton":
        for key in merged_keys:
            out[key] = torch.empty(base[key].shape, dtype=base[key].dtype, device=device)
        info = triton_backend.merge_state_dicts(base, models, merged_keys, out, names, lam=lam, scope=scope,
                                                lambdas=lambdas, method=method, **method_params)
        if report is not None:
            report.update(info)
        return {k: out[k] for k in base}
    for key in merged_keys:
        out[key] = torch.empty_like(base[key])
    flat_out = {key: out[key].view(-1) for key in merged_keys}
    flat_base = {key: base[key].reshape(-1) for key in merged_keys}

    def sink(segment, lo, hi, tau_m):
        theta = flat_base[segment.key][lo:hi].float() + lam * tau_m
        flat_out[segment.key][lo:hi] = theta

    source = StateDictSource(base, models, merged_keys, names)
    source.memory_budget = budget
    source.fused = fused_cpu.resolve(fused, source.n * source.D)
    info = engine.run(merge_fn, source, sink, scope=scope, lambdas=lambdas, block_width=block_width, **method_params)
    if report is not None:
        report.update(info)
    return {k: out[k] for k in base}


def check_state_dicts(base: dict, models, exclude=(), model_names=None):
    """Validate a base and its fine-tuned state dicts before any heavy work (DESIGN 2.1).

    Returns (models as a list, model names, merged keys, copied keys, the tensors' device).
    """
    if not isinstance(base, dict):
        raise ValueError(f"base is a {type(base).__name__}, expected a state dict (dict of tensors)")
    models = list(models)
    checks.check_n_models(len(models))
    if isinstance(exclude, str):
        exclude = (exclude,)
    names = list(model_names) if model_names is not None else [f"model {i}" for i in range(len(models))]
    base_checkpoint = StateDictCheckpoint(base, "base model")
    merged_keys, copied_keys = split_keys(base_checkpoint, exclude)
    check_models_match(base_checkpoint, [StateDictCheckpoint(m, name) for m, name in zip(models, names)], merged_keys)
    device = checks.common_device(
        [(f"base model, key {k!r}", base[k]) for k in merged_keys]
        + [(f"{name}, key {k!r}", m[k]) for name, m in zip(names, models) for k in merged_keys]
    )
    for key in merged_keys:
        checks.check_finite(f"base model, key {key!r}", base[key])
    return models, names, merged_keys, copied_keys, device


def _reference_merge(base, models, merged_keys, out, *, method, lam, lambdas, scope, **params):
    """The reference path for state dicts: flatten, merge with the literal formulation, unflatten."""
    groups = [merged_keys] if scope == "global" else [[k] for k in merged_keys]
    for keys in groups:
        tv = torch.stack([torch.cat([(m[k].float() - base[k].float()).reshape(-1) for k in keys]) for m in models])
        if method == "pcb":
            tau_m = reference.pcb_reference(tv, lambdas=lambdas, **params)
        else:
            segments = [(k, tuple(base[k].shape)) for k in keys]
            tau_m = reference_baselines.METHODS[method](tv, lambdas=lambdas, segments=segments, **params)
        offset = 0
        for k in keys:
            numel = base[k].numel()
            theta = base[k].reshape(-1).float() + lam * tau_m[offset : offset + numel]
            out[k] = theta.to(base[k].dtype).view(base[k].shape)
            offset += numel
