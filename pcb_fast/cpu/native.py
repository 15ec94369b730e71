"""Small C kernels for the CPU engine: per-row order statistics of |tau| (row_select.c), DARE's
keep masks (dare_hash.c), float32 task vectors and weighted merges from the stored inputs
(task_vectors.c, weighted_merge.c) and the block
loops of TIES, DARE and DARE-TIES (ties_loops.c, the eager engine's values bit for bit), the
collection of the entries above a floor (collect.c) and PCB's score and merge sweeps (pcb_loops.c,
the eager engine's values bit for bit).

Breadcrumbs places its band by two order statistics of every row; torch has no per-row select
cheaper than a partial top-k over (value, index) pairs, which cost it most of its time. Task
arithmetic and averaging from files take one sweep from the raw bf16/fp16/fp32 slices to the
output's bytes instead of five torch ops. The library
is compiled on first use with the system C compiler ($CC, else cc, gcc or clang) and called through
ctypes; it splits the rows over OpenMP threads, in torch's own OpenMP team. The build is cached in
``$PCB_FAST_CACHE`` or ~/.cache/pcb_fast, a folder of this user that no one else may write, keyed by
what it depends on: the sources, the compiler, the flags and the target they resolve to on this host
(the compiler's predefined macros under -march=native). One process compiles while the others wait
on a lock; the library is written to disk durably (flushed, then renamed), its SHA-256 recorded, and
checked before every load (a truncated or replaced file is built again). Each kernel's signature is
declared once (:data:`SIGNATURES`) and checked against native.h's prototypes at load.
:func:`problem` says why it is unavailable; callers then use the torch formulation.
"""

from __future__ import annotations

import ctypes
import fcntl
import functools
import hashlib
import os
import platform
import re
import shutil
import stat
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

# compiled together into one library
SOURCES = tuple(Path(__file__).with_name(name)
                for name in ("row_select.c", "dare_hash.c", "task_vectors.c", "weighted_merge.c", "ties_loops.c", "collect.c",
                             "pcb_loops.c"))
HEADERS = (Path(__file__).with_name("native.h"),)  # part of the cache key: a change rebuilds the library
# Tried in order: a compiler may refuse -march=native or lack OpenMP (the kernel then runs on one thread).
# -ffp-contract=off: a * b + c must round twice, as torch's float32 ops do (GCC contracts by default).
FLAG_SETS = tuple(flags + ["-ffp-contract=off"] for flags in (["-O3", "-march=native", "-fopenmp"],
                                                               ["-O3", "-fopenmp"], ["-O3"]))
# dtype codes of weighted_merge.c
KERNEL_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
MIN_ROWS_PER_THREAD = 16  # fewer rows per thread than this: fewer threads, waking one costs more


def _compiler() -> str | None:
    found = (shutil.which(name) for name in (os.environ.get("CC"), "cc", "gcc", "clang") if name)
    return next((path for path in found if path), None)


def _cache_dir() -> Path:
    return Path(os.environ.get("PCB_FAST_CACHE") or Path.home() / ".cache" / "pcb_fast")


def _target(compiler: str, flags: list[str]) -> bytes:
    """What a build with these flags depends on besides the sources: the compiler's predefined
    macros under them (its version, and the instruction sets that -march=native resolves to on this
    host), so hosts that share a home folder but differ in their CPUs never share a library."""
    done = subprocess.run([compiler, *flags, "-dM", "-E", "-x", "c", os.devnull], check=True, capture_output=True)
    return b"\n".join(sorted(done.stdout.splitlines()))


def _trusted_folder(folder: Path) -> str | None:
    """Why the cache folder cannot be trusted (None when it can): it must be a folder of this user
    that no one else can write (else another user could plant a library that we would load)."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = os.stat(folder)
    if not stat.S_ISDIR(st.st_mode):
        return f"the kernel cache {folder} is not a folder"
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        return f"the kernel cache {folder} belongs to another user"
    if st.st_mode & 0o022 and not os.environ.get("PCB_FAST_CACHE"):
        os.chmod(folder, stat.S_IMODE(st.st_mode) & ~0o022)  # our own default folder, made under a loose umask
        st = os.stat(folder)
    if st.st_mode & 0o022:
        return f"others can write the kernel cache {folder} (mode {stat.S_IMODE(st.st_mode):o}); make it 700"
    return None


def _digest(path: Path) -> str | None:
    """The SHA-256 of a regular file of this user that no one else can write, or None."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if (not stat.S_ISREG(st.st_mode) or st.st_mode & 0o022
                or (hasattr(os, "getuid") and st.st_uid != os.getuid())):
            return None
        digest = hashlib.sha256()
        while chunk := os.read(fd, 1 << 20):
            digest.update(chunk)
        return digest.hexdigest()
    finally:
        os.close(fd)


def _write_durably(folder: Path, name: str, write) -> None:
    """Create ``folder / name`` whole or not at all: ``write(path)`` fills a temporary file, which is
    flushed to disk and renamed over the name (then the folder's entry is flushed too)."""
    fd, partial = tempfile.mkstemp(prefix=f".{name}.", dir=folder)
    os.close(fd)
    try:
        write(partial)
        fd = os.open(partial, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(partial, 0o755 if name.endswith(".so") else 0o644)
        os.replace(partial, folder / name)
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        except OSError:  # some filesystems cannot sync a folder
            pass
        finally:
            os.close(fd)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def library_path(compiler: str, flags: list[str]) -> Path:
    """Where the library built by ``compiler`` with ``flags`` is cached: named by a hash of what the
    build depends on (sources, compiler, flags, and the target they resolve to here)."""
    source = b"\0".join(path.read_bytes() for path in SOURCES + HEADERS)
    key = hashlib.sha256(b"\0".join([source, os.path.realpath(compiler).encode(), " ".join(flags).encode(),
                                     platform.machine().encode(), _target(compiler, flags)])).hexdigest()[:16]
    return _cache_dir() / f"native-{key}.so"


def _build(compiler: str, flags: list[str]) -> Path:
    """The shared library for these flags: the cached one if its recorded SHA-256 matches, else
    compiled (under a lock, so that processes starting together compile it once), written durably
    and recorded. Raises on a compiler error or a cache folder that cannot be trusted (ValueError)."""
    folder = _cache_dir()
    reason = _trusted_folder(folder)
    if reason is not None:
        raise ValueError(reason)
    target = library_path(compiler, flags)
    key = target.stem.removeprefix("native-")
    record = folder / f"native-{key}.sha256"
    with open(folder / f"native-{key}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
        recorded = record.read_text().strip() if record.is_file() else None
        if recorded is None or _digest(target) != recorded:  # absent, truncated, replaced: built again
            def compile_to(path):
                subprocess.run([compiler, *flags, "-shared", "-fPIC", "-o", path, *map(str, SOURCES)],
                               check=True, capture_output=True, text=True)

            _write_durably(folder, target.name, compile_to)
            built = _digest(target)
            if built is None:
                raise ValueError(f"the kernel built into {folder} cannot be read back")
            _write_durably(folder, record.name, lambda path: Path(path).write_text(built + "\n"))
    return target


def prototypes(header: str) -> dict:
    """{name: (return type, [parameter types])} of the function prototypes in the C ``header`` text,
    each type as its ctypes equivalent (pointers: c_void_p; a keep_rule pointer: POINTER(KeepRule))."""
    found = {}
    for result, name, params in _PROTOTYPE.findall(re.sub(r"/\*.*?\*/", " ", header, flags=re.S)):
        types = []
        for param in params.split(","):
            words = param.replace("*", " * ").split()
            if "*" in words:
                types.append(ctypes.POINTER(KeepRule) if "keep_rule" in words else ctypes.c_void_p)
            else:
                types.append(_C_TYPES[words[-2] if len(words) > 1 else words[0]])
        found[name] = (_C_TYPES[result], types)
    return found


_PROTOTYPE = re.compile(r"^(void|int|int64_t)\s+(\w+)\s*\(([^;{]*?)\)\s*;", re.M | re.S)
_C_TYPES = {"void": None, "int": ctypes.c_int, "int32_t": ctypes.c_int32, "int64_t": ctypes.c_int64,
            "float": ctypes.c_float}


def _declare(library: ctypes.CDLL) -> str | None:
    """Give every kernel its signature from :data:`SIGNATURES`, once; why not (a string) where
    native.h's prototypes say otherwise, so that a drift between C and Python is never called."""
    declared = prototypes(HEADERS[0].read_text())
    for name, (result, params) in SIGNATURES.items():
        if declared.get(name) != (result, params):
            return f"native.h and native.py disagree on the signature of {name}; rebuild from one release"
        function = getattr(library, name)
        function.restype, function.argtypes = result, params
    return None


@functools.lru_cache(maxsize=None)
def _library() -> ctypes.CDLL | str:
    """The loaded kernel, or the reason there is none (a string)."""
    compiler = _compiler()
    if compiler is None:
        return "no C compiler found ($CC, cc, gcc, clang)"
    errors = []
    for flags in FLAG_SETS:
        try:
            library = ctypes.CDLL(str(_build(compiler, flags)))
            break
        except subprocess.CalledProcessError as e:
            errors.append((e.stderr or "").strip().splitlines()[-1:] or [f"exit {e.returncode}"])
        except ValueError as e:  # a cache that cannot be trusted: no flags will change that
            return str(e)
        except OSError as e:
            errors.append([str(e)])
    else:
        return f"{compiler} could not build {', '.join(path.name for path in SOURCES)}: {errors[-1][0]}"
    return _declare(library) or library


def _loaded() -> ctypes.CDLL:
    """The loaded library; raises where there is none (callers that have a fallback ask :func:`problem`)."""
    library = _library()
    if isinstance(library, str):
        raise RuntimeError(f"pcb_fast native kernel unavailable: {library}")
    return library


def problem() -> str | None:
    """None when the kernel is built and loaded, else why not."""
    library = _library()
    return library if isinstance(library, str) else None


def row_order_statistics(x: torch.Tensor, rank_a: int, rank_b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row of ``x`` [..., L] (float32, last dim contiguous): the |x| at descending ranks
    ``rank_a`` and ``rank_b`` (0-based; the values of ``x.abs().sort(descending=True)`` there),
    each [..., 1]. Exact for any values: ties, zeros of either sign, subnormals, infinities (NaN
    ranks above +inf). Runs on torch.get_num_threads() threads."""
    library = _loaded()
    if x.dtype != torch.float32 or x.device.type != "cpu" or x.dim() == 0:
        raise ValueError(f"row_order_statistics needs rows of float32 on the CPU, got {x.dtype} "
                         f"{tuple(x.shape)} on {x.device}")
    length = x.shape[-1]
    for rank in (rank_a, rank_b):
        if not 0 <= rank < length:
            raise ValueError(f"rank {rank} is outside a row of {length} entries")
    shape = x.shape[:-1] + (1,)
    if x.numel() == 0:
        return torch.empty(shape), torch.empty(shape)
    # Groups of contiguous rows, read in place: a block of task vectors [n, rows, L] sliced from
    # a wider matrix has contiguous rows within a task but a larger step between tasks.
    groups = x.reshape(-1, x.shape[-2] if x.dim() > 1 else 1, length)
    if groups.stride(2) != 1 or groups.stride(1) != length:
        groups = groups.contiguous()
    rows = groups.shape[0] * groups.shape[1]
    out_a, out_b = torch.empty(rows), torch.empty(rows)
    threads = max(1, min(torch.get_num_threads(), rows // MIN_ROWS_PER_THREAD))
    status = library.row_order_statistics(groups.data_ptr(), rows, groups.shape[1], groups.stride(0), length,
                                          rank_a, rank_b, out_a.data_ptr(), out_b.data_ptr(), threads)
    if status:
        raise MemoryError(f"row_order_statistics: no scratch memory for rows of {length} entries")
    return out_a.reshape(shape), out_b.reshape(shape)


def dare_keep_masks(lo: int, m: int, streams: list, highs: list, thresholds: list) -> torch.Tensor:
    """[n, m] bool DARE keep masks of entries [lo, lo + m) for n streams (pcb_fast.core.rng: each
    task's stream constant, its mix32 and its keep threshold); the values of rng.keep_masks."""
    library = _loaded()
    n = len(streams)
    out = torch.empty(n, m, dtype=torch.bool)
    if out.numel():
        arrays = [torch.tensor(values, dtype=torch.int64).to(torch.int32) for values in (streams, highs, thresholds)]
        library.dare_keep_masks(lo, m, n, *(a.data_ptr() for a in arrays), out.data_ptr(),
                                max(1, min(torch.get_num_threads(), n * m // 16384)))
    return out


MIN_ENTRIES_PER_THREAD = 1 << 15  # below this, waking a thread costs more than it saves


def weighted_merge(models: list, base: torch.Tensor, weights: torch.Tensor | None, divisor: float | None,
                   lam: float, out: torch.Tensor) -> bool:
    """``out`` = base + lam * (sum_i weights_i * (models_i - base)) [/ divisor], each model and the base
    [m] contiguous CPU tensors of float32, bfloat16 or float16 (any mix), ``out`` [m] of one of those;
    with the float32 operations and rounding of the torch engine (core.formulas.sum_over_tasks, then
    merged_weights, then ``.to(out.dtype)``), bit for bit. ``weights``: [n] or [n, 1] float32, or None.

    False, with ``out`` unspecified, where some output is not finite (the caller redoes the block
    with torch to say where) or the kernel does not take these inputs (float64, no compiler)."""
    library = _library()
    tensors = [base, out, *models]
    if (isinstance(library, str) or not models or any(t.dtype not in KERNEL_DTYPES or t.device.type != "cpu"
                                                      or not t.is_contiguous() for t in tensors)
            or len({t.numel() for t in tensors}) != 1):
        return False
    n, m = len(models), out.numel()
    if m == 0:
        return True
    pointers = (ctypes.c_void_p * n)(*(t.data_ptr() for t in models))
    dtypes = (ctypes.c_int32 * n)(*(KERNEL_DTYPES[t.dtype] for t in models))
    if weights is not None:
        weights = weights.reshape(-1).to(torch.float32).contiguous()
    threads = _threads(m)
    bad = library.weighted_merge(n, m, pointers, dtypes, base.data_ptr(), KERNEL_DTYPES[base.dtype],
                                 None if weights is None else weights.data_ptr(), float(divisor or 0.0),
                                 float(lam), out.data_ptr(), KERNEL_DTYPES[out.dtype], threads)
    return bad == 0


def task_vectors(natives: list, base32: torch.Tensor, out: torch.Tensor) -> bool:
    """``out[i] = f32(model_i) - f32(base)`` and ``base32 = f32(base)`` from the raw slices ``natives``
    ([base, model_0, ...], contiguous CPU tensors of float32, bfloat16 or float16, any mix, of one
    length m): the bits of torch.sub(model_i, base32), in one sweep. ``base32``: [m] float32; ``out``:
    [n, m] float32 with rows of unit stride. False, with nothing written, where the kernel does not
    take these tensors (float64, no compiler): the caller then uses torch."""
    library = _library()
    m = out.shape[1] if out.dim() == 2 else -1
    if (isinstance(library, str) or len(natives) != out.shape[0] + 1 or out.dtype != torch.float32
            or base32.dtype != torch.float32 or not base32.is_contiguous() or base32.numel() != m
            or out.stride(1) != 1 or out.device.type != "cpu" or base32.device.type != "cpu"
            or any(t.dtype not in KERNEL_DTYPES or t.device.type != "cpu" or not t.is_contiguous() or t.numel() != m
                   for t in natives)):
        return False
    n = len(natives) - 1
    if m == 0:
        return True
    pointers = (ctypes.c_void_p * n)(*(t.data_ptr() for t in natives[1:]))
    dtypes = (ctypes.c_int32 * n)(*(KERNEL_DTYPES[t.dtype] for t in natives[1:]))
    library.task_vectors(n, m, pointers, dtypes, natives[0].data_ptr(), KERNEL_DTYPES[natives[0].dtype],
                         base32.data_ptr(), out.data_ptr(), out.stride(0), _threads(n * m))
    return True


def merged_output(base: torch.Tensor, tau_m: torch.Tensor, lam: float, out: torch.Tensor) -> bool:
    """``out`` = (base + lam * tau_m) rounded to out's dtype, with the operations of
    core.formulas.merged_weights then ``.to(out.dtype)`` (bit for bit): ``base`` [m] float32, bfloat16
    or float16, ``tau_m`` [m] float32, ``out`` [m] of one of those, all contiguous on the CPU. False,
    with ``out`` unspecified, where some value is not finite or the kernel does not take these
    tensors (a float64 base, no compiler): the caller then takes the torch path, which says why."""
    library = _library()
    if (isinstance(library, str) or tau_m.dtype != torch.float32
            or any(t.dtype not in KERNEL_DTYPES or t.device.type != "cpu" or not t.is_contiguous()
                   for t in (base, tau_m, out))
            or not base.numel() == tau_m.numel() == out.numel()):
        return False
    m = out.numel()
    if m == 0:
        return True
    bad = library.merged_output(m, base.data_ptr(), KERNEL_DTYPES[base.dtype], tau_m.data_ptr(), float(lam),
                                out.data_ptr(), KERNEL_DTYPES[out.dtype], _threads(m))
    return bad == 0


class KeepRule(ctypes.Structure):
    """keep_rule of ties_loops.c: TIES' trim (t, cut) or DARE's drop (stream constants, lo, 1 - p)."""

    _fields_ = [("drop", ctypes.c_int), ("t", ctypes.c_void_p), ("cut", ctypes.c_void_p), ("stream", ctypes.c_void_p),
                ("high", ctypes.c_void_p), ("threshold", ctypes.c_void_p), ("lo", ctypes.c_int64),
                ("scale", ctypes.c_void_p), ("multiply", ctypes.c_int)]


_p, _i64, _i32, _int, _f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_int, ctypes.c_float
# What Python passes to each kernel: (return type, parameter types), checked against native.h's
# prototypes when the library is loaded (the compiler checks the C definitions against the same).
SIGNATURES = {
    "row_order_statistics": (_int, [_p, _i64, _i64, _i64, _i64, _i64, _i64, _p, _p, _int]),
    "dare_keep_masks": (None, [_i64, _i64, _i64, _p, _p, _p, _p, _int]),
    "tv_bracket": (None, [_p, _i64, _i64, _i64] + [_p] * 10 + [_int]),
    "tv_equal_counts": (None, [_p, _i64, _i64, _i64, _p, _p, _int]),
    "tv_merge_block": (_int, [_p, _i64, _i64, _i64, _p, _p, ctypes.POINTER(KeepRule), _p, _int, _f32, _int]
                       + [_p] * 7 + [_int]),
    "collect_counts": (None, [_p, _i64, _i64, _i64, _p, _p, _int]),
    "collect_entries": (None, [_p, _p, _i64, _i64, _i64, _i64] + [_p] * 5 + [_int]),
    "task_vectors": (None, [_i64, _i64, _p, _p, _p, _i32, _p, _p, _i64, _int]),
    "merged_output": (_i64, [_i64, _p, _i32, _p, _f32, _p, _i32, _int]),
    "weighted_merge": (_i64, [_i64, _i64, _p, _p, _p, _i32, _p, _f32, _f32, _p, _i32, _int]),
    "pcb_candidates": (_i64, [_p, _i64, _i64, _i64, _p, _p, _p, _p, _p, _f32, _int] + [_p] * 8 + [_int]),
    "pcb_bracket_counts": (None, [_i64] + [_p] * 10),
    "collected_split": (None, [_i64] + [_p] * 7),
    "pcb_keep": (_i64, [_i64] + [_p] * 5),
    "pcb_merge_entries": (None, [_i64, _i64] + [_p] * 11),
    "pcb_approximations": (None, [_i64] + [_p] * 3),
    "pcb_score_bounds": (None, [_i64] + [_p] * 3),
    "pcb_gather_tau": (None, [_i64, _i64] + [_p] * 5),
    "pcb_clip_tails": (_int, [_p, _i64, _i64, _i64, _p, _p, _i64, _i64] + [_p] * 4 + [_i64] * 3 + [_p, _p, _int]),
    "pcb_tail_values": (_int, [_i64, _p, _p, _i64, _p]),
}


def _task_rows(tv: torch.Tensor) -> torch.Tensor:
    """``tv`` [n, m] as float32 rows with unit steps inside a row (the blocks of the sources already are)."""
    if tv.dtype != torch.float32 or tv.dim() != 2 or tv.device.type != "cpu":
        raise ValueError(f"expected [n, m] float32 task rows on the CPU, got {tv.dtype} {tuple(tv.shape)} on {tv.device}")
    return tv if tv.stride(1) == 1 or tv.shape[1] <= 1 else tv.contiguous()


def _column(values, dtype) -> torch.Tensor:
    """[n] contiguous values of ``dtype`` from a tensor of n entries ([n] or [n, 1])."""
    if isinstance(values, torch.Tensor) and values.dtype == dtype and values.dim() == 1 and values.is_contiguous():
        return values  # (per block, four times: no call into torch)
    return torch.as_tensor(values).reshape(-1).to(dtype).contiguous()


def _threads(work: int) -> int:
    return max(1, min(torch.get_num_threads(), work // MIN_ENTRIES_PER_THREAD))


def _block_rows(tv) -> tuple:
    """A block for the C loops: its float32 task rows [n, m] (unit steps in a row), or the raw slices
    [base, model_0, ...] of :func:`raw_slices`, from which the loops form tau themselves (the bits of
    the sources' blocks). Returns (n, m, the rows or None, row stride, pointers to the raw slices or
    None, their dtype codes or None). The rows may be a copy (rows with other steps): the caller
    holds them, and passes their data_ptr, while the kernel runs."""
    if isinstance(tv, torch.Tensor):
        tv = _task_rows(tv)
        return (*tv.shape, tv, tv.stride(0), None, None)
    if not raw_slices(tv):
        raise ValueError("raw slices must be float32, bfloat16 or float16 vectors of one length, the base first")
    raw = (ctypes.c_void_p * len(tv))(*(t.data_ptr() for t in tv))
    dtypes = (ctypes.c_int32 * len(tv))(*(KERNEL_DTYPES[t.dtype] for t in tv))
    return len(tv) - 1, tv[0].numel(), None, 0, raw, dtypes


def _pointer(rows: torch.Tensor | None):
    """data_ptr of :func:`_block_rows`' rows, or None for raw slices."""
    return None if rows is None else rows.data_ptr()


def bracket(tv, floor, ceiling):
    """|tau| of a block [n, m] around a bracket per task (``floor``, ``ceiling``: n values): (max |tau|
    per task, NaN propagating; [3, n] int64 counts of |tau| > ceiling, == ceiling and == floor; a
    list of n tensors: each task's |tau| strictly inside its bracket, in position order). ``tv``:
    the block's float32 task vectors, or its raw slices (see :func:`_block_rows`)."""
    library = _loaded()
    n, m, rows, stride, raw, dtypes = _block_rows(tv)
    floor, ceiling = _column(floor, torch.float32), _column(ceiling, torch.float32)
    row_max, counts = torch.empty(n), torch.empty(3, n, dtype=torch.int64)
    inside, inside_counts = torch.empty(n, m), torch.empty(n, dtype=torch.int64)
    library.tv_bracket(_pointer(rows), n, m, stride, raw, dtypes, floor.data_ptr(), ceiling.data_ptr(),
                       row_max.data_ptr(), counts[0].data_ptr(), counts[1].data_ptr(), counts[2].data_ptr(),
                       inside.data_ptr(), inside_counts.data_ptr(), min(n, _threads(n * m)))
    return row_max, counts, [inside[i, :k].clone() for i, k in enumerate(inside_counts.tolist())]


def equal_counts(tv: torch.Tensor, t) -> torch.Tensor:
    """[n] int64 entries of each task row of ``tv`` with |tau| == t_i."""
    library, tv = _loaded(), _task_rows(tv)
    n, m = tv.shape
    t, counts = _column(t, torch.float32), torch.empty(n, dtype=torch.int64)
    library.tv_equal_counts(tv.data_ptr(), n, m, tv.stride(0), t.data_ptr(), counts.data_ptr(),
                            min(n, _threads(n * m)))
    return counts


class _OpenRoom(threading.local):
    """Reused room (per thread) for the undecided positions of a block and their other values: fresh
    memory for every block would cost a page fault per page it touches."""

    def __init__(self):
        self.at, self.values = torch.empty(0, dtype=torch.int32), torch.empty(0)

    def of(self, m: int) -> tuple:
        if self.at.numel() < m:
            self.at, self.values = torch.empty(m, dtype=torch.int32), torch.empty(m)
        return self.at, self.values


_open_room = _OpenRoom()


def _merge_block(tv, rule: KeepRule, lam, elect: bool, fill=1.0, divide=True):
    """tv_merge_block on a block (float32 rows or raw slices, see :func:`_block_rows`): (values, sum
    of the elected signs, [k] int32 undecided positions in ascending order, [k] float32 values there
    under the other fill (-1 for a positive fill, else +1), [n] kept, [n] max |tau|); no positions
    (two empty tensors) where ``elect`` is False."""
    library = _loaded()
    n, m, rows, stride, raw, dtypes = _block_rows(tv)
    if m >= 1 << 31:
        raise ValueError(f"pcb_fast native kernel: a block of {m} entries has more than 2^31")
    lam = _column(lam, torch.float32)
    values, counts = torch.empty(m), torch.zeros(2, dtype=torch.int64)
    kept, row_max = torch.empty(n, dtype=torch.int64), torch.empty(n)
    at, others = _open_room.of(m) if elect else (None, None)
    status = library.tv_merge_block(_pointer(rows), n, m, stride, raw, dtypes, ctypes.byref(rule), lam.data_ptr(),
                                    int(elect), float(fill), int(divide), values.data_ptr(), counts[0].data_ptr(),
                                    counts[1].data_ptr(), None if at is None else at.data_ptr(),
                                    None if others is None else others.data_ptr(), kept.data_ptr(),
                                    row_max.data_ptr(), _threads(n * m))
    if status:
        raise MemoryError(f"pcb_fast native kernel: no scratch memory for a block of {n} tasks")
    k = int(counts[1]) if elect else 0
    if k:
        at, others = at[:k].clone(), others[:k].clone()
    else:
        at, others = torch.empty(0, dtype=torch.int32), torch.empty(0)
    return values, counts[0], at, others, kept, row_max


def ties_block(tv, t, cut, lam, fill, divide: bool):
    """TIES on a block [n, m] (the eager engine's values bit for bit; ``tv``: its float32 task vectors,
    or its raw slices, see :func:`_block_rows`): entries kept where |tau| > t_i,
    or == t_i at positions < cut_i; weighted by lam_i; the sign elected per position (``fill`` where
    the sum is 0); the mean (``divide``) or sum of the agreeing entries. Returns (values [m], sum of
    the elected signs, the undecided positions (zero sum, some non-zero entry) as ascending int32
    offsets, the float32 values they take under the other fill: -1 for a positive ``fill``, else +1,
    a zero fill electing as -1 does)."""
    t, cut = _column(t, torch.float32), _column(cut, torch.int64)
    rule = KeepRule(drop=0, t=t.data_ptr(), cut=cut.data_ptr())
    values, signs, at, others, _, _ = _merge_block(tv, rule, lam, True, fill, divide)  # t, cut alive here
    return values, signs, at, others


def _drop_rule(streams, highs, thresholds, lo: int, scales, multiply: bool):
    arrays = [torch.tensor([int(v) for v in values], dtype=torch.int64).to(torch.int32)
              for values in (streams, highs, thresholds)]
    scales = _column(scales, torch.float32)
    rule = KeepRule(drop=1, stream=arrays[0].data_ptr(), high=arrays[1].data_ptr(), threshold=arrays[2].data_ptr(),
                    lo=int(lo), scale=scales.data_ptr(), multiply=int(multiply))
    return rule, (arrays, scales)


def dare_ties_block(tv, drop: tuple, lam, fill, divide: bool):
    """DARE-TIES on a block: DARE's drop then :func:`ties_block`'s election and mean. ``drop``: (the n
    stream constants of pcb_fast.core.rng, their mix32, the n keep thresholds, the block's first
    index in its tensor, n float32 scales, multiply): survivors divided by scale_i (1 - p_i), or
    with ``multiply``, multiplied by it (mergekit's L1 factors; 1 for no rescale). Returns (values,
    sum of the elected signs, undecided positions and their values under the other fill (as
    :func:`ties_block`), [n] entries kept, [n] max |tau|, NaN propagating)."""
    rule, arrays = _drop_rule(*drop)
    return _merge_block(tv, rule, lam, True, fill, divide)  # the rule's arrays alive here


def dare_sum(tv, drop: tuple, lam):
    """DARE then the sum over tasks of a block (``drop``: see :func:`dare_ties_block`): (sum [m], [n]
    entries kept, [n] max |tau|)."""
    rule, arrays = _drop_rule(*drop)
    values, _, _, _, kept, row_max = _merge_block(tv, rule, lam, False)  # the rule's arrays alive here
    return values, kept, row_max


def collect(scores: torch.Tensor, tv: torch.Tensor, floor: torch.Tensor):
    """The entries of a block [n, m] with ``scores >= floor`` (per task, [n]): (int32 flat indices task *
    m + position, their scores, their ``tv`` values), task-major in position order: the values of
    ``nonzero`` and ``take`` (core.engine.collect_block)."""
    library = _loaded()
    scores, tv = _task_rows(scores), _task_rows(tv)
    n, m = scores.shape
    floor = _column(floor, torch.float32)
    counts = torch.empty(n, dtype=torch.int64)
    threads = min(n, _threads(n * m))
    library.collect_counts(scores.data_ptr(), n, m, scores.stride(0), floor.data_ptr(), counts.data_ptr(), threads)
    offsets = torch.zeros(n + 1, dtype=torch.int64)
    torch.cumsum(counts, 0, out=offsets[1:])
    total = int(offsets[-1])
    flat, out_scores, out_tau = torch.empty(total, dtype=torch.int32), torch.empty(total), torch.empty(total)
    if total:
        library.collect_entries(scores.data_ptr(), tv.data_ptr(), n, m, scores.stride(0), tv.stride(0), floor.data_ptr(),
                                offsets.data_ptr(), flat.data_ptr(), out_scores.data_ptr(), out_tau.data_ptr(), threads)
    return flat, out_scores, out_tau


def collected_split(counts: torch.Tensor, score: torch.Tensor, top: torch.Tensor, above: torch.Tensor,
                    maxima: torch.Tensor) -> list:
    """The collected scores of one block (task-major, [n] int64 ``counts`` per task) around a ceiling
    per task (``top``, [n] float32): adds to ``above`` ([n] int64) the scores > top, raises ``maxima``
    ([n] float32) to their max, and returns each task's scores <= top, in order (new tensors)."""
    library = _loaded()
    n = counts.numel()
    below, below_counts = torch.empty(score.numel()), torch.empty(n, dtype=torch.int64)
    library.collected_split(n, counts.data_ptr(), score.data_ptr(), top.data_ptr(), above.data_ptr(),
                            maxima.data_ptr(), below.data_ptr(), below_counts.data_ptr())
    return [part.clone() for part in below[: int(below_counts.sum())].split(below_counts.tolist())]


class ClipTails:
    """PCB's clip pass in C (pcb_loops.c, pcb_clip_tails): the exact ``k_low``-th smallest and
    ``k_high``-th largest |tau| of every task row, fed block by block (the values of
    core.select.TailSelect), with each block's max |tau| and its sampled columns in the same sweep."""

    def __init__(self, n: int, k_low: int, k_high: int):
        self.n, self.k_low, self.k_high = n, k_low, k_high
        self.low = torch.empty(n, 2 * k_low, dtype=torch.int32)  # keys: see pcb_loops.c
        self.high = torch.empty(n, 2 * k_high, dtype=torch.int32)
        self.sizes = torch.zeros(2, n, dtype=torch.int64)
        self.bounds = torch.full((2, n), 1 << 31, dtype=torch.int64)  # every key enters

    def update(self, inputs, first: int, step: int, sample: torch.Tensor) -> torch.Tensor:
        """Feed a block: ``inputs`` its float32 task vectors [n, m] or its raw slices [base, model_0, ...]
        (:func:`raw_slices`); its columns first, first + step, ... of tau are written to ``sample`` [n,
        columns] (float32, contiguous). Returns the block's max |tau| per task (NaN propagating)."""
        library = _loaded()
        n, m, rows, stride, raw, dtypes = _block_rows(inputs)
        if n != self.n:
            raise ValueError(f"pcb_clip_tails: a block of {n} tasks fed to the tails of {self.n}")
        columns = sample.shape[1]
        if (sample.shape[0] != n or sample.dtype != torch.float32 or not sample.is_contiguous()
                or columns != len(range(first, m, step))):
            raise ValueError(f"pcb_clip_tails: the sample must be float32 [{n}, {len(range(first, m, step))}]")
        row_max = torch.empty(n)
        if library.pcb_clip_tails(_pointer(rows), n, m, stride, raw, dtypes, self.k_low,
                                  self.k_high, self.low.data_ptr(), self.high.data_ptr(), self.sizes.data_ptr(),
                                  self.bounds.data_ptr(), first, step, columns, sample.data_ptr(), row_max.data_ptr(),
                                  min(n, _threads(n * m))):
            raise MemoryError("pcb_clip_tails: no scratch memory for a selection")
        return row_max

    def values(self) -> torch.Tensor:
        """[n, 2]: the k_low-th smallest and the k_high-th largest |tau| of every task (once every block is fed)."""
        library = _loaded()
        keys = torch.empty(2, self.n, dtype=torch.int32)
        for row, (sets, k) in enumerate(((self.low, self.k_low), (self.high, self.k_high))):
            if bool((self.sizes[row] < k).any()):
                raise ValueError(f"pcb_clip_tails: fewer than {k} entries fed")
            if library.pcb_tail_values(self.n, sets.data_ptr(), self.sizes[row].contiguous().data_ptr(), k,
                                       keys[row].data_ptr()):
                raise MemoryError("pcb_tail_values: no scratch memory for a selection")
        keys[1] = 0x7FFFFFFF - keys[1]
        return keys.view(torch.float32).t().contiguous()


def raw_slices(natives: list) -> bool:
    """Whether the C sweeps can form tau from these raw slices [base, model_0, ...] themselves
    (float32, bfloat16 or float16, contiguous, on the CPU, equal lengths)."""
    return (problem() is None and len(natives) > 1 and len({t.numel() for t in natives}) == 1
            and all(t.dtype in KERNEL_DTYPES and t.device.type == "cpu" and t.is_contiguous() for t in natives))


def pcb_candidates(tv, lo, hi, span, n_tasks: int, normalized: bool, floor, out: list, ceiling=None,
                   above: torch.Tensor | None = None):
    """PCB official's candidates of a block [n, m] (pcb_loops.c): the entries whose score may reach
    ``floor`` (per task; an upper bound of the score where the floor is positive, else its
    approximation, against a wide margin), and with ``ceiling`` those whose score is NaN; where a
    floor is not positive, with ``ceiling``, those within the margin of [floor, ceiling] or of their
    chunk's largest score, ``above`` ([n] int64) adding the others above the ceiling. Task-major in
    position order.
    ``tv``: the block's float32 task vectors, or the raw slices [base, model_0, ...] of
    :func:`raw_slices` (tau formed in the sweep: the same values). ``out``: four reusable flat
    buffers of at least n * m entries (int32, then three float32). Returns ([n] int64 counts, int32
    flat indices task * m + position, tau, the float32 arguments of exp and tanh that the eager
    engine computes for these entries), views of ``out``."""
    library = _loaded()
    raw = dtypes = None
    if isinstance(tv, torch.Tensor):
        tv = _task_rows(tv)
        n, m = tv.shape
        pointer, stride = tv.data_ptr(), tv.stride(0)
    else:
        if not raw_slices(tv):
            raise ValueError("pcb_candidates: raw slices must be float32, bfloat16 or float16 vectors of one length")
        n, m, pointer, stride = len(tv) - 1, tv[0].numel(), None, 0
        raw = (ctypes.c_void_p * (n + 1))(*(t.data_ptr() for t in tv))
        dtypes = (ctypes.c_int32 * (n + 1))(*(KERNEL_DTYPES[t.dtype] for t in tv))
    if n * m >= 1 << 31:
        raise ValueError(f"pcb_candidates: a block of {n} x {m} entries has more than 2^31")
    lo, hi, span, floor = (_column(v, torch.float32) for v in (lo, hi, span, floor))
    if ceiling is not None:
        ceiling = _column(ceiling, torch.float32)
    counts = torch.empty(n, dtype=torch.int64)
    flat, tau, exp_arg, tanh_arg = out
    total = library.pcb_candidates(pointer, n, m, stride, raw, dtypes, lo.data_ptr(), hi.data_ptr(), span.data_ptr(),
                                   float(n_tasks), int(normalized), floor.data_ptr(),
                                   None if ceiling is None else ceiling.data_ptr(),
                                   None if above is None else above.data_ptr(), counts.data_ptr(),
                                   flat.data_ptr(), tau.data_ptr(), exp_arg.data_ptr(), tanh_arg.data_ptr(),
                                   _threads(n * m))
    if total < 0:
        raise MemoryError(f"pcb_candidates: no scratch memory for a block of {n} tasks")
    return counts, flat[:total], tau[:total], exp_arg[:total], tanh_arg[:total]


def pcb_gather_tau(natives: list, counts, flat: torch.Tensor) -> torch.Tensor:
    """tau of a block's collected entries (``counts`` per task, task-major int32 ``flat`` indices task *
    m + position) from its raw slices [base, model_0, ...] (:func:`raw_slices`): the values the
    collection would have held (torch.sub's bits), a new float32 tensor."""
    library = _loaded()
    if not raw_slices(natives):
        raise ValueError("pcb_gather_tau: raw slices must be float32, bfloat16 or float16 vectors of one length")
    n, m = len(natives) - 1, natives[0].numel()
    offsets = torch.zeros(n + 1, dtype=torch.int64)
    torch.cumsum(torch.as_tensor(counts, dtype=torch.int64), 0, out=offsets[1:])
    if int(offsets[-1]) != flat.numel() or flat.dtype != torch.int32 or not flat.is_contiguous():
        raise ValueError("pcb_gather_tau: the counts must add up to the contiguous int32 indices")
    raw = (ctypes.c_void_p * (n + 1))(*(t.data_ptr() for t in natives))
    dtypes = (ctypes.c_int32 * (n + 1))(*(KERNEL_DTYPES[t.dtype] for t in natives))
    out = torch.empty(flat.numel())
    library.pcb_gather_tau(n, m, raw, dtypes, offsets.data_ptr(), flat.data_ptr(), out.data_ptr())
    return out


def pcb_bracket_counts(counts: torch.Tensor, score: torch.Tensor, floor, ceiling, above, at_ceiling, at_floor,
                       peak) -> list:
    """The exact scores of a block's bracket candidates (task-major, [n] ``counts``) around [floor,
    ceiling] ([n] each): adds to ``above``, ``at_ceiling``, ``at_floor`` ([n] int64) the scores >
    ceiling, == ceiling and == floor, raises ``peak`` ([n] float32) to their max, and returns each
    task's scores strictly inside, in order (new tensors)."""
    library = _loaded()
    n = counts.numel()
    floor, ceiling = _column(floor, torch.float32), _column(ceiling, torch.float32)
    inside, inside_counts = torch.empty(score.numel()), torch.empty(n, dtype=torch.int64)
    library.pcb_bracket_counts(n, counts.data_ptr(), score.data_ptr(), floor.data_ptr(), ceiling.data_ptr(),
                               above.data_ptr(), at_ceiling.data_ptr(), at_floor.data_ptr(), peak.data_ptr(),
                               inside.data_ptr(), inside_counts.data_ptr())
    return [part.clone() for part in inside[: int(inside_counts.sum())].split(inside_counts.tolist())]


def pcb_keep(counts: torch.Tensor, flat: torch.Tensor, score: torch.Tensor, tau: torch.Tensor, floor):
    """Keep, in place, the entries with ``score >= floor`` of their task (``counts``: [n] int64 entries per
    task, task-major; updated to the kept numbers). Returns (flat, score, tau) views of the kept."""
    library = _loaded()
    floor = _column(floor, torch.float32)
    total = library.pcb_keep(counts.numel(), counts.data_ptr(), flat.data_ptr(), score.data_ptr(), tau.data_ptr(),
                             floor.data_ptr())
    return flat[:total], score[:total], tau[:total]


def pcb_merge_entries(m: int, counts, flat, score, tau, t, keep_span, lo, hi, lam, out: torch.Tensor,
                      den: torch.Tensor) -> torch.Tensor:
    """PCB's merge (docs/design.md 2.2 steps 6-7) of a block of width ``m`` from its collected entries
    (``counts`` per task, task-major ``flat`` indices task * m + position, scores, tau), into ``out``
    [m]: the values of pcb.py's merge through core.engine.Entries, bit for bit. ``lam``: n weights or
    None; ``den``: [m] float32 scratch."""
    library = _loaded()
    n = len(counts)
    offsets = torch.zeros(n + 1, dtype=torch.int64)
    torch.cumsum(torch.as_tensor(counts, dtype=torch.int64), 0, out=offsets[1:])
    columns = [_column(v, torch.float32) for v in (t, keep_span, lo, hi)]
    lam = None if lam is None else _column(lam, torch.float32)
    library.pcb_merge_entries(n, m, offsets.data_ptr(), flat.data_ptr(), score.data_ptr(), tau.data_ptr(),
                              *(c.data_ptr() for c in columns), None if lam is None else lam.data_ptr(),
                              out.data_ptr(), den.data_ptr())
    return out


def pcb_approximations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(exp, tanh) of float32 ``x`` by the approximations of pcb_candidates' test (for the tests that
    bound their error against torch's)."""
    library = _loaded()
    x = x.to(torch.float32).contiguous()
    exp_out, tanh_out = torch.empty_like(x), torch.empty_like(x)
    library.pcb_approximations(x.numel(), x.data_ptr(), exp_out.data_ptr(), tanh_out.data_ptr())
    return exp_out, tanh_out


def pcb_score_bounds(e: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The upper bounds of exp(e) * tanh(w) that pcb_candidates tests at a positive floor (for the
    tests that check them against torch's exp and tanh)."""
    library = _loaded()
    e, w = (v.to(torch.float32).contiguous() for v in torch.broadcast_tensors(e, w))
    out = torch.empty_like(e)
    library.pcb_score_bounds(e.numel(), e.data_ptr(), w.data_ptr(), out.data_ptr())
    return out
