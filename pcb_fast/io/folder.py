"""What an output folder holds besides the merged tensors: tensors copied from the base (in slices),
the base folder's side files (config.json saying the output dtype), and a whole state dict saved
as a Hugging Face folder (docs/design.md 7.2)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from .. import __version__
from ..core import checks
from ..core.checks import parse_size
from .card import write_card
from .checkpoints import JSON_LIMIT, load_json, parse_json, side_files
from .output import atomic_folder, check_output
from .safetensors import ShardedWriter, open_regular, read_regular


COPY_CHUNK = 16 << 20  # bytes of a copied tensor read and written at a time


def copy_tensor(checkpoint, key: str, writer, dtype: torch.dtype, finite: bool = False) -> None:
    """Copy ``key`` from ``checkpoint`` to ``writer`` (cast to ``dtype``) in slices of COPY_CHUNK
    bytes: a large buffer that is not merged streams like a merged one, within the memory budget.
    ``finite``: a NaN or Inf among the values (or made by the cast) is an error naming the model and key."""
    step = max(1, COPY_CHUNK // max(checkpoint.dtype(key).itemsize, dtype.itemsize))
    numel = checkpoint.numel(key)
    for lo in range(0, numel, step):
        hi = min(numel, lo + step)
        values = checkpoint.read_into(key, lo, hi, torch.empty(hi - lo, dtype=checkpoint.dtype(key)))
        cast = values.to(dtype)
        if finite and hi > lo and not all(bool(torch.isfinite(v)) for v in torch.aminmax(cast)):  # (NaN propagates)
            raise ValueError(f"{checkpoint.name}, key {checks.short(key)}: "
                             f"{checks.non_finite_reason(values) or f'a value beyond the range of {dtype}'}")
        writer.write(key, lo, cast)  # a new tensor per slice, as a writer behind the engine needs


def save_model(state: dict, out, *, base_folder=None, shard_size="5GB", overwrite=False, metadata=None,
               inputs=(), merge=None) -> Path:
    """Write a state dict as a Hugging Face folder (sharded safetensors, index, the base folder's
    side files), atomically as :func:`merge_checkpoints` does. ``inputs``: (label, path) pairs that
    ``out`` must not be, contain or lie inside. ``merge``: the keyword arguments of
    :func:`pcb_fast.io.card.write_card` for a merged model (its mergekit_config.yml and card)."""
    out = check_output(out, overwrite, inputs)
    shard_bytes = parse_size(shard_size, "shard_size")
    keys = sorted(state)
    with atomic_folder(out, overwrite=overwrite) as tmp:
        meta = {"format": "pt", "pcb_fast_version": __version__, **(metadata or {})}
        entries = [(k, state[k].dtype, tuple(state[k].shape)) for k in keys]
        with ShardedWriter(tmp, entries, shard_bytes, meta) as writer:
            for k in keys:
                writer.write(k, 0, state[k].detach().cpu().reshape(-1))
        copy_side_files(base_folder, tmp)
        if merge is not None:
            write_card(tmp, out.name, **merge)
    return out


def copy_side_files(folder, to: Path, dtype: str | None = None, name: str = "base model",
                     updates: dict | None = None) -> None:
    """Copy the base folder's config and tokenizer files (checked by checkpoints.side_files); with an
    output ``dtype``, config.json says it (its "torch_dtype" and/or "dtype", whichever it has), so
    that transformers loads the merge in that dtype; ``updates``: entries of config.json to set (the
    number of layers of a merge over slices)."""
    for path in side_files(folder, name):
        if path.name == "config.json" and (dtype is not None or updates):
            (to / path.name).write_bytes(_config_with(read_regular(path, JSON_LIMIT), dtype, updates, name))
        else:  # streamed: a large tokenizer file costs no memory
            fd = open_regular(path)
            with os.fdopen(fd, "rb") as source, open(to / path.name, "wb") as target:
                shutil.copyfileobj(source, target, 1 << 20)
        shutil.copystat(path, to / path.name)


def _config_with(data: bytes, dtype: str | None, updates: dict | None, name: str) -> bytes:
    """config.json's bytes saying the output ``dtype`` (in whichever of "torch_dtype" and "dtype" it
    has) and the entries ``updates``; the bytes as they were where there is nothing to say."""
    saying = f"the output dtype {dtype}" if dtype is not None else ", ".join(updates or {})
    try:
        config = parse_json(data, f"{name}: config.json")
    except ValueError as e:
        raise ValueError(f"{e}; it cannot say {saying}") from None
    if not isinstance(config, dict):
        return data
    changes = {f: dtype for f in ("torch_dtype", "dtype") if dtype is not None and f in config}
    changes.update(updates or {})
    if not changes:
        return data
    config.update(changes)
    return (json.dumps(config, indent=2, sort_keys=False) + "\n").encode()


def check_side_files(folder, dtype: str | None, card: dict | None, name: str = "base model") -> None:
    """Before any heavy work, the base folder's side files that the end of a merge will parse:
    config.json when an output ``dtype`` is written into it, tokenizer_config.json when the
    configuration sets a chat template."""
    for path in side_files(folder, name):
        if path.name == "config.json" and dtype is not None:
            _config_with(read_regular(path, JSON_LIMIT), dtype, None, name)
        if path.name == "tokenizer_config.json" and (card or {}).get("chat_template") is not None:
            if not isinstance(load_json(path, f"{name}: tokenizer_config.json"), dict):
                raise ValueError(f"{name}: tokenizer_config.json is not a JSON object; it cannot hold the chat template")
