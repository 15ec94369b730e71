"""pcb_fast: fast, faithful PCB-Merging (NeurIPS 2024) and its baselines."""

__version__ = "0.1.0"

from .api import merge, pcb_merge  # noqa: E402
from .disk_merge import merge_checkpoints  # noqa: E402
from .reference import pcb_reference  # noqa: E402

__all__ = ["merge", "merge_checkpoints", "pcb_merge", "pcb_reference", "__version__"]
