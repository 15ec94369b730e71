"""mergekit's ``model+lora`` references: a model with a PEFT LoRA adapter merged into it, read on the fly.

A configuration may name ``<model>+<adapter>`` (each a local path or a Hub name) wherever it names
a model: mergekit merges the adapter into the model first (PEFT's ``merge_and_unload``, in the
model's dtype) and merges the result. pcb_fast writes no merged copy: :class:`LoraModel` opens
as a :class:`LoraCheckpoint` whose reads are the model's values plus the adapter's delta
(pcb_fast.io.lora reads and checks the adapter; tau = scale * B @ A in float32, the same values for
every range read). As PEFT's merge (its adapter weights in float32 on a model of any dtype), the
delta is added to the weight in float32 and the sum rounded once to the weight's dtype (an
embedding's delta is rounded to that dtype before the addition, as PEFT does); a tensor the adapter
saves whole (``modules_to_save``) replaces the model's.

The products set torch's thread count while they run (their rounding must not depend on it), so a
merge reads these inputs on its own thread (``threads_on_read``), never on a reader thread.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from .checkpoints import Checkpoint, open_checkpoint
from .lora import CONFIG, Full, LoraSource, open_adapter
from .safetensors import show, show_path
from .tied import folder_aliases


@dataclass(frozen=True)
class LoraModel:
    """A model (local folder) with an adapter (local folder) merged into it; ``written``: the
    reference as the output records it (Hub names as given, local paths absolute)."""

    model: str
    adapter: str
    written: str = field(default="", compare=False)

    def __str__(self) -> str:
        return f"{show_path(self.model, 150)}+{show_path(self.adapter, 150)}"

    @property
    def paths(self) -> list:
        return [self.model, self.adapter]

    def open(self, name: str) -> "LoraCheckpoint":
        return LoraCheckpoint(self, name)


def lora_reference(ref, label: str) -> LoraModel | None:
    """mergekit's ``<model>+<adapter>`` (each a local path or a Hub name, resolved through the Hugging
    Face cache: pcb_fast.io.hub) as a :class:`LoraModel`; None for a reference without "+" or an
    existing path. ``label`` names the entry in errors."""
    from .hub import ADAPTER_PATTERNS, is_hub_reference, resolve

    if not isinstance(ref, str) or "+" not in ref or os.path.exists(ref):
        return None
    parts = ref.split("+")
    if len(parts) != 2 or not all(parts):
        raise ValueError(f"{label}: {show(ref)} is neither a path nor a model+lora reference (mergekit's "
                         "<model>+<LoRA adapter>, each a local path or a Hub name)")
    model, adapter = parts
    model = resolve(model, f"{label} (its model)") if is_hub_reference(model) else model
    adapter = resolve(adapter, f"{label} (its LoRA adapter)", ADAPTER_PATTERNS) if is_hub_reference(adapter) else adapter
    return LoraModel(model, adapter, "+".join(p if is_hub_reference(p) else os.path.abspath(p) for p in parts))


def model_folder(ref):
    """The folder whose config.json and tokenizer a model reference has (a LoRA model: its model's)."""
    return ref.model if isinstance(ref, LoraModel) else ref


def same_model(a, b) -> bool:
    """Whether two references name the same model: the same real path, and for LoRA models the same
    model and the same adapter (a model with an adapter is not the model without it)."""
    if isinstance(a, LoraModel) or isinstance(b, LoraModel):
        return (isinstance(a, LoraModel) and isinstance(b, LoraModel) and same_model(a.model, b.model)
                and same_model(a.adapter, b.adapter))
    return os.path.realpath(a) == os.path.realpath(b)


class LoraCheckpoint(Checkpoint):
    """The model's keys and dtypes; the keys the adapter changes read as PEFT's merged weights."""

    threads_on_read = True

    def __init__(self, model: LoraModel, name: str):
        self.inner = open_checkpoint(model.model, name)
        try:
            floating = [k for k in self.inner.keys() if self.inner.is_floating(k)]
            self.adapter = open_adapter(model.adapter, f"{name}: adapter {show_path(model.adapter)}", self.inner,
                                        floating, folder_aliases(self.inner))
        except BaseException:
            self.inner.close()
            raise
        super().__init__(name, self.inner.folder)
        saved = self.adapter.checkpoint
        self.readers = [*getattr(self.inner, "readers", ()), *getattr(saved, "readers", ())]
        self.files = [*getattr(self.inner, "files", ()), *getattr(saved, "files", ()),
                      str(self.adapter.path / CONFIG)]
        self.config_updates = getattr(self.inner, "config_updates", None)
        self.products = LoraSource(self.inner, [self.adapter], sorted(self.adapter.deltas))
        self._delta = None  # a float32 buffer for the product's entries

    def keys(self):
        return self.inner.keys()

    def dtype(self, key):
        return self.inner.dtype(key)

    def shape(self, key):
        return self.inner.shape(key)

    def advise(self, key, lo, hi):
        self.inner.advise(key, lo, hi)

    def read_into(self, key, lo, hi, out):
        values = self.inner.read_into(key, lo, hi, out)
        change = self.adapter.deltas.get(key)
        if change is None:
            return values
        if values.data_ptr() != out.data_ptr():
            out.copy_(values)
        if isinstance(change, Full):
            saved = self.adapter.checkpoint
            return out.copy_(saved.read_into(change.key, lo, hi, torch.empty(hi - lo, dtype=saved.dtype(change.key))))
        if self._delta is None or self._delta.numel() < hi - lo:
            self._delta = torch.empty(hi - lo)
        delta = self.products.product_into(0, key, lo, hi, self._delta[: hi - lo])
        if change.kind == "embedding":  # PEFT rounds an embedding's delta to the weight's dtype first
            delta = delta.to(out.dtype)
        return out.add_(delta)

    def close(self):
        try:
            self.adapter.checkpoint.close()
        finally:
            self.inner.close()
