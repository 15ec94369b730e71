"""Reading and writing safetensors files in slices, with bounded memory (docs/design.md 7.1, 7.2).

The format (huggingface/safetensors): an 8-byte little-endian header length N, N bytes of JSON
({key: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}), then the
data, each tensor's bytes contiguous in row-major order at [8 + N + begin, 8 + N + end).

A header is accepted exactly when the reference implementation (the ``safetensors`` library)
accepts it: at most 100,000,000 bytes of UTF-8 JSON (no NaN/Infinity, numbers within float64
range, JSON nested at most 127 deep, no lone UTF-16 surrogate escapes); an object whose
``__metadata__`` is null or maps strings to strings, and whose other entries are objects with a
known ``dtype``, a ``shape`` of integers in [0, 2^64) and ``data_offsets`` [begin, end]; the
tensors, ordered by offsets, tile the data section exactly (no gap, no overlap, nothing after the
last), each spanning product(shape) x item size bytes. Where pcb_fast is stricter it says so:
a key that appears twice is refused (the library keeps the last), as are the library's
alternative encodings of an entry (a ``[dtype, shape, offsets]`` array, a dtype written
``{"F32": null}``) and the sub-byte dtypes (F4, F6_*), which pcb_fast does not read.
tests/test_header_fuzz.py checks this against the library on thousands of mutated headers.

Files are opened only if they are regular files (stat before open, ``O_NONBLOCK`` on the open and
fstat after it, so a named pipe or a device swapped in meanwhile cannot block or be read): see
:func:`open_regular`. Every problem is a :class:`FormatError` or a :class:`NotAFileError`, both
``ValueError``.

Reads use positioned reads (``os.preadv``) into caller buffers rather than a memory map, so the
pages of an input file count in the page cache, not in the process's resident memory: a merge of
checkpoints larger than RAM keeps a bounded RSS. Writes go to a planned layout (every tensor's
place is known from the shapes before any value is computed), so merged blocks are written where
they belong as they come, and a model is never held whole in memory.
"""

from __future__ import annotations

import bisect
import contextlib
import contextvars
import itertools
import json
import math
import operator
import os
import re
import stat
import struct
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from ..core.checks import short

# Every dtype of the format: name -> (torch dtype's attribute name, item size in bytes). The
# sub-byte ones (F4, F6_E2M3, F6_E3M2) are known to the format but not read by pcb_fast.
FORMAT_DTYPES = {
    "BOOL": ("bool", 1), "U8": ("uint8", 1), "I8": ("int8", 1), "F8_E5M2": ("float8_e5m2", 1),
    "F8_E4M3": ("float8_e4m3fn", 1), "F8_E8M0": ("float8_e8m0fnu", 1), "F8_E4M3FNUZ": ("float8_e4m3fnuz", 1),
    "F8_E5M2FNUZ": ("float8_e5m2fnuz", 1), "I16": ("int16", 2), "U16": ("uint16", 2), "F16": ("float16", 2),
    "BF16": ("bfloat16", 2), "I32": ("int32", 4), "U32": ("uint32", 4), "F32": ("float32", 4),
    "C64": ("complex64", 8), "F64": ("float64", 8), "I64": ("int64", 8), "U64": ("uint64", 8),
    "F4": (None, None), "F6_E2M3": (None, None), "F6_E3M2": (None, None),
}
DTYPES = {name: getattr(torch, attr) for name, (attr, _) in FORMAT_DTYPES.items()
          if attr is not None and hasattr(torch, attr)}
NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100_000_000  # bytes; the reference implementation refuses larger headers
MAX_DEPTH = 127  # JSON nesting; serde_json (the reference's parser) refuses deeper documents
_U64 = 1 << 64
_FIELDS = ("dtype", "shape", "data_offsets")


class FormatError(ValueError):
    """A file that is not a valid safetensors file (truncated, corrupt, unsupported dtype)."""


class NotAFileError(ValueError):
    """A path that cannot be read as a regular file: missing, unreadable, or a folder, named pipe,
    device or socket."""


_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def not_regular(path, mode: int) -> NotAFileError:
    kind = next((text for test, text in _KINDS if test(mode)), "not a regular file")
    return NotAFileError(f"{show_path(path)} is {kind}, not a regular file")


def open_regular(path) -> int:
    """A read-only descriptor of ``path`` if it is a regular file (symbolic links followed).

    The path is checked before it is opened (opening a device can have effects), opened with
    ``O_NONBLOCK`` (a named pipe swapped in meanwhile cannot block the open) and checked again
    on the descriptor. Anything else is a :class:`NotAFileError` naming the path."""
    try:
        mode = os.stat(path).st_mode
        if not stat.S_ISREG(mode):
            raise not_regular(path, mode)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise NotAFileError(f"cannot open {show_path(path)} ({e.strerror or e})") from None
    except ValueError as e:  # a NUL byte in the path
        if isinstance(e, NotAFileError):
            raise
        raise NotAFileError(f"cannot open {show_path(path)} ({e})") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise not_regular(path, mode)
    return fd


def read_regular(path, limit: int) -> bytes:
    """The bytes of the regular file ``path`` (see :func:`open_regular`), at most ``limit``."""
    fd = open_regular(path)
    try:
        if os.fstat(fd).st_size > limit:
            raise NotAFileError(f"{show_path(path)} is larger than {limit} bytes")
        chunks, total = [], 0
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                return b"".join(chunks)
            total += len(chunk)
            if total > limit:
                raise NotAFileError(f"{show_path(path)} is larger than {limit} bytes")
            chunks.append(chunk)
    except OSError as e:
        raise NotAFileError(f"cannot read {show_path(path)} ({e.strerror or e})") from None
    finally:
        os.close(fd)


class Unchanged:
    """A file as it was when opened (its size and modification time), checked again after every
    read: a file rewritten in place while a merge reads it would otherwise give a mix of old and new
    values. A file replaced by another (a rename) is no concern: the open descriptor reads the old one."""

    def __init__(self, fd: int, path):
        self.fd, self.path = fd, path
        self.seen = self._state()

    def _state(self) -> tuple:
        st = os.fstat(self.fd)
        return st.st_size, st.st_mtime_ns

    def check(self) -> None:
        """Raise a FormatError if the file changed since it was opened."""
        if self._state() != self.seen:
            raise FormatError(f"{show_path(self.path)}: input changed during the merge (its size or modification time "
                              "differ from when it was opened); rerun once no other process writes it")


def show(key, limit: int = 80) -> str:
    """A key for a one-line message: core.checks.short with room for a longer key name."""
    return short(key, limit)


def show_path(path, limit: int = 400) -> str:
    """A path for a one-line message: undecodable bytes escaped, cut to about ``limit`` characters."""
    try:
        text = os.fsencode(path).decode("utf-8", "backslashreplace")
    except TypeError:
        text = str(path).encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= limit else text[: limit // 2 - 2] + "..." + text[-(limit // 2 - 2):]


# ---- the header


class _Object(dict):
    """A JSON object, with the keys that appeared more than once (the last value kept)."""

    duplicates = ()


def _object(pairs):
    obj = _Object(pairs)
    if len(obj) != len(pairs):
        seen, obj.duplicates = set(), set()
        for key, _ in pairs:
            if key in seen:
                obj.duplicates.add(key)
            seen.add(key)
    return obj


class _Refused(Exception):
    pass


def _constant(name):
    raise _Refused(f"{name} is not valid JSON")


def _float(text):
    value = float(text)
    if math.isinf(value):
        raise _Refused("a number out of range")
    return value


def _int(text):
    if text == "-0":
        return -0.0  # serde_json reads -0 as a float: not an integer where one is needed
    value = int(text)
    if not -(1 << 63) <= value < _U64:  # serde_json reads it as a float64: it must fit one
        try:
            float(value)
        except OverflowError:
            raise _Refused("a number out of range") from None
    return value


_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")


_METADATA_DECODER = json.JSONDecoder(object_pairs_hook=_object, parse_constant=_constant, parse_float=_float,
                                     parse_int=_int)


def deeper_than(text: str, limit: int) -> bool:
    """Whether the JSON ``text`` nests more than ``limit`` arrays/objects (brackets in strings
    do not count); vectorised, so a 100 MB header of brackets costs a fraction of a second."""
    if text.count("[") + text.count("{") <= limit:
        return False
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text)).encode()
    depth = 0
    for start in range(0, len(brackets), 1 << 22):
        chunk = np.frombuffer(brackets, np.uint8, min(1 << 22, len(brackets) - start), start)
        levels = np.cumsum(np.where((chunk == 0x5B) | (chunk == 0x7B), 1, -1), dtype=np.int64) + depth
        if levels.max() > limit:
            return True
        depth = int(levels[-1])
    return False


def _has_lone_surrogate(value) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def _is_u64(value) -> bool:
    return type(value) is int and 0 <= value < _U64


_ITEMSIZE = {name: dtype.itemsize for name, dtype in DTYPES.items()}
# a tensor's entry as writers lay it out, "key":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]}, and
# the separators between its parts (and the next entry's key)
_ENTRY = '"{}":{{"dtype":"{}","shape":[{}],"data_offsets":[{}]}}'
_SEPARATORS = re.compile(r'":\{"dtype":"|","shape":\[|\],"data_offsets":\[|\]\},"')
_SHAPE_LISTS = re.compile(r"(?:(?:[0-9]+(?:,[0-9]+)*)?;)*")
_OFFSET_PAIRS = re.compile(r"(?:[0-9]+,[0-9]+;)*")
_LEADING_ZERO = re.compile(r",0[0-9]")
_CONTROL = re.compile(r"[\x00-\x1f]")
_METADATA = '"__metadata__":'


def _plain_metadata(text: str):
    """(metadata, the text of the tensors' entries) where the header is an object of entries with
    at most one ``__metadata__`` first or last; None where it is not (or the metadata is not
    an object of strings)."""
    if not (text.startswith("{") and text.endswith("}")):
        return None
    first = text.startswith(_METADATA, 1)
    at = 1 if first else text.rfind("," + _METADATA) + 1
    if at == 0:
        return {}, text[1:-1]
    try:
        metadata, end = _METADATA_DECODER.raw_decode(text, at + len(_METADATA))
    except (ValueError, RecursionError, _Refused):
        return None
    if metadata is None:
        metadata = _Object()
    if (type(metadata) is not _Object or metadata.duplicates or _SURROGATE_ESCAPE.search(text, at, end)
            or not all(type(v) is str for v in metadata.values())):
        return None
    if first:
        if end == len(text) - 1:
            return dict(metadata), ""
        return (dict(metadata), text[end + 1 : -1]) if end < len(text) - 1 and text[end] == "," else None
    return (dict(metadata), text[1 : at - 1]) if end == len(text) - 1 else None


def _parse_plain(text: str, data_size: int):
    """:func:`parse_header`'s result for a header in the form writers produce (every entry exactly
    ``"key":{"dtype":..,"shape":[..],"data_offsets":[..]}``, no whitespace, keys without escapes, the
    metadata first or last), read with a few regular expressions over the whole text instead of
    object by object; None for anything else, valid or not, which the full parse then judges (the
    same answer and message: this path accepts only what that one accepts, and refuses nothing).

    The text must be exactly the entries found, joined again: nothing can hide between them."""
    split = _plain_metadata(text.rstrip(" "))  # (writers pad the header with spaces)
    if split is None:
        return None
    metadata, body = split
    if not body:
        return (([], [], [], [], []), metadata) if data_size == 0 else None
    if not (body.startswith('"') and body.endswith("]}")):
        return None
    parts = _SEPARATORS.split(body[1:-2])
    keys, names, shapes, offsets = parts[0::4], parts[1::4], parts[2::4], parts[3::4]
    if not len(keys) == len(names) == len(shapes) == len(offsets):
        return None
    joined_keys = "".join(keys)
    # keys without quotes or escapes: the separators then sit exactly where the parse put them
    if '"' in joined_keys or "\\" in joined_keys or _CONTROL.search(joined_keys):
        return None
    if ",".join(map(_ENTRY.format, keys, names, shapes, offsets)) != body:
        return None
    if len(set(keys)) != len(keys) or "__metadata__" in keys:
        return None
    # numbers as JSON writes integers: digits, no empty item, no leading zero
    joined_shapes, joined_offsets = ";".join(shapes) + ";", ";".join(offsets) + ";"
    if (not _SHAPE_LISTS.fullmatch(joined_shapes) or not _OFFSET_PAIRS.fullmatch(joined_offsets)
            or _LEADING_ZERO.search("," + joined_shapes.replace(";", ",") + joined_offsets.replace(";", ","))):
        return None
    try:
        itemsizes = list(map(_ITEMSIZE.__getitem__, names))  # (a dtype pcb_fast does not read: the full parse says so)
    except KeyError:
        return None
    # one tuple per distinct shape, shared by the keys of that shape
    shape_of = {item: tuple(map(int, item.split(","))) if item else () for item in set(shapes)}
    if any(max(itertools.accumulate(shape, operator.mul), default=0) >= 1 << 60 for shape in shape_of.values()):
        return None  # (products near the limits, a zero after them included: the full parse's exact checks)
    numel_of = {item: math.prod(shape) for item, shape in shape_of.items()}
    bounds = list(map(int, ",".join(offsets).split(","))) if offsets else []
    begins, ends = bounds[0::2], bounds[1::2]
    # the tensors tile [0, data_size) in the order of their entries, each the size of its shape and dtype
    if (begins and (begins[0] != 0 or begins[1:] != ends[:-1] or ends[-1] != data_size)) or (not begins and data_size):
        return None
    if list(map(operator.sub, ends, begins)) != list(map(operator.mul, map(numel_of.__getitem__, shapes), itemsizes)):
        return None
    dtype_of = {name: DTYPES[name] for name in set(names)}
    columns = keys, list(map(dtype_of.__getitem__, names)), list(map(shape_of.__getitem__, shapes)), begins, ends
    return columns, metadata


def parse_header(raw: bytes, data_size: int) -> tuple[dict, dict]:
    """(tensors, metadata) of a safetensors header ``raw`` (the N bytes after the length) followed
    by ``data_size`` bytes of data: tensors maps each key to (dtype, shape, begin, end) with the
    offsets relative to the data section. A header the format does not allow is a FormatError
    whose message names the key and what is wrong (never the file's bytes)."""
    columns, metadata = header_columns(raw, data_size)
    return dict(zip(columns[0], zip(*columns[1:]))), metadata


def header_columns(raw: bytes, data_size: int) -> tuple[tuple, dict]:
    """:func:`parse_header`'s answer as columns: ((keys, dtypes, shapes, begins, ends), metadata),
    five lists in the header's order (no object per tensor)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise FormatError("corrupt safetensors header (not valid UTF-8)") from None
    plain = _parse_plain(text, data_size)
    if plain is not None:
        return plain
    tensors, metadata = _parse_full(text, data_size)
    values = list(tensors.values())  # (columns by itemgetter: no iterator per tensor, see ShardedWriter)
    return (list(tensors), *(list(map(operator.itemgetter(i), values)) for i in range(4))), metadata


def _parse_full(text: str, data_size: int) -> tuple[dict, dict]:
    """:func:`parse_header` object by object, for any header."""
    if deeper_than(text, MAX_DEPTH):
        raise FormatError(f"corrupt safetensors header (JSON nested deeper than {MAX_DEPTH} levels)")
    try:
        header = json.loads(text, object_pairs_hook=_object, parse_constant=_constant, parse_float=_float,
                            parse_int=_int)
    except json.JSONDecodeError as e:
        raise FormatError(f"corrupt safetensors header ({e.msg} at byte {e.pos})") from None
    except _Refused as e:
        raise FormatError(f"corrupt safetensors header ({e})") from None
    except RecursionError:
        raise FormatError("corrupt safetensors header (JSON nested too deeply)") from None
    except ValueError as e:  # an integer of more digits than Python converts
        raise FormatError(f"corrupt safetensors header ({str(e).splitlines()[0][:100]})") from None
    if _SURROGATE_ESCAPE.search(text) and _has_lone_surrogate(header):
        raise FormatError("corrupt safetensors header (a lone UTF-16 surrogate in a \\u escape)")
    if not isinstance(header, dict):
        raise FormatError("corrupt safetensors header (not a JSON object)")
    if header.duplicates:
        raise FormatError(f"corrupt safetensors header (key {show(min(header.duplicates))} appears twice)")
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    elif not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise FormatError("corrupt safetensors header (__metadata__ must map strings to strings)")
    metadata = dict(metadata)
    tensors = {}
    for key, entry in header.items():
        where = f"key {show(key)}"
        if not isinstance(entry, dict):
            raise FormatError(f"{where} has a malformed header entry (expected an object with dtype, shape and "
                              "data_offsets)")
        missing = [f for f in _FIELDS if f not in entry]
        if missing:
            raise FormatError(f"{where} has a malformed header entry (no {missing[0]})")
        twice = sorted(set(_FIELDS) & set(entry.duplicates))
        if twice:
            raise FormatError(f"{where} has a malformed header entry ({twice[0]} appears twice)")
        name, shape, offsets = (entry[f] for f in _FIELDS)
        if not isinstance(name, str) or name not in FORMAT_DTYPES:
            raise FormatError(f"{where} has unknown dtype {show(name, 40)}; valid: {', '.join(FORMAT_DTYPES)}")
        if name not in DTYPES:
            raise FormatError(f"{where} has dtype {name}, which pcb_fast does not read")
        if not isinstance(shape, list) or not all(_is_u64(s) for s in shape):
            raise FormatError(f"{where} has a malformed shape (expected a list of non-negative integers)")
        if any(s >= 1 << 63 for s in shape):  # the library reads the header, then torch cannot make the tensor
            raise FormatError(f"{where} has a dimension of 2^63 or more, beyond what torch represents (corrupt file)")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_u64(v) for v in offsets):
            raise FormatError(f"{where} has malformed data_offsets (expected [begin, end], non-negative integers)")
        tensors[key] = (DTYPES[name], tuple(shape), offsets[0], offsets[1])
    # As the reference: the tensors in the order of their offsets tile [0, data_size) exactly.
    start = 0
    for key, (dtype, shape, begin, end) in sorted(tensors.items(), key=lambda item: item[1][2:]):
        where = f"key {show(key)}"
        if begin != start or end < begin:
            raise FormatError(f"{where}: its data_offsets overlap another tensor's, leave a gap or end before they "
                              "begin (corrupt file)")
        numel = 1
        for size in shape:
            numel *= size
            if numel >= _U64:
                raise FormatError(f"{where}: its shape holds more than 2^64 entries (corrupt file)")
        if numel * dtype.itemsize >= _U64:
            raise FormatError(f"{where}: its shape holds more than 2^64 bytes (corrupt file)")
        if end - begin != numel * dtype.itemsize:
            raise FormatError(f"{where} lies outside the file or has the wrong size ({numel * dtype.itemsize} bytes "
                              f"for its shape and dtype, {end - begin} between its data_offsets; corrupt file)")
        if end > data_size:
            raise FormatError(f"{where} lies outside the file or has the wrong size (truncated or corrupt file)")
        start = end
    if start != data_size:
        raise FormatError(f"{data_size - start} bytes after the last tensor that no tensor covers (corrupt file)")
    return tensors, metadata


# What a reader knows of each tensor: (dtype, shape, absolute position of its first byte, bytes), a
# plain tuple: CPython's garbage collector stops tracking a tuple of plain values, while it keeps
# tracking a named tuple, which on a header of 300,000 tensors costs seconds of collections.
DTYPE, SHAPE, OFFSET, NBYTES = range(4)


def _bytes_view(t: torch.Tensor) -> memoryview:
    return memoryview(t.view(-1).view(torch.uint8).numpy())


def read_exactly(fd: int, out: torch.Tensor, position: int, watch: Unchanged, what: str) -> None:
    """The bytes of the file ``fd`` from ``position`` into the contiguous tensor ``out``, by positioned
    reads into its memory (no memory map: a file truncated meanwhile ends the read early, where a
    mapped page past its new end would kill the process with SIGBUS); then ``watch`` checks that the
    file did not change. A read that ends early is a FormatError naming ``what``."""
    view = _bytes_view(out)
    done = 0
    while done < len(view):  # a positioned read may return fewer bytes than asked
        got = os.preadv(fd, [view[done:]], position + done)
        if got <= 0:
            watch.check()
            raise FormatError(f"{show_path(watch.path)}: {what} ends early (truncated file)")
        done += got
    watch.check()


def advise_range(fd: int, position: int, length: int) -> None:
    """Ask the kernel to start reading ``length`` bytes of ``fd`` from ``position`` (posix_fadvise
    WILLNEED). Only a hint: errors are ignored."""
    if hasattr(os, "posix_fadvise"):
        try:
            os.posix_fadvise(fd, position, length, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass


class TensorTable(Mapping):
    """key -> (dtype, shape, absolute position, bytes) of the tensors of one or several files, kept as
    four columns and the place of each key in them: a header of hundreds of thousands of tensors
    makes no record per tensor (a lookup makes one); :meth:`column` answers for many keys at once."""

    def __init__(self, keys: list, columns: tuple):
        self.index = dict(zip(keys, range(len(keys))))
        self.columns = columns  # (dtypes, shapes, positions, sizes): lists in the order of ``keys``

    @classmethod
    def joined(cls, tables: list) -> "TensorTable":
        """The tensors of several tables (no key in two of them), one after the other."""
        keys = [key for table in tables for key in table.index]
        return cls(keys, tuple([value for table in tables for value in table.columns[field]] for field in range(4)))

    def __getitem__(self, key):
        at = self.index[key]
        dtypes, shapes, positions, sizes = self.columns
        return dtypes[at], shapes[at], positions[at], sizes[at]

    def __iter__(self):
        return iter(self.index)

    def __len__(self) -> int:
        return len(self.index)

    def keys(self):
        return self.index.keys()

    def column(self, field: int, keys) -> list:
        """Field ``field`` (DTYPE, SHAPE, OFFSET or NBYTES) of each of ``keys`` (a KeyError for one it lacks)."""
        return list(map(self.columns[field].__getitem__, map(self.index.__getitem__, keys)))


def _tensors_of(raw: bytes, size: int) -> tuple[TensorTable, dict]:
    """(:class:`TensorTable` of the tensors, metadata) of a file of ``size`` bytes whose header is ``raw``."""
    (keys, dtypes, shapes, begins, ends), metadata = header_columns(raw, size - 8 - len(raw))
    # built in bulk: a header may list hundreds of thousands of tensors
    positions = list(map((8 + len(raw)).__add__, begins))
    return TensorTable(keys, (dtypes, shapes, positions, list(map(operator.sub, ends, begins)))), metadata


_SHARED = contextvars.ContextVar("pcb_fast_shared_headers", default=None)


@contextlib.contextmanager
def sharing_headers(known: dict):
    """Inside, files opened whose headers are the same bytes (fine-tunes saved by one library often
    are) share one parse of it, read-only (:func:`shared`), kept in ``known`` (the same dict for
    several blocks): a header of hundreds of thousands of tensors takes about a second to read,
    once instead of once per file."""
    token = _SHARED.set(known)
    try:
        yield
    finally:
        _SHARED.reset(token)


def shared(key: tuple, make):
    """``make()``, or inside :func:`sharing_headers` the value made before for an equal ``key`` (never
    to be changed by its users)."""
    known = _SHARED.get()
    if known is None:
        return make()
    if key not in known:
        known[key] = make()
    return known[key]


class SafetensorsReader:
    """Header of one safetensors file, and positioned reads of any flat slice of its tensors."""

    def __init__(self, path):
        self.path = Path(path)
        self._fd = None
        try:
            self._fd = open_regular(self.path)
            self.watch = Unchanged(self._fd, self.path)
            self._read_header()
        except NotAFileError as e:
            self.close()
            raise FormatError(str(e)) from None
        except FormatError as e:
            self.close()
            raise FormatError(f"{show_path(self.path)}: {e}") from None
        except OSError as e:
            self.close()
            raise FormatError(f"{show_path(self.path)}: cannot read ({e.strerror or e})") from None

    def _read_header(self) -> None:
        size = os.fstat(self._fd).st_size
        head = os.pread(self._fd, 8, 0)
        if len(head) < 8:
            raise FormatError(f"not a safetensors file (only {size} bytes)")
        (length,) = struct.unpack("<Q", head)
        if length > MAX_HEADER:
            raise FormatError(f"not a safetensors file (its header length exceeds the format's {MAX_HEADER}-byte "
                              "limit)")
        if 8 + length > size:
            raise FormatError(f"not a safetensors file or truncated (its header length goes past the end of the "
                              f"{size}-byte file)")
        raw = b""
        while len(raw) < length:  # a positioned read may return fewer bytes than asked
            chunk = os.pread(self._fd, length - len(raw), 8 + len(raw))
            if not chunk:
                raise FormatError("truncated while its header was read")
            raw += chunk
        self.tensors, metadata = shared(("header", raw, size), lambda: _tensors_of(raw, size))
        self.metadata = dict(metadata)

    def read_into(self, key: str, lo: int, hi: int, out: torch.Tensor) -> torch.Tensor:
        """Entries [lo, hi) of the flattened tensor ``key`` into ``out`` (contiguous, its dtype)."""
        dtype, _, offset, _ = self.tensors[key]
        if out.dtype != dtype or out.numel() != hi - lo or not out.is_contiguous():
            raise ValueError(f"read_into {show(key)}: buffer {out.dtype} [{out.numel()}] for {dtype} [{hi - lo}]")
        read_exactly(self._fd, out, offset + lo * dtype.itemsize, self.watch, f"key {show(key)}")
        return out

    def read_bytes(self, position: int, out: torch.Tensor, keys) -> None:
        """The file's bytes [position, position + out.numel()) into the uint8 tensor ``out``: the data
        of the tensors ``keys``, which lie there one after the other (the one cut short is named)."""
        try:
            read_exactly(self._fd, out, position, self.watch, f"key {show(keys[0])}")
        except FormatError as e:
            if "ends early" not in str(e):
                raise
            size = os.fstat(self._fd).st_size  # the first key that the file's end cuts short
            key = next((k for k in keys if self.tensors[k][OFFSET] + self.tensors[k][NBYTES] > size), keys[-1])
            raise FormatError(f"{show_path(self.path)}: key {show(key)} ends early (truncated file)") from None

    def advise(self, key: str, lo: int, hi: int) -> None:
        """Ask the kernel to start reading entries [lo, hi) of ``key`` (posix_fadvise WILLNEED): a
        later read_into of them then finds them in the page cache. Only a hint: errors are ignored."""
        dtype, _, offset, _ = self.tensors[key]
        self.advise_bytes(offset + lo * dtype.itemsize, (hi - lo) * dtype.itemsize)

    def advise_bytes(self, position: int, size: int) -> None:
        """:meth:`advise` for the file's bytes [position, position + size)."""
        if self._fd is not None:
            advise_range(self._fd, position, size)

    def read(self, key: str) -> torch.Tensor:
        """The whole tensor ``key`` (a new tensor)."""
        dtype, shape, _, _ = self.tensors[key]
        numel = math.prod(shape)
        return self.read_into(key, 0, numel, torch.empty(numel, dtype=dtype)).view(shape)

    def close(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self, _close=os.close):
        # At interpreter exit the module's globals (``os``) may already be None: close through a
        # function bound when the class was made.
        fd, self._fd = getattr(self, "_fd", None), None
        if fd is not None:
            _close(fd)


def shard_plan(entries: list, shard_size: int) -> list:
    """Split (key, dtype, shape) entries, in order, into shards of at most ``shard_size`` bytes
    (a tensor larger than that gets a shard of its own)."""
    return [entries[a:b] for a, b in _shard_bounds(_sizes(entries), shard_size)]


def _shard_bounds(sizes: list, shard_size: int) -> list:
    """[first, end) of each shard of :func:`shard_plan` for entries of ``sizes`` bytes: each takes the most
    entries that fit ``shard_size`` together, at least one (found by bisection: one step per shard)."""
    before = list(itertools.accumulate(sizes, initial=0))  # bytes before each entry
    bounds, first = [], 0
    while first < len(sizes):
        end = max(bisect.bisect_right(before, before[first] + shard_size, first + 1) - 1, first + 1)
        bounds.append((first, end))
        first = end
    return bounds


def nbytes(dtype: torch.dtype, shape) -> int:
    """Bytes of a tensor of this dtype and shape."""
    return dtype.itemsize * math.prod(shape)


def _sizes(entries: list) -> list:
    """Bytes of each (key, dtype, shape) entry (the product of a shape computed once per shape)."""
    return _sizes_of(list(map(operator.itemgetter(1), entries)), list(map(operator.itemgetter(2), entries)))


def _sizes_of(dtypes: list, shapes: list) -> list:
    """Bytes of each tensor of these columns (each distinct shape's product computed once)."""
    numel_of = {shape: math.prod(shape) for shape in set(shapes)}
    itemsize_of = {dtype: dtype.itemsize for dtype in set(dtypes)}
    return list(map(operator.mul, map(itemsize_of.__getitem__, dtypes), map(numel_of.__getitem__, shapes)))


def _header_text(keys: list, dtypes: list, shapes: list, begins: list, ends: list, metadata: dict) -> str:
    """``json.dumps`` of a safetensors header with separators (",", ":"), character for character,
    written from the columns of its entries: six pieces per entry (its key as JSON writes it inside
    quotes, the text of its dtype and shape, its offsets), joined once."""
    joined = "".join(keys)
    if not (joined.isascii() and '"' not in joined and "\\" not in joined and not _CONTROL.search(joined)):
        keys = [json.dumps(key)[1:-1] for key in keys]  # (escaped as JSON escapes them)
    middle = {(dtype, shape): '":{"dtype":"' + NAMES[dtype] + '","shape":[' + ",".join(map(str, shape))
              + '],"data_offsets":[' for dtype, shape in set(zip(dtypes, shapes))}
    pieces = [']},"'] * (6 * len(keys))  # every entry's piece; the last of each ends it and opens the next key
    pieces[0::6] = keys
    pieces[1::6] = map(middle.__getitem__, zip(dtypes, shapes))
    pieces[2::6] = map(str, begins)
    pieces[3::6] = [","] * len(keys)
    pieces[4::6] = map(str, ends)
    return '{"' + "".join(pieces) + '__metadata__":' + json.dumps(metadata, separators=(",", ":")) + "}"


class Finished:
    """``with writer:`` closes the writer when the block succeeds, and aborts it when the block (or the
    close) raises: no half-written shard is ever flushed as if it were complete."""

    def __enter__(self):
        return self

    def __exit__(self, kind, error, trace) -> bool:
        if kind is not None:
            self.abort()
            return False
        try:
            self.close()
        except BaseException:
            self.abort()
            raise
        return False


PATCH_GAP = 1 << 16  # bytes between two patched entries up to which one read and write covers both


class ShardedWriter(Finished):
    """Safetensors shards (and a Hugging Face index when there are several) laid out up front.

    ``write(key, lo, hi, values)`` puts entries [lo, hi) of a tensor in place, in any order.
    File names follow Hugging Face: model.safetensors, or model-0000i-of-0000N.safetensors with
    model.safetensors.index.json. ``with ShardedWriter(...) as writer:`` closes it at the end of the
    block, or aborts it if the block raises.
    """

    def __init__(self, folder, entries: list, shard_size: int, metadata: dict, only=None, index: bool = True):
        """``only``: the indices of the shards this writer creates (a distributed merge splits the
        shards of one plan between ranks); ``index``: whether it writes the index."""
        self.folder = Path(folder)
        # (columns by itemgetter: zip(*entries) would hold an iterator per entry, hundreds of thousands of
        # objects for the cyclic collector to go through)
        all_keys, all_dtypes, all_shapes = (list(map(operator.itemgetter(i), entries)) for i in range(3))
        sizes = _sizes_of(all_dtypes, all_shapes)
        shards = _shard_bounds(sizes, shard_size)
        count = len(shards)
        self.places = {}  # key -> (fd, absolute offset of the first byte, dtype)
        self.files = []
        weight_map, total = {}, 0
        for i, (first, end) in enumerate(shards):
            name = "model.safetensors" if count == 1 else f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            keys, dtypes, shapes = all_keys[first:end], all_dtypes[first:end], all_shapes[first:end]
            ends = list(itertools.accumulate(sizes[first:end]))
            begins = [0] + ends[:-1]
            weight_map.update(dict.fromkeys(keys, name))
            total += ends[-1]
            if only is not None and i not in only:
                continue
            text = _header_text(keys, dtypes, shapes, begins, ends, {str(k): str(v) for k, v in metadata.items()})
            raw = text.encode()
            raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
            fd = os.open(self.folder / name, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)  # (read back by patch)
            self.files.append((fd, name))
            os.write(fd, struct.pack("<Q", len(raw)) + raw)
            os.ftruncate(fd, 8 + len(raw) + ends[-1])
            self.places.update(zip(keys, zip(itertools.repeat(fd), map((8 + len(raw)).__add__, begins), dtypes)))
        if count > 1 and index:
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")

    def write(self, key: str, lo: int, values: torch.Tensor) -> None:
        """Entries [lo, lo + values.numel()) of tensor ``key`` (values in the tensor's dtype)."""
        fd, offset, dtype = self.places[key]
        if values.dtype != dtype:
            raise ValueError(f"write {show(key)}: values are {values.dtype}, the file holds {dtype}")
        self._pwrite(fd, _bytes_view(values.contiguous()), offset + lo * dtype.itemsize)

    def write_segment(self, segment, lo: int, values: torch.Tensor) -> None:
        """Entries [lo, lo + values.numel()) of a segment (pcb_fast.core.sources.Segment): of its key,
        or of a pack's keys one after the other (one write per run of keys that lie next to each
        other in a shard; values in their common dtype)."""
        if not segment.parts:
            self.write(segment.key, lo, values)
            return
        if lo != 0 or values.numel() != segment.numel:
            raise ValueError(f"write_segment: a pack is written whole, not entries [{lo}, {lo + values.numel()})")
        view = _bytes_view(values.contiguous())
        places = list(map(self.places.__getitem__, [part.key for part in segment.parts]))
        if len({fd for fd, _, _ in places}) == 1 and {dtype for _, _, dtype in places} == {values.dtype}:
            # the usual case, checked in bulk: one shard, the keys one after the other
            positions = [position for _, position, _ in places]
            ends = [position + part.numel * values.element_size() for position, part in zip(positions, segment.parts)]
            if positions[1:] == ends[:-1]:
                self._pwrite(places[0][0], view, positions[0])
                return
        run, at = None, 0  # [fd, first byte in the file, bytes] of the current run
        for part in segment.parts:
            fd, position, dtype = self.places[part.key]
            if dtype != values.dtype:
                raise ValueError(f"write {show(part.key)}: values are {values.dtype}, the file holds {dtype}")
            size = part.numel * dtype.itemsize
            if run is not None and run[0] == fd and run[1] + run[2] == position:
                run[2] += size
                continue
            if run is not None:
                self._pwrite(run[0], view[at : at + run[2]], run[1])
                at += run[2]
            run = [fd, position, size]
        self._pwrite(run[0], view[at : at + run[2]], run[1])

    def patch(self, key: str, positions: torch.Tensor, values: torch.Tensor) -> None:
        """Put ``values`` in place of entries ``positions`` (ascending) of tensor ``key``, written
        before: each run of nearby entries is read back, changed and written again."""
        fd, offset, dtype = self.places[key]
        if values.dtype != dtype or values.numel() != positions.numel():
            raise ValueError(f"patch {show(key)}: {values.numel()} values of {values.dtype} for {positions.numel()} "
                             f"positions of a tensor of {dtype}")
        if not positions.numel():
            return
        positions = positions.long()
        far = ((positions[1:] - positions[:-1]) * dtype.itemsize > PATCH_GAP).nonzero().flatten() + 1
        bounds = [0, *far.tolist(), positions.numel()]
        for a, b in zip(bounds[:-1], bounds[1:]):
            first = int(positions[a])
            span = torch.empty(int(positions[b - 1]) - first + 1, dtype=dtype)
            view = _bytes_view(span)
            done = 0
            while done < len(view):
                got = os.preadv(fd, [view[done:]], offset + first * dtype.itemsize + done)
                if got <= 0:
                    raise OSError(f"patch {show(key)}: the output shard ends before entry {first + done}")
                done += got
            span[positions[a:b] - first] = values[a:b]
            self._pwrite(fd, view, offset + first * dtype.itemsize)

    @staticmethod
    def _pwrite(fd: int, view: memoryview, position: int) -> None:
        done = 0
        while done < len(view):
            done += os.pwritev(fd, [view[done:]], position + done)

    def close(self) -> None:
        """Flush every shard to disk and close it."""
        while self.files:
            fd, _ = self.files[0]
            os.fsync(fd)  # (where this fails, the shards left open are abort()'s)
            del self.files[0]
            os.close(fd)

    def abort(self) -> None:
        """Close every shard without flushing it (the folder is then removed)."""
        files, self.files = self.files, []
        for fd, _ in files:
            os.close(fd)
