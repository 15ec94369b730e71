"""Baseline methods: literal formulations on hand-checked cases, the engine against them bit for bit."""

import itertools

import pytest
import torch

from pcb_fast import merge
from pcb_fast.reference import baselines as ref
from pcb_fast.core.rng import keep_mask

SEG = [("w", (3,))]


def close(got, expected):
    assert torch.allclose(got, torch.tensor(expected, dtype=torch.float32), atol=1e-6), got.tolist()


# ---- hand-checked cases of the literal formulations

def test_task_arithmetic_and_average():
    tv = torch.tensor([[1.0, -2.0, 0.5], [3.0, 1.0, -0.5]])
    close(ref.task_arithmetic(tv), [4.0, -1.0, 0.0])
    close(ref.task_arithmetic(tv, lambdas=[2.0, 0.5]), [3.5, -3.5, 0.75])
    close(ref.average(tv), [2.0, -0.5, 0.0])
    close(ref.average(tv, lambdas=[3.0, 1.0]), [1.5, -1.25, 0.25])


def test_ties_trim_elect_disjoint_mean():
    # density 0.5 on D=4: keep = int(2) -> kthvalue(|tau|, 2) -> entries >= the 2nd smallest (3 kept).
    tv = torch.tensor([[1.0, -2.0, 0.5, 4.0], [-3.0, 1.0, 0.1, -0.2]])
    # task 1 keeps |tau| >= 1: [1, -2, 0, 4]; task 2 keeps |tau| >= 0.2: [-3, 1, 0, -0.2]
    # sums [-2, -1, 0, 3.8] -> signs [-, -, 0, +]; zero sum -> majority sign of [-1,-1,0,1] = -1
    # agreeing: [-3], [-2], none (0), [4] -> [-3, -2, 0, 4]
    close(ref.ties(tv, density=0.5), [-3.0, -2.0, 0.0, 4.0])


def test_ties_zero_sum_positions_take_the_majority_sign():
    # trimmed [2, -1, 1] and [-2, -1, 1]: sums [0, -2, 2]; signs [0, -1, 1] sum to 0 -> majority 0:
    # the authors' where(sign > 0, T > 0, T < 0) then selects the negative entries at position 0.
    tv = torch.tensor([[2.0, -1.0, 1.0], [-2.0, -1.0, 1.0]])
    close(ref.ties(tv, density=1.0), [-2.0, -1.0, 1.0])
    # with three positive positions the majority is +1 and position 0 takes the +2
    tv = torch.tensor([[2.0, 1.0, 1.0, 1.0], [-2.0, 1.0, 1.0, 1.0]])
    close(ref.ties(tv, density=1.0), [2.0, 1.0, 1.0, 1.0])
    # mergekit's habit: zero sum -> +1
    tv = torch.tensor([[2.0, -1.0, -1.0], [-2.0, -1.0, -1.0]])
    close(ref.ties(tv, density=1.0, sign_ties="positive"), [2.0, -1.0, -1.0])
    close(ref.ties(tv, density=1.0), [-2.0, -1.0, -1.0])


def test_ties_threshold_keeps_ties_exact_keeps_count():
    tv = torch.tensor([[1.0, 1.0, 1.0, 0.5]])
    # keep = int(4 * 0.25) = 1: the authors' threshold keeps every entry equal to the max (3)
    assert ref.magnitude_mask(tv, 0.25).sum() == 3
    # exact: one entry, the first by position
    assert ref.magnitude_mask(tv, 0.25, "exact").tolist() == [[True, False, False, False]]


def test_ties_weighted_divides_by_agreeing_weights():
    tv = torch.tensor([[1.0], [3.0]])
    close(ref.ties(tv, density=1.0, lambdas=[1.0, 3.0]), [(1.0 + 9.0) / 4.0])


def test_dare_rescales_survivors():
    tv = torch.ones(2, 1000)
    got = ref.dare(tv, p=0.75, seed=1, segments=[("k", (1000,))])
    keep = [keep_mask(1, i, "k", 0, 1000, 0.75) for i in range(2)]
    expected = (keep[0].float() + keep[1].float()) * 4.0
    assert torch.equal(got, expected)
    assert 0.2 < float(keep[0].float().mean()) < 0.3


def test_breadcrumbs_band_per_row():
    # row of 10, gamma 0.1, beta 0.3: drop the largest, keep ranks 1..3
    tv = torch.tensor([[10.0, -9.0, 8.0, 7.0, -6.0, 5.0, 4.0, 3.0, 2.0, 1.0] * 2])
    got = ref.breadcrumbs(tv, gamma=0.1, beta=0.3, segments=[("w", (2, 10))])
    row = [0.0, -9.0, 8.0, 7.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    close(got, row * 2)
    # ties ranked by position: [5, 5, 5, 1] with gamma .25 beta .5 keeps the 2nd and 3rd 5
    got = ref.breadcrumbs(torch.tensor([[5.0, 5.0, 5.0, 1.0]]), gamma=0.25, beta=0.5, segments=[("w", (4,))])
    close(got, [0.0, 5.0, 5.0, 0.0])


def test_counter_based_mask_does_not_depend_on_blocks():
    whole = keep_mask(7, 2, "layer.0.weight", 0, 5000, 0.3)
    parts = torch.cat([keep_mask(7, 2, "layer.0.weight", lo, min(lo + 333, 5000), 0.3) for lo in range(0, 5000, 333)])
    assert torch.equal(whole, parts)
    assert not torch.equal(whole, keep_mask(7, 3, "layer.0.weight", 0, 5000, 0.3))
    assert not torch.equal(whole, keep_mask(8, 2, "layer.0.weight", 0, 5000, 0.3))


# ---- the engine against the literal formulations, bit for bit

def models(n, shapes, seed, quantized=False):
    g = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    out = []
    for _ in range(n):
        if quantized:  # many equal magnitudes: ties at every threshold
            out.append({k: v + torch.randint(-2, 3, v.shape, generator=g).float() * 0.5 for k, v in base.items()})
        else:
            out.append({k: v + torch.randn(v.shape, generator=g) * 0.01 for k, v in base.items()})
    return base, out


CASES = [
    ("average", {}), ("task_arithmetic", {}),
    ("ties", dict(density=0.2)), ("ties", dict(density=0.05, sign_ties="positive")),
    ("ties", dict(density=0.3, topk="exact")), ("ties", dict(density=1.0)), ("ties", dict(density=1e-6)),
    ("ties", dict(density=1e-6, topk="exact")),
    ("dare", dict(p=0.9, seed=5)), ("dare", dict(p=0.0)), ("dare_ties", dict(p=0.5, seed=2)),
    ("breadcrumbs", dict(gamma=0.05, beta=0.2)), ("breadcrumbs", dict(gamma=0.0, beta=1.0)),
]


@pytest.mark.parametrize("method,params", CASES)
def test_engine_equals_literal(method, params):
    shapes = {"a.weight": (37, 29), "a.bias": (37,), "b.weight": (5, 3, 7), "scale": ()}
    for n, scope, quantized, lambdas in itertools.product((1, 3), ("global", "tensor"), (False, True), (None, "some")):
        base, tuned = models(n, shapes, seed=n * 10 + quantized, quantized=quantized)
        lam = None if lambdas is None else [0.5 + 0.25 * i for i in range(n)]
        got = merge(base, tuned, method=method, scope=scope, lambdas=lam, block_width=64, **params)
        expected = merge(base, tuned, method=method, scope=scope, lambdas=lam, backend="reference", **params)
        for k in base:
            assert torch.equal(got[k], expected[k]), (n, scope, quantized, lambdas, k)


@pytest.mark.parametrize("method,params", [
    ("pcb", dict(ratio=0.2)), ("pcb", dict(ratio=0.3, inter="pairwise", clamp_ratio=0.05)),
    ("ties", dict(density=0.2)), ("ties", dict(density=0.3, topk="exact")), ("ties", dict(density=1.0)),
])
def test_engine_over_its_memory_budget_equals_literal(method, params):
    """No room to collect entries: thresholds by radix select, one more pass to merge, same bits."""
    shapes = {"a.weight": (37, 29), "a.bias": (37,), "b.weight": (5, 3, 7), "scale": ()}
    for n, scope, quantized in itertools.product((1, 3), ("global", "tensor"), (False, True)):
        base, tuned = models(n, shapes, seed=n * 10 + quantized, quantized=quantized)
        lam = [0.5 + 0.25 * i for i in range(n)]
        report, report_budget = {}, {}
        got = merge(base, tuned, method=method, scope=scope, lambdas=lam, block_width=64, max_memory=0,
                    report=report_budget, **params)
        merge(base, tuned, method=method, scope=scope, lambdas=lam, block_width=64, report=report, **params)
        expected = merge(base, tuned, method=method, scope=scope, lambdas=lam, backend="reference", **params)
        for k in base:
            assert torch.equal(got[k], expected[k]), (n, scope, quantized, k)
        assert report_budget["kept"] == report["kept"]


@pytest.mark.parametrize("method,params,reads", [
    ("pcb", dict(ratio=0.1), 3), ("pcb", dict(ratio=0.2, inter="pairwise", clamp_ratio=0.05), 4),
    ("ties", dict(density=0.2), 4), ("ties", dict(density=0.3, topk="exact"), 5),
])
@pytest.mark.parametrize("quantized", [False, True])
def test_engine_over_its_budget_brackets_the_threshold_in_one_pass(monkeypatch, method, params, reads, quantized):
    """Too little room to collect the kept entries, enough for the ~1% inside the sampled bracket:
    the threshold comes from one counting pass (not the radix select's two), the same bits as the
    literal formulation. Official PCB reads its inputs 3 times in all (a clip ratio past the tails
    costs a radix pass); eager TIES 4 (its sign election sums the whole model before it merges; the
    exact top-k adds its tie-counting pass)."""
    from pcb_fast.core import engine
    from pcb_fast.core.sources import StateDictSource

    passes = []

    def counting(real):
        def counted(self, *args, **kwargs):
            passes.append(1)
            return real(self, *args, **kwargs)
        return counted

    # a pass reads float32 blocks, or the stored slices (PCB's C sweeps, its clip pass even with fused="off")
    monkeypatch.setattr(StateDictSource, "blocks", counting(StateDictSource.blocks))
    monkeypatch.setattr(StateDictSource, "raw_blocks", counting(StateDictSource.raw_blocks))
    monkeypatch.setattr(engine, "threshold_by_radix", None)  # must not be needed here
    base, tuned = models(3, {"w": (400, 250), "b": (250,)}, seed=7, quantized=quantized)
    got = merge(base, tuned, method=method, max_memory="200KB", block_width=4096, fused="off", **params)
    assert len(passes) == reads
    expected = merge(base, tuned, method=method, backend="reference", **params)
    for k in base:
        assert torch.equal(got[k], expected[k]), k
    if method == "ties":  # TIES' C loops (the default): a counting pass (ties at t too), one merging sweep
        passes.clear()
        got = merge(base, tuned, method=method, max_memory="200KB", block_width=4096, **params)
        assert len(passes) == 2
        assert all(torch.equal(got[k], expected[k]) for k in base)


def test_pcb_paper_over_its_memory_budget_equals_collected_path():
    base, tuned = models(3, {"w": (64, 50), "b": (50,)}, seed=4)
    for scope in ("global", "tensor"):
        a = merge(base, tuned, variant="paper", ratio=0.3, scope=scope, max_memory=0, block_width=256)
        b = merge(base, tuned, variant="paper", ratio=0.3, scope=scope, block_width=256)
        assert all(torch.equal(a[k], b[k]) for k in base)


def test_report_counts_kept_entries_for_ties():
    base, tuned = models(3, {"w": (100, 100)}, seed=0)
    report = {}
    merge(base, tuned, method="ties", density=0.2, topk="exact", report=report)
    assert report["kept"] == [2000, 2000, 2000]


@pytest.mark.parametrize("method,params,message", [
    ("ties", dict(density=0), "density=0 is out of range; valid: 0 < density <= 1"),
    ("ties", dict(density=1.2), "density=1.2 is out of range"),
    ("ties", dict(sign_ties="minority"), "sign_ties='minority' is not valid"),
    ("ties", dict(topk="approx"), "topk='approx' is not valid"),
    ("dare", dict(p=1.0), "p=1.0 is out of range; valid: 0 <= p < 1"),
    ("dare_ties", dict(p=-0.1), "p=-0.1 is out of range"),
    ("dare", dict(seed=-1), "seed=-1 must be a non-negative integer"),
    ("breadcrumbs", dict(gamma=1.0), "gamma=1.0 is out of range; valid: 0 <= gamma < 1"),
    ("breadcrumbs", dict(gamma=0.5, beta=0.6), "beta=0.6 is out of range; valid: 0 < beta <= 1 - gamma"),
    ("average", dict(lambdas=[1.0, -1.0]), "average weights must have a positive sum"),
    ("task_arithmetic", dict(density=0.5), "method 'task_arithmetic' has no parameter 'density'"),
])
def test_bad_parameters(method, params, message):
    base, tuned = models(2, {"w": (10, 10)}, seed=0)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        merge(base, tuned, method=method, **params)


@pytest.mark.parametrize("method", ["average", "task_arithmetic", "ties", "dare", "dare_ties", "breadcrumbs"])
def test_nan_names_model_and_key(method):
    base, tuned = models(3, {"a": (10, 10), "b": (20,)}, seed=0)
    tuned[2]["b"][7] = float("nan")
    with pytest.raises(ValueError, match="model 2, key 'b': contains NaN or Inf"):
        merge(base, tuned, method=method)


@pytest.mark.parametrize("drop,keep", [(0, 1), (2, 3), (5, 10), (0, 32), (10, 22), (31, 1), (3, 0)])
def test_band_mask_equals_stable_sort_ranks(drop, keep):
    from pcb_fast.methods.linear import band_mask

    g = torch.Generator().manual_seed(drop * 100 + keep)
    rows = torch.cat([torch.rand(20, 32, generator=g), torch.randint(0, 4, (20, 32), generator=g).float()])
    order = torch.sort(rows, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(32).expand_as(order))
    assert torch.equal(band_mask(rows, drop, keep), (rank >= drop) & (rank < drop + keep))


def test_keep_masks_of_all_tasks_equal_the_per_task_streams():
    from pcb_fast.core import rng

    for lo, hi in [(0, 1000), (123456, 130000), ((1 << 32) - 500, (1 << 32) + 500)]:
        ps = [0.1, 0.5, 0.9]
        together = rng.keep_masks(7, "layer.weight", lo, hi, ps)
        for i, p in enumerate(ps):
            assert torch.equal(together[i], rng.keep_mask(7, i, "layer.weight", lo, hi, p)), (lo, i)
