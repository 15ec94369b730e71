"""The torch backend: PCB's block functions as in-place torch ops on reusable buffers.

Each function repeats, for one [n, m] block, the exact op sequence of the reference path
(pcb_fast.reference), so the results agree bit for bit; working in place on buffers that stay in
cache is what makes this eager path fast (no [n, D] temporaries, no page faults per op).
Sums over tasks run in task order, as in the reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.formulas import EXACT_EXP_MAX_N, span_or_inf


@dataclass
class ClipStats:
    """Per-task clip bounds of |tau| (docs/design.md 2.2 step 1), as [n, 1] float32 columns."""

    lo: torch.Tensor  # min(lo, hi): torch.clamp with lo > hi clamps everything to hi
    hi: torch.Tensor
    span: torch.Tensor  # hi - lo, with 0 replaced by inf so a constant row normalises to 0

    @classmethod
    def from_bounds(cls, lo: torch.Tensor, hi: torch.Tensor) -> "ClipStats":
        """From the order statistics: [n] (one pair per task), or [n, k] (per task and tensor of a pack)."""
        lo = torch.minimum(lo, hi).reshape(lo.shape[0], -1).float()
        hi = hi.reshape(lo.shape[0], -1).float()
        return cls(lo, hi, span_or_inf(hi - lo))

    def columns(self, index: torch.Tensor) -> "ClipStats":
        """The statistics of [n, k] per-tensor bounds broadcast to entries (``index``: each entry's column)."""
        return ClipStats(self.lo[:, index], self.hi[:, index], self.span[:, index])


class Workspace:
    """Reusable float32 buffers, handed out as contiguous [n, m] views for a block of width m."""

    def __init__(self, n: int, width: int, count: int):
        self.n = n
        self._buffers = [torch.empty(n * width) for _ in range(count)]
        self._row = torch.empty(width)

    def get(self, m: int) -> list[torch.Tensor]:
        return [b[: self.n * m].view(self.n, m) for b in self._buffers]

    def row(self, m: int) -> torch.Tensor:
        return self._row[:m]


def sum_rows_into(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out = x[0] + x[1] + ... in task order (the reference's rounding order)."""
    out.copy_(x[0])
    for row in x[1:]:
        out.add_(row)
    return out


def normalized_magnitude(tv: torch.Tensor, clip: ClipStats, out: torch.Tensor) -> torch.Tensor:
    """N = (clip(|tau|, lo, hi) - lo) / (hi - lo), written into ``out``."""
    torch.abs(tv, out=out)
    return out.clamp_(clip.lo, clip.hi).sub_(clip.lo).div_(clip.span)


def clipped_values(tau: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """sign(tau) * clip(|tau|, lo, hi) for gathered entries (lo, hi broadcast per entry)."""
    return torch.sign(tau) * torch.clamp(tau.abs(), lo, hi)


def official_scores(tv: torch.Tensor, clip: ClipStats, inter: str, ws: Workspace) -> torch.Tensor:
    """P = exp(n N^2) * inter for a [n, m] block (docs/design.md 2.2 steps 2-5); returns a workspace view."""
    n, m = tv.shape
    score, work, extra = ws.get(m)[:3]
    normalized = normalized_magnitude(tv, clip, score)
    if inter != "sum":
        signed = torch.sign(tv, out=extra).mul_(normalized)  # N-hat = sign(tau) * N
    # intra = exp(n * N^2), shifted by -n for large n (docs/design.md 2.4)
    intra = normalized.mul_(normalized).mul_(n)
    if n > EXACT_EXP_MAX_N:
        intra.sub_(n)
    intra.exp_()
    if inter == "sum":
        total = sum_rows_into(tv, ws.row(m))
        torch.mul(tv, total, out=work).tanh_()
    elif inter == "normalized_sum":
        total = sum_rows_into(signed, ws.row(m))
        torch.mul(tv, total, out=work).tanh_()
    else:  # pairwise: sum_j tanh(N-hat_i * N-hat_j), in j order
        term = ws.get(m)[3]
        torch.mul(signed, signed[0], out=work).tanh_()
        for j in range(1, n):
            work.add_(torch.mul(signed, signed[j], out=term).tanh_())
    return intra.mul_(work)


@dataclass
class PairStats:
    """Paper-variant statistics: per pair (i, j), min and span of tau_i * tau_j, the max of its
    normalised value (1, or 0 for a constant pair), and the softmax partition sums (docs/design.md 2.3)."""

    lo: torch.Tensor  # [n, n]
    span: torch.Tensor  # [n, n], 0 replaced by inf so a constant pair normalises to 0
    peak: torch.Tensor  # [n, n]
    inv_z_inter: torch.Tensor | None = None  # [n, n] 1 / sum_d exp(N_ij - peak_ij)
    inv_z_intra: torch.Tensor | None = None  # [n] 1 / sum_d exp(n N_ii - n peak_ii)

    @classmethod
    def from_min_max(cls, lo: torch.Tensor, hi: torch.Tensor) -> "PairStats":
        span = hi - lo
        peak = (span > 0).float()
        return cls(lo, span_or_inf(span), peak)


def pair_normalized(tv: torch.Tensor, i: int, stats: PairStats, out: torch.Tensor) -> torch.Tensor:
    """Row j of ``out`` = Norm(tau_i * tau_j) for the block, [n, m]."""
    torch.mul(tv, tv[i], out=out)
    return out.sub_(stats.lo[i].unsqueeze(1)).div_(stats.span[i].unsqueeze(1))


def intra_numerator(normalized_ii: torch.Tensor, n: int, peak_ii: float, out: torch.Tensor) -> torch.Tensor:
    """exp(n * N_ii - n * peak_ii): the intra softmax before division by its partition sum."""
    return torch.mul(normalized_ii, n, out=out).sub_(n * peak_ii).exp_()


def paper_scores(tv: torch.Tensor, stats: PairStats, ws: Workspace) -> torch.Tensor:
    """beta_i = Softmax(n Norm(tau_i^2)) * sum_j Softmax(Norm(tau_i tau_j)) for a block (docs/design.md 2.3)."""
    n, m = tv.shape
    beta, terms = ws.get(m)[:2]
    intra = ws.row(m)
    for i in range(n):
        normalized = pair_normalized(tv, i, stats, terms)
        peak_ii = float(stats.peak[i, i])
        intra_numerator(normalized[i], n, peak_ii, intra).mul_(stats.inv_z_intra[i])
        terms.sub_(stats.peak[i].unsqueeze(1)).exp_().mul_(stats.inv_z_inter[i].unsqueeze(1))
        sum_rows_into(terms, beta[i]).mul_(intra)
    return beta
