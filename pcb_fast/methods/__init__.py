"""Merge methods on the streaming engine: name -> (merge function, accepted parameters).

A merge function is ``fn(source, sink, *, lambdas=None, block_width=..., **params)``; it calls
``sink(segment, lo, hi, tau_m_block)`` for every block and returns the entries kept per task.
"""

import inspect

from . import linear, pcb, ties

METHODS = {
    "pcb": (pcb.merge_pcb, pcb.PARAMS),
    "average": (linear.merge_average, ()),
    "task_arithmetic": (linear.merge_task_arithmetic, ("normalize",)),
    "ties": (ties.merge_ties, ("density", "sign_ties", "topk", "normalize", "min_keep")),
    "dare": (linear.merge_dare, ("p", "seed", "rescale", "normalize")),
    "dare_ties": (ties.merge_dare_ties, ("p", "seed", "sign_ties", "rescale", "normalize")),
    "breadcrumbs": (linear.merge_breadcrumbs, ("gamma", "beta", "band", "normalize")),
    "breadcrumbs_ties": (ties.merge_breadcrumbs_ties, ("gamma", "beta", "band", "sign_ties", "normalize")),
}

# mergekit's options, which only the torch engine and the reference implement: the other paths
# (triton kernels, the coefficient search) take them only at the method's default value.
ENGINE_ONLY = ("normalize", "min_keep", "rescale", "band")


def single_pass(method: str, params: dict) -> bool:
    """Whether ``method`` with ``params`` reads its inputs once (nothing is gained by keeping the task
    vectors in memory for a later pass): the weighted sums, DARE without mergekit's L1 rescale, and
    Model Breadcrumbs."""
    if method in ("average", "task_arithmetic", "breadcrumbs"):
        return True
    return method == "dare" and params.get("rescale", "inverse") != "l1"


def scope_matters(method: str, params: dict) -> bool:
    """Whether scope="tensor" can give other values than scope="global": not for the plain weighted
    sums (average, task arithmetic) with the same parameters for every tensor, which use no
    statistics of the task vectors."""
    return method not in ("average", "task_arithmetic") or "segment_params" in params


def engine_only_option(method: str, params: dict) -> str | None:
    """The first parameter in ``params`` that only the torch engine and the reference implement: one
    of ENGINE_ONLY away from the method's default, a value per task (a list), or a method only
    they have; None when there is none."""
    if method == "breadcrumbs_ties":
        return "method 'breadcrumbs_ties'"
    defaults = inspect.signature(METHODS[method][0]).parameters
    for name, value in sorted(params.items()):
        if isinstance(value, (list, tuple)):
            return f"{name} per model"
        if name in ENGINE_ONLY and name in defaults and value != defaults[name].default:
            return f"{name}={value!r}"
    return None
