"""PCB from files, the default path (fused="auto": PCB's C sweeps) beside the eager torch ops
(fused="off"), alternating in fresh processes on the model of bench_llm, warm page cache.

    python -m benchmarks.bench_pcb_paths --dir DIR [--small] [--repeats 2]

Prints the seconds of each run, the medians' ratio per budget, whether the output folders are
identical byte for byte (every file), and the load average; writes benchmarks/results/pcb_paths[_small].json.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

from benchmarks.bench_llm import PCB_CHILD, RESULTS, build, run_child


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    from benchmarks.bench_cpu import machine

    base, models = build(args.dir, "small" if args.small else "full")
    flags = ["--base", str(base)] + [a for m in models for a in ("--model", str(m))] + ["--method", "pcb"]
    scratch = args.dir / "paths"
    scratch.mkdir(parents=True, exist_ok=True)
    rows, loads = {}, [os.getloadavg()[0]]
    for budget in ([], ["--max-memory", "2GB"]):
        label = "default budget" if not budget else "--max-memory 2GB"
        seconds = {"auto": [], "off": []}
        for _ in range(args.repeats):
            for fused in ("auto", "off"):
                out = scratch / fused / "merged"  # the same folder name: the model card names it
                shutil.rmtree(out, ignore_errors=True)
                out.parent.mkdir(exist_ok=True)
                result = run_child(PCB_CHILD, ["merge"] + flags + budget + ["--fused", fused, "--out", str(out),
                                                                            "--overwrite", "--quiet"])
                seconds[fused].append(result["seconds"])
                loads.append(os.getloadavg()[0])
                print(f"{label}, fused={fused}: {result['seconds']:.1f} s", flush=True)
        same = all(filecmp.cmp(a, scratch / "off" / "merged" / a.name, shallow=False)
                   for a in (scratch / "auto" / "merged").iterdir())
        rows[label] = {"seconds": seconds, "identical": same,
                       "eager_over_default": statistics.median(seconds["off"]) / statistics.median(seconds["auto"])}
    shutil.rmtree(scratch, ignore_errors=True)
    print(f"\nPCB 0.1, global, from files, warm; load average {min(loads):.1f}-{max(loads):.1f} on "
          f"{os.cpu_count()} cores\n")
    print("| budget | default (C sweeps) | fused='off' (eager) | eager / default | identical |")
    print("|---|---|---|---|---|")
    for label, r in rows.items():
        print(f"| {label} | {statistics.median(r['seconds']['auto']):.1f} s | {statistics.median(r['seconds']['off']):.1f} s "
              f"| **{r['eager_over_default']:.2f}x** | {'yes' if r['identical'] else 'NO'} |")
    out_json = RESULTS / ("pcb_paths_small.json" if args.small else "pcb_paths.json")
    out_json.write_text(json.dumps({"machine": machine(), "date": time.strftime("%Y-%m-%d"), "load": loads,
                                    "rows": rows}, indent=2) + "\n")
    print(f"wrote {out_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
