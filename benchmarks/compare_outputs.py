"""Every method's output from files, byte for byte, against another checkout (e.g. the previous main).

    python -m benchmarks.compare_outputs --baseline /path/to/other/checkout [--dir /tmp/compare_outputs]

Builds once (cached under --dir) a small Llama-style model and three fine-tunes, in float32 and in
bfloat16, then runs each merge through the CLI (`python -m pcb_fast merge`) in a fresh process
with this checkout and with the baseline's (PYTHONPATH first), into folders of the same name, and
compares every file of the two outputs byte for byte. The merges: every method the CLI takes, in
global and per-tensor scope where it has both, the options that choose other paths (PCB's inter
and variant, TIES' mergekit options, L1 rescales), budgets small enough to take the over-budget
paths, the eager torch ops (``--fused off``), and mergekit's other methods from YAML. Prints one
line per merge and a summary; exits non-zero when an output differs or a merge fails.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.bench_mergekit_methods import build, configs

HIDDEN, LAYERS, INTER, VOCAB = 256, 4, 704, 4096
SMALL_BUDGET = "10MB"  # below what PCB and TIES collect on this model: their over-budget paths


def flag_merges(p: dict) -> list:
    """(name, CLI flags after --base/--model) of the merges given by flags."""
    merges = []
    for scope in ("global", "tensor"):
        s = ["--scope", scope]
        merges += [
            (f"pcb {scope}", ["--method", "pcb"] + s),
            (f"pcb {scope} normalized_sum", ["--method", "pcb", "--inter", "normalized_sum"] + s),
            (f"pcb {scope} pairwise", ["--method", "pcb", "--inter", "pairwise"] + s),
            (f"pcb {scope} paper", ["--method", "pcb", "--variant", "paper"] + s),
            (f"pcb {scope} eager", ["--method", "pcb", "--fused", "off"] + s),
            (f"ties {scope}", ["--method", "ties"] + s),
            (f"ties {scope} mergekit options", ["--method", "ties", "--sign-ties", "positive", "--topk", "exact"] + s),
            (f"ties {scope} eager", ["--method", "ties", "--fused", "off"] + s),
            (f"dare {scope}", ["--method", "dare", "--p", "0.5"] + s),
            (f"dare_ties {scope}", ["--method", "dare_ties", "--p", "0.7"] + s),
            (f"task_arithmetic {scope}", ["--method", "task_arithmetic", "--lam", "0.7"] + s),
            (f"average {scope}", ["--method", "average"] + s),
        ]
    merges += [
        ("pcb global, small budget", ["--method", "pcb", "--max-memory", SMALL_BUDGET]),
        ("pcb global ratio 0.5, small budget", ["--method", "pcb", "--ratio", "0.5", "--max-memory", SMALL_BUDGET]),
        ("ties global, small budget", ["--method", "ties", "--max-memory", SMALL_BUDGET]),
        ("breadcrumbs", ["--method", "breadcrumbs"]),
        ("breadcrumbs_ties", ["--method", "breadcrumbs_ties"]),
    ]
    return merges


def yaml_merges(p: dict) -> list:
    """(name, mergekit configuration) of the merges given by YAML: mergekit's methods and options."""
    three = [{"model": p[f"ft{i}"], "parameters": {"weight": 1.0, "density": 0.4}} for i in range(3)]
    ours = [(name, raw) for name, raw in configs(p, LAYERS)]
    ours += [(f"yaml {method}", {"merge_method": method, "base_model": p["base"], "models": three,
                                 "parameters": {"normalize": False} if method != "task_arithmetic" else {}})
             for method in ("ties", "dare_ties", "dare_linear", "breadcrumbs_ties", "task_arithmetic")]
    return ours


def run(checkout: Path, args: list, out: Path) -> tuple[bool, str]:
    """One CLI merge in a fresh process importing pcb_fast from ``checkout``: (ok, last error line)."""
    env = dict(os.environ, PYTHONPATH=str(checkout))
    done = subprocess.run([sys.executable, "-m", "pcb_fast", "merge", *args, "--out", str(out), "--quiet"],
                          env=env, capture_output=True, text=True)
    return done.returncode == 0, (done.stderr.strip().splitlines() or [""])[-1]


def same_files(a: Path, b: Path) -> list[str]:
    """The files that differ (or exist in one folder only) between two output folders."""
    names = sorted({p.name for p in a.iterdir()} | {p.name for p in b.iterdir()})
    return [n for n in names if not ((a / n).is_file() and (b / n).is_file()
                                     and filecmp.cmp(a / n, b / n, shallow=False))]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, required=True, help="the other checkout (its repository root)")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/compare_outputs"))
    parser.add_argument("--only", help="run only the merges whose name contains this text")
    args = parser.parse_args(argv)
    import yaml

    here = Path(__file__).resolve().parent.parent
    failures, compared, start = [], 0, time.perf_counter()
    for dtype in (torch.float32, torch.bfloat16):
        label = str(dtype).removeprefix("torch.")
        p = build(args.dir / f"models-{label}", HIDDEN, LAYERS, INTER, VOCAB, dtype, shards=2)
        flags = ["--base", p["base"]] + [a for i in range(3) for a in ("--model", p[f"ft{i}"])]
        cases = [(name, flags + extra) for name, extra in flag_merges(p)]
        for name, raw in yaml_merges(p):
            config = args.dir / f"{label}-{name.replace(' ', '_').replace('/', '_')}.yml"
            config.write_text(yaml.safe_dump(raw))
            cases.append((name, ["--config", str(config)]))
        for name, cli_args in cases:
            if args.only and args.only not in name:
                continue
            results = {}
            for side, checkout in (("this", here), ("baseline", args.baseline)):
                out = args.dir / side / "merged"
                shutil.rmtree(out, ignore_errors=True)
                out.parent.mkdir(parents=True, exist_ok=True)
                results[side] = run(checkout, cli_args, out)
            (ok, error), (base_ok, base_error) = results["this"], results["baseline"]
            if ok and base_ok:
                differ = same_files(args.dir / "this" / "merged", args.dir / "baseline" / "merged")
                verdict = "identical" if not differ else f"DIFFER: {', '.join(differ)}"
                compared += 1
            elif ok != base_ok:
                differ, verdict = [name], f"FAILED in {'this checkout' if not ok else 'the baseline'}: {error or base_error}"
            else:  # a case list that no longer runs is a failure of this tool
                differ, verdict = [name], f"FAILED in both: {error}"
            if differ:
                failures.append(f"{label} {name}")
            print(f"{label:8s} {name:40s} {verdict}", flush=True)
    print(f"\n{compared} merges compared in {time.perf_counter() - start:.0f} s; "
          + (f"{len(failures)} differ: {failures}" if failures else "every output identical byte for byte"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
