"""Coefficient-search benchmark: one apply of cached contributions against one full merge.

    python -m benchmarks.bench_search      # about 1 minute on a 2-core CPU

n=8 fine-tunes of one [4096, 4096] fp32 tensor (D = 2^24, 512 MiB of task vectors), scope global:
for each searchable method, the time of a full ``merge(..., lambdas=...)`` (median of 3), of
building the cache (once), and of one ``apply(lambdas)`` (median of 10), with the ratio, the
cache's memory against the task vectors, and a check that apply equals the merge bit for bit.
Prints a markdown table; writes benchmarks/results/search.json.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch

import pcb_fast
from benchmarks.bench_cpu import machine
from pcb_fast.search import ContributionCache

RESULTS = Path(__file__).parent / "results"
METHODS = [("pcb", dict(ratio=0.1)), ("task_arithmetic", {}), ("dare", dict(p=0.9)), ("ties", dict(density=0.2))]


def timed(fn, repeats: int):
    seconds, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        seconds.append(time.perf_counter() - start)
    return result, seconds


def main() -> int:
    n, rows = 8, 4096
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(rows, rows, generator=g) * 0.02}
    models = [{"w": base["w"] + 1e-3 * torch.randn(rows, rows, generator=g)} for _ in range(n)]
    lambdas = [0.9 + 0.05 * i for i in range(n)]
    task_vector_bytes = n * rows * rows * 4
    results = []
    for method, params in METHODS:
        merged, merge_s = timed(lambda: pcb_fast.merge(base, models, method=method, lambdas=lambdas, **params), 3)
        cache, build_s = timed(lambda: ContributionCache(base, models, method=method, **params), 1)
        applied, apply_s = timed(lambda: cache.apply(lambdas), 10)
        results.append({"method": method, "params": params, "merge_seconds": statistics.median(merge_s),
                        "cache_build_seconds": build_s[0], "apply_seconds": statistics.median(apply_s),
                        "apply_seconds_min_max": [min(apply_s), max(apply_s)], "cache_bytes": cache.nbytes,
                        "identical": bool(torch.equal(applied["w"], merged["w"]))})
        del cache, applied, merged
    info = machine()
    print(f"n={n}, D=2^24 fp32 ({task_vector_bytes / 2**30:.2f} GiB of task vectors), scope global, on "
          f"{info['cpu']} ({info['cores']} cores, {info['threads']} thread{'s' if info['threads'] != 1 else ''}), torch {info['torch']}\n")
    print("| method | full merge | cache build (once) | one apply | merge / apply | cache memory / task vectors "
          "| apply == merge |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['method']} | {r['merge_seconds']:.2f} s | {r['cache_build_seconds']:.2f} s | "
              f"{r['apply_seconds'] * 1e3:.0f} ms | **{r['merge_seconds'] / r['apply_seconds']:.0f}x** | "
              f"{r['cache_bytes'] / task_vector_bytes:.2f} | {'yes' if r['identical'] else 'NO'} |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "search.json").write_text(json.dumps({"machine": info, "n": n, "D": rows * rows,
                                                     "results": results}, indent=2))
    print(f"\nwrote {RESULTS / 'search.json'}")
    return 0 if all(r["identical"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
