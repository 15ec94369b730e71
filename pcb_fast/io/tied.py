"""Tied parameters and copies of the base in in-memory state dicts (docs/design.md 2.1).

``model.state_dict()`` of a model with tied weights (an LM head tied to the input embedding) holds
two keys that view one storage; a file written by transformers or safetensors holds that parameter
once. Merging the two keys as two tensors would count the parameter twice in global statistics and
could merge its two names differently (DARE's drop depends on the key). So keys whose tensors are
the same view of one storage in the base are one parameter: merged once, under its canonical name,
and every alias in the output is that merged tensor.

The canonical name is the first of the group in the base's own order: the name under which
``named_parameters()`` reports the parameter, and the one transformers keeps when it writes the
model (``model.embed_tokens.weight``, not ``lm_head.weight``). A folder written that way holds only
that name, so a merge from the folder, from ``model.state_dict()`` or from dense deltas keys every
per-entry choice (DARE's drops) on the same name. A folder whose ``config.json`` ties the word
embeddings and lacks the head's key gets the head back as an alias (:func:`folder_aliases`).
"""

from __future__ import annotations

from collections import Counter

import torch

from .safetensors import show


def _view_id(t: torch.Tensor):
    """What makes two tensors the same view of one storage (None for tensors without data)."""
    if t.numel() == 0:
        return None
    if t.device.type == "meta":  # a tensor of a torch file read in place: its storage's place in the file
        where = getattr(t.untyped_storage(), "_checkpoint_offset", None)
        return None if where is None else ("file", where, t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


def tied_groups(state: dict) -> list[list[str]]:
    """Groups (of two or more keys, in ``state``'s order: the canonical name first) of ``state``'s keys
    whose tensors are one view of one storage."""
    groups = {}
    for key in _sharing_a_pointer(state):
        t = state[key]
        view = _view_id(t) if isinstance(t, torch.Tensor) else None
        if view is not None:
            groups.setdefault(view, []).append(key)
    return [keys for keys in groups.values() if len(keys) > 1]


def _sharing_a_pointer(state: dict):
    """The keys of ``state`` (in order) whose tensor's first byte is another one's too, the only ones
    that can be one view of one storage (asked once per tensor: a model may have hundreds of
    thousands of them); every key where some tensor has no data pointer (on the meta device)."""
    pointers = []
    try:
        for t in state.values():
            if not isinstance(t, torch.Tensor):
                pointers.append(object())  # (never tied)
            elif t.device.type == "meta":
                return list(state)
            else:
                pointers.append(t.data_ptr())
    except RuntimeError:  # (a tensor without storage)
        return list(state)
    counts = Counter(pointers)
    return [key for key, pointer in zip(state, pointers) if counts[pointer] > 1]


def merged_aliases(base: dict, merged_keys) -> dict:
    """{alias: key merged in its place} for the tied parameters of ``base`` among ``merged_keys``.

    Raises ValueError when ``exclude`` split a tied group between merged and copied keys.
    """
    merged = set(merged_keys)
    aliases = {}
    for keys in tied_groups(base):
        inside = [k for k in keys if k in merged]
        if not inside:
            continue
        if len(inside) != len(keys):
            copied = [k for k in keys if k not in merged]
            raise ValueError(f"keys {show(inside[0])} and {show(copied[0])} are one tied parameter of the base model, but "
                             f"only {show(inside[0])} is merged (exclude matches {show(copied[0])}); exclude all its "
                             "names or none")
        aliases.update({key: keys[0] for key in keys[1:]})
    return aliases


def check_tied(base: dict, models, names, merged_keys) -> dict:
    """:func:`merged_aliases`, after checking that no model holds different values under the names of
    one tied parameter of the base (ValueError naming the model and the keys)."""
    aliases = merged_aliases(base, merged_keys)
    for model, name in zip(models, names):
        for key, first in aliases.items():
            a, b = model[first], model[key]
            if a is not b and (a.dtype != b.dtype or not torch.equal(a, b)):
                raise ValueError(f"{name}: keys {show(first)} and {show(key)} are one tied parameter of the base model "
                                 f"but hold different values in this model; tie them (or untie them in the base)")
    return aliases


def same_as_base(base: dict, model: dict, keys) -> bool:
    """True when ``model`` holds the base's values under every key of ``keys`` (a copy of the base)."""
    for key in keys:
        b, m = base[key], model[key]
        view = _view_id(b)
        if m is b or (view is not None and _view_id(m) == view):
            continue  # the base's own tensor
        if m.dtype != b.dtype or m.shape != b.shape or not _leading_equal(m, b) or not torch.equal(m, b):
            return False
    return True


LEADING = 4096  # entries compared first: a fine-tuned tensor almost always differs among them


def _leading_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the first LEADING entries of two tensors of one shape are equal (True where they are
    not contiguous: then only the full comparison says). torch.equal reads every entry even where
    the first ones differ: a model that is not the base is told apart at a glance."""
    if not (a.is_contiguous() and b.is_contiguous()) or a.numel() <= LEADING:
        return True
    return torch.equal(a.view(-1)[:LEADING], b.view(-1)[:LEADING])


HEAD = "lm_head.weight"  # the output embedding's key in transformers' causal LMs
HEAD_CLASSES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")  # transformers' classes with lm_head
EMBEDDING_NAMES = ("embed_tokens.weight", "wte.weight", "embed_in.weight", "word_embeddings.weight", "shared.weight")


def _ties_word_embeddings(folder) -> dict | None:
    """config.json of a Hugging Face folder when it ties the word embeddings, else None."""
    import json

    from .safetensors import NotAFileError, read_regular

    try:
        config = json.loads(read_regular(folder / "config.json", 1 << 24).decode("utf-8"))
    except (OSError, NotAFileError, UnicodeDecodeError, ValueError, RecursionError):
        return None  # no (readable) config: nothing is known to be tied
    if not isinstance(config, dict):
        return None
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    tied = config.get("tie_word_embeddings", text.get("tie_word_embeddings"))
    architectures = config.get("architectures")
    # only models with an lm_head (an encoder's tied decoder has another name)
    with_head = isinstance(architectures, list) and any(isinstance(a, str) and a.endswith(HEAD_CLASSES)
                                                       for a in architectures)
    return config if tied is True and with_head else None


def folder_aliases(base_ck) -> dict:
    """{"lm_head.weight": the input embedding's key} for a Hugging Face folder whose config.json
    ties the word embeddings of an architecture with an ``lm_head`` (``...ForCausalLM``, ...) and
    whose weights lack the head (transformers writes a tied parameter once); {} otherwise. The input embedding is the one floating key of the head's shape
    [vocab_size, hidden] whose name ends in a usual embedding name (embed_tokens, wte, ...)."""
    folder = getattr(base_ck, "folder", None)
    keys = set(base_ck.keys())
    if folder is None or HEAD in keys:
        return {}
    config = _ties_word_embeddings(folder)
    if config is None:
        return {}
    candidates = [k for k in sorted(keys) if ".".join(k.split(".")[-2:]) in EMBEDDING_NAMES
                  and base_ck.is_floating(k) and len(base_ck.shape(k)) == 2]
    return {HEAD: candidates[0]} if len(candidates) == 1 else {}
