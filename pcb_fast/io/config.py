"""Merge configurations in mergekit's YAML format (docs/design.md 7.3): reading the file.

The format and its meaning (mergekit 0.1.5's, for the methods both tools have) are
pcb_fast/io/mergekit_config.py; docs/configuration.md lists every key.

    merge_method: ties
    base_model: path/to/base
    models:
      - model: path/to/finetune_a
        parameters: {weight: 1.0, density: 0.5}
      - model: path/to/finetune_b
        parameters: {weight: [0.5, 1.0], density: 0.3}   # a gradient over the layers
    parameters:
      normalize: true
      lambda: 1.0
    dtype: bfloat16

Everything is checked before any model file is opened; each problem is one ValueError that names
the entry (e.g. ``models[1].parameters.density``) and what is valid.
"""

from __future__ import annotations

from pathlib import Path

from .safetensors import NotAFileError, read_regular, show_path

# mergekit's names of pcb_fast's methods, also accepted by --method (with pcb_fast's defaults there)
ALIASES = {"linear": "average", "dare_linear": "dare"}
MAX_CONFIG = 16 << 20  # bytes of a configuration file


MAX_NODES = 100_000  # values of a configuration once YAML's aliases are expanded (a real one has hundreds)


def load_config(path, compute_dtype: str | None = None) -> dict:
    """Read a YAML merge configuration into keyword arguments of ``merge_checkpoints``.
    ``compute_dtype``: the arithmetic's dtype asked for (pcb_fast.io.mergekit_config.parse)."""
    import yaml

    path = Path(path)
    try:
        text = read_regular(path, MAX_CONFIG).decode("utf-8")
    except NotAFileError as e:
        raise ValueError(f"config: {e}") from None
    except UnicodeDecodeError:
        raise ValueError(f"config {show_path(path)}: not UTF-8 text") from None
    loader = yaml.SafeLoader(text)
    try:
        nodes = []
        while loader.check_node():  # every document (mergekit-multimerge's files hold several)
            node = loader.get_node()
            if node is not None:
                nodes.append(node)
        for node in nodes:
            if _expanded_size(node, {}) > MAX_NODES:
                raise ValueError(f"config {show_path(path)}: its YAML aliases expand to more than {MAX_NODES} "
                                 "values (an alias bomb?); write the values out")
        documents = [d for d in (loader.construct_document(node) for node in nodes) if d is not None]
    except yaml.YAMLError as e:
        raise ValueError(f"config {show_path(path)}: not valid YAML ({str(e).splitlines()[0][:200]})") from None
    except RecursionError:
        raise ValueError(f"config {show_path(path)}: not a merge configuration (nested too deeply)") from None
    finally:
        loader.dispose()
    if len(documents) > 1:
        names = [d.get("name") for d in documents if isinstance(d, dict)]
        raise ValueError(f"config {show_path(path)}: not supported: {len(documents)} YAML documents (a "
                         f"mergekit-multimerge configuration{': ' + ', '.join(map(str, names)) if all(names) else ''}); "
                         "pcb-fast runs one merge per file: put each document in its own file and run them in order, "
                         "each later one naming the earlier outputs' folders")
    return parse_config(documents[0] if documents else None, str(path), compute_dtype)


def _expanded_size(node, sizes: dict) -> int:
    """The number of values under a composed YAML ``node`` with every alias expanded, computed once
    per node (an alias is the same node object), so a "billion laughs" costs no more than its text."""
    if id(node) in sizes:
        return sizes[id(node)]
    sizes[id(node)] = MAX_NODES + 1  # a node inside itself (a recursive alias) never ends
    total = 1
    if isinstance(node.value, list):
        for item in node.value:
            for child in item if isinstance(item, tuple) else (item,):
                total += _expanded_size(child, sizes)
                if total > MAX_NODES:
                    break
    sizes[id(node)] = min(total, MAX_NODES + 1)
    return sizes[id(node)]


def parse_config(raw, where: str = "config", compute_dtype: str | None = None) -> dict:
    """Validate a configuration mapping (mergekit's format, pcb_fast.io.mergekit_config) into merge
    keyword arguments."""
    from .mergekit_config import parse

    return parse(raw, where, compute_dtype)
