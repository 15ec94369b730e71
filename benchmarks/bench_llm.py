"""LLM-size merges from disk against the speed of the disk: `pcb-fast merge` next to mergekit.

    python -m benchmarks.bench_llm --dir /data/bench          # ~1B parameters, bf16 (~10 GB of inputs)
    python -m benchmarks.bench_llm --dir /data/bench --small  # ~300M parameters, a few minutes

Builds once (cached under --dir) a Llama-style bf16 model (embeddings, 4 attention and 3 MLP
matrices and 2 norms per layer, an untied LM head; 2 safetensors shards) and 4 fine-tunes of it
whose changes are low rank plus sparse. Measures the bound (every input file read once plus the
output's bytes written and flushed, as a merge must) with a cold and a warm page cache, then runs
each merge through the CLI in a fresh process, cold and warm: task arithmetic, TIES (mergekit's
per-tensor options, and global), DARE-TIES, PCB (default budget and --max-memory 2GB), with
mergekit's own CLI on the same YAML when it is installed. "Cold" evicts the inputs from the page
cache (posix_fadvise DONTNEED; no root needed). Prints a markdown table (wall, peak RSS of the
process as the OS reports it, multiple of the warm bound, agreement with mergekit) and writes
benchmarks/results/llm.json (llm_small.json with --small).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.bench_disk import CHILD

RESULTS = Path(__file__).parent / "results"

# (hidden, layers, intermediate, vocab): ~953M and ~322M parameters
SIZES = {"full": (2048, 16, 5632, 32000), "small": (1024, 20, 2816, 32000)}
FINE_TUNES = 4
RANK = 8  # of each fine-tune's low-rank change per matrix
SPARSE = 0.01  # fraction of entries with an extra sparse change


def layout(hidden: int, layers: int, intermediate: int, vocab: int) -> list:
    """(key, shape) of a Llama-style model, in the order the shards hold them."""
    keys = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        keys += [(p + "input_layernorm.weight", (hidden,)), (p + "post_attention_layernorm.weight", (hidden,))]
        keys += [(p + f"self_attn.{m}_proj.weight", (hidden, hidden)) for m in "qkvo"]
        keys += [(p + "mlp.gate_proj.weight", (intermediate, hidden)), (p + "mlp.up_proj.weight", (intermediate, hidden)),
                 (p + "mlp.down_proj.weight", (hidden, intermediate))]
    keys += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    return keys


def _save_folder(folder: Path, shards: list, config: dict) -> None:
    """Write a Hugging Face folder from [(file name, {key: tensor})] shards, atomically (a folder
    whose build was interrupted is rebuilt next time)."""
    from safetensors.torch import save_file

    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weight_map = {}
    for name, state in shards:
        save_file(state, str(tmp / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in state})
    total = sum((tmp / name).stat().st_size for name, _ in shards)
    (tmp / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    tmp.rename(folder)


def build(root: Path, size: str) -> tuple[Path, list]:
    """The base and its fine-tunes under root/llm-<size>/ (built on the first call)."""
    import torch

    hidden, layers, intermediate, vocab = SIZES[size]
    home = root / f"llm-{size}"
    base_dir, model_dirs = home / "base", [home / f"tune{i}" for i in range(FINE_TUNES)]
    if all(d.is_dir() for d in [base_dir] + model_dirs):
        return base_dir, model_dirs
    home.mkdir(parents=True, exist_ok=True)
    keys = layout(hidden, layers, intermediate, vocab)
    half = len(keys) // 2
    parts = [keys[:half], keys[half:]]
    names = [f"model-0000{i + 1}-of-00002.safetensors" for i in range(2)]
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
              "num_hidden_layers": layers, "intermediate_size": intermediate, "vocab_size": vocab,
              "num_attention_heads": hidden // 64, "num_key_value_heads": hidden // 64, "torch_dtype": "bfloat16",
              "tie_word_embeddings": False}
    print(f"building a {sum(torch.Size(s).numel() for _, s in keys) / 1e6:.0f}M-parameter bf16 model and "
          f"{FINE_TUNES} fine-tunes under {home} (once) ...", flush=True)
    g = torch.Generator().manual_seed(0)
    # one shard of every model at a time: the base's shard, then each fine-tune's changes of it
    shards = {d: [] for d in [base_dir] + model_dirs}
    for name, part in zip(names, parts):
        base = {}
        for key, shape in part:
            base[key] = (torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=g) * 0.02)
        shards[base_dir].append((name, {k: v.to(torch.bfloat16) for k, v in base.items()}))
        for d in model_dirs:
            state = {}
            for key, shape in part:
                w = base[key]
                if len(shape) == 2:
                    a = torch.randn(shape[0], RANK, generator=g) * 0.02
                    b = torch.randn(RANK, shape[1], generator=g) * 0.02
                    delta = a @ b
                    flat = delta.view(-1)
                    where = torch.randint(0, flat.numel(), (int(flat.numel() * SPARSE),), generator=g)
                    flat[where] += torch.randn(where.numel(), generator=g) * 2e-3
                else:
                    delta = torch.randn(shape, generator=g) * 1e-3
                state[key] = (w + delta).to(torch.bfloat16)
            shards[d].append((name, state))
            if len(shards[d]) == 2:
                _save_folder(d, shards.pop(d), config)
        del base
    _save_folder(base_dir, shards.pop(base_dir), config)
    return base_dir, model_dirs


def input_files(folders: list) -> list:
    return sorted(f for d in folders for f in Path(d).glob("*.safetensors"))


def evict(files: list) -> None:
    """Drop these files' pages from the page cache (clean pages only: flushed first)."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def measure_bound(files: list, out_bytes: int, scratch: Path) -> float:
    """Seconds to read every input file once (16 MiB reads) and write and flush out_bytes."""
    chunk = bytearray(16 << 20)
    view = memoryview(chunk)
    start = time.perf_counter()
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(view):
                pass
    scratch.mkdir(parents=True, exist_ok=True)
    target = scratch / "bound.bin"
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        left = out_bytes
        while left > 0:
            left -= os.write(fd, view[: min(left, len(view))])
        os.fsync(fd)
    finally:
        os.close(fd)
    seconds = time.perf_counter() - start
    target.unlink()
    return seconds


# The children read their own peak RSS (VmHWM is per process image, reset by exec).
PCB_CHILD = CHILD
MERGEKIT_CHILD = """
import sys
from mergekit.scripts.run_yaml import main
try:
    main(sys.argv[1:], standalone_mode=False)
    rc = 0
except SystemExit as e:
    rc = e.code or 0
with open("/proc/self/status") as f:
    peak = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
print(f"PEAK_RSS_BYTES={peak}")
sys.exit(rc)
"""


def run_child(code: str, args: list) -> dict:
    """Wall seconds, CPU seconds (all its threads) and peak RSS of one fresh process."""
    import resource

    before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code] + args, capture_output=True, text=True)
    seconds, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0 or "PEAK_RSS_BYTES=" not in proc.stdout:
        raise RuntimeError(f"{args[:1]} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"seconds": seconds, "cpu_seconds": cpu,
            "peak_rss_bytes": int(proc.stdout.split("PEAK_RSS_BYTES=")[1].split()[0])}


def yaml_config(method: str, base: Path, models: list, **params) -> str:
    """mergekit's YAML for this merge (a weight on every model, as mergekit-yaml requires)."""
    # computed in float32 by both tools (pcb_fast always does), written in bf16
    lines = [f"merge_method: {method}", f"base_model: {base}", "dtype: float32", "out_dtype: bfloat16", "models:"]
    for m in models:
        lines += [f"  - model: {m}", "    parameters:", "      weight: 1.0"]
        lines += [f"      {k}: {v}" for k, v in params.items()]
    return "\n".join(lines) + "\n"


def compare(a: Path, b: Path) -> dict:
    """Entries that differ between two merged folders (same keys), and the largest difference."""
    from safetensors import safe_open

    def tensors(folder):
        out = {}
        for f in sorted(folder.glob("*.safetensors")):
            with safe_open(str(f), "pt") as fh:
                out.update({k: (f, k) for k in fh.keys()})
        return out

    ta, tb = tensors(a), tensors(b)
    if set(ta) != set(tb):
        return {"same_keys": False}
    differ, total, largest = 0, 0, 0.0
    for key in ta:
        with safe_open(str(ta[key][0]), "pt") as fa, safe_open(str(tb[key][0]), "pt") as fb:
            x, y = fa.get_tensor(key).float(), fb.get_tensor(key).float()
        d = (x - y).abs()
        differ += int((d > 0).sum())
        total += d.numel()
        largest = max(largest, float(d.max()))
    return {"same_keys": True, "entries_differing": differ, "fraction_differing": differ / total,
            "max_abs_difference": largest}


def merges(base: Path, models: list, scratch: Path) -> list:
    """(label, pcb-fast CLI args, the path of mergekit's YAML or None) of every measured merge."""
    models_args = [a for m in models for a in ("--model", str(m))]
    flags = ["--base", str(base)] + models_args

    def config(method: str, **params) -> Path:
        path = scratch / f"{method}.yml"
        path.write_text(yaml_config(method, base, models, **params))
        return path

    ta, ties, dare_ties = config("task_arithmetic"), config("ties", density=0.2), config("dare_ties", density=0.2)
    return [
        ("task_arithmetic", ["--config", str(ta)], ta),
        ("ties 0.2, scope tensor (mergekit's options)", ["--config", str(ties)], ties),
        ("ties 0.2, global", flags + ["--method", "ties", "--density", "0.2"], None),
        ("dare_ties 0.2 (mergekit's options)", ["--config", str(dare_ties)], dare_ties),
        ("pcb 0.1, global, default budget", flags + ["--method", "pcb", "--ratio", "0.1"], None),
        ("pcb 0.1, global, --max-memory 2GB", flags + ["--method", "pcb", "--ratio", "0.1", "--max-memory", "2GB"],
         None),
    ]


class StageTimer:
    """Wall time of one merge in the engine's thread split into stages: each wrapped function's time
    goes to its stage, minus the time of wrapped functions it calls (so no time counts twice); what
    no wrapped function covers is "other" (Python between calls, heap trimming, the passes' setup).
    ``cpu`` holds the engine thread's CPU time the same way (less sensitive to a busy machine)."""

    def __init__(self):
        import threading

        self.seconds, self.cpu = {}, {}
        self._stack = []
        self._main = threading.main_thread()
        self._undo = []

    def wrap(self, owner, name: str, stage: str) -> None:
        import threading

        function = getattr(owner, name)

        def timed(*args, **kwargs):
            if threading.current_thread() is not self._main:  # the reader and writer threads' own work
                return function(*args, **kwargs)
            start, start_cpu = time.perf_counter(), time.thread_time()
            self._stack.append([0.0, 0.0])
            try:
                return function(*args, **kwargs)
            finally:
                inner, inner_cpu = self._stack.pop()
                spent, spent_cpu = time.perf_counter() - start, time.thread_time() - start_cpu
                self.seconds[stage] = self.seconds.get(stage, 0.0) + spent - inner
                self.cpu[stage] = self.cpu.get(stage, 0.0) + spent_cpu - inner_cpu
                if self._stack:
                    self._stack[-1][0] += spent
                    self._stack[-1][1] += spent_cpu

        setattr(owner, name, timed)
        self._undo.append((owner, name, function))

    def restore(self) -> None:
        for owner, name, function in reversed(self._undo):
            setattr(owner, name, function)
        self._undo.clear()


def stage_breakdown(base: Path, models: list, out: Path, **params) -> dict:
    """One PCB merge from files in this process, its wall time split into stages (seconds): read (waits
    for the reader thread, the sink's reads of the base), convert (tau in float32), clip statistics,
    score (the official scores and the collection above the floor), select (thresholds), merge, write
    (rounding to the output dtype, waits for the writer thread), other."""
    import pcb_fast
    from pcb_fast.core import engine, prefetch, select, sources
    from pcb_fast.cpu import native
    from pcb_fast.io import safetensors as st, write_behind
    from pcb_fast.methods import pcb

    timer = StageTimer()
    timer.wrap(prefetch.Prefetcher, "take", "read")
    timer.wrap(st.SafetensorsReader, "read_into", "read")
    timer.wrap(sources.CheckpointSource, "_subtract", "convert")
    timer.wrap(native.ClipTails, "update", "clip statistics")
    timer.wrap(select.TailSelect, "update", "clip statistics")
    timer.wrap(engine.ColumnSample, "add", "clip statistics")
    timer.wrap(pcb, "collect_block_c", "score")
    timer.wrap(pcb.tb, "official_scores", "score")
    timer.wrap(pcb, "select_threshold", "select")
    timer.wrap(engine, "threshold_in_bracket", "select")
    timer.wrap(native, "pcb_merge_entries", "merge")
    timer.wrap(native, "merged_output", "write")
    timer.wrap(write_behind.WriteBehind, "write", "write")
    timer.wrap(write_behind.WriteBehind, "write_segment", "write")
    shutil.rmtree(out, ignore_errors=True)
    start, start_cpu, start_process = time.perf_counter(), time.thread_time(), time.process_time()
    try:
        pcb_fast.merge_checkpoints(str(base), [str(m) for m in models], str(out), method="pcb", **params)
    finally:
        timer.restore()
    total, total_cpu = time.perf_counter() - start, time.thread_time() - start_cpu
    process_cpu = time.process_time() - start_process
    shutil.rmtree(out, ignore_errors=True)
    stages, cpu = dict(timer.seconds), dict(timer.cpu)
    stages["other"] = total - sum(stages.values())
    cpu["other"] = total_cpu - sum(cpu.values())
    return {"total": total, "stages": stages, "engine_thread_cpu": cpu, "process_cpu": process_cpu}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, required=True, help="folder for the models (built once, reused)")
    parser.add_argument("--small", action="store_true", help="~300M parameters instead of ~1B")
    parser.add_argument("--only", help="run only the merges whose label contains this text")
    parser.add_argument("--no-mergekit", action="store_true", help="skip mergekit even when it is installed")
    parser.add_argument("--out", type=Path, help="JSON results (default benchmarks/results/llm[_small].json)")
    parser.add_argument("--stages", action="store_true",
                        help="only the per-stage time of one PCB merge (default budget and --max-memory 2GB)")
    args = parser.parse_args(argv)
    size = "small" if args.small else "full"
    out_json = args.out or RESULTS / ("llm_small.json" if args.small else "llm.json")
    base, models = build(args.dir, size)
    files = input_files([base] + models)
    input_bytes = sum(f.stat().st_size for f in files)
    out_bytes = sum(f.stat().st_size for f in input_files([base]))
    scratch = args.dir / f"runs-{size}"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    have_mergekit = not args.no_mergekit and importlib.util.find_spec("mergekit") is not None
    if args.stages:
        report_stages(base, models, scratch, out_json.with_name(out_json.stem + "_stages.json"))
        return 0
    try:
        evict(files)
        bound = {"cold": measure_bound(files, out_bytes, scratch), "warm": measure_bound(files, out_bytes, scratch)}
        print(f"inputs {input_bytes / 1e9:.2f} GB, output {out_bytes / 1e9:.2f} GB; bound (read all once, write "
              f"the output): cold {bound['cold']:.1f} s, warm {bound['warm']:.1f} s", flush=True)
        rows = []
        for label, cli_args, yaml_path in merges(base, models, scratch):
            if args.only and args.only not in label:
                continue
            row = {"merge": label}
            out = scratch / "pcb_fast_out"
            for state in ("cold", "warm"):
                if state == "cold":
                    evict(files)
                row[f"pcb_fast_{state}"] = run_child(PCB_CHILD, ["merge"] + cli_args +
                                                     ["--out", str(out), "--overwrite", "--quiet"])
                print(f"  {label}: pcb-fast {state} {row[f'pcb_fast_{state}']['seconds']:.1f} s", flush=True)
            if yaml_path is not None and have_mergekit:
                theirs = scratch / "mergekit_out"
                for state in ("cold", "warm"):
                    if state == "cold":
                        evict(files)
                    shutil.rmtree(theirs, ignore_errors=True)
                    row[f"mergekit_{state}"] = run_child(MERGEKIT_CHILD, [str(yaml_path), str(theirs)])
                    print(f"  {label}: mergekit {state} {row[f'mergekit_{state}']['seconds']:.1f} s", flush=True)
                row["agreement"] = compare(out, theirs)
                shutil.rmtree(theirs, ignore_errors=True)
            rows.append(row)
    finally:
        for f in scratch.glob("*_out"):
            shutil.rmtree(f, ignore_errors=True)
    report(rows, bound, input_bytes, out_bytes, size, have_mergekit, out_json)
    return 0


def report_stages(base: Path, models: list, scratch: Path, out_json: Path) -> None:
    """Print and save the per-stage breakdown of one warm PCB merge (after one untimed run), default
    budget and 2 GB."""
    from benchmarks.bench_cpu import machine

    rows = {}
    for label, params in (("default budget", {}), ("--max-memory 2GB", {"max_memory": "2GB"})):
        stage_breakdown(base, models, scratch / "stages_out", **params)  # warms the page cache and the library
        rows[label] = stage_breakdown(base, models, scratch / "stages_out", **params)
    names = sorted({k for r in rows.values() for k in r["stages"]}, key=lambda k: -rows["default budget"]["stages"].get(k, 0))
    print(f"PCB 0.1, global, one merge from files in this process, warm (load: {os.getloadavg()[0]:.1f})\n")
    print("| stage (wall, engine thread's CPU) | " + " | ".join(rows) + " |")
    print("|---|" + "---|" * len(rows))
    for name in names:
        print(f"| {name} | " + " | ".join(f"{r['stages'].get(name, 0):.2f} s ({r['engine_thread_cpu'].get(name, 0):.2f} s)"
                                          for r in rows.values()) + " |")
    print("| **total** (process CPU, all threads) | " + " | ".join(f"**{r['total']:.2f} s** ({r['process_cpu']:.2f} s)"
                                                              for r in rows.values()) + " |")
    out_json.write_text(json.dumps({"machine": machine(), "load": os.getloadavg(), "rows": rows}, indent=2))
    print(f"wrote {out_json}")


def report(rows, bound, input_bytes, out_bytes, size, have_mergekit, out_json: Path) -> None:
    from benchmarks.bench_cpu import machine

    info = machine()
    gb = 1e9
    print(f"\n{'~1B' if size == 'full' else '~300M'}-parameter Llama-style bf16 model, {FINE_TUNES} fine-tunes, "
          f"{input_bytes / gb:.2f} GB of inputs and {out_bytes / gb:.2f} GB written; {info['cpu']} "
          f"({info['cores']} cores), torch {info['torch']}. Bound (read every input once, write and flush the "
          f"output): {bound['cold']:.1f} s cold, {bound['warm']:.1f} s warm.\n")
    print("| merge | pcb-fast cold / warm | peak RSS | warm / bound | mergekit cold / warm | mergekit RSS | agreement |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        ours = f"{r['pcb_fast_cold']['seconds']:.1f} s / {r['pcb_fast_warm']['seconds']:.1f} s"
        rss = max(r["pcb_fast_cold"]["peak_rss_bytes"], r["pcb_fast_warm"]["peak_rss_bytes"]) / 2**30
        ratio = r["pcb_fast_warm"]["seconds"] / bound["warm"]
        theirs, their_rss, agree = "-", "-", "-"
        if "mergekit_cold" in r:
            theirs = f"{r['mergekit_cold']['seconds']:.1f} s / {r['mergekit_warm']['seconds']:.1f} s"
            their_rss = f"{max(r['mergekit_cold']['peak_rss_bytes'], r['mergekit_warm']['peak_rss_bytes']) / 2**30:.1f} GiB"
            a = r["agreement"]
            agree = ("keys differ" if not a["same_keys"] else "identical" if a["entries_differing"] == 0 else
                     f"{a['fraction_differing']:.1e} of entries differ (max {a['max_abs_difference']:.1e})")
            if r["merge"].startswith("dare"):
                agree += "; random drops differ by design (mergekit's torch RNG, pcb_fast's counter hash)"
        print(f"| {r['merge']} | {ours} | {rss:.2f} GiB | {ratio:.1f}x | {theirs} | {their_rss} | {agree} |")
    if not have_mergekit:
        print("\n(mergekit not run: not installed, or --no-mergekit; its columns are empty)")
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps({"machine": info, "size": size, "input_bytes": input_bytes, "output_bytes": out_bytes,
                                    "bound_seconds": bound, "rows": rows}, indent=2))
    print(f"wrote {out_json}")


if __name__ == "__main__":
    sys.exit(main())
