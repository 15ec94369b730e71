"""The order-preserving map between float32 values and int32 keys, in plain torch (docs/design.md 3.3).

A float32 maps to an int32 key that orders like the float: negatives get every bit but the sign
flipped. The map is an involution on int32, so the same function turns keys back into floats.
This module imports neither triton nor anything of pcb_fast, so that the CPU engine's radix select
(pcb_fast.core.select) and the device kernels' launchers (kernels/select.py) share one definition.
"""

from __future__ import annotations

import torch


def order_keys(x: torch.Tensor) -> torch.Tensor:
    """int32 keys of float32 ``x`` with key order == float order (-0.0 sorts just below +0.0)."""
    bits = x.contiguous().view(torch.int32)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def keys_to_float(keys: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`order_keys` for int32/int64 key tensors (torch, on any device)."""
    keys = keys.to(torch.int32)
    return (keys ^ ((keys >> 31) & 0x7FFFFFFF)).view(torch.float32)
