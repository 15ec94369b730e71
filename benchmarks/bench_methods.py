"""Every method through the engine and through its literal formulation, side by side in one process.

    python -m benchmarks.bench_methods   # about 3 minutes on a 2-core machine

n=8 fine-tuned versions of one [4096, 4096] fp32 tensor (D = 2^24, task vectors of scale 1e-3),
scope global, merged with pcb_fast.merge(backend="torch"), eager and with the compiled loops of
pcb_fast.cpu.fused where a method has them, and with merge(backend="reference") (the literal
formulations: the authors' sort/kthvalue-based code). Prints time, peak memory above the inputs,
ratios and whether the results are equal (the fused PCB: within the tolerance of docs/design.md 9,
2e-5 of max|tau_m|, of the eager engine, itself bit-exact); writes benchmarks/results/methods.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import pcb_fast
from benchmarks.bench_cpu import machine, timed_runs

RESULTS = Path(__file__).parent / "results"

METHODS = [
    ("pcb", dict(ratio=0.1)),
    ("average", {}),
    ("task_arithmetic", {}),
    ("ties", dict(density=0.2)),
    ("dare", dict(p=0.9, seed=0)),
    ("dare_ties", dict(p=0.9, seed=0)),
    ("breadcrumbs", dict(gamma=0.01, beta=0.1)),
]
FUSED = ("pcb", "ties", "dare", "dare_ties", "breadcrumbs")  # the methods with compiled loops (pcb_fast.fused_cpu)
# fused loops held to a tolerance (docs/design.md 9: within 2e-5 of max|tau_m|) instead of equal values
TOLERANT = ("pcb",)
RTOL = 2e-5


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="runs through the engine (default 3)")
    parser.add_argument("--out", type=Path, default=RESULTS / "methods.json")
    parser.add_argument("--methods", nargs="+", choices=[m for m, _ in METHODS], default=[m for m, _ in METHODS],
                        help="a subset to run (default: all)")
    args = parser.parse_args(argv)

    info = machine()
    print(f"Machine: {info['cpu']}, {info['cores']} cores ({info['threads']} torch thread{'s' if info['threads'] != 1 else ''}), {info['memory_gib']} GiB; "
          f"Python {info['python']}, torch {info['torch']}, pcb_fast {info['pcb_fast']} ({info['git']})\n")
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(4096, 4096, generator=g) * 0.02}
    models = [{"w": base["w"] + torch.randn(4096, 4096, generator=g) * 1e-3} for _ in range(8)]
    pcb_fast.merge({"w": base["w"][:64]}, [{"w": m["w"][:64]} for m in models])  # warm up

    rows = []
    print("n=8, [4096, 4096] fp32 (D=2^24, 0.54 GB of task vectors), scope global. Engine: median of "
          f"{args.repeats} runs, eager (fused='off') and, for the methods that have them, the compiled loops of "
          "pcb_fast.fused_cpu (fused='on'; its one-time compile is the first call, not in the median). "
          "Literal: one run.\n")
    print("| method | engine, eager | engine, fused (first call) | literal formulation | speedup eager / fused "
          "| peak memory eager / fused / literal | identical |")
    print("|---|---|---|---|---|---|---|")
    for method, params in (m for m in METHODS if m[0] in args.methods):
        eager, eager_s, eager_mem = timed_runs(lambda: pcb_fast.merge(base, models, method=method, fused="off", **params),
                                               args.repeats)
        fused_s, fused_mem, first, fused_same, gap = None, None, None, True, None
        if method in FUSED:
            started = time.perf_counter()
            pcb_fast.merge(base, models, method=method, fused="on", **params)
            first = time.perf_counter() - started
            fused, fused_s, fused_mem = timed_runs(
                lambda: pcb_fast.merge(base, models, method=method, fused="on", **params), args.repeats)
            if method in TOLERANT:  # against the eager engine, itself bit-exact with the literal formulation
                gap = float((fused["w"] - eager["w"]).abs().max()) / (float((eager["w"] - base["w"]).abs().max()) or 1.0)
                fused_same = gap <= RTOL
            else:
                fused_same = torch.equal(fused["w"], eager["w"])
            del fused
        ref, ref_s, ref_mem = timed_runs(
            lambda: pcb_fast.merge(base, models, method=method, backend="reference", **params), 1)
        same = torch.equal(eager["w"], ref["w"]) and fused_same
        literal = statistics.median(ref_s)
        row = {"method": method, "params": params, "engine_seconds": eager_s, "fused_seconds": fused_s,
               "fused_first_call_seconds": first, "reference_seconds": ref_s, "engine_peak_bytes": eager_mem,
               "fused_peak_bytes": fused_mem, "reference_peak_bytes": ref_mem, "identical": same,
               "speedup": literal / statistics.median(eager_s),
               "fused_speedup": None if fused_s is None else literal / statistics.median(fused_s),
               # fused loops held to a tolerance: max |fused - eager| / max |theta - theta_pre| (eager)
               "fused_relative_gap": gap}
        rows.append(row)
        fused_cell = "-" if fused_s is None else f"{statistics.median(fused_s):.2f} s ({first:.1f} s)"
        fused_ratio = "-" if fused_s is None else f"**{row['fused_speedup']:.1f}x**"
        fused_memory = "-" if fused_mem is None else f"{fused_mem / 2**30:.2f}"
        print(f"| {method} {', '.join(f'{k}={v}' for k, v in params.items())} | {statistics.median(eager_s):.2f} s "
              f"(min {min(eager_s):.2f}, max {max(eager_s):.2f}) | {fused_cell} | {literal:.2f} s | "
              f"{row['speedup']:.1f}x / {fused_ratio} | {eager_mem / 2**30:.2f} / {fused_memory} / "
              f"{ref_mem / 2**30:.2f} GiB | {'yes' if same else 'NO'}"
              f"{'' if gap is None else f' (fused: within {gap:.1e} of max|tau_m|)'} |", flush=True)
        del eager, ref
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": info, "date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
