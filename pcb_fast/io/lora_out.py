"""Adapters out: the merged delta of each adapted module written as a PEFT LoRA adapter folder.

A merge of LoRA adapters changes the keys the adapters change (io/lora.py); its delta
``theta_m - theta_pre = lam * tau_m`` on each of them is a dense matrix, of rank up to the sum of
the adapters' ranks. :func:`low_rank` keeps its best rank-r approximation (truncated SVD, by a
randomized range finder where the matrix is large next to r), split evenly into PEFT's factors
(B = U sqrt(S), A = sqrt(S) V^T, lora_alpha = r so that scale = 1), and reports the relative error
||delta - B A||_F / ||delta||_F of what it writes. Keys that adapters save whole (``modules_to_save``)
are written whole, merged, as PEFT saves such modules. The folder is written atomically
(io/output.py): a failure leaves nothing.
"""

from __future__ import annotations

import json
import math
import re

import torch

from .safetensors import show
from ..core.checks import short

PREFIX = "base_model.model."
LORA_KINDS = ("linear", "embedding")
OVERSAMPLE = 8
POWER_ITERATIONS = 4


def check_rank(rank) -> int:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"out_rank={short(rank)} must be a positive integer (the rank of the adapter written)")
    if rank > 1 << 16:
        raise ValueError(f"out_rank={rank} is larger than 65536")
    return rank


def _orthonormal(m: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(m).Q


def low_rank(delta: torch.Tensor, rank: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(left [m, k], right [k, n], relative Frobenius error) with left @ right the best rank-k
    approximation of the float32 matrix ``delta`` (k = min(rank, m, n)): an exact SVD for small or
    nearly square problems, a randomized one (Halko et al. 2011, with a private generator: the
    caller's random state is untouched) where k + 8 is under half the smaller side."""
    m, n = delta.shape
    k = min(rank, m, n)
    q = k + OVERSAMPLE
    if 2 * q < min(m, n) and min(m, n) >= 256:
        gen = torch.Generator().manual_seed(seed)
        basis = _orthonormal(delta @ torch.randn(n, q, generator=gen))
        for _ in range(POWER_ITERATIONS):  # sharpen the range where the spectrum decays slowly
            basis = _orthonormal(delta @ _orthonormal(delta.T @ basis))
        u, s, vh = torch.linalg.svd(basis.T @ delta, full_matrices=False)
        u = basis @ u
    else:
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    root = s[:k].sqrt()
    left, right = (u[:, :k] * root).contiguous(), (root[:, None] * vh[:k]).contiguous()
    norm = torch.linalg.matrix_norm(delta).item()
    error = torch.linalg.matrix_norm(delta - left @ right).item() / norm if norm > 0 else 0.0
    return left, right, error


def plan(adapters, merged_keys) -> dict:
    """{key: (how, module, kind)} for each merged key: ("lora", module, "linear"|"embedding") or
    ("full", module, None); a one-line ValueError for a key a LoRA adapter cannot hold."""
    from .lora import Full, Product

    plans, lora_modules, full_modules = {}, set(), set()
    for key in merged_keys:
        deltas = [(a.name, a.deltas[key]) for a in adapters if key in a.deltas]
        products = [(name, d) for name, d in deltas if isinstance(d, Product)]
        fulls = [(name, d) for name, d in deltas if isinstance(d, Full)]
        if products and fulls:
            raise ValueError(f"{show(key)} is changed by a LoRA in {products[0][0]} and saved whole in {fulls[0][0]}; "
                             "an adapter cannot hold both: write the merged model instead")
        if products:
            bad = next(((name, d) for name, d in products if d.kind not in LORA_KINDS), None)
            if bad is not None:
                raise ValueError(f"{bad[0]}: {show(bad[1].where)} is a {bad[1].kind} LoRA; adapters out hold LoRAs of "
                                 "Linear and Embedding layers in this version: write the merged model instead")
            module, kind = products[0][1].module, products[0][1].kind
            plans[key] = ("lora", module, kind)
            lora_modules.add(module)
        else:
            module = key.rpartition(".")[0]
            plans[key] = ("full", module, None)
            full_modules.add(module)
    both = sorted(lora_modules & full_modules)
    if both:
        raise ValueError(f"module {show(both[0])} has a LoRA and tensors saved whole; an adapter cannot hold both: "
                         "write the merged model instead")
    return plans


def factors(key: str, plan_entry, delta: torch.Tensor, shape, rank: int) -> tuple[dict, int, float]:
    """The adapter tensors of one LoRA module from its merged delta (flat float32 of ``shape``):
    ({name: tensor}, rank written, relative error)."""
    _, module, kind = plan_entry
    matrix = delta.view(shape[0], -1)
    if kind == "embedding":  # PEFT: delta = (B @ A)^T, A [r, num], B [dim, r]
        left, right, error = low_rank(matrix, rank)
        names = {f"{PREFIX}{module}.lora_embedding_A": left.T.contiguous(),
                 f"{PREFIX}{module}.lora_embedding_B": right.T.contiguous()}
    else:  # delta = B @ A, A [r, in], B [out, r]
        left, right, error = low_rank(matrix, rank)
        names = {f"{PREFIX}{module}.lora_A.weight": right, f"{PREFIX}{module}.lora_B.weight": left}
    return names, left.shape[1], error


def adapter_config(rank: int, plans: dict, ranks: dict, template: dict, base_name: str) -> dict:
    """A LoraConfig (as JSON) for the written factors: scale 1 everywhere (lora_alpha = rank, a
    module of lower rank than ``rank`` gets its own rank and alpha by an exact pattern)."""
    lora = sorted({m for how, m, _ in plans.values() if how == "lora"})
    full = sorted({m for how, m, _ in plans.values() if how == "full"})
    lower = {re.escape(m): r for m, r in sorted(ranks.items()) if r != rank}
    return {"peft_type": "LORA", "task_type": template.get("task_type"),
            "base_model_name_or_path": template.get("base_model_name_or_path") or base_name,
            "r": rank, "lora_alpha": rank, "rank_pattern": lower, "alpha_pattern": dict(lower),
            "target_modules": lora, "modules_to_save": full or None, "use_rslora": False, "use_dora": False,
            "fan_in_fan_out": False, "bias": "none", "lora_bias": False, "lora_dropout": 0.0,
            "init_lora_weights": True, "inference_mode": True}


def write_adapter(folder, tensors: dict, config: dict) -> None:
    """adapter_model.safetensors and adapter_config.json into ``folder`` (a temporary folder)."""
    from safetensors.torch import save_file

    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def error_table(modules: dict) -> str:
    """The per-module report as text lines: module, rank, relative error."""
    width = max((len(m) for m in modules), default=6)
    lines = [f"{'module':<{width}}  rank  relative error"]
    for module, (rank, error) in sorted(modules.items()):
        lines.append(f"{module:<{width}}  {rank:>4}  {error:.3e}" if math.isfinite(error) else f"{module}  {rank}  n/a")
    return "\n".join(lines)
