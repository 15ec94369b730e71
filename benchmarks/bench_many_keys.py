"""Per-key overhead: a model of many tiny tensors against one tensor of the same total size.

    python -m benchmarks.bench_many_keys [--keys 300000] [--methods task_arithmetic,ties,pcb] [--repeats 2]
    python -m benchmarks.bench_many_keys --keys 3000 --methods all --compare-with /work/main  # byte for byte

Writes, in a temporary folder, a base and two fine-tunes as single safetensors files (bf16, as the
safetensors library lays them out): once with ``--keys`` tensors of 1 to 4 entries each, once with
one tensor holding the same entries. Each method then merges both models with ``merge_checkpoints``
in this process, alternating, and the table gives the seconds, their ratio and the microseconds
per key beyond the one-tensor merge. Writes benchmarks/results/many_keys.json.

``--compare-with DIR``: runs every method also with the pcb_fast of the checkout DIR (a fresh
process with DIR first on sys.path) on the many-key model and says whether the outputs are
identical byte for byte, and the seconds of both; writes benchmarks/results/many_keys_compare_KEYS.json.

``--alternate-with DIR --cases ties:tensor,task_arithmetic,...``: per case (a method, ``:tensor`` for
scope="tensor" with mergekit's options, ``@memory`` for pcb_fast.merge of state dicts loaded
beforehand), fresh processes of this checkout and of DIR taking turns, each timing a merge of the
many-key model and one of the one-tensor model after a warm-up merge; the microseconds per key
beyond the one tensor of both, their ratio and the load average; writes
benchmarks/results/many_keys_alternating_KEYS.json (``--out`` names another file).
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.bench_llm import RESULTS

METHODS = {"task_arithmetic": {}, "average": {}, "ties": {"density": 0.5}, "pcb": {"ratio": 0.2},
           "dare_ties": {"p": 0.5}, "breadcrumbs": {}, "dare": {"p": 0.5}}


def write_model(path: Path, keys: int | None, values: torch.Tensor) -> None:
    """A safetensors file of ``values`` (bf16): ``keys`` tensors of 1-4 entries, or one tensor."""
    data = values.to(torch.bfloat16).contiguous()
    if keys is None:
        header = {"w": {"dtype": "BF16", "shape": [data.numel()], "data_offsets": [0, 2 * data.numel()]}}
    else:
        header, at = {}, 0
        for i in range(keys):  # names sorted as written (the library's order)
            size = 1 + i % 4
            header[f"k{i:07d}"] = {"dtype": "BF16", "shape": [size], "data_offsets": [2 * at, 2 * (at + size)]}
            at += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.write(data.view(torch.uint8).numpy().tobytes())


def build(folder: Path, keys: int) -> dict:
    """{"many": (base, [models]), "one": (base, [models])} under ``folder``."""
    entries = sum(1 + i % 4 for i in range(keys))
    g = torch.Generator().manual_seed(0)
    base = torch.randn(entries, generator=g)
    states = [base] + [base + 0.01 * torch.randn(entries, generator=g) for _ in range(2)]
    built = {}
    for kind in ("many", "one"):
        paths = []
        for j, values in enumerate(states):
            path = folder / f"{kind}{j}.safetensors"
            write_model(path, keys if kind == "many" else None, values)
            paths.append(path)
        built[kind] = (paths[0], paths[1:])
    return built


def merge_once(base, models, out: Path, method: str) -> float:
    from pcb_fast.drivers.files import merge_checkpoints

    started = time.perf_counter()
    merge_checkpoints(base, models, out, method=method, overwrite=True, **METHODS[method])
    return time.perf_counter() - started


CHILD = """
import sys
import time
sys.path.insert(0, sys.argv[1])
from pcb_fast.drivers.files import merge_checkpoints
import json
base, models, out, method, params = sys.argv[2], json.loads(sys.argv[3]), sys.argv[4], sys.argv[5], json.loads(sys.argv[6])
started = time.perf_counter()
merge_checkpoints(base, models, out, method=method, overwrite=True, **params)
print(time.perf_counter() - started)
"""


# mergekit's options where it merges per tensor (mergekit_defaults of the specs), at the densities above
TENSOR_PARAMS = {"ties": {"density": 0.5, "topk": "exact", "sign_ties": "positive", "min_keep": 1},
                 "dare_ties": {"p": 0.5, "rescale": "l1", "sign_ties": "positive", "normalize": False},
                 "pcb": {"ratio": 0.2}}

TIMED = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
import pcb_fast
case, built = json.loads(sys.argv[2]), json.loads(sys.argv[3])
out = sys.argv[4]
memory = case["source"] == "memory"
if memory:
    from safetensors.torch import load_file
    built = {kind: [load_file(p) for p in [base] + models] for kind, (base, models) in built.items()}

def merge(kind):
    started = time.perf_counter()
    if memory:
        pcb_fast.merge(built[kind][0], built[kind][1:], method=case["method"], scope=case["scope"], **case["params"])
    else:
        base, models = built[kind]
        pcb_fast.merge_checkpoints(base, models, out, method=case["method"], scope=case["scope"], overwrite=True,
                                   **case["params"])
    return time.perf_counter() - started

merge("one")  # the C library loaded, the imports done
print(json.dumps({"many": merge("many"), "one": merge("one")}))
"""


def parse_case(text: str) -> dict:
    """``method[:tensor][@memory]`` as a case of --alternate-with."""
    text, _, source = text.partition("@")
    method, _, scope = text.partition(":")
    scope = scope or "global"
    params = TENSOR_PARAMS.get(method, METHODS[method]) if scope == "tensor" else METHODS[method]
    return {"name": text + ("@memory" if source else ""), "method": method, "scope": scope, "params": params,
            "source": source or "files"}


def alternate_with(checkout: Path, built: dict, folder: Path, cases: list, keys: int, repeats: int) -> dict:
    """Per case: fresh processes of this checkout and of ``checkout`` taking turns (TIMED), ``repeats``
    each; the medians of the microseconds per key beyond the one-tensor merge."""
    paths = {kind: (str(base), list(map(str, models))) for kind, (base, models) in built.items()}
    rows = {}
    for case in cases:
        runs = {"here": [], "there": []}
        loads = []
        for _ in range(repeats):
            for side, root in (("here", Path(__file__).resolve().parents[1]), ("there", checkout)):
                done = subprocess.run([sys.executable, "-c", TIMED, str(root), json.dumps(case), json.dumps(paths),
                                       str(folder / f"alt-{side}")], check=True, capture_output=True, text=True)
                runs[side].append(json.loads(done.stdout.splitlines()[-1]))
                loads.append(os.getloadavg()[0])
        row = {"case": case, "load": loads}
        for side, timings in runs.items():
            many = statistics.median(t["many"] for t in timings)
            one = statistics.median(t["one"] for t in timings)
            row[side] = {"runs": timings, "many": many, "one": one, "us_per_key": (many - one) / keys * 1e6}
        row["ratio"] = row["there"]["us_per_key"] / row["here"]["us_per_key"]
        rows[case["name"]] = row
        print(f"{case['name']}: {row['here']['us_per_key']:.1f} us per key here, {row['there']['us_per_key']:.1f} "
              f"there ({row['ratio']:.1f}x); load {min(loads):.1f}-{max(loads):.1f}", flush=True)
    return rows


def compare_with(checkout: Path, built: dict, folder: Path, methods: list) -> dict:
    """Per method: whether this checkout's output equals the one of ``checkout`` byte for byte, and
    the seconds of both merges."""
    base, models = built["many"]
    same = {}
    for method in methods:
        ours, theirs = folder / f"ours-{method}", folder / f"theirs-{method}"
        seconds = merge_once(base, models, ours, method)
        done = subprocess.run([sys.executable, "-c", CHILD, str(checkout), str(base), json.dumps(list(map(str, models))),
                               str(theirs), method, json.dumps(METHODS[method])], check=True, cwd=folder,
                              capture_output=True, text=True)
        identical = all(filecmp.cmp(ours / f.name, theirs / f.name, shallow=False)
                        for f in theirs.iterdir() if f.suffix in (".safetensors", ".json"))
        same[method] = {"identical": identical, "seconds": seconds, "seconds_there": float(done.stdout.split()[-1]),
                        "load": os.getloadavg()[0]}
        print(f"{method}: {'identical' if identical else 'DIFFERENT'} to {checkout}; {seconds:.2f} s here, "
              f"{same[method]['seconds_there']:.2f} s there (load {os.getloadavg()[0]:.1f})", flush=True)
    return same


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=300_000)
    parser.add_argument("--methods", default="task_arithmetic,ties,pcb")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--compare-with", type=Path, default=None)
    parser.add_argument("--alternate-with", type=Path, default=None)
    parser.add_argument("--cases", default="task_arithmetic,ties:tensor")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    from benchmarks.bench_cpu import machine

    methods = list(METHODS) if args.methods == "all" else args.methods.split(",")
    folder = Path(tempfile.mkdtemp(prefix="pcb_fast_many_keys_"))
    try:
        built = build(folder, args.keys)
        entries = sum(1 + i % 4 for i in range(args.keys))
        if args.alternate_with is not None:
            rows = alternate_with(args.alternate_with, built, folder, list(map(parse_case, args.cases.split(","))),
                                  args.keys, args.repeats)
            out = args.out or RESULTS / f"many_keys_alternating_{args.keys}.json"
            out.write_text(json.dumps({"machine": machine(), "date": time.strftime("%Y-%m-%d"), "keys": args.keys,
                                       "entries": entries, "other": str(args.alternate_with), "cases": rows},
                                      indent=2) + "\n")
            print(f"wrote {out}")
            return 0
        if args.compare_with is not None:
            same = compare_with(args.compare_with, built, folder, methods)
            out = RESULTS / f"many_keys_compare_{args.keys}.json"
            out.write_text(json.dumps({"machine": machine(), "date": time.strftime("%Y-%m-%d"), "keys": args.keys,
                                       "other": str(args.compare_with), "methods": same}, indent=2) + "\n")
            print(f"wrote {out}")
            return 0 if all(row["identical"] for row in same.values()) else 1
        merge_once(*built["one"], folder / "warm", methods[0])  # the C library loaded, the imports done
        rows, loads = {}, [os.getloadavg()[0]]
        for method in methods:
            seconds = {"many": [], "one": []}
            for _ in range(args.repeats):
                for kind in ("one", "many"):
                    seconds[kind].append(merge_once(*built[kind], folder / f"out-{kind}", method))
                    loads.append(os.getloadavg()[0])
            many, one = statistics.median(seconds["many"]), statistics.median(seconds["one"])
            rows[method] = {"seconds": seconds, "ratio": many / one, "us_per_key": (many - one) / args.keys * 1e6}
            print(f"{method}: {args.keys} keys {many:.2f} s, one tensor {one:.3f} s", flush=True)
        print(f"\n{args.keys} bf16 tensors of 1-4 entries ({entries} entries, {2 * entries / 1e6:.1f} MB per model), "
              f"base + 2 fine-tunes, merge_checkpoints in one process; load average "
              f"{min(loads):.1f}-{max(loads):.1f} on {os.cpu_count()} cores\n")
        print("| method | many keys | one tensor | ratio | us per key beyond one tensor |")
        print("|---|---|---|---|---|")
        for method, r in rows.items():
            print(f"| {method} | {statistics.median(r['seconds']['many']):.2f} s | "
                  f"{statistics.median(r['seconds']['one']):.3f} s | {r['ratio']:.1f}x | {r['us_per_key']:.1f} |")
        out = RESULTS / "many_keys.json"
        out.write_text(json.dumps({"machine": machine(), "date": time.strftime("%Y-%m-%d"), "keys": args.keys,
                                   "entries": entries, "load": loads, "rows": rows}, indent=2) + "\n")
        print(f"wrote {out}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
