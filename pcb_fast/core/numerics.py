"""Workarounds for torch CPU numerics that would otherwise make results differ run to run."""

from __future__ import annotations

import torch

_WARM_SIZE = 1 << 17  # above torch's parallel grain size (32768), so every intra-op thread runs


def warm_up_exp() -> None:
    """Run one multi-threaded float32 exp before the real ones.

    Measured with torch 2.13.0 (CPU, 2 threads, AVX512): in about 1 process in 15, the first
    multi-threaded ``torch.exp`` of the process computes the chunk of the second thread with a
    relative error up to 1.5e-4; every later call is accurate and identical. Such an error moves
    PCB scores across the keep threshold, so both the engine and the reference warm up first.
    """
    torch.exp(torch.zeros(_WARM_SIZE))
