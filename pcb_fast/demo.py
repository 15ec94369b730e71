"""A merge demo on built-in synthetic data: ``pcb-fast demo`` or ``python -m pcb_fast.demo``."""

from __future__ import annotations

import contextlib
import threading
import time

import torch

from . import __version__
from .api import merge

# A small ViT-like layout: (name, shape) of the base model's tensors.
_LAYERS = 4
_WIDTH = 384


def synthetic_models(n: int = 8, seed: int = 0, dtype=torch.float32) -> tuple[dict, list[dict]]:
    """A base state dict (ViT-like, ~7M entries) and n fine-tuned versions of it.

    Each fine-tuned model adds a task vector of scale 1e-3 with a few large task-specific entries,
    so tasks overlap and compete, as real fine-tunes do.
    """
    g = torch.Generator().manual_seed(seed)
    shapes = {"embed.weight": (_WIDTH, 768), "embed.bias": (_WIDTH,), "head.weight": (10, _WIDTH)}
    for i in range(_LAYERS):
        p = f"blocks.{i}."
        shapes.update({p + "attn.qkv.weight": (3 * _WIDTH, _WIDTH), p + "attn.proj.weight": (_WIDTH, _WIDTH),
                       p + "mlp.fc1.weight": (4 * _WIDTH, _WIDTH), p + "mlp.fc2.weight": (_WIDTH, 4 * _WIDTH),
                       p + "norm.weight": (_WIDTH,), p + "norm.bias": (_WIDTH,)})
    base = {k: (torch.randn(s, generator=g) * 0.02).to(dtype) for k, s in sorted(shapes.items())}
    base["position_ids"] = torch.arange(197)  # an integer buffer: copied, never merged
    models = []
    for _ in range(n):
        model = {}
        for k, t in base.items():
            if not t.is_floating_point():
                model[k] = t.clone()
                continue
            tau = torch.randn(t.shape, generator=g) * 1e-3
            tau += (torch.rand(t.shape, generator=g) < 0.01) * torch.randn(t.shape, generator=g) * 1e-2
            model[k] = (t.float() + tau).to(dtype)
        models.append(model)
    return base, models


def _count(number: int, noun: str) -> str:
    """'1 thread', '2 threads'."""
    return f"{number} {noun}{'' if number == 1 else 's'}"


@contextlib.contextmanager
def _ticking(what: str, every: float = 5.0):
    """Print the time spent on ``what`` every ``every`` seconds while the block runs (a long step that
    would otherwise look stuck)."""
    done = threading.Event()
    started = time.perf_counter()

    def tick():
        while not done.wait(every):
            print(f"  {what}: {time.perf_counter() - started:.0f} s ...", flush=True)

    ticker = threading.Thread(target=tick, daemon=True)
    ticker.start()
    try:
        yield
    finally:
        done.set()
        ticker.join()


def main(n: int = 8, ratio: float = 0.1, check: bool = True) -> int:
    """Merge n synthetic fine-tunes with PCB, print what was merged, the time and kept fractions."""
    params = dict(method="pcb", ratio=ratio, clamp_ratio=1e-4, inter="sum", variant="official", scope="global")
    print(f"pcb_fast {__version__} demo: PCB-Merging of {n} synthetic fine-tuned models "
          f"({', '.join(f'{k}={v}' for k, v in params.items())})")
    print(f"making the synthetic base and {_count(n, 'fine-tuned model')} ...", flush=True)
    base, models = synthetic_models(n)
    report = {}
    t0 = time.perf_counter()
    merged = merge(base, models, backend="torch", report=report, **params)
    seconds = time.perf_counter() - t0
    entries = report["entries"]
    print(f"merged {len(report['merged_keys'])} tensors ({entries / 1e6:.2f}M entries per model), "
          f"copied {len(report['copied_keys'])} ({', '.join(report['copied_keys'])}) in {seconds:.2f} s "
          f"[torch backend, {_count(torch.get_num_threads(), 'thread')}; timings vary with other work on the machine]")
    print("kept fraction per task: " + " ".join(f"{k / entries:.4f}" for k in report["kept"]))
    if check:
        print("checking against the reference path (the authors' sort-based formulation; slow by design, "
              "many times the merge's time) ...", flush=True)
        t0 = time.perf_counter()
        with _ticking("reference path"):
            reference = merge(base, models, backend="reference", **params)
        ref_seconds = time.perf_counter() - t0
        same = all(torch.equal(merged[k], reference[k]) for k in base)
        print(f"reference path (the authors' sort-based formulation): {ref_seconds:.2f} s "
              f"({ref_seconds / seconds:.1f}x slower); results identical bit for bit: {'yes' if same else 'NO'}")
        return 0 if same else 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
