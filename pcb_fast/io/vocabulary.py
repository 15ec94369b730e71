"""mergekit's tokenizer sources: the output's tokenizer, and every input's embedding rows re-mapped
to its vocabulary (docs/design.md 7.4).

A configuration with ``tokenizer_source`` (``base``, ``union`` or a model) or a ``tokenizer:`` block
(``source``, ``tokens``, ``pad_to_multiple_of``) gets the tokenizer that mergekit 0.1.5 builds:

- The base's tokenizer first loses the tokens whose ids reach the base's ``vocab_size`` (mergekit
  strips a BPE tokenizer of them: the model has no rows for them).
- ``base``: the base model's; ``union``: the base's, plus every token of the other models that it
  lacks (their ordinary tokens first, then their added tokens with their settings; the models in
  the configuration's order); a model: that model's tokenizer. ``tokens:`` names are added.
- Each input's tensors with a vocabulary axis (outside the layers, first dimension the model's
  ``vocab_size``: the embedding and an untied head) are re-indexed to the output vocabulary: a
  token the input has keeps the input's row; one it lacks gets a default row, the same for every
  input: the row of the one input that has it, else the base's, else the mean of the inputs that
  have it, else zeros. ``tokens:`` chooses a token's row (``source``: a model's row of that token,
  ``{kind: model_token, model, token|token_id}`` a model's row of another token, ``{kind: zero}``);
  ``force: true`` gives every input that row even where it has the token.
- ``pad_to_multiple_of`` rounds the number of rows up; each input's extra rows are the mean of its
  re-mapped rows. config.json's ``vocab_size`` says the rows.

The merge then runs on the re-mapped tensors as on any others. Reads stay slices of the inputs'
files (the runs of consecutive rows of a read); only the default rows (a few tokens) are held.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import torch

from ..core.checks import short
from .checkpoints import Checkpoint, load_json, open_model
from .lora_models import model_folder, same_model
from .safetensors import show_path
from .slices import PRE_WEIGHTS, layer_of

TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt", "merges.txt", "chat_template.jinja",
                   "chat_template.json")


def config_vocab_size(path) -> int | None:
    """The ``vocab_size`` a model folder's config.json states (its text model's, for a multimodal
    config), or None."""
    config = Path(model_folder(path)) / "config.json"
    try:
        data = load_json(config, "config.json") if config.is_file() else {}
    except ValueError:
        return None
    for where in (data, data.get("text_config") if isinstance(data, dict) else None):
        if isinstance(where, dict) and isinstance(where.get("vocab_size"), int) and not isinstance(
                where["vocab_size"], bool):
            return where["vocab_size"]
    return None


def load_tokenizer(path):
    """A model folder's tokenizer as transformers loads it (fast where it can), or None where it
    loads none (mergekit then takes the model's vocabulary to be the base's)."""
    path = model_folder(path)
    if not os.path.isdir(path):  # (a Hub model is a folder of the cache by now: never a download here)
        return None
    try:
        import transformers

        return transformers.AutoTokenizer.from_pretrained(path, use_fast=True)
    except Exception:
        return None


def _fresh_copy(tokenizer):
    """A copy of ``tokenizer`` that adding tokens leaves the original untouched (saved and reloaded)."""
    import transformers

    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder, legacy_format=False, safe_serialization=True)
        return transformers.AutoTokenizer.from_pretrained(folder, use_fast=True)


def without_tokens_beyond(tokenizer, vocab_size: int, where: str, what: str):
    """``tokenizer`` (changed in place) without the tokens whose ids reach ``vocab_size``, which the
    model has no rows for (padding or special tokens a tokenizer lists beyond the embedding), as
    mergekit strips its base tokenizer: they leave the added tokens and the BPE vocabulary, and so
    does every merge of two tokens one of which is such a token. Only a fast BPE tokenizer can be
    stripped (mergekit's rule); another is an error."""
    import json

    import tokenizers

    beyond = {token for token, index in tokenizer.get_vocab().items() if index >= vocab_size}
    if not beyond:
        return tokenizer
    example = short(min(beyond))
    kind = json.loads(tokenizer.backend_tokenizer.to_str())["model"].get("type") if tokenizer.is_fast else "slow"
    if kind != "BPE":
        raise ValueError(f"{where}: {what} has {len(beyond)} tokens beyond the model's vocab_size {vocab_size} (e.g. "
                         f"{example}); they can be left out of a fast BPE tokenizer only, not a {kind} one (as mergekit)")
    data = json.loads(tokenizer.backend_tokenizer.to_str())
    data["added_tokens"] = [entry for entry in data["added_tokens"] if entry["id"] < vocab_size]
    vocab = data["model"]["vocab"]
    for token in beyond:
        vocab.pop(token, None)
    kept = []
    for merge in data["model"]["merges"]:
        parts = merge.split(" ") if isinstance(merge, str) else merge
        if not isinstance(parts, list) or len(parts) != 2:
            raise ValueError(f"{where}: {what}: a BPE merge {short(merge)} is neither 'a b' nor [a, b]")
        if not beyond.intersection(parts):
            kept.append(merge)
    data["model"]["merges"] = kept
    try:
        # (transformers has no public way to swap a loaded tokenizer's backend; mergekit does the same)
        tokenizer._tokenizer = tokenizers.Tokenizer.from_str(json.dumps(data))
    except Exception as e:
        raise ValueError(f"{where}: {what} without its {len(beyond)} tokens beyond the model's vocab_size {vocab_size} "
                         f"is no valid tokenizer ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    return tokenizer


def union_tokenizer(base_tok, tokenizers):
    """mergekit's union: the base's tokenizer plus, from every (tokenizer, vocab_size) in order, the
    ordinary tokens it lacks (each model's in the order of its ids), then the added tokens (the first
    settings met for each), ids below the model's vocab_size only."""
    ordinary, added = {}, {}
    for tokenizer, vocab_size in tokenizers:
        decoder = tokenizer.added_tokens_decoder
        added_names = {info.content for info in decoder.values()}
        # in the order of their ids (mergekit takes a fast tokenizer's get_vocab() order, which varies)
        for token, index in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]):
            if index < vocab_size and token not in added_names:
                ordinary.setdefault(token, None)
        for index, info in decoder.items():
            if index < vocab_size:
                added.setdefault(info.content, info)
    out = _fresh_copy(base_tok)
    base_vocab = base_tok.get_vocab()
    for token in ordinary:
        if token not in added and token not in base_vocab:
            out.add_tokens(token)
    for info in added.values():
        out.add_tokens(info)
    return out


def _token_source(value, label, models, resolve):
    """A ``tokens:`` entry's source as ("model", path) | ("zero",) | ("model_token", path, id or token)."""
    if isinstance(value, str):
        return ("model", _input(resolve(value, label), label, models))
    if isinstance(value, dict):
        kind = value.get("kind")
        if kind == "zero" and set(value) == {"kind"}:
            return ("zero",)
        if kind == "model_token" and isinstance(value.get("model"), str):
            extra = sorted(set(value) - {"kind", "model", "token", "token_id"})
            if extra:
                raise ValueError(f"{label}.{extra[0]} is not an entry of a model_token source; valid: kind, model, "
                                 "token, token_id")
            if ("token" in value) == ("token_id" in value):
                raise ValueError(f"{label}: give token or token_id (one of them)")
            if "token_id" in value and (not isinstance(value["token_id"], int) or isinstance(value["token_id"], bool)
                                        or value["token_id"] < 0):
                raise ValueError(f"{label}.token_id={short(value['token_id'])} must be a row number (an integer >= 0)")
            if "token" in value and not isinstance(value["token"], str):
                raise ValueError(f"{label}.token={short(value['token'])} must be a token (a string)")
            path = _input(resolve(value["model"], f"{label}.model"), f"{label}.model", models)
            return ("model_token", path, value.get("token_id", value.get("token")))
    raise ValueError(f"{label}={short(value)} must be a model, {{kind: zero}} or {{kind: model_token, model, token}}")


def _input(path, label, models):
    for m in models:
        if same_model(m, path):
            return m
    raise ValueError(f"{label}: {show_path(path)} is not one of the models merged; a token's row comes from one of them")


def parse_tokens(tokens, where, models, resolve) -> dict:
    """The ``tokens:`` mapping as {token: (source or None, force)}; ``models``: the merge's inputs
    (paths), ``resolve(reference, label)``: a model reference as a local path."""
    if tokens is None:
        return {}
    if not isinstance(tokens, dict):
        raise ValueError(f"{where}: tokenizer.tokens must be a mapping of token -> {{source, force}}")
    out = {}
    for token, entry in tokens.items():
        label = f"{where}: tokenizer.tokens[{short(token)}]"
        if not isinstance(token, str) or not token:
            raise ValueError(f"{label}: a token must be a non-empty string")
        entry = {} if entry is None else entry
        if not isinstance(entry, dict):
            raise ValueError(f"{label} must be a mapping with source and force")
        extra = sorted(set(entry) - {"source", "force"}, key=str)
        if extra:
            raise ValueError(f"{label}.{extra[0]} is not an entry of a token; valid: source, force")
        force = entry.get("force", False)
        if not isinstance(force, bool):
            raise ValueError(f"{label}.force={short(force)} must be true or false")
        source = entry.get("source")
        out[token] = (None if source is None else _token_source(source, f"{label}.source", models, resolve), force)
    return out


class VocabularyPlan:
    """The output tokenizer of a merge and, per input model (a path), the row of each output token
    in that model's tensors (-1: it lacks the token)."""

    def __init__(self, base, prefer, models, source, tokens: dict, pad_to_multiple_of, where: str, what: str):
        """``base``: the path whose tokenizer the output starts from (the base model, else the first
        model); ``prefer``: the configuration's base_model (whose row a token lacking elsewhere
        takes), or None; ``models``: every input's path; ``source``: "base", "union" or a model's
        path; ``tokens``: parse_tokens' mapping; ``what``: the entry that asks, for errors."""
        self.where, self.prefer, self.models = where, prefer, list(dict.fromkeys(models))
        self.tokens, self.pad = tokens, pad_to_multiple_of
        base_tok = load_tokenizer(base)
        if base_tok is None:
            raise ValueError(f"{where}: {what}: the base model ({show_path(base)}) has no tokenizer that transformers loads")
        base_tok = without_tokens_beyond(base_tok, config_vocab_size(base) or len(base_tok.get_vocab()), where,
                                         f"the base model's tokenizer ({show_path(base)})")
        loaded = {base: base_tok}
        for path in self.models:
            if path not in loaded:
                tokenizer = load_tokenizer(path)
                if tokenizer is not None:  # (else the base's vocabulary, as mergekit assumes)
                    loaded[path] = tokenizer
        self.read_from = [] if source in ("base", "union") else [model_folder(source)]  # (beside the merge's inputs)
        if source == "base":
            out = base_tok
        elif source == "union":
            out = union_tokenizer(base_tok, [(tok, config_vocab_size(p) or tok.vocab_size) for p, tok in loaded.items()])
        else:
            out = load_tokenizer(source)
            if out is None:
                raise ValueError(f"{where}: {what}: {show_path(source)} has no tokenizer that transformers loads")
        if tokens and out is base_tok:
            out = _fresh_copy(base_tok)
        existing = set(out.get_vocab())
        for token in tokens:
            if token not in existing:
                out.add_tokens(token)
                existing.add(token)
        self.tokenizer = out
        self.vocab = out.get_vocab()
        self.rows = len(self.vocab)
        if pad_to_multiple_of and self.rows % pad_to_multiple_of:
            self.rows += pad_to_multiple_of - self.rows % pad_to_multiple_of
        if sorted(self.vocab.values()) != list(range(len(self.vocab))):
            raise ValueError(f"{where}: the output tokenizer's ids are not 0..{len(self.vocab) - 1}; they cannot "
                             "index rows")
        self.token_of = {i: t for t, i in self.vocab.items()}
        self.original = {p: loaded.get(p, base_tok).get_vocab() for p in self.models}
        self.permutation = {}
        for path in self.models:
            own = self.original[path]
            size = config_vocab_size(path) or len(own)
            rows = [-1] * len(self.vocab)
            for token, new in self.vocab.items():
                old = own.get(token)
                if old is not None and old >= size:
                    raise ValueError(f"{where}: not supported: token {short(token)} of {show_path(path)} has id {old}, beyond its "
                                     f"vocab_size {size}")
                if old is not None:
                    rows[new] = old
            self.permutation[path] = rows
        self.forced = {self.vocab[t] for t, (_, force) in tokens.items() if force}
        self.row_sources(self.models)  # (its refusals, before any model file is opened)
        self._defaults = {}

    def identity(self) -> bool:
        """Whether every input keeps its tensors as they are (the same rows, nothing forced, no padding)."""
        return (self.rows == len(self.vocab) and not self.forced
                and all(rows == list(range(len(rows))) and config_vocab_size(p) in (None, len(rows))
                        for p, rows in self.permutation.items()))

    def row_sources(self, models) -> dict:
        """{output id: where an input of ``models`` lacking that token (or all, where forced) takes
        its row from}: ("model", path), ("mean", [paths]), ("zero",), ("model_token", path, token
        or id); the tokens: settings first, then mergekit's rule (the one model having it, else the
        base, else the mean of those having it, else zeros)."""
        sources = {}
        for token, new in self.vocab.items():
            having = [p for p in models if self.permutation[p][new] >= 0]
            chosen, force = self.tokens.get(token, (None, False))
            if not force and len(having) == len(models):
                continue
            if token in self.tokens:
                if chosen is None:
                    raise ValueError(f"{self.where}: tokenizer.tokens[{short(token)}] needs a source "
                                     f"({'force' if force else 'a model lacks the token'})")
                if chosen[0] == "model" and self.permutation[chosen[1]][new] < 0:
                    raise ValueError(f"{self.where}: tokenizer.tokens[{short(token)}].source: {show_path(chosen[1])} has no token "
                                     f"{short(token)}")
                sources[new] = chosen
            elif len(having) == 1:
                sources[new] = ("model", having[0])
            elif not having:
                sources[new] = ("zero",)
            elif self.prefer is not None and any(_same(p, self.prefer) for p in models) and any(
                    _same(p, self.prefer) for p in having):
                sources[new] = ("model", next(p for p in having if _same(p, self.prefer)))
            else:
                sources[new] = ("mean", having)
        return sources

    def default_rows(self, key: str, checkpoints: dict) -> dict:
        """{output id: row} of ``key`` for the tokens some input lacks (or forced), computed once, in
        the promoted dtype of the inputs' tensors (as mergekit); ``checkpoints``: path -> an open
        checkpoint of each input of ``key``, in mergekit's order of the inputs."""
        if key in self._defaults:
            return self._defaults[key]
        dtype = promoted_dtype(key, checkpoints.values())
        shape = tuple(next(iter(checkpoints.values())).shape(key))[1:]
        width = math.prod(shape)

        def row(path, index):
            ck = checkpoints[path]
            if not 0 <= index < ck.shape(key)[0]:
                raise ValueError(f"{self.where}: row {index} of {short(key)} is out of range for {show_path(path)}")
            return ck.read_into(key, index * width, (index + 1) * width,
                                torch.empty(width, dtype=ck.dtype(key))).view(shape)

        rows = {}
        for new, source in self.row_sources(list(checkpoints)).items():
            if source[0] == "zero":
                value = torch.zeros(shape, dtype=dtype)
            elif source[0] == "model":
                value = row(source[1], self.permutation[source[1]][new]).to(dtype)
            elif source[0] == "model_token":
                path, which = source[1], source[2]
                if isinstance(which, str):
                    if which not in self.original[path]:
                        raise ValueError(f"{self.where}: token {short(which)} is not in the vocabulary of {show_path(path)}")
                    which = self.original[path][which]
                value = row(path, which).to(dtype)
            else:  # the mean, summed in the inputs' order as mergekit sums it
                value = torch.zeros(shape, dtype=dtype)
                for path in source[1]:
                    value = value + row(path, self.permutation[path][new])
                value /= len(source[1])
            rows[new] = value.reshape(-1)
        self._defaults[key] = rows
        return rows

    def save(self, folder: Path, chat_template: str | None) -> None:
        """Write the output tokenizer into ``folder`` in place of the base's files (as mergekit saves it)."""
        for name in TOKENIZER_FILES:
            (Path(folder) / name).unlink(missing_ok=True)
        if chat_template is not None:
            self.tokenizer.chat_template = chat_template
        self.tokenizer.save_pretrained(str(folder), safe_serialization=True)


def _same(a, b) -> bool:
    return same_model(a, b)


def promoted_dtype(key, checkpoints) -> torch.dtype:
    dtype = None
    for ck in checkpoints:
        dtype = ck.dtype(key) if dtype is None else torch.promote_types(dtype, ck.dtype(key))
    return dtype


class RemappedModel:
    """An input of a merge whose tensors with a vocabulary axis are re-mapped to the plan's
    vocabulary; ``inner``: a path or a model stitched from slices (pcb_fast.io.slices)."""

    def __init__(self, inner, plan: VocabularyPlan, inputs: list):
        self.inner, self.plan, self.inputs = inner, plan, inputs  # inputs: every input (paths or stitched)

    def __str__(self) -> str:
        return str(self.inner)

    @property
    def paths(self) -> list:
        return list(getattr(self.inner, "paths", [self.inner]))

    def open(self, name: str) -> "RemappedCheckpoint":
        return RemappedCheckpoint(self, name)


def _path_of(source, key) -> str:
    """The model whose rows ``key`` of ``source`` are (the first or last piece of a stitched model)."""
    pieces = getattr(source, "pieces", None)
    if pieces is None:
        return source
    return pieces[0].path if any(w in key for w in PRE_WEIGHTS) else pieces[-1].path


class RemappedCheckpoint(Checkpoint):
    """A checkpoint whose vocabulary tensors have the plan's rows (see the module's docstring)."""

    def __init__(self, model: RemappedModel, name: str):
        self.inner = open_model(model.inner, name)
        super().__init__(name, self.inner.folder)
        self.readers = getattr(self.inner, "readers", ())
        self.threads_on_read = getattr(self.inner, "threads_on_read", False)
        self.files = getattr(self.inner, "files", ())
        self.opened = getattr(self.inner, "opened", [self.inner])
        self.model, self.plan = model, model.plan
        self.config_updates = {**(getattr(self.inner, "config_updates", None) or {}), "vocab_size": self.plan.rows}
        sizes = {}
        self.remapped = {}  # key -> the model whose rows it holds
        for key in self.inner.keys():
            path = _path_of(model.inner, key)
            if path not in sizes:
                sizes[path] = config_vocab_size(path)
            shape = self.inner.shape(key)
            if (sizes[path] is not None and layer_of(key) is None and len(shape) >= 2 and shape[0] == sizes[path]
                    and self.inner.is_floating(key)):
                self.remapped[key] = path
        self._prepared, self._mean = {}, {}

    def _prepare(self, key):
        """(default rows, dtype) of ``key``, from every input of the merge (opened for those rows)."""
        if key not in self._prepared:
            opened = {}
            try:
                for source in self.model.inputs:
                    path = _path_of(source, key)
                    if path not in opened:
                        opened[path] = open_model(path, f"{self.name}: {show_path(path)}")
                checkpoints = {p: ck for p, ck in opened.items() if key in ck.keys()}
                self._prepared[key] = (self.plan.default_rows(key, checkpoints),
                                       promoted_dtype(key, checkpoints.values()))
            finally:
                for ck in opened.values():
                    ck.close()
        return self._prepared[key]

    def keys(self):
        return self.inner.keys()

    def dtype(self, key):
        return self._prepare(key)[1] if key in self.remapped else self.inner.dtype(key)

    def shape(self, key):
        shape = tuple(self.inner.shape(key))
        return (self.plan.rows, *shape[1:]) if key in self.remapped else shape

    def advise(self, key, lo, hi):
        if key not in self.remapped:
            self.inner.advise(key, lo, hi)

    def read_into(self, key, lo, hi, out):
        if key not in self.remapped:
            return self.inner.read_into(key, lo, hi, out)
        width = math.prod(self.shape(key)[1:])
        first, end = lo // width, -(-hi // width)
        rows = self._rows(key, first, end, width)
        out.copy_(rows.reshape(-1)[lo - first * width: hi - first * width])
        return out

    def _rows(self, key, first, end, width) -> torch.Tensor:
        """Output rows [first, end) of ``key`` as [end - first, width], in the re-mapped dtype: runs
        of consecutive input rows read at once, default rows for the tokens the input lacks (or
        forced), the padding's mean after the vocabulary."""
        defaults, dtype = self._prepare(key)
        permutation = self.plan.permutation[self.remapped[key]]
        forced = self.plan.forced
        vocab = len(self.plan.vocab)
        rows = torch.empty(end - first, width, dtype=dtype)
        r, stop = first, min(end, vocab)
        while r < stop:
            old = permutation[r]
            if old < 0 or r in forced:
                rows[r - first] = defaults[r]
                r += 1
                continue
            run = r + 1
            while run < stop and permutation[run] == old + run - r and run not in forced:
                run += 1
            buffer = torch.empty((run - r) * width, dtype=self.inner.dtype(key))
            self.inner.read_into(key, old * width, (old + run - r) * width, buffer)
            rows[r - first: run - first] = buffer.view(run - r, width)
            r = run
        if end > vocab:
            rows[max(vocab, first) - first:] = self._padding(key, width)
        return rows

    def _padding(self, key, width) -> torch.Tensor:
        """The mean of the re-mapped rows (mergekit's rows for the padding), computed once."""
        if key not in self._mean:
            self._mean[key] = torch.mean(self._rows(key, 0, len(self.plan.vocab), width), dim=0)
        return self._mean[key]

    def close(self):
        self.inner.close()


__all__ = ["VocabularyPlan", "RemappedModel", "parse_tokens", "config_vocab_size", "load_tokenizer"]
