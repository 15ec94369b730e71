"""Where a merge's results go, block by block (docs/design.md 3): what a sink can take is said by its
fields, not by attributes set on a function."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class Sink:
    """``sink(segment, lo, hi, tau_m)`` receives the merged task vector of entries [lo, hi) of a segment.

    ``weights(segment, lo, hi, theta)``: receives the merged weights themselves (the weight-space
    methods, pcb_fast.methods.weight_space); None where the caller takes task vectors only.
    ``from_inputs(segment, lo, hi, natives, weights, divisor) -> bool``: writes the weighted merge
    of a block straight from the raw input slices [base, model_0, ...] (the C kernel of
    pcb_fast.cpu.native.weighted_merge) and says whether it could; None where the sink cannot (then
    the method forms tau_m and calls the sink).
    ``patchable(segment, lo, hi, tau_m, positions, other, room) -> patch``: receives tau_m as ``tau``
    does and returns a function ``patch()`` that, called later (before the sink's results are
    final), puts ``other`` (float32 tau_m values) in place of the entries at ``positions``
    (ascending int32 offsets into the block), the rest of the block unchanged; what ``patch`` needs
    it copies into ``room`` (a :class:`PatchRoom`; at most :data:`PATCH_BYTES` per position). None
    where the sink cannot (the method then sinks the block again).
    """

    tau: Callable
    weights: Callable | None = None
    from_inputs: Callable | None = None
    patchable: Callable | None = None

    def __call__(self, segment, lo: int, hi: int, tau_m) -> None:
        self.tau(segment, lo, hi, tau_m)


PATCH_BYTES = 16  # what a patch holds per position, at most: the position, its base and new values


class PatchRoom:
    """Copies of the small tensors that patches hold, in a few large chunks: thousands of small
    tensors held through a sweep would scatter the C heap between the blocks' buffers, whose pages
    (released between blocks, core/memory.py) would then be faulted in again for every block."""

    CHUNK = 1 << 22  # bytes

    def __init__(self):
        self._chunk, self._at, self.nbytes = None, 0, 0

    def hold(self, t: torch.Tensor) -> torch.Tensor:
        """A copy of ``t`` (flattened) in the room."""
        size = t.numel() * t.element_size()
        if self._chunk is None or self._at + size > self._chunk.numel():
            self._chunk, self._at = torch.empty(max(self.CHUNK, size), dtype=torch.uint8), 0
        copy = self._chunk[self._at : self._at + size].view(t.dtype)
        copy.copy_(t.reshape(-1))
        self._at += -(-size // 8) * 8  # (8-byte aligned: a view of any dtype)
        self.nbytes += size
        return copy


def pieces_at(segment, lo: int, hi: int, positions: torch.Tensor) -> list:
    """Where the entries at ``positions`` (ascending offsets into entries [lo, hi) of ``segment``) lie:
    (the segment or the key of a pack holding some, their int64 offsets in that key, the slice of
    ``positions`` they are) for each such key."""
    found = []
    for part, part_lo, _, start, end in segment.pieces(lo, hi):
        a, b = (int(i) for i in torch.searchsorted(positions, torch.tensor([start, end], dtype=positions.dtype)))
        if a < b:
            found.append((part, positions[a:b].long() - start + part_lo, slice(a, b)))
    return found


def as_sink(sink) -> Sink:
    """``sink`` itself, or a plain function ``f(segment, lo, hi, tau_m)`` as a :class:`Sink` that
    takes task vectors only."""
    return sink if isinstance(sink, Sink) else Sink(sink)
