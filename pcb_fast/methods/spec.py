"""What a merge method declares about itself: one :class:`MethodSpec` per method.

Validation, the CLI's choices and flags, the model card, the mergekit mapping and the dispatch all
read these declarations (pcb_fast.methods.SPECS); none keeps a table of its own. A spec lives in
the module of its method's math, so adding a method touches its spec, its math and its tests
(docs/design.md 5).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from ..core import checks


@dataclass(frozen=True)
class Param:
    """One parameter of a method.

    ``check(value)`` validates one value and returns it normalised (a ValueError names the parameter,
    the value and the valid range); ``per_model`` parameters also take a list with one value per
    model. ``engine_only``: options of mergekit's that only the torch engine and the reference
    implement (the triton kernels and the coefficient search take them only at their default).
    ``kind``: how a YAML value is read ("number", "int", "bool", "choice"). ``help``: the CLI's text.
    """

    name: str
    default: Any
    check: Callable[[Any], Any]
    help: str
    per_model: bool = False
    engine_only: bool = False
    kind: str = "number"
    flag: bool = True  # a CLI flag (--name with dashes)
    required: bool = False  # no default: a merge needs a value (``default`` None is its placeholder)

    def validate(self, value, n: int):
        """``value`` checked, per model where allowed (a list of n values)."""
        if self.per_model:
            return checks.check_per_task(self.name, value, n, self.check)
        if isinstance(value, (list, tuple)):
            raise ValueError(f"{self.name}={_short(value)} must be one value (it is shared by every model)")
        return self.check(value)


@dataclass(frozen=True)
class MethodSpec:
    """A merge method: its name, parameters, paper, where it runs and what mergekit calls it.

    ``merge(source, sink, options, *, lambdas, block_width, **params)`` runs it on the streaming engine
    (``options``: the run's settings, core/options.py).
    ``check_together(params, n)``: constraints between parameters (after each is checked alone).
    ``backends``: the backends that run it. ``loops``: its fused CPU loops, "c" (pcb_fast.cpu.native,
    the eager engine's bits; with its default parameters, pcb_fast.cpu.fused.has_c_loops says which
    options) and/or "compiled" (torch.compile). ``mergekit``: mergekit 0.1.5's name of
    this method and, in ``mergekit_defaults``, the parameter values that give mergekit's semantics
    under that name. ``single_pass(params)``: the method reads its inputs once with these
    parameters (nothing gained by caching task vectors for a later pass). ``uses_statistics``:
    scope="tensor" can differ from scope="global" (False only for plain weighted sums).
    """

    name: str
    merge: Callable
    summary: str
    citation: str
    url: str | None
    params: tuple[Param, ...] = ()
    check_together: Callable[[dict, int], None] | None = None
    backends: tuple[str, ...] = ("torch", "reference")
    loops: tuple[str, ...] = ()
    mergekit: str | None = None
    mergekit_defaults: dict = field(default_factory=dict)
    searchable: bool = False
    single_pass: Callable[[dict], bool] = staticmethod(lambda params: False)
    uses_statistics: bool = True
    # merges the weights themselves, a whole tensor at a time (pcb_fast.methods.weight_space): its
    # result is written as is (the sink's ``weights``), with no theta_pre + lam * tau_m; no lam, no lambdas
    weight_space: bool = False
    # an engine form that configs reach through another name (mergekit's compute dtype), not a CLI choice
    internal: bool = False
    # copies(params, key): the merged tensor ``key`` is the first model's values as they are, so a
    # merge of files may copy it (checked for finite values) instead of running the method on it
    copies: Callable[[dict, str], bool] | None = None
    # packable(params): with these parameters and scope="global", no value depends on which key an
    # entry belongs to or where a block begins (no per-key random streams, rows or per-block sums),
    # so runs of small keys may share a block (core.sources.pack_segments)
    packable: Callable[[dict], bool] = staticmethod(lambda params: False)
    # merge_tensors(source, sink, options, **params): scope="tensor" on a pack of small whole tensors
    # at once, each with its own statistics, the values of ``merge`` on each alone (core.engine.run)
    merge_tensors: Callable | None = None

    @property
    def param_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params)

    @property
    def defaults(self) -> dict:
        return {p.name: p.default for p in self.params}

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)

    def check_names(self, params) -> None:
        """A ValueError for the first parameter this method does not take."""
        unknown = sorted(set(params) - set(self.param_names) - {"segment_params"})
        if unknown:
            valid = ", ".join(self.param_names) or "none (it takes only lam and lambdas)"
            raise ValueError(f"method {checks.short(self.name)} has no parameter {checks.short(unknown[0])}; valid: {valid}")

    def validate(self, params: dict, n: int) -> dict:
        """``params`` checked for ``n`` models, without touching data (the merge's own messages):
        the names, each value, then the constraints between them. Returns them normalised."""
        self.check_names(params)
        for p in self.params:  # (per tensor, segment_params gives it: the merge checks each tensor's)
            if p.required and params.get(p.name) is None and "segment_params" not in params:
                raise ValueError(f"method {checks.short(self.name)} needs the parameter {checks.short(p.name)} ({p.help})")
        out = {name: self.param(name).validate(value, n) for name, value in params.items()
               if name != "segment_params"}
        if self.check_together is not None:
            self.check_together(dict(self.defaults, **out), n)
        return out

    def engine_only_option(self, params: dict) -> str | None:
        """The first parameter in ``params`` that only the torch engine and the reference implement:
        an engine-only option away from its default, or a value per model; None when there is none."""
        for name, value in sorted(params.items()):
            if isinstance(value, (list, tuple)):
                return f"{name} per model"
            if name in self.param_names and self.param(name).engine_only and value != self.param(name).default:
                return f"{name}={checks.short(value)}"
        return None

    def for_kernels(self, params: dict) -> dict:
        """``params`` for the triton backend: a ValueError where it cannot run this method with them
        (another backend's method, parameters per tensor or per model, an engine-only option away
        from its default); else ``params`` less the engine-only options, whose defaults are the kernels'
        own behaviour."""
        if "triton" not in self.backends:
            raise ValueError(f"method {checks.short(self.name)} runs on backends {', '.join(map(repr, self.backends))} in this "
                             f"version, not on 'triton'")
        option = ("parameters that vary by tensor" if "segment_params" in params
                  else self.engine_only_option(params))
        if option is not None:
            raise ValueError(f"{option} runs on backends 'torch' and 'reference' in this version, not on 'triton'")
        return self.without_engine_options(params)

    def without_engine_options(self, params: dict) -> dict:
        """``params`` less the engine-only options (the other paths run them at their defaults)."""
        return {k: v for k, v in params.items() if not (k in self.param_names and self.param(k).engine_only)}


def choice(name: str, options: tuple) -> Callable:
    """The check of a parameter that takes one of ``options``."""
    return lambda value: checks.check_choice(name, value, options)


def flag(name: str) -> Callable:
    """The check of a true/false parameter."""
    return lambda value: checks.check_flag(name, value)


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
