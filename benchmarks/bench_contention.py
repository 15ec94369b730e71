"""The CPU engine on a busy machine: idle, next to another PyTorch process, and two merges at once.

    python -m benchmarks.bench_contention            # about 5 minutes on a 2-core machine
    python -m benchmarks.bench_contention --quick    # fewer repeats and sizes (a minute)

Workloads (n=8 fp32 task vectors of D=2^22 entries, global scope): PCB official on the eager engine,
TIES with the fused loops, a disk merge through `pcb-fast merge` on safetensors files, each with
``threads="auto"`` (the default: the cores other processes leave free) and with every core pinned
(``threads=<cores>``: what the engine did before it looked at the machine); and the reference (the
authors' sort-based PCB) under the same conditions. Conditions: idle; next to a competitor (a
process looping small in-place torch ops on every core, started and stopped by the benchmark);
two identical merges at once (each one's time). Every time is the median of the repeats, each
workload in its own fresh process after one warm-up call. Prints a markdown table and writes
benchmarks/results/contention.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
COMPETITOR = """
import torch
torch.set_num_threads({cores})
x = torch.randn(1 << 16)
while True:  # small ops: one short OpenMP region each, as a training or serving loop runs them
    x.mul_(0.9999).add_(1e-6)
"""


def worker(workload: str, threads, repeats: int, D: int, folder: str) -> dict:
    """Time ``workload`` ``repeats`` times in this process (after one warm-up call)."""
    import torch

    import pcb_fast

    g = torch.Generator().manual_seed(0)
    if workload == "disk":
        from pcb_fast.drivers.files import merge_checkpoints

        out = Path(folder) / f"out-{os.getpid()}"

        def run():
            merge_checkpoints(Path(folder) / "base", [Path(folder) / f"m{i}" for i in range(8)], out, ratio=0.1,
                              overwrite=True, threads=threads)
    else:
        tv = torch.randn(8, D, generator=g) * 1e-3
        if workload == "pcb":
            def run():
                pcb_fast.pcb_merge(tv, threads=threads)
        elif workload == "reference":
            def run():
                pcb_fast.pcb_reference(tv)
        elif workload == "ties_fused":
            base = {"w": torch.zeros(D)}
            models = [{"w": row} for row in tv]

            def run():
                pcb_fast.merge(base, models, method="ties", density=0.2, fused="on", threads=threads)
        else:
            raise ValueError(workload)
    run()  # warm-up: compiles, allocations, the page cache
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - start)
    return {"seconds": seconds, "median": statistics.median(seconds)}


def spawn(workload, threads, repeats, D, folder) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "benchmarks.bench_contention", "--worker", workload,
                             "--threads", str(threads), "--repeats", str(repeats), "--D", str(D), "--folder", folder],
                            stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parent.parent)


def collect(proc: subprocess.Popen) -> dict:
    out, _ = proc.communicate(timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"worker failed with exit code {proc.returncode}")
    return json.loads(out.strip().splitlines()[-1])


def write_models(folder: Path, D: int) -> None:
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(1)
    base = torch.randn(D, generator=g) * 0.02
    rows = D // 1024
    for name, tensor in [("base", base)] + [(f"m{i}", base + 1e-3 * torch.randn(D, generator=g)) for i in range(8)]:
        (folder / name).mkdir()
        save_file({"w": tensor.view(rows, 1024).contiguous()}, str(folder / name / "model.safetensors"))


def measure(workload, threads, condition, repeats, D, folder, cores) -> float:
    competitor = None
    if condition == "competitor":
        competitor = subprocess.Popen([sys.executable, "-c", COMPETITOR.format(cores=cores)])
        time.sleep(1.0)  # let it reach its loop
    try:
        procs = [spawn(workload, threads, repeats, D, folder) for _ in range(2 if condition == "two" else 1)]
        results = [collect(p) for p in procs]
    finally:
        if competitor is not None:
            competitor.kill()
            competitor.wait()
    return statistics.median(r["median"] for r in results)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--worker")
    parser.add_argument("--threads", default="auto")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--D", type=int, default=1 << 22)
    parser.add_argument("--folder", default="")
    args = parser.parse_args(argv)
    if args.worker:
        threads = args.threads if args.threads == "auto" else int(args.threads)
        print(json.dumps(worker(args.worker, threads, args.repeats, args.D, args.folder)))
        return 0

    from benchmarks.bench_cpu import machine

    cores = len(os.sched_getaffinity(0))
    repeats = 1 if args.quick else 3
    conditions = ["idle", "competitor", "two"]
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        write_models(Path(folder), args.D)
        plan = [("pcb", "auto"), ("pcb", cores), ("ties_fused", "auto"), ("ties_fused", cores), ("disk", "auto"),
                ("disk", cores), ("reference", "auto")]
        if args.quick:
            plan = [("pcb", "auto"), ("pcb", cores), ("reference", "auto")]
        for workload, threads in plan:
            row = {"workload": workload, "threads": threads}
            for condition in conditions:
                row[condition] = measure(workload, threads, condition, repeats, args.D, folder, cores)
                print(f"{workload:<11} threads={threads!s:<5} {condition:<10} {row[condition]:.2f} s", flush=True)
            rows.append(row)
    reference = next(r for r in rows if r["workload"] == "reference")
    info = machine()
    lines = [f"Machine: {info['cpu']}, {cores} cores; torch {info['torch']}; n=8, D={args.D:,} fp32, global; "
             f"median of {repeats} per process (two merges at once: the median of both)", "",
             "| workload | threads | idle | next to a PyTorch process | two at once | competitor / idle | "
             "two / idle | reference / engine, competitor |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        versus = "-" if r["workload"] in ("reference", "disk", "ties_fused") else \
            f"{reference['competitor'] / r['competitor']:.1f}x"
        lines.append(f"| {r['workload']} | {r['threads']} | {r['idle']:.2f} s | {r['competitor']:.2f} s | "
                     f"{r['two']:.2f} s | {r['competitor'] / r['idle']:.1f}x | {r['two'] / r['idle']:.1f}x | {versus} |")
    table = "\n".join(lines)
    print("\n" + table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "contention.json").write_text(json.dumps({"machine": info, "D": args.D, "repeats": repeats,
                                                         "rows": rows, "table": table}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
