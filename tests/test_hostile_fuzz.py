"""The command line driven with generated hostile model folders: every input kind
(safetensors files, Hugging Face folders, sharded folders with an index, torch zips stored or
deflated, legacy torch files, folders with pytorch_model.bin, and PEFT adapter folders with
adapter_model.safetensors or a stored or deflated adapter_model.bin), with one hostile twist each: a
file of an input that is a link into an existing --out (run with --overwrite), a truncated weights
file, or a model rewritten in place while the merge reads it. Whatever happens, no input byte
changes, every exit is 0, 1 or 2 with one line on stderr, and an exit 0 comes only with the right
values."""

from __future__ import annotations

import hashlib
import json
import os
import random
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import pcb_fast
from pcb_fast.cli import main as cli
from pcb_fast.io import checkpoints, safetensors as st

KINDS = ("safetensors", "folder", "sharded", "pt", "pt_deflated", "pt_legacy", "bin_folder")
ADAPTER_KINDS = ("safetensors", "bin", "bin_deflated")
TWISTS = ("clean", "link_into_out", "truncate", "rewrite")
CASES = 80


def write_kind(kind: str, state: dict, where: Path) -> tuple[Path, list]:
    """``state`` saved as an input of ``kind`` at ``where`` (a file name or folder); returns the
    path to pass and the files holding its weights."""
    if kind == "safetensors":
        path = where.with_suffix(".safetensors")
        save_file(state, path)
        return path, [path]
    if kind in ("pt", "pt_deflated", "pt_legacy"):
        path = where.with_suffix(".pt")
        torch.save(state, path, _use_new_zipfile_serialization=kind != "pt_legacy")
        if kind == "pt_deflated":
            deflate(path)
        return path, [path]
    where.mkdir()
    (where / "config.json").write_text(json.dumps({"num_hidden_layers": 2, "torch_dtype": "float32"}))
    (where / "tokenizer.json").write_text("{}")
    if kind == "folder":
        save_file(state, where / "model.safetensors")
        return where, [where / "model.safetensors"]
    if kind == "bin_folder":
        torch.save(state, where / "pytorch_model.bin")
        return where, [where / "pytorch_model.bin"]
    keys = sorted(state)
    halves = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, part in halves.items():
        save_file({k: state[k] for k in part}, where / name)
    (where / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: name for name, part in halves.items() for k in part}}))
    return where, [where / name for name in halves]


def deflate(path: Path) -> None:
    """The torch zip ``path`` rewritten with every member deflate-compressed."""
    packed = path.with_suffix(".tmp")
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(packed, "w", zipfile.ZIP_DEFLATED) as target:
        for info in source.infolist():
            target.writestr(info.filename, source.read(info), compress_type=zipfile.ZIP_DEFLATED)
    os.replace(packed, path)


def write_adapter(kind: str, g: torch.Generator, where: Path) -> tuple[Path, list]:
    """A LoRA adapter folder (rank 2 on q_proj and v_proj of the base of make_case) at ``where``; its
    path and files."""
    factors = {f"base_model.model.{m}.lora_{x}.weight": 0.1 * torch.randn(*shape, generator=g)
               for m in ("q_proj", "v_proj") for x, shape in (("A", (2, 16)), ("B", (48, 2)))}
    where.mkdir()
    config = where / "adapter_config.json"
    config.write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"]}))
    if kind == "safetensors":
        weights = where / "adapter_model.safetensors"
        save_file(factors, weights)
    else:
        weights = where / "adapter_model.bin"
        torch.save(factors, weights)
        if kind == "bin_deflated":
            deflate(weights)
    return where, [weights, config]


def digests(root: Path) -> dict:
    """SHA-256 of every regular file under ``root`` (links not followed)."""
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.is_symlink()}


def make_case(rng: random.Random, folder: Path, adapters: bool, first_kind: str | None = None):
    """(inputs: the base, then the models or adapters; the files of each; the expected output; --out).
    ``first_kind``: the kind of the first model or adapter (else drawn, as every other input's)."""
    g = torch.Generator().manual_seed(rng.randrange(1 << 30))
    base = {"q_proj.weight": torch.randn(48, 16, generator=g), "v_proj.weight": torch.randn(48, 16, generator=g),
            "b.bias": torch.randn(40, generator=g), "steps": torch.arange(5)}
    inputs, weights = [], []
    if adapters:
        for i in range(2):
            path, files = write_adapter(first_kind if i == 0 and first_kind else rng.choice(ADAPTER_KINDS), g,
                                        folder / f"adapter{i}")
            inputs.append(path)
            weights.append(files)
        expected = pcb_fast.merge_adapters(base, inputs, method="ties", density=0.5)
    else:
        tuned = [{k: (v + 0.05 * torch.randn(v.shape, generator=g)) if v.is_floating_point() else v
                  for k, v in base.items()} for _ in range(2)]
        for i, state in enumerate(tuned):
            path, files = write_kind(first_kind if i == 0 and first_kind else rng.choice(KINDS), state,
                                     folder / f"input{i + 1}")
            inputs.append(path)
            weights.append(files)
        expected = pcb_fast.merge(base, tuned, method="ties", density=0.5)
    path, files = write_kind(rng.choice(KINDS), base, folder / "input0")
    out = folder / "out"
    out.mkdir()
    (out / "earlier.txt").write_text("an earlier output")
    return [path] + inputs, [files] + weights, expected, out


@pytest.mark.parametrize("seed", range(CASES))
def test_hostile_folders(tmp_path, capsys, monkeypatch, seed):
    rng = random.Random(seed)
    twist = TWISTS[seed % len(TWISTS)]
    adapters = seed % 3 == 2
    first_kind = turn = None
    if twist == "link_into_out":  # every kind of model and adapter in turn, its weights first, then its other files
        kinds = ADAPTER_KINDS if adapters else KINDS
        turn = sum(1 for s in range(seed) if s % 4 == 1 and (s % 3 == 2) == adapters)
        first_kind = kinds[turn % len(kinds)]
        turn //= len(kinds)
    inputs, weights, expected, out = make_case(rng, tmp_path, adapters, first_kind)
    args = ["merge", "--base", str(inputs[0]), *[f"--{'adapter' if adapters else 'model'}={p}" for p in inputs[1:]],
            "--out", str(out), "--overwrite", "--quiet", "--method", "ties", "--density", "0.5", "--max-memory", "0"]
    rewritten = None
    if twist == "link_into_out":
        files = weights[1] + [inputs[1] / n for n in ("config.json", "tokenizer.json") if (inputs[1] / n).exists()]
        victim = files[turn % len(files)]
        moved = out / f"moved-{victim.name}"
        os.replace(victim, moved)
        victim.symlink_to(moved)
    elif twist == "truncate":
        victim = rng.choice([f for files in weights for f in files if f.name != "adapter_config.json"])
        data = victim.read_bytes()
        victim.write_bytes(data[: int(len(data) * rng.uniform(0.05, 0.95))])
    elif twist == "rewrite":  # a model file rewritten in place after a few of its reads (so once it is open)
        rewritten = rng.choice([f for f in weights[1 + rng.randrange(2)] if f.suffix != ".json"])
        after = rng.randrange(1, 4)
        reads = [0]

        def rewrite_soon(original):
            def read_into(self, *a, **k):
                files = getattr(self, "files", None) or [getattr(self, "path", None)]
                reads[0] += rewritten in files
                if reads[0] == after and rewritten in files:
                    data = bytearray(rewritten.read_bytes())
                    data[-256:] = bytes(reversed(data[-256:]))
                    stamp = os.stat(rewritten).st_mtime_ns
                    with open(rewritten, "r+b") as f:
                        f.write(bytes(data))
                    # a writer's mtime moves with the clock's tick (milliseconds); a test this fast may
                    # rewrite within the tick of the open, so the new time is made distinct here
                    os.utime(rewritten, ns=(stamp + 10**9, stamp + 10**9))
                return original(self, *a, **k)
            return read_into

        monkeypatch.setattr(st.SafetensorsReader, "read_into", rewrite_soon(st.SafetensorsReader.read_into))
        for kind in (checkpoints.StateDictCheckpoint, checkpoints.TorchFileCheckpoint):
            monkeypatch.setattr(kind, "read_into", rewrite_soon(kind.read_into))
    before = digests(tmp_path)
    code = cli(args)
    err = capsys.readouterr().err
    assert code in (0, 1, 2), (twist, code, err)
    assert code == 0 or (err.count("\n") == 1 and err.startswith("pcb-fast: ")), (twist, err)
    after = digests(tmp_path)
    for path, digest in before.items():  # no input byte changed (the rewritten file changed by the test itself)
        if rewritten is not None and Path(path) == rewritten:
            continue
        if code == 0 and Path(path).is_relative_to(out):
            continue  # a successful run replaced the earlier output
        assert after.get(path) == digest, (twist, path, err)
    if twist in ("link_into_out", "truncate"):
        assert code == 2, (twist, err)
    if code == 0:
        got = load_file(out / "model.safetensors")
        assert set(got) == set(expected) and all(torch.equal(got[k], expected[k]) for k in expected), twist
    else:
        assert (out / "earlier.txt").read_text() == "an earlier output"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
