"""Where a merge's results go, block by block (docs/design.md 3): what a sink can take is said by its
fields, not by attributes set on a function."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Sink:
    """``sink(segment, lo, hi, tau_m)`` receives the merged task vector of entries [lo, hi) of a segment.

    ``weights(segment, lo, hi, theta)``: receives the merged weights themselves (the weight-space
    methods, pcb_fast.methods.weight_space); None where the caller takes task vectors only.
    ``from_inputs(segment, lo, hi, natives, weights, divisor) -> bool``: writes the weighted merge
    of a block straight from the raw input slices [base, model_0, ...] (the C kernel of
    pcb_fast.cpu.native.weighted_merge) and says whether it could; None where the sink cannot (then
    the method forms tau_m and calls the sink).
    """

    tau: Callable
    weights: Callable | None = None
    from_inputs: Callable | None = None

    def __call__(self, segment, lo: int, hi: int, tau_m) -> None:
        self.tau(segment, lo, hi, tau_m)


def as_sink(sink) -> Sink:
    """``sink`` itself, or a plain function ``f(segment, lo, hi, tau_m)`` as a :class:`Sink` that
    takes task vectors only."""
    return sink if isinstance(sink, Sink) else Sink(sink)
