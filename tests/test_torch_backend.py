"""The streaming torch backend against the reference: bit for bit (official), within tolerance (paper)."""

import itertools

import pytest
import torch

import pcb_fast.core.engine as engine
from pcb_fast import pcb_merge
from pcb_fast.core.formulas import keep_index
from pcb_fast.reference import paper_scores, pcb_official, pcb_paper

GRID = list(itertools.product((1, 2, 3, 8), (1, 2, 17, 9999, 10000, 100003)))


@pytest.mark.parametrize("n,D", GRID)
def test_official_bit_exact(n, D):
    g = torch.Generator().manual_seed(n * 7919 + D)
    tv = torch.randn(n, D, generator=g) * 1e-3
    for ratio, a, inter in itertools.product((0.05, 0.1, 1.0), (1e-4, 0.01), ("sum", "normalized_sum", "pairwise")):
        expected = pcb_official(tv, ratio=ratio, clamp_ratio=a, inter=inter)
        got = pcb_merge(tv, ratio=ratio, clamp_ratio=a, inter=inter, backend="torch", block_width=4096)
        assert torch.equal(got, expected), (ratio, a, inter, int((got != expected).sum()))


@pytest.mark.parametrize("width", [1, 7, 256, 1000, 1 << 17])
def test_block_width_does_not_change_result(width):
    g = torch.Generator().manual_seed(3)
    tv = torch.randn(4, 3001, generator=g)
    expected = pcb_official(tv, ratio=0.2, clamp_ratio=0.2)  # clamp 0.2: the two-pass radix clip
    assert torch.equal(pcb_merge(tv, ratio=0.2, clamp_ratio=0.2, block_width=width), expected)


def test_heavy_ties_and_signed_zeros():
    # Quantised task vectors: many equal magnitudes, exact zeros, and -0.0.
    g = torch.Generator().manual_seed(5)
    tv = torch.randint(-3, 4, (3, 5000), generator=g).float() * 0.25
    tv[1, ::7] = -0.0
    tv[2] = 0.0
    for ratio, a in itertools.product((0.1, 0.5, 1.0), (0.0, 1e-4, 0.1, 0.3)):
        assert torch.equal(pcb_merge(tv, ratio=ratio, clamp_ratio=a, block_width=777),
                           pcb_official(tv, ratio=ratio, clamp_ratio=a)), (ratio, a)


def test_lambdas_and_input_forms_bit_exact():
    g = torch.Generator().manual_seed(11)
    tv = torch.randn(3, 20000, generator=g)
    lambdas = [0.8, 1.3, 1.1]
    expected = pcb_official(tv, lambdas=lambdas)
    assert torch.equal(pcb_merge(tv, lambdas=lambdas), expected)
    assert torch.equal(pcb_merge(list(tv), lambdas=torch.tensor(lambdas)), expected)  # list of 1-D tensors
    assert torch.equal(pcb_merge(tv.t().contiguous().t(), lambdas=lambdas), expected)  # column-major storage


def test_large_n_without_overflow():
    g = torch.Generator().manual_seed(2)
    tv = torch.randn(100, 3000, generator=g)
    got = pcb_merge(tv, ratio=0.1)
    assert torch.isfinite(got).all()
    assert torch.equal(got, pcb_official(tv, ratio=0.1))


def test_sampled_floor_that_misses_falls_back_to_exact_select(monkeypatch):
    # A floor above the threshold for every task: the engine must notice and redo level 1 exactly.
    g = torch.Generator().manual_seed(8)
    tv = torch.randn(4, 200000, generator=g) * 1e-3
    calls = []

    def wrong_bounds(sample_scores, rank, D):
        calls.append(rank)
        inf = torch.full((sample_scores.shape[0],), float("inf"))
        return inf, inf

    monkeypatch.setattr(engine, "bounds_from_sample", wrong_bounds)
    assert torch.equal(pcb_merge(tv), pcb_official(tv))
    assert calls, "the sampled floor was not used"


def test_report_counts_kept_entries():
    g = torch.Generator().manual_seed(4)
    tv = torch.randn(3, 10000, generator=g)
    report = {}
    pcb_merge(tv, ratio=0.1, report=report)
    # Continuous random scores: exactly D - 1 - int(D * 0.9) entries lie above t.
    assert report == {"kept": [999] * 3, "entries": 10000}


@pytest.mark.parametrize("n,D", [(1, 1), (2, 17), (3, 1000), (4, 9999), (8, 100003)])
def test_paper_within_tolerance(n, D):
    """Variant paper: softmax partition sums are streamed (float64 partial sums), so values differ
    from torch.softmax by rounding. Tolerance: merged values within 1e-5 relative to max |tau|;
    the keep masks may differ only where beta lies within 1e-5 (relative) of the threshold."""
    g = torch.Generator().manual_seed(n * 31 + D)
    tv = torch.randn(n, D, generator=g) * 1e-3
    for ratio in (0.05, 0.1, 1.0):
        expected = pcb_paper(tv, ratio=ratio)
        got = pcb_merge(tv, ratio=ratio, variant="paper", block_width=4096)
        beta = paper_scores(tv)
        t = torch.sort(beta, dim=1).values[:, keep_index(D, ratio)].unsqueeze(1)
        near_threshold = ((beta - t).abs() <= 1e-5 * t).any(0)
        differ = (got - expected).abs() > 1e-5 * tv.abs().max()
        assert not (differ & ~near_threshold).any(), int((differ & ~near_threshold).sum())
        print(f"paper n={n} D={D} ratio={ratio}: {int(differ.sum())} entries differ beyond tolerance, "
              f"all within 1e-5 of the threshold")
