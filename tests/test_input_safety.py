"""Hostile inputs: every file a run reads, through any link, is an input that --overwrite may not
delete; every file it writes is an output (the search's history); compressed, legacy and truncated
torch files; inputs rewritten or truncated during a merge (no memory map, so no SIGBUS); copies
within the memory budget; checks before the heavy work; one short line per error, whatever the
length of a key or path; one link rule for shards with or without an index and for adapter files.
Each test failed on the code before these fixes."""

from __future__ import annotations

import json
import os
import time
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import pcb_fast
from pcb_fast.cli import main as cli
from pcb_fast.drivers import files as file_merge
from pcb_fast.drivers.files import merge_checkpoints
from pcb_fast.io.folder import COPY_CHUNK
from pcb_fast.io.output import MergeFailed


def state(seed: int, entries: int = 64) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(entries, generator=g), "b": torch.randn(8, generator=g), "steps": torch.arange(3)}


def models(folder: Path, n: int = 2) -> tuple[dict, list]:
    base = state(0)
    tuned = [{k: v + 0.01 * torch.randn(v.shape) if v.is_floating_point() else v for k, v in base.items()}
             for _ in range(n)]
    folder.mkdir(parents=True, exist_ok=True)
    return base, tuned


def saved(folder: Path, states: list, suffix: str, save) -> list:
    """``states`` saved by ``save`` as m0<suffix>, m1<suffix>, ... in ``folder``; their paths."""
    paths = [folder / f"m{i}{suffix}" for i in range(len(states))]
    for state, path in zip(states, paths):
        save(state, path)
    return paths


def tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_error_line(capsys, prefix="pcb-fast: error: ") -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(prefix), err
    assert len(err) < 1200, len(err)
    return err


def an_existing_output(tmp_path: Path, name: str, data: bytes) -> tuple[Path, Path]:
    """An output folder from an earlier run, holding the file ``name`` (what an input links to)."""
    out = tmp_path / "out"
    out.mkdir()
    (out / name).write_bytes(data)
    return out, out / name


# ---- 1. every input kind, reached through a link into --out


@pytest.mark.parametrize("kind", ["pytorch_model.bin", "model.pt", "model.safetensors", "config.json",
                                  "tokenizer.json"])
def test_a_model_file_linked_into_out_is_an_input(tmp_path, capsys, kind):
    base, tuned = models(tmp_path)
    folder = tmp_path / "base"
    folder.mkdir()
    saved = tmp_path / "saved"
    if kind.endswith((".bin", ".pt")):
        torch.save(base, saved)
    elif kind.endswith(".safetensors"):
        save_file(base, saved)
    else:
        save_file(base, folder / "model.safetensors")
        saved.write_text("{}")
    out, target = an_existing_output(tmp_path, "x", saved.read_bytes())
    (folder / kind).symlink_to(target)
    paths = []
    for i, t in enumerate(tuned):
        save_file(t, tmp_path / f"m{i}.safetensors")
        paths.append(tmp_path / f"m{i}.safetensors")
    before = tree(out)
    code = cli(["merge", "--base", str(folder), *[f"--model={p}" for p in paths], "--out", str(out), "--overwrite",
                "--quiet", "--method", "task_arithmetic"])
    assert code == 2
    assert f"output {out} contains a " in one_error_line(capsys)
    assert tree(out) == before


def adapter_files(tmp_path: Path, weights: str = "adapter_model.safetensors") -> dict:
    """A base model folder at tmp_path/base, and the files of a LoRA adapter of it: {name: bytes}."""
    g = torch.Generator().manual_seed(0)
    (tmp_path / "base").mkdir()
    save_file({"model.layers.0.q_proj.weight": torch.randn(8, 8, generator=g)}, tmp_path / "base/model.safetensors")
    factors = {"base_model.model.model.layers.0.q_proj.lora_A.weight": torch.randn(2, 8, generator=g),
               "base_model.model.model.layers.0.q_proj.lora_B.weight": torch.randn(8, 2, generator=g)}
    (save_file if weights.endswith(".safetensors") else torch.save)(factors, tmp_path / "weights")
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["q_proj"]}
    return {weights: (tmp_path / "weights").read_bytes(), "adapter_config.json": json.dumps(config).encode()}


@pytest.mark.parametrize("linked", ["adapter_model.safetensors", "adapter_model.bin", "adapter_config.json"])
def test_an_adapter_file_linked_into_out_is_an_input(tmp_path, capsys, linked):
    files = adapter_files(tmp_path, "adapter_model.bin" if linked == "adapter_model.bin" else
                          "adapter_model.safetensors")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    out, target = an_existing_output(tmp_path, "x", files[linked])
    for name, data in files.items():
        if name == linked:
            (adapter / name).symlink_to(target)
        else:
            (adapter / name).write_bytes(data)
    before = tree(out)
    assert cli(["merge", "--base", str(tmp_path / "base"), "--adapter", str(adapter), "--out", str(out),
                "--overwrite", "--quiet", "--method", "task_arithmetic"]) == 2
    assert "contains a " in one_error_line(capsys)
    assert tree(out) == before


def test_a_hard_link_into_out_is_an_input(tmp_path, capsys):
    base, tuned = models(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    save_file(base, out / "kept.safetensors")
    os.link(out / "kept.safetensors", tmp_path / "base.safetensors")
    save_file(tuned[0], tmp_path / "m0.safetensors")
    assert cli(["merge", "--base", str(tmp_path / "base.safetensors"), "--model", str(tmp_path / "m0.safetensors"),
                "--out", str(out), "--overwrite", "--quiet"]) == 2
    assert "through a link" in one_error_line(capsys)
    assert (out / "kept.safetensors").exists()


# ---- 2. every written path is an output: the search's history


@pytest.fixture
def search_inputs(tmp_path):
    base, tuned = models(tmp_path)
    save_file(base, tmp_path / "base.safetensors")
    for i, t in enumerate(tuned):
        save_file(t, tmp_path / f"m{i}.safetensors")
    (tmp_path / "score.py").write_text("calls = []\ndef evaluate(state):\n    calls.append(1)\n"
                                       "    return -float(state['w'].abs().sum())\n")
    return tmp_path


def search_cli(folder: Path, *extra) -> int:
    return cli(["search", "--base", str(folder / "base.safetensors"), "--model", str(folder / "m0.safetensors"),
                "--model", str(folder / "m1.safetensors"), "--eval", f"{folder / 'score.py'}:evaluate",
                "--budget", "3", "--quiet", "--method", "task_arithmetic", *map(str, extra)])


@pytest.mark.parametrize("target", ["m0.safetensors", "score.py", "base.safetensors"])
def test_the_history_may_not_be_an_input(search_inputs, capsys, target):
    before = (search_inputs / target).read_bytes()
    assert search_cli(search_inputs, "--out", search_inputs / "best", "--history", search_inputs / target) == 2
    assert "; --history must not be, contain or lie inside an input" in one_error_line(capsys)
    assert (search_inputs / target).read_bytes() == before and not (search_inputs / "best").exists()


def test_the_history_through_a_link_to_an_input(search_inputs, capsys):
    (search_inputs / "h.csv").symlink_to(search_inputs / "m1.safetensors")
    before = (search_inputs / "m1.safetensors").read_bytes()
    assert search_cli(search_inputs, "--out", search_inputs / "best", "--history", search_inputs / "h.csv") == 2
    one_error_line(capsys)
    assert (search_inputs / "m1.safetensors").read_bytes() == before


@pytest.mark.parametrize("where, message", [("best", "lies inside --out"), ("best/h.csv", "lies inside --out"),
                                            ("missing/h.csv", "is not an existing folder")])
def test_a_history_that_cannot_be_written_is_refused_before_the_search(search_inputs, capsys, monkeypatch, where,
                                                                       message):
    import pcb_fast.search as search

    def no_search(*a, **k):
        raise AssertionError("the search ran")

    monkeypatch.setattr(search, "ContributionCache", no_search)
    assert search_cli(search_inputs, "--out", search_inputs / "best", "--history", search_inputs / where) == 2
    assert message in one_error_line(capsys)


def test_an_existing_history_is_replaced_only_with_overwrite_and_atomically(search_inputs, capsys):
    history = search_inputs / "h.json"
    history.write_text("earlier")
    assert search_cli(search_inputs, "--out", search_inputs / "best", "--history", history) == 2
    assert "already exists" in one_error_line(capsys)
    assert history.read_text() == "earlier"
    assert search_cli(search_inputs, "--out", search_inputs / "best", "--history", history, "--overwrite") == 0
    assert len(json.loads(history.read_text())["history"]) == 3
    assert not [p for p in search_inputs.iterdir() if p.name.startswith(".")]


def test_the_api_checks_the_history_folder_before_searching(tmp_path):
    from pcb_fast.search import search_lambdas

    base, tuned = models(tmp_path)
    calls = []
    with pytest.raises(ValueError, match="is not an existing folder"):
        search_lambdas(base, tuned, lambda s: calls.append(1) or 0.0, budget=2, method="task_arithmetic",
                       history_path=tmp_path / "missing" / "h.json")
    assert calls == []


# ---- 3. compressed, legacy and truncated torch files


def repacked(path: Path, compression: int = zipfile.ZIP_DEFLATED) -> Path:
    """The torch zip ``path`` rewritten by Python's zipfile, every member with ``compression``."""
    packed = path.with_name(path.stem + "-repacked" + path.suffix)
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(packed, "w", compression) as target:
        for info in source.infolist():
            target.writestr(info.filename, source.read(info), compress_type=compression)
    return packed


@pytest.mark.parametrize("form", ["deflated", "legacy", "stored by another zip writer"])
def test_compressed_and_legacy_torch_files_are_read_correctly(tmp_path, form):
    """Deflated members, torch's legacy format, and a zip whose members are stored where torch's own
    writer would not put them (torch's recorded offsets would miss them): the right values."""
    base, tuned = models(tmp_path)
    save_file(base, tmp_path / "base.safetensors")
    save = (lambda t, p: torch.save(t, p, _use_new_zipfile_serialization=False)) if form == "legacy" else torch.save
    paths = saved(tmp_path, tuned, ".pt", save)
    if form != "legacy":
        compression = zipfile.ZIP_DEFLATED if form == "deflated" else zipfile.ZIP_STORED
        paths = [repacked(path, compression) for path in paths]
        for path in paths:
            with zipfile.ZipFile(path) as z:
                assert {i.compress_type for i in z.infolist() if "/data/" in i.filename} == {compression}
    for i, t in enumerate(tuned):
        save_file(t, tmp_path / f"s{i}.safetensors")
    got = merge_checkpoints(tmp_path / "base.safetensors", paths, tmp_path / "a", method="ties", density=0.5)
    expected = merge_checkpoints(tmp_path / "base.safetensors", [tmp_path / f"s{i}.safetensors" for i in range(2)],
                                 tmp_path / "b", method="ties", density=0.5)
    a, b = load_file(got / "model.safetensors"), load_file(expected / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_a_torch_file_read_in_place_gives_every_view_its_values(tmp_path):
    """Stored torch zips are read with positioned reads at each storage's offset: views into a shared
    storage (a row, a transpose, an expanded tensor, one storage under two keys), other dtypes and
    empty tensors read back their values, whole and in slices."""
    from pcb_fast.io.checkpoints import TorchFileCheckpoint, open_checkpoint
    from pcb_fast.io.tied import tied_groups

    a = torch.arange(12, dtype=torch.float32).view(3, 4)
    state = {"a": a, "also_a": a, "t": a.t(), "row": a[1], "wide": torch.arange(3.0).expand(4, 3),
             "h": torch.arange(5, dtype=torch.float16), "flags": torch.tensor([True, False]), "empty": torch.empty(0)}
    torch.save(state, tmp_path / "m.pt")
    checkpoint = open_checkpoint(tmp_path / "m.pt")
    assert isinstance(checkpoint, TorchFileCheckpoint)
    for key, value in state.items():
        assert torch.equal(checkpoint.read(key), value), key
        n = value.numel()
        if n > 2:
            part = checkpoint.read_into(key, 1, n - 1, torch.empty(n - 2, dtype=value.dtype))
            assert torch.equal(part, value.reshape(-1)[1: n - 1]), key
    assert tied_groups(checkpoint.state) == [["a", "also_a"]]
    checkpoint.close()


def test_a_truncated_torch_zip_is_one_line(tmp_path, capsys):
    base, tuned = models(tmp_path)
    save_file(base, tmp_path / "base.safetensors")
    torch.save(tuned[0], tmp_path / "m.pt")
    data = (tmp_path / "m.pt").read_bytes()
    for cut, name in ((len(data) // 2, "half.pt"), (len(data) - 30, "tail.pt")):
        (tmp_path / name).write_bytes(data[:cut])
        assert cli(["merge", "--base", str(tmp_path / "base.safetensors"), "--model", str(tmp_path / name),
                    "--out", str(tmp_path / "o"), "--quiet"]) == 2
        err = one_error_line(capsys)
        assert name in err and "/proc/self/fd" not in err
    assert not (tmp_path / "o").exists()


def test_a_zip_member_past_the_end_of_the_file_is_refused_unmapped(tmp_path):
    """A stored member whose size reaches past the end of the file would be read through the map
    beyond the file's end (SIGBUS): refused before torch.load."""
    base, tuned = models(tmp_path)
    save_file(base, tmp_path / "base.safetensors")
    torch.save(tuned[0], tmp_path / "m.pt")
    raw = bytearray((tmp_path / "m.pt").read_bytes())
    with zipfile.ZipFile(tmp_path / "m.pt") as z:
        member = next(i for i in z.infolist() if "/data/" in i.filename)
    # the central directory entry of the member: its compressed and uncompressed sizes, made huge
    position = raw.find(b"PK\x01\x02")
    while position >= 0:
        name_length = int.from_bytes(raw[position + 28: position + 30], "little")
        if raw[position + 46: position + 46 + name_length].decode() == member.filename:
            raw[position + 20: position + 28] = (1 << 30).to_bytes(4, "little") * 2
            break
        position = raw.find(b"PK\x01\x02", position + 4)
    assert position >= 0
    (tmp_path / "m.pt").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="truncated or corrupt torch zip file"):
        merge_checkpoints(tmp_path / "base.safetensors", [tmp_path / "m.pt"], tmp_path / "o")


# ---- 4. an input rewritten while a multi-pass merge reads it


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_an_input_rewritten_during_the_merge_fails_and_writes_nothing(tmp_path, suffix):
    base, tuned = models(tmp_path)
    save_file(base, tmp_path / "base.safetensors")
    paths = saved(tmp_path, tuned, suffix, save_file if suffix == ".safetensors" else torch.save)
    passes = []

    def progress(total, description):
        passes.append(description)
        if len(passes) == 2:  # between the first pass and the second: rewrite model 1 in place
            time.sleep(0.05)
            size = paths[1].stat().st_size
            with open(paths[1], "r+b") as f:
                f.seek(size - 64)
                f.write(bytes(64))

        class Bar:
            def update(self, n):
                pass

            def close(self):
                pass
        return Bar()

    with pytest.raises(MergeFailed, match="input changed during the merge"):
        merge_checkpoints(tmp_path / "base.safetensors", paths, tmp_path / "o", method="pcb", max_memory=0,
                          progress=progress, fused="off")
    assert len(passes) >= 2 and not (tmp_path / "o").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# ---- 11. copied tensors stream like merged ones


def test_copied_tensors_are_read_in_slices(tmp_path, monkeypatch):
    base = {"w": torch.randn(64), "buffer": torch.zeros(3 * COPY_CHUNK + 5, dtype=torch.int8)}
    save_file(base, tmp_path / "base.safetensors")
    save_file({"w": base["w"] + 1, "buffer": base["buffer"]}, tmp_path / "m.safetensors")
    from pcb_test_helpers import slices_read

    largest = slices_read(monkeypatch, "buffer")
    out = merge_checkpoints(tmp_path / "base.safetensors", [tmp_path / "m.safetensors"], tmp_path / "o",
                            method="task_arithmetic", max_memory="1MB")
    assert max(largest) <= COPY_CHUNK and len(largest) == 4
    assert torch.equal(load_file(out / "model.safetensors")["buffer"], base["buffer"])


# ---- 12. everything checkable is checked before the heavy work


def test_a_bad_config_json_with_dtype_is_found_before_the_merge(tmp_path, capsys, monkeypatch):
    base, tuned = models(tmp_path)
    folder = tmp_path / "base"
    folder.mkdir()
    save_file(base, folder / "model.safetensors")
    (folder / "config.json").write_text("[" * 200_000)
    save_file(tuned[0], tmp_path / "m.safetensors")
    monkeypatch.setattr(file_merge, "_write_merge", lambda *a, **k: pytest.fail("the merge ran"))
    assert cli(["merge", "--base", str(folder), "--model", str(tmp_path / "m.safetensors"), "--out",
                str(tmp_path / "o"), "--dtype", "float16", "--quiet"]) == 2
    assert "config.json is not valid JSON" in one_error_line(capsys)


def test_output_names_as_long_as_the_filesystem_allows(tmp_path, capsys):
    base, tuned = models(tmp_path)
    save_file(base, tmp_path / "base.safetensors")
    save_file(tuned[0], tmp_path / "m.safetensors")
    args = ["merge", "--base", str(tmp_path / "base.safetensors"), "--model", str(tmp_path / "m.safetensors"),
            "--quiet", "--method", "task_arithmetic"]
    assert cli(args + ["--out", str(tmp_path / ("o" * 250))]) == 0
    assert (tmp_path / ("o" * 250) / "model.safetensors").exists()
    assert cli(args + ["--out", str(tmp_path / ("p" * 256))]) == 2
    assert "is 256 bytes long" in one_error_line(capsys)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# ---- 13. one short line, naming what is wrong


def test_a_huge_key_gives_a_short_line(tmp_path, capsys):
    base, tuned = models(tmp_path)
    save_file(base, tmp_path / "base.safetensors")
    save_file(dict(tuned[0], **{"k" * 1_000_000: torch.zeros(1)}), tmp_path / "m.safetensors")
    assert cli(["merge", "--base", str(tmp_path / "base.safetensors"), "--model", str(tmp_path / "m.safetensors"),
                "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "that the base model lacks" in one_error_line(capsys)


def test_every_message_quoting_a_huge_key_is_short(tmp_path):
    """Messages raised while merging (NaN in a model or the base, tied keys, running statistics)
    quote a 1 MB key cut short, from files and from memory alike."""
    key = "k" * 1_000_000
    w = torch.randn(16)
    bad = w.clone()
    bad[3] = float("nan")
    save_file({key: w, "b": torch.ones(4)}, tmp_path / "base.safetensors")
    save_file({key: bad, "b": torch.ones(4)}, tmp_path / "nan.safetensors")
    save_file({key: w + 1, "b": torch.zeros(4)}, tmp_path / "m.safetensors")
    t = torch.randn(4)
    tied = {key: t, "a": t}
    stats = {key + ".running_mean": torch.zeros(4), key + ".num_batches_tracked": torch.tensor(3), "w": torch.randn(4)}
    nan_stats = dict(stats, **{key + ".running_mean": torch.full((4,), float("nan")), "w": stats["w"] + 1})
    cases = {
        "a model's NaN, from files": lambda: merge_checkpoints(tmp_path / "base.safetensors",
                                                               [tmp_path / "nan.safetensors"], tmp_path / "o1"),
        "the base's NaN, from files": lambda: merge_checkpoints(tmp_path / "nan.safetensors",
                                                                [tmp_path / "m.safetensors"], tmp_path / "o2"),
        "the base's NaN, slerp": lambda: merge_checkpoints(tmp_path / "nan.safetensors", [tmp_path / "m.safetensors"],
                                                           tmp_path / "o3", method="slerp", t=0.5),
        "a model's NaN, in memory": lambda: pcb_fast.merge({key: w}, [{key: bad}], method="ties"),
        "tied keys split by exclude": lambda: pcb_fast.merge(tied, [{key: t + 1, "a": t + 1}],
                                                             method="task_arithmetic", exclude=["^a$"]),
        "tied keys that differ": lambda: pcb_fast.merge(tied, [{key: t + 1, "a": t + 2}], method="task_arithmetic"),
        "running statistics": lambda: pcb_fast.merge(stats, [nan_stats], method="task_arithmetic"),
    }
    for what, run in cases.items():
        with pytest.raises(ValueError) as caught:
            run()
        message = str(caught.value)
        assert len(message) < 400 and "\n" not in message and "kkkk..." in message, (what, len(message))


def test_a_huge_path_in_a_config_gives_a_short_message():
    from pcb_fast.io.config import parse_config

    with pytest.raises(ValueError, match="is neither a path nor a model\\+lora reference") as caught:
        parse_config({"merge_method": "ties", "base_model": "b", "models": [{"model": "m" * 1_000_000 + "+lora+x"}]})
    assert len(str(caught.value)) < 400


def test_an_out_path_too_long_to_reach_is_a_bad_input(tmp_path, capsys):
    save_file(state(1), tmp_path / "m.safetensors")
    assert cli(["merge", "--base", str(tmp_path / "m.safetensors"), "--model", str(tmp_path / "m.safetensors"),
                "--out", str(tmp_path / ("o/" * 3000)), "--quiet"]) == 2
    err = one_error_line(capsys)
    assert "output folder's parent" in err and "cannot be reached (File name too long)" in err


def test_a_model_path_too_long_to_reach_is_named_once(tmp_path, capsys):
    # "model 0 (<path>): cannot access <path>" quoted the path twice: over 800 characters
    save_file(state(1), tmp_path / "m.safetensors")
    save_file(state(2), tmp_path / "f.safetensors")
    assert cli(["merge", "--base", str(tmp_path / "m.safetensors"), "--model", str(tmp_path / ("x" * 3000)),
                "--model", str(tmp_path / "f.safetensors"), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = one_error_line(capsys)
    assert err.count("xxx...xxx") == 1 and "cannot access it (File name too long)" in err and len(err) < 500, err


def test_a_refusal_is_the_only_line_even_after_a_model_that_is_the_base(tmp_path, capsys):
    # the note that model 1 (the base itself) is left out came before model 0's refusal
    save_file(state(1), tmp_path / "m.safetensors")
    save_file(state(2), tmp_path / "f.safetensors")
    assert cli(["merge", "--base", str(tmp_path / "m.safetensors"), "--model", str(tmp_path / "nowhere"),
                "--model", str(tmp_path / "m.safetensors"), "--model", str(tmp_path / "f.safetensors"),
                "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "model 0 (" in one_error_line(capsys)


def test_a_missing_base_names_its_path(tmp_path, capsys):
    save_file(state(1), tmp_path / "m.safetensors")
    assert cli(["merge", "--base", str(tmp_path / "nowhere"), "--model", str(tmp_path / "m.safetensors"),
                "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert f"base model: no such file or folder {tmp_path / 'nowhere'}" in one_error_line(capsys)


def test_a_config_folder_is_refused_as_a_folder(tmp_path, capsys):
    (tmp_path / "cfg").mkdir()
    assert cli(["merge", "--config", str(tmp_path / "cfg"), "--out", str(tmp_path / "cfg" / "o"), "--quiet"]) == 2
    err = one_error_line(capsys)
    assert "is a folder, not a regular file" in err and "lies inside the config file" not in err


# ---- 14. one link rule for shards, with or without an index


@pytest.mark.parametrize("name", ["model.safetensors", "model-a.safetensors", "pytorch_model.bin"])
def test_weights_linking_outside_the_folder_are_refused_without_an_index(tmp_path, capsys, name):
    base, tuned = models(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    save_file(base, elsewhere / "w.safetensors") if name.endswith(".safetensors") else torch.save(base, elsewhere / "w")
    target = elsewhere / ("w.safetensors" if name.endswith(".safetensors") else "w")
    folder = tmp_path / "base"
    folder.mkdir()
    (folder / name).symlink_to(target)
    save_file(tuned[0], tmp_path / "m.safetensors")
    assert cli(["merge", "--base", str(folder), "--model", str(tmp_path / "m.safetensors"), "--out",
                str(tmp_path / "o"), "--quiet"]) == 2
    assert f"weight file '{name}' links to a file outside the model folder" in one_error_line(capsys)


@pytest.mark.parametrize("linked", ["adapter_model.safetensors", "adapter_model.bin", "adapter_config.json"])
def test_adapter_files_linking_outside_the_adapter_folder_are_refused(tmp_path, capsys, linked):
    files = adapter_files(tmp_path, "adapter_model.bin" if linked == "adapter_model.bin" else
                          "adapter_model.safetensors")
    adapter, elsewhere = tmp_path / "adapter", tmp_path / "elsewhere"
    adapter.mkdir()
    elsewhere.mkdir()
    for name, data in files.items():
        (elsewhere if name == linked else adapter).joinpath(name).write_bytes(data)
    (adapter / linked).symlink_to(elsewhere / linked)
    assert cli(["merge", "--base", str(tmp_path / "base"), "--adapter", str(adapter), "--out", str(tmp_path / "o"),
                "--quiet", "--method", "task_arithmetic"]) == 2
    assert f"{linked} links to a file outside the adapter folder" in one_error_line(capsys)
    assert not (tmp_path / "o").exists()


# ---- 4 again: a torch file truncated while it is read (no memory map, so no SIGBUS)


RACE = """
import sys
from pathlib import Path
from pcb_fast.cli import main
from pcb_fast.io import safetensors

folder, checks = Path(sys.argv[1]), []
original = safetensors.Unchanged.check


def check(self):
    # the file is cut to nothing right after its first check passed: the window in which a read of a
    # memory-mapped file would touch pages past its new end
    if Path(self.path).name == "m1.pt":
        checks.append(1)
        if len(checks) == 1:
            original(self)
            with open(folder / "m1.pt", "r+b") as f:
                f.truncate(0)
            return
    original(self)


safetensors.Unchanged.check = check
sys.exit(main(["merge", "--base", str(folder / "base.safetensors"), "--model", str(folder / "m0.pt"), "--model",
               str(folder / "m1.pt"), "--out", str(folder / "o"), "--quiet", "--method", "pcb", "--max-memory", "0"]))
"""


def test_a_torch_file_truncated_while_it_is_read_fails_cleanly(tmp_path):
    """In a child process (a read through a memory map would kill it with SIGBUS): a torch file
    truncated between the check of one read and the next read is one line, exit 1, no output."""
    import subprocess
    import sys

    base, tuned = models(tmp_path)
    save_file(base, tmp_path / "base.safetensors")
    saved(tmp_path, tuned, ".pt", torch.save)
    done = subprocess.run([sys.executable, "-c", RACE, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, (done.returncode, done.stderr[-1000:])  # failed while running: exit 1
    assert done.stderr.count("\n") == 1 and "input changed during the merge" in done.stderr, done.stderr
    assert not (tmp_path / "o").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
