"""A small C kernel for the fused CPU path: per-row order statistics of |tau| (row_select.c).

Breadcrumbs places its band by two order statistics of every row; torch has no per-row select
cheaper than a partial top-k over (value, index) pairs, which cost it most of its time. The kernel
is compiled on first use with the system C compiler ($CC, else cc, gcc or clang), cached on disk
(``$PCB_FAST_CACHE`` or ~/.cache/pcb_fast, keyed by source, compiler, flags and CPU) and called
through ctypes; it splits the rows over OpenMP threads, in torch's own OpenMP team.
:func:`problem` says why it is unavailable; callers then use the torch formulation.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

# compiled together into one library: per-row order statistics (Breadcrumbs) and DARE's keep masks
SOURCES = (Path(__file__).with_name("row_select.c"), Path(__file__).with_name("dare_hash.c"))
# Tried in order: a compiler may refuse -march=native or lack OpenMP (the kernel then runs on one thread).
FLAG_SETS = (["-O3", "-march=native", "-fopenmp"], ["-O3", "-fopenmp"], ["-O3"])
MIN_ROWS_PER_THREAD = 16  # fewer rows per thread than this: fewer threads, waking one costs more


def _compiler() -> str | None:
    found = (shutil.which(name) for name in (os.environ.get("CC"), "cc", "gcc", "clang") if name)
    return next((path for path in found if path), None)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next((line for line in f if line.startswith("model name")), platform.processor())
    except OSError:
        return platform.processor()


def _cache_dir() -> Path:
    return Path(os.environ.get("PCB_FAST_CACHE") or Path.home() / ".cache" / "pcb_fast")


def _build(compiler: str, flags: list[str]) -> Path:
    """The shared library for these flags, compiled unless cached; raises on a compiler error."""
    source = b"\0".join(path.read_bytes() for path in SOURCES)
    key = hashlib.sha256(b"\0".join([source, compiler.encode(), " ".join(flags).encode(),
                                     platform.machine().encode(), _cpu_name().encode()])).hexdigest()[:16]
    target = _cache_dir() / f"row_select-{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        # Built under a temporary name and renamed: processes compiling at once never load half a file.
        fd, partial = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            subprocess.run([compiler, *flags, "-shared", "-fPIC", "-o", partial, *map(str, SOURCES)],
                           check=True, capture_output=True, text=True)
            os.replace(partial, target)
        finally:
            if os.path.exists(partial):
                os.remove(partial)
    return target


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
        except OSError as e:
            errors.append([str(e)])
    else:
        return f"{compiler} could not build {', '.join(path.name for path in SOURCES)}: {errors[-1][0]}"
    function = library.row_order_statistics
    function.restype = ctypes.c_int
    function.argtypes = [ctypes.c_void_p] + [ctypes.c_int64] * 6 + [ctypes.c_void_p] * 2 + [ctypes.c_int]
    function = library.dare_keep_masks
    function.restype = None
    function.argtypes = [ctypes.c_int64] * 3 + [ctypes.c_void_p] * 4 + [ctypes.c_int]
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
    library = _library()
    if isinstance(library, str):
        raise RuntimeError(f"pcb_fast native kernel unavailable: {library}")
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
    library = _library()
    if isinstance(library, str):
        raise RuntimeError(f"pcb_fast native kernel unavailable: {library}")
    n = len(streams)
    out = torch.empty(n, m, dtype=torch.bool)
    if out.numel():
        arrays = [torch.tensor(values, dtype=torch.int64).to(torch.int32) for values in (streams, highs, thresholds)]
        library.dare_keep_masks(lo, m, n, *(a.data_ptr() for a in arrays), out.data_ptr(),
                                max(1, min(torch.get_num_threads(), n * m // 16384)))
    return out
