"""pcb_fast: fast, faithful PCB-Merging (NeurIPS 2024) and its baselines."""

__version__ = "0.1.0"

from .api import merge, pcb_merge, pcb_reference  # noqa: E402
from .drivers.files import merge_checkpoints  # noqa: E402
from .drivers.adapters import merge_adapters  # noqa: E402
from .modules import merge_modules  # noqa: E402
from .search import ContributionCache, grid_search, search_lambdas  # noqa: E402

__all__ = ["ContributionCache", "grid_search", "merge", "merge_adapters", "merge_checkpoints", "merge_modules",
           "pcb_merge", "pcb_reference", "search_lambdas", "__version__"]
