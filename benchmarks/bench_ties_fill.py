"""TIES (global) and DARE-TIES from files: how often the fill of zero sums is guessed wrong, how many
blocks hold entries that depend on it (patched, or merged again), and what each pass costs; beside another checkout
(``--baseline DIR``, e.g. the previous main), alternating in fresh processes on the model of
bench_llm, warm page cache.

    python -m benchmarks.bench_ties_fill --dir DIR [--small] [--repeats 2] --baseline /work/main --scratch DIR

Prints per run the wall and process CPU seconds of every pass, the blocks merged and those with
undecided positions, the medians' ratios (baseline / this checkout), whether the outputs are
identical byte for byte, and the load average; writes benchmarks/results/ties_fill[_small].json
(``--out`` to choose).
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from benchmarks.bench_llm import RESULTS, build

CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
import pcb_fast
from pcb_fast.methods import ties

passes, sweeps = [], []
real_sweep = ties.sweep_with_fill

def counted_sweep(source, options, sink, merge_block, *args):
    blocks = [0, 0, 0]  # merged, with undecided positions, undecided positions

    def counted(*args):  # (number, block, fill), or (number, segment, lo, inputs, fill)
        result = merge_block(*args)
        undecided = result[2]  # their count, or (since the patches) their positions
        undecided = undecided.numel() if undecided.dim() else int(undecided)
        blocks[0] += 1
        blocks[1] += undecided > 0
        blocks[2] += undecided
        return result

    real_sweep(source, options, sink, counted, *args)
    sweeps.append({"blocks_merged": blocks[0], "merges_with_undecided": blocks[1], "undecided_entries": blocks[2]})

ties.sweep_with_fill = counted_sweep

class Bar:
    def __init__(self, total, description):
        self.description, self.total = description, total
        self.start, self.start_cpu = time.perf_counter(), time.process_time()
    def update(self, nbytes):
        pass
    def close(self):
        passes.append({"pass": self.description, "bytes": self.total, "wall": time.perf_counter() - self.start,
                       "process_cpu": time.process_time() - self.start_cpu})

base, out, params = sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
start, start_cpu = time.perf_counter(), time.process_time()
pcb_fast.merge_checkpoints(base, sys.argv[5:], out, overwrite=True, progress=Bar, **params)
print("RESULT=" + json.dumps({"wall": time.perf_counter() - start, "process_cpu": time.process_time() - start_cpu,
                              "passes": passes, "sweeps": sweeps, "pcb_fast": pcb_fast.__file__}))
"""

MERGES = {"ties 0.2, global (the authors' defaults)": {"method": "ties", "density": 0.2},
          "ties 0.2, global, --max-memory 2GB": {"method": "ties", "density": 0.2, "max_memory": "2GB"},
          "ties 0.2, global, mergekit's options": {"method": "ties", "density": 0.2, "sign_ties": "positive",
                                                   "topk": "exact", "min_keep": 1},
          "dare_ties p=0.8 (the authors' defaults)": {"method": "dare_ties", "p": 0.8}}


def run(tree: Path, base: Path, models: list, out: Path, params: dict) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(tree.resolve()), str(base), str(out), json.dumps(params)]
                          + [str(m) for m in models], capture_output=True, text=True, cwd="/")
    if proc.returncode != 0 or "RESULT=" not in proc.stdout:
        raise RuntimeError(f"{tree}: merge failed ({proc.returncode}): {proc.stderr[-2000:]}")
    result = json.loads(proc.stdout.split("RESULT=")[1])
    if not result["pcb_fast"].startswith(str(tree.resolve())):
        raise RuntimeError(f"{tree}: the child imported {result['pcb_fast']}")
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, required=True, help="folder of bench_llm's models")
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--baseline", type=Path, required=True, help="another checkout, run beside this one")
    parser.add_argument("--scratch", type=Path, required=True, help="folder for the outputs (emptied at the end)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    from benchmarks.bench_cpu import machine

    base, models = build(args.dir, "small" if args.small else "full")
    trees = {"this checkout": Path(__file__).resolve().parents[1], str(args.baseline): args.baseline}
    rows, loads = {}, [os.getloadavg()[0]]
    try:
        for label, params in MERGES.items():
            runs = {name: [] for name in trees}
            for _ in range(args.repeats):
                for number, (name, tree) in enumerate(trees.items()):
                    out = args.scratch / str(number) / "merged"  # the same folder name: the model card names it
                    out.parent.mkdir(parents=True, exist_ok=True)
                    result = run(tree, base, models, out, params)
                    result["load"] = os.getloadavg()[0]
                    loads.append(result["load"])
                    runs[name].append(result)
                    print(f"{label}, {name}: {result['wall']:.2f} s wall, {result['process_cpu']:.2f} s CPU; "
                          + "; ".join(f"{p['pass']} {p['wall']:.2f} s ({p['process_cpu']:.2f} s CPU)"
                                      for p in result["passes"]) + f"; sweeps {result['sweeps']}", flush=True)
            folders = [args.scratch / str(number) / "merged" for number in range(len(trees))]
            identical = all(filecmp.cmp(folders[0] / f, folders[1] / f, shallow=False) for f in os.listdir(folders[0]))
            median = {name: {k: statistics.median(r[k] for r in rs) for k in ("wall", "process_cpu")}
                      for name, rs in runs.items()}
            mine, theirs = median["this checkout"], median[str(args.baseline)]
            rows[label] = {"params": params, "runs": runs, "median": median, "identical_bytes": identical,
                           "cpu_ratio": theirs["process_cpu"] / mine["process_cpu"],
                           "wall_ratio": theirs["wall"] / mine["wall"]}
            print(f"{label}: baseline / this checkout, process CPU {rows[label]['cpu_ratio']:.2f}x, wall "
                  f"{rows[label]['wall_ratio']:.2f}x; identical bytes: {identical}", flush=True)
    finally:
        shutil.rmtree(args.scratch, ignore_errors=True)
    out_json = args.out or RESULTS / ("ties_fill_small.json" if args.small else "ties_fill.json")
    out_json.write_text(json.dumps({"machine": machine(), "loads": loads, "rows": rows}, indent=2))
    print(f"load average {min(loads):.1f}-{max(loads):.1f}; wrote {out_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
