"""Merging ``torch.nn.Module`` objects: ``merge_modules`` returns a merged copy of the base module.

The state dicts are merged by :func:`pcb_fast.merge` (so every method, backend and check is the
same; a parameter tied in the base is merged once, docs/design.md 2.1), and the merged tensors
become the parameters and buffers of a deep copy of the base module: parameters that are tied
in the base (one ``nn.Parameter`` under two names) are one parameter of the copy, each parameter
keeps the base's ``requires_grad``, and the input modules are left as they were.
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import nn

from .api import merge


def merge_modules(base_module: nn.Module, modules: Sequence[nn.Module], **params) -> nn.Module:
    """A merged deep copy of ``base_module``: theta = theta_pre + lam * tau_m of ``modules``,
    fine-tuned copies of it (same state dict keys and shapes), with the parameters of
    :func:`pcb_fast.merge` (``method``, ``lam``, ``lambdas``, ``scope``, ``exclude``, the method's
    parameters, ``backend``, ``report``, ...).

    Parameters and floating buffers are merged; integer buffers, excluded keys and what the state
    dict does not hold (non-persistent buffers) come from the base. Parameters tied in the base
    stay tied in the copy; ``requires_grad`` and the train/eval mode are the base's; no gradient is
    copied. The input modules are not modified.
    """
    if not isinstance(base_module, nn.Module):
        raise ValueError(f"base_module is a {type(base_module).__name__}, expected a torch.nn.Module")
    if isinstance(modules, nn.Module):
        raise ValueError("modules is a single torch.nn.Module; pass a list of the fine-tuned modules")
    modules = list(modules)
    for i, module in enumerate(modules):
        if not isinstance(module, nn.Module):
            raise ValueError(f"modules[{i}] is a {type(module).__name__}, expected a torch.nn.Module")
    base_state = base_module.state_dict()
    skipped = sorted(k for k, v in base_state.items() if not isinstance(v, torch.Tensor))
    if skipped:  # extra state (get_extra_state) is not a tensor: the copy keeps the base's
        base_state = {k: v for k, v in base_state.items() if k not in skipped}
    states = []
    for i, module in enumerate(modules):
        state = module.state_dict()
        states.append({k: v for k, v in state.items() if k not in skipped})
    merged = merge(base_state, states, **params)

    # The copy is made with the merged tensors in place of the base's, so that no second copy of
    # the weights is ever made; a parameter object met twice (tied) maps to one new parameter.
    memo, placed = {}, set()
    for name, p in base_module.named_parameters(remove_duplicate=False):
        if name in merged and id(p) not in memo:
            memo[id(p)] = nn.Parameter(_like(merged[name], p), requires_grad=p.requires_grad)
        if name in merged:
            placed.add(name)
    for name, b in base_module.named_buffers(remove_duplicate=False):
        if name in merged and id(b) not in memo:
            memo[id(b)] = _like(merged[name], b)
        if name in merged:
            placed.add(name)
    result = copy.deepcopy(base_module, memo)
    for p in result.parameters():
        p.grad = None
    if placed != set(merged):  # a module that renames its state dict keys (hooks): load them by name
        result.load_state_dict({**merged, **{k: v for k, v in base_module.state_dict().items() if k in skipped}})
    return result


def _like(value: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """``value`` (a merged tensor, which nothing else holds) in the layout of ``original``."""
    value = value.detach()
    if value.stride() != original.stride():  # channels_last and other dense layouts kept (empty_like keeps them)
        value = torch.empty_like(original.detach(), dtype=value.dtype).copy_(value)
    return value
