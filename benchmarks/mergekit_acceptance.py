"""How many real-world mergekit configurations pcb-fast runs, next to mergekit 0.1.5 itself.

    python -m benchmarks.mergekit_acceptance [--configs tests/data/mergekit_configs] [--dir /tmp/mk_accept]

Each YAML file under --configs is a configuration published with a model (its source in the first
line). Every model it names (Hub ids, local paths of the author's machine) is mapped to a tiny local
Llama-style model with a tokenizer (as many layers as its layer ranges need); a LoRA reference
``model+adapter`` gets a tiny PEFT LoRA adapter of that model (its attention's q and v projections,
rank 4). Then the configuration runs through
pcb-fast (``pcb-fast merge --config``) and through mergekit's run_merge. Prints, per file, whether
each accepts and runs it and the first line of each refusal, then the shares and the refusals
grouped by reason.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import shutil
import sys
from collections import Counter
from pathlib import Path

import torch
import yaml

HIDDEN, INTER, VOCAB, DEFAULT_LAYERS = 16, 24, 40, 32


def model_references(raw: dict) -> list:
    """Every model a configuration names (base, models, slice sources, tokenizer sources), in order."""
    refs = [raw.get("base_model")]
    refs += [m.get("model") if isinstance(m, dict) else m for m in raw.get("models") or []]
    for out in raw.get("slices") or []:
        refs += [src.get("model") for src in (out or {}).get("sources") or [] if isinstance(src, dict)]
    refs.append(raw.get("tokenizer_source"))
    block = raw.get("tokenizer") if isinstance(raw.get("tokenizer"), dict) else {}
    refs.append(block.get("source"))
    return [r for r in dict.fromkeys(refs) if isinstance(r, str) and r not in ("base", "union")]


def layers_needed(raw: dict) -> int:
    ends = [src["layer_range"][1] for out in raw.get("slices") or [] for src in (out or {}).get("sources") or []
            if isinstance(src, dict) and isinstance(src.get("layer_range"), list)]
    return max(ends + [DEFAULT_LAYERS])


def tiny_model(folder: Path, layers: int, seed: int, weights: bool = True) -> str:
    """A Llama-style float32 model with ``layers`` layers and a word-level tokenizer (``weights``
    False: its config and tokenizer only, enough to validate a configuration)."""
    from safetensors.torch import save_file

    from .bench_mergekit_methods import llama_shapes

    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    shapes = llama_shapes(HIDDEN, layers, INTER, VOCAB)
    if weights:
        save_file({k: torch.randn(s, generator=g) for k, s in shapes.items()}, folder / "model.safetensors",
                  metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
        "intermediate_size": INTER, "num_hidden_layers": layers, "num_attention_heads": 4, "num_key_value_heads": 4,
        "vocab_size": VOCAB, "tie_word_embeddings": False, "torch_dtype": "float32", "max_position_embeddings": 64,
        "rms_norm_eps": 1e-6}))
    save_word_tokenizer(folder, VOCAB)
    return str(folder)


def tiny_adapter(folder: Path, model: str, seed: int) -> str:
    """A PEFT LoRA adapter folder of the tiny model ``model`` (rank 4 on q_proj and v_proj, random
    factors), in the format PEFT saves."""
    from safetensors.torch import load_file, save_file

    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(1000 + seed)
    factors = {}
    for key, value in load_file(Path(model) / "model.safetensors").items():
        if key.endswith(("q_proj.weight", "v_proj.weight")):
            module = f"base_model.model.{key[:-len('.weight')]}"
            factors[f"{module}.lora_A.weight"] = 0.1 * torch.randn(4, value.shape[1], generator=g)
            factors[f"{module}.lora_B.weight"] = 0.1 * torch.randn(value.shape[0], 4, generator=g)
    save_file(factors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": model, "r": 4, "lora_alpha": 8,
        "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.0, "bias": "none"}))
    return str(folder)


def save_word_tokenizer(folder: Path, size: int) -> None:
    """A word-level tokenizer of ``size`` tokens (t0, t1, ..., <unk>) that transformers loads."""
    import tokenizers

    vocab = {f"t{i}": i for i in range(size - 1)}
    vocab["<unk>"] = size - 1
    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer.save(str(Path(folder) / "tokenizer.json"))
    (Path(folder) / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                                    "unk_token": "<unk>", "model_max_length": 64}))


def localised(raw: dict, root: Path, weights: bool = True) -> dict:
    """``raw`` with every model reference replaced by a tiny local model (LoRA suffixes kept)."""
    layers = layers_needed(raw)
    folders = {}
    for ref in model_references(raw):
        model = ref.split("+")[0]
        if model not in folders:
            folders[model] = tiny_model(root / f"m{len(folders)}", layers, len(folders), weights)

    adapters = {}
    for ref in model_references(raw):
        model, plus, adapter = ref.partition("+")
        if plus and adapter not in adapters:
            folder = root / "adapters" / re.sub(r"\W", "_", adapter)
            adapters[adapter] = tiny_adapter(folder, folders[model], len(adapters)) if weights else str(folder)

    def local(ref):
        if not isinstance(ref, str) or ref in ("base", "union"):
            return ref
        model, plus, adapter = ref.partition("+")
        return folders[model] + (plus + adapters[adapter] if plus else "")

    text = json.dumps(raw)
    for ref in sorted(model_references(raw), key=len, reverse=True):  # (a reference inside another: longest first)
        text = text.replace(json.dumps(ref), json.dumps(local(ref)))
    return json.loads(text)


def first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__)[:300]


def run_pcb_fast(config_path: Path, out: Path) -> tuple:
    from pcb_fast.cli import main as cli

    err = io.StringIO()
    with contextlib.redirect_stderr(err):  # (mergekit's rounding, to compare the values)
        code = cli(["merge", "--config", str(config_path), "--out", str(out), "--quiet", "--compute-dtype", "mergekit"])
    lines = [line for line in err.getvalue().splitlines() if "error" in line or "failed" in line]
    return code == 0, "" if code == 0 else (lines[-1] if lines else err.getvalue().strip()[-300:])


def run_mergekit(raw: dict, out: Path) -> tuple:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    try:
        with contextlib.redirect_stderr(io.StringIO()):
            run_merge(MergeConfiguration.model_validate(raw), str(out), MergeOptions(
                copy_tokenizer=True, quiet=True, lora_merge_cache=str(out.parent / "lora_cache")))
        return True, ""
    except BaseException as e:  # (pydantic errors, mergekit's RuntimeErrors, missing adapters)
        if isinstance(e, KeyboardInterrupt):
            raise
        return False, first_line(e)


def compare(ours: Path, theirs: Path) -> str:
    """How many output entries differ (keys and shapes first), and why where it is by design."""
    from safetensors.torch import load_file

    a, b = (load_file(folder / "model.safetensors") for folder in (ours, theirs))
    if sorted(a) != sorted(b) or any(a[k].shape != b[k].shape for k in a):
        return "other keys or shapes"
    differ = sum(int((a[k].to(b[k].dtype) != b[k]).sum()) for k in a)
    total = sum(v.numel() for v in a.values())
    return f"{differ} of {total}" + ("" if a[next(iter(a))].dtype == b[next(iter(b))].dtype else " (other dtype)")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default=str(Path(__file__).parent.parent / "tests" / "data" / "mergekit_configs"))
    parser.add_argument("--dir", default="/tmp/mergekit_acceptance")
    args = parser.parse_args(argv)
    import warnings

    warnings.simplefilter("ignore")
    root = Path(args.dir)
    rows = []
    for path in sorted(Path(args.configs).glob("*.yaml")):
        work = root / path.stem
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        raw = localised(yaml.safe_load(path.read_text()), work / "models")
        (work / "config.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
        ours, ours_why = run_pcb_fast(work / "config.yaml", work / "pcb-fast")
        theirs, theirs_why = run_mergekit(raw, work / "mergekit")
        differ = compare(work / "pcb-fast", work / "mergekit") if ours and theirs else ""
        rows.append((path.stem, raw.get("merge_method"), ours, ours_why, theirs, theirs_why, differ))
        print(f"{path.stem}: pcb-fast {'runs' if ours else 'refuses: ' + ours_why}; "
              f"mergekit {'runs' if theirs else 'fails: ' + theirs_why}{'; ' + differ if differ else ''}", flush=True)
        shutil.rmtree(work / "models", ignore_errors=True)
    n = len(rows)
    both = [r for r in rows if r[4]]
    print(f"\n{n} configurations; pcb-fast runs {sum(r[2] for r in rows)} ({sum(r[2] for r in rows) / n:.0%}), "
          f"mergekit runs {len(both)} ({len(both) / n:.0%}); of those mergekit runs, pcb-fast runs "
          f"{sum(r[2] for r in both)} ({sum(r[2] for r in both) / max(1, len(both)):.0%})")
    reasons = Counter(re.sub(r"/\S+", "<path>", r[3]) for r in rows if not r[2])
    if reasons:
        print("\npcb-fast's refusals:")
        for reason, count in reasons.most_common():
            print(f"  {count} x {reason}")
    failures = Counter(re.sub(r"/\S+", "<path>", r[5]) for r in rows if not r[4])
    if failures:
        print("\nmergekit's failures:")
        for reason, count in failures.most_common():
            print(f"  {count} x {reason}")
    print("\n| configuration | method | pcb-fast | mergekit | entries differing (pcb-fast with --compute-dtype mergekit) |")
    print("|---|---|---|---|---|")
    for name, method, ours, ours_why, theirs, theirs_why, differ in rows:
        print(f"| {name} | {method} | {'runs' if ours else 'refuses'} | {'runs' if theirs else 'fails'} | "
              f"{differ or '-'} |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
