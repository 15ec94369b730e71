"""Backend choice (docs/design.md 3.5): "auto", "torch", "reference", "triton".

"auto" runs the Triton kernels on CUDA tensors when triton imports, and the torch backend on CPU
tensors. The PCB_FAST_BACKEND environment variable overrides "auto". Asking for "triton" where it
cannot run is an error that says why; so is asking for the torch backend with CUDA tensors. The
reference path is plain torch code and runs on any device (benchmarks run it on the GPU).
"""

from __future__ import annotations

import os

import torch

from .checks import short

BACKENDS = ("auto", "torch", "reference", "triton")


def interpreting() -> bool:
    """True when Triton kernels run under its CPU interpreter (TRITON_INTERPRET=1, for tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_problem() -> str | None:
    """None when the Triton kernels can run here, else why not."""
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return f"triton does not import ({e})"
    return None


def resolve_backend(backend: str | None, device: torch.device | str = "cpu") -> str:
    """The backend that will run for tensors on ``device``."""
    device = torch.device(device)
    if backend is None or backend == "auto":
        backend = os.environ.get("PCB_FAST_BACKEND", "auto") or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"backend={short(backend)} is not valid; choose one of {', '.join(map(repr, BACKENDS))}")
    if backend == "auto":
        backend = "triton" if device.type == "cuda" else "torch"
    if backend == "triton":
        why = triton_problem()
        if why is not None:
            raise ValueError(f"backend='triton' cannot run here: {why}; use backend='torch' with CPU tensors")
        if device.type != "cuda" and not (device.type == "cpu" and interpreting()):
            raise ValueError(f"backend='triton' needs CUDA tensors, got tensors on {device} "
                             "(on a CPU it runs only under TRITON_INTERPRET=1, for tests); use backend='torch'")
    elif backend == "torch" and device.type != "cpu":
        raise ValueError(f"backend={short(backend)} merges CPU tensors only, got tensors on {device}; "
                         "use backend='triton' for CUDA tensors, or move them with .cpu()")
    return backend
