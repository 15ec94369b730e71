"""CPU benchmark of PCB-Merging: the reference path and the torch backend side by side, in one process.

    python -m benchmarks.bench_cpu            # both parts (about 2 minutes on a 2-core machine)
    python -m benchmarks.bench_cpu --skip-vit # only n=8, D=2^24

Part 1: n=8, D=2^24, fp32 task vectors of scale 1e-3, PCB official (global, ratio 0.1, clamp 1e-4):
time and peak memory of the reference (the authors' sort-based formulation) and of the torch
backend (its default, and fused="off"), with their ratios, and a check that the results are
identical bit for bit.
Part 2: the authors' ViT-B/32 size (n=8, D=113,448,705) through the torch backend alone: time and
the process's peak RSS against the size of the inputs (in a fresh process, so that nothing left
over from part 1 counts).
Part 3: the first merge of a fresh process against its second (warm) one, n=8, D=2^24 from state
dicts (`pcb_fast.merge`), the default (fused="auto": PCB's C sweeps, nothing compiled at run time)
and the eager torch ops (fused="off"), both the reference's bits, next to part 1's reference.
Prints markdown tables and writes benchmarks/results/cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import pcb_fast
from benchmarks.memory import measure

RESULTS = Path(__file__).parent / "results"
VIT_B32_D = 113_448_705


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        with open("/proc/meminfo") as f:
            mem_gib = int(f.readline().split()[1]) / 2**20
    except OSError:
        mem_gib = float("nan")
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        sha = ""
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "memory_gib": round(mem_gib, 1),
            "python": platform.python_version(), "torch": torch.__version__, "pcb_fast": pcb_fast.__version__,
            "git": sha}


def timed_runs(fn, repeats: int):
    """(result, [seconds], max peak RSS increase in bytes over the runs)."""
    seconds, peaks, result = [], [], None
    for _ in range(repeats):
        result, s, peak, before = measure(fn)
        seconds.append(s)
        peaks.append(peak - before)
    return result, seconds, max(peaks)


def spread(seconds):
    return {"min": min(seconds), "median": statistics.median(seconds), "max": max(seconds)}


def part_2_24(repeats: int, ref_repeats: int) -> dict:
    n, D = 8, 1 << 24
    tv = torch.randn(n, D, generator=torch.Generator().manual_seed(0)) * 1e-3
    pcb_fast.pcb_merge(tv[:, : 1 << 20])  # warm up allocator and thread pool
    ours, ours_s, ours_mem = timed_runs(lambda: pcb_fast.pcb_merge(tv, backend="torch"), repeats)
    eager, eager_s, eager_mem = timed_runs(lambda: pcb_fast.pcb_merge(tv, backend="torch", fused="off"), repeats)
    ref, ref_s, ref_mem = timed_runs(lambda: pcb_fast.pcb_merge(tv, backend="reference"), ref_repeats)
    return {"n": n, "D": D, "input_bytes": tv.numel() * 4,
            "identical": bool(torch.equal(ours, ref)) and bool(torch.equal(eager, ref)),
            "torch": {"seconds": spread(ours_s), "peak_bytes": ours_mem},
            "torch_eager": {"seconds": spread(eager_s), "peak_bytes": eager_mem},
            "reference": {"seconds": spread(ref_s), "peak_bytes": ref_mem},
            "speedup": statistics.median(ref_s) / statistics.median(ours_s),
            "speedup_eager": statistics.median(ref_s) / statistics.median(eager_s),
            "memory_ratio": ours_mem / ref_mem}


def part_vit(repeats: int) -> dict:
    n, D = 8, VIT_B32_D
    g = torch.Generator().manual_seed(1)
    tv = torch.empty(n, D)
    for i in range(n):
        tv[i].normal_(generator=g).mul_(1e-3)
    _, seconds, _ = timed_runs(lambda: pcb_fast.pcb_merge(tv, backend="torch"), repeats)
    with open("/proc/self/status") as f:
        hwm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))
    input_bytes = tv.numel() * 4
    return {"n": n, "D": D, "input_bytes": input_bytes, "torch": {"seconds": spread(seconds)},
            "process_peak_rss_bytes": hwm, "peak_over_inputs": hwm / input_bytes}


def part_first_call(fused: str) -> dict:
    """In this (fresh) process: seconds of the first PCB merge and of the second, n=8, D=2^24."""
    n, D = 8, 1 << 24
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(D, generator=g)}
    models = [{"w": base["w"] + torch.randn(D, generator=g) * 1e-3} for _ in range(n)]
    seconds = []
    for _ in range(2):
        start = time.perf_counter()
        pcb_fast.merge(base, models, method="pcb", fused=fused)
        seconds.append(time.perf_counter() - start)
    return {"fused": fused, "first_seconds": seconds[0], "warm_seconds": seconds[1]}


def gib(b):
    return f"{b / 2**30:.2f} GiB"


def secs(s):
    return f"{s['median']:.2f} s (min {s['min']:.2f}, max {s['max']:.2f})"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="runs of the torch backend (default 3)")
    parser.add_argument("--ref-repeats", type=int, default=1, help="runs of the reference (default 1; ~25 s each)")
    parser.add_argument("--skip-vit", action="store_true", help="skip the ViT-B/32-size run (needs ~8 GB)")
    parser.add_argument("--out", type=Path, default=RESULTS / "cpu.json")
    parser.add_argument("--vit-only", type=Path, help=argparse.SUPPRESS)  # internal: run part 2, write JSON here
    parser.add_argument("--first-call", nargs=2, help=argparse.SUPPRESS)  # internal: part 3 (fused mode, JSON path)
    args = parser.parse_args(argv)
    if args.vit_only:
        args.vit_only.write_text(json.dumps(part_vit(max(1, args.repeats - 1))))
        return
    if args.first_call:
        Path(args.first_call[1]).write_text(json.dumps(part_first_call(args.first_call[0])))
        return

    info = machine()
    print(f"Machine: {info['cpu']}, {info['cores']} cores ({info['threads']} torch thread{'s' if info['threads'] != 1 else ''}), {info['memory_gib']} GiB; "
          f"Python {info['python']}, torch {info['torch']}, pcb_fast {info['pcb_fast']} ({info['git']})\n")
    result = {"machine": info, "date": time.strftime("%Y-%m-%d")}

    r = part_2_24(args.repeats, args.ref_repeats)
    result["n8_D2^24"] = r
    print("PCB official, n=8, D=2^24 fp32 (0.54 GB of task vectors), global, ratio 0.1, clamp 1e-4\n")
    print("| path | time | peak memory (above inputs) |")
    print("|---|---|---|")
    print(f"| reference (sort-based, authors' formulation) | {secs(r['reference']['seconds'])} | {gib(r['reference']['peak_bytes'])} |")
    print(f"| pcb_fast torch backend (default: PCB's C sweeps) | {secs(r['torch']['seconds'])} | "
          f"{gib(r['torch']['peak_bytes'])} |")
    print(f"| pcb_fast torch backend, fused='off' (eager torch ops) | {secs(r['torch_eager']['seconds'])} | "
          f"{gib(r['torch_eager']['peak_bytes'])} |")
    print(f"| **ratio** (reference / default) | **{r['speedup']:.1f}x faster** (eager: {r['speedup_eager']:.1f}x) | "
          f"**{r['memory_ratio']:.2f} of the reference** |")
    print(f"\nresults identical bit for bit: {'yes' if r['identical'] else 'NO'}\n")

    if not args.skip_vit:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "vit.json"
            subprocess.run([sys.executable, "-m", "benchmarks.bench_cpu", "--repeats", str(args.repeats),
                            "--vit-only", str(path)], check=True, cwd=Path(__file__).parent.parent)
            v = json.loads(path.read_text())
        result["vit_b32"] = v
        print(f"PCB official, ViT-B/32 size: n=8, D={VIT_B32_D:,} fp32 ({gib(v['input_bytes'])} of task vectors)\n")
        print("| path | time | process peak RSS | peak / inputs |")
        print("|---|---|---|---|")
        print(f"| pcb_fast torch backend | {secs(v['torch']['seconds'])} | {gib(v['process_peak_rss_bytes'])} "
              f"| {v['peak_over_inputs']:.2f}x |")
        print()

    reference = r["reference"]["seconds"]["median"]
    rows = []
    for fused in ("off", "auto"):
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "first.json"
            subprocess.run([sys.executable, "-m", "benchmarks.bench_cpu", "--first-call", fused, str(path)], check=True,
                           cwd=Path(__file__).parent.parent)
            rows.append(json.loads(path.read_text()))
    result["first_call"] = rows
    print("PCB official, n=8, D=2^24 from state dicts (pcb_fast.merge), the first merge of a fresh process\n")
    print("| path | first call | second call | first / second | reference / first call |")
    print("|---|---|---|---|---|")
    for row in rows:
        label = "eager (fused='off')" if row["fused"] == "off" else "default (fused='auto': PCB's C sweeps)"
        print(f"| {label} | {row['first_seconds']:.2f} s | {row['warm_seconds']:.2f} s | "
              f"{row['first_seconds'] / row['warm_seconds']:.2f} | **{reference / row['first_seconds']:.1f}x** |")
    print()

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
