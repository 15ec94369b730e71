"""mergekit's other methods and slices: `pcb-fast merge --config` next to mergekit 0.1.5 on the same YAML.

    python -m benchmarks.bench_mergekit_methods [--dir /tmp/bench_mk] [--hidden 512 --layers 8] [--only NAME]

Builds once (cached under --dir) a float32 Llama-style model and three fine-tunes, then runs each
configuration (--only: those whose name starts with NAME) with mergekit's run_merge and with
pcb-fast's CLI in this process, alternating, warm page cache, best of --repeat runs each. Prints a
markdown table: method, seconds of each tool, the speed ratio (mergekit / pcb-fast), the ratio to
mergekit with its output flushed to disk (pcb-fast fsyncs its shards before publishing the folder,
mergekit leaves that to the OS: "mergekit + fsync" times both to the same point) and the entries
that differ from mergekit run on one thread
(its sums over long tensors depend on the thread count; pcb_fast's do not). DELLA's draws differ by design
(torch.bernoulli against pcb_fast's counter generator), so only its speed is compared.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import torch


def llama_shapes(hidden: int, layers: int, inter: int, vocab: int) -> dict:
    """Key -> shape of an untied Llama-style model."""
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,),
              "lm_head.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + f"self_attn.{m}_proj.weight": (hidden, hidden) for m in "qkvo"})
        shapes.update({p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
                       p + "mlp.down_proj.weight": (hidden, inter), p + "input_layernorm.weight": (hidden,),
                       p + "post_attention_layernorm.weight": (hidden,)})
    return shapes


def build(folder: Path, hidden: int, layers: int, inter: int, vocab: int, dtype: torch.dtype = torch.float32,
          shards: int = 1) -> dict:
    """name -> path of a base and three fine-tunes under ``folder`` (built once): float32 values
    rounded to ``dtype``, each model's keys split over ``shards`` safetensors files."""
    from safetensors.torch import save_file

    names = {}
    g = torch.Generator().manual_seed(0)
    shapes = llama_shapes(hidden, layers, inter, vocab)
    base = {k: torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()}
    variants = {"base": base}
    for i, scale in enumerate((0.002, 0.01, 0.02)):
        variants[f"ft{i}"] = {k: v + scale * torch.randn(v.shape, generator=g) for k, v in base.items()}
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
              "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": 8,
              "num_key_value_heads": 8, "vocab_size": vocab, "tie_word_embeddings": False,
              "torch_dtype": str(dtype).removeprefix("torch.")}
    for name, state in variants.items():
        path = folder / name
        names[name] = str(path)
        if (path / "config.json").exists():
            continue
        path.mkdir(parents=True, exist_ok=True)
        keys = list(state)
        for part in range(shards):
            chunk = {k: state[k].to(dtype).contiguous() for k in keys[part * len(keys) // shards:
                                                                        (part + 1) * len(keys) // shards]}
            file = "model.safetensors" if shards == 1 else f"model-{part + 1:05d}-of-{shards:05d}.safetensors"
            save_file(chunk, path / file, metadata={"format": "pt"})
        (path / "config.json").write_text(json.dumps(config))
    return names


def configs(p: dict, layers: int) -> list:
    two = [{"model": p["ft1"], "parameters": {"weight": 0.4}}, {"model": p["ft2"], "parameters": {"weight": 0.6}}]
    three = [{"model": p[f"ft{i}"], "parameters": {"weight": 1.0, "density": 0.5}} for i in range(3)]
    t = [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]}, {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
         {"value": 0.5}]
    half = layers // 2
    return [
        ("slerp (t filters and gradients)", {"merge_method": "slerp", "base_model": p["base"],
                                             "models": [{"model": p["ft2"]}], "parameters": {"t": t}}),
        ("slerp over slices", {"merge_method": "slerp", "base_model": p["base"], "parameters": {"t": 0.4},
                               "slices": [{"sources": [{"model": p["base"], "layer_range": [0, layers]},
                                                       {"model": p["ft2"], "layer_range": [0, layers]}]}]}),
        ("nuslerp", {"merge_method": "nuslerp", "base_model": p["base"], "models": two}),
        ("multislerp", {"merge_method": "multislerp", "base_model": p["base"],
                        "models": [dict(m, parameters={"weight": 1.0}) for m in three]}),
        ("karcher", {"merge_method": "karcher", "models": [{"model": p[f"ft{i}"]} for i in range(3)]}),
        ("model_stock", {"merge_method": "model_stock", "base_model": p["base"],
                         "models": [{"model": p[f"ft{i}"]} for i in range(3)]}),
        ("nearswap", {"merge_method": "nearswap", "base_model": p["base"], "models": [{"model": p["ft2"]}],
                      "parameters": {"t": 0.01}}),
        ("sce", {"merge_method": "sce", "base_model": p["base"], "models": [{"model": p[f"ft{i}"]} for i in range(3)],
                 "parameters": {"select_topk": 0.5}}),
        ("arcee_fusion", {"merge_method": "arcee_fusion", "base_model": p["base"], "models": [{"model": p["ft2"]}]}),
        ("ram", {"merge_method": "ram", "base_model": p["base"], "models": [{"model": p[f"ft{i}"]} for i in range(3)]}),
        ("ramplus_tl", {"merge_method": "ramplus_tl", "base_model": p["base"],
                        "models": [{"model": p[f"ft{i}"]} for i in range(3)], "parameters": {"r": 0.5, "alpha": 0.5}}),
        ("della", {"merge_method": "della", "base_model": p["base"], "models": three, "parameters": {"epsilon": 0.1}}),
        ("della_linear", {"merge_method": "della_linear", "base_model": p["base"], "models": three,
                          "parameters": {"epsilon": 0.1}}),
        ("passthrough (stacking)", {"merge_method": "passthrough", "slices": [
            {"sources": [{"model": p["ft0"], "layer_range": [0, half + 1]}]},
            {"sources": [{"model": p["ft1"], "layer_range": [half - 1, layers]}]}]}),
    ]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="/tmp/bench_mergekit_methods")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--only", action="append", help="run the configurations whose name starts with this")
    args = parser.parse_args(argv)

    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge
    from safetensors.torch import load_file

    from pcb_fast.cli import main as cli

    root = Path(args.dir)
    paths = build(root / f"models-{args.hidden}-{args.layers}", args.hidden, args.layers, args.hidden * 11 // 4, 8000)
    rows = []
    for name, raw in configs(paths, args.layers):
        if args.only and not any(name.startswith(o) for o in args.only):
            continue
        best = {"mergekit": float("inf"), "mergekit + fsync": float("inf"), "pcb-fast": float("inf")}
        for _ in range(args.repeat):
            for tool in best:
                out = root / tool
                shutil.rmtree(out, ignore_errors=True)
                start = time.perf_counter()
                if tool.startswith("mergekit"):
                    run_merge(MergeConfiguration.model_validate(raw), str(out),
                              MergeOptions(copy_tokenizer=False, quiet=True))
                    if tool == "mergekit + fsync":
                        flush(out)
                else:
                    (root / "merge.yaml").write_text(yaml.safe_dump(raw))
                    assert cli(["merge", "--config", str(root / "merge.yaml"), "--out", str(out), "--quiet"]) == 0
                best[tool] = min(best[tool], time.perf_counter() - start)
        # the values: mergekit's sums over more than 32768 entries depend on torch's thread count, and
        # pcb_fast sums on one thread (docs/design.md 5.9): compared with mergekit run on one thread
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            shutil.rmtree(root / "mergekit", ignore_errors=True)
            run_merge(MergeConfiguration.model_validate(raw), str(root / "mergekit"),
                      MergeOptions(copy_tokenizer=False, quiet=True))
        finally:
            torch.set_num_threads(threads)
        theirs = load_file(root / "mergekit" / "model.safetensors")
        ours = load_file(root / "pcb-fast" / "model.safetensors")
        differ = sum(int((ours[k] != theirs[k]).sum()) for k in theirs)
        total = sum(v.numel() for v in theirs.values())
        rows.append((name, best["mergekit"], best["mergekit + fsync"], best["pcb-fast"], differ, total))
        print(f"{name}: mergekit {best['mergekit']:.2f} s (+ fsync {best['mergekit + fsync']:.2f} s), pcb-fast "
              f"{best['pcb-fast']:.2f} s, {best['mergekit'] / best['pcb-fast']:.2f}x, {differ} of {total} differ",
              flush=True)
    print(f"\nLlama-style float32 model, hidden {args.hidden}, {args.layers} layers; "
          f"torch threads {torch.get_num_threads()}")
    print("| method | mergekit s | mergekit + fsync s | pcb-fast s | speed ratio | ratio to mergekit + fsync | "
          "entries differing |")
    print("|---|---|---|---|---|---|---|")
    for name, mk, synced, ours, differ, total in rows:
        note = " (other draws, by design)" if name.startswith("della") else ""
        print(f"| {name} | {mk:.2f} | {synced:.2f} | {ours:.2f} | {mk / ours:.2f}x | {synced / ours:.2f}x | "
              f"{differ} of {total}{note} |")


def flush(folder: Path) -> None:
    """Every file of ``folder`` on disk (fsync), as pcb-fast's output is when its merge returns."""
    for path in folder.iterdir():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


if __name__ == "__main__":
    main()
