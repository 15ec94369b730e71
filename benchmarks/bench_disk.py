"""Out-of-core merge benchmark: `pcb-fast merge` on checkpoints larger than its memory budget.

    python -m benchmarks.bench_disk              # 8 models of 512 MiB + base (4.6 GB), about 5 minutes
    python -m benchmarks.bench_disk --model-mib 64   # a quick run

Writes a base and 8 synthetic fine-tuned checkpoints (fp32, each a Hugging Face folder sharded in 2
safetensors files), then runs PCB official (global) through the CLI in a fresh process, once with
--max-memory 1GB (the task vectors do not fit: every pass re-reads the files, thresholds by radix
select) and once with a budget that holds everything, side by side: wall time and the child's peak
RSS, and whether the two outputs are identical. Prints a markdown table; writes
benchmarks/results/disk.json. The input files stay in the page cache on a machine with enough RAM,
so "re-reading" costs memory bandwidth, not disk bandwidth.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.bench_cpu import machine

RESULTS = Path(__file__).parent / "results"
ROWS, COLS = 2048, 4096  # one tensor: 32 MiB in fp32


def write_checkpoints(folder: Path, n: int, model_mib: int) -> tuple[Path, list, int]:
    """A base and n fine-tuned Hugging Face folders (2 shards each); returns their paths and bytes."""
    from safetensors.torch import save_file

    keys = [f"layers.{i}.weight" for i in range(max(2, model_mib // 32))]
    g = torch.Generator().manual_seed(0)
    base = {k: torch.randn(ROWS, COLS, generator=g) * 0.02 for k in keys}

    def save(state: dict, path: Path):
        path.mkdir(parents=True)
        half = len(keys) // 2
        weight_map = {}
        for i, part in enumerate((keys[:half], keys[half:])):
            name = f"model-{i + 1:05d}-of-00002.safetensors"
            save_file({k: state[k] for k in part}, path / name)
            weight_map.update({k: name for k in part})
        (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        (path / "config.json").write_text('{"model_type": "synthetic"}')

    save(base, folder / "base")
    models = []
    for i in range(n):
        save({k: v + 1e-3 * torch.randn(v.shape, generator=g) for k, v in base.items()}, folder / f"model{i}")
        models.append(folder / f"model{i}")
    total = sum(f.stat().st_size for f in folder.rglob("*.safetensors"))
    return folder / "base", models, total


# The child reads its own peak RSS (VmHWM is per process image, reset by exec); wait4's ru_maxrss
# would also count the pages the child shared with this parent between fork and exec.
CHILD = """
import sys
from pcb_fast.cli import main
rc = main(sys.argv[1:])
with open("/proc/self/status") as f:
    peak = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
print(f"PEAK_RSS_BYTES={peak}")
sys.exit(rc)
"""


def run_merge(base: Path, models: list, out: Path, budget: str) -> dict:
    """The CLI in a fresh process: wall seconds and the process's peak RSS."""
    args = [sys.executable, "-c", CHILD, "merge", "--base", str(base), "--out", str(out), "--quiet",
            "--overwrite", "--max-memory", budget]
    for m in models:
        args += ["--model", str(m)]
    start = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"merge failed: {proc.stderr}")
    peak = int(proc.stdout.split("PEAK_RSS_BYTES=")[1])
    return {"max_memory": budget, "seconds": seconds, "peak_rss_bytes": peak}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=8)
    parser.add_argument("--model-mib", type=int, default=512, help="size of each checkpoint (default 512)")
    parser.add_argument("--dir", type=Path, help="where to write the checkpoints (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=RESULTS / "disk.json")
    args = parser.parse_args(argv)
    folder = Path(tempfile.mkdtemp(prefix="pcb_fast_bench_", dir=args.dir))
    try:
        print(f"writing {args.models} checkpoints of {args.model_mib} MiB and a base into {folder} ...", flush=True)
        base, models, total = write_checkpoints(folder, args.models, args.model_mib)
        runs = [run_merge(base, models, folder / "out_small", "1GB"),
                run_merge(base, models, folder / "out_large", f"{2 * total}B")]
        identical = all((folder / "out_small" / f.name).read_bytes() == f.read_bytes()
                        for f in (folder / "out_large").glob("*.safetensors"))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    info = machine()
    print(f"\nPCB official, global, n={args.models}, fp32 checkpoints totalling {total / 1e9:.2f} GB "
          f"(base included), `pcb-fast merge` in a fresh process on {info['cpu']} ({info['cores']} cores), "
          f"torch {info['torch']}\n")
    print("| --max-memory | time | peak RSS | peak RSS / inputs |")
    print("|---|---|---|---|")
    for r in runs:
        label = "1GB" if r["max_memory"] == "1GB" else f"{int(r['max_memory'][:-1]) / 1e9:.1f}GB (holds all)"
        print(f"| {label} | {r['seconds']:.1f} s | {r['peak_rss_bytes'] / 1e9:.2f} GB | "
              f"{r['peak_rss_bytes'] / total:.2f} |")
    print(f"\noutputs identical: {'yes' if identical else 'NO'}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": info, "models": args.models, "model_mib": args.model_mib,
                                    "input_bytes": total, "runs": runs, "identical": identical}, indent=2))
    print(f"wrote {args.out}")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
