"""What an output folder records about the merge that made it, as mergekit's output folders do:

- ``mergekit_config.yml``: the configuration as run, in mergekit's YAML format, every default the
  merge used written out (a YAML config as the user wrote it plus those defaults, or the
  equivalent of the flags), so that ``pcb-fast merge --config <out>/mergekit_config.yml`` runs
  the same merge again;
- ``README.md``: a short model card (Hugging Face front matter, the method with its paper, the
  base, the models, the parameters, the pcb_fast version, the configuration);
- with ``chat_template`` in the config: the template in ``tokenizer_config.json`` and in
  ``chat_template.jinja`` (where transformers 5, and so mergekit, saves it; and in
  ``chat_template.json`` where the base folder has one), so that every loader reads the same
  template.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections import Counter
from pathlib import Path

from .. import __version__
from ..methods import SPECS
from .checkpoints import load_json

# a method's name, pcb_fast's or mergekit's -> (its title, its paper)
METHOD_NAMES = {name: (spec.summary, spec.url) for spec in SPECS.values()
                for name in (spec.name, spec.mergekit) if name is not None}
# The ChatML template (one of the names mergekit's chat_template accepts)
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n'}}{% endfor %}\n{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
          "{% endif %}\n")

CARD = """---
{front}---
# {name}

This is a merge of pre-trained models created with pcb_fast {version}.

## Merge Details
### Merge Method

This model was merged using the {method} merge method using {base} as a base.

Parameters: {parameters}.

### Models Merged

The following models were included in the merge:
{models}

### Configuration

The following YAML configuration was used to produce this model (`mergekit_config.yml`; run it
again with `pcb-fast merge --config mergekit_config.yml --out <folder>`):

```yaml
{config}```
"""


def _name(source) -> str:
    if isinstance(source, dict):
        return "(an in-memory state dict)"
    return getattr(source, "written", None) or str(source)  # (a model with a LoRA adapter: its reference)


def flags_config(*, base, models, method, lam, lambdas, scope, exclude, dtype, params) -> dict:
    """The configuration, in the YAML format, of a merge given as arguments (flags or the API)."""
    entries = []
    for i, model in enumerate(models):
        entry = {"model": _name(model)}
        if lambdas is not None:
            entry["parameters"] = {"weight": float(lambdas[i])}
        entries.append(entry)
    # every parameter, defaults included: in the YAML, mergekit's method names default to mergekit's rules
    parameters = dict(SPECS[method].defaults)
    parameters.update((k, v) for k, v in sorted(params.items()) if k != "segment_params")
    if not SPECS[method].weight_space:  # (the weight-space methods take no lam)
        parameters["lam"] = float(lam)
    parameters["scope"] = scope
    if exclude:
        parameters["exclude"] = list(exclude)
    compute_dtype = parameters.pop("compute_dtype", "float32")  # (a YAML entry of its own: config.compute_dtype)
    config = {"merge_method": method, "base_model": _name(base), "models": entries, "parameters": parameters}
    if dtype is not None:
        config["dtype"] = dtype
    if compute_dtype != "float32":
        config["compute_dtype"] = compute_dtype
    return config


def _hub_id(path: str) -> bool:
    """A Hugging Face repository id rather than a local path (the card's front matter lists those)."""
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", path)) and not os.path.exists(path)


def _yaml(config: dict) -> str:
    import yaml

    return yaml.safe_dump(config, sort_keys=False, default_flow_style=None, allow_unicode=True)


def _hub_name(path) -> str | None:
    """The Hugging Face id of a model: the path itself when it is one, else the ``_name_or_path`` of
    a local folder's config.json when that is one; None otherwise."""
    if not isinstance(path, str):
        return None
    repo = path.split("@")[0]  # (org/name@revision: the repository's id)
    if _hub_id(repo) and not os.path.exists(path):
        return repo
    try:
        recorded = json.loads((Path(path) / "config.json").read_text()).get("_name_or_path")
    except (OSError, ValueError, AttributeError):
        return None
    return recorded if isinstance(recorded, str) and _hub_id(recorded) else None


def _models_of(config: dict) -> list:
    """The models a configuration names, in order (models, or the sources of its slices)."""
    models = [m["model"] if isinstance(m, dict) else str(m) for m in config.get("models") or []]
    for out in config.get("slices") or []:
        models += [src["model"] for src in out.get("sources", []) if isinstance(src, dict) and "model" in src]
    return list(dict.fromkeys(models))


def absolute_paths(config: dict) -> dict:
    """``config`` with its local model paths made absolute, so that the recorded configuration runs
    from any folder (Hub ids and state dicts stay as they are)."""
    def absolute(path):
        if isinstance(path, str) and "+" in path and not os.path.exists(path):  # mergekit's model+lora
            return "+".join(absolute(part) for part in path.split("+"))
        return os.path.abspath(path) if isinstance(path, str) and not _hub_id(path) and os.path.exists(path) else path

    config = dict(config)
    for key in ("base_model", "tokenizer_source"):
        if key in config:
            config[key] = absolute(config[key])
    if isinstance(config.get("tokenizer"), dict):  # its source and its tokens' sources
        block = dict(config["tokenizer"])
        if "source" in block:
            block["source"] = absolute(block["source"])
        if isinstance(block.get("tokens"), dict):
            block["tokens"] = {t: _with_absolute_source(e, absolute) for t, e in block["tokens"].items()}
        config["tokenizer"] = block
    if isinstance(config.get("models"), list):
        config["models"] = [dict(m, model=absolute(m["model"])) if isinstance(m, dict) and "model" in m
                            else absolute(m) for m in config["models"]]
    if isinstance(config.get("slices"), list):
        config["slices"] = [dict(out, sources=[dict(src, model=absolute(src["model"])) if isinstance(src, dict)
                                               and "model" in src else src for src in out.get("sources", [])])
                            if isinstance(out, dict) else out for out in config["slices"]]
    return config


def _with_absolute_source(entry, absolute):
    """A ``tokens:`` entry with its source's model path made absolute."""
    if not isinstance(entry, dict):
        return entry
    source = entry.get("source")
    if isinstance(source, str):
        return dict(entry, source=absolute(source))
    if isinstance(source, dict) and "model" in source:
        return dict(entry, source=dict(source, model=absolute(source["model"])))
    return entry


def card_text(config: dict, name: str) -> str:
    """The README.md model card of a merge made by ``config``."""
    method = config["merge_method"]
    pretty, url = METHOD_NAMES.get(method, (method, None))
    models = _models_of(config)
    hub = list(dict.fromkeys(h for h in map(_hub_name, [config.get("base_model")] + models) if h is not None))
    front = _yaml({"base_model": hub, "library_name": "transformers", "tags": ["merge", "pcb-fast"]})
    parameters = ", ".join(f"{k}: {json.dumps(v)}" for k, v in (config.get("parameters") or {}).items()) or "defaults"
    return CARD.format(front=front, name=name, version=__version__, method=f"[{pretty}]({url})" if url else pretty,
                       base=config.get("base_model"), parameters=parameters,
                       models="\n".join(f"* {m}" for m in models), config=_yaml(config))


def write_card(folder, name: str, *, base, models, method, lam, lambdas, scope, exclude, dtype, params,
               card=None) -> None:
    """Write mergekit_config.yml and README.md into the output ``folder`` (and the chat template,
    when ``card`` asks for one); ``name``: the model's name (the output folder's). ``card``: what the
    YAML config parser recorded ("config": the resolved configuration, "chat_template"), or None
    for a merge given as arguments."""
    folder = Path(folder)
    card = card or {}
    config = absolute_paths(card.get("config") or flags_config(
        base=base, models=models, method=method, lam=lam, lambdas=lambdas, scope=scope, exclude=exclude, dtype=dtype,
        params=params))
    header = (f"# The configuration of this merge as pcb_fast {__version__} ran it, every default written out;\n"
              f"# run it again with: pcb-fast merge --config mergekit_config.yml --out <folder>\n")
    (folder / "mergekit_config.yml").write_text(header + _yaml(config), encoding="utf-8")
    (folder / "README.md").write_text(card_text(config, name), encoding="utf-8")
    template = card.get("chat_template")
    inputs = [p for source in [base] + list(models) for p in getattr(source, "paths", [source])]
    if card.get("tokenizer") is not None:  # the tokenizer a tokenizer source built (io/vocabulary.py), as mergekit saves it
        text = None if template is None else chat_template_text(template, inputs)
        if template == "auto" and text is None:
            warnings.warn("pcb_fast: chat_template: auto, but no input model has a chat template; none was set",
                          stacklevel=2)
        card["tokenizer"].save(folder, text)
    elif template is not None:
        set_chat_template(folder, template, inputs)


def _template_of(folder) -> str | None:
    """The chat template a model folder's tokenizer files hold, if any."""
    if isinstance(folder, dict) or not os.path.isdir(folder):
        return None
    folder = Path(folder)
    try:
        if (folder / "chat_template.jinja").is_file():
            return (folder / "chat_template.jinja").read_text(encoding="utf-8").strip() or None
        for name in ("tokenizer_config.json", "chat_template.json"):
            if (folder / name).is_file():
                template = load_json(folder / name, name).get("chat_template")
                if isinstance(template, dict):
                    template = template.get("default")
                if isinstance(template, str) and template.strip():
                    return template.strip()
    except (OSError, ValueError, AttributeError):
        return None
    return None


def chat_template_text(template: str, inputs) -> str | None:
    """The template's text: "chatml", "auto" (the template most of the inputs have, as mergekit
    picks it; None if none has one) or the Jinja text itself."""
    if template == "chatml":
        return CHATML
    shipped = mergekit_template(template)
    if shipped is not None:
        return shipped
    if template == "auto":
        found = [t for t in (_template_of(source) for source in inputs) if t]
        return Counter(found).most_common(1)[0][0] if found else None
    return template


def mergekit_template(name: str) -> str | None:
    """The text of a chat template mergekit ships under ``name`` (alpaca, llama3, ...), read from the
    installed mergekit package, or None (not a name it ships, or mergekit not installed)."""
    if not name.isidentifier():
        return None
    try:
        import importlib.resources

        path = importlib.resources.files("mergekit._data.chat_templates").joinpath(name + ".jinja")
        return path.read_text(encoding="utf-8") if path.is_file() else None
    except (ImportError, OSError):
        return None


def set_chat_template(folder: Path, template: str, inputs) -> None:
    """Put the chat template into the output's tokenizer files (tokenizer_config.json,
    chat_template.jinja, and the chat_template.json the base folder had)."""
    text = chat_template_text(template, inputs)
    if text is None:
        warnings.warn("pcb_fast: chat_template: auto, but no input model has a chat template; none was set",
                      stacklevel=3)
        return
    config = folder / "tokenizer_config.json"
    if not config.is_file():
        warnings.warn("pcb_fast: chat_template: the base model has no tokenizer_config.json, so the merge has no "
                      "tokenizer to hold it; the chat template was not saved", stacklevel=3)
        return
    data = load_json(config, "the base model's tokenizer_config.json")  # a JSON object: checked before the merge
    data["chat_template"] = text
    config.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    # where transformers 5 saves it (and mergekit with it); loaders prefer this file to the field above
    (folder / "chat_template.jinja").write_text(text, encoding="utf-8")
    if (folder / "chat_template.json").is_file():
        (folder / "chat_template.json").write_text(json.dumps({"chat_template": text}, indent=2) + "\n",
                                                   encoding="utf-8")
