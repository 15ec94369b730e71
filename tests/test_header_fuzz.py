"""Differential fuzzing of safetensors headers: pcb_fast's reader accepts a file exactly when the
reference implementation (the ``safetensors`` library: ``safe_open`` and ``get_tensor`` of every
key) accepts it, and both read the same tensors and metadata when they do.

Seeded mutations of a small real file: offsets, shapes, dtypes, keys and fields deleted,
duplicated or added, truncation, junk, deep nesting, NaN/Infinity, numbers out of range, escapes,
whitespace, a wrong header length prefix, a data section too short or too long, and the changes
the format allows (entries reordered, the data laid out in another order, unknown fields, shapes
of the same size) so that acceptance is exercised as much as refusal.

Documented differences, where pcb_fast refuses what the library accepts (never the other way):
- a key that appears twice: the library keeps the last entry (and accepts the file if the offsets
  still tile the data); pcb_fast refuses the file (an ambiguous header);
- the sub-byte dtype F4 (two values per byte): the library reads it, pcb_fast does not;
- serde's alternative encodings, an entry written as a ``[dtype, shape, data_offsets]`` array
  and a dtype written as ``{"F32": null}``: the format describes objects and strings only.
The library also accepts a header whose shape has a dimension of 2^63 or more (with another
dimension 0), then fails to make the tensor (torch's TypeError); that counts as a refusal, and
pcb_fast refuses it up front.
"""

from __future__ import annotations

import json
import random
import struct

import pytest
import torch

safetensors = pytest.importorskip("safetensors")
from safetensors.torch import save  # noqa: E402

from pcb_fast.io.safetensors import FORMAT_DTYPES, FormatError, SafetensorsReader, _parse_plain, parse_header  # noqa: E402

CASES = 4000
SEED = 20261129
DOCUMENTED = ("appears twice", "which pcb_fast does not read", "malformed header entry (expected an object",
              "has unknown dtype {")


class Raw(str):
    """A JSON token written as is (e.g. -0, 1e400, NaN, 01)."""


class Obj(list):
    """A JSON object as a list of (key, value) pairs, so that a key may appear twice."""


def dump(node) -> str:
    if isinstance(node, Raw):
        return str(node)
    if isinstance(node, Obj):
        return "{" + ",".join(json.dumps(k) + ":" + dump(v) for k, v in node) + "}"
    if isinstance(node, list):
        return "[" + ",".join(dump(v) for v in node) + "]"
    return json.dumps(node)


def to_tree(value):
    if isinstance(value, dict):
        return Obj((k, to_tree(v)) for k, v in value.items())
    if isinstance(value, list):
        return [to_tree(v) for v in value]
    return value


def original():
    g = torch.Generator().manual_seed(0)
    tensors = {"a.weight": torch.randn(2, 3, generator=g), "b": torch.randn(4, generator=g).half(),
               "c": torch.arange(3, dtype=torch.int64), "d": torch.tensor([True, False, True]),
               "e": torch.randn(2, generator=g).bfloat16(), "empty": torch.zeros(0, 2), "s": torch.tensor(7, dtype=torch.int8)}
    blob = save(tensors, metadata={"format": "pt", "note": "x"})
    (n,) = struct.unpack("<Q", blob[:8])
    # keys sorted: the library writes __metadata__ from a Rust HashMap, whose order changes from process
    # to process, and the mutations pick entries by position
    return json.loads(blob[8 : 8 + n], object_pairs_hook=lambda pairs: dict(sorted(pairs))), blob[8 + n :]


NUMBERS = [Raw("-0"), Raw("-1"), Raw("1e400"), Raw("-1e400"), Raw("1e308"), Raw("1.0"), Raw("2e0"), Raw("NaN"),
           Raw("Infinity"), Raw("-Infinity"), Raw("01"), Raw("1" + "0" * 30), Raw("1" + "0" * 309), Raw("1" + "0" * 400),
           2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63), -(2**63) - 1, 0, 1, 2, 3, 7, 8, True, False, None]
DTYPE_NAMES = list(FORMAT_DTYPES) + ["f32", "F128", "C128", "", "F32 ", "XX"]
JUNK = ["{", "}", "[", "]", '"', "\\", ",", ":", "\x00", "\x1f", "\x7f", "\ufeff", " ", "\t", "\n", "\f", "NaN", "-",
        "0", "\\u0000", "\\ud800", "\\udc00", "\\ud83d\\ude00", "é", "null", "true"]


def random_value(r: random.Random, depth=0):
    choice = r.randrange(8)
    if choice == 0:
        return r.choice(NUMBERS)
    if choice == 1:
        return r.choice(DTYPE_NAMES)
    if choice == 2 and depth < 3:
        return [random_value(r, depth + 1) for _ in range(r.randrange(4))]
    if choice == 3 and depth < 3:
        return Obj((r.choice(["dtype", "shape", "data_offsets", "x", "__metadata__", "k"]), random_value(r, depth + 1))
                   for _ in range(r.randrange(4)))
    if choice == 4:
        return r.randrange(-5, 200)
    if choice == 5:
        return r.choice(["", "v", "F32", "\ud83d\ude00", "a\\b"])
    return r.choice([None, True, 1.5, [], Obj()])


def nested(depth: int):
    return Raw("[" * depth + "]" * depth) if depth % 2 else Raw('{"k":' * depth + "1" + "}" * depth)


def entries(tree: Obj):
    return [(i, k, v) for i, (k, v) in enumerate(tree) if k != "__metadata__" and isinstance(v, Obj)]


def field(entry: Obj, name: str):
    for i, (k, v) in enumerate(entry):
        if k == name:
            return i, v
    return None, None


def relayout(r: random.Random, tree: Obj, data: bytes) -> bytes:
    """Lay the data out in another order and rewrite the offsets to match (a valid file)."""
    spans = []
    for _, _, entry in entries(tree):
        _, offsets = field(entry, "data_offsets")
        spans.append((entry, offsets))
    order = list(range(len(spans)))
    r.shuffle(order)
    out, position = b"", 0
    for index in order:
        entry, (begin, end) = spans[index]
        out += data[begin:end]
        i, _ = field(entry, "data_offsets")
        entry[i] = ("data_offsets", [position, position + end - begin])
        position += end - begin
    return out


def same_size_shape(r: random.Random, shape: list) -> list:
    numel = 1
    for s in shape:
        numel *= s
    if numel == 0:
        return r.choice([[0], [0, 5], [3, 0, 2], shape[::-1]])
    divisors = [d for d in range(1, numel + 1) if numel % d == 0]
    d = r.choice(divisors)
    return r.choice([[numel], [d, numel // d], [1, numel, 1], [numel // d, 1, d], shape[::-1]])


def mutate(r: random.Random, header: dict, data: bytes) -> bytes:
    tree = to_tree(header)
    prefix = None  # the header length written, when it is not the true one
    tail = data
    text = None
    for _ in range(r.choice([1, 1, 1, 2, 3])):
        kind = r.randrange(16)
        tensor = r.choice(entries(tree)) if entries(tree) else None
        if kind == 0 and tensor:  # an offset moved
            i, offsets = field(tensor[2], "data_offsets")
            if isinstance(offsets, list) and len(offsets) == 2 and all(type(v) is int for v in offsets):
                which = r.randrange(2)
                offsets = list(offsets)
                offsets[which] = max(0, offsets[which] + r.choice([-8, -4, -2, -1, 1, 2, 4, 8]))
                tensor[2][i] = ("data_offsets", offsets)
        elif kind == 1 and tensor:  # offsets replaced
            i, _ = field(tensor[2], "data_offsets")
            if i is not None:
                tensor[2][i] = ("data_offsets", r.choice([[random_value(r), random_value(r)], [0, 0], [0], [0, 8, 8],
                                                          random_value(r), [r.randrange(80), r.randrange(80)]]))
        elif kind == 2 and tensor:  # a shape dimension changed
            i, shape = field(tensor[2], "shape")
            if isinstance(shape, list):
                shape = list(shape)
                if shape and r.random() < 0.7:
                    shape[r.randrange(len(shape))] = r.choice(NUMBERS + [-8, -1, 0, 1, 2, 3, 4, 6])
                else:
                    shape.insert(r.randrange(len(shape) + 1), r.choice([0, 1, 2, -1]))
                tensor[2][i] = ("shape", shape)
        elif kind == 3 and tensor:  # a shape of the same size (valid)
            i, shape = field(tensor[2], "shape")
            if isinstance(shape, list) and all(type(s) is int and s >= 0 for s in shape):
                tensor[2][i] = ("shape", same_size_shape(r, shape))
        elif kind == 4 and tensor:  # another dtype
            i, _ = field(tensor[2], "dtype")
            if i is not None:
                tensor[2][i] = ("dtype", r.choice(DTYPE_NAMES + [{"F32": None}, None, 3, ["F32"]]))
        elif kind == 5 and tensor:  # a field deleted, or one added (unknown fields are allowed)
            if r.random() < 0.5 and tensor[2]:
                del tensor[2][r.randrange(len(tensor[2]))]
            else:
                tensor[2].insert(r.randrange(len(tensor[2]) + 1), (r.choice(["x", "dtype", "shape", "data_offsets", "dt"]),
                                                                    random_value(r)))
        elif kind == 6 and tree:  # a whole entry deleted or duplicated
            i = r.randrange(len(tree))
            if r.random() < 0.5:
                del tree[i]
            else:
                key, value = tree[i]
                tree.insert(r.randrange(len(tree) + 1), (key, value if r.random() < 0.5 else random_value(r)))
        elif kind == 7:  # entries in another order, data laid out in another order (valid)
            r.shuffle(tree)
            if r.random() < 0.7:
                try:
                    tail = relayout(r, tree, tail)
                except (TypeError, ValueError):
                    pass
        elif kind == 8:  # metadata changed
            i, _ = field(tree, "__metadata__")
            value = r.choice([None, Obj(), Obj([("a", "1"), ("a", "2")]), Obj([("a", 1)]), [], "x",
                              Obj([("k", "\ud83d\ude00")]), Obj([("k", Obj())]), random_value(r)])
            if i is None:
                tree.insert(r.randrange(len(tree) + 1), ("__metadata__", value))
            elif r.random() < 0.2:
                tree.insert(r.randrange(len(tree) + 1), ("__metadata__", value))
            else:
                tree[i] = ("__metadata__", value)
        elif kind == 9 and tensor:  # deep nesting in an unknown field
            tensor[2].append(("x", nested(r.choice([60, 120, 124, 125, 126, 127, 128, 200, 5000]))))
        elif kind == 10 and tensor:  # a number out of range or not JSON, anywhere in an entry
            j = r.randrange(len(tensor[2])) if tensor[2] else None
            if j is not None:
                key, value = tensor[2][j]
                tensor[2][j] = (key, r.choice(NUMBERS) if not isinstance(value, list) or not value
                                else [r.choice(NUMBERS) if r.random() < 0.5 else v for v in value])
        elif kind == 11 and tensor:  # a key escaped or changed (valid unless a duplicate appears)
            i, key, value = tensor
            tree[i] = (r.choice([key + "\u00e9", key.upper(), "", "__metadata__", key + "\x00", "\ud83d\ude00"]), value)
        elif kind == 12:  # a zero-size tensor added (valid if its offsets sit between two tensors)
            ends = [0] + [field(e, "data_offsets")[1][1] for _, _, e in entries(tree)
                          if isinstance(field(e, "data_offsets")[1], list) and len(field(e, "data_offsets")[1]) == 2
                          and type(field(e, "data_offsets")[1][1]) is int]
            at = r.choice(ends)
            tree.insert(r.randrange(len(tree) + 1), (f"z{r.randrange(9)}", Obj([("dtype", r.choice(DTYPE_NAMES[:8])),
                                                                                ("shape", r.choice([[0], [3, 0], [0, 0]])),
                                                                                ("data_offsets", [at, at])])))
        elif kind == 13:  # the data section cut or extended
            tail = tail[: max(0, len(tail) - r.choice([1, 2, 4, 8, len(tail)]))] if r.random() < 0.5 \
                else tail + bytes(r.choice([1, 2, 7, 8]))
        elif kind == 14:
            prefix = r.choice(["minus", "plus", 0, 1, 2**64 - 1, 100_000_001, 100_000_000, "data"])
        elif kind == 15 and tensor:  # an entry as serde's array form, or a dtype as an enum map
            i, key, value = tensor
            at, d = field(value, "dtype")
            if r.random() < 0.5:
                tree[i] = (key, [d, field(value, "shape")[1], field(value, "data_offsets")[1]])
            elif at is not None:
                value[at] = ("dtype", Obj([(d, None)]) if isinstance(d, str) else d)
        text = None
    text = dump(tree)
    for _ in range(r.choice([0, 0, 0, 1, 2])):  # mutations of the text itself
        kind = r.randrange(6)
        if kind == 0 and text:  # junk inserted
            at = r.randrange(len(text) + 1)
            text = text[:at] + r.choice(JUNK) + text[at:]
        elif kind == 1 and text:  # truncated
            text = text[: r.randrange(len(text))]
        elif kind == 2:  # whitespace around (valid for JSON whitespace)
            text = r.choice([" ", "\n", "\t", "\r\n", "\f", "\u00a0", ""]) + text + r.choice([" ", "  \n", "\x00", ""])
        elif kind == 3 and text:  # a character deleted
            at = r.randrange(len(text))
            text = text[:at] + text[at + 1 :]
        elif kind == 4:  # a character escaped (valid)
            positions = [i for i, c in enumerate(text) if c.isalpha()]
            if positions:
                at = r.choice(positions)
                text = text[:at] + "\\u%04x" % ord(text[at]) + text[at + 1 :] if _in_string(text, at) else text
        elif kind == 5:  # padded as the writers do
            text += " " * r.randrange(9)
    raw = text.encode("utf-8", "surrogatepass")
    if r.random() < 0.02:  # invalid UTF-8
        at = r.randrange(len(raw) + 1)
        raw = raw[:at] + r.choice([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x80"]) + raw[at:]
    n = len(raw)
    if prefix == "minus":
        n = max(0, n - r.choice([1, 2, 8]))
    elif prefix == "plus":
        n += r.choice([1, 2, 8])
    elif prefix == "data":
        n += len(tail)
    elif prefix is not None:
        n = prefix
    return struct.pack("<Q", n) + raw + tail


def _in_string(text: str, at: int) -> bool:
    inside, escaped = False, False
    for c in text[:at]:
        if escaped:
            escaped = False
        elif c == "\\":
            escaped = True
        elif c == '"':
            inside = not inside
    return inside and text[at - 1] != "\\"


def read_library(path):
    try:
        with safetensors.safe_open(str(path), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except Exception:  # SafetensorError, or torch's TypeError for shapes it cannot make
        return None


def read_ours(path):
    try:
        reader = SafetensorsReader(path)
    except FormatError as e:
        return str(e)
    try:
        return {k: reader.read(k) for k in reader.tensors}, reader.metadata
    finally:
        reader.close()


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8)))


def test_reader_accepts_exactly_what_the_library_accepts(tmp_path, summary_line):
    header, data = original()
    r = random.Random(SEED)
    path = tmp_path / "fuzz.safetensors"
    accepted = refused = 0
    documented = {reason: 0 for reason in DOCUMENTED}
    seen = set()
    failures = []
    for case in range(CASES):
        blob = mutate(r, header, data)
        if blob in seen:
            continue
        seen.add(blob)
        path.write_bytes(blob)
        theirs, ours = read_library(path), read_ours(path)
        if theirs is None and isinstance(ours, str):
            refused += 1
        elif theirs is not None and not isinstance(ours, str):
            tensors, metadata = ours
            if sorted(tensors) != sorted(theirs[0]) or metadata != theirs[1] or not all(
                    same_bytes(tensors[k], theirs[0][k]) for k in tensors):
                failures.append((case, "both accept, different tensors", blob[:300]))
            accepted += 1
        elif theirs is not None and any(reason in ours for reason in DOCUMENTED):
            documented[next(reason for reason in DOCUMENTED if reason in ours)] += 1
        else:
            failures.append((case, f"library {'accepts' if theirs else 'refuses'}, we "
                                   f"{'refuse: ' + ours if isinstance(ours, str) else 'accept'}", blob[:300]))
    summary = (f"header fuzz (seed {SEED}): {len(seen)} distinct headers of {CASES}: {accepted} accepted by both with "
               f"identical tensors, {refused} refused by both, {sum(documented.values())} documented differences "
               f"(library accepts, pcb_fast refuses: {documented}), {len(failures)} disagreements")
    summary_line(summary)
    assert not failures, summary + "\n" + "\n".join(map(repr, failures[:10]))
    assert accepted > CASES // 20 and refused > CASES // 3, summary  # both sides are exercised


T = '"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}'
EDGES = [  # (header text, data bytes, library's verdict): each found by hand, kept as a regression table
    ("{" + T + "}", 8, True),
    ("{" + T + "," + T + "}", 8, "appears twice"),  # the library keeps the last entry
    ('{"a":{"dtype":"F32","dtype":"F32","shape":[2],"data_offsets":[0,8]}}', 8, False),
    ('{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":[[1]],"x":2}}', 8, True),
    ('{"a":{"dtype":"F32","shape":[2]}}', 8, False),
    ('{"a":{"dtype":"F32","shape":[-0],"data_offsets":[0,0]}}', 0, False),  # serde reads -0 as a float
    ('{"a":{"dtype":"F32","shape":[2.0],"data_offsets":[0,8]}}', 8, False),
    ('{"a":{"dtype":"F32","shape":[true],"data_offsets":[0,4]}}', 4, False),
    (" {" + T + "}\n\t\r ", 8, True),
    ("{" + T + "}\x00", 8, False),
    ("\ufeff{" + T + "}", 8, False),
    ("{\f" + T + "}", 8, False),
    ('{"__metadata__":null,' + T + "}", 8, True),
    ('{"__metadata__":{"a":1},' + T + "}", 8, False),
    ('{"__metadata__":{"a":"1"},"__metadata__":{"b":"2"},' + T + "}", 8, False),
    ('{"__metadata__":{"a":"1","a":"2"},' + T + "}", 8, True),
    ("{}", 0, True),
    ("{}", 1, False),
    ('{"a":{"dtype":"F32","shape":[0],"data_offsets":[0,0]},"b":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}', 0, True),
    ('{"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', 8, True),
    ('{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}', 8, False),  # a gap
    ('{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}', 8, False),
    ("{" + T + "}", 9, False),  # a byte after the last tensor
    ('{"a":{"dtype":"F32","shape":[NaN],"data_offsets":[0,8]}}', 8, False),
    ('{"a":{"dtype":"F32","shape":[Infinity],"data_offsets":[0,8]}}', 8, False),
    ('{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8,8]}}', 8, False),
    ('{"\\ud800":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', 8, False),
    ('{"\\ud83d\\ude00":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', 8, True),
    ('{"\\u0000":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', 8, True),
    ('{"a":{"dtype":"F32","shape":[4294967296,4294967296,0],"data_offsets":[0,0]}}', 0, False),  # u64 overflow
    ('{"a":{"dtype":"U8","shape":[18446744073709551615,0],"data_offsets":[0,0]}}', 0, False),  # torch: TypeError
    ('{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"x":1e400}}', 4, False),
    ('{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"x":1' + "0" * 308 + "}}", 4, True),
    ('{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"x":1' + "0" * 309 + "}}", 4, False),
    ('{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"x":1e-400}}', 4, True),
    ('{"a":{"dtype":"F32","shape":[0],"data_offsets":[0,0],"x":' + "[" * 125 + "]" * 125 + "}}", 0, True),  # depth 127
    ('{"a":{"dtype":"F32","shape":[0],"data_offsets":[0,0],"x":' + "[" * 126 + "]" * 126 + "}}", 0, False),
    ('{"a":{"dtype":"F32","shape":[0],"data_offsets":[0,0],"x":' + "[" * 200_000 + "]" * 200_000 + "}}", 0, False),
    ('{"a":["F32",[2],[0,8]]}', 8, "malformed header entry (expected an object"),  # serde's sequence form
    ('{"a":{"dtype":{"F32":null},"shape":[2],"data_offsets":[0,8]}}', 8, "has unknown dtype {"),  # an enum map
    ('{"a":{"dtype":"F4","shape":[4],"data_offsets":[0,2]}}', 2, "which pcb_fast does not read"),
    ('{"a":{"dtype":"F6_E2M3","shape":[0],"data_offsets":[0,0]}}', 0, False),
    ('{"a":{"dtype":"C64","shape":[1],"data_offsets":[0,8]}}', 8, True),
    ('{"a":{"dtype":"F8_E8M0","shape":[2],"data_offsets":[0,2]}}', 2, True),
    ('{"a":{"dtype":"U64","shape":[1],"data_offsets":[0,8]}}', 8, True),
    ('{"a":{"dtype":"f32","shape":[2],"data_offsets":[0,8]}}', 8, False),
    ('{"a":null}', 0, False),
    ("[]", 0, False),
    ("", 0, False),
]


@pytest.mark.parametrize("index", range(len(EDGES)))
def test_edge_cases_agree_with_the_library(tmp_path, index):
    text, size, verdict = EDGES[index]
    raw = text.encode()
    path = tmp_path / "edge.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(range(1, size + 1)))
    theirs, ours = read_library(path), read_ours(path)
    assert (theirs is not None) == bool(verdict), "the library changed its mind"
    if isinstance(verdict, str):  # a documented difference: the library accepts, pcb_fast refuses
        assert isinstance(ours, str) and verdict in ours, ours
    elif verdict:
        tensors, metadata = ours
        assert sorted(tensors) == sorted(theirs[0]) and metadata == theirs[1]
        assert all(same_bytes(tensors[k], theirs[0][k]) for k in tensors)
    else:
        assert isinstance(ours, str), "pcb_fast accepts a header that the library refuses"


def _both_paths(raw: bytes, size: int):
    """(what the plain-form path gives, what the full parse gives) for one header: the first is None
    or the second's accepted result; the second is a result or a FormatError's message."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None, "not UTF-8"
    plain = _parse_plain(text, size)
    if plain is not None:  # (columns) as parse_header gives them
        plain = dict(zip(plain[0][0], zip(*plain[0][1:]))), plain[1]
    try:
        full = _full_parse(raw, size)
    except FormatError as e:
        full = str(e)
    return plain, full


def _full_parse(raw: bytes, size: int):
    import pcb_fast.io.safetensors as module

    kept, module._parse_plain = module._parse_plain, lambda text, size: None
    try:
        return parse_header(raw, size)
    finally:
        module._parse_plain = kept


U = '"u":{"dtype":"BF16","shape":[2,1],"data_offsets":[8,12]}'
M = '"__metadata__":{"format":"pt","p":"{\\"a\\": 1}"}'
PLAIN_EDGES = [  # near the plain form: each must give the full parse's answer
    ("{" + T + "," + U + "}", 12, True), ("{" + M + "," + T + "," + U + "}", 12, True),
    ("{" + T + "," + U + "," + M + "}", 12, True), ("{" + T + "," + M + "," + U + "}", 12, True),
    ("{" + T + "," + U + "}    ", 12, True), ("{" + M + "}", 0, True), ('{"__metadata__":null}', 0, True),
    ("{" + T + "," + U.replace("[8,12]", "[08,12]") + "}", 12, False), ("{" + T + "," + U.replace("[2,1]", "[2,,1]") + "}", 12, False),
    ("{" + T + "," + U.replace("[2,1]", "[2,1,]") + "}", 12, False), ("{" + T + "," + U.replace("[2,1]", "[]").replace("12]", "10]") + "}", 10, True),
    ("{" + T + "," + U.replace('"u"', '"a"') + "}", 12, False), ("{" + T + "," + U.replace('"u"', '"u\\"x"') + "}", 12, True),
    ("{" + T + "," + U.replace('"u"', '"u:v"') + "}", 12, True), ("{" + T + "," + U.replace('"u"', '"u\x01"') + "}", 12, False),
    ("{" + T + "," + U.replace('"u"', '"__metadata__"') + "}", 12, False), ("{" + T + "," + U.replace("BF16", "F4") + "}", 12, False),
    ("{" + T + "," + U.replace("[8,12]", "[8,13]") + "}", 12, False), ("{" + T + "," + U + "}", 13, False),
    ("{" + T + "," + M + "," + M + "}", 8, False), ("{" + T + ", " + U + "}", 12, True),
    ("{" + T + "," + U.replace('[2,1]', '[2,1],"x":1') + "}", 12, True), ("{" + U.replace("[8,12]", "[0,4]") + "," + T.replace("[0,8]", "[4,12]") + "}", 12, True),
]


def test_plain_headers_are_read_in_bulk_with_the_full_parses_result():
    # every fuzzed header and edge case: the bulk path (io.safetensors._parse_plain) accepts only what
    # the full parse accepts, with the same tensors and metadata, and takes the headers writers write
    header, data = original()
    r = random.Random(SEED)
    taken = 0
    cases = [(text.encode(), size) for text, size, _ in EDGES + PLAIN_EDGES]
    for _ in range(CASES // 4):
        blob = mutate(r, header, data)
        (n,) = struct.unpack("<Q", blob[:8]) if len(blob) >= 8 else (0,)
        if 8 + n <= len(blob):
            cases.append((blob[8 : 8 + n], len(blob) - 8 - n))
    for raw, size in cases:
        plain, full = _both_paths(raw, size)
        if plain is not None:
            taken += 1
            assert not isinstance(full, str), (raw[:200], full)
            assert plain == full, raw[:200]
    assert taken >= 12  # the bulk path is exercised
    for text, size, verdict in PLAIN_EDGES:  # (the table says what the full parse does)
        assert isinstance(_both_paths(text.encode(), size)[1], str) != verdict, text
    blob = save({"b": torch.ones(3), "a": torch.zeros(2, 2, dtype=torch.bfloat16)}, metadata={"format": "pt", "q": 'x"}'})
    (n,) = struct.unpack("<Q", blob[:8])
    plain, full = _both_paths(blob[8 : 8 + n], len(blob) - 8 - n)
    assert plain is not None and plain == full  # the library's own layout, metadata with escapes
