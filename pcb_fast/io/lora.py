"""LoRA adapters as models, merged without materialising their deltas.

A PEFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``, or
``adapter_model.bin``) fine-tunes a base model by low-rank factors: for a module ``m`` whose
weight W is [out, in], ``base_model.model.m.lora_A.weight`` is A [r, in] and ``...lora_B.weight``
is B [out, r], and the fine-tuned weight is W + scale * B @ A with scale = lora_alpha / r
(``use_rslora``: lora_alpha / sqrt(r)). Its task vector is therefore tau = scale * B @ A, and
:class:`LoraSource` forms it block by block from the factors inside the engine (docs/design.md
3.1): merging n adapters holds the factors and a few blocks, never n dense deltas. A key that one
adapter changes and another does not has tau = 0 for the other task; keys no adapter changes are
the base's and stay out of the merge, so global statistics run over the entries the adapters can
change (their zeros would otherwise fill any global top-k). Tied parameters are one key
(io/tied.py): a LoRA on a tied ``lm_head`` changes the embedding, as PEFT's merge does.

PEFT's conventions, as PEFT 0.21 writes and merges adapters (``LoraLayer.update_layer``,
``get_delta_weight``, ``get_peft_model_state_dict``):

- keys ``base_model.model.<module>.lora_A.weight`` / ``lora_B.weight`` (Linear; Conv1d/2d/3d with a
  1x1 ``lora_B``, the delta reshaped to the kernel), ``<module>.lora_embedding_A`` [r, num] /
  ``lora_embedding_B`` [dim, r] (Embedding: tau = (B @ A)^T * scale), ``lora_B.bias``
  (``lora_bias``: the bias moves by scale * lora_B.bias);
- ``fan_in_fan_out`` (GPT-2's Conv1D, weights stored [in, out]): tau = (B @ A)^T * scale;
- per-module ``rank_pattern`` / ``alpha_pattern`` (regexes matched on module names as PEFT's
  ``get_pattern_key``, with bounded work: io/patterns.py); the rank is the factors' (checked
  against the config);
- full tensors saved beside the factors (``modules_to_save``, ``bias="all"``/``"lora_only"``, saved
  embedding layers, ``<module>.base_layer.<name>`` for a wrapped layer): tau = saved - base, and
  no change where the saved tensor is the base's (PEFT saves an adapted embedding's base layer);
- refused with a one-line error: DoRA and the other variants whose merge is not scale * B @ A
  (Arrow, BD-LoRA, aLoRA, MonteCLoRA, MiCA, KaSA, QALoRA), initialisations that change the base
  weights and are saved unconverted (PiSSA, OLoRA, CorDA, LoRA-GA, LoftQ), ``layer_replication``,
  ``trainable_token_indices``, ``target_parameters``, other PEFT types.

tau is computed in float32 (factors of any floating dtype are upcast, as PEFT does on CPU, but its
delta is not rounded back to the adapter's dtype) as ``(L[rows] @ R) * scale``, by a one-thread
matmul over fixed groups of whole rows whose size depends only on the tensor's shape: BLAS sums
the r products in an order that depends on the matrix shapes and on the thread count, so this is
what makes the values the same in every pass, for every block width, memory budget and torch
thread setting. They equal PEFT's ``(B @ A) * scale`` up to the float32 summation order of the r
products (exactly, when those sums are exact).
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core import checks
from ..core.sources import Block, TaskVectorSource, segments_of
from ..core.threads import one_thread
from .checkpoints import MERGED_DTYPES, check_inside, open_checkpoint
from .patterns import PatternError, peft_match
from .safetensors import NotAFileError, read_regular, show, show_path

CONFIG = "adapter_config.json"
WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
PREFIX = "base_model.model."
# entries of one group of whole rows of a product (one row when a row is longer): 256 KiB of float32
GROUP_ENTRIES = 1 << 16
CONFIG_LIMIT = 1 << 24

# LoraConfig fields whose adapters do not merge as W + scale * B @ A
VARIANTS = {"use_dora": "DoRA", "arrow_config": "Arrow", "use_bdlora": "BD-LoRA", "alora_invocation_tokens":
            "aLoRA (activated LoRA)", "monteclora_config": "MonteCLoRA", "kasa_config": "KaSA", "use_qalora": "QALoRA",
            "layer_replication": "layer_replication", "trainable_token_indices": "trainable_token_indices",
            "target_parameters": "target_parameters (LoRA on nn.Parameter)"}
# initialisations that change the base weights: an adapter saved without conversion is relative to them
MUTATING_INITS = ("pissa", "olora", "corda", "lora_ga", "loftq", "mica")


@dataclass
class Product:
    """tau = (L @ R) * scale, viewed flat as the target tensor (row-major [rows, cols])."""

    L: torch.Tensor  # float32 [rows, r], contiguous
    R: torch.Tensor  # float32 [r, cols], contiguous
    scale: float
    where: str  # the adapter's keys, for messages
    module: str = ""  # the adapted module's name in the adapter (lm_head for a LoRA on a tied head)
    kind: str = ""  # "linear", "embedding", "fan_in_fan_out", "conv" or "bias" (how PEFT forms the delta)

    @property
    def group_rows(self) -> int:
        return max(1, GROUP_ENTRIES // self.R.shape[1])


@dataclass
class Full:
    """tau = value - base, the value saved whole in the adapter file under ``key``."""

    key: str


@dataclass
class Adapter:
    name: str
    path: Path
    checkpoint: object  # the adapter file (io.checkpoints.Checkpoint), for Full tensors
    deltas: dict  # base key -> Product | Full
    config: dict


# ---- reading an adapter folder


def _read_config(folder: Path, name: str) -> dict:
    path = folder / CONFIG
    if not os.path.lexists(path):
        raise ValueError(f"{name}: no {CONFIG} in {show_path(folder)}; a PEFT adapter folder holds {CONFIG} and "
                         f"{WEIGHTS[0]}")
    try:
        raw = read_regular(path, CONFIG_LIMIT)
    except NotAFileError as e:
        raise ValueError(f"{name}: {e}") from None
    except OSError as e:
        raise ValueError(f"{name}: cannot read {show_path(path)} ({e.strerror or e})") from None
    try:
        config = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ValueError(f"{name}: {CONFIG} is not valid JSON") from None
    if not isinstance(config, dict):
        raise ValueError(f"{name}: {CONFIG} holds a {type(config).__name__}, expected a JSON object")
    return config


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_config(config: dict, name: str) -> None:
    """What this reader supports of a LoraConfig (one line naming the entry otherwise)."""
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise ValueError(f"{name}: {CONFIG} has peft_type={checks.short(peft_type)}; only LoRA adapters (peft_type 'LORA') are "
                         "supported")
    r = config.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise ValueError(f"{name}: {CONFIG} has r={checks.short(r)}; expected a positive integer rank")
    if not _number(config.get("lora_alpha")):
        raise ValueError(f"{name}: {CONFIG} has lora_alpha={checks.short(config.get('lora_alpha'))}; expected a finite number")
    for field in ("use_rslora", "fan_in_fan_out", "lora_bias"):
        if not isinstance(config.get(field, False), bool):
            raise ValueError(f"{name}: {CONFIG} has {field}={checks.short(config.get(field))}; expected true or false")
    for field, kind in (("rank_pattern", int), ("alpha_pattern", (int, float))):
        patterns = config.get(field) or {}
        if not isinstance(patterns, dict) or not all(
                isinstance(k, str) and isinstance(v, kind) and not isinstance(v, bool) and _number(v) and v > 0
                for k, v in patterns.items()):
            raise ValueError(f"{name}: {CONFIG} has {field}={checks.short(patterns)}; expected an object of module patterns to "
                             "positive numbers")
        for pattern in patterns:
            try:
                peft_match(pattern, "")
            except PatternError as e:
                raise ValueError(f"{name}: {CONFIG}: {field} pattern {show(pattern)} is refused: {e}") from None
    for field, what in VARIANTS.items():
        if config.get(field):
            raise ValueError(f"{name}: {what} adapters are not supported ({field} is set in {CONFIG}): their merge "
                             "is not W + scale * B @ A")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(MUTATING_INITS):
        raise ValueError(f"{name}: init_lora_weights={checks.short(init)} changes the base weights, so this adapter is relative "
                         "to a modified base; save it converted (PEFT's path_initial_model_for_weight_conversion)")


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's get_pattern_key: the value of the first pattern p with re.match(rf"(.*\\.)?({p})$", module),
    matched on the module name with bounded work (io/patterns.py)."""
    for pattern, value in (patterns or {}).items():
        if peft_match(pattern, module):
            return value
    return default


def _scale(config: dict, module: str, r: int) -> float:
    alpha = _pattern_value(config.get("alpha_pattern"), module, config["lora_alpha"])
    return alpha / math.sqrt(r) if config.get("use_rslora", False) else alpha / r


_FACTOR = re.compile(r"(.+)\.(lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_embedding_A|lora_embedding_B)")


def open_adapter(path, name: str, base_ck, merged_keys, aliases=None) -> Adapter:
    """Read and check a PEFT LoRA adapter folder against the base model (keys, shapes, ranks): the
    factors are loaded (float32), full tensors are read slice by slice during the passes."""
    folder = Path(path)
    try:
        mode = os.stat(folder).st_mode
    except (FileNotFoundError, NotADirectoryError):
        raise ValueError(f"{name}: no such folder") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"{name}: cannot access {show_path(folder)} ({getattr(e, 'strerror', None) or e})") from None
    if not stat.S_ISDIR(mode):
        raise ValueError(f"{name}: {show_path(folder)} is not a folder; a PEFT adapter is a folder holding {CONFIG} "
                         f"and {WEIGHTS[0]}")
    # the rule of model folders: nothing read through a link that leaves the folder
    check_inside(folder, [f for f in (CONFIG, *WEIGHTS) if os.path.lexists(folder / f)], name, what="",
                 kind="adapter")
    config = _read_config(folder, name)
    check_config(config, name)
    weights = next((folder / w for w in WEIGHTS if os.path.lexists(folder / w)), None)
    if weights is None:
        raise ValueError(f"{name}: no {WEIGHTS[0]} (or {WEIGHTS[1]}) in {show_path(folder)}")
    checkpoint = open_checkpoint(weights, name)
    try:
        deltas = _deltas(checkpoint, config, name, base_ck, set(merged_keys), aliases or {})
    except BaseException:
        checkpoint.close()
        raise
    return Adapter(name, folder, checkpoint, deltas, config)


def _deltas(ck, config, name, base_ck, merged: set, aliases: dict) -> dict:
    factors, full = {}, {}
    for key in ck.keys():
        if not key.startswith(PREFIX):
            raise ValueError(f"{name}: key {show(key)} does not start with {checks.short(PREFIX)}; not the adapter of a PEFT model")
        rest = key[len(PREFIX):]
        match = _FACTOR.fullmatch(rest)
        if match:
            factors.setdefault(match.group(1), {})[match.group(2)] = key
        elif "lora_magnitude_vector" in rest:
            raise ValueError(f"{name}: key {show(key)} is a DoRA magnitude; DoRA adapters are not supported")
        elif any(part.startswith("lora_") for part in rest.split(".")):
            raise ValueError(f"{name}: key {show(key)} is not a LoRA factor this reader knows (lora_A.weight, "
                             "lora_B.weight, lora_B.bias, lora_embedding_A, lora_embedding_B)")
        else:  # saved whole: modules_to_save, trained biases, embedding layers (of a wrapped layer: base_layer)
            full.setdefault(re.sub(r"\.base_layer(?=\.[^.]+$)", "", rest), key)

    deltas, origin = {}, {}

    def add(target: str, delta, what: str):
        target = aliases.get(target, target)  # a tied name of the base is its first name
        if target in deltas:
            raise ValueError(f"{name}: {what} and {origin[target]} both change the base model's key {show(target)}")
        _check_target(base_ck, target, name, what)
        deltas[target], origin[target] = delta, what
        if target not in merged:
            deltas.pop(target)  # an excluded key: copied from the base, whatever the adapter says

    r_default = config["r"]
    for module, parts in sorted(factors.items()):
        embedding = "lora_embedding_A" in parts or "lora_embedding_B" in parts
        a_name, b_name = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A.weight", "lora_B.weight")
        if embedding and ("lora_A.weight" in parts or "lora_B.weight" in parts):
            raise ValueError(f"{name}: module {show(module)} has both lora_A/lora_B and lora_embedding_A/B factors")
        for part in (a_name, b_name):
            if part not in parts:
                other = b_name if part == a_name else a_name
                raise ValueError(f"{name}: {show(parts[other])} has no matching {part} "
                                 f"({show(f'{PREFIX}{module}.{part}')} is missing)")
        A, B = _factor(ck, parts[a_name], name), _factor(ck, parts[b_name], name)
        what = f"{PREFIX}{module}.{a_name.split('.')[0]}/{b_name.split('.')[0]}"
        if A.dim() < 2 or B.dim() < 2 or B.shape[1] != A.shape[0]:
            raise ValueError(f"{name}: rank mismatch at {show(what)}: {a_name} has shape {tuple(A.shape)} and {b_name} "
                             f"{tuple(B.shape)}; expected [r, ...] and [..., r] of the same r")
        r = A.shape[0]
        try:
            expected_r = _pattern_value(config.get("rank_pattern"), module, r_default)
            scale = _scale(config, module, r)
        except PatternError as e:
            raise ValueError(f"{name}: {CONFIG}: a pattern cannot be matched against module {show(module)}: {e}") \
                from None
        if r != expected_r:
            raise ValueError(f"{name}: rank mismatch at {show(what)}: the factors have rank {r} but {CONFIG} says "
                             f"r={expected_r}" + (" (rank_pattern)" if expected_r != r_default else ""))
        target = f"{module}.weight"
        own = aliases.get(target, target)
        shape = tuple(base_ck.shape(own)) if _has(base_ck, own) else None
        if embedding:  # lora_embedding_A [r, num], lora_embedding_B [dim, r]: (B @ A)^T = A^T @ B^T
            if A.dim() != 2 or B.dim() != 2:
                raise ValueError(f"{name}: {show(what)}: embedding factors must be 2-D, not {tuple(A.shape)} and "
                                 f"{tuple(B.shape)}")
            L, R, expected, kind = A.t(), B.t(), (A.shape[1], B.shape[0]), "embedding"
        elif A.dim() == 2 and B.dim() == 2:
            if config.get("fan_in_fan_out", False):  # the weight is stored [in, out]: (B @ A)^T
                L, R, expected, kind = A.t(), B.t(), (A.shape[1], B.shape[0]), "fan_in_fan_out"
            else:
                L, R, expected, kind = B, A, (B.shape[0], A.shape[1]), "linear"
        elif A.dim() in (3, 4, 5) and B.dim() == A.dim() and all(k == 1 for k in B.shape[2:]):
            if config.get("fan_in_fan_out", False):
                raise ValueError(f"{name}: {show(what)}: fan_in_fan_out does not apply to convolutions")
            # Conv: W [out, in, *k] flat is [out, in * prod(k)]; lora_B is a 1x1 convolution [out, r, 1, ...]
            L, R, expected = B.reshape(B.shape[0], r), A.reshape(r, -1), (B.shape[0],) + tuple(A.shape[1:])
            kind = "conv"
        else:
            raise ValueError(f"{name}: {show(what)}: factors of shapes {tuple(A.shape)} and {tuple(B.shape)} are not "
                             "a LoRA of a Linear, Embedding or (ungrouped) convolution layer")
        if shape is not None and shape != tuple(expected):
            hint = " (check fan_in_fan_out)" if shape == tuple(reversed(expected)) else ""
            raise ValueError(f"{name}: {show(what)} gives a delta of shape {tuple(expected)} but the base model's "
                             f"{show(target)} has shape {shape}{hint}")
        add(target, Product(L.contiguous(), R.contiguous(), scale, what, module, kind), what)
        if "lora_B.bias" in parts:
            if embedding:
                raise ValueError(f"{name}: {show(parts['lora_B.bias'])}: an embedding LoRA has no bias")
            bias = _factor(ck, parts["lora_B.bias"], name)
            bias_target = f"{module}.bias"
            if bias.dim() != 1:
                raise ValueError(f"{name}: {show(parts['lora_B.bias'])} has shape {tuple(bias.shape)}; expected 1-D")
            if _has(base_ck, aliases.get(bias_target, bias_target)) and \
                    tuple(base_ck.shape(aliases.get(bias_target, bias_target))) != tuple(bias.shape):
                raise ValueError(f"{name}: {show(parts['lora_B.bias'])} has shape {tuple(bias.shape)} but the base "
                                 f"model's {show(bias_target)} has shape "
                                 f"{tuple(base_ck.shape(aliases.get(bias_target, bias_target)))}")
            # PEFT: bias += lora_B.bias * scale (a product by a [1, 1] one, exact)
            add(bias_target, Product(bias.reshape(-1, 1).contiguous(), torch.ones(1, 1), scale, parts["lora_B.bias"],
                                     module, "bias"), parts["lora_B.bias"])
        elif "lora_B.bias" not in parts and config.get("lora_bias", False):
            raise ValueError(f"{name}: {CONFIG} has lora_bias=true but {show(what)} has no lora_B.bias")
    for target, key in sorted(full.items()):
        base_key = aliases.get(target, target)
        _check_target(base_ck, base_key, name, key)
        if tuple(ck.shape(key)) != tuple(base_ck.shape(base_key)):
            raise ValueError(f"{name}: {show(key)} has shape {tuple(ck.shape(key))} but the base model's "
                             f"{show(base_key)} has shape {tuple(base_ck.shape(base_key))}")
        if not ck.is_floating(key) or ck.dtype(key) not in MERGED_DTYPES:
            raise ValueError(f"{name}, key {show(key)}: {ck.dtype(key)} tensors are not merged")
        if _equals_base(ck, key, base_ck, base_key):
            continue  # PEFT saves the wrapped layer of an adapted embedding as it was: no change
        if base_key in deltas:
            raise ValueError(f"{name}: {show(key)} and {origin[base_key]} both change the base model's key "
                             f"{show(base_key)} (the saved tensor differs from the base's: was the adapter trained on "
                             "another base?)")
        add(target, Full(key), key)
    return deltas


def _equals_base(ck, key: str, base_ck, base_key: str, chunk: int = 1 << 20) -> bool:
    """True when the tensor ``key`` saved in an adapter is the base's ``base_key`` (in the saved dtype),
    compared slice by slice."""
    numel = base_ck.numel(base_key)
    for lo in range(0, numel, chunk):
        hi = min(numel, lo + chunk)
        saved = ck.read_into(key, lo, hi, torch.empty(hi - lo, dtype=ck.dtype(key)))
        base = base_ck.read_into(base_key, lo, hi, torch.empty(hi - lo, dtype=base_ck.dtype(base_key)))
        if not torch.equal(saved, base.to(saved.dtype)):
            return False
    return True


def _has(base_ck, key: str) -> bool:
    keys = getattr(base_ck, "_key_set", None)
    if keys is None:
        keys = base_ck._key_set = frozenset(base_ck.keys())
    return key in keys


def _check_target(base_ck, target: str, name: str, what: str) -> None:
    if not _has(base_ck, target):
        raise ValueError(f"{name}: {show(what)} changes {show(target)}, a key the base model lacks")
    if not base_ck.is_floating(target):
        raise ValueError(f"{name}: {show(what)} changes {show(target)}, which is a {base_ck.dtype(target)} tensor of "
                         "the base model (only floating tensors are merged)")


def _factor(ck, key: str, name: str) -> torch.Tensor:
    if ck.dtype(key) not in MERGED_DTYPES:
        raise ValueError(f"{name}, key {show(key)}: {ck.dtype(key)} factors are not supported (valid: "
                         f"{', '.join(str(d).replace('torch.', '') for d in MERGED_DTYPES)})")
    value = ck.read(key)
    reason = checks.non_finite_reason(value)
    if reason is not None:
        raise ValueError(f"{name}, key {show(key)}: {reason}")
    return value.float()


# ---- the source


class LoraSource(TaskVectorSource):
    """Task vectors of LoRA adapters, formed per block from their factors (zero where an adapter does
    not touch a key); full tensors saved in an adapter are read slice by slice minus the base's."""

    def __init__(self, base_ck, adapters, merged_keys):
        self._base_ck, self.adapters = base_ck, list(adapters)
        super().__init__(len(self.adapters), segments_of(merged_keys, base_ck.shape), [a.name for a in self.adapters])
        self._groups = [None] * self.n  # per task: (key, group index, flat values) of the last group formed
        self._buffers = {}
        # one buffer per task for the widest group, allocated once: the matmul's output never moves
        widest = max((p.group_rows * p.R.shape[1] for a in self.adapters for p in a.deltas.values()
                      if isinstance(p, Product)), default=1)
        for task in range(self.n):
            self._buffer(("group", task), widest)
        self.products = 0  # groups formed (for tests: the source reads blocks only)
        self.largest_product = 0  # entries of the largest group formed

    def _buffer(self, slot, m: int, dtype=torch.float32) -> torch.Tensor:
        buffer = self._buffers.get((slot, dtype))
        if buffer is None or buffer.numel() < m:
            buffer = self._buffers[(slot, dtype)] = torch.empty(m, dtype=dtype)
        return buffer[:m]

    def _group(self, task: int, key: str, product: Product, g: int) -> torch.Tensor:
        cached = self._groups[task]
        if cached is not None and cached[0] == key and cached[1] == g:
            return cached[2]
        rows, cols = product.L.shape[0], product.R.shape[1]
        lo = g * product.group_rows
        hi = min(lo + product.group_rows, rows)
        values = self._buffer(("group", task), (hi - lo) * cols)
        torch.matmul(product.L[lo:hi], product.R, out=values.view(hi - lo, cols))
        values.mul_(product.scale)  # PEFT's (B @ A) * scale
        self.products += 1
        self.largest_product = max(self.largest_product, values.numel())
        self._groups[task] = (key, g, values)
        return values

    def _fill(self, task: int, key: str, product: Product, lo: int, hi: int, out: torch.Tensor) -> None:
        size = product.group_rows * product.R.shape[1]
        pos = lo
        while pos < hi:
            g = pos // size
            values = self._group(task, key, product, g)
            end = min(hi, g * size + values.numel())
            out[pos - lo: end - lo].copy_(values[pos - g * size: end - g * size])
            pos = end

    def product_into(self, task: int, key: str, lo: int, hi: int, out: torch.Tensor) -> torch.Tensor:
        """Entries [lo, hi) of adapter ``task``'s product tau of ``key`` (float32) into ``out``: the same
        values whatever the range, in every pass. Sets torch's thread count while it runs: call it on
        the thread that owns that setting (pcb_fast.io.lora_models)."""
        with one_thread():
            self._fill(task, key, self.adapters[task].deltas[key], lo, hi, out)
        return out

    def _read(self, seg, lo, hi, out):
        with one_thread():  # the products' rounding must not depend on the thread count
            return self._read_deltas(seg, lo, hi, out)

    def _read_deltas(self, seg, lo, hi, out):
        base = None
        for i, adapter in enumerate(self.adapters):
            delta = adapter.deltas.get(seg.key)
            if delta is None:
                out[i].zero_()
            elif isinstance(delta, Product):
                self._fill(i, seg.key, delta, lo, hi, out[i])
            else:
                if base is None:
                    ck = self._base_ck
                    base = ck.read_into(seg.key, lo, hi, self._buffer("base", hi - lo, ck.dtype(seg.key)))
                    reason = checks.non_finite_reason(base)
                    if reason is not None:
                        raise ValueError(f"base model, key {show(seg.key)}: {reason}")
                    if base.dtype != torch.float32:
                        base = self._buffer("base32", hi - lo).copy_(base)
                saved = adapter.checkpoint
                native = saved.read_into(delta.key, lo, hi, self._buffer("full", hi - lo, saved.dtype(delta.key)))
                out[i].copy_(native).sub_(base)
        return out

    def why_not_finite(self, task: int, block: Block) -> str:
        delta = self.adapters[task].deltas.get(block.segment.key)
        if isinstance(delta, Product):
            return (f"its LoRA delta scale * B @ A ({delta.where}, scale {delta.scale:g}) overflows float32; every "
                    "task vector must fit float32")
        key, lo, hi = block.segment.key, block.lo, block.hi
        saved, base = self.adapters[task].checkpoint, self._base_ck
        return self._diagnose(saved.read_into(delta.key, lo, hi, torch.empty(hi - lo, dtype=saved.dtype(delta.key))),
                              base.read_into(key, lo, hi, torch.empty(hi - lo, dtype=base.dtype(key))))
