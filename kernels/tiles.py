"""Task rows on the device and the loop over them that every kernel of pcb_fast runs.

``Rows`` describes n rows of m entries of one dtype without copying them: an anchor tensor (a
typed pointer) and, per task, the offset of its row from the anchor. The rows may be the rows of an
[n, D] matrix or n separate tensors (one merged key of n fine-tuned models). With a base row,
kernels form tau_i = theta_i - theta_pre in registers, so task vectors are never written.

Each program owns BLOCK columns of one part and loops over the tasks (a loop, not an unrolled tile),
so its registers do not grow with the number of tasks; the base is read once per program and kept
in registers. ``Segments`` puts every part (merged key) of a scope group into one launch per pass
(two: full tiles, and the parts' partial last tiles) through a table on the device. Row starts are stored in units of ``align`` elements (the largest power of two up to 16
bytes that divides every offset), so the compiler knows their alignment and loads rows with
128-bit vector loads.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)  # math is float32
MAX_TASKS = 64


@dataclass
class Rows:
    """n rows of m entries: row i starts ``offsets[i] * align`` elements after ``anchor``'s first one."""

    anchor: torch.Tensor
    offsets: list  # n ints, in units of ``align`` elements (host side: Segments builds the device table)
    n: int
    m: int
    base: torch.Tensor | None = None  # [m]: rows hold fine-tuned weights, tau = row - base
    tensors: list = field(default_factory=list)  # the row tensors (held, so the offsets stay valid)
    align: int = 1  # elements: a power of two dividing every row's offset (at most 16 bytes)

    @classmethod
    def from_tensors(cls, tensors, base: torch.Tensor | None = None) -> "Rows":
        """Rows from n tensors of one shape, dtype and device (each made contiguous, flattened)."""
        tensors = [t.contiguous().reshape(-1) for t in tensors]
        first = tensors[0]
        for i, t in enumerate(tensors):
            if t.dtype not in FLOAT_DTYPES:
                raise ValueError(f"row {i} has dtype {t.dtype}; kernels take {', '.join(map(str, FLOAT_DTYPES))}")
            if t.dtype != first.dtype or t.device != first.device or t.numel() != first.numel():
                raise ValueError(
                    f"row {i} is {t.dtype} [{t.numel()}] on {t.device} but row 0 is "
                    f"{first.dtype} [{first.numel()}] on {first.device}; rows must match"
                )
        if not 1 <= len(tensors) <= MAX_TASKS:
            raise ValueError(f"{len(tensors)} rows; kernels take 1 to {MAX_TASKS}")
        size = first.element_size()
        offsets = [(t.data_ptr() - first.data_ptr()) // size for t in tensors]
        if base is not None:
            base = base.contiguous().reshape(-1)
            if base.numel() != first.numel() or base.device != first.device or base.dtype not in FLOAT_DTYPES:
                raise ValueError(f"base is {base.dtype} [{base.numel()}] on {base.device}; rows are [{first.numel()}] on {first.device}")
        align = max(1, 16 // size)
        while align > 1 and any(o % align for o in offsets):
            align //= 2
        return cls(first, [o // align for o in offsets], len(tensors), first.numel(), base, tensors, align)

    @classmethod
    def from_matrix(cls, matrix: torch.Tensor) -> "Rows":
        """Rows of an [n, D] tensor (contiguous along D)."""
        return cls.from_tensors(list(matrix))

    @property
    def device(self) -> torch.device:
        return self.anchor.device


def to_device(host: torch.Tensor, device) -> torch.Tensor:
    """A small tensor built on the host, on ``device``. On CUDA it is copied from pinned memory without
    blocking: a copy from pageable memory first waits for all the work queued on the stream, a host
    synchronisation per table. (The pinned buffer is held by torch's host allocator until the copy ends.)"""
    device = torch.device(device)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def on_device(data, dtype: torch.dtype, device) -> torch.Tensor:
    """``torch.tensor(data, dtype=dtype)`` on ``device``, copied as :func:`to_device` does."""
    return to_device(torch.tensor(data, dtype=dtype), device)


BLOCK = 1024  # columns per program: 8 per thread at 4 warps (two 128-bit loads of float32)
TAIL_WARPS = 16  # warps of a last-tiles launch, unless the kernel's launcher says otherwise (see warps)


def programs(rows: Rows) -> int:
    """Number of programs (tiles of BLOCK columns) a pass over ``rows`` launches."""
    return triton.cdiv(rows.m, BLOCK)


def _alignment(offsets, size: int) -> int:
    """The largest power of two up to 16 bytes (in elements of ``size`` bytes) dividing every offset."""
    align = max(1, 16 // size)
    while align > 1 and any(o % align for o in offsets):
        align //= 2
    return align


class Segments:
    """Parts (merged keys) of one scope group as one launch per pass: every row, base and output is
    addressed from one anchor tensor each (element offsets), and a table on the device gives each
    part's first tile, length, base and output offsets, index in the group and row offsets. Programs
    are listed as (part, tile in part): one launch for the full tiles (no mask: vector loads even
    where a length is not a multiple of 16) and one for the parts' last, partial tiles. Tiles are
    numbered in position order from ``first_tile`` (TIES' exact top-k and the partition partials rely
    on it). Parts must share the rows', base's and output's dtypes and device (see :func:`segment`)."""

    def __init__(self, parts: list, outs: list | None = None, indices: list | None = None, first_tile: int = 0,
                 per_part: bool = False):
        first = parts[0]
        self.parts, self.outs, self.n = parts, outs, first.n
        self.per_part = per_part  # each part's statistics apart (scope "tensor": its index is its group)
        self.anchor = first.anchor
        self.has_base = first.base is not None
        self.base_anchor = first.base if self.has_base else first.anchor
        self.out_anchor = outs[0].view(-1) if outs is not None else self.anchor
        size = self.anchor.element_size()
        rows = [[(t.data_ptr() - self.anchor.data_ptr()) // size for t in p.tensors] for p in parts]
        bases = [((p.base.data_ptr() - self.base_anchor.data_ptr()) // self.base_anchor.element_size())
                 if self.has_base else 0 for p in parts]
        out_list = [o.view(-1) for o in outs] if outs is not None else []
        for p, o in zip(parts, out_list):
            if o.numel() != p.m:
                raise ValueError(f"output has {o.numel()} entries but the rows have {p.m}")
        out_offsets = [(o.data_ptr() - self.out_anchor.data_ptr()) // self.out_anchor.element_size() for o in out_list]
        out_offsets += [0] * (len(parts) - len(out_offsets))
        self.align = _alignment([o for r in rows for o in r], size)
        self.base_align = _alignment(bases, self.base_anchor.element_size())
        self.out_align = _alignment(out_offsets, self.out_anchor.element_size())
        indices = indices if indices is not None else list(range(len(parts)))
        table, tail, tile = [], [], first_tile
        for k, p in enumerate(parts):
            tiles = programs(p)
            table.append([tile, p.m, bases[k] // self.base_align, out_offsets[k] // self.out_align, indices[k]]
                         + [o // self.align for o in rows[k]])
            tail += [(k, tiles - 1)] if p.m % BLOCK else []
            tile += tiles
        self.first_tile, self.tiles = first_tile, tile - first_tile
        device = self.anchor.device
        self.table = on_device(table, torch.int64, device)
        # (part, tile in part) of every full tile, in position order, built without a Python loop per
        # tile (an LLM's part holds millions of tiles)
        counts = torch.tensor([p.m // BLOCK for p in parts], dtype=torch.int64)
        part = torch.repeat_interleave(torch.arange(len(parts)), counts)
        starts = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        full = torch.stack([part, torch.arange(part.numel()) - starts], 1)
        self.launches = [(to_device(listed.contiguous(), device), is_full) for listed, is_full in
                         ((full, True), (torch.tensor(tail, dtype=torch.int64).view(-1, 2), False)) if len(listed)]

    @property
    def device(self) -> torch.device:
        return self.anchor.device

    def check(self, *tensors) -> None:
        for t in tensors:
            if t.device != self.device:
                raise ValueError(f"a kernel argument is on {t.device} but the rows are on {self.device}")

    def launch(self, kernel, *args, tail_warps: int = TAIL_WARPS, tiles_per_program: int | None = None,
               **kwargs) -> None:
        """Run ``kernel(x, base, table, programs, n, *args)`` over every tile, with the tiling meta-parameters.
        ``tiles_per_program``: a program takes that many consecutive listed tiles (the kernel's
        ``count`` and ``TILES`` arguments get the listed tiles and it)."""
        meta = dict(HAS_BASE=self.has_base, ALIGN=self.align, BASE_ALIGN=self.base_align, BLOCK=BLOCK)
        for listed, full in self.launches:
            grid, extra = listed.shape[0], {}
            if tiles_per_program is not None:
                grid = triton.cdiv(listed.shape[0], tiles_per_program)
                extra = dict(count=listed.shape[0], TILES=tiles_per_program)
            kernel[(grid,)](self.anchor, self.base_anchor, self.table, listed, self.n, *args, FULL=full,
                            num_warps=warps(full, tail_warps), **meta, **kwargs, **extra)


def warps(full: bool, tail_warps: int = TAIL_WARPS) -> int:
    """Warps per program. Full tiles: 4 (8 entries per thread, two 128-bit loads of float32). Last
    tiles load element by element (a mask at an unknown length), with a 64-bit address per entry, so
    they take more warps and fewer entries per thread: 16, or 8 for the |tau| counting pass. Chosen
    from benchmarks/kernel_report.py on triton 3.6 and 3.9: ptxas aims at 64 registers per thread at
    8 or more warps and spilled a few bytes in the merge passes at 8 (and at 4) and in the |tau|
    bracket pass at 16."""
    return 4 if full else tail_warps


def segment(parts: list, outs: list | None = None, first_tile: int = 0, per_part: bool = False,
            indices: list | None = None) -> list:
    """Segments covering ``parts`` (in order, tiles numbered in position order from ``first_tile``):
    one per run of parts that share dtypes and whose tensors lie a whole number of elements apart
    (always, for separate allocations; rows from odd views of one buffer may not). ``per_part``:
    every part's statistics apart (scope "tensor"), the part's index in ``indices`` (default its
    place in ``parts``) being its group."""
    indices = list(range(len(parts))) if indices is None else list(indices)
    out, start = [], 0
    tile = first_tile

    def key(k):
        p = parts[k]
        return (p.anchor.dtype, p.base.dtype if p.base is not None else None, outs[k].dtype if outs else None,
                p.device)

    def fits(k, anchor_k):
        p, a = parts[k], parts[anchor_k]
        pairs = [(t, a.anchor) for t in p.tensors] + ([(p.base, a.base)] if p.base is not None else [])
        pairs += [(outs[k], outs[anchor_k])] if outs else []
        return all((x.data_ptr() - y.data_ptr()) % x.element_size() == 0 for x, y in pairs)

    for k in range(1, len(parts) + 1):
        if k == len(parts) or key(k) != key(start) or not fits(k, start):
            chunk = Segments(parts[start:k], outs[start:k] if outs else None, indices[start:k], tile, per_part)
            tile += chunk.tiles
            out.append(chunk)
            start = k
    return out


def as_segments(rows, out: torch.Tensor | None = None) -> Segments:
    """A single part (Rows) as Segments; Segments pass through."""
    if isinstance(rows, Segments):
        return rows
    return Segments([rows], [out] if out is not None else None)


@triton.jit
def locate(table_ptr, programs_ptr, n, FULL: tl.constexpr, BLOCK: tl.constexpr):
    """This program's place: (cols, col_ok, offsets_ptr, base_off, out_off, tile, part) where cols are the
    column indices inside its part (int64), offsets_ptr its part's row offsets, tile its global tile
    number and part its index in the scope group."""
    pid = tl.program_id(0).to(tl.int64)  # 64-bit: every offset below derives from it
    return locate_at(table_ptr, programs_ptr, pid, n, FULL, BLOCK)


@triton.jit
def locate_at(table_ptr, programs_ptr, index, n, FULL: tl.constexpr, BLOCK: tl.constexpr):
    """:func:`locate` for the ``index``-th listed tile (int64) of a launch."""
    part = tl.load(programs_ptr + 2 * index)
    local = tl.load(programs_ptr + 2 * index + 1)
    entry = table_ptr + part * (5 + n)
    cols = local * BLOCK + tl.arange(0, BLOCK)
    if FULL:
        col_ok = tl.full([BLOCK], 1, tl.int1)  # a constant mask: the loads vectorise whatever the length
    else:
        col_ok = cols < tl.load(entry + 1)
    return cols, col_ok, entry + 5, tl.load(entry + 2), tl.load(entry + 3), tl.load(entry) + local, tl.load(entry + 4)


@triton.jit
def load_base(base_ptr, base_off, cols, col_ok, HAS_BASE: tl.constexpr, BASE_ALIGN: tl.constexpr,
              BLOCK: tl.constexpr):
    """The base's float32 [BLOCK] (zeros without a base), read once per program."""
    if HAS_BASE:
        base = tl.load(base_ptr + base_off * BASE_ALIGN + cols, mask=col_ok, other=0.0).to(tl.float32)
    else:
        base = tl.zeros([BLOCK], dtype=tl.float32)
    return base


@triton.jit
def load_row(x_ptr, offsets_ptr, base, i, cols, col_ok, HAS_BASE: tl.constexpr, ALIGN: tl.constexpr):
    """tau_i over this program's columns, float32 [BLOCK], zero outside the rows."""
    start = tl.load(offsets_ptr + i) * ALIGN  # a multiple of ALIGN: the loads vectorise
    x = tl.load(x_ptr + start + cols, mask=col_ok, other=0.0).to(tl.float32)
    if HAS_BASE:
        x = tl.where(col_ok, x - base, 0.0)
    return x


@triton.jit
def theta(tau_m, base, base_ptr, base_off, cols, col_ok, lam, out_ptr, HAS_BASE: tl.constexpr,
          BASE_ALIGN: tl.constexpr):
    """theta_pre + lam * tau_m (tau_m alone without a base), as the CPU path forms it: lam * tau_m in
    float32, added to the base in float32, or, for a float64 output, to the base read again in float64
    (pcb_fast.core.formulas.merged_weights: float64 base values are never rounded to float32)."""
    if HAS_BASE:
        scaled = lam * tau_m
        if out_ptr.dtype.element_ty == tl.float64:
            wide = tl.load(base_ptr + base_off * BASE_ALIGN + cols, mask=col_ok, other=0.0).to(tl.float64)
            tau_m = wide + scaled.to(tl.float64)
        else:
            tau_m = base + scaled
    return tau_m


@triton.jit
def to_output(value, out_ptr):
    """``value`` in the output's dtype, rounded to nearest even as torch's ``.to`` does. A bf16 output is
    rounded in integer arithmetic: the GPU's conversion rounds to nearest even, but Triton's
    interpreter truncates (measured on triton 3.9: half of all values one bf16 ulp off), so the
    interpreted tests would otherwise see other bits than the device computes."""
    if out_ptr.dtype.element_ty == tl.bfloat16:
        wide = value.to(tl.float32)
        bits = wide.to(tl.uint32, bitcast=True)
        nearest = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        out = tl.where(wide != wide, wide.to(tl.bfloat16), nearest)  # NaN stays NaN (the carry could wrap it)
    else:
        out = value.to(out_ptr.dtype.element_ty)
    return out


@triton.jit
def store_out(out_ptr, out_off, cols, col_ok, value, OUT_ALIGN: tl.constexpr):
    """Write ``value`` (cast to the output's dtype) at this program's columns of its part's output."""
    tl.store(out_ptr + out_off * OUT_ALIGN + cols, to_output(value, out_ptr), mask=col_ok)


@triton.jit
def flag_bad(tau, col_ok, i, bad_ptr):
    """bad[i] = 1 if task i has a NaN or Inf in this program's columns."""
    magnitude = tl.abs(tau)
    bad = col_ok & ((magnitude != magnitude) | (magnitude == float("inf")))
    tl.atomic_max(bad_ptr + i, tl.max(bad.to(tl.int32), axis=0), sem="relaxed")


@triton.jit
def sign(x):
    return tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, 0.0))


@triton.jit
def tanh(x):
    """tanh in float32 to a few ulp: an odd Taylor series below 1/4 (where 1 - e^-2x would cancel),
    (1 - e^-2x) / (1 + e^-2x) above. (libdevice's tanh does not run under the interpreter.)"""
    a = tl.abs(x)
    e = tl.exp(-2.0 * a)
    big = tl.math.div_rn(1.0 - e, 1.0 + e)
    s = tl.minimum(a, 0.25)  # the series is used below 1/4 only; clamping keeps it finite elsewhere
    a2 = s * s
    # x - x^3/3 + 2x^5/15 - 17x^7/315 + 62x^9/2835 - 1382x^11/155925: error < 1e-9 relative below 1/4
    small = s * (1.0 + a2 * (-0.3333333333333333 + a2 * (0.13333333333333333 + a2 * (
        -0.05396825396825397 + a2 * (0.021869488536155203 + a2 * -0.008863235529902197)))))
    t = tl.where(a < 0.25, small, big)
    return tl.where(x < 0, -t, t)


@triton.jit
def sample_kernel(x_ptr, base_ptr, table_ptr, plan_ptr, n, out_ptr, columns, HAS_BASE: tl.constexpr,
                  ALIGN: tl.constexpr, BASE_ALIGN: tl.constexpr, BLOCK: tl.constexpr):
    """Program p copies tau at columns first + k stride (k < count) of one part, plan[p] = (part, first,
    stride, count, at), into out[i, at + k] for every task i (out: [n, columns] float32)."""
    pid = tl.program_id(0).to(tl.int64)  # 64-bit: every offset below derives from it
    part = tl.load(plan_ptr + 5 * pid)
    first = tl.load(plan_ptr + 5 * pid + 1)
    stride = tl.load(plan_ptr + 5 * pid + 2)
    count = tl.load(plan_ptr + 5 * pid + 3)
    at = tl.load(plan_ptr + 5 * pid + 4)
    k = tl.arange(0, BLOCK)
    ok = k < count
    cols = first + k.to(tl.int64) * stride
    entry = table_ptr + part * (5 + n)
    if HAS_BASE:
        base = tl.load(base_ptr + tl.load(entry + 2) * BASE_ALIGN + cols, mask=ok, other=0.0).to(tl.float32)
    for i in range(n):
        x = tl.load(x_ptr + tl.load(entry + 5 + i) * ALIGN + cols, mask=ok, other=0.0).to(tl.float32)
        if HAS_BASE:
            x = x - base  # tau as the torch form computes it: both rounded to float32, then subtracted
        tl.store(out_ptr + tl.cast(i, tl.int64) * columns + at + k, x, mask=ok)  # n x columns can pass 2^31


SAMPLE_BLOCK = 1024  # sampled columns per program


def sample_columns(segments: list, picks: list, n: int, device) -> torch.Tensor:
    """[n, S] float32 task-vector columns of the parts of ``segments`` (in order), in one launch per
    Segments: picks[k] = (first, stride, count) of the k-th part (columns first + j stride, j < count),
    laid side by side in part order (S = the sum of the counts)."""
    total = sum(count for _, _, count in picks)
    out = torch.empty(n, total, device=device)
    k, at = 0, 0
    for seg in segments:
        plan = []
        for local in range(len(seg.parts)):
            first, stride, count = picks[k]
            for chunk in range(0, count, SAMPLE_BLOCK):
                plan.append([local, first + chunk * stride, stride, min(SAMPLE_BLOCK, count - chunk), at + chunk])
            at += count
            k += 1
        if plan:
            table = on_device(plan, torch.int64, device)
            sample_kernel[(len(plan),)](seg.anchor, seg.base_anchor, seg.table, table, n, out, total,
                                        HAS_BASE=seg.has_base, ALIGN=seg.align, BASE_ALIGN=seg.base_align,
                                        BLOCK=SAMPLE_BLOCK)
    return out
