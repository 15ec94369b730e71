"""Hostile input files (links out of the model folder, malformed headers, special files, float8):
each is one line on stderr, exit 2, no output and no traceback through the CLI, and a ValueError
(never KeyError, TypeError, OverflowError or RecursionError) through the Python API. Fixtures are
built by the tests."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import struct
from pathlib import Path

import pytest
import torch

safetensors_torch = pytest.importorskip("safetensors.torch")
save_file, load_file = safetensors_torch.save_file, safetensors_torch.load_file

from pcb_fast.cli import main as cli  # noqa: E402
from pcb_fast.core.checks import parse_size  # noqa: E402
from pcb_fast.io.checkpoints import open_checkpoint  # noqa: E402
from pcb_fast.io.config import load_config, parse_config  # noqa: E402
from pcb_fast.drivers.files import merge_checkpoints  # noqa: E402
from pcb_fast.io.safetensors import FormatError, NotAFileError, SafetensorsReader, open_regular  # noqa: E402

INDEX = "model.safetensors.index.json"


def make_models(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = {"enc.weight": torch.randn(8, 4, generator=g), "enc.bias": torch.randn(4, generator=g),
            "steps": torch.arange(3)}
    models = [{k: v + 0.01 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in base.items()}
              for _ in range(n)]
    return base, models


@pytest.fixture
def disk(tmp_path):
    base, models = make_models()
    save_file(base, tmp_path / "base.safetensors")
    paths = []
    for i, m in enumerate(models):
        save_file(m, tmp_path / f"m{i}.safetensors")
        paths.append(tmp_path / f"m{i}.safetensors")
    return tmp_path, base, models, paths


def header_of(path: Path) -> tuple[dict, bytes]:
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def write_raw(path: Path, text: str | bytes, data: bytes, length: int | None = None) -> Path:
    raw = text.encode() if isinstance(text, str) else text
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


@contextlib.contextmanager
def deadline(seconds=20):
    """A call that blocks (a named pipe opened for reading) fails instead of hanging the suite."""
    def expired(signum, frame):
        raise TimeoutError(f"blocked for {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def leftovers(parent: Path) -> list:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(".") or p.name == "out")


def refused(tmp: Path, capsys, args, message: str, forbidden=()) -> str:
    """The CLI exits 2 with one line naming ``message`` (none of ``forbidden``) and writes nothing."""
    with deadline():
        code = cli(["merge", "--out", str(tmp / "out"), "--quiet", *map(str, args)])
    captured = capsys.readouterr()
    assert code == 2, (message, captured.err)
    assert captured.out == "" and captured.err.startswith("pcb-fast: error: "), captured.err
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err, captured.err
    assert message in captured.err, (message, captured.err)
    for text in forbidden:
        assert text not in captured.err, (text, captured.err)
    assert leftovers(tmp) == [], captured.err
    return captured.err


def api_refused(base, models, tmp: Path, message: str, **kwargs) -> None:
    with deadline(), pytest.raises(ValueError, match=re.escape(message)):
        merge_checkpoints(base, models, tmp / "out", **kwargs)
    assert leftovers(tmp) == []


# ---- the shards an index lists stay inside the model folder


def sharded(folder: Path, state: dict, names: dict) -> Path:
    """A Hugging Face folder whose index maps each key to ``names[key]`` (default: one shard)."""
    folder.mkdir()
    save_file(state, folder / "model-00001-of-00001.safetensors")
    weight_map = {k: names.get(k, "model-00001-of-00001.safetensors") for k in state}
    (folder / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def test_index_shards_outside_the_model_folder_are_refused_unread(disk, capsys, monkeypatch):
    tmp, base, models, paths = disk
    bias = {"enc.bias": models[0]["enc.bias"]}
    rest = {k: v for k, v in models[0].items() if k != "enc.bias"}
    save_file(bias, tmp / "outside.safetensors")  # a valid shard, outside the folder
    secret = tmp / "secret.bin"
    secret.write_bytes(b"TOPSECRETpassword\n" * 4)
    echoed = str(int.from_bytes(secret.read_bytes()[:8], "little"))  # what the old message printed

    def model_folder(name, shard):
        folder = tmp / name
        folder.mkdir()
        save_file(rest, folder / "model-00001-of-00002.safetensors")
        weight_map = {k: "model-00001-of-00002.safetensors" for k in rest}
        weight_map["enc.bias"] = shard
        (folder / INDEX).write_text(json.dumps({"weight_map": weight_map}))
        return folder

    cases = [(model_folder("dotdot", "../outside.safetensors"), "which is not a plain file name"),
             (model_folder("absolute", str(secret)), "which is not a plain file name"),
             (model_folder("sub", "sub/model-00002-of-00002.safetensors"), "which is not a plain file name"),
             (model_folder("dot", "."), "which is not a plain file name"),
             (model_folder("linked", "model-00002-of-00002.safetensors"), "links to a file outside the model folder")]
    (tmp / "sub" / "sub").mkdir()
    save_file(bias, tmp / "sub" / "sub" / "model-00002-of-00002.safetensors")
    (tmp / "linked" / "model-00002-of-00002.safetensors").symlink_to(tmp / "outside.safetensors")
    opened = []
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda path, *a, **k: opened.append(os.fspath(path)) or real_open(path, *a, **k))
    for folder, message in cases:
        refused(tmp, capsys, ["--base", tmp / "base.safetensors", "--model", folder], message,
                forbidden=(echoed, "TOPSECRET"))
        api_refused(tmp / "base.safetensors", [folder], tmp, message)
    outside = {str(tmp / "outside.safetensors"), str(secret), str(tmp / "sub" / "sub" / "model-00002-of-00002.safetensors")}
    assert not [p for p in opened if os.path.realpath(p) in outside], opened


def test_hugging_face_cache_links_into_its_blobs_are_followed(disk):
    tmp, base, models, paths = disk
    repo = tmp / "hub" / "models--org--name"
    snapshot = repo / "snapshots" / "0123abc"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    keys = sorted(models[0])
    weight_map = {}
    for i, part in enumerate((keys[:1], keys[1:])):
        name = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({k: models[0][k] for k in part}, repo / "blobs" / f"blob{i}")
        (snapshot / name).symlink_to(Path("../../blobs") / f"blob{i}")
        weight_map.update({k: name for k in part})
    (repo / "blobs" / "index").write_text(json.dumps({"weight_map": weight_map}))
    (snapshot / INDEX).symlink_to(Path("../../blobs/index"))
    out = merge_checkpoints(tmp / "base.safetensors", [snapshot, paths[1]], tmp / "out", method="average")
    expected = {k: ((models[0][k] + models[1][k]) / 2 if base[k].is_floating_point() else base[k]) for k in base}
    got = load_file(out / "model.safetensors")
    assert all(torch.allclose(got[k], expected[k].to(got[k].dtype)) for k in base)


def test_index_with_values_that_are_not_file_names(disk, capsys):
    tmp, base, models, paths = disk
    for i, weight_map in enumerate([{"enc.bias": 5}, {"enc.bias": ["a"]}, {"enc.bias": None}, ["x"]]):
        folder = tmp / f"bad{i}"
        folder.mkdir()
        save_file(models[0], folder / "model.safetensors")
        (folder / INDEX).write_text(json.dumps({"weight_map": weight_map}))
        message = "is not a valid index" if isinstance(weight_map, list) else "maps key 'enc.bias' to a "
        refused(tmp, capsys, ["--base", tmp / "base.safetensors", "--model", folder], message)
        api_refused(tmp / "base.safetensors", [folder], tmp, message)


# ---- headers the format does not allow


def hostile_headers(tmp: Path, source: Path) -> list:
    """(file, message) pairs: copies of ``source`` with one defect in the header each."""
    header, data = header_of(source)
    header.pop("__metadata__", None)  # the cases below are built from the tensors' entries alone
    order = sorted(header, key=lambda k: header[k]["data_offsets"])
    first, second = order[0], order[1]
    cases = []

    def case(name, text, message, payload=data, length=None):
        cases.append((write_raw(tmp / f"{name}.safetensors", text, payload, length), message))

    overlap = json.loads(json.dumps(header))
    overlap[second]["data_offsets"] = list(header[first]["data_offsets"])  # reads the first tensor's bytes
    overlap[second]["shape"] = header[first]["shape"]
    case("overlap", json.dumps(overlap), "overlap another tensor's")
    dup = json.dumps(header)[:-1] + ", " + json.dumps(first) + ": " + json.dumps(header[first]) + "}"
    case("duplicate", dup, f"key {first!r} appears twice")
    negative = json.loads(json.dumps(header))
    size = header[first]["data_offsets"][1] - header[first]["data_offsets"][0]
    negative[first]["shape"] = [-1, -size // 4]  # product(shape) * 4 is still the right byte count
    case("negative", json.dumps(negative), "has a malformed shape (expected a list of non-negative integers)")
    case("inf_shape", json.dumps(header).replace('"shape": [', '"shape": [Infinity, ', 1), "Infinity is not valid JSON")
    inf_offsets = json.dumps(header).replace('"data_offsets": [0,', '"data_offsets": [-Infinity,', 1)
    case("inf_offsets", inf_offsets.replace('"data_offsets": [0, ', '"data_offsets": [-Infinity, ', 1),
         "Infinity is not valid JSON")
    case("nan", json.dumps(header).replace('"data_offsets": [', '"data_offsets": [NaN, ', 1), "NaN is not valid JSON")
    deep = json.loads(json.dumps(header))
    deep[first]["x"] = "DEEP"
    case("deep", json.dumps(deep).replace('"DEEP"', "[" * 200_000 + "]" * 200_000),
         "JSON nested deeper than 127 levels")
    case("huge_number", json.dumps(header).replace('"shape": [', '"shape": [1' + "0" * 400 + ", ", 1),
         "a number out of range")
    case("metadata", json.dumps(dict(header, __metadata__={"a": 1})), "__metadata__ must map strings to strings")
    case("trailing", json.dumps(header), "bytes after the last tensor that no tensor covers", data + b"\0" * 8)
    gap = json.loads(json.dumps(header))
    gap[first]["data_offsets"] = [4, 4 + size]
    case("gap", json.dumps(gap), "leave a gap", data + b"\0" * 4)
    case("dtype", json.dumps(header).replace('"F32"', '"F33"', 1), "has unknown dtype 'F33'")
    case("too_long", json.dumps(header), "exceeds the format's 100000000-byte limit", length=100_000_001)
    case("past_end", json.dumps(header), "its header length goes past the end", length=len(json.dumps(header)) + 10**6)
    case("utf8", b"{\"\xff\": 1}", "not valid UTF-8")
    return cases


def test_hostile_headers_are_refused_in_one_line(disk, capsys):
    tmp, base, models, paths = disk
    for path, message in hostile_headers(tmp, paths[0]):
        err = refused(tmp, capsys, ["--base", tmp / "base.safetensors", "--model", path], message)
        assert str(path) in err, err
        assert "100000001" not in err and str(len(json.dumps(header_of(paths[0])[0])) + 10**6) not in err
        with pytest.raises(FormatError, match="corrupt|malformed|overlap|gap|after the last|unknown dtype|header"):
            SafetensorsReader(path)
        api_refused(tmp / "base.safetensors", [path], tmp, message)
        path.unlink()


# ---- named pipes, devices and sockets


def test_named_pipes_devices_and_sockets_are_refused_without_blocking(disk, capsys):
    tmp, base, models, paths = disk
    b, m0 = tmp / "base.safetensors", paths[0]
    os.mkfifo(tmp / "pipe.safetensors")
    os.mkfifo(tmp / "pipe.bin")
    os.mkfifo(tmp / "pipe.yaml")
    fifo_shard = tmp / "fifo_shard"
    sharded(fifo_shard, models[0], {"enc.bias": "model-00002-of-00002.safetensors"})
    os.mkfifo(fifo_shard / "model-00002-of-00002.safetensors")
    fifo_index = tmp / "fifo_index"
    fifo_index.mkdir()
    save_file(models[0], fifo_index / "model-00001-of-00001.safetensors")
    os.mkfifo(fifo_index / INDEX)
    fifo_single = tmp / "fifo_single"
    fifo_single.mkdir()
    os.mkfifo(fifo_single / "model.safetensors")
    (tmp / "zero.safetensors").symlink_to("/dev/zero")
    server = socket.socket(socket.AF_UNIX)
    try:
        server.bind(str(tmp / "sock.safetensors"))
    except OSError:  # a temporary folder too deep for a socket's path (108 bytes)
        os.mkfifo(tmp / "sock.safetensors")
    pipe = "is a named pipe (FIFO), not a regular file"
    try:
        cases = [
            (["--base", b, "--model", tmp / "pipe.safetensors"], str(tmp / "pipe.safetensors") + " " + pipe),
            (["--base", tmp / "pipe.safetensors", "--model", m0], f"base model: {tmp / 'pipe.safetensors'} {pipe}"),
            (["--base", b, "--model", tmp / "pipe.bin"], str(tmp / "pipe.bin") + " " + pipe),
            (["--base", b, "--model", fifo_shard], str(fifo_shard / "model-00002-of-00002.safetensors") + " " + pipe),
            (["--base", b, "--model", fifo_index], str(fifo_index / INDEX) + " " + pipe),
            (["--base", b, "--model", fifo_single], str(fifo_single / "model.safetensors") + " " + pipe),
            (["--base", b, "--model", tmp / "zero.safetensors"], "zero.safetensors is a character device"),
            (["--base", b, "--model", tmp / "sock.safetensors"],
             "sock.safetensors is a " + ("socket" if server.getsockname() else "named pipe")),
            (["--config", tmp / "pipe.yaml"], "config: " + str(tmp / "pipe.yaml") + " " + pipe),
        ]
        for args, message in cases:
            refused(tmp, capsys, args, message)
            if "--config" not in args:
                api_refused(args[1], [args[3]], tmp, message.split(": ")[-1])
        with deadline(), pytest.raises(ValueError, match=re.escape(pipe)):
            load_config(tmp / "pipe.yaml")
    finally:
        server.close()


def test_a_pipe_swapped_in_after_the_check_cannot_block(tmp_path, monkeypatch):
    """stat says regular file, the open finds a FIFO: O_NONBLOCK keeps the open from waiting for
    a writer, and fstat on the descriptor refuses it."""
    os.mkfifo(tmp_path / "swapped.safetensors")
    regular = os.stat(__file__)
    real_stat = os.stat
    monkeypatch.setattr(os, "stat", lambda p, *a, **k: regular if str(p).endswith("swapped.safetensors")
                        else real_stat(p, *a, **k))
    with deadline(), pytest.raises(NotAFileError, match="is a named pipe"):
        open_regular(tmp_path / "swapped.safetensors")


# ---- no traceback, one line with what and where


def test_torch_files_with_dtypes_and_keys_safetensors_cannot_hold(disk, capsys):
    tmp, base, models, paths = disk
    b = tmp / "base.safetensors"
    odd = dict(base, phase=torch.randn(3, dtype=torch.complex64), ids=torch.arange(5).to(torch.uint16))
    torch.save(odd, tmp / "odd_base.pt")
    assert cli(["merge", "--base", str(tmp / "odd_base.pt"), "--model", str(paths[0]), "--out", str(tmp / "odd"),
                "--quiet"]) == 0  # safetensors has these dtypes: the base's tensors are copied
    got = load_file(tmp / "odd" / "model.safetensors")
    assert torch.equal(got["phase"], odd["phase"]) and torch.equal(got["ids"], odd["ids"])
    assert capsys.readouterr().err == ""
    cases = [({"enc.weight": models[0]["enc.weight"], "__metadata__": torch.zeros(1)}, "key '__metadata__' is reserved"),
             ({**models[0], 5: torch.zeros(1)}, "key 5 is a int; keys must be strings"),
             ({**models[0], "c": torch.zeros(2, dtype=torch.complex128)}, "dtype torch.complex128 has no safetensors"),
             ({**models[0], "s": torch.zeros(3, 3).to_sparse()}, "key 's': a torch.sparse_coo tensor")]
    for i, (state, message) in enumerate(cases):
        torch.save(state, tmp / f"bad{i}.pt")
        refused(tmp, capsys, ["--base", tmp / f"bad{i}.pt", "--model", paths[0]], message)
        api_refused(tmp / f"bad{i}.pt", [paths[0]], tmp, message)
        api_refused(state, [paths[0]], tmp, message)  # a state dict given to merge_checkpoints is written too
    for i, dtype in enumerate((torch.float8_e4m3fn, torch.float8_e5m2)):
        torch.save({k: v.to(dtype) if v.is_floating_point() else v for k, v in models[0].items()}, tmp / f"fp8{i}.pt")
        message = f"key 'enc.bias': {dtype} tensors are not merged"  # the first merged key
        refused(tmp, capsys, ["--base", b, "--model", tmp / f"fp8{i}.pt"], message)
        refused(tmp, capsys, ["--base", tmp / f"fp8{i}.pt", "--model", paths[0]], "base model, " + message)
        api_refused(b, [tmp / f"fp8{i}.pt"], tmp, message)


def test_sizes_beyond_float_range(disk, capsys):
    tmp, base, models, paths = disk
    for flag in ("--max-memory", "--shard-size"):
        for value in ("1e400", "1e308TB"):
            refused(tmp, capsys, ["--base", tmp / "base.safetensors", "--model", paths[0], flag, value],
                    f"={value!r} is not a finite size")
    for value in (float("inf"), float("nan"), 10**400, "1e400"):
        with pytest.raises(ValueError, match="is not a finite size"):
            parse_size(value, "max_memory")
    api_refused(tmp / "base.safetensors", paths, tmp, "shard_size='1e400' is not a finite size", shard_size="1e400")


def test_config_entries_of_the_wrong_type(disk, capsys):
    tmp, base, models, paths = disk
    head = f"base_model: {tmp / 'base.safetensors'}\nmodels:\n  - model: {paths[0]}\n"
    cases = [("merge_method: ties\ndtype: [float16]\n", "dtype=['float16'] is not valid"),
             ("merge_method: [ties]\n", "merge_method=['ties'] is not valid"),
             ("merge_method: ties\nparameters:\n  exclude: 5\n", "parameters.exclude=5 must be a regular expression"),
             ("merge_method: ties\nparameters:\n  exclude: [a, [b]]\n", "parameters.exclude=['a', ['b']] must be"),
             ("merge_method: ties\n1: x\nz: y\n", "unknown entry 1"),
             ("merge_method: ties\n" + "x: " + "[" * 100_000 + "]" * 100_000 + "\n", "config " + str(tmp / "c.yaml")),
             ]
    for text, message in cases:
        (tmp / "c.yaml").write_text(head + text)
        refused(tmp, capsys, ["--config", tmp / "c.yaml"], message)
        with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
            kwargs = load_config(tmp / "c.yaml")
            merge_checkpoints(out=tmp / "out", **kwargs)
    (tmp / "c.yaml").write_bytes(b"merge_method: \xff\n")
    refused(tmp, capsys, ["--config", tmp / "c.yaml"], f"config {tmp / 'c.yaml'}: not UTF-8 text")
    (tmp / "c.yaml").unlink()
    (tmp / "c.yaml").mkdir()
    refused(tmp, capsys, ["--config", tmp / "c.yaml"], f"config: {tmp / 'c.yaml'} is a folder, not a regular file")
    with pytest.raises(ValueError, match="dtype=\\['float16'\\]"):
        parse_config({"merge_method": "ties", "base_model": "b", "models": ["a"], "dtype": ["float16"]})


def test_folders_where_files_belong_and_unreadable_folders(disk, capsys, monkeypatch):
    tmp, base, models, paths = disk
    b = tmp / "base.safetensors"
    index_folder = tmp / "index_is_a_folder"
    index_folder.mkdir()
    save_file(models[0], index_folder / "model.safetensors")
    (index_folder / INDEX).mkdir()
    refused(tmp, capsys, ["--base", b, "--model", index_folder], f"{index_folder / INDEX} is a folder, not a regular file")
    globbed = tmp / "globbed"
    globbed.mkdir()
    save_file(models[0], globbed / "a.safetensors")
    (globbed / "x.safetensors").mkdir()
    refused(tmp, capsys, ["--base", b, "--model", globbed], f"{globbed / 'x.safetensors'} is a folder, not a regular file")
    api_refused(b, [globbed], tmp, "x.safetensors is a folder")
    (tmp / "dir.safetensors").mkdir()
    refused(tmp, capsys, ["--base", b, "--model", tmp / "dir.safetensors"], "no weights found in the folder")
    long = tmp / ("x" * 300 + ".safetensors")  # ENAMETOOLONG: an errno that is not "no such file"
    refused(tmp, capsys, ["--base", b, "--model", long], "cannot access it (File name too long)")
    locked = tmp / "locked"
    locked.mkdir()
    save_file(models[0], locked / "model.safetensors")
    real_scandir = os.scandir

    def scandir(path="."):
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    with monkeypatch.context() as patch:
        patch.setattr(os, "scandir", scandir)
        refused(tmp, capsys, ["--base", b, "--model", locked],
                f"cannot read the folder {locked} (Permission denied)")
    if os.geteuid() != 0:  # root reads folders whatever their mode
        locked.chmod(0)
        try:
            refused(tmp, capsys, ["--base", b, "--model", locked], f"cannot read the folder {locked} (Permission denied)")
            api_refused(b, [locked], tmp, "Permission denied")
        finally:
            locked.chmod(0o700)


# ---- float8 tensors are refused, naming the dtype


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_float8_tensors_are_refused_unless_copied(disk, capsys, dtype):
    tmp, base, models, paths = disk
    eight = lambda state: dict(state, **{"enc.weight": state["enc.weight"].to(dtype)})  # noqa: E731
    save_file(eight(base), tmp / "base8.safetensors")
    save_file(eight(models[0]), tmp / "m8.safetensors")
    name = str(dtype)
    refused(tmp, capsys, ["--base", tmp / "base8.safetensors", "--model", tmp / "m8.safetensors"],
            f"base model, key 'enc.weight': {name} tensors are not merged (valid: float32, float16, bfloat16, "
            "float64); exclude the key to copy it from the base")
    refused(tmp, capsys, ["--base", tmp / "base.safetensors", "--model", tmp / "m8.safetensors"],
            f"key 'enc.weight': {name} tensors are not merged")
    api_refused(tmp / "base8.safetensors", [tmp / "m8.safetensors"], tmp, f"{name} tensors are not merged")
    # excluded, the base's float8 tensors are copied bit for bit
    assert cli(["merge", "--base", str(tmp / "base8.safetensors"), "--model", str(tmp / "m8.safetensors"), "--out",
                str(tmp / "copied"), "--exclude", "enc.weight", "--quiet"]) == 0
    got = load_file(tmp / "copied" / "model.safetensors")
    assert got["enc.weight"].dtype == dtype
    assert torch.equal(got["enc.weight"].view(torch.uint8), eight(base)["enc.weight"].view(torch.uint8))


def test_open_checkpoint_raises_value_errors_only(tmp_path):
    """The Python API on the same inputs: ValueError subclasses, nothing else."""
    base, models = make_models()
    save_file(models[0], tmp_path / "m.safetensors")
    for path, message in hostile_headers(tmp_path, tmp_path / "m.safetensors"):
        with pytest.raises(ValueError, match=str(path).replace(".", r"\.")):
            open_checkpoint(path, "model")
    os.mkfifo(tmp_path / "p.safetensors")
    with deadline(), pytest.raises(ValueError, match="named pipe"):
        open_checkpoint(tmp_path / "p.safetensors")
    with pytest.raises(ValueError, match="NUL"):
        open_checkpoint("a\0b.safetensors")


def test_readers_collected_at_interpreter_exit_close_quietly(tmp_path, monkeypatch):
    """At exit, Python may clear module globals (``os`` becomes None) before a reader is collected; its
    ``__del__`` must still close the file, not print "Exception ignored ... 'NoneType' has no attribute"."""
    import pcb_fast.io.checkpoints as checkpoints_module
    import pcb_fast.io.safetensors as safetensors_module

    save_file({"w": torch.ones(4)}, tmp_path / "a.safetensors")
    torch.save({"w": torch.ones(4)}, tmp_path / "a.bin")
    readers = [SafetensorsReader(tmp_path / "a.safetensors"), open_checkpoint(tmp_path / "a.bin")]
    fds = [readers[0]._fd, readers[1].fd]
    assert all(fd is not None for fd in fds)
    monkeypatch.setattr(safetensors_module, "os", None)
    monkeypatch.setattr(checkpoints_module, "os", None)
    for reader in readers:
        reader.__del__()
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)  # closed
