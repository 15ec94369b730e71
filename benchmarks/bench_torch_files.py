"""Reading a torch zip file (.bin/.pt) in slices: positioned reads beside a memory map, side by side.

    python -m benchmarks.bench_torch_files              # a 200 MiB .bin, 5 rounds
    python -m benchmarks.bench_torch_files --mib 32     # a quick run

Writes one fp32 .bin (torch.save's default: a zip with stored members) of 8 MiB tensors and reads
every tensor in blocks of DEFAULT_BLOCK_WIDTH entries into one reused buffer, as a merge reads its
inputs, two ways, alternating, in one process:

- ``pread``: pcb_fast's reader (``open_checkpoint``: the pickle loaded onto the meta device, values
  read with positioned reads into the buffer);
- ``mmap``: ``torch.load(mmap=True)`` and a copy from the mapped tensor into the buffer (how pcb_fast
  read these files before; a file truncated under the map kills the process with SIGBUS).

The file stays in the page cache, so both measure memory bandwidth and per-read overhead. Prints
the median seconds of each and their ratio; writes benchmarks/results/torch_files.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.bench_cpu import machine
from pcb_fast.core.sources import DEFAULT_BLOCK_WIDTH
from pcb_fast.io.checkpoints import open_checkpoint

RESULTS = Path(__file__).parent / "results"
TENSOR = 1 << 21  # entries of one tensor: 8 MiB in fp32


def read_all(read_into, keys, sizes, buffer) -> float:
    """(seconds to read every tensor in blocks, the sum of the first value of each block: no read is skipped)."""
    start, total = time.perf_counter(), 0.0
    for key in keys:
        for lo in range(0, sizes[key], DEFAULT_BLOCK_WIDTH):
            hi = min(lo + DEFAULT_BLOCK_WIDTH, sizes[key])
            total += float(read_into(key, lo, hi, buffer[: hi - lo])[0])
    return time.perf_counter() - start, total


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=200, help="size of the file (default 200)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS / "torch_files.json")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="pcb_fast_bench_") as folder:
        path = Path(folder) / "pytorch_model.bin"
        g = torch.Generator().manual_seed(0)
        state = {f"layers.{i}.weight": torch.randn(TENSOR, generator=g) for i in range(max(1, args.mib // 8))}
        torch.save(state, path)
        del state
        keys = sorted(torch.load(path, map_location="meta", weights_only=True))
        sizes = {k: TENSOR for k in keys}
        buffer = torch.empty(DEFAULT_BLOCK_WIDTH)

        checkpoint = open_checkpoint(path)
        mapped = torch.load(path, mmap=True, weights_only=True)

        def mmap_read_into(key, lo, hi, out):
            return out.copy_(mapped[key].reshape(-1)[lo:hi])

        ways = {"pread": checkpoint.read_into, "mmap": mmap_read_into}
        seconds = {name: [] for name in ways}
        sums = {}
        read_all(checkpoint.read_into, keys, sizes, buffer)  # the file into the page cache
        for _ in range(args.rounds):
            for name, read_into in ways.items():
                took, sums[name] = read_all(read_into, keys, sizes, buffer)
                seconds[name].append(took)
        checkpoint.close()
        size = path.stat().st_size
    if sums["pread"] != sums["mmap"]:
        print("the two reads differ", file=sys.stderr)
        return 1
    median = {name: statistics.median(s) for name, s in seconds.items()}
    info = machine()
    print(f"\nreading a {size / 2**20:.0f} MiB .bin in blocks of {DEFAULT_BLOCK_WIDTH} entries, median of "
          f"{args.rounds} rounds, on {info['cpu']} ({info['cores']} cores), torch {info['torch']}\n")
    print("| reader | seconds | GB/s | time / mmap |")
    print("|---|---|---|---|")
    for name in ways:
        print(f"| {name} | {median[name]:.3f} | {size / median[name] / 1e9:.2f} | {median[name] / median['mmap']:.2f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": info, "bytes": size, "block_width": DEFAULT_BLOCK_WIDTH,
                                    "seconds": seconds, "median": median}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
