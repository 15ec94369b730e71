"""mergekit's ``slices:``: an output model assembled from layer ranges of its inputs (docs/design.md 7.3).

A configuration with slices lists output slices, each made of sources (a model and a layer range
``[first, end)``); every source of a slice spans as many layers. The output's layers are the slices'
layers in order: output layer o of a slice that starts at output layer s is merged from layer
``first + (o - s)`` of each of its sources. The tensors outside the layers come from the first
slice's sources (embeddings: names with "embed", "wte" or "wpe") or from the last slice's (the
final norm, the head), as mergekit's pre- and post-weights; the output's config.json (the base's,
else the first source's) says the new number of layers.

A merge over slices sees each input position as one model stitched from its sources:
:class:`StitchedModel` (what the config names) opens as a :class:`StitchedCheckpoint`, a checkpoint
whose keys are the output's and whose reads come from the sources' files. The merge itself is the
ordinary one (pcb_fast.drivers.files), tensor by tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .checkpoints import Checkpoint, open_model
from .lora_models import model_folder
from .safetensors import show_path

PRE_WEIGHTS = ("embed", "wte", "wpe")


def layer_of(key: str):
    """(text before the layer index, index, text after) for a key of a layer (its first dotted
    integer), or None for the tensors outside the layers."""
    for i, part in enumerate(key.split(".")):
        if part.isdigit():
            parts = key.split(".")
            return ".".join(parts[:i]), int(part), ".".join(parts[i + 1 :])
    return None


@dataclass(frozen=True)
class Piece:
    """One source of one output slice: a model's layers [first, end) as output layers from ``start``."""

    path: str
    first: int
    end: int
    start: int


@dataclass(frozen=True)
class StitchedModel:
    """One input position of a merge over slices: its piece in every slice, in order."""

    pieces: tuple
    num_layers: int  # of the output
    config_from: str  # the folder whose config.json (and side files) the output gets

    def __str__(self) -> str:
        return " + ".join(f"{show_path(p.path, 200)} layers {p.first}-{p.end - 1}" for p in self.pieces)

    @property
    def sources(self) -> list:
        """The models its pieces come from (paths, or models with an adapter: pcb_fast.io.lora_models)."""
        return list(dict.fromkeys(p.path for p in self.pieces))

    @property
    def paths(self) -> list:
        """The files and folders it reads."""
        return list(dict.fromkeys(path for source in self.sources for path in getattr(source, "paths", [source])))

    def open(self, name: str) -> "StitchedCheckpoint":
        return StitchedCheckpoint(self, name)


class StitchedCheckpoint(Checkpoint):
    """The output's keys, each read from the source tensor a :class:`StitchedModel` maps it to."""

    def __init__(self, model: StitchedModel, name: str):
        opened = {}
        try:
            for path in model.sources:
                opened[path] = open_model(path, f"{name}: {show_path(path)}")
        except BaseException:
            for ck in opened.values():
                ck.close()
            raise
        folder = opened[model.config_from].folder if model.config_from in opened else (
            Path(model_folder(model.config_from)) if Path(model_folder(model.config_from)).is_dir() else None)
        super().__init__(name, folder)
        self.opened = list(opened.values())
        self.readers = [r for ck in self.opened for r in getattr(ck, "readers", ())]
        self.files = [f for ck in self.opened for f in getattr(ck, "files", ())]
        self.threads_on_read = any(getattr(ck, "threads_on_read", False) for ck in self.opened)
        self.config_updates = {"num_hidden_layers": model.num_layers}
        self.where = {}
        first, last = model.pieces[0], model.pieces[-1]
        for piece in model.pieces:
            ck = opened[piece.path]
            for key in ck.keys():
                layer = layer_of(key)
                if layer is None:
                    pre = any(word in key for word in PRE_WEIGHTS)
                    if piece is (first if pre else last):
                        self.where[key] = (ck, key)
                    continue
                head, index, tail = layer
                if piece.first <= index < piece.end:
                    out = ".".join(p for p in (head, str(piece.start + index - piece.first), tail) if p)
                    self.where[out] = (ck, key)

    def keys(self):
        return sorted(self.where)

    def dtype(self, key):
        ck, own = self.where[key]
        return ck.dtype(own)

    def shape(self, key):
        ck, own = self.where[key]
        return ck.shape(own)

    def advise(self, key, lo, hi):
        ck, own = self.where[key]
        ck.advise(own, lo, hi)

    def read_into(self, key, lo, hi, out):
        ck, own = self.where[key]
        return ck.read_into(own, lo, hi, out)

    def close(self):
        for ck in self.opened:
            ck.close()
