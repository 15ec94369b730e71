"""Merge methods on the streaming engine: the one registry of their specs.

Each method's module holds its math and its :class:`~pcb_fast.methods.spec.MethodSpec`; ``SPECS``
lists them. A spec's ``merge`` is ``fn(source, sink, *, lambdas=None, block_width=..., **params)``;
it calls ``sink(segment, lo, hi, tau_m_block)`` for every block and returns the entries kept per task.
"""

from ..core import checks
from . import (arcee_fusion, della, gta, karcher, linear, mergekit_linear, model_stock, multislerp, nearswap, nuslerp,
               passthrough, pcb, ram, sce, slerp, ties)
from .spec import MethodSpec, Param

SPECS: dict[str, MethodSpec] = {s.name: s for s in (
    pcb.SPEC, linear.AVERAGE, linear.TASK_ARITHMETIC, ties.TIES, linear.DARE, ties.DARE_TIES, linear.BREADCRUMBS,
    ties.BREADCRUMBS_TIES, slerp.SPEC, nuslerp.SPEC, multislerp.SPEC, karcher.SPEC, model_stock.SPEC, nearswap.SPEC,
    sce.SPEC, arcee_fusion.SPEC, della.DELLA, della.DELLA_LINEAR, ram.RAM, ram.RAMPLUS_TL, passthrough.SPEC,
    gta.SPEC, mergekit_linear.SPEC,
)}


def spec_of(method) -> MethodSpec:
    """The spec of ``method`` (a ValueError listing the valid names for an unknown one)."""
    if not isinstance(method, str) or method not in SPECS:
        raise ValueError(f"method={checks.short(method)} is not valid; choose one of {', '.join(map(repr, SPECS))}")
    return SPECS[method]


def check_method_params(method: str, n: int, lam, lambdas, scope: str, params: dict) -> None:
    """Validate a method and its parameters for ``n`` models from the method's spec, without merging
    anything (the checks, and so the messages, a merge makes); every entry point calls it before it
    reads any data."""
    checks.check_n_models(n)
    spec = spec_of(method)
    checks.check_lam(lam)
    checks.check_choice("scope", scope, checks.SCOPE_CHOICES)
    checks.check_lambdas(lambdas, n)
    spec.validate(params, n)
    if params.get("segment_params") is not None and scope != "tensor":
        raise ValueError(f"parameters that vary by tensor ({params['segment_params']}) need scope='tensor', "
                         f"but scope={checks.short(scope)}")


def scope_matters(method: str, params: dict) -> bool:
    """Whether scope="tensor" can give other values than scope="global": not for the plain weighted
    sums with the same parameters for every tensor, which use no statistics of the task vectors."""
    return SPECS[method].uses_statistics or "segment_params" in params


def flag_params() -> dict[str, tuple[Param, list[str]]]:
    """Every parameter offered as a CLI flag -> (its declaration, the methods that take it)."""
    out: dict[str, tuple[Param, list[str]]] = {}
    for spec in SPECS.values():
        for p in spec.params:
            if p.flag:
                out.setdefault(p.name, (p, []))[1].append(spec.name)
    return out


def flag_help(name: str, methods) -> str:
    """The help of the flag of parameter ``name`` for ``methods``: each meaning the methods give it,
    with its default, after the methods that give it that meaning."""
    meanings: dict[tuple, list[str]] = {}
    for method in methods:
        param = next(p for p in SPECS[method].params if p.name == name)
        meanings.setdefault((param.help, param.required, param.default), []).append(method)
    return "; ".join(f"{', '.join(takers)}: {text} " + ("(required)" if required else f"(default {default})")
                     for (text, required, default), takers in meanings.items())


__all__ = ["SPECS", "MethodSpec", "Param", "spec_of", "check_method_params", "scope_matters", "flag_params",
           "flag_help"]
