"""Backend choice (DESIGN.md 3): "auto", "torch", "reference", "triton"."""

from __future__ import annotations

import os

BACKENDS = ("auto", "torch", "reference", "triton")


def resolve_backend(backend: str | None) -> str:
    """The backend that will run: PCB_FAST_BACKEND overrides "auto"; "auto" is "torch" today."""
    if backend is None or backend == "auto":
        backend = os.environ.get("PCB_FAST_BACKEND", "auto") or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not valid; choose one of {', '.join(map(repr, BACKENDS))}")
    if backend == "triton":
        raise ValueError("backend='triton' is not available in this build: the Triton kernels are not implemented yet; use 'torch'")
    return "torch" if backend == "auto" else backend
