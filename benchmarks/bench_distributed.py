"""Distributed merge on one CPU machine: 1 process against 2 (torchrun, gloo), same output bytes.

    python -m benchmarks.bench_distributed          # 4 fine-tunes of a 256 MiB model, about 2 minutes

On a 2-core machine no speedup is expected (the ranks share the cores, and they make the extra
radix-select passes a distributed merge needs); the point is that the result is the same, byte
for byte. Prints a markdown table; writes benchmarks/results/distributed.json.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.bench_cpu import machine
from benchmarks.bench_disk import write_checkpoints

RESULTS = Path(__file__).parent / "results"


def run(world: int, base: Path, models: list, out: Path) -> float:
    args = ["merge", "--base", str(base), "--out", str(out), "--quiet", "--shard-size", "64MB"]
    for m in models:
        args += ["--model", str(m)]
    if world == 1:
        command = [sys.executable, "-m", "pcb_fast", *args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={world}", "--master-port=29641",
                   "-m", "pcb_fast", *args, "--distributed"]
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    return time.perf_counter() - start


def main() -> int:
    folder = Path(tempfile.mkdtemp(prefix="pcb_fast_dist_"))
    try:
        base, models, total = write_checkpoints(folder, 4, 256)
        seconds = {w: run(w, base, models, folder / f"out{w}") for w in (1, 2)}
        names = sorted(p.name for p in (folder / "out1").iterdir())
        identical = names == sorted(p.name for p in (folder / "out2").iterdir()) and all(
            (folder / "out1" / n).read_bytes() == (folder / "out2" / n).read_bytes() for n in names)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    info = machine()
    print(f"PCB official, global, 4 fine-tunes of a 256 MiB fp32 model ({total / 1e9:.2f} GB with the base), "
          f"on {info['cpu']} ({info['cores']} cores), torch {info['torch']}\n")
    print("| processes | time (process start to output) | output |")
    print("|---|---|---|")
    print(f"| 1 | {seconds[1]:.1f} s | reference |")
    print(f"| 2 (torchrun, gloo) | {seconds[2]:.1f} s | {'identical bytes' if identical else 'DIFFERENT'} |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "distributed.json").write_text(json.dumps(
        {"machine": info, "input_bytes": total, "seconds": seconds, "identical": identical}, indent=2))
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
