"""mergekit's YAML merge configurations, as users write them, with mergekit 0.1.5's meaning.

What it accepts, and how each entry maps onto the engine (docs/configuration.md lists every
key with its meaning):

- ``merge_method``: mergekit's names give mergekit's semantics (per-tensor statistics, its
  defaults): ``linear`` (-> average), ``task_arithmetic``, ``ties``, ``dare_ties``, ``dare_linear``
  (-> dare), ``breadcrumbs``, ``breadcrumbs_ties``. pcb_fast's own names ``pcb``, ``average`` and
  ``dare`` keep the authors' semantics and pcb_fast's defaults. Any engine parameter written in
  ``parameters`` overrides a default (``scope: global, sign_ties: majority, topk: threshold,
  min_keep: 0`` give the authors' TIES under the name ``ties``).
- ``parameters`` (shared) and ``models[i].parameters`` (per model: ``weight``, ``density``,
  ``gamma``, and pcb_fast's ``p`` and ``beta``), each value a number, a gradient (a list of numbers
  interpolated over the layers) or filters (``[{filter: self_attn, value: 0.5}, {value: 1}]``: the
  first whose filter is a substring of the tensor's name, or has none, wins), resolved exactly as
  mergekit's ``evaluate_setting``; a model's own setting first, then the shared one, then the
  default.
- A parameter that varies by tensor needs scope "tensor" (the default of mergekit's names); the
  merge then passes a :class:`SegmentParams` to the engine (pcb_fast.core.engine.run).

Everything is checked before any model file is opened; each problem is one ValueError naming the
entry, and what mergekit has but pcb_fast does not (the modules of a multi-module model, LoRA
references) is a one-line "not supported: ..." naming the feature. ``slices`` are pcb_fast.io.slices,
tokenizer sources pcb_fast.io.vocabulary.
"""

from __future__ import annotations

import difflib
import math
import os
import warnings
from pathlib import Path

from ..methods import SPECS, check_method_params
from ..methods.gta import KINDS as GTA_KINDS
from .checkpoints import load_json
from .lora_models import LoraModel, lora_reference, model_folder, same_model
from .safetensors import show, show_path
from ..core.checks import short

# mergekit's name -> pcb_fast's method (each method's spec says what mergekit calls it)
MERGEKIT_METHODS = {spec.mergekit: name for name, spec in SPECS.items() if spec.mergekit is not None}
# pcb_fast's own names, with the authors' semantics and pcb_fast's defaults
OWN_METHODS = tuple(name for name, spec in SPECS.items() if name not in MERGEKIT_METHODS
                    and not spec.internal)  # (gta, mergekit_linear: mergekit's names at mergekit's compute dtype)
TOP_LEVEL = ("merge_method", "base_model", "models", "slices", "modules", "parameters", "dtype", "out_dtype",
             "tokenizer_source", "tokenizer", "chat_template", "name", "compute_dtype")
# entries real configs carry that mergekit 0.1.5's schema accepts and nothing reads: accepted, with a note
IGNORED_ENTRIES = {"vocab_size": "mergekit 0.1.5 does not read it either; the output's vocabulary is the base "
                                 "model's (or the tokenizer's)",
                   "int8_mask": "a parameter written outside parameters:, where mergekit ignores it too; under "
                                "parameters it only saves memory, the values are the same"}
# how mergekit treats base_model (its input contract) where not as a required base: "optional" (a
# config without base_model merges the models themselves), "ignored" (the base is one more input)
MERGEKIT_BASE = {"nuslerp": "optional", "multislerp": "optional", "karcher": "ignored", "passthrough": "ignored"}
MERGEKIT_WEIGHTED = ("nuslerp", "multislerp")  # weight-space methods with mergekit's required per-model weight
# parameters of some mergekit method: one the chosen method does not take is ignored (as mergekit ignores it)
MERGEKIT_PARAMETERS = ("weight", "density", "gamma", "epsilon", "lambda", "normalize", "rescale", "int8_mask", "t",
                       "filter_wise", "nuslerp_flatten", "nuslerp_row_wise", "eps", "max_iter", "tol", "select_topk",
                       "similarity_threshold", "tukey_fence", "thresh", "alpha", "normalize_weights", "scale", "r")
GENERAL_PARAMETERS = ("lam", "scope", "exclude")


def per_model(method: str) -> tuple:
    """The parameters ``method`` takes per model: the weight and density of mergekit's YAML, and those
    its spec declares per model (a shared one, such as RAM's epsilon, is refused per model)."""
    return ("weight", "density") + tuple(p.name for p in SPECS[method].params if p.per_model and p.name != "density")


# how a YAML value is read: the YAML's own entries, then every method's parameters
KINDS = {"weight": "number", "lam": "number", "density": "number", "int8_mask": "bool",
         **{p.name: ("str" if p.kind == "choice" else p.kind) for spec in SPECS.values() for p in spec.params}}
MIN_NUM_LAYERS_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


def parse(raw, where: str = "config", compute_dtype: str | None = None) -> dict:
    """Validate a configuration mapping into keyword arguments of ``merge_checkpoints`` (plus
    ``card``: what the output folder records, see pcb_fast.io.card). ``compute_dtype``: the dtype of
    the arithmetic, float32 by default; "mergekit" is mergekit's (the config's ``dtype``, else each
    tensor's inputs' own dtype)."""
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected a mapping with {', '.join(TOP_LEVEL)}")
    raw = _one_module(raw, where)
    unknown = sorted(set(raw) - set(TOP_LEVEL) - set(IGNORED_ENTRIES), key=str)
    if unknown:
        raise ValueError(f"{where}: unknown entry {short(unknown[0])}{_did_you_mean(unknown[0], TOP_LEVEL)}; "
                         f"valid: {', '.join(TOP_LEVEL)}")
    if raw.get("name") is not None and not isinstance(raw["name"], str):
        raise ValueError(f"{where}: name={short(raw['name'])} must be a string (the merge's name)")
    notes = [f"config: {key} is ignored ({why})" for key, why in IGNORED_ENTRIES.items() if key in raw]
    compute_dtype = _asked_compute_dtype(raw, compute_dtype, where)
    _tokenizer_block(raw, where)
    name, method = _method(raw, where)
    mergekit = name in MERGEKIT_METHODS
    base = raw.get("base_model")
    if _lower_precision(raw, compute_dtype) and name in GTA_KINDS:
        method = "gta"  # mergekit's generalized task arithmetic, rounded as mergekit rounds (methods/gta.py)
    if "slices" in raw:
        return _parse_slices(raw, where, compute_dtype, name, method, notes)
    entries = raw.get("models")
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{where}: models must be a list of at least one entry with a 'model' path")
    models = [_model_entry(entry, i, where) for i, entry in enumerate(entries)]
    named = {}  # local folder -> the Hub name it was given by (for what the output records)
    models = [(_local(path, f"{where}: models[{i}].model", named), params) for i, (path, params) in enumerate(models)]
    if isinstance(base, str):
        base = _local(base, f"{where}: base_model", named)
    listed = list(dict.fromkeys(path for path, _ in models))  # mergekit's order of a tensor's inputs
    shared = raw.get("parameters") or {}
    if not isinstance(shared, dict):
        raise ValueError(f"{where}: parameters must be a mapping")
    policy = MERGEKIT_BASE.get(method, "required")
    extra = {}  # parameters the merge gets from the config's shape (with_base)
    if base is None and policy == "optional":  # the models themselves; the first lends its keys and side files
        base, extra["with_base"] = models[0][0], False
    elif policy == "ignored":  # karcher: every model an input, the base too when named (as mergekit adds it)
        if base is None:
            base = models[0][0]
        elif not any(_same(p, base) for p, _ in models):
            models.append((base, {}))
    elif base is None and method == "average":
        base = models[0][0]  # mergekit's linear needs no base: every model is averaged, the first is the origin
    elif base is not None and method == "average" and mergekit and not any(_same(p, base) for p, _ in models):
        # mergekit adds the base to linear's inputs, with the shared weight
        if "weight" not in shared:
            raise ValueError(f"{where}: linear averages the base model too (as mergekit does); give it a weight "
                             f"(parameters.weight) or list it under models")
        models.append((base, {}))
    if not (isinstance(base, str) and base) and not isinstance(base, LoraModel):
        raise ValueError(f"{where}: base_model must be the path of the base model")
    if method != "average" and policy != "ignored" and extra.get("with_base", True):
        # a model that is the base is no task (mergekit's habit); its weight is ignored
        copies = [i for i, (path, _) in enumerate(models) if _same(path, base)]
        if copies and len(copies) < len(models):
            notes.append(f"config: {', '.join(f'models[{i}]' for i in copies)} "
                         f"{'is' if len(copies) == 1 else 'are'} the base model: left out of the task list "
                         f"(its parameters ignored, as mergekit does)")
            models = [m for i, m in enumerate(models) if i not in copies]
    if name == "linear" and compute_dtype not in (None, "float32"):
        method = "mergekit_linear"  # mergekit's sum and rounding (methods/mergekit_linear.py)
    names = _parameter_names(method, mergekit)
    shared, models = _without_unused(shared, models, name, names, notes)
    _check_names(shared, models, method, name, names, where)
    _check_inputs(method, name, shared, models, where)
    settings = Settings(method, mergekit, shared, [params for _, params in models], where)
    _gta_defaults(settings, name)
    scope = settings.constant("scope")
    if scope not in ("global", "tensor"):
        raise ValueError(f"{where}: parameters.scope={short(scope)} is not valid; choose one of 'global', 'tensor'")
    exclude = shared.get("exclude")
    if exclude is not None and not isinstance(exclude, str) and not (
            isinstance(exclude, list) and all(isinstance(p, str) for p in exclude)):
        raise ValueError(f"{where}: parameters.exclude={show(exclude)} must be a regular expression or a list of them")
    varying = settings.varying()
    if varying and scope == "global":
        raise ValueError(f"{where}: {varying[0]} varies by tensor ({settings.how(varying[0])}), which needs scope: "
                         f"tensor, but parameters.scope is global")
    settings.validate(len(models), "tensor" if varying else scope, base)
    kwargs = dict(base=base, models=[p for p, _ in models], method=method, scope="tensor" if varying else scope,
                  **extra)
    if exclude is not None:
        kwargs["exclude"] = exclude
    if varying:
        kwargs.update(settings.fixed())
        kwargs["segment_params"] = SegmentParams(settings, settings.layers(base))
    else:
        kwargs.update(_without_defaults(method, settings.resolve("", 0.0)))
    kwargs.update(_output_entries(raw, base, where))
    kwargs.update(_compute_dtype(raw, method, name, compute_dtype, notes, where))
    gathered = listed + ([] if raw.get("base_model") is None or any(_same(p, base) for p in listed) else [base])
    plan = _tokenizer(raw, base, raw.get("base_model") and base, gathered, named, where)
    _with_vocabulary(kwargs, plan, gathered)
    kwargs["card"] = {"config": _as_named(_resolved_config(raw, name, base, models, shared, settings), named),
                      "tokenizer": plan, "source": where, "chat_template": raw.get("chat_template")}
    _record_compute_dtype(kwargs["card"], compute_dtype)
    for note in notes:  # only once the whole config is known to run: a refusal is the only line printed
        warnings.warn(f"pcb_fast: {note}", stacklevel=3)
    return kwargs


def _one_module(raw: dict, where: str) -> dict:
    """mergekit's ``modules:`` with the one module of a single-module architecture (``default``) as
    the same configuration with its ``slices`` or ``models`` at the top level, the module's
    parameters before the configuration's (mergekit's precedence: source, slice, module, config)."""
    modules = raw.get("modules")
    if modules is None:
        return raw
    if raw.get("models") is not None or raw.get("slices") is not None:
        raise ValueError(f"{where}: give modules, or models/slices, not both")
    if not isinstance(modules, dict) or list(modules) != ["default"]:
        names = ", ".join(map(str, modules)) if isinstance(modules, dict) else repr(modules)
        raise ValueError(f"{where}: not supported: modules {names} (the modules of a multi-module architecture); "
                         "pcb-fast takes the one module 'default' of a single-module model, or models/slices")
    module = modules["default"]
    if not isinstance(module, dict) or set(module) - {"slices", "models", "parameters"} or (
            (module.get("slices") is None) == (module.get("models") is None)):
        raise ValueError(f"{where}: modules.default must be a mapping with slices or models (one of them) and "
                         "parameters")
    out = {k: v for k, v in raw.items() if k != "modules"}
    kind = "slices" if module.get("slices") is not None else "models"
    out[kind] = module[kind]
    own = module.get("parameters") or {}
    if not isinstance(own, dict):
        raise ValueError(f"{where}: modules.default.parameters must be a mapping")
    if own:
        shared = raw.get("parameters") or {}
        if not isinstance(shared, dict):
            raise ValueError(f"{where}: parameters must be a mapping")
        out["parameters"] = _chain(own, shared)
    return out


LOWER_PRECISION = ("bfloat16", "float16")


def _gta_defaults(settings, name) -> None:
    """mergekit's defaults of ``name`` for methods/gta.py, which stands for it at a lower precision."""
    if settings.method == "gta":
        own = SPECS[MERGEKIT_METHODS[name]].mergekit_defaults
        settings.defaults = {"scope": "tensor", **{k: v for k, v in own.items()
                                                   if k in ("density", "gamma", "epsilon", "normalize", "rescale")}}


def _local(ref, label, named: dict):
    """A model reference as a local path: Hub names (org/name[@revision]) resolved through the
    Hugging Face cache (pcb_fast.io.hub), noted in ``named``; mergekit's ``model+lora`` as a
    :class:`~pcb_fast.io.lora_models.LoraModel` of the two (each a path or a Hub name), noted in
    ``named`` as written, with its local paths made absolute."""
    from .hub import is_hub_reference, resolve

    model = lora_reference(ref, label)
    if model is not None:
        named[model] = model.written
        return model
    if not is_hub_reference(ref):
        return ref
    folder = resolve(ref, label)
    named[folder] = ref
    return folder


def _as_named(config: dict, named: dict) -> dict:
    """``config`` with the local folders of Hub models given back their Hub names."""
    if not named:
        return config
    config = dict(config, base_model=named.get(config.get("base_model"), config.get("base_model")))
    config["models"] = [dict(m, model=named.get(m["model"], m["model"])) for m in config["models"]]
    return config


def _lower_precision(raw, asked) -> bool:
    """Whether the merge computes in another dtype than float32."""
    if asked == "mergekit":
        asked = raw.get("dtype") or "inputs"
    return asked not in (None, "float32")


COMPUTE_DTYPE_CHOICES = ("float32", "bfloat16", "float16", "float64", "inputs", "mergekit")


def _asked_compute_dtype(raw, flag, where) -> str | None:
    """The compute dtype asked for: ``--compute-dtype`` (``flag``) or the config's ``compute_dtype``
    (pcb-fast's own entry, which mergekit ignores; the output's mergekit_config.yml records the one
    used), None where neither says."""
    written = raw.get("compute_dtype")
    for label, value in (("compute_dtype", flag), (f"{where}: compute_dtype", written)):
        if value is not None and value not in COMPUTE_DTYPE_CHOICES:
            raise ValueError(f"{label}={show(value)} is not valid; choose one of "
                             f"{', '.join(map(repr, COMPUTE_DTYPE_CHOICES))}")
    if flag is not None and written is not None and flag != written:
        raise ValueError(f"{where}: compute_dtype: {written} and --compute-dtype {flag} differ; give one")
    return flag if flag is not None else written


def _record_compute_dtype(card: dict, compute_dtype) -> None:
    """The output's configuration says the compute dtype it ran with, so that it runs again to the same bits."""
    if compute_dtype is not None:
        card["config"] = dict(card["config"], compute_dtype=compute_dtype)


def _compute_dtype(raw, method, name, asked, notes, where) -> dict:
    """The merge's compute_dtype: float32 unless asked (a note when the config's dtype is lower:
    mergekit would round its arithmetic to it)."""
    dtype = raw.get("dtype")
    if asked is None:
        if dtype in LOWER_PRECISION:
            notes.append(f"config: dtype {dtype}: pcb-fast computes in float32 (mergekit computes in {dtype}; "
                         "--compute-dtype mergekit reproduces its rounding)")
        return {}
    if asked == "mergekit":
        asked = dtype if dtype is not None else "inputs"
    if asked == "float32":
        return {}
    if not SPECS[method].weight_space:
        raise ValueError(f"{where}: --compute-dtype {asked}: {name} computes in float32 only (a lower compute dtype "
                         f"is implemented for mergekit's methods)")
    out = {"compute_dtype": asked}
    if method == "gta":
        out["mergekit_method"] = name
    return out


def _did_you_mean(word, choices) -> str:
    close = difflib.get_close_matches(str(word).lower(), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean {short(close[0])}?)" if close else ""


def _tokenizer_block(raw, where) -> None:
    """mergekit's ``tokenizer:`` block: its entries and their types (the tokens' sources are checked
    once the models are known)."""
    block = raw.get("tokenizer")
    if block is None:
        return
    if raw.get("tokenizer_source") is not None:
        raise ValueError(f"{where}: give tokenizer_source or tokenizer, not both (as mergekit requires)")
    if not isinstance(block, dict):
        raise ValueError(f"{where}: tokenizer must be a mapping with source, tokens, pad_to_multiple_of")
    extra = sorted(set(block) - {"source", "tokens", "pad_to_multiple_of"}, key=str)
    if extra:
        raise ValueError(f"{where}: tokenizer.{extra[0]} is not an entry of the tokenizer block"
                         f"{_did_you_mean(extra[0], ('source', 'tokens', 'pad_to_multiple_of'))}; "
                         "valid: source, tokens, pad_to_multiple_of")
    pad = block.get("pad_to_multiple_of")
    if pad is not None and (not isinstance(pad, int) or isinstance(pad, bool) or pad < 1):
        raise ValueError(f"{where}: tokenizer.pad_to_multiple_of={short(pad)} must be a positive integer")
    if not isinstance(block.get("source", "union"), str):
        raise ValueError(f"{where}: tokenizer.source={short(block['source'])} must be base, union or a model")


def _tokenizer(raw, base, prefer, inputs, named, where):
    """The output's tokenizer and the inputs' re-mapped vocabulary rows (pcb_fast.io.vocabulary),
    or None where the configuration names no tokenizer source (the base's files are copied).
    ``base``: the model whose tokenizer the output starts from; ``prefer``: the configuration's
    base_model or None; ``inputs``: the paths of every model merged, in mergekit's order."""
    from .vocabulary import VocabularyPlan, load_tokenizer, parse_tokens

    block = raw.get("tokenizer")
    source = raw.get("tokenizer_source") if block is None else block.get("source", "union")
    if source is None:
        return None
    if not isinstance(source, str) or not source:
        raise ValueError(f"{where}: tokenizer_source={short(source)} must be base, union or a model")
    if source not in ("base", "union"):
        source = _local(source, f"{where}: tokenizer source", named)
        if _same(source, base):
            source = "base"
    what = f"tokenizer_source: {source}" if block is None else f"tokenizer.source: {source}"
    tokens = parse_tokens((block or {}).get("tokens"), where, inputs,
                          lambda ref, label: _local(ref, f"{where}: {label}", named))
    pad = (block or {}).get("pad_to_multiple_of")
    if source == "base" and not tokens and not pad and load_tokenizer(base) is None:
        return None  # nothing to re-map by: the base's files are copied (mergekit stops here)
    return VocabularyPlan(base, prefer, inputs, source, tokens, pad, where, what)


def _with_vocabulary(kwargs, plan, inputs) -> None:
    """The merge's base and models re-mapped to the plan's vocabulary, where that changes rows."""
    from .vocabulary import RemappedModel

    if plan is None or plan.identity():
        return
    kwargs["base"] = RemappedModel(kwargs["base"], plan, inputs)
    kwargs["models"] = [RemappedModel(m, plan, inputs) for m in kwargs["models"]]


def _without_unused(shared, models, name, names, notes):
    """The parameters without those of other mergekit methods, which this one does not take: mergekit
    ignores them, and so does pcb-fast, with a note."""
    unused = sorted({k for k in shared if k not in names and k in MERGEKIT_PARAMETERS}
                    | {k for _, p in models for k in p if k not in names and k in MERGEKIT_PARAMETERS})
    if not unused:
        return shared, models
    notes.append(f"config: {', '.join(unused)} {'is' if len(unused) == 1 else 'are'} not {'a parameter' if len(unused) == 1 else 'parameters'} "
                 f"of {name}: ignored (as mergekit ignores {'it' if len(unused) == 1 else 'them'})")
    shared = {k: v for k, v in shared.items() if k not in unused}
    return shared, [(path, {k: v for k, v in p.items() if k not in unused}) for path, p in models]


def _without_defaults(method: str, params: dict) -> dict:
    """``params`` less those equal to the method's defaults, so that a config saying what flags say
    gives the same output bytes (the metadata lists the parameters given)."""
    defaults = SPECS[method].defaults
    return {k: v for k, v in params.items()
            if not (k in defaults and not isinstance(v, list) and type(v) is type(defaults[k]) and v == defaults[k])}


def _method(raw, where):
    name = raw.get("merge_method")
    if name is None:
        raise ValueError(f"{where}: merge_method is missing; choose one of {', '.join(_method_names())}")
    if not isinstance(name, str) or (name not in MERGEKIT_METHODS and name not in OWN_METHODS):
        raise ValueError(f"{where}: merge_method={short(name)} is not valid; choose one of {', '.join(_method_names())}")
    return name, MERGEKIT_METHODS.get(name, name)


def _method_names():
    return list(OWN_METHODS) + [m for m in MERGEKIT_METHODS if m not in OWN_METHODS]


def _model_entry(entry, i, where):
    if isinstance(entry, str):
        entry = {"model": entry}
    if not isinstance(entry, dict) or not isinstance(entry.get("model"), str) or not entry["model"]:
        raise ValueError(f"{where}: models[{i}] must be a mapping with a 'model' path")
    extra = sorted(set(entry) - {"model", "parameters"}, key=str)
    if extra:
        raise ValueError(f"{where}: models[{i}].{extra[0]} is not supported; valid: model, parameters")
    params = entry.get("parameters") or {}
    if not isinstance(params, dict):
        raise ValueError(f"{where}: models[{i}].parameters must be a mapping")
    return entry["model"], params


def _same(a, b) -> bool:
    return same_model(a, b)


def _check_inputs(method, name, shared, models, where) -> None:
    """The models and required parameters a weight-space method needs (mergekit's input contract)."""
    spec = SPECS[method]
    if spec.weight_space and spec.check_together is not None:
        try:
            spec.check_together(spec.defaults, len(models))
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
    if name in MERGEKIT_WEIGHTED and "weight" not in shared:
        unweighted = [i for i, (_, p) in enumerate(models) if "weight" not in p]
        if unweighted:
            raise ValueError(f"{where}: {name} needs a weight for every model (as mergekit does): models"
                             f"[{unweighted[0]}] has none; give parameters.weight or models[i].parameters.weight")
    for parameter, meaning in ((p.name, p.help) for p in SPECS[method].params if p.required):
        if parameter not in shared:
            raise ValueError(f"{where}: {name} needs parameters.{parameter} ({meaning})")
        setting = shared[parameter]
        conditions = [setting] if isinstance(setting, dict) else setting
        if (isinstance(conditions, list) and conditions and all(isinstance(c, dict) for c in conditions)
                and not any(c.get("filter") in (None, "*") for c in conditions)):
            raise ValueError(f"{where}: parameters.{parameter} has filters but no value without filter: a tensor "
                             f"whose name matches none of them would have no {parameter} (end the list with "
                             f"{{value: ...}})")


def _parameter_names(method: str, mergekit: bool) -> dict:
    """Parameter name in the YAML -> (pcb_fast's name, per model allowed)."""
    if method == "mergekit_linear":
        return {"weight": "lambdas", "normalize": "normalize", "scope": "scope", "exclude": "exclude"}
    if method == "gta":  # mergekit's YAML names of its generalized task arithmetic
        return {"weight": "lambdas", "lam": "lam", "lambda": "lam", "density": "density", "gamma": "gamma",
                "epsilon": "epsilon", "normalize": "normalize", "rescale": "rescale", "int8_mask": "int8_mask",
                "seed": "seed", "scope": "scope", "exclude": "exclude"}
    if SPECS[method].weight_space:  # mergekit's own parameters only: no lambda; weights where mergekit has them
        names = {p: p for p in SPECS[method].param_names if p not in ("with_base", "compute_dtype")}
        if SPECS[method].mergekit in MERGEKIT_WEIGHTED:
            names["weight"] = "lambdas"
        return {**names, "scope": "scope", "exclude": "exclude"}
    names = {"weight": "lambdas", "lam": "lam", "lambda": "lam"}
    names.update({p: p for p in SPECS[method].param_names})
    names.update({"scope": "scope", "exclude": "exclude"})
    if method in ("dare", "dare_ties"):
        names["density"] = "density"  # 1 - p
    if method in ("breadcrumbs", "breadcrumbs_ties"):
        names["density"] = "density"  # beta
    if mergekit and method == "average":
        names["normalize"] = "normalize"  # linear's (true: the weighted mean)
    elif mergekit:
        names["int8_mask"] = "int8_mask"
        names["rescale"] = "rescale"
        names["normalize"] = "normalize"
    return names


def _check_names(shared, models, method, name, names, where):
    if "lam" in shared and "lambda" in shared:
        raise ValueError(f"{where}: parameters.lam and parameters.lambda are the same parameter; give one")
    for label, params in [("parameters", shared)] + [(f"models[{i}].parameters", p) for i, (_, p) in enumerate(models)]:
        for key in params:
            if key not in names:
                valid = [k for k in names if k != "exclude" or label == "parameters"]
                raise ValueError(f"{where}: {label}.{key} is not a parameter of {name}"
                                 f"{_did_you_mean(key, valid)}; valid: {', '.join(valid)}")
            if label != "parameters" and key not in per_model(method):
                raise ValueError(f"{where}: {label}.{key} is not supported per model (it is shared by every model); "
                                 f"set it under the top-level parameters; per model: "
                                 f"{', '.join(k for k in per_model(method) if k in names) or 'none'}")
        for a, b in (("density", "p"), ("density", "beta")):
            if a in names and a in params and b in params:
                raise ValueError(f"{where}: {label}.{a} and {label}.{b} say the same thing for {name}; give one")
    if name == "linear" and shared.get("normalize", True) is not True:
        raise ValueError(f"{where}: not supported: linear with normalize: false (a weighted sum of the models that "
                         "is not an average)")
    if method in ("ties", "breadcrumbs", "breadcrumbs_ties") and shared.get("rescale", False) is not False:
        raise ValueError(f"{where}: not supported: rescale: true with {name} (mergekit's L1 rescale of trimmed task "
                         "vectors; pcb-fast rescales DARE's drop only)")


class Settings:
    """The parameters of a configuration, as written, resolved per tensor and per model."""

    def __init__(self, method, mergekit, shared, per_model, where):
        self.method, self.mergekit, self.where = method, mergekit, where
        self.shared = {("lam" if k == "lambda" else k): v for k, v in shared.items() if k != "exclude"}
        self.labels = {("lam" if k == "lambda" else k): k for k in shared}  # as written
        self.per_model = per_model
        self.defaults = dict(SPECS[method].mergekit_defaults) if mergekit else {"scope": "global"}
        written = set(self.shared) | {k for p in per_model for k in p}
        if written & {"p", "beta"}:  # pcb_fast's own names instead of mergekit's density
            self.defaults.pop("density", None)
        for label, setting in self._all():
            _check_setting(setting, label, where)

    def _all(self):
        yield from ((f"parameters.{self.labels[k]}", v) for k, v in self.shared.items())
        for i, params in enumerate(self.per_model):
            yield from ((f"models[{i}].parameters.{k}", v) for k, v in params.items())

    def constant(self, name):
        setting = self.shared.get(name, self.defaults.get(name))
        if isinstance(setting, (list, dict)):
            raise ValueError(f"{self.where}: parameters.{name} cannot vary by tensor; give one value")
        return setting

    def varying(self) -> list:
        """Labels of the settings that vary by tensor (gradients and filters)."""
        return [label for label, setting in self._all() if _varies(setting)]

    def how(self, label) -> str:
        for name, setting in self._all():
            if name == label:
                return "a gradient" if isinstance(setting, list) and all(not isinstance(v, dict) for v in setting) \
                    else "a filter"
        return "a filter"

    def names(self) -> list:
        names = set(self.shared) | set(self.defaults) | {k for p in self.per_model for k in p}
        return sorted(names - {"scope"})

    def fixed(self) -> dict:
        """The parameters of a merge whose others vary by tensor: lam is 1 (each tensor's scales its block)."""
        return {"lam": 1.0}

    def resolve(self, key: str, t: float) -> dict:
        """pcb_fast's merge parameters for the tensor ``key`` at layer position ``t``."""
        return self._engine(self._values(key, t), len(self.per_model))

    def _values(self, key: str, t: float) -> dict:
        """The parameters' values for a tensor, under their YAML names (per-model ones as lists)."""
        n = len(self.per_model)
        values = {}
        for name in self.names():
            kind = KINDS.get(name, "str")
            if name in per_model(self.method):
                per_task = []
                for params in self.per_model[:n]:
                    value = _evaluate(params.get(name), key, t, kind)
                    if value is None:
                        value = _evaluate(self.shared.get(name), key, t, kind)
                    per_task.append(self.defaults.get(name) if value is None else value)
                values[name] = per_task
            else:
                value = _evaluate(self.shared.get(name), key, t, kind)
                values[name] = self.defaults.get(name) if value is None else value
        return values

    def _engine(self, values: dict, n: int) -> dict:
        """YAML values -> pcb_fast's parameters (mergekit's names mapped, per-task lists collapsed)."""
        out = {}
        weights = values.pop("weight", None)
        if weights is not None and any(w is not None and w != 1.0 for w in weights):
            out["lambdas"] = [1.0 if w is None else float(w) for w in weights]
        values.pop("int8_mask", None)  # mergekit's memory saving for its masks: no effect on values
        if self.method == "average":
            values.pop("normalize", None)  # linear's normalize: true is the average (false is refused)
        if "lam" in values:
            out["mergekit_lambda" if self.method == "gta" else "lam"] = float(values.pop("lam"))
        if "rescale" in values and values["rescale"] is not None:
            values["rescale"] = {True: "l1", False: "none"}.get(values["rescale"], values["rescale"])
        density = values.pop("density", None)
        if density is not None and not all(d is None for d in density):
            density = [float(d) for d in density]
            if self.method in ("della", "della_linear", "gta"):
                values["density"] = density  # mergekit's density >= 1 keeps everything
            elif self.method == "ties":
                values["density"] = [min(d, 1.0) for d in density]  # mergekit: density >= 1 keeps everything
            elif self.method in ("dare", "dare_ties"):
                values["p"] = [max(0.0, 1.0 - d) for d in density]  # mergekit's keep fraction
            else:  # breadcrumbs: keep int(density N); density >= 1 keeps everything (gamma ignored)
                gammas = values.get("gamma") or [self.defaults.get("gamma", 0.01)] * n
                values["beta"] = [min(d, 1.0) for d in density]
                values["gamma"] = [0.0 if d >= 1.0 else g for d, g in zip(density, gammas)]
        defaults = SPECS[self.method].defaults
        for name, value in values.items():
            if value is None or (isinstance(value, list) and all(v is None for v in value)):
                continue
            if isinstance(value, list):  # a model without its own value, nor a shared one: the method's default
                value = [defaults[name] if v is None and name in defaults else v for v in value]
                value = value[0] if all(v == value[0] for v in value) else value
            out[name] = value
        return out

    def validate(self, n: int, scope: str, base: str) -> None:
        """Every value a setting can take, checked as a merge checks it, before any file is opened."""
        for label, setting in self._all():  # types first
            name = "lam" if label.rsplit(".", 1)[1] == "lambda" else label.rsplit(".", 1)[1]
            for value in _candidates(setting):
                _convert(value, KINDS.get(name, "str"), f"{self.where}: {label}")
        context = self._values("", 0.0)  # the other parameters at their defaults (or constant values)
        for label, setting in self._all():
            name = label.rsplit(".", 1)[1]
            name = "lam" if name == "lambda" else name
            kind = KINDS.get(name, "str")
            for value in _candidates(setting):
                converted = _convert(value, kind, f"{self.where}: {label}")
                if name == "weight":
                    _finite(converted, f"{self.where}: {label}")
                    continue
                if name == "density" and self.method != "ties":
                    if not converted > 0:
                        raise ValueError(f"{self.where}: {label}={short(value)} is out of range; valid: 0 < density "
                                         "(the fraction kept)")
                    continue
                if name in ("int8_mask", "scope"):
                    continue
                for values in self._combinations(name, label, converted, context, n):
                    params = self._engine(values, n)
                    lam, lambdas = params.pop("lam", 1.0), params.pop("lambdas", None)
                    try:
                        check_method_params(self.method, n, lam, lambdas, scope, params)
                    except ValueError as e:
                        raise ValueError(f"{self.where}: {label}: {e}") from None

    def _combinations(self, name, label, value, context, n):
        """The parameter values a merge can see with ``name`` at ``value`` (the setting at ``label``):
        a shared parameter with every model's own values; a per-model one with the values of the model
        it applies to (that model's, or each model without its own for a shared setting), given to
        every model alike, so that no model's value is checked with another model's."""
        if name not in per_model(self.method):
            yield {**{k: (list(v) if isinstance(v, list) else v) for k, v in context.items()}, name: value}
            return
        if label.startswith("models["):
            models = [int(label[len("models["):label.index("]")])]
        else:
            models = [j for j, own in enumerate(self.per_model[:n]) if name not in own]
        for j in models:
            values = {k: ([v[j]] * n if isinstance(v, list) else v) for k, v in context.items()}
            values[name] = [value] * n
            yield values

    def layers(self, base: str):
        """Number of layers (for gradients): the base folder's config.json; None without gradients."""
        gradients = [label for label, s in self._all() if _has_gradient(s)]
        if not gradients:
            return None
        config = Path(model_folder(base)) / "config.json"
        try:  # bounded in size and depth (io/checkpoints.load_json)
            data = load_json(config, "config.json") if config.is_file() else {}
        except ValueError:
            data = {}
        data = data if isinstance(data, dict) else {}
        for key in MIN_NUM_LAYERS_KEYS:
            if isinstance(data.get(key), int) and not isinstance(data.get(key), bool) and data[key] > 0:
                return data[key]
        raise ValueError(f"{self.where}: {gradients[0]} is a gradient, which needs the number of layers: the base "
                         f"model's config.json ({show_path(config)}) has no {MIN_NUM_LAYERS_KEYS[0]}")

    def take(self, keep):
        view = object.__new__(Settings)
        view.__dict__.update(self.__dict__)
        view.per_model = [self.per_model[i] for i in keep]
        return view


class SegmentParams(dict):
    """Parameters that vary by tensor (mergekit's filters and gradients), for engine.run's
    ``segment_params``: called with a tensor's name, it gives that tensor's parameters. The dict
    holds the settings as written (for the output's metadata)."""

    def __init__(self, settings: Settings, num_layers: int | None):
        super().__init__({label: setting for label, setting in settings._all()})
        self.settings, self.num_layers = settings, num_layers

    def __call__(self, key: str) -> dict:
        return self.settings.resolve(key, layer_position(key, self.num_layers))

    def take(self, keep) -> "SegmentParams":
        """The same parameters for the models ``keep`` (indices) alone."""
        return SegmentParams(self.settings.take(keep), self.num_layers)

    def __str__(self) -> str:
        return ", ".join(label for label in self if _varies(self[label])) or "none"

    __repr__ = __str__


def layer_position(key: str, num_layers: int | None) -> float:
    """mergekit's t of a tensor: i / (layers - 1) for a tensor of layer i (the first integer in
    its dotted name; 1 with a single layer), 0 for the others (embeddings, final norm, head)."""
    if not num_layers:
        return 0.0
    for part in key.split("."):
        if part.isdigit():
            return int(part) / (num_layers - 1) if num_layers > 1 else 1.0
    return 0.0


def _varies(setting) -> bool:
    if isinstance(setting, dict):
        setting = [setting]
    if not isinstance(setting, list):
        return False
    if all(not isinstance(v, dict) for v in setting):
        return True  # a gradient
    return any(c.get("filter") not in (None, "*") or _varies(c.get("value")) for c in setting)


def _has_gradient(setting) -> bool:
    if isinstance(setting, dict):
        setting = [setting]
    if not isinstance(setting, list):
        return False
    if all(not isinstance(v, dict) for v in setting):
        return True
    return any(_has_gradient(c.get("value")) for c in setting)


def _check_setting(setting, label, where) -> None:
    """A setting is a scalar, a non-empty list of scalars (a gradient), or filters: a {filter,
    value} mapping or a list of them (mergekit's ConditionalParameter)."""
    scalar = (bool, int, float, str)
    if isinstance(setting, scalar) or setting is None:
        return
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, list) and setting and all(isinstance(v, scalar) for v in setting):
        return
    if isinstance(setting, list) and setting and all(isinstance(c, dict) for c in setting):
        for c in setting:
            extra = set(c) - {"filter", "value"}
            if extra or "value" not in c or not (c.get("filter") is None or isinstance(c["filter"], str)):
                break
            value = c["value"]
            if not (isinstance(value, scalar) or (isinstance(value, list) and value
                                                   and all(isinstance(v, scalar) for v in value))):
                break
        else:
            return
    raise ValueError(f"{where}: {label}={short(setting)} must be a value, a list of numbers (a gradient over the layers) "
                     "or filters (a list of {filter: <part of a tensor name>, value: <value>}, the last without "
                     "filter)")


def _evaluate(setting, key: str, t: float, kind: str):
    """mergekit's evaluate_setting: a scalar, a gradient at t (numbers interpolated, others picked),
    or the first filter whose text is in the tensor's name (or that has none); None if none does."""
    if setting is None:
        return None
    if isinstance(setting, dict):
        setting = [setting]
    if not isinstance(setting, list):
        return _convert(setting, kind)
    if not setting:
        return None
    if all(not isinstance(v, dict) for v in setting):
        values = [_convert(v, kind) for v in setting]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            return values[int(t * (len(values) - 1))]
        scaled = t * (len(setting) - 1)
        i0 = int(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        frac = scaled - i0
        return _convert((1 - frac) * values[i0] + frac * values[i1], kind)
    for cond in setting:
        text = cond.get("filter")
        if text is None or text == "*" or (key and text in key):
            return _evaluate(cond["value"], key, t, kind)
    return None


def _convert(value, kind: str, label: str | None = None):
    """A value of the parameter's type (mergekit validates with pydantic: numbers from numeric
    strings too); ``label`` names the entry in errors."""
    def bad(what):
        return ValueError(f"{label}={short(value)} must be {what}")

    if kind == "number":
        if isinstance(value, bool):
            if label:
                raise bad("a number")
            return value
        try:
            return float(value)
        except (TypeError, ValueError):
            if label:
                raise bad("a number") from None
            raise
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            if label:
                raise bad("an integer")
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            if label:
                raise bad("true or false")
        return value
    if kind == "rescale":
        if not isinstance(value, (bool, str)) and label:
            raise bad("true, false or one of 'inverse', 'l1', 'none'")
        return value
    if not isinstance(value, str) and label:
        raise bad("a string")
    return value


def _finite(value, label):
    if not math.isfinite(value):
        raise ValueError(f"{label}={short(value)} must be a finite number")


def _candidates(setting):
    """Every scalar a setting names (the values of its filters, the points of its gradients)."""
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, list):
        for v in setting:
            yield from _candidates(v["value"] if isinstance(v, dict) else v)
    elif setting is not None:
        yield setting


CHAT_TEMPLATE_NAMES = ("chatml", "auto")
MERGEKIT_TEMPLATE_NAMES = ("alpaca", "exaone", "llama3", "mistral")


def _output_entries(raw, base, where) -> dict:
    out = {}
    for key in ("dtype", "out_dtype"):
        value = raw.get(key)
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{where}: {key}={show(value)} is not valid; choose one of 'float32', 'float16', 'bfloat16'")
    # mergekit: dtype is the compute dtype and the output's unless out_dtype; pcb_fast computes in float32
    if raw.get("out_dtype") is not None or raw.get("dtype") is not None:
        out["dtype"] = raw.get("out_dtype") or raw.get("dtype")
    template = raw.get("chat_template")
    if template is not None:
        if not isinstance(template, str):
            raise ValueError(f"{where}: chat_template must be a template name or the template's Jinja text")
        if template in MERGEKIT_TEMPLATE_NAMES:
            from .card import mergekit_template

            if mergekit_template(template) is None:
                raise ValueError(f"{where}: chat_template: {template} is a template mergekit ships, read from an "
                                 f"installed mergekit (pip install mergekit), which is missing; or give the "
                                 "template's Jinja text")
        elif template not in CHAT_TEMPLATE_NAMES and (len(template) < 20 or "{" not in template):
            raise ValueError(f"{where}: chat_template={short(template)} is neither a template name "
                             f"({', '.join(CHAT_TEMPLATE_NAMES)}) nor a Jinja template")
    return out


def _resolved_config(raw, name, base, models, shared, settings) -> dict:
    """The configuration as run: as written, with every default the merge used made explicit (so
    that running it again, with pcb-fast, gives the same merge)."""
    config = {"merge_method": name, "base_model": base,
              "models": [{"model": path, **({"parameters": params} if params else {})} for path, params in models]}
    parameters = dict(shared)
    for key, value in settings.defaults.items():  # (a model without its own value takes the shared one)
        if key not in shared and not (key == "lam" and "lambda" in shared):
            parameters[key] = value
    config["parameters"] = parameters
    for key in ("dtype", "out_dtype", "tokenizer_source", "tokenizer", "chat_template"):
        if raw.get(key) is not None:
            config[key] = raw[key]
    return config


# ---- slices: layer ranges of the models (pcb_fast.io.slices)


def _parse_slices(raw, where, compute_dtype, name, method, notes) -> dict:
    """A configuration with ``slices:``: each input position stitched from its sources' layer
    ranges, the parameters of each slice resolved for its own tensors (t restarting per slice)."""
    from .slices import Piece, StitchedModel

    if raw.get("models") is not None:
        raise ValueError(f"{where}: give models or slices, not both (as mergekit requires)")
    slices = raw["slices"]
    if not isinstance(slices, list) or not slices:
        raise ValueError(f"{where}: slices must be a list of at least one {{sources: [...]}}")
    base = raw.get("base_model")
    named = {}
    if base is not None:
        if not isinstance(base, str) or not base:
            raise ValueError(f"{where}: base_model must be the path of the base model")
        base = _local(base, f"{where}: base_model", named)
    policy = "ignored" if method == "average" else MERGEKIT_BASE.get(method, "required")
    if name == "linear" and compute_dtype not in (None, "float32"):
        method = "mergekit_linear"  # mergekit's sum and rounding (methods/mergekit_linear.py)
    shared = raw.get("parameters") or {}
    if not isinstance(shared, dict):
        raise ValueError(f"{where}: parameters must be a mapping")
    names = _parameter_names(method, name in MERGEKIT_METHODS)
    positions, per_slice, start = None, [], 0
    for s, out in enumerate(slices):
        label = f"slices[{s}]"
        if not isinstance(out, dict) or not isinstance(out.get("sources"), list) or not out["sources"]:
            raise ValueError(f"{where}: {label} must be a mapping with sources: [{{model, layer_range}}, ...]")
        extra = sorted(set(out) - {"sources", "parameters", "base_model", "residual_weight"}, key=str)
        if extra:
            raise ValueError(f"{where}: {label}.{extra[0]} is not an entry of a slice; valid: sources, parameters, "
                             "base_model")
        if out.get("residual_weight") is not None:
            raise ValueError(f"{where}: not supported: {label}.residual_weight")
        if out.get("base_model") is not None and (base is None or not isinstance(out["base_model"], str) or not _same(
                _local(out["base_model"], f"{where}: {label}.base_model", {}), base)):
            raise ValueError(f"{where}: not supported: {label}.base_model differing from the config's base_model")
        sources = [_source(src, f"{label}.sources[{i}]", where) for i, src in enumerate(out["sources"])]
        sources = [(_local(path, f"{where}: {label}.sources[{i}].model", named), *rest)
                   for i, (path, *rest) in enumerate(sources)]
        if s == 0:
            listed = [path for path, *_ in sources]  # mergekit's order of the inputs of the embedding
        lengths = {end - first for _, first, end, _ in sources}
        if len(lengths) != 1:
            raise ValueError(f"{where}: {label}: every source must span as many layers (as mergekit requires); "
                             f"got {sorted(lengths)}")
        length = lengths.pop()
        if base is not None and policy != "ignored":
            at_base = [src for src in sources if _same(src[0], base)]
            others = [src for src in sources if not _same(src[0], base)]
            if policy == "required" and len(at_base) != 1:
                raise ValueError(f"{where}: {label}: {name} needs the base model among the sources of every slice "
                                 f"(as mergekit does)")
        else:
            at_base, others = [], sources
        if positions is None:
            positions = len(others)
        elif len(others) != positions:
            raise ValueError(f"{where}: not supported: slices with different numbers of models ({label} has "
                             f"{len(others)}, slices[0] {positions})")
        slice_shared = out.get("parameters") or {}
        if not isinstance(slice_shared, dict):
            raise ValueError(f"{where}: {label}.parameters must be a mapping")
        combined = _chain(slice_shared, shared)
        models = [(path, params) for path, _, _, params in others]
        combined, models = _without_unused(combined, models, name, names, notes)
        _check_names(combined, models, method, name, names, where)
        _check_inputs(method, name, combined, models, where)
        settings = Settings(method, name in MERGEKIT_METHODS, combined, [p for _, p in models], where)
        _gta_defaults(settings, name)
        if settings.constant("scope") == "global":
            raise ValueError(f"{where}: slices are merged per tensor; parameters.scope global is not supported "
                             "with slices")
        settings.validate(len(models), "tensor", base)
        per_slice.append((start, length, settings, at_base, others))
        start += length
    config_from = base if base is not None else per_slice[0][4][0][0]
    for _, length, _, at_base, others in per_slice:
        for path, first, end, _ in at_base + others:
            _check_layers(path, end, where)

    def stitched(column) -> StitchedModel:
        return StitchedModel(tuple(Piece(src[0], src[1], src[2], begin) for (begin, _, _, at_base, others), src
                                   in zip(per_slice, column)), start, config_from)

    tasks = [stitched([entry[4][i] for entry in per_slice]) for i in range(positions)]
    if base is not None and policy == "required":
        stitched_base = stitched([entry[3][0] for entry in per_slice])
    else:
        stitched_base = tasks[0]
    kwargs = dict(base=stitched_base, models=tasks, method=method, scope="tensor", lam=1.0,
                  segment_params=SliceParams([(begin, length, settings) for begin, length, settings, _, _
                                              in per_slice]))
    if policy == "optional" and base is None:
        kwargs["with_base"] = False
    if shared.get("exclude") is not None:
        kwargs["exclude"] = shared["exclude"]
    kwargs.update(_output_entries(raw, config_from, where))
    kwargs.update(_compute_dtype(raw, method, name, compute_dtype, notes, where))
    inputs = sorted(dict.fromkeys([kwargs["base"]] + tasks), key=lambda m: listed.index(m.pieces[0].path))
    plan = _tokenizer(raw, config_from, base, list(dict.fromkeys(p for m in inputs for p in m.sources)), named, where)
    _with_vocabulary(kwargs, plan, inputs)
    kwargs["card"] = {"config": dict(raw), "source": where, "chat_template": raw.get("chat_template"),
                      "tokenizer": plan}
    _record_compute_dtype(kwargs["card"], compute_dtype)
    for note in notes:
        warnings.warn(f"pcb_fast: {note}", stacklevel=3)
    return kwargs


def _source(src, label, where):
    """(path, first layer, end layer, parameters) of a slice's source."""
    if not isinstance(src, dict) or not isinstance(src.get("model"), str) or not src["model"]:
        raise ValueError(f"{where}: {label} must be a mapping with model and layer_range")
    extra = sorted(set(src) - {"model", "layer_range", "parameters"}, key=str)
    if extra:
        raise ValueError(f"{where}: {label}.{extra[0]} is not an entry of a source; valid: model, layer_range, "
                         "parameters")
    span = src.get("layer_range")
    if (not isinstance(span, list) or len(span) != 2 or not all(isinstance(x, int) and not isinstance(x, bool)
                                                                 for x in span) or not 0 <= span[0] < span[1]):
        raise ValueError(f"{where}: {label}.layer_range={short(span)} must be [first, end] with 0 <= first < end")
    params = src.get("parameters") or {}
    if not isinstance(params, dict):
        raise ValueError(f"{where}: {label}.parameters must be a mapping")
    return src["model"], span[0], span[1], params


def _check_layers(path, end, where) -> None:
    """A source's layer range ends within its model (the model's config.json, when it says)."""
    config = Path(model_folder(path)) / "config.json"
    try:
        data = load_json(config, "config.json") if config.is_file() else {}
    except ValueError:
        data = {}
    for key in MIN_NUM_LAYERS_KEYS:
        if isinstance(data.get(key), int) and not isinstance(data[key], bool):
            if end > data[key]:
                raise ValueError(f"{where}: layer_range ends at {end} but {show_path(path)} has {data[key]} layers")
            return


def _chain(first: dict, then: dict) -> dict:
    """Settings where ``first``'s come before ``then``'s (mergekit's slice, then config, precedence):
    a filter list of ``first`` that matches no filter falls through to ``then``'s value."""
    out = dict(then)
    for key, setting in first.items():
        if key in then and _falls_through(setting):
            conditions = [setting] if isinstance(setting, dict) else list(setting)
            after = then[key]
            out[key] = conditions + ([after] if isinstance(after, dict) else list(after)
                                     if isinstance(after, list) and after and all(isinstance(c, dict) for c in after)
                                     else [{"value": after}])
        else:
            out[key] = setting
    return out


def _falls_through(setting) -> bool:
    conditions = [setting] if isinstance(setting, dict) else setting
    return (isinstance(conditions, list) and bool(conditions) and all(isinstance(c, dict) for c in conditions)
            and not any(c.get("filter") in (None, "*") for c in conditions))


class SliceParams(dict):
    """engine.run's ``segment_params`` for a merge over slices: a tensor's parameters are its
    slice's, at t = its layer's position in the slice (embeddings: the first slice's, the final
    norm and head: the last's, at t = 0, as mergekit)."""

    def __init__(self, slices):
        super().__init__({f"slices[{i}]": str(SegmentParams(settings, None)) for i, (_, _, settings)
                          in enumerate(slices)})
        self.slices = slices

    def __call__(self, key: str) -> dict:
        from .slices import PRE_WEIGHTS, layer_of

        layer = layer_of(key)
        if layer is None:
            settings = self.slices[0 if any(w in key for w in PRE_WEIGHTS) else -1][2]
            return settings.resolve(key, 0.0)
        for begin, length, settings in self.slices:
            if begin <= layer[1] < begin + length:
                return settings.resolve(key, (layer[1] - begin) / (length - 1) if length > 1 else 1.0)
        raise ValueError(f"key {show(key)}: layer {layer[1]} is outside the slices")

    def take(self, keep) -> "SliceParams":
        return SliceParams([(begin, length, settings.take(keep)) for begin, length, settings in self.slices])

    def __str__(self) -> str:
        return f"per slice ({len(self.slices)} slices)"

    __repr__ = __str__
