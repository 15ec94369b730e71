"""The oracles: every method written literally (sorts, kthvalue, whole [n, D] matrices).

Imported by the tests, by the benchmarks (as "the authors' formulation") and by
``backend="reference"``; never by the engine. It imports nothing from pcb_fast's engine
(core, methods, cpu, gpu): tests/test_layout.py checks it.
"""

from .baselines import METHODS as BASELINES
from .pcb import paper_scores, pcb_official, pcb_paper

__all__ = ["BASELINES", "paper_scores", "pcb_official", "pcb_paper"]
