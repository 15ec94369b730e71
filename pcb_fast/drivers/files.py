"""Merging checkpoints on disk into a Hugging Face folder, atomically (docs/design.md 7.2).

On the CPU with the torch backend the models are streamed: each pass reads every model slice by
slice, and the merged blocks are written straight into planned safetensors shards, so memory
holds a few blocks plus, when they fit ``max_memory``, the float32 task vectors (then later passes
read RAM instead of the files). The reference and triton backends load the models whole (onto
``device``). Output goes to a temporary folder next to ``out`` that is renamed at the very end: a
failed or interrupted merge leaves nothing behind, and an existing ``out`` is replaced only with
``overwrite``.

Output safety (never deleting what this run did not create, atomic publishing) is
pcb_fast/io/output.py.
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import replace
from pathlib import Path

import torch

from ..api import keep_tasks, merge
from ..core import checks
from ..core.backends import resolve_backend
from ..core.sources import DEFAULT_BLOCK_WIDTH, CachedSource, CheckpointSource
from ..core.threads import CpuThreads, room_for_io
from ..cpu import native
from ..io.card import write_card
from ..io.checkpoints import check_models_match, open_model, split_keys
from ..io.distributed import assign_shards, init_from_env
from ..io.folder import check_side_files, copy_side_files, copy_tensor
from ..io.output import atomic_folder, check_output
from ..io.running_stats import check_mode as check_running_stats_mode
from ..io.running_stats import merge_running_stats, running_stat_keys
from ..io.safetensors import ShardedWriter, nbytes, shard_plan, sharing_headers, show_path
from ..io.write_behind import WriteBehind
from ..methods import SPECS, scope_matters
from .common import (OUT_DTYPES, MergeSettings, check_out_reads_nothing, check_settings, check_shard_size, fill_report,
                     run_engine, shard_sink)
from .distributed import merge_on_device


def _names(sources) -> list:
    return [f"model {i} ({show_path(s)})" if not isinstance(s, dict) else f"model {i}" for i, s in enumerate(sources)]


def _without_the_base(base, models, names, lambdas, method, params):
    """The task list without the models whose path is the base's (real paths compared): mergekit
    configs often list the base among the models, where it would count as a task with a zero task
    vector. Their weights are ignored, as mergekit does; the average keeps them (there the base is one
    of the models averaged). Returns (models, names, lambdas, names of the dropped models, method
    parameters with their per-task values restricted to the models kept)."""
    if (method == "average" or not isinstance(base, (str, os.PathLike))  # (state dicts, slices: as given)
            or SPECS[method].weight_space):  # (weight-space methods: their inputs, as given)
        return models, names, lambdas, [], params
    real = os.path.realpath(base)
    copies = [i for i, m in enumerate(models) if isinstance(m, (str, os.PathLike)) and os.path.realpath(m) == real]
    if not copies or len(copies) == len(models):
        return models, names, lambdas, [], params
    keep = [i for i in range(len(models)) if i not in copies]
    return ([models[i] for i in keep], [names[i] for i in keep],
            None if lambdas is None else [lambdas[i] for i in keep], [names[i] for i in copies],
            keep_tasks(params, keep, len(models)))


def check_recordable(paths) -> None:
    """The paths the output's mergekit_config.yml and README.md record must be text: a name whose
    bytes are not UTF-8 is refused before the merge, not after it."""
    for label, path in paths:
        try:
            os.fsencode(path).decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"{label} {show_path(path)}: its name is not UTF-8 text, which the output's "
                             "mergekit_config.yml and README.md record; rename it") from None


def merge_checkpoints(base, models, out, *, method="pcb", lam=1.0, lambdas=None, scope="global", exclude=(),
                      backend="auto", device="cpu", max_memory=None, shard_size="5GB", dtype=None,
                      overwrite=False, progress=None, report: dict | None = None, distributed: bool = False,
                      fused="auto", block_width=DEFAULT_BLOCK_WIDTH, threads="auto", card: dict | None = None,
                      running_stats="average", **method_params) -> Path:
    """Merge checkpoints (paths or state dicts) of ``models`` fine-tuned from ``base`` into the folder
    ``out``: sharded safetensors (``shard_size``) with an index, the base's dtypes (or ``dtype``),
    the base folder's config/tokenizer files, and the merge parameters in the metadata.

    ``max_memory`` (bytes or e.g. "2GB"; default: half the available memory) bounds what is held in
    RAM between passes: the float32 task vectors when they fit (else every pass re-reads the
    files), then the entries a method collects (else it selects by radix and merges in one more
    pass). The result is the same bit for bit whatever the budget. ``progress``:
    a factory ``progress(total_bytes, description)`` of bars with update/close, called per pass.
    ``report`` receives kept, entries, merged_keys, copied_keys, seconds and peak_rss_bytes.
    ``distributed``: this process is one rank of a torchrun launch (pcb_fast.io.distributed); every
    rank calls this with the same arguments, and the output equals the single-process one.
    ``fused``: "auto", "on" or "off", as for :func:`pcb_fast.merge` (single-process merges only).
    ``threads``: "auto" or a number, as for :func:`pcb_fast.merge`.
    ``card``: what a YAML config recorded for the output's mergekit_config.yml and README.md
    (pcb_fast/io/card.py; without it they describe the arguments).
    ``running_stats``: BatchNorm's running statistics are averaged over the models ("average") or
    taken from the base ("base"), never merged as task vectors (pcb_fast/io/running_stats.py).
    Returns the output folder.
    """
    started = time.perf_counter()
    models = list(models)
    n = len(models)
    settings = check_settings(method, n, lam=lam, lambdas=lambdas, scope=scope, exclude=exclude, params=method_params,
                              max_memory=max_memory, fused=fused, threads=threads, dtype=dtype, block_width=block_width)
    check_running_stats_mode(running_stats)
    shard_bytes = check_shard_size(shard_size)
    try:
        device = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device={checks.short(device)} is not a torch device; use cpu or cuda (or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={checks.short(str(device))}: no CUDA device is available here; use cpu")
    backend = resolve_backend(backend, device)
    labels = ["the base model"] + [f"model {i}" for i in range(n)]
    paths = [(label, path) for label, s in zip(labels, [base] + models) if not isinstance(s, dict)
             for path in getattr(s, "paths", [s])]  # (a model stitched from slices: its sources' paths)
    paths += [("the tokenizer source", path) for path in getattr((card or {}).get("tokenizer"), "read_from", ())]
    check_recordable(paths + [("output", out)])
    out = check_output(out, overwrite, paths)

    names = _names(models)
    models, names, lambdas, dropped, method_params = _without_the_base(base, models, names, settings.lambdas,
                                                                        method, settings.params)
    settings = replace(settings, lambdas=lambdas, params=method_params)
    headers = {}  # headers parsed, for inputs that share them (io.safetensors.sharing_headers)
    with sharing_headers(headers):
        base_ck = open_model(base, "base model")
    model_cks, comm = [], None
    try:
        with sharing_headers(headers):
            for source, name in zip(models, names):
                model_cks.append(open_model(source, name))
        headers.clear()
        check_out_reads_nothing(out, zip(["the base model"] + names, [base_ck] + model_cks))
        merged, copied = split_keys(base_ck, settings.exclude)
        if not merged:
            raise ValueError(_nothing_to_merge(base_ck, base, copied))
        check_models_match(base_ck, model_cks, merged)
        stat_keys = running_stat_keys(set(base_ck.keys()), merged)  # averaged, not merged as task vectors
        merged = [k for k in merged if k not in stat_keys]
        stats = merge_running_stats({k: base_ck.read(k) for k in stat_keys},
                                    [{k: ck.read(k) for k in stat_keys} for ck in model_cks], stat_keys,
                                    settings.lambdas, running_stats, names)
        check_side_files(base_ck.folder, dtype, card, base_ck.name)
        if dropped:  # (said once the inputs pass their checks: a refusal stays the only line)
            warnings.warn(f"pcb_fast: {', '.join(dropped)} {'is' if len(dropped) == 1 else 'are'} the base model: left "
                          "out of the task list (a zero task vector is no task)", stacklevel=2)
        if distributed:  # every rank has made the same checks; now they meet
            comm = init_from_env(backend, device)  # gloo on CPUs; NCCL, a GPU per rank, for triton
            device = comm.merge_device
            if comm.rank != 0:
                progress = None
        with atomic_folder(out, comm, overwrite=overwrite) as tmp:
            info = _write_merge(base_ck, model_cks, merged, copied, tmp, stats, settings, backend=backend,
                                device=device, shard_bytes=shard_bytes, progress=progress, comm=comm)
            if comm is None or comm.rank == 0:  # what made it: mergekit_config.yml, README.md (io/card.py)
                write_card(tmp, out.name, base=base, models=models, method=method, lam=settings.lam,
                           lambdas=settings.lambdas, scope=scope, exclude=settings.exclude, dtype=dtype,
                           params=settings.params, card=card)
    finally:
        for ck in [base_ck] + model_cks:
            ck.close()
        if comm is not None:
            comm.close()
    fill_report(report, info, started, merged, copied, dropped_models=dropped, running_stat_keys=stat_keys)
    return out


def _nothing_to_merge(base_ck, base, copied) -> str:
    where = base_ck.name if isinstance(base, dict) else f"{base_ck.name} ({base})"
    if not copied:
        return f"{where} holds no tensors; nothing to merge"
    if any(base_ck.is_floating(k) and base_ck.numel(k) > 0 for k in copied):
        return f"{where}: every floating-point tensor matches an exclude pattern; nothing to merge"
    keys = ", ".join(map(repr, copied[:3])) + (", ..." if len(copied) > 3 else "")
    return f"{where} has no floating-point tensor with entries (its keys: {keys}); nothing to merge"


def _write_merge(base_ck, model_cks, merged, copied, folder: Path, stats: dict, settings: MergeSettings, *, backend,
                 device, shard_bytes, progress, comm=None) -> dict:
    """Write the output's tensors into ``folder``: the copied keys, the running statistics and the
    merged keys (this rank's shards only, distributed), then the base folder's side files."""
    out_dtype = settings.out_dtype(base_ck)
    keys = base_ck.keys()
    dtypes, shapes = base_ck.layout(keys)  # (asked in bulk: a model may have hundreds of thousands of keys)
    if settings.dtype is not None:
        dtypes = [OUT_DTYPES[settings.dtype] if d.is_floating_point else d for d in dtypes]
    entries = list(zip(keys, dtypes, map(tuple, shapes)))
    only, local = None, None
    if comm is not None:  # this rank's whole shards, contiguous in key order
        shards = shard_plan(entries, shard_bytes)
        only = set(assign_shards([sum(nbytes(t, s) for _, t, s in sh) for sh in shards], comm.world)[comm.rank])
        local = {key for i in only for key, _, _ in shards[i]}
    writer = ShardedWriter(folder, entries, shard_bytes, settings.metadata(), only=only,
                           index=comm is None or comm.rank == 0)
    if room_for_io(settings.threads):  # written behind the engine by a thread (io/write_behind.py); the values
        writer = WriteBehind(writer)  # written are new tensors, never reused buffers
    with writer:
        for key in copied:
            if local is None or key in local:
                copy_tensor(base_ck, key, writer, out_dtype(key))
        for key, value in stats.items():  # running statistics: small, averaged up front
            if local is None or key in local:
                writer.write(key, 0, value.reshape(-1).to(out_dtype(key)))
        info = {"kept": [0] * len(model_cks), "entries": 0}
        if merged and backend == "torch":
            info = _stream_merge(base_ck, model_cks, merged, writer, settings, progress=progress, comm=comm,
                                 local=local)
        elif merged:
            info = _in_memory_merge(base_ck, model_cks, merged, writer, settings, backend=backend, device=device,
                                    comm=comm, local=local)
    if comm is None or comm.rank == 0:
        copy_side_files(base_ck.folder, folder, settings.dtype, base_ck.name, getattr(base_ck, "config_updates", None))
    return info


def _stream_merge(base_ck, model_cks, merged, writer, settings: MergeSettings, *, progress, comm=None,
                  local=None) -> dict:
    """The torch backend on CPU: models streamed slice by slice, merged blocks written as they come."""
    scope = settings.scope
    if scope == "tensor" and not scope_matters(settings.method, settings.params):
        scope = "global"  # the same values, in one pass (one reader thread) instead of one per tensor
    keys = merged if local is None else [k for k in merged if k in local]
    copies = SPECS[settings.method].copies
    if copies is not None and comm is None:  # (passthrough: the model's tensors, copied)
        copied = [k for k in keys if copies(settings.params, k)]
        out_dtype = settings.out_dtype(base_ck)
        with CpuThreads(settings.threads):
            for key in copied:
                copy_tensor(model_cks[0], key, writer, out_dtype(key), finite=True)
        keys = [k for k in keys if k not in set(copied)]
        if not keys:
            entries = sum(base_ck.numel(k) for k in copied)
            return {"kept": [entries] * len(model_cks), "entries": entries}
    source = reader = CheckpointSource(base_ck, model_cks, keys)
    budget = settings.budget
    if comm is not None:  # this rank's keys, with the statistics of the whole model
        source.D = sum(base_ck.numel(k) for k in merged)
    else:
        # The float32 task vectors first, if they fit (with scope="tensor", one tensor's at a time, in one
        # reused buffer); what is left bounds the entries collected between passes. Not a whole model's
        # of 16-bit inputs: such a cache is twice the size of the inputs it replaces, and faulting in
        # that much fresh memory costs more than forming tau from the files again on each pass
        # (docs/design.md 3.4 has the measurement).
        cached = source.n * 4 * (source.D if scope == "global" else max(s.numel for s in source.segments))
        inputs = sum(ck.nbytes(keys) for ck in model_cks)
        if (cached <= budget and not SPECS[settings.method].single_pass(settings.params)
                and (scope == "tensor" or cached <= inputs)):
            source = CachedSource(source)
            budget -= cached

    def base_slice(segment, lo, hi):
        base = reader.base_block(segment.key, lo, hi)  # the block the source has just read: no second read
        return reader.base_slice(segment, lo, hi) if base is None else base

    sink = shard_sink(writer, settings.out_dtype(base_ck), settings.lam, base_slice, comm=comm,
                      from_inputs=comm is None and native.problem() is None)
    pack_keys = comm is None and scope == "global" and SPECS[settings.method].packable(settings.params)
    try:
        return run_engine(source, sink, settings, progress=progress, budget=budget, scope=scope, comm=comm,
                          pack_keys=pack_keys)
    finally:
        reader.close_reads()  # also when an exception (a signal, an error) left a pass suspended


def _in_memory_merge(base_ck, model_cks, merged, writer, settings: MergeSettings, *, backend, device, comm=None,
                     local=None) -> dict:
    """The reference and triton backends: models loaded whole onto ``device``, merged by pcb_fast.merge;
    distributed (triton), this rank's keys on its GPU (drivers/distributed.py)."""
    out_dtype = settings.out_dtype(base_ck)
    if comm is not None:
        return merge_on_device(base_ck, model_cks, merged, local, writer, out_dtype, comm, method=settings.method,
                               lam=settings.lam, lambdas=settings.lambdas, scope=settings.scope,
                               params=settings.params)

    base = {k: base_ck.read(k).to(device) for k in merged}
    models = [{k: ck.read(k).to(device) for k in merged} for ck in model_cks]
    names = [ck.name for ck in model_cks]
    report = {}
    result = merge(base, models, method=settings.method, lam=settings.lam, lambdas=settings.lambdas,
                   scope=settings.scope, backend=backend, block_width=settings.block_width, report=report,
                   model_names=names, **settings.params)
    for key in merged:
        values = result[key].reshape(-1).to(out_dtype(key))
        checks.check_merged(key, result[key], values)
        writer.write(key, 0, values.cpu())
    return {"kept": report.get("kept"), "entries": sum(t.numel() for t in base.values())}
