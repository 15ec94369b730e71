"""The triton backend's distributed merge on several GPUs (NCCL, one GPU per rank): the bytes of one
process, and the seconds of each (docs/design.md 8).

    python -m benchmarks.gpu_check_distributed [--out benchmarks/results/gpu_check_distributed.json] [--quick]

Run by ``bash benchmarks/gpu_check.sh`` when the machine has more than one GPU. Writes n fine-tunes of
a model of many keys (bf16 and fp32 keys) to a temporary folder, merges them with the triton backend in
one process (``--device cuda``) and under torchrun with one process per GPU (``--distributed``, at most
``--ranks``), for PCB (both variants), TIES (exact top-k) and DARE-TIES, global and per tensor, and
checks that every output file is identical. Exits 1 if any differs or fails. ``--quick``: a small
model; without CUDA it runs under TRITON_INTERPRET=1 on the CPU over gloo (the plumbing only; the
tests run it so).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
CASES = [  # merge flags
    ["--method", "pcb", "--ratio", "0.1"],
    ["--method", "pcb", "--variant", "paper", "--ratio", "0.2"],
    ["--method", "ties", "--density", "0.2", "--topk", "exact"],
    ["--method", "dare_ties", "--p", "0.7", "--seed", "3"],
    ["--method", "pcb", "--inter", "pairwise", "--scope", "tensor"],
]


def write_models(folder: Path, n: int, rows: int, width: int) -> list:
    """A base and ``n`` fine-tunes of 12 keys ([rows, width] each; the last three bf16, one of them
    of an odd length) as safetensors; returns the merge flags naming them."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    shapes = {f"layers.{i:02d}.weight": (rows, width) for i in range(9)}
    shapes |= {"embed.weight": (rows, width), "head.weight": (rows, width // 2), "norm.bias": (width * 3 + 1,)}
    bf16 = {"embed.weight", "head.weight", "norm.bias"}
    base = {k: (torch.randn(s, generator=gen) * 0.02).to(torch.bfloat16 if k in bf16 else torch.float32)
            for k, s in shapes.items()}
    save_file(base, str(folder / "base.safetensors"))
    flags = ["--base", str(folder / "base.safetensors")]
    for i in range(n):
        # quantized steps: ties at every threshold, exact zeros, cancellations in the sign election
        tuned = {k: (v.float() + torch.randint(-3, 4, v.shape, generator=gen) * 1e-3).to(v.dtype)
                 for k, v in base.items()}
        save_file(tuned, str(folder / f"ft{i}.safetensors"))
        flags += ["--model", str(folder / f"ft{i}.safetensors")]
    return flags


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(world: int, flags: list, out: Path, device: str) -> float:
    args = ["merge", *flags, "--backend", "triton", "--device", device, "--out", str(out), "--quiet"]
    if world == 1:
        command = [sys.executable, "-m", "pcb_fast", *args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={world}",
                   f"--master-port={_port()}", "-m", "pcb_fast", *args, "--distributed"]
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:6])} ... exited {proc.returncode}: {proc.stderr[-1500:]}")
    return time.perf_counter() - start


def same_files(a: Path, b: Path) -> list:
    """Names of the files that differ between two output folders (the model card names its folder)."""
    names = sorted({p.name for p in a.iterdir()} | {p.name for p in b.iterdir()})

    def content(folder, name):
        path = folder / name
        if not path.exists():
            return None
        data = path.read_bytes()
        return data.replace(f"# {folder.name}\n".encode(), b"# <name>\n") if name == "README.md" else data

    return [name for name in names if content(a, name) != content(b, name)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS / "gpu_check_distributed.json")
    parser.add_argument("--ranks", type=int, default=4, help="at most this many processes (one per GPU)")
    parser.add_argument("--quick", action="store_true", help="a small model (plumbing only)")
    parser.add_argument("--cases", default=None, help="comma-separated indices of the cases to run (default: all)")
    args = parser.parse_args(argv)
    if torch.cuda.is_available():
        device, gpus = "cuda", torch.cuda.device_count()
        if gpus < 2:
            print("gpu_check_distributed: one GPU only; nothing to check", file=sys.stderr)
            return 2
        world, name = min(gpus, args.ranks), f"{gpus} x {torch.cuda.get_device_name()}"
    elif os.environ.get("TRITON_INTERPRET") == "1":
        device, world, name = "cpu", 2, "cpu (Triton interpreter, gloo)"
    else:
        print("gpu_check_distributed: no CUDA device (TRITON_INTERPRET=1 --quick tries the plumbing on a CPU)",
              file=sys.stderr)
        return 2
    n, rows, width = (3, 16, 64) if args.quick else (8, 512, 4096)  # 9 files of 12 keys of ~2M entries: ~0.8 GB
    folder = Path(tempfile.mkdtemp(prefix="pcb_fast_gpu_dist_"))
    results, failed = [], 0
    import pcb_fast

    machine = {"devices": name, "torch": torch.__version__, "pcb_fast": pcb_fast.__version__}
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def write(done: bool) -> None:
        # after every case: a run stopped by its time limit leaves what it measured
        partial = args.out.with_name(args.out.name + ".partial")
        partial.write_text(json.dumps({"machine": machine, "complete": done, "checks": results}, indent=1) + "\n")
        partial.replace(args.out)

    print(f"gpu_check_distributed on {name}: {world} ranks, n={n}", flush=True)
    try:
        flags = write_models(folder, n, rows, width) + ["--shard-size", str(rows * width * 4)]  # ~a shard a key
        chosen = range(len(CASES)) if args.cases is None else [int(k) for k in args.cases.split(",")]
        for k in chosen:
            case = CASES[k]
            row = {"case": " ".join(case), "ranks": world}
            try:
                row["seconds_1"] = round(run(1, flags + case, folder / f"one{k}", device), 2)
                row[f"seconds_{world}"] = round(run(world, flags + case, folder / f"many{k}", device), 2)
                row["differing_files"] = same_files(folder / f"one{k}", folder / f"many{k}")
                row["ok"] = not row["differing_files"]
            except Exception as e:  # noqa: BLE001 - recorded, and the run fails
                row.update(error=str(e), ok=False)
            failed += not row["ok"]
            results.append(row)
            write(False)
            print(f"{'ok  ' if row['ok'] else 'FAIL'} " + ", ".join(f"{key}={v}" for key, v in row.items()), flush=True)
            shutil.rmtree(folder / f"one{k}", ignore_errors=True)
            shutil.rmtree(folder / f"many{k}", ignore_errors=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    write(True)
    print(f"{len(results) - failed} of {len(results)} distributed checks passed; wrote {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
