"""Models on disk or in memory, read lazily one tensor slice at a time (docs/design.md 7.1).

``open_checkpoint`` accepts a .safetensors file, a Hugging Face folder (sharded with
model.safetensors.index.json, or a single model.safetensors), a .bin/.pt/.pth file or folder
(through ``torch.load(weights_only=True)`` only), or an in-memory state dict. Every kind answers
the same questions: its keys, each key's dtype and shape, and the values of a flat slice.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path
from typing import Sequence

import torch

from .safetensors import FormatError, SafetensorsReader

TORCH_SUFFIXES = (".bin", ".pt", ".pth")
# files of a Hugging Face folder that describe the model rather than hold its weights
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "added_tokens.json", "tokenizer.model", "spiece.model", "vocab.json",
              "vocab.txt", "merges.txt", "preprocessor_config.json", "chat_template.json", "chat_template.jinja")


class Checkpoint:
    """Keys, dtypes and shapes of a model, and reads of flat slices of its tensors."""

    def __init__(self, name: str, folder: Path | None = None):
        self.name = name
        self.folder = folder  # the Hugging Face folder, whose side files are copied to the output

    def keys(self) -> list:
        raise NotImplementedError

    def dtype(self, key: str) -> torch.dtype:
        raise NotImplementedError

    def shape(self, key: str) -> tuple:
        raise NotImplementedError

    def read_into(self, key: str, lo: int, hi: int, out: torch.Tensor) -> torch.Tensor:
        """Entries [lo, hi) of the flattened tensor into ``out`` (contiguous, of the key's dtype)."""
        raise NotImplementedError

    def numel(self, key: str) -> int:
        return math.prod(self.shape(key))

    def read(self, key: str) -> torch.Tensor:
        numel = self.numel(key)
        return self.read_into(key, 0, numel, torch.empty(numel, dtype=self.dtype(key))).view(self.shape(key))

    def is_floating(self, key: str) -> bool:
        return self.dtype(key).is_floating_point

    def close(self) -> None:
        pass


class StateDictCheckpoint(Checkpoint):
    """An in-memory state dict (CPU tensors)."""

    def __init__(self, state: dict, name: str):
        super().__init__(name)
        if not isinstance(state, dict):
            raise ValueError(f"{name} is a {type(state).__name__}, expected a state dict (dict of tensors)")
        for key, t in state.items():
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"{name}, key {key!r}: value is a {type(t).__name__}, expected a torch.Tensor")
        self.state = state

    def keys(self):
        return sorted(self.state)

    def dtype(self, key):
        return self.state[key].dtype

    def shape(self, key):
        return tuple(self.state[key].shape)

    def read_into(self, key, lo, hi, out):
        return out.copy_(self.state[key].reshape(-1)[lo:hi])


class SafetensorsCheckpoint(Checkpoint):
    """One or several safetensors files (the shards of a Hugging Face folder)."""

    def __init__(self, files: list, name: str, folder: Path | None = None):
        super().__init__(name, folder)
        self.readers, self.where = [], {}
        try:
            for path in files:
                reader = SafetensorsReader(path)
                self.readers.append(reader)
                for key in reader.tensors:
                    if key in self.where:
                        raise FormatError(f"{name}: key {key!r} is in both {self.where[key].path.name} and {path.name}")
                    self.where[key] = reader
        except FormatError as e:
            self.close()
            raise ValueError(f"{name}: {e}") from None

    def keys(self):
        return sorted(self.where)

    def dtype(self, key):
        return self.where[key].tensors[key].dtype

    def shape(self, key):
        return self.where[key].tensors[key].shape

    def read_into(self, key, lo, hi, out):
        try:
            return self.where[key].read_into(key, lo, hi, out)
        except FormatError as e:
            raise ValueError(f"{self.name}: {e}") from None

    def close(self):
        for reader in self.readers:
            reader.close()


def _torch_load(path: Path, name: str) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # pickle errors, non-tensor objects refused by weights_only, zip errors
        raise ValueError(f"{name}: cannot load {path.name} with torch.load(weights_only=True): "
                         f"{str(e).splitlines()[0]}") from None
    if not isinstance(state, dict):
        raise ValueError(f"{name}: {path.name} holds a {type(state).__name__}, expected a state dict")
    return state


def open_checkpoint(source, name: str | None = None) -> Checkpoint:
    """A :class:`Checkpoint` for a path (file or folder) or an in-memory state dict."""
    if isinstance(source, dict):
        return StateDictCheckpoint(source, name or "model")
    path = Path(source)
    name = name or str(path)
    if not path.exists():
        raise ValueError(f"{name}: no such file or folder")
    if path.is_dir():
        index = path / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                files = sorted(set(weight_map.values()))
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
                raise ValueError(f"{name}: {index.name} is not a valid index (no weight_map)") from None
            missing = [f for f in files if not (path / f).is_file()]
            if missing:
                raise ValueError(f"{name}: shard {missing[0]!r} listed in {index.name} is missing")
            checkpoint = SafetensorsCheckpoint([path / f for f in files], name, path)
            unlisted = sorted(set(checkpoint.where) - set(weight_map))
            if unlisted:
                checkpoint.close()
                raise ValueError(f"{name}: key {unlisted[0]!r} is in a shard but not in {index.name}")
            return checkpoint
        single = path / "model.safetensors"
        if single.is_file():
            return SafetensorsCheckpoint([single], name, path)
        shards = sorted(path.glob("*.safetensors"))
        if shards:
            return SafetensorsCheckpoint(shards, name, path)
        for candidate in ("pytorch_model.bin", "model.pt"):
            if (path / candidate).is_file():
                checkpoint = StateDictCheckpoint(_torch_load(path / candidate, name), name)
                checkpoint.folder = path
                return checkpoint
        raise ValueError(f"{name}: no weights found in the folder (expected model.safetensors, "
                         "model.safetensors.index.json with its shards, or pytorch_model.bin)")
    if path.suffix == ".safetensors":
        return SafetensorsCheckpoint([path], name)
    if path.suffix in TORCH_SUFFIXES:
        return StateDictCheckpoint(_torch_load(path, name), name)
    raise ValueError(f"{name}: unsupported checkpoint format {path.suffix or path.name!r}; valid: a .safetensors "
                     "file, a Hugging Face folder, or a .bin/.pt/.pth file")



def split_keys(base: Checkpoint, exclude: Sequence[str]) -> tuple[list[str], list[str]]:
    """(merged, copied) keys of ``base``: floating tensors not matching any exclude regex are merged."""
    patterns = []
    for p in exclude:
        try:
            patterns.append(re.compile(p))
        except re.error as e:
            raise ValueError(f"exclude pattern {p!r} is not a valid regular expression: {e}") from None
    merged, copied = [], []
    for key in base.keys():
        if base.is_floating(key) and base.numel(key) > 0 and not any(p.search(key) for p in patterns):
            merged.append(key)
        else:
            copied.append(key)
    for pattern in patterns:  # a typo in a pattern would otherwise merge what the user meant to keep
        if not any(pattern.search(key) for key in base.keys()):
            warnings.warn(f"pcb_fast: exclude pattern {pattern.pattern!r} matches no key of the base model; "
                          "it excludes nothing", stacklevel=3)
    return merged, copied


def check_models_match(base: Checkpoint, models: Sequence[Checkpoint], merged_keys: Sequence[str]) -> None:
    """Every merged key in every model with the base's shape, and no model key the base lacks."""
    base_keys = set(base.keys())
    for model in models:
        keys = set(model.keys())
        extra = sorted(keys - base_keys)
        if extra:
            raise ValueError(f"{model.name} has key {extra[0]!r} that the base model lacks ({len(extra)} such keys)")
        for key in merged_keys:
            if key not in keys:
                raise ValueError(f"{model.name} lacks key {key!r} that the base model has")
            if not model.is_floating(key):
                raise ValueError(f"{model.name}, key {key!r}: {model.dtype(key)} where the base has a floating tensor")
            if tuple(model.shape(key)) != tuple(base.shape(key)):
                raise ValueError(f"{model.name}, key {key!r}: shape {tuple(model.shape(key))} but the base has "
                                 f"{tuple(base.shape(key))}")
