"""The benchmark suite in one command: scaling of time and peak memory with D and with n.

    pip install -e ".[bench]" && python -m benchmarks.run          # about 10 minutes on a 2-core CPU
    python -m benchmarks.run --quick                                # small sizes only (a smoke run)

In one process and one run, side by side on the same inputs (fp32 task vectors of scale 1e-3):
- PCB official (global, ratio 0.1, clamp 1e-4) through the reference path (the authors'
  sort-based formulation), the torch backend, and the triton backend (on a CUDA GPU only);
- every baseline method through the engine (torch backend);
- mergekit's own TIES and task arithmetic (per tensor, up to D = 2^24) when mergekit is
  installed, with the number of entries that differ from ours under mergekit's options.
Sizes: D = 2^16 ... 2^27 at n = 8 (baselines up to 2^25), and n = 2 ... 32 at D = 2^22, each path as
far as this machine's memory allows (a path is skipped where its expected peak would not fit).
Every time is the median of the repeats with min and max (a call over 5 s runs once); every peak memory is the RSS added by the call. Writes
benchmarks/results/suite.json (machine, versions, git sha), suite.md and the log-log plots
scaling_D.png and scaling_n.png.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
from pathlib import Path

import torch

import pcb_fast
from benchmarks.bench_cpu import machine
from benchmarks.memory import measure
from pcb_fast.core.memory import available_memory

RESULTS = Path(__file__).parent / "results"
BASELINES = [("average", {}), ("task_arithmetic", {}), ("ties", dict(density=0.2)), ("dare", dict(p=0.9)),
             ("dare_ties", dict(p=0.9)), ("breadcrumbs", dict(gamma=0.01, beta=0.1))]
# peak memory above the inputs, as a multiple of the input bytes (measured here, with margin)
EXPECTED_PEAK = {"reference": 13.0, "torch": 1.0, "baseline": 6.0, "mergekit": 4.0}


SLOW = 5.0  # seconds: a call this slow runs once (its run-to-run spread is small next to the ratios)


def timed(fn, repeats: int) -> dict:
    seconds, peaks, result = [], [], None
    for i in range(repeats):
        result, s, peak, before = measure(fn)
        seconds.append(s)
        peaks.append(peak - before)
        if s > SLOW:
            break
        if i < repeats - 1:
            del result
            result = None
    return {"result": result, "seconds": {"min": min(seconds), "median": statistics.median(seconds),
                                          "max": max(seconds)}, "peak_bytes": max(peaks)}


def fits(kind: str, input_bytes: int) -> bool:
    return input_bytes * (1 + EXPECTED_PEAK[kind]) < 0.8 * available_memory()


def mergekit_functions():
    """mergekit's TIES and task arithmetic on one tensor, written with its own functions; None if
    mergekit is not installed."""
    try:
        from mergekit import sparsify
        from mergekit.merge_methods.generalized_task_arithmetic import get_mask
    except ImportError:
        return None

    def ties(base, tv, density):
        deltas = torch.stack([sparsify.sparsify(row, density, sparsify.SparsificationMethod.magnitude) for row in tv])
        mask = get_mask(deltas, method="sum")
        divisor = mask.sum(dim=0).float()
        divisor[divisor == 0] = 1
        return base + (deltas * mask).sum(dim=0) / divisor

    def task_arithmetic(base, tv):
        return base + tv.sum(dim=0)

    return {"ties": ties, "task_arithmetic": task_arithmetic}


def one_size(n: int, D: int, repeats: int, with_baselines: bool, peers) -> dict:
    """Every path at one (n, D); each result's seconds, peak memory and agreement."""
    tv = torch.randn(n, D, generator=torch.Generator().manual_seed(0)) * 1e-3
    input_bytes = tv.numel() * 4
    row = {"n": n, "D": D, "input_bytes": input_bytes, "paths": {}}
    slow = max(1, repeats // 3)

    if fits("torch", input_bytes):
        r = timed(lambda: pcb_fast.pcb_merge(tv, backend="torch"), repeats)
        row["paths"]["pcb torch"] = {k: v for k, v in r.items() if k != "result"}
        ours = r["result"]
        if fits("reference", input_bytes):
            ref = timed(lambda: pcb_fast.pcb_merge(tv, backend="reference"), 1 if D >= 1 << 22 else slow)
            row["paths"]["pcb reference"] = {k: v for k, v in ref.items() if k != "result"}
            row["pcb_identical"] = bool(torch.equal(ours, ref["result"]))
            del ref
        del ours
    if torch.cuda.is_available():
        device_tv = tv.cuda()
        pcb_fast.pcb_merge(device_tv, backend="triton")

        def on_gpu():
            out = pcb_fast.pcb_merge(device_tv, backend="triton")
            torch.cuda.synchronize()
            return out

        r = timed(on_gpu, repeats)
        row["paths"]["pcb triton"] = {"seconds": r["seconds"], "peak_bytes": None}
        del device_tv
    if with_baselines and fits("baseline", input_bytes):
        base = {"w": torch.zeros(D)}
        models = [{"w": tv[i]} for i in range(n)]  # views: the task vectors themselves
        for method, params in BASELINES:
            r = timed(lambda: pcb_fast.merge(base, models, method=method, **params), repeats)
            row["paths"][method] = {k: v for k, v in r.items() if k != "result"}
            if peers and method in peers and fits("mergekit", input_bytes) and D <= 1 << 24:
                ours = pcb_fast.merge(base, models, method=method, scope="tensor", sign_ties="positive",
                                      topk="exact", **params) if method == "ties" else r["result"]
                peer = peers[method]
                call = (lambda: peer(base["w"], tv, params["density"])) if method == "ties" else \
                    (lambda: peer(base["w"], tv))
                m = timed(call, repeats)
                row["paths"][f"mergekit {method}"] = {k: v for k, v in m.items() if k != "result"}
                row[f"mergekit_{method}_max_abs_diff"] = float((ours["w"] - m["result"]).abs().max())
                row[f"mergekit_{method}_differing"] = int((ours["w"] != m["result"]).sum())
            del r
    del tv
    gc.collect()
    return row


def markdown(rows: list, axis: str) -> str:
    paths = []
    for r in rows:
        paths += [p for p in r["paths"] if p not in paths]
    lines = [f"| {axis} | " + " | ".join(paths) + " | reference / torch |", "|---|" + "---|" * (len(paths) + 1)]
    for r in rows:
        cells = []
        for p in paths:
            v = r["paths"].get(p)
            if v is None:
                cells.append("-")
                continue
            mem = "" if v["peak_bytes"] is None else f", {v['peak_bytes'] / 2**20:.0f} MiB"
            cells.append(f"{v['seconds']['median']:.3g} s{mem}")
        ratio = "-"
        if "pcb reference" in r["paths"] and "pcb torch" in r["paths"]:
            ratio = f"**{r['paths']['pcb reference']['seconds']['median'] / r['paths']['pcb torch']['seconds']['median']:.1f}x**"
        label = f"2^{r['D'].bit_length() - 1}" if axis == "D" else str(r["n"])
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {ratio} |")
    return "\n".join(lines)


def plot(rows: list, axis: str, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for r in rows:
        paths += [p for p in r["paths"] if p not in paths]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.5))
    for p in paths:
        pts = [(r[axis], r["paths"][p]) for r in rows if p in r["paths"]]
        xs = [x for x, _ in pts]
        style = dict(marker="o", linewidth=2.5 if p.startswith("pcb") else 1.2,
                     linestyle="--" if p.startswith(("pcb reference", "mergekit")) else "-")
        ax_t.plot(xs, [v["seconds"]["median"] for _, v in pts], label=p, **style)
        mems = [(x, v["peak_bytes"]) for x, v in pts if v["peak_bytes"] is not None]
        if mems:
            ax_m.plot([x for x, _ in mems], [max(m, 1 << 20) / 2**20 for _, m in mems], label=p, **style)
    for ax, label in ((ax_t, "seconds (median)"), (ax_m, "peak memory above inputs (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("D (entries per task)" if axis == "D" else "n (tasks)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    ax_t.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes only (checks the plumbing)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    exponents = range(16, 21, 2) if args.quick else [16, 18, 20, 22, 24, 25, 26, 27]
    ns = [2, 8] if args.quick else [2, 4, 8, 16, 32]
    n_at = 1 << (16 if args.quick else 22)
    peers = mergekit_functions()
    info = machine()
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    pcb_fast.pcb_merge(torch.randn(8, 1 << 16) * 1e-3)  # warm up the thread pool
    by_D = []
    for e in exponents:
        by_D.append(one_size(8, 1 << e, args.repeats, with_baselines=e <= 25, peers=peers))
        print(f"D=2^{e}: " + ", ".join(f"{p} {v['seconds']['median']:.3g} s" for p, v in by_D[-1]["paths"].items()),
              flush=True)
    by_n = []
    for n in ns:
        by_n.append(one_size(n, n_at, args.repeats, with_baselines=True, peers=None))
        print(f"n={n}: " + ", ".join(f"{p} {v['seconds']['median']:.3g} s" for p, v in by_n[-1]["paths"].items()),
              flush=True)
    where = f"{info['cpu']} ({info['cores']} cores, {info['threads']} thread{'s' if info['threads'] != 1 else ''}), torch {info['torch']}"
    text = (f"Machine: {where}{', GPU ' + info['gpu'] if 'gpu' in info else ''}; git {info['git']}.\n\n"
            f"Time (median of {args.repeats}) and peak memory above the inputs, n=8, fp32:\n\n"
            + markdown(by_D, "D") + f"\n\nThe same at D=2^{n_at.bit_length() - 1}, by number of tasks:\n\n"
            + markdown(by_n, "n"))
    peers_note = []
    for r in by_D:
        for m in ("ties", "task_arithmetic"):
            if f"mergekit_{m}_max_abs_diff" in r:
                peers_note.append(f"mergekit {m} at D=2^{r['D'].bit_length() - 1}: "
                                  f"{r[f'mergekit_{m}_differing']} of {r['D']:,} entries differ from pcb_fast with "
                                  f"mergekit's options (largest difference {r[f'mergekit_{m}_max_abs_diff']:.2e})")
    if peers_note:
        text += ("\n\nmergekit side by side (TIES: scope tensor, sign_ties positive, topk exact). Entries can differ "
                 "only where magnitudes tie at the threshold: mergekit keeps an arbitrary one of them (its argsort "
                 "is not stable), pcb_fast the first by position.\n\n" + "\n".join(f"- {line}" for line in peers_note))
    print("\n" + text)
    if args.quick:
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "suite.md").write_text(text + "\n")
    (args.out / "suite.json").write_text(json.dumps({"machine": info, "repeats": args.repeats, "by_D": by_D,
                                                     "by_n": by_n}, indent=2))
    plot(by_D, "D", args.out / "scaling_D.png", f"n=8 task vectors, fp32 - {where}")
    plot(by_n, "n", args.out / "scaling_n.png", f"D=2^{n_at.bit_length() - 1}, fp32 - {where}")
    print(f"\nwrote {args.out / 'suite.md'}, suite.json, scaling_D.png, scaling_n.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
