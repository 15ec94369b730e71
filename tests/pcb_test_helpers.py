"""Helpers shared by test modules (pytest puts tests/ on sys.path)."""

from __future__ import annotations

import torch

from pcb_fast.core import engine
from pcb_fast.core.sources import MatrixSource


def run_method(method, tv, fused, block_width=4096, budget=None, **params):
    """Run an engine method on a [n, D] matrix; returns (tau_m, kept per task). Checks that every
    block is written exactly once."""
    source = MatrixSource(tv)
    source.fused = fused
    source.memory_budget = budget
    out = torch.full((source.D,), float("nan"))

    def sink(segment, lo, hi, values):
        assert torch.isnan(out[segment.offset + lo : segment.offset + hi]).all(), "a block was written twice"
        out[segment.offset + lo : segment.offset + hi] = values

    info = engine.run(method, source, sink, block_width=block_width, **params)
    assert not torch.isnan(out).any(), "a block was never written"
    return out, info["kept"]
