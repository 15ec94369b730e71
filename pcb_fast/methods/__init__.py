"""Merge methods on the streaming engine: name -> (merge function, accepted parameters).

A merge function is ``fn(source, sink, *, lambdas=None, block_width=..., **params)``; it calls
``sink(segment, lo, hi, tau_m_block)`` for every block and returns the entries kept per task.
"""

from . import linear, pcb, ties

METHODS = {
    "pcb": (pcb.merge_pcb, pcb.PARAMS),
    "average": (linear.merge_average, ()),
    "task_arithmetic": (linear.merge_task_arithmetic, ()),
    "ties": (ties.merge_ties, ("density", "sign_ties", "topk")),
    "dare": (linear.merge_dare, ("p", "seed")),
    "dare_ties": (ties.merge_dare_ties, ("p", "seed", "sign_ties")),
    "breadcrumbs": (linear.merge_breadcrumbs, ("gamma", "beta")),
}
