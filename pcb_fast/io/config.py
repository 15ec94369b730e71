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

from .safetensors import NotAFileError, read_regular

# mergekit's names of pcb_fast's methods, also accepted by --method (with pcb_fast's defaults there)
ALIASES = {"linear": "average", "dare_linear": "dare"}
MAX_CONFIG = 16 << 20  # bytes of a configuration file


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
    """Validate a configuration mapping (mergekit's format, pcb_fast.io.mergekit_config) into merge
    keyword arguments."""
    from .mergekit_config import parse

    return parse(raw, where)
