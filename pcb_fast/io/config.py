"""Merge configurations in a subset of mergekit's YAML format (docs/design.md 7.3).

    merge_method: ties            # pcb, average (alias linear), task_arithmetic, ties, dare
                                  # (alias dare_linear), dare_ties, breadcrumbs
    base_model: path/to/base
    models:
      - model: path/to/finetune_a
        parameters: {weight: 1.0} # this model's lambda_i (default 1)
      - model: path/to/finetune_b
    parameters:                   # the method's parameters, plus lam, scope and exclude
      density: 0.2
      lam: 1.0
    dtype: bfloat16               # optional: output dtype of floating tensors

Everything is checked before any model file is opened; each problem is one ValueError that names
the entry (e.g. ``models[1].parameters.density``) and what is valid.
"""

from __future__ import annotations

from pathlib import Path

from ..methods import METHODS
from .safetensors import NotAFileError, read_regular

ALIASES = {"linear": "average", "dare_linear": "dare"}
TOP_LEVEL = ("merge_method", "base_model", "models", "parameters", "dtype")
MAX_CONFIG = 16 << 20  # bytes of a configuration file
GENERAL_PARAMETERS = ("lam", "scope", "exclude")


def load_config(path) -> dict:
    """Read a YAML merge configuration into keyword arguments of ``merge_checkpoints``."""
    import yaml

    path = Path(path)
    try:
        text = read_regular(path, MAX_CONFIG).decode("utf-8")
    except NotAFileError as e:
        raise ValueError(f"config: {e}") from None
    except UnicodeDecodeError:
        raise ValueError(f"config {path}: not UTF-8 text") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ValueError(f"config {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    except RecursionError:
        raise ValueError(f"config {path}: not a merge configuration (nested too deeply)") from None
    return parse_config(raw, str(path))


def parse_config(raw, where: str = "config") -> dict:
    """Validate a configuration mapping (see the module docstring) into merge keyword arguments."""
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected a mapping with {', '.join(TOP_LEVEL)}")
    unknown = sorted(set(raw) - set(TOP_LEVEL), key=str)
    if unknown:
        raise ValueError(f"{where}: unknown entry {unknown[0]!r}; valid: {', '.join(TOP_LEVEL)}")
    method = raw.get("merge_method")
    if method is None:
        raise ValueError(f"{where}: merge_method is missing; choose one of {', '.join(METHODS)}")
    method = ALIASES.get(method, method) if isinstance(method, str) else method
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"{where}: merge_method={raw['merge_method']!r} is not valid; choose one of "
                         f"{', '.join(list(METHODS) + list(ALIASES))}")
    base = raw.get("base_model")
    if not isinstance(base, str) or not base:
        raise ValueError(f"{where}: base_model must be the path of the base model")
    entries = raw.get("models")
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{where}: models must be a list of at least one entry with a 'model' path")
    models, lambdas = [], []
    for i, entry in enumerate(entries):
        if isinstance(entry, str):
            entry = {"model": entry}
        if not isinstance(entry, dict) or not isinstance(entry.get("model"), str):
            raise ValueError(f"{where}: models[{i}] must be a mapping with a 'model' path")
        extra = sorted(set(entry) - {"model", "parameters"}, key=str)
        if extra:
            raise ValueError(f"{where}: models[{i}].{extra[0]} is not supported; valid: model, parameters")
        params = entry.get("parameters") or {}
        if not isinstance(params, dict):
            raise ValueError(f"{where}: models[{i}].parameters must be a mapping")
        for name in params:
            if name != "weight":
                raise ValueError(f"{where}: models[{i}].parameters.{name} is not supported per model; valid: weight "
                                 "(the model's lambda); set method parameters under the top-level parameters")
        models.append(entry["model"])
        lambdas.append(params.get("weight", 1.0))
    params = raw.get("parameters") or {}
    if not isinstance(params, dict):
        raise ValueError(f"{where}: parameters must be a mapping")
    accepted = METHODS[method][1]
    for name in params:
        if name not in accepted and name not in GENERAL_PARAMETERS:
            raise ValueError(f"{where}: parameters.{name} is not a parameter of {method}; valid: "
                             f"{', '.join(list(accepted) + list(GENERAL_PARAMETERS))}")
    exclude = params.get("exclude")
    if exclude is not None and not isinstance(exclude, str) and not (
            isinstance(exclude, list) and all(isinstance(p, str) for p in exclude)):
        raise ValueError(f"{where}: parameters.exclude={exclude!r} must be a regular expression or a list of them")
    kwargs = dict(params, base=base, models=models, method=method)
    if any(w != 1.0 for w in lambdas):
        kwargs["lambdas"] = lambdas
    dtype = raw.get("dtype")
    if dtype is not None:
        if not isinstance(dtype, str):
            raise ValueError(f"{where}: dtype={dtype!r} is not valid; choose one of 'float32', 'float16', 'bfloat16'")
        kwargs["dtype"] = dtype
    return kwargs
