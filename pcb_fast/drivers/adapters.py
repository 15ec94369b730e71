"""Merging LoRA adapters (pcb_fast/io/lora.py reads them) into a model folder, a state dict or an
adapter folder, without materialising their deltas; and extracting an adapter from a fine-tuned
model (mergekit's ``extract-lora``). The adapters written out are pcb_fast/io/lora_out.py's."""

from __future__ import annotations

import os
import time

import torch

from ..core import checks
from ..core.formulas import merged_weights
from ..core.sources import DEFAULT_BLOCK_WIDTH
from ..io import lora_out
from ..io.checkpoints import check_models_match, open_checkpoint, split_keys
from ..io.folder import copy_side_files, copy_tensor
from ..io.lora import LoraSource, open_adapter
from ..io.output import atomic_folder, check_output
from ..io.safetensors import ShardedWriter, show
from ..io.tied import folder_aliases, merged_aliases, tied_groups
from .common import (BaseSlices, check_out_reads_nothing, check_settings, check_shard_size, fill_report, merged_into,
                     run_engine, shard_sink)


def merge_adapters(base, adapters, out=None, *, method="pcb", lam=1.0, lambdas=None, scope="global", exclude=(),
                   max_memory=None, dtype=None, shard_size="5GB", overwrite=False, progress=None,
                   report: dict | None = None, fused="auto", block_width=DEFAULT_BLOCK_WIDTH, threads="auto",
                   backend="auto", device="cpu", out_rank=None, **method_params):
    """Merge PEFT LoRA adapter folders ``adapters`` of ``base`` (a path, as for merge_checkpoints, or a
    state dict) without materialising their deltas: each adapter is one task, tau_i = scale * B @ A
    on the keys it adapts and 0 elsewhere; theta = theta_pre + lam * tau_m for every merged key.

    With ``out``, writes a Hugging Face folder as :func:`pcb_fast.merge_checkpoints` does (sharded
    safetensors, the base folder's side files; atomically) and returns its path; without, returns the
    merged state dict. With ``out_rank`` r, ``out`` is written as a PEFT LoRA adapter folder of rank r
    instead (io/lora_out.py: a truncated SVD of each adapted module's merged delta; the report's
    "adapter_modules" gives each module's rank and relative error). The population of global
    statistics is the entries of the keys the adapters change; the other keys are the base's.
    The other parameters are merge_checkpoints' (``max_memory`` bounds the entries
    collected between passes; the task vectors are never cached; ``threads`` as for
    :func:`pcb_fast.merge`). Runs the torch backend on CPU.
    """
    started = time.perf_counter()
    if isinstance(adapters, (str, os.PathLike)):
        adapters = [adapters]
    adapters = list(adapters)
    settings = check_settings(method, len(adapters), lam=lam, lambdas=lambdas, scope=scope, exclude=exclude,
                              params=method_params, max_memory=max_memory, fused=fused, threads=threads, dtype=dtype,
                              block_width=block_width)
    if backend not in ("auto", "torch") or str(device) != "cpu":
        raise ValueError(f"LoRA adapters merge on the torch backend on CPU in this version (backend={checks.short(backend)}, "
                         f"device={checks.short(str(device))}); use backend 'torch' or 'auto' and device 'cpu'")
    names = [f"adapter {i} ({a})" for i, a in enumerate(adapters)]
    if out_rank is not None:
        out_rank = lora_out.check_rank(out_rank)
        if out is None:
            raise ValueError("out_rank writes an adapter folder: give out (the folder to write)")
    if out is not None:
        inputs = [] if isinstance(base, dict) else [("the base model", base)]
        out = check_output(out, overwrite, inputs + [(f"adapter {i}", a) for i, a in enumerate(adapters)])
        shard_bytes = check_shard_size(shard_size)
    base_ck = open_checkpoint(base, "base model")
    opened = []
    try:
        merged, copied = split_keys(base_ck, settings.exclude)
        if not merged:
            raise ValueError(f"{base_ck.name} has no floating-point tensor to merge (or every one is excluded)")
        # tied parameters are one parameter, merged once under their canonical name (io/tied.py): in a
        # state dict, the keys viewing one storage; in a folder, a head its config ties to the embedding
        state = getattr(base_ck, "state", None)  # a state dict, or a torch file (which keeps shared storages)
        aliases = merged_aliases(state, merged) if state is not None else {}
        head_aliases = {} if state is not None else folder_aliases(base_ck)
        merged = [k for k in merged if k not in aliases]
        for source, name in zip(adapters, names):
            opened.append(open_adapter(source, name, base_ck, merged, {**aliases, **head_aliases}))
        # the population of the merge is what the adapters change: a key no adapter touches has tau = 0
        # in every task, would only dilute global statistics (its zeros fill any top-k), and merges to
        # the base whatever the method
        adapted = set().union(*(a.deltas for a in opened))
        if not adapted:
            raise ValueError("the adapters change no merged key of the base model (every adapted key is excluded, "
                             "or every saved tensor equals the base's)")
        untouched = {k for k in merged if k not in adapted}
        copied = copied + [k for k in merged if k in untouched] + [a for a, k in aliases.items() if k in untouched]
        merged = [k for k in merged if k in adapted]
        aliases = {a: k for a, k in aliases.items() if k in adapted}
        for key in merged:
            if isinstance(base, dict):
                checks.check_finite(f"base model, key {show(key)}", base[key])

        source = LoraSource(base_ck, opened, merged)
        # the source never reads the base under the keys only products change: its slices are checked here
        slices = BaseSlices(base_ck, settings.block_width, check_finite=True)
        inputs = [("the base model", base_ck)] + [(a.name, a.checkpoint) for a in opened]

        def run(sink):
            return run_engine(source, sink, settings, progress=progress)

        if out_rank is not None:
            plans = lora_out.plan(opened, merged)  # what cannot be an adapter fails before the heavy work
            check_out_reads_nothing(out, inputs)
            template = opened[0].config
            info, modules = _merge_to_adapter(base_ck, plans, settings, slices, run, out, overwrite, out_rank,
                                              template, str(base) if not isinstance(base, dict) else "")
            info["adapter_modules"] = modules
            result = out
        elif out is None:
            info, result = _merge_in_memory(base_ck, merged, copied, aliases, settings, slices, run)
            result.update({alias: result[key] for alias, key in head_aliases.items()})  # as transformers loads it
        else:
            check_out_reads_nothing(out, inputs)
            out_dtype = settings.out_dtype(base_ck)
            metadata = settings.metadata(adapters=[str(a) for a in adapters])
            with atomic_folder(out, overwrite=overwrite) as tmp:
                with ShardedWriter(tmp, [(k, out_dtype(k), tuple(base_ck.shape(k))) for k in base_ck.keys()],
                                   shard_bytes, metadata) as writer:
                    for key in copied:  # in slices, within the memory budget, as a merge of files copies
                        copy_tensor(base_ck, key, writer, out_dtype(key))
                    info = run(shard_sink(writer, out_dtype, settings.lam,
                                          lambda segment, lo, hi: slices.read(segment.key, lo, hi), aliases=aliases))
                copy_side_files(base_ck.folder, tmp, dtype, base_ck.name)
            result = out
    finally:
        for ck in [base_ck] + [a.checkpoint for a in opened]:
            ck.close()
    fill_report(report, info, started, merged, copied, aliases={**aliases, **head_aliases},
                population="the entries of the keys the adapters change",
                adapted_keys={a.name: sorted(a.deltas) for a in opened})
    return result


def _merge_to_adapter(base_ck, plans, settings, slices, run, out, overwrite, rank, template, base_name):
    """Run the merge into a PEFT LoRA adapter folder (io/lora_out.py); returns (engine info,
    {module: (rank, relative error)}). Each key's delta lam * tau_m is held until its last block
    arrives, then factorised and freed."""
    out_dtype, lam = settings.out_dtype(base_ck), settings.lam
    deltas, filled, tensors, modules, ranks = {}, {}, {}, {}, {}

    def finish(key):
        how, module, _ = plans[key]
        delta = deltas.pop(key)
        if how == "lora":
            written, r, error = lora_out.factors(key, plans[key], delta, tuple(base_ck.shape(key)), rank)
            tensors.update(written)
            modules[module], ranks[module] = (r, error), r
        else:  # saved whole, as PEFT saves modules_to_save: the merged value
            base = base_ck.read(key).reshape(-1)
            tensors[f"{lora_out.PREFIX}{key}"] = merged_weights(base, 1.0, delta).to(out_dtype(key)).view(
                tuple(base_ck.shape(key)))

    def sink(segment, lo, hi, tau_m):
        key = segment.key
        theta = merged_weights(slices.read(key, lo, hi), lam, tau_m)
        checks.check_merged(key, theta, theta)
        if key not in deltas:
            deltas[key] = torch.empty(base_ck.numel(key))
            filled[key] = 0
        deltas[key][lo:hi].copy_(tau_m).mul_(lam)
        filled[key] += hi - lo
        if filled[key] == base_ck.numel(key):
            finish(key)

    info = run(sink)
    config = lora_out.adapter_config(rank, plans, ranks, template, base_name)
    with atomic_folder(out, overwrite=overwrite) as tmp:
        lora_out.write_adapter(tmp, tensors, config)
    return info, modules


def _merge_in_memory(base_ck, merged, copied, aliases, settings, slices, run):
    """The merged state dict: copied keys read whole, merged keys filled block by block."""
    out_dtype = settings.out_dtype(base_ck)
    result = {}
    for key in copied:
        result[key] = base_ck.read(key).to(out_dtype(key))  # a fresh tensor (read copies)
    for keys in tied_groups({k: base_ck.state[k] for k in copied} if hasattr(base_ck, "state") else {}):
        result.update({k: result[keys[0]] for k in keys})  # tied copied keys stay one tensor
    flat = {}
    for key in merged:
        result[key] = torch.empty(tuple(base_ck.shape(key)), dtype=out_dtype(key))
        flat[key] = result[key].view(-1)

    def sink(segment, lo, hi, tau_m):
        key = segment.key
        merged_into(key, slices.read(key, lo, hi), tau_m, settings.lam, flat[key][lo:hi])

    info = run(sink)
    for alias, key in aliases.items():
        result[alias] = result[key]
    return info, {k: result[k] for k in base_ck.keys()}


EMBEDDING_MODULES = ("embed_tokens", "wte", "embed_in", "word_embeddings", "shared")


def extract_adapter(base, model, out, rank: int, *, exclude=(), overwrite: bool = False,
                    report: dict | None = None):
    """A PEFT LoRA adapter of rank ``rank`` (written to the folder ``out``, atomically) that turns
    ``base`` into ``model`` (two full checkpoints, paths or state dicts; mergekit's ``extract-lora``),
    by the same truncated SVD as adapters out: each 2-D ``<module>.weight`` that differs becomes a LoRA
    (an Embedding LoRA for the usual input-embedding names, embed_tokens, wte, ...), and a module whose
    changed tensors are all 1-D or wider than 2-D (norms) is saved whole (``modules_to_save``). A
    module with both (a Linear whose bias changed) is a one-line error: ``exclude`` its bias to drop
    that change. ``report`` receives "adapter_modules" ({module: (rank, relative error)}). Returns
    ``out``."""
    rank = lora_out.check_rank(rank)
    inputs = [(label, x) for label, x in (("the base model", base), ("the fine-tuned model", model))
              if not isinstance(x, dict)]
    out = check_output(out, overwrite, inputs)
    base_ck, model_ck = open_checkpoint(base, "base model"), open_checkpoint(model, "fine-tuned model")
    try:
        merged, _ = split_keys(base_ck, exclude)
        check_models_match(base_ck, [model_ck], merged)
        check_out_reads_nothing(out, [("the base model", base_ck), ("the fine-tuned model", model_ck)])
        changed = {}
        for key in merged:
            delta = model_ck.read(key).float() - base_ck.read(key).float()
            if not bool(torch.isfinite(delta).all()):
                raise ValueError(f"key {show(key)}: the models' difference is not finite (NaN or Inf in an input)")
            if bool(delta.any()):
                changed[key] = delta
        if not changed:
            raise ValueError("the fine-tuned model equals the base model: there is no adapter to extract")
        lora_keys = {k for k, d in changed.items() if d.dim() == 2 and k.endswith(".weight")}
        lora_modules = {k[: -len(".weight")] for k in lora_keys}
        tensors, modules, ranks, plans = {}, {}, {}, {}
        for key in sorted(changed):
            module = key.rpartition(".")[0]
            if key in lora_keys:
                kind = "embedding" if module.rpartition(".")[2] in EMBEDDING_MODULES else "linear"
                plans[key] = ("lora", module, kind)
                written, r, error = lora_out.factors(key, plans[key], changed[key].reshape(-1),
                                                     tuple(changed[key].shape), rank)
                tensors.update(written)
                modules[module], ranks[module] = (r, error), r
            elif module in lora_modules:
                raise ValueError(f"{show(key)} changed, and its module {show(module)} becomes a LoRA: an adapter "
                                 "cannot hold both; exclude the key to leave it out")
            else:
                plans[key] = ("full", module, None)
                tensors[f"{lora_out.PREFIX}{key}"] = model_ck.read(key).contiguous()
        config = lora_out.adapter_config(rank, plans, ranks, {}, "" if isinstance(base, dict) else str(base))
        with atomic_folder(out, overwrite=overwrite) as tmp:
            lora_out.write_adapter(tmp, tensors, config)
    finally:
        base_ck.close()
        model_ck.close()
    if report is not None:
        report["adapter_modules"] = modules
    return out
