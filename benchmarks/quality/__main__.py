"""Merge-quality benchmark on real data (scikit-learn's digits), a miniature of the paper's table.

    pip install -e ".[bench]" && python -m benchmarks.quality      # three seeds (its time: docs/benchmarks.md)
    python -m benchmarks.quality --out benchmarks/results         # refresh the tracked results
    python -m benchmarks.quality --smoke                          # two tasks, a few epochs

Eight tasks made of the same digits seen through different transformations and label maps, one
shared 361,600-parameter encoder pre-trained on plain digits and fine-tuned gently on each task
with the task's head fixed (see tasks.py, models.py); every merge method with its hyperparameters
chosen on the validation split (run.py). Repeated over seeds (different splits, initialisations and
fine-tunes). Writes quality.{json,md,png} into --out, by default a new folder
benchmarks/results/runs/quality-<UTC time>/, so that a run never overwrites the tracked results.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks.bench_cpu import machine

from .run import FULL, SMOKE, run

RESULTS = Path(__file__).resolve().parent.parent / "results"


def new_run_folder() -> Path:
    """A folder of its own for this run's files, under RESULTS/runs/, named by the UTC time."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    for i in itertools.count():
        folder = RESULTS / "runs" / (f"quality-{stamp}" + (f"-{i}" if i else ""))
        try:
            folder.mkdir(parents=True)
            return folder
        except FileExistsError:  # another run started within the same second
            continue


def mean(xs):
    return sum(xs) / len(xs)


def summarize(runs: list) -> list:
    """Per row: seed-0 per-task test accuracies, the average over tasks for every seed, normalized
    accuracy (merged / individual, per task, averaged) for every seed."""
    rows = []
    for i, first in enumerate(runs[0]["rows"]):
        averages = [mean(r["rows"][i]["test"]) for r in runs]
        normalized = [mean([a / b for a, b in zip(r["rows"][i]["test"], r["rows"][1]["test"])]) for r in runs]
        rows.append({"row": first["row"], "chosen": first["chosen"], "tasks": first["test"], "averages": averages,
                     "normalized": normalized})
    return rows


def markdown(tasks: list, rows: list) -> str:
    seeds = len(rows[0]["averages"])
    head = ["method (chosen on validation, seed 0)"] + tasks + ["avg", "normalized", f"avg over {seeds} seeds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        chosen = ", ".join(f"{k}={v}" for k, v in r["chosen"].items() if k != "lambdas")
        name = r["row"] + (f" ({chosen})" if chosen else "")
        spread = statistics.stdev(r["averages"]) if seeds > 1 else 0.0
        cells = [f"{100 * a:.1f}" for a in r["tasks"]] + [f"**{100 * r['averages'][0]:.1f}**",
                                                            f"{100 * r['normalized'][0]:.1f}",
                                                            f"{100 * mean(r['averages']):.1f} ± {100 * spread:.1f}"]
        lines.append("| " + " | ".join([name] + cells) + " |")
    return "\n".join(lines)


def chart(rows: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["row"] for r in rows]
    values = [100 * mean(r["averages"]) for r in rows]
    errors = [100 * statistics.stdev(r["averages"]) if len(r["averages"]) > 1 else 0.0 for r in rows]
    colors = ["#999999", "#555555"] + ["#6c8ebf"] * 4 + ["#d6792b"] * (len(rows) - 6)
    fig, ax = plt.subplots(figsize=(10, 4.5))
    ax.bar(range(len(rows)), values, yerr=errors, color=colors, capsize=3)
    ax.set_xticks(range(len(rows)), names, rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("average test accuracy over 8 tasks (%)")
    ax.set_title(f"Merging 8 digit tasks (mean ± sd over {len(rows[0]['averages'])} seeds)")
    for x, (v, e) in enumerate(zip(values, errors)):
        ax.text(x, v + e + 1.5, f"{v:.1f}", ha="center", fontsize=7)
    ax.set_ylim(0, 105)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="two tasks, a few epochs (checks the plumbing)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for quality.{json,md,png} (default: a new benchmarks/results/runs/quality-<UTC "
                             "time>/; --out benchmarks/results refreshes the tracked results)")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    config = SMOKE if args.smoke else FULL
    runs = [run(config, seed=seed, log=print if seed == 0 else (lambda *a: None)) for seed in range(args.seeds)]
    rows = summarize(runs)
    table = markdown(runs[0]["tasks"], rows)
    print("\nTest accuracy (%) per task; individual = each fine-tuned encoder on its own task;"
          " normalized = merged / individual.\n")
    print(table)
    if args.smoke:
        return 0
    out = args.out or new_run_folder()
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.md").write_text(table + "\n")
    (out / "quality.json").write_text(json.dumps(
        {"machine": machine(), "config": {k: v for k, v in config.items() if k != "tasks"}, "tasks": runs[0]["tasks"],
         "seconds": [r["seconds"] for r in runs], "parameters": runs[0]["parameters"], "runs": runs,
         "summary": rows}, indent=2, default=str))
    chart(rows, out / "quality.png")
    print(f"\nwrote {out / 'quality.md'}, quality.json, quality.png "
          f"({sum(r['seconds'] for r in runs):.0f} s for {args.seeds} seeds)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
