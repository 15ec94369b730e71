"""Task rows on the device and the loop over them that every kernel of pcb_fast runs.

``Rows`` describes n rows of m entries of one dtype without copying them: an anchor tensor (a
typed pointer) and, per task, the offset of its row from the anchor. The rows may be the rows of an
[n, D] matrix or n separate tensors (one merged key of n fine-tuned models). With a base row,
kernels form tau_i = theta_i - theta_pre in registers, so task vectors are never written.

Each program owns BLOCK columns and loops over the tasks (a loop, not an unrolled tile), so its
registers do not grow with the number of tasks; the base is read once per program and kept in
registers. Row starts are stored in units of ``align`` elements (the largest power of two up to 16
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
    offsets: torch.Tensor  # int64 [n], on the rows' device, in units of ``align`` elements
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
        offsets = torch.tensor([o // align for o in offsets], dtype=torch.int64).to(first.device)
        return cls(first, offsets, len(tensors), first.numel(), base, tensors, align)

    @classmethod
    def from_matrix(cls, matrix: torch.Tensor) -> "Rows":
        """Rows of an [n, D] tensor (contiguous along D)."""
        return cls.from_tensors(list(matrix))

    @property
    def device(self) -> torch.device:
        return self.anchor.device

    def dense(self) -> torch.Tensor:
        """The float32 [n, m] task vectors (rows minus the base), materialised: for the few steps
        that run as torch operations on the device."""
        rows = torch.stack([t.float() for t in self.tensors])
        return rows - self.base.float() if self.base is not None else rows


BLOCK = 1024  # columns per program: 8 per thread at 4 warps (two 128-bit loads of float32)


def programs(rows: Rows) -> int:
    """Number of programs (tiles of BLOCK columns) a pass over ``rows`` launches."""
    return triton.cdiv(rows.m, BLOCK)


def launch_config(rows: Rows, *tensors):
    """(grid, base pointer, meta-parameters) of a one-tile-per-program pass over ``rows``;
    checks that every tensor argument is on the rows' device."""
    for t in tensors:
        if t.device != rows.device:
            raise ValueError(f"a kernel argument is on {t.device} but the rows are on {rows.device}")
    base = rows.base if rows.base is not None else rows.anchor
    return (programs(rows),), base, dict(HAS_BASE=rows.base is not None, ALIGN=rows.align, BLOCK=BLOCK)


@triton.jit
def columns(m, BLOCK: tl.constexpr):
    """(cols, col_ok): this program's BLOCK column indices (int64) and which are inside the rows."""
    cols = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    return cols, cols < m


@triton.jit
def load_base(base_ptr, cols, col_ok, HAS_BASE: tl.constexpr, BLOCK: tl.constexpr):
    """The base's float32 [BLOCK] (zeros without a base), read once per program."""
    if HAS_BASE:
        base = tl.load(base_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
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
    big = (1.0 - e) / (1.0 + e)
    s = tl.minimum(a, 0.25)  # the series is used below 1/4 only; clamping keeps it finite elsewhere
    a2 = s * s
    # x - x^3/3 + 2x^5/15 - 17x^7/315 + 62x^9/2835 - 1382x^11/155925: error < 1e-9 relative below 1/4
    small = s * (1.0 + a2 * (-0.3333333333333333 + a2 * (0.13333333333333333 + a2 * (
        -0.05396825396825397 + a2 * (0.021869488536155203 + a2 * -0.008863235529902197)))))
    t = tl.where(a < 0.25, small, big)
    return tl.where(x < 0, -t, t)
