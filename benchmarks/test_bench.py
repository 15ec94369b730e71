"""pytest-benchmark suite: every method x backend at a few sizes, peak memory beside the time.

    pytest benchmarks/ --benchmark-only                     # about 3 minutes on a 2-core CPU
    pytest benchmarks/ --benchmark-only --benchmark-json out.json

Not part of the test run (`pytest tests`). n=8 fine-tunes of one fp32 tensor of D entries; the
triton backend runs where a CUDA GPU is present. Each benchmark's extra_info holds n, D and the
peak RSS the merge added (measured on a separate call, so the timing is not disturbed).
"""

from __future__ import annotations

import pytest
import torch

import pcb_fast
from benchmarks.memory import measure

N = 8
SIZES = [1 << 16, 1 << 20, 1 << 22]
METHODS = [("pcb", {}), ("pcb", dict(variant="paper")), ("average", {}), ("task_arithmetic", {}),
           ("ties", dict(density=0.2)), ("dare", dict(p=0.9)), ("dare_ties", dict(p=0.9)), ("breadcrumbs", {})]
BACKENDS = ["torch", "reference"] + (["triton"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module", params=SIZES, ids=lambda D: f"D=2^{D.bit_length() - 1}")
def models(request):
    D = request.param
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(D, generator=g) * 0.02}
    return base, [{"w": base["w"] + 1e-3 * torch.randn(D, generator=g)} for _ in range(N)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method,params", METHODS, ids=[m + ("-paper" if p.get("variant") else "") for m, p in METHODS])
def test_merge(benchmark, models, method, params, backend):
    if backend == "triton" and method != "pcb":
        pytest.skip("the triton backend runs pcb")
    base, tuned = models
    if backend == "triton":
        base, tuned = {"w": base["w"].cuda()}, [{"w": m["w"].cuda()} for m in tuned]

    def run():
        out = pcb_fast.merge(base, tuned, method=method, backend=backend, **params)
        if backend == "triton":
            torch.cuda.synchronize()
        return out

    _, _, peak, before = measure(run)
    D = base["w"].numel()
    benchmark.extra_info.update(n=N, D=D, peak_bytes_above_inputs=peak - before if backend != "triton" else None)
    rounds = 1 if backend == "reference" and D >= 1 << 20 else 3
    benchmark.pedantic(run, rounds=rounds, iterations=1)
