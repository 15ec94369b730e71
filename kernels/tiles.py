"""Task rows on the device and the [tasks, BLOCK] tile every kernel of pcb_fast loads.

``Rows`` describes n rows of m entries of one dtype without copying them: an anchor tensor (a
typed pointer) and, per task, the element offset of its row from the anchor. The rows may be the
rows of an [n, D] matrix or n separate tensors (one merged key of n fine-tuned models). With a
base row, kernels form tau_i = theta_i - theta_pre in registers, so task vectors are never written.
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
    """n rows of m entries: row i starts ``offsets[i]`` elements after ``anchor``'s first one."""

    anchor: torch.Tensor
    offsets: torch.Tensor  # int64 [n], on the rows' device
    n: int
    m: int
    base: torch.Tensor | None = None  # [m]: rows hold fine-tuned weights, tau = row - base
    tensors: list = field(default_factory=list)  # the row tensors (held, so the offsets stay valid)

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
        offsets = torch.tensor(offsets, dtype=torch.int64).to(first.device)
        return cls(first, offsets, len(tensors), first.numel(), base, tensors)

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


def tile_shape(n: int) -> tuple[int, int]:
    """(NT, BLOCK): tasks padded to a power of two, and entries per task in a tile of ~8K values."""
    nt = triton.next_power_of_2(n)
    return nt, max(64, min(2048, 8192 // nt))


def launch_config(rows: Rows, *tensors):
    """(grid, base pointer, meta-parameters) of a one-tile-per-program pass over ``rows``;
    checks that every tensor argument is on the rows' device."""
    for t in tensors:
        if t.device != rows.device:
            raise ValueError(f"a kernel argument is on {t.device} but the rows are on {rows.device}")
    nt, block = tile_shape(rows.n)
    base = rows.base if rows.base is not None else rows.anchor
    return (triton.cdiv(rows.m, block),), base, dict(HAS_BASE=rows.base is not None, NT=nt, BLOCK=block)


@triton.jit
def load_tau(x_ptr, offsets_ptr, base_ptr, n, m, HAS_BASE: tl.constexpr, NT: tl.constexpr, BLOCK: tl.constexpr):
    """The float32 [NT, BLOCK] tile of task vectors of this program, zero outside the rows.

    Returns (tau, valid, rows, row_ok, cols, col_ok); offsets are 64-bit.
    """
    rows = tl.arange(0, NT)
    row_ok = rows < n
    cols = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    col_ok = cols < m
    starts = tl.load(offsets_ptr + rows, mask=row_ok, other=0)
    valid = row_ok[:, None] & col_ok[None, :]
    tau = tl.load(x_ptr + starts[:, None] + cols[None, :], mask=valid, other=0.0).to(tl.float32)
    if HAS_BASE:
        base = tl.load(base_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        tau = tl.where(valid, tau - base[None, :], 0.0)
    return tau, valid, rows, row_ok, cols, col_ok


@triton.jit
def flag_bad(tau, valid, rows, row_ok, bad_ptr):
    """bad[i] = 1 if task i has a NaN or Inf in the tile."""
    magnitude = tl.abs(tau)
    bad = valid & ((magnitude != magnitude) | (magnitude == float("inf")))
    tl.atomic_max(bad_ptr + rows, tl.max(bad.to(tl.int32), axis=1), mask=row_ok, sem="relaxed")


@triton.jit
def row_of(tile, rows, i):
    """Row ``i`` of a [NT, BLOCK] tile as a [BLOCK] vector (a masked sum: exact, one term)."""
    return tl.sum(tl.where(rows[:, None] == i, tile, 0.0), axis=0)


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
