"""PCB from files, the default path (fused="auto": PCB's C sweeps) beside the eager torch ops
(fused="off"), or beside another checkout's default path (``--baseline DIR``, e.g. the previous
main), alternating in fresh processes on the model of bench_llm, warm page cache.

    python -m benchmarks.bench_pcb_paths --dir DIR [--small] [--repeats 2] [--baseline /work/main]

Prints the seconds of each run (wall, and the process's CPU), the medians' ratios per budget,
whether the output folders are identical byte for byte (every file), and the load average; writes
benchmarks/results/pcb_paths[_small].json (``--out`` to choose).
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
    parser.add_argument("--baseline", type=Path, help="another checkout, whose default path runs beside this one's")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    from benchmarks.bench_cpu import machine

    base, models = build(args.dir, "small" if args.small else "full")
    flags = ["--base", str(base)] + [a for m in models for a in ("--model", str(m))] + ["--method", "pcb"]
    if args.baseline is None:  # name -> (child code, extra CLI flags)
        variants = {"default": (PCB_CHILD, []), "fused='off'": (PCB_CHILD, ["--fused", "off"])}
    else:
        baseline = f"import sys\nsys.path.insert(0, {str(args.baseline.resolve())!r})\n" + PCB_CHILD
        variants = {"this checkout": (PCB_CHILD, []), str(args.baseline): (baseline, [])}
    first, second = variants
    scratch = args.dir / "paths"
    scratch.mkdir(parents=True, exist_ok=True)
    rows, loads = {}, [os.getloadavg()[0]]
    for budget in ([], ["--max-memory", "2GB"]):
        label = "default budget" if not budget else "--max-memory 2GB"
        seconds, cpu = {name: [] for name in variants}, {name: [] for name in variants}
        for _ in range(args.repeats):
            for number, (name, (child, extra)) in enumerate(variants.items()):
                out = scratch / str(number) / "merged"  # the same folder name: the model card names it
                shutil.rmtree(out, ignore_errors=True)
                out.parent.mkdir(exist_ok=True)
                result = run_child(child, ["merge"] + flags + budget + extra + ["--out", str(out), "--overwrite",
                                                                                  "--quiet"])
                seconds[name].append(result["seconds"])
                cpu[name].append(result["cpu_seconds"])
                loads.append(os.getloadavg()[0])
                print(f"{label}, {name}: {result['seconds']:.1f} s ({result['cpu_seconds']:.1f} s of CPU)", flush=True)
        same = all(filecmp.cmp(a, scratch / "1" / "merged" / a.name, shallow=False)
                   for a in (scratch / "0" / "merged").iterdir())
        rows[label] = {"seconds": seconds, "cpu_seconds": cpu, "identical": same,
                       "ratio": statistics.median(seconds[second]) / statistics.median(seconds[first]),
                       "cpu_ratio": statistics.median(cpu[second]) / statistics.median(cpu[first])}
    shutil.rmtree(scratch, ignore_errors=True)
    print(f"\nPCB 0.1, global, from files, warm; load average {min(loads):.1f}-{max(loads):.1f} on "
          f"{os.cpu_count()} cores\n")
    print("Medians: wall seconds (process CPU seconds, all threads)\n")
    print(f"| budget | {first} | {second} | {second} / {first}: wall (CPU) | identical |")
    print("|---|---|---|---|---|")
    for label, r in rows.items():
        print("| " + " | ".join([label] + [f"{statistics.median(r['seconds'][v]):.1f} s "
                                          f"({statistics.median(r['cpu_seconds'][v]):.1f} s)" for v in (first, second)])
              + f" | **{r['ratio']:.2f}x** ({r['cpu_ratio']:.2f}x) | {'yes' if r['identical'] else 'NO'} |")
    out_json = args.out or RESULTS / ("pcb_paths_small.json" if args.small else "pcb_paths.json")
    out_json.write_text(json.dumps({"machine": machine(), "date": time.strftime("%Y-%m-%d"), "load": loads,
                                    "variants": list(variants), "rows": rows}, indent=2) + "\n")
    print(f"wrote {out_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
