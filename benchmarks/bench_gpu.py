"""GPU benchmark of the triton backend: time per pass and end to end, GB/s, against the reference.

    python -m benchmarks.bench_gpu             # on a machine with a CUDA GPU
    python -m benchmarks.bench_gpu --smoke     # tiny sizes under TRITON_INTERPRET=1 on a CPU (plumbing only)

For n=8 task vectors at D=2^24 and at the authors' ViT-B/32 size (D=113,448,705), fp32 and bf16
(and n=64 at D=2^22, fp32),
PCB official (global, ratio 0.1, clamp 1e-4, inter "sum"): seconds of each pass of the triton
backend (device synchronised around each), GB/s of its reads, the time of one read of the inputs
(torch.sum over them, the practical floor of a pass) and the ratio to it; end-to-end median over
repeats; the reference path (the authors' sort-based formulation) on the same GPU where it fits in
memory, its ratio, and the agreement of the two results; then each baseline method on the triton
backend at D=2^24 against the torch backend on the CPU (the torch backend is CPU-only in this
version). Prints markdown tables; writes benchmarks/results/gpu.json after every case (``"complete":
false`` until the last: a run stopped by a time limit leaves what it measured).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

if "--smoke" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch  # noqa: E402

import pcb_fast  # noqa: E402
from pcb_fast.gpu import backend as triton_backend  # noqa: E402

RESULTS = Path(__file__).parent / "results"
VIT_B32_D = 113_448_705
PASSES = ("magnitude", "score", "merge")  # the three reads; a bracket that missed adds "... radix level 1" to "4"


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def seconds_of(fn, device, repeats: int) -> list:
    out = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - start)
    return out


def case(n: int, D: int, dtype, device, repeats: int, with_reference: bool) -> dict:
    gen = torch.Generator(device=device).manual_seed(0)
    tv = (torch.randn(n, D, generator=gen, device=device) * 1e-3).to(dtype)
    input_bytes = tv.numel() * tv.element_size()
    read = seconds_of(lambda: tv.sum(dtype=torch.float32), device, repeats)
    one_read = statistics.median(read)

    if device.type == "cuda":  # compile the kernels for this shape (the interpreter compiles nothing)
        pcb_fast.pcb_merge(tv, backend="triton")
    profiles = []
    for _ in range(repeats):
        profile = {}
        out = torch.empty(D, device=device)
        triton_backend.pcb_merge_matrix(list(tv), out, profile=profile)
        profiles.append(profile)
    passes = {name: statistics.median(p[name] for p in profiles) for name in PASSES}
    last = {}  # the output of the last timed merge, compared with the reference below
    total = seconds_of(lambda: last.update(out=pcb_fast.pcb_merge(tv, backend="triton")), device, repeats)
    result = {
        "n": n, "D": D, "dtype": str(dtype).replace("torch.", ""), "input_bytes": input_bytes,
        "one_read_seconds": one_read, "one_read_gbps": input_bytes / one_read / 1e9,
        "passes": {name: {"seconds": s, "gbps": input_bytes / s / 1e9, "x_one_read": s / one_read}
                   for name, s in passes.items()},
        "triton_seconds": {"min": min(total), "median": statistics.median(total), "max": max(total)},
        "triton_x_one_read_per_pass": statistics.median(total) / (len(PASSES) * one_read),
        # against the bound of the 3-read scheme (docs/design.md 10)
        "triton_x_three_reads": statistics.median(total) / (3 * one_read),
    }
    if with_reference:
        try:
            ours = last.pop("out")
            ref_seconds = seconds_of(lambda: pcb_fast.pcb_merge(tv, backend="reference"), device, 1)
            ref = pcb_fast.pcb_merge(tv, backend="reference")
            result["reference_seconds"] = ref_seconds[0]
            result["speedup_vs_reference"] = ref_seconds[0] / statistics.median(total)
            scale = float(ref.abs().max()) or 1.0
            result["max_rel_diff"] = float((ours - ref).abs().max()) / scale
            result["mask_disagreements"] = int(((ours != 0) != (ref != 0)).sum())
            del ours, ref
        except torch.OutOfMemoryError:
            result["reference_seconds"] = "out of memory"
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
    del tv
    return result


BASELINES = [("average", {}), ("task_arithmetic", {}), ("ties", dict(density=0.2)), ("dare", dict(p=0.9)),
             ("dare_ties", dict(p=0.9)), ("breadcrumbs", {})]


def baselines(n: int, D: int, device, repeats: int):
    """Each baseline on the triton backend against the torch backend on the CPU (same inputs), one row
    at a time."""
    gen = torch.Generator().manual_seed(1)
    base = {"w": torch.randn(D, generator=gen) * 0.02}
    models = [{"w": base["w"] + 1e-3 * torch.randn(D, generator=gen)} for _ in range(n)]
    on_device = ({"w": base["w"].to(device)}, [{"w": m["w"].to(device)} for m in models])
    for method, params in BASELINES:
        if device.type == "cuda":  # compile (the interpreter compiles nothing)
            pcb_fast.merge(*on_device, method=method, backend="triton", **params)
        gpu = seconds_of(lambda: pcb_fast.merge(*on_device, method=method, backend="triton", **params), device,
                         repeats)
        cpu = seconds_of(lambda: pcb_fast.merge(base, models, method=method, backend="torch", **params),
                         torch.device("cpu"), 1)
        yield {"method": method, "triton_seconds": statistics.median(gpu), "torch_cpu_seconds": cpu[0]}


def table(results: list) -> str:
    lines = ["| n | D | dtype | one read (GB/s) | " + " | ".join(PASSES) + " | end to end | x (passes x one read) "
             "| reference | speedup | mask diff |",
             "|---|---|---|---|" + "---|" * len(PASSES) + "---|---|---|---|---|"]
    for r in results:
        cells = [f"{p['seconds'] * 1e3:.2f} ms ({p['gbps']:.0f} GB/s)" for p in r["passes"].values()]
        ref = r.get("reference_seconds", "not run")
        ref = f"{ref:.3f} s" if isinstance(ref, float) else ref
        speed = f"{r['speedup_vs_reference']:.0f}x" if "speedup_vs_reference" in r else "-"
        lines.append(f"| {r['n']} | {r['D']:,} | {r['dtype']} | {r['one_read_seconds'] * 1e3:.2f} ms "
                     f"({r['one_read_gbps']:.0f}) | " + " | ".join(cells)
                     + f" | {r['triton_seconds']['median'] * 1e3:.1f} ms | {r['triton_x_one_read_per_pass']:.1f}"
                     f" | {ref} | {speed} | {r.get('mask_disagreements', '-')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes under the Triton interpreter on the CPU")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-vit", action="store_true")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path, written after every case (default: results/gpu.json; none with --smoke)")
    args = parser.parse_args(argv)
    if args.smoke:
        device, sizes, dtypes, repeats = torch.device("cpu"), [4096], [torch.float32, torch.bfloat16], 1
    else:
        if not torch.cuda.is_available():
            print("bench_gpu: no CUDA device here; run it on a GPU machine (or --smoke to check the plumbing)",
                  file=sys.stderr)
            return 2
        device, repeats = torch.device("cuda"), args.repeats
        sizes = [1 << 24] + ([] if args.skip_vit else [VIT_B32_D])
        dtypes = [torch.float32, torch.bfloat16]
    import triton

    machine = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (Triton interpreter)",
               "torch": torch.__version__, "triton": triton.__version__, "pcb_fast": pcb_fast.__version__}
    out = args.out if args.out is not None else (None if args.smoke else RESULTS / "gpu.json")
    results, others = [], []

    def write(done: bool) -> None:
        # after every case: a run stopped by its time limit leaves what it measured
        if out is None:
            return
        out.parent.mkdir(parents=True, exist_ok=True)
        partial = out.with_name(out.name + ".partial")
        partial.write_text(json.dumps({"machine": machine, "complete": done, "results": results,
                                       "baselines": others}, indent=2))
        partial.replace(out)

    plan = [(8, D, dtype) for D in sizes for dtype in dtypes]
    # 64 tasks: each program rereads its tasks' rows for the inter term; whether they still come from
    # the L2 (64 rows x BLOCK per program) is what this case shows
    plan.append((64, sizes[0] // 4, torch.float32))
    for n, D, dtype in plan:
        results.append(case(n, D, dtype, device, repeats, with_reference=True))
        write(False)
    for row in baselines(8, sizes[0], device, repeats):
        others.append(row)
        write(False)
    write(True)
    print(f"PCB official, global, ratio 0.1, clamp 1e-4, n=8 on {machine['device']} "
          f"(torch {machine['torch']}, triton {machine['triton']})\n")
    print(table(results))
    print(f"\nBaselines, n=8, D={sizes[0]:,} fp32: triton backend against the torch backend on this machine's CPU\n")
    print("| method | triton | torch (CPU) | ratio |\n|---|---|---|---|")
    for r in others:
        print(f"| {r['method']} | {r['triton_seconds'] * 1e3:.2f} ms | {r['torch_cpu_seconds'] * 1e3:.1f} ms | "
              f"{r['torch_cpu_seconds'] / r['triton_seconds']:.1f}x |")
    if out is not None:
        print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
