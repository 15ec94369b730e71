"""Models on disk or in memory, read lazily one tensor slice at a time (docs/design.md 7.1).

``open_checkpoint`` accepts a .safetensors file, a Hugging Face folder (sharded with
model.safetensors.index.json, or a single model.safetensors), a .bin/.pt/.pth file or folder
(through ``torch.load(weights_only=True)`` only), or an in-memory state dict. Every kind answers
the same questions: its keys, each key's dtype and shape, and the values of a flat slice. Files are
read with positioned reads into owned buffers, never through a memory map (a file truncated under a
map kills the reading process with SIGBUS); a torch zip file whose members are stored is read in
place, one with compressed members (or in torch's legacy format) is loaded whole.

Only regular files are opened (a named pipe, device or socket is refused, see
``safetensors.open_regular``); the shards an index lists must be plain file names in the model
folder, checked before any is opened; every problem is one ``ValueError`` naming the input and
the path.
"""

from __future__ import annotations

import itertools
import json
import math
import operator
import os
import re
import stat
import struct
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Sequence

import torch

from ..core.memory import available_memory
from .safetensors import (DTYPE, MAX_DEPTH, MAX_HEADER, NAMES, NBYTES, OFFSET, SHAPE, FormatError, NotAFileError,
                          SafetensorsReader, TensorTable, Unchanged, advise_range, deeper_than, not_regular, open_regular,
                          read_exactly, read_regular, shared, show, show_path)

INDEX = "model.safetensors.index.json"
# floating dtypes that a merge reads (as float32) and writes back; float8 tensors are refused
MERGED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

TORCH_SUFFIXES = (".bin", ".pt", ".pth")
# files of a Hugging Face folder that describe the model rather than hold its weights
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "added_tokens.json", "tokenizer.model", "spiece.model", "vocab.json",
              "vocab.txt", "merges.txt", "preprocessor_config.json", "chat_template.json", "chat_template.jinja")


class Checkpoint:
    """Keys, dtypes and shapes of a model, and reads of flat slices of its tensors."""

    def __init__(self, name: str, folder: Path | None = None):
        self.name = name
        self.folder = folder  # the Hugging Face folder, whose side files are copied to the output

    def keys(self) -> list:
        raise NotImplementedError

    def dtype(self, key: str) -> torch.dtype:
        raise NotImplementedError

    def shape(self, key: str) -> tuple:
        raise NotImplementedError

    def read_into(self, key: str, lo: int, hi: int, out: torch.Tensor) -> torch.Tensor:
        """Entries [lo, hi) of the flattened tensor into ``out`` (contiguous, of the key's dtype)."""
        raise NotImplementedError

    def advise(self, key: str, lo: int, hi: int) -> None:
        """A hint that entries [lo, hi) of ``key`` will be read soon (files: the kernel may start
        reading them); nothing to do in memory."""

    def plan_reads(self, keys: Sequence[str]) -> list:
        """How to read the whole tensors ``keys`` (of one dtype) one after the other
        (:meth:`read_planned`): here one read per key; files join the keys that lie next to each other."""
        return [(key, self.numel(key)) for key in keys]

    def read_planned(self, plan: list, out: torch.Tensor) -> torch.Tensor:
        """The tensors of a :meth:`plan_reads` plan, one after the other, into ``out`` (contiguous)."""
        at = 0
        for key, numel in plan:
            self.read_into(key, 0, numel, out[at : at + numel])
            at += numel
        return out

    def advise_planned(self, plan: list) -> None:
        """:meth:`advise` for the tensors of a :meth:`plan_reads` plan."""
        for key, numel in plan:
            self.advise(key, 0, numel)

    def numel(self, key: str) -> int:
        return math.prod(self.shape(key))

    def same_layout(self, other: "Checkpoint") -> bool:
        """True where ``other`` is known to hold the same keys with the same dtypes and shapes (files
        that share one header); False where that is unknown."""
        return False

    def layout(self, keys: Sequence[str]) -> tuple[list, list]:
        """(dtypes, shapes) of ``keys``, two lists: what the checks of a merge compare, asked once for
        every key."""
        return [self.dtype(key) for key in keys], [tuple(self.shape(key)) for key in keys]

    def nbytes(self, keys: Sequence[str]) -> int:
        """Bytes of the tensors ``keys`` together."""
        return sum(self.numel(key) * self.dtype(key).itemsize for key in keys)

    def read(self, key: str) -> torch.Tensor:
        numel = self.numel(key)
        return self.read_into(key, 0, numel, torch.empty(numel, dtype=self.dtype(key))).view(self.shape(key))

    def is_floating(self, key: str) -> bool:
        return self.dtype(key).is_floating_point

    def close(self) -> None:
        pass


class StateDictCheckpoint(Checkpoint):
    """An in-memory state dict (CPU tensors).

    ``written``: its tensors will be written to safetensors (a file loaded with torch.load, or a
    state dict given to ``merge_checkpoints``), so every key must be a string other than
    ``__metadata__`` and every tensor dense, of a dtype the format has."""

    def __init__(self, state: dict, name: str, written: bool = False):
        super().__init__(name)
        if not isinstance(state, dict):
            raise ValueError(f"{name} is a {type(state).__name__}, expected a state dict (dict of tensors)")
        for key, t in state.items():
            if written and not isinstance(key, str):
                raise ValueError(f"{name}: key {show(key)} is a {type(key).__name__}; keys must be strings")
            if written and key == "__metadata__":
                raise ValueError(f"{name}: key '__metadata__' is reserved by the safetensors format; rename it")
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"{name}, key {show(key)}: value is a {type(t).__name__}, expected a torch.Tensor")
            if t.layout != torch.strided:
                raise ValueError(f"{name}, key {show(key)}: a {t.layout} tensor; only dense tensors are supported")
            if written and t.dtype not in NAMES:
                raise ValueError(f"{name}, key {show(key)}: dtype {t.dtype} has no safetensors equivalent; supported: "
                                 f"{', '.join(str(d).replace('torch.', '') for d in NAMES)}")
        self.state = state
        self.files = []  # a torch file read whole: its path

    def keys(self):
        return sorted(self.state)

    def dtype(self, key):
        return self.state[key].dtype

    def shape(self, key):
        return tuple(self.state[key].shape)

    def layout(self, keys):
        tensors = list(map(self.state.__getitem__, keys))
        return [t.dtype for t in tensors], [tuple(t.shape) for t in tensors]

    def read_into(self, key, lo, hi, out):
        out.copy_(self.state[key].reshape(-1)[lo:hi])
        return out


class TorchFileCheckpoint(StateDictCheckpoint):
    """A torch zip file (.bin/.pt/.pth) whose members are stored, read as safetensors files are.

    Its tensors are known from its pickle, loaded onto the meta device (no data read: each storage
    records where its bytes start in the file); their values are read with positioned reads into the
    caller's buffers. Nothing is memory-mapped: a file truncated while a merge reads it ends a read
    early (a one-line error), where a mapped page past its new end would kill the process (SIGBUS);
    a file rewritten in place is found by the watch checked after every read. A tensor that is not
    contiguous in its storage (a saved transpose) is read whole once and kept while its slices are
    read."""

    def __init__(self, state: dict, name: str, watch: Unchanged, starts: dict):
        """``state``: meta tensors; ``watch``: the open file; ``starts``: each key's byte offset in the
        file of its storage."""
        super().__init__(state, name, written=True)
        self.watch, self.fd, self.files, self.starts = watch, watch.fd, [watch.path], starts
        self._strided = (None, None)  # the last non-contiguous tensor read: its key, its flattened values

    def _position(self, key: str, lo: int) -> int:
        t = self.state[key]
        return self.starts[key] + (t.storage_offset() + lo) * t.element_size()

    def read_into(self, key, lo, hi, out):
        t = self.state[key]
        try:
            if t.is_contiguous():
                read_exactly(self.fd, out, self._position(key, lo), self.watch, f"key {show(key)}")
            else:
                out.copy_(self._whole(key)[lo:hi])
        except FormatError as e:
            raise ValueError(f"{self.name}: {e}") from None
        return out

    def _whole(self, key: str) -> torch.Tensor:
        """The flattened values of the non-contiguous tensor ``key``, read once: the span of its storage
        it covers, then its strides applied."""
        cached, values = self._strided  # one read of the pair: a reader thread may replace it meanwhile
        if cached != key:
            t = self.state[key]
            span = 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
            raw = torch.empty(span, dtype=t.dtype)
            read_exactly(self.fd, raw, self._position(key, 0), self.watch, f"key {show(key)}")
            values = raw.as_strided(t.shape, t.stride()).contiguous().view(-1)
            self._strided = (key, values)
        return values

    def advise(self, key, lo, hi):
        t = self.state[key]
        if self.fd is not None and t.is_contiguous():
            advise_range(self.fd, self._position(key, lo), (hi - lo) * t.element_size())

    def close(self):
        if getattr(self, "fd", None) is not None:
            os.close(self.fd)
            self.fd = None
        self._strided = (None, None)

    def __del__(self, _close=os.close):
        # At interpreter exit the module's globals (``os``) may already be None (see SafetensorsReader).
        fd, self.fd = getattr(self, "fd", None), None
        if fd is not None:
            _close(fd)


class SafetensorsCheckpoint(Checkpoint):
    """One or several safetensors files (the shards of a Hugging Face folder)."""

    def __init__(self, files: list, name: str, folder: Path | None = None):
        super().__init__(name, folder)
        self.readers, self.where = [], {}
        try:
            for path in files:
                reader = SafetensorsReader(path)
                self.readers.append(reader)
                twice = reader.tensors.keys() & self.where.keys()
                if twice:
                    key = next(key for key in reader.tensors if key in twice)  # (the first of this file)
                    raise FormatError(f"key {show(key)} is in both {show_path(self.where[key].path.name)} and "
                                      f"{show_path(path.name)}")
                self.where.update(dict.fromkeys(reader.tensors, reader))
        except FormatError as e:
            self.close()
            raise ValueError(f"{name}: {e}") from None
        # key -> (dtype, shape, offset, nbytes) in whichever file holds it (io.safetensors.TensorTable); one
        # file's own table (whose header another file may share: one table for both, read-only)
        self.info = (self.readers[0].tensors if len(self.readers) == 1
                     else TensorTable.joined([reader.tensors for reader in self.readers]))
        self._sorted = shared(("sorted keys", id(self.info)), lambda: (self.info, sorted(self.where)))[1]

    def same_layout(self, other) -> bool:
        return isinstance(other, SafetensorsCheckpoint) and other.info is self.info

    def keys(self):
        return list(self._sorted)

    def dtype(self, key):
        return self.info[key][DTYPE]

    def shape(self, key):
        return self.info[key][SHAPE]

    def layout(self, keys):
        return self.info.column(DTYPE, keys), self.info.column(SHAPE, keys)

    def nbytes(self, keys):
        return sum(self.info.column(NBYTES, keys))

    def advise(self, key, lo, hi):
        self.where[key].advise(key, lo, hi)

    def read_into(self, key, lo, hi, out):
        try:
            return self.where[key].read_into(key, lo, hi, out)
        except FormatError as e:
            raise ValueError(f"{self.name}: {e}") from None

    def plan_reads(self, keys):
        """Runs (file, first byte, bytes, the keys): tensors that lie next to each other in one file
        are read together."""
        readers = set(map(self.where.__getitem__, keys))
        if len(readers) == 1:  # the usual case, checked in bulk: one file, the keys one after the other
            reader = readers.pop()
            offsets = reader.tensors.column(OFFSET, keys)
            ends = list(map(operator.add, offsets, reader.tensors.column(NBYTES, keys)))
            if offsets[1:] == ends[:-1]:
                return [[reader, offsets[0], ends[-1] - offsets[0], list(keys)]]
        runs = []
        for key in keys:
            reader = self.where[key]
            _, _, offset, size = reader.tensors[key]
            last = runs[-1] if runs else None
            if last is not None and last[0] is reader and last[1] + last[2] == offset:
                last[2] += size
                last[3].append(key)
            else:
                runs.append([reader, offset, size, [key]])
        return runs

    def read_planned(self, plan, out):
        view, at = out.view(-1).view(torch.uint8), 0
        try:
            for reader, position, size, keys in plan:
                reader.read_bytes(position, view[at : at + size], keys)
                at += size
        except FormatError as e:
            raise ValueError(f"{self.name}: {e}") from None
        if at != view.numel():
            raise ValueError(f"{self.name}: read_planned: buffer of {view.numel()} bytes for {at}")
        return out

    def advise_planned(self, plan):
        for reader, position, size, _ in plan:
            reader.advise_bytes(position, size)

    def close(self):
        for reader in self.readers:
            reader.close()


def _zip_layout(fd: int, path: Path, name: str) -> tuple[dict | None, int]:
    """({file offset where a member's bytes start: its size} of a torch zip file whose members are all
    stored, else None; the bytes that loading it whole takes). A file with deflated members (their
    bytes are not the tensors'), a legacy (non-zip) file and a big-endian one are read whole by
    torch.load. A member that ends past the end of the file (truncated or corrupt) is refused."""
    size = os.fstat(fd).st_size
    with os.fdopen(os.dup(fd), "rb") as f:
        if not zipfile.is_zipfile(f):
            return None, size
        try:
            archive = zipfile.ZipFile(f)
            members, stored, whole = {}, True, 0
            for member in archive.infolist():
                f.seek(member.header_offset)
                local = f.read(30)
                if len(local) < 30 or local[:4] != b"PK\x03\x04":
                    raise zipfile.BadZipFile(f"member {show(member.filename)} has no local header")
                name_length, extra_length = struct.unpack("<HH", local[26:30])
                begin = member.header_offset + 30 + name_length + extra_length
                if begin + member.compress_size > size:
                    raise zipfile.BadZipFile(f"member {show(member.filename)} ends past the end of the file")
                stored &= member.compress_type == zipfile.ZIP_STORED
                members[begin] = member.file_size
                whole += member.file_size
            order = next((m for m in archive.namelist() if m.endswith("/byteorder")), None)
            foreign = order is not None and archive.read(order).strip() not in (b"", sys.byteorder.encode())
        except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError, struct.error) as e:
            raise ValueError(f"{name}: {show_path(path.name)} is a truncated or corrupt torch zip file "
                             f"({str(e)[:120]})") from None
    return (members if stored and not foreign else None), whole


def _starts(state: dict, members: dict) -> dict | None:
    """{key: file offset of its storage's first byte} from the meta tensors of ``state`` (loaded with
    map_location="meta", whose storages record their offset), each checked to start a stored member
    that holds the whole tensor; None when an offset is missing or fails that check. (torch computes
    the offsets of a file that records format version 1 from the layout its own writer gives a zip:
    a file re-packed by another zip writer would be read at the wrong places.)"""
    starts = {}
    for key, t in state.items():
        if not isinstance(t, torch.Tensor) or t.device.type != "meta":
            return None
        start = getattr(t.untyped_storage(), "_checkpoint_offset", None)
        if not isinstance(start, int):
            return None
        last = t.storage_offset() + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
        end = 0 if t.numel() == 0 else (last + 1) * t.element_size()
        if start not in members or end > members[start]:
            return None
        starts[key] = start
    return starts


def _torch_load(fd: int, path: Path, name: str, **how):
    """torch.load(weights_only=True) of the open file ``fd``; any failure is one ValueError."""
    # torch opens the file itself: through /proc/self/fd it opens the file checked before, whatever
    # the path names by then
    proc = f"/proc/self/fd/{fd}"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on legacy files; their errors are ours below
            state = torch.load(proc if os.path.exists(proc) else path, weights_only=True, **how)
    except Exception as e:  # pickle errors, non-tensor objects refused by weights_only, zip errors
        text = (str(e).splitlines()[0] if str(e) else type(e).__name__).replace(proc, path.name)
        raise ValueError(f"{name}: cannot load {show_path(path.name)} with torch.load(weights_only=True): "
                         f"{text[:200]}") from None
    if not isinstance(state, dict):
        raise ValueError(f"{name}: {show_path(path.name)} holds a {type(state).__name__}, expected a state dict")
    return state


def _state_dict(path: Path, name: str, folder: Path | None = None) -> StateDictCheckpoint:
    """A torch file: read in place when its members are stored (:class:`TorchFileCheckpoint`),
    else loaded whole (within the memory available)."""
    try:
        fd = open_regular(path)
    except NotAFileError as e:
        raise ValueError(f"{name}: {e}") from None
    try:
        members, whole = _zip_layout(fd, path, name)
        if members is not None:
            watch = Unchanged(fd, path)  # the pickle is read now: a change from here on is an error
            try:
                state = _torch_load(fd, path, name, map_location="meta")
            except ValueError:  # what torch's meta loading cannot place is loaded whole (its error, if any)
                state = None
            if state is not None:
                StateDictCheckpoint(state, name, written=True)  # its keys and tensors checked first
            starts = None if state is None else _starts(state, members)
            if starts is not None:
                try:
                    watch.check()
                except FormatError as e:
                    raise ValueError(f"{name}: {e}") from None
                checkpoint = TorchFileCheckpoint(state, name, watch, starts)
                checkpoint.folder, fd = folder, None  # the checkpoint owns the descriptor now
                return checkpoint
        if whole > available_memory():
            raise ValueError(f"{name}: {show_path(path.name)} is compressed, in torch's legacy format or not laid out "
                             f"as torch.save writes it, so it is read whole, and its {whole} bytes exceed the memory "
                             "available; save it with torch.save's default (zip, stored) format or as safetensors")
        checkpoint = StateDictCheckpoint(_torch_load(fd, path, name, map_location="cpu"), name, written=True)
        checkpoint.folder, checkpoint.files = folder, [path]
        return checkpoint
    finally:
        if fd is not None:
            os.close(fd)


def _inside(path: str, folder: str) -> bool:
    return os.path.commonpath([path, folder]) == folder


def _hub_blob(target: str, folder: str) -> bool:
    """Whether ``target`` is a blob of the Hugging Face cache repository whose snapshot holds
    ``folder`` (the cache links models--org--name/snapshots/<rev>/<file> to ../../blobs/<hash>)."""
    for snapshot in [Path(folder), *Path(folder).parents]:
        if snapshot.parent.name == "snapshots":
            return Path(target).parent == snapshot.parent.parent / "blobs"
    return False


def side_files(folder, name: str) -> list[Path]:
    """The side files (config, tokenizer, ...) of a model folder that a merge copies to its output:
    regular files whose real path stays inside the folder (or in the Hugging Face cache's blobs of
    the same repository); a side file that links elsewhere, or is not a regular file, is an error."""
    if folder is None:
        return []
    folder, found = Path(folder), []
    for file in SIDE_FILES:
        path = folder / file
        if not os.path.lexists(path):
            continue
        check_inside(folder, [file], name, what="")
        try:
            mode = os.stat(path).st_mode
        except OSError as e:
            raise ValueError(f"{name}: cannot read {show_path(path)} ({e.strerror or e})") from None
        if not stat.S_ISREG(mode):
            raise ValueError(f"{name}: {not_regular(path, mode)}")
        found.append(path)
    return found


def _check_shard_names(folder: Path, files: list, name: str) -> None:
    """Every shard name of the index is a plain file name in ``folder`` whose real path (links
    followed) stays inside it (or in the Hugging Face cache's blobs of the same repository)."""
    for file in files:
        if (file in ("", ".", "..") or "/" in file or "\\" in file or "\0" in file or os.path.isabs(file)
                or os.sep in file):
            raise ValueError(f"{name}: {INDEX} lists shard {show(file)}, which is not a plain file name in the model "
                             "folder (no folders, '..' or absolute paths)")
    check_inside(folder, files, name, what="shard", listed=f" listed in {INDEX}")


def check_inside(folder: Path, files: list, name: str, what: str = "weight file", listed: str = "",
                 kind: str = "model") -> None:
    """The files ``files`` of a model or adapter folder (weights found by name or listed in an index,
    side files, an adapter's config) have real paths (links followed) inside it, or in the Hugging
    Face cache's blobs of the same repository: one rule for every file a run reads from a folder.
    ``what``: how the message names a file ("" for its bare name), ``kind``: the folder's."""
    real_folder = os.path.realpath(folder)
    for file in files:
        target = os.path.realpath(Path(folder) / file)
        if not _inside(target, real_folder) and not _hub_blob(target, real_folder):
            named = f"{what} {show(file)}" if what else show_path(file, 100)
            raise ValueError(f"{name}: {named}{listed} links to a file outside the {kind} folder; copy it into the "
                             "folder")


JSON_LIMIT = 64 << 20  # bytes of a JSON side file read by pcb_fast (config.json, an index, a tokenizer config)


def parse_json(raw: bytes, what: str):
    """The JSON document ``raw``; a ValueError naming ``what`` if it is not UTF-8 JSON or nests more
    than MAX_DEPTH levels (checked before parsing: a deep document cannot exhaust the stack)."""
    try:
        text = raw.decode("utf-8")
        if deeper_than(text, MAX_DEPTH):
            raise ValueError(f"nested deeper than {MAX_DEPTH} levels")
        return json.loads(text)
    except (UnicodeDecodeError, RecursionError, ValueError) as e:
        reason = "not UTF-8" if isinstance(e, UnicodeDecodeError) else str(e).splitlines()[0][:100] or "too deep"
        raise ValueError(f"{what} is not valid JSON ({reason})") from None


def load_json(path, what: str, limit: int = JSON_LIMIT):
    """The JSON document of the regular file ``path`` (at most ``limit`` bytes); one ValueError
    naming ``what`` for a file that cannot be read or parsed."""
    try:
        return parse_json(read_regular(path, limit), what)
    except NotAFileError as e:
        raise ValueError(f"{what}: {e}") from None


def _read_index(path: Path, name: str) -> tuple[list, dict]:
    """The shard file names of the index in ``path``, checked (none opened yet), and its weight_map."""
    index = path / INDEX
    try:
        raw = read_regular(index, MAX_HEADER)
    except NotAFileError as e:
        raise ValueError(f"{name}: {e}") from None
    try:
        data = parse_json(raw, INDEX)
    except ValueError:
        data = None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict):
        raise ValueError(f"{name}: {INDEX} is not a valid index (no weight_map)")
    for key, file in weight_map.items():
        if not isinstance(file, str):
            raise ValueError(f"{name}: {INDEX} maps key {show(key)} to a {type(file).__name__}, expected the file name "
                             "of a shard")
    files = sorted(set(weight_map.values()))
    _check_shard_names(path, files, name)
    return files, weight_map


def _open_folder(path: Path, name: str) -> Checkpoint:
    try:
        names = {entry.name for entry in os.scandir(path)}
    except OSError as e:
        raise ValueError(f"{name}: cannot read the folder {show_path(path)} ({e.strerror or e})") from None
    if INDEX in names:
        files, weight_map = _read_index(path, name)
        missing = [f for f in files if f not in names]
        if missing:
            raise ValueError(f"{name}: shard {show(missing[0])} listed in {INDEX} is missing")
        checkpoint = SafetensorsCheckpoint([path / f for f in files], name, path)
        unlisted = sorted(set(checkpoint.where) - set(weight_map))
        if unlisted:
            checkpoint.close()
            raise ValueError(f"{name}: key {show(unlisted[0])} is in a shard but not in {INDEX}")
        return checkpoint
    if "model.safetensors" in names:
        check_inside(path, ["model.safetensors"], name)
        return SafetensorsCheckpoint([path / "model.safetensors"], name, path)
    shards = sorted(n for n in names if n.endswith(".safetensors") and not n.startswith("."))
    if shards:
        check_inside(path, shards, name)
        return SafetensorsCheckpoint([path / n for n in shards], name, path)
    for candidate in ("pytorch_model.bin", "model.pt"):
        if candidate in names:
            check_inside(path, [candidate], name)
            return _state_dict(path / candidate, name, path)
    raise ValueError(f"{name}: no weights found in the folder (expected model.safetensors, "
                     f"{INDEX} with its shards, or pytorch_model.bin)")


def _unless_named(path, name: str) -> str:
    """The words " <path>" to name ``path`` in a message, or "" where its ``name`` already shows it."""
    return "" if show_path(path) in name else f" {show_path(path)}"


def open_checkpoint(source, name: str | None = None) -> Checkpoint:
    """A :class:`Checkpoint` for a path (file or folder) or an in-memory state dict."""
    if isinstance(source, dict):
        return StateDictCheckpoint(source, name or "model", written=True)
    path = Path(source)
    name = name or show_path(path)
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        raise ValueError(f"{name}: no such file or folder{_unless_named(path, name)}") from None
    except OSError as e:
        raise ValueError(f"{name}: cannot access{_unless_named(path, name) or ' it'} ({e.strerror or e})") from None
    except ValueError:  # a NUL byte
        raise ValueError(f"{name}: not a valid path (it holds a NUL byte)") from None
    if stat.S_ISDIR(mode):
        return _open_folder(path, name)
    if path.suffix == ".safetensors":
        return SafetensorsCheckpoint([path], name)
    if path.suffix in TORCH_SUFFIXES:
        return _state_dict(path, name)
    if not stat.S_ISREG(mode):
        raise ValueError(f"{name}: {not_regular(path, mode)}")
    raise ValueError(f"{name}: unsupported checkpoint format {show(path.suffix or path.name, 40)}; valid: a .safetensors "
                     "file, a Hugging Face folder, or a .bin/.pt/.pth file")


def open_model(source, name: str | None = None) -> Checkpoint:
    """The checkpoint of a path or a state dict (:func:`open_checkpoint`), or of a model made of
    others, which opens itself (stitched from slices, pcb_fast.io.slices; re-mapped to a
    vocabulary, pcb_fast.io.vocabulary; with a LoRA adapter merged in, pcb_fast.io.lora_models)."""
    return open_checkpoint(source, name) if isinstance(source, (str, os.PathLike, dict)) else source.open(name)


def split_keys(base: Checkpoint, exclude: Sequence[str]) -> tuple[list[str], list[str]]:
    """(merged, copied) keys of ``base``: floating tensors not matching any exclude regex are merged."""
    patterns = []
    for p in exclude:
        try:
            patterns.append(re.compile(p))
        except re.error as e:
            raise ValueError(f"exclude pattern {show(p)} is not a valid regular expression: {e}") from None
    keys = base.keys()
    dtypes, shapes = base.layout(keys)
    floating = {dtype: dtype.is_floating_point for dtype in set(dtypes)}  # (asked once per dtype and shape)
    filled = {shape: 0 not in shape for shape in set(shapes)}
    # (in bulk: a model may have hundreds of thousands of keys)
    merging = list(map(operator.and_, map(floating.__getitem__, dtypes), map(filled.__getitem__, shapes)))
    if patterns:
        merging = [m and not any(p.search(key) for p in patterns) for key, m in zip(keys, merging)]
    merged = list(itertools.compress(keys, merging))
    copied = list(itertools.compress(keys, map(operator.not_, merging)))
    for pattern in patterns:  # a typo in a pattern would otherwise merge what the user meant to keep
        if not any(pattern.search(key) for key in base.keys()):
            warnings.warn(f"pcb_fast: exclude pattern {show(pattern.pattern)} matches no key of the base model; "
                          "it excludes nothing", stacklevel=3)
    return merged, copied


def check_models_match(base: Checkpoint, models: Sequence[Checkpoint], merged_keys: Sequence[str]) -> None:
    """Every merged key in every model with the base's shape, and no model key the base lacks;
    every merged tensor of a dtype a merge reads and writes back (float8 ones are refused)."""
    dtypes, shapes = base.layout(merged_keys)
    if set(dtypes) - set(MERGED_DTYPES):
        for key in merged_keys:
            _check_merged_dtype(base.name, key, base.dtype(key))
    base_keys = None
    for model in models:
        if model.same_layout(base):
            continue
        base_keys = set(base.keys()) if base_keys is None else base_keys
        keys = set(model.keys())
        extra = sorted(keys - base_keys)
        if extra:
            raise ValueError(f"{model.name} has key {show(extra[0])} that the base model lacks ({len(extra)} such keys)")
        if keys.issuperset(merged_keys):  # every key there: its dtypes and shapes compared in bulk
            their_dtypes, their_shapes = model.layout(merged_keys)
            if their_shapes == shapes and not set(their_dtypes) - set(MERGED_DTYPES):
                continue
        for key in merged_keys:  # the first key that is wrong, named
            if key not in keys:
                raise ValueError(f"{model.name} lacks key {show(key)} that the base model has")
            if not model.is_floating(key):
                raise ValueError(f"{model.name}, key {show(key)}: {model.dtype(key)} where the base has a floating tensor")
            _check_merged_dtype(model.name, key, model.dtype(key))
            if tuple(model.shape(key)) != tuple(base.shape(key)):
                raise ValueError(f"{model.name}, key {show(key)}: shape {tuple(model.shape(key))} but the base has "
                                 f"{tuple(base.shape(key))}")


def _check_merged_dtype(name: str, key: str, dtype: torch.dtype) -> None:
    if dtype not in MERGED_DTYPES:
        raise ValueError(f"{name}, key {show(key)}: {dtype} tensors are not merged (valid: "
                         f"{', '.join(str(d).replace('torch.', '') for d in MERGED_DTYPES)}); exclude the key to copy "
                         "it from the base")
