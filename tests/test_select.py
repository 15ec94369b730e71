"""Exact selection primitives against torch.sort."""

import math

import pytest
import torch

from pcb_fast.core.select import RadixSelect, TailSelect, bucket_floor, keys_to_float, order_keys


def test_order_keys_preserve_float_order():
    x = torch.tensor([float("-inf"), -3.5, -1e-30, -0.0, 0.0, 1e-45, 2.0, float("inf")])
    keys = order_keys(x)
    assert torch.equal(keys, torch.sort(keys).values)
    assert (keys[1:] > keys[:-1]).all()  # strictly: -0.0 sorts just below +0.0
    assert torch.equal(keys_to_float(keys).view(torch.int32), x.view(torch.int32))


def test_bucket_floor_is_smallest_value_of_bucket():
    x = torch.tensor([-2.0, -0.5, 0.0, 0.75, 3.0])
    buckets = (order_keys(x) >> 16) + 32768
    floor = bucket_floor(buckets)
    assert (floor <= x).all()
    assert torch.equal((order_keys(floor) >> 16) + 32768, buckets)


def run_radix(x, ranks, width):
    n, D = x.shape
    sel = RadixSelect(n, ranks, D)
    for lo in range(0, D, width):
        sel.count_high(x[:, lo : lo + width])
    sel.find_buckets()
    for lo in range(0, D, width):
        sel.count_low(x[:, lo : lo + width])
    return sel.values()


@pytest.mark.parametrize("width", [1, 13, 4096])
def test_radix_select_equals_sort(width):
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(3, 3000, generator=g), torch.randint(-2, 3, (3, 1000), generator=g).float()], dim=1)
    x[0, :50] = -0.0
    ranks = torch.tensor([[0, 1, 2000, 3999], [5, 1000, 2500, 3000], [3998, 17, 2, 3333]])
    got = run_radix(x, ranks, width)
    expected = torch.gather(torch.sort(x, dim=1).values, 1, ranks)
    assert torch.equal(got, expected)


def test_radix_select_rejects_out_of_range_rank():
    with pytest.raises(ValueError, match="out of range"):
        RadixSelect(2, torch.tensor([[0], [10]]), 10)


@pytest.mark.parametrize("order", ["random", "ascending", "descending"])
def test_tail_select_equals_sort(order):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 20011, generator=g).abs()
    x[1] = torch.randint(0, 5, (20011,), generator=g).float()  # heavy ties
    if order != "random":
        x = torch.sort(x, dim=1, descending=order == "descending").values
    low, high = 37, 120
    sel = TailSelect(4, low, high)
    for lo in range(0, 20011, 1000):
        sel.update(x[:, lo : lo + 1000])
    s = torch.sort(x, dim=1).values
    assert torch.equal(sel.values(), torch.stack([s[:, low], s[:, -1 - high]], dim=1))


def test_a_missed_bracket_is_retried_narrow(monkeypatch):
    """When the sampled bracket misses t (forced here: a bracket far above t, then one far below), the
    retry holds the values between the old bound and a wider sampled one, not a whole side of the
    row (which had been opened to -inf or +inf and collected: 90% of the entries), and t is exact."""
    from pcb_fast.core import engine

    g = torch.Generator().manual_seed(0)
    n, D = 2, 200_000
    scores = torch.randn(n, D, generator=g)
    rank = int(D * 0.9)
    expected = scores.sort(dim=1).values[:, rank]
    held = []

    def bracket_pass(floor, ceiling):
        counts = engine.bracket_counts(scores, floor, ceiling)
        held.append(sum(part.numel() for part in counts[3]))
        return counts[:4]

    ordered = scores.sort(dim=1).values
    for lo, hi in ((0.01, 0.02), (-0.02, -0.01)):  # a bracket just above t, then one just below
        held.clear()
        bracket = (ordered[:, rank + int(lo * D)].clone(), ordered[:, rank + int(hi * D)].clone())
        monkeypatch.setattr(engine, "bounds_from_sample", lambda s, r, D: bracket)
        t, greater, at_least = engine.select_in_bracket(n, D, rank, scores[:, ::17].contiguous(), bracket_pass)
        assert torch.equal(t, expected)
        assert torch.equal(greater, (scores > expected.unsqueeze(1)).sum(1))
        assert len(held) >= 2 and max(held[1:]) <= n * D // 10, held


def test_pcb_under_a_small_budget_with_a_missed_bracket(monkeypatch):
    """PCB over its budget (thresholds from the bracket pass) with the sampled bracket forced to miss:
    exact, and the retry fits a budget that a whole side of the row would not."""
    import pcb_fast.reference.pcb as reference
    from pcb_fast.core import engine
    from pcb_fast.methods.pcb import merge_pcb
    from pcb_test_helpers import run_method

    g = torch.Generator().manual_seed(1)
    tv = torch.randn(3, 100_000, generator=g) * 1e-3
    guess = engine.bounds_from_sample

    def missing(sample_scores, rank, D):
        floor, ceiling = guess(sample_scores, rank, D)
        return ceiling + (ceiling - floor), ceiling + 2 * (ceiling - floor)  # entirely above t

    monkeypatch.setattr(engine, "bounds_from_sample", missing)
    def radix(*args):
        raise AssertionError("the retry should have fitted the budget, not fallen back to the radix select")

    monkeypatch.setattr(engine, "threshold_by_radix", radix)
    for fused in (True, False):
        out, _ = run_method(merge_pcb, tv, fused, budget=500_000, block_width=20_000)
        assert torch.equal(out, reference.pcb_official(tv))


@pytest.mark.parametrize("shift", [0.0, 0.5, 0.95, 2.0])
def test_sampled_bounds_of_scores_with_negative_values_are_kthvalue(shift):
    """The sampled bracket by the C select, where some (or all) scores are negative, as PCB's are:
    the values torch.kthvalue gives, with ties, zeros of both signs and rows of different spreads."""
    from pcb_fast.core import engine

    n, s, D = 4, 1 << 16, 1 << 22
    g = torch.Generator().manual_seed(int(shift * 100))
    scores = torch.randn(n, s, generator=g) - shift * torch.arange(1, n + 1).reshape(n, 1)
    scores[:, :2000] = scores[:, 2000:4000].round(decimals=1)  # ties
    scores[1, 100:200], scores[1, 200:300] = 0.0, -0.0
    rank = int(D * 0.1)
    floor, ceiling = engine.bounds_from_sample(scores, rank, D)
    q = rank / D  # the sample's floor and ceiling ranks, as engine._sample_bounds places them
    margin = 6 * math.sqrt(s * q * (1 - q)) + 8
    lo, hi = math.floor(q * s - margin), math.ceil(q * s + margin)
    expect_floor = torch.kthvalue(scores, lo + 1, dim=1).values
    expect_ceiling = torch.kthvalue(scores, hi + 1, dim=1).values
    assert torch.equal(floor, expect_floor) and torch.equal(ceiling, expect_ceiling)
