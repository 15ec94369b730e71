"""Reading and writing safetensors files in slices, with bounded memory (docs/design.md 7.1, 7.2).

The format (huggingface/safetensors): an 8-byte little-endian header length N, N bytes of JSON
({key: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}), then the
data, each tensor's bytes contiguous in row-major order at [8 + N + begin, 8 + N + end).

Reads use positioned reads (``os.preadv``) into caller buffers rather than a memory map, so the
pages of an input file count in the page cache, not in the process's resident memory: a merge of
checkpoints larger than RAM keeps a bounded RSS. Writes go to a planned layout (every tensor's
place is known from the shapes before any value is computed), so merged blocks are written where
they belong as they come, and a model is never held whole in memory.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 << 20  # the reference implementation refuses larger headers too


class FormatError(ValueError):
    """A file that is not a valid safetensors file (truncated, corrupt, unsupported dtype)."""


@dataclass(frozen=True)
class TensorInfo:
    dtype: torch.dtype
    shape: tuple
    offset: int  # absolute position of the first byte in the file
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _bytes_view(t: torch.Tensor) -> memoryview:
    return memoryview(t.view(-1).view(torch.uint8).numpy())


class SafetensorsReader:
    """Header of one safetensors file, and positioned reads of any flat slice of its tensors."""

    def __init__(self, path):
        self.path = Path(path)
        try:
            self._fd = os.open(self.path, os.O_RDONLY)
        except OSError as e:
            raise FormatError(f"{self.path}: cannot open ({e.strerror})") from None
        size = os.fstat(self._fd).st_size
        head = os.pread(self._fd, 8, 0)
        if len(head) < 8:
            self.close()
            raise FormatError(f"{self.path}: not a safetensors file (only {size} bytes)")
        (length,) = struct.unpack("<Q", head)
        if length > min(MAX_HEADER, size - 8):
            self.close()
            raise FormatError(f"{self.path}: not a safetensors file or truncated (header of {length} bytes in a "
                              f"{size}-byte file)")
        try:
            header = json.loads(os.pread(self._fd, length, 8))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            self.close()
            raise FormatError(f"{self.path}: corrupt safetensors header ({e})") from None
        if not isinstance(header, dict):
            self.close()
            raise FormatError(f"{self.path}: corrupt safetensors header (not a JSON object)")
        self.metadata = header.pop("__metadata__", None) or {}
        start = 8 + length
        self.tensors = {}
        for key, entry in header.items():
            try:
                dtype = DTYPES[entry["dtype"]]
                shape = tuple(int(s) for s in entry["shape"])
                begin, end = (int(v) for v in entry["data_offsets"])
            except KeyError as e:
                self.close()
                raise FormatError(f"{self.path}: key {key!r} has unsupported or missing {e}") from None
            except (TypeError, ValueError):
                self.close()
                raise FormatError(f"{self.path}: key {key!r} has a malformed header entry") from None
            info = TensorInfo(dtype, shape, start + begin, end - begin)
            if info.nbytes != info.numel * dtype.itemsize or begin < 0 or start + end > size:
                self.close()
                raise FormatError(f"{self.path}: key {key!r} lies outside the file or has the wrong size "
                                  "(truncated or corrupt file)")
            self.tensors[key] = info

    def read_into(self, key: str, lo: int, hi: int, out: torch.Tensor) -> torch.Tensor:
        """Entries [lo, hi) of the flattened tensor ``key`` into ``out`` (contiguous, its dtype)."""
        info = self.tensors[key]
        if out.dtype != info.dtype or out.numel() != hi - lo or not out.is_contiguous():
            raise ValueError(f"read_into {key!r}: buffer {out.dtype} [{out.numel()}] for {info.dtype} [{hi - lo}]")
        view = _bytes_view(out)
        position = info.offset + lo * info.dtype.itemsize
        done = 0
        while done < len(view):  # a positioned read may return fewer bytes than asked
            got = os.preadv(self._fd, [view[done:]], position + done)
            if got <= 0:
                raise FormatError(f"{self.path}: key {key!r} ends early (truncated file)")
            done += got
        return out

    def read(self, key: str) -> torch.Tensor:
        """The whole tensor ``key`` (a new tensor)."""
        info = self.tensors[key]
        return self.read_into(key, 0, info.numel, torch.empty(info.numel, dtype=info.dtype)).view(info.shape)

    def close(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self):
        self.close()


def shard_plan(entries: list, shard_size: int) -> list:
    """Split (key, dtype, shape) entries, in order, into shards of at most ``shard_size`` bytes
    (a tensor larger than that gets a shard of its own)."""
    shards, current, used = [], [], 0
    for entry in entries:
        size = nbytes(entry[1], entry[2])
        if current and used + size > shard_size:
            shards.append(current)
            current, used = [], 0
        current.append(entry)
        used += size
    if current:
        shards.append(current)
    return shards


def nbytes(dtype: torch.dtype, shape) -> int:
    """Bytes of a tensor of this dtype and shape."""
    return dtype.itemsize * math.prod(shape)


class ShardedWriter:
    """Safetensors shards (and a Hugging Face index when there are several) laid out up front.

    ``write(key, lo, hi, values)`` puts entries [lo, hi) of a tensor in place, in any order.
    File names follow Hugging Face: model.safetensors, or model-0000i-of-0000N.safetensors with
    model.safetensors.index.json.
    """

    def __init__(self, folder, entries: list, shard_size: int, metadata: dict, only=None, index: bool = True):
        """``only``: the indices of the shards this writer creates (a distributed merge splits the
        shards of one plan between ranks); ``index``: whether it writes the index."""
        self.folder = Path(folder)
        shards = shard_plan(list(entries), shard_size)
        count = len(shards)
        self.places = {}  # key -> (fd, absolute offset of the first byte, dtype)
        self.files = []
        weight_map, total = {}, 0
        for i, shard in enumerate(shards):
            name = "model.safetensors" if count == 1 else f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            header, offset = {}, 0
            for key, dtype, shape in shard:
                size = nbytes(dtype, shape)
                header[key] = {"dtype": NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
                offset += size
                weight_map[key] = name
            total += offset
            if only is not None and i not in only:
                continue
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
            fd = os.open(self.folder / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            self.files.append((fd, name))
            os.write(fd, struct.pack("<Q", len(raw)) + raw)
            os.ftruncate(fd, 8 + len(raw) + offset)
            for key, dtype, shape in shard:
                begin = header[key]["data_offsets"][0]
                self.places[key] = (fd, 8 + len(raw) + begin, dtype)
        if count > 1 and index:
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")

    def write(self, key: str, lo: int, values: torch.Tensor) -> None:
        """Entries [lo, lo + values.numel()) of tensor ``key`` (values in the tensor's dtype)."""
        fd, offset, dtype = self.places[key]
        if values.dtype != dtype:
            raise ValueError(f"write {key!r}: values are {values.dtype}, the file holds {dtype}")
        view = _bytes_view(values.contiguous())
        position = offset + lo * dtype.itemsize
        done = 0
        while done < len(view):
            done += os.pwritev(fd, [view[done:]], position + done)

    def close(self) -> None:
        """Flush every shard to disk and close it."""
        for fd, _ in self.files:
            os.fsync(fd)
            os.close(fd)
        self.files = []

    def abort(self) -> None:
        for fd, _ in self.files:
            os.close(fd)
        self.files = []
