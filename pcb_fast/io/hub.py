"""Model names on the Hugging Face Hub (``org/name``, ``org/name@revision``), resolved to local
folders through ``huggingface_hub`` and its shared cache (docs/design.md 7.1).

Only the files a merge reads are fetched: the safetensors weights and their index, config.json and
the tokenizer and generation files (for a LoRA adapter, its config and weights).
``HF_HUB_OFFLINE=1`` (or no network) uses the cache alone; a model missing from it is an error that
names it and says how to fetch it. Downloads show huggingface_hub's progress bars on stderr.
"""

from __future__ import annotations

import os
import re

from .checkpoints import SIDE_FILES
from ..core.checks import short

REFERENCE = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?")
PATTERNS = ["*.safetensors", "*.safetensors.index.json", *SIDE_FILES]
ADAPTER_PATTERNS = ["adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"]  # a PEFT adapter's


def is_hub_reference(ref) -> bool:
    """Whether ``ref`` names a Hub model (org/name[@revision]) rather than a local path."""
    return (isinstance(ref, str) and not os.path.exists(ref) and REFERENCE.fullmatch(ref) is not None
            and ".." not in ref.split("@")[0])


def resolve(ref: str, label: str, patterns=PATTERNS) -> str:
    """The local folder of the Hub model ``ref`` (downloaded into the cache if needed: the files
    ``patterns`` match; a LoRA adapter's are ADAPTER_PATTERNS); ``label`` names the entry in errors."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    repo, _, revision = ref.partition("@")
    fetch = f"hf download {repo}" + (f" --revision {revision}" if revision else "")
    try:
        return snapshot_download(repo, revision=revision or None, allow_patterns=patterns)
    except LocalEntryNotFoundError:
        raise ValueError(f"{label}: {short(ref)} is not in the Hugging Face cache and the Hub cannot be reached"
                         f"{' (HF_HUB_OFFLINE is set)' if _offline() else ''}; fetch it first with `{fetch}` "
                         "(online), or give a local path") from None
    except RevisionNotFoundError:
        raise ValueError(f"{label}: {short(repo)} has no revision {short(revision)} on the Hugging Face Hub") from None
    except RepositoryNotFoundError:
        raise ValueError(f"{label}: {short(repo)} is not a model on the Hugging Face Hub (or it is private or gated: "
                         "log in with `hf auth login`), nor a local path") from None
    except HfHubHTTPError as e:
        raise ValueError(f"{label}: {short(ref)} could not be fetched from the Hugging Face Hub ({str(e).splitlines()[0]})"
                         ) from None


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def local(ref, label: str):
    """``ref`` itself, the local folder of the Hub model it names, or for mergekit's
    ``<model>+<adapter>`` the model with that LoRA adapter (pcb_fast.io.lora_models)."""
    from .lora_models import lora_reference

    model = lora_reference(ref, label)
    if model is not None:
        return model
    return resolve(ref, label) if is_hub_reference(ref) else ref
