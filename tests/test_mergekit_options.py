"""mergekit's options on the engine: per-task density (TIES' per-task keep counts), normalize, DARE's
L1 rescale, Breadcrumbs' band per tensor, breadcrumbs_ties, min_keep, and parameters that vary by
tensor (engine.run's segment_params), each against the literal formulations of
pcb_fast.reference.baselines (bit for bit) and, where they are cheap to write, hand counts."""

import itertools

import pytest
import torch

import pcb_fast.reference.baselines as literal
from pcb_fast import merge
from pcb_fast.core import engine
from pcb_fast.core.options import RunOptions
from pcb_fast.core.sources import MatrixSource
from pcb_fast.cpu import fused as fused_cpu
from pcb_fast.methods.ties import merge_dare_ties, merge_ties
from pcb_fast.search import ContributionCache

SHAPES = {"a.weight": (37, 29), "a.bias": (37,), "b.weight": (5, 3, 7), "scale": ()}


def models(n, seed, quantized=False, shapes=SHAPES):
    g = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    tuned = []
    for _ in range(n):
        if quantized:  # many equal magnitudes: ties at every threshold, exact cancellations
            tuned.append({k: v + torch.randint(-2, 3, v.shape, generator=g).float() * 0.5 for k, v in base.items()})
        else:
            tuned.append({k: v + torch.randn(v.shape, generator=g) * 0.01 for k, v in base.items()})
    return base, tuned


CASES = [
    ("ties", dict(density=[0.2, 0.5, 0.05])),
    ("ties", dict(density=[0.2, 1.0, 0.01], topk="exact", min_keep=1)),
    ("ties", dict(density=0.3, normalize=False, sign_ties="positive", topk="exact")),
    ("ties", dict(density=[1e-6, 0.3, 1.0], topk="exact")),
    ("ties", dict(density=[1.0, 0.3, 1e-6])),
    ("ties", dict(density=1e-6, topk="exact", min_keep=1)),
    ("task_arithmetic", dict(normalize=True)),
    ("dare", dict(p=[0.1, 0.5, 0.9], seed=3)),
    ("dare", dict(p=0.3, rescale="l1")),
    ("dare", dict(p=0.3, rescale="none", normalize=True)),
    ("dare_ties", dict(p=[0.2, 0.5, 0.7], rescale="l1", normalize=False, sign_ties="positive")),
    ("breadcrumbs", dict(gamma=0.1, beta=0.3, band="tensor")),
    ("breadcrumbs", dict(gamma=[0.1, 0.0, 0.5], beta=[0.3, 1.0, 0.9], band="tensor", normalize=True)),
    ("breadcrumbs_ties", dict(gamma=0.05, beta=0.4, band="tensor", normalize=False)),
    ("breadcrumbs_ties", dict(gamma=0.05, beta=0.4)),
]


@pytest.mark.parametrize("method,params", CASES)
def test_engine_equals_literal(method, params):
    for scope, quantized, lambdas in itertools.product(("global", "tensor"), (False, True), (None, [0.5, 1.0, 1.5])):
        base, tuned = models(3, seed=int(quantized), quantized=quantized)
        expected = merge(base, tuned, method=method, scope=scope, lambdas=lambdas, backend="reference", **params)
        # the L1 sums of a tensor split over several blocks are added in float64 (not mergekit's float32 sum)
        widths = [1 << 17] if params.get("rescale") == "l1" else [64, 1 << 17]
        for width, budget in itertools.product(widths, (None, 0)):
            got = merge(base, tuned, method=method, scope=scope, lambdas=lambdas, block_width=width, max_memory=budget,
                        **params)
            for k in base:
                assert torch.equal(got[k], expected[k]), (scope, quantized, lambdas, width, budget, k)


def test_l1_rescale_over_several_blocks_is_within_rounding():
    base, tuned = models(3, seed=1)
    one = merge(base, tuned, method="dare", p=0.4, rescale="l1", scope="tensor")
    split = merge(base, tuned, method="dare", p=0.4, rescale="l1", scope="tensor", block_width=64)
    for k in base:
        torch.testing.assert_close(split[k], one[k], rtol=1e-6, atol=1e-6)


def test_per_task_density_keeps_each_tasks_own_count():
    """Per-task keep counts, against a literal per-task formulation written here: each task's top
    int(D d_i) magnitudes (exact top-k), then the election and disjoint mean."""
    base, tuned = models(3, seed=5, shapes={"w": (50, 40)})
    densities = [0.05, 0.3, 0.6]
    report = {}
    got = merge(base, tuned, method="ties", density=densities, topk="exact", report=report)
    assert report["kept"] == [100, 600, 1200]
    tv = torch.stack([(m["w"] - base["w"]).reshape(-1) for m in tuned])
    trimmed = torch.zeros_like(tv)
    for i, d in enumerate(densities):
        top = tv[i].abs().topk(int(2000 * d)).indices
        trimmed[i, top] = tv[i, top]
    sign = torch.sign(trimmed[0] + trimmed[1] + trimmed[2])
    sign[sign == 0] = torch.sign(sign.sum())
    agree = torch.where(sign > 0, trimmed > 0, trimmed < 0)
    mean = (trimmed * agree).sum(0) / agree.sum(0).clamp(min=1)
    torch.testing.assert_close(got["w"], base["w"] + mean.view(50, 40), rtol=0, atol=1e-6)


def test_per_task_density_equals_separate_uniform_thresholds():
    """A per-task density whose values are all equal gives the uniform density's bytes."""
    base, tuned = models(3, seed=2)
    for topk in ("threshold", "exact"):
        a = merge(base, tuned, method="ties", density=[0.3] * 3, topk=topk, block_width=64)
        b = merge(base, tuned, method="ties", density=0.3, topk=topk, block_width=64)
        assert all(torch.equal(a[k], b[k]) for k in base)


def test_normalize_false_sums_the_agreeing_entries():
    tv = torch.tensor([[1.0, -2.0, 3.0], [2.0, 1.0, -1.0]])
    out = torch.empty(3)

    def sink(segment, lo, hi, values):
        out[lo:hi] = values

    engine.run(merge_ties, MatrixSource(tv), sink, density=1.0, normalize=False)
    assert out.tolist() == [3.0, -2.0, 3.0]
    engine.run(merge_ties, MatrixSource(tv), sink, density=1.0)
    assert out.tolist() == [1.5, -2.0, 3.0]


def test_tensor_band_keeps_mergekit_counts():
    """mergekit's Breadcrumbs: keep int(density N), drop int(gamma N) above them, the drop shrinking
    when both do not fit."""
    base, tuned = models(2, seed=3, shapes={"w": (10, 10)})
    for gamma, beta, kept in ((0.1, 0.5, 50), (0.6, 0.5, 50), (0.0, 1.0, 100)):
        report = {}
        merge(base, tuned, method="breadcrumbs", gamma=gamma, beta=beta, band="tensor", report=report)
        assert report["kept"] == [kept, kept]
    with pytest.raises(ValueError, match=r"beta=0.6 is out of range; valid: 0 < beta <= 1 - gamma"):
        merge(base, tuned, method="breadcrumbs", gamma=0.6, beta=0.6)
    with pytest.raises(ValueError, match="gamma and beta per model need band='tensor'"):
        merge(base, tuned, method="breadcrumbs", gamma=[0.1, 0.1], beta=0.5)


def test_segment_params_need_tensor_scope_and_scale_each_tensor():
    base, tuned = models(2, seed=4)

    def per_key(key):
        return {"density": 0.5 if "bias" in key else 0.2, "lam": 2.0 if key == "scale" else 1.0,
                "lambdas": [1.0, 0.5] if key.startswith("a.") else [1.0, 1.0]}

    with pytest.raises(ValueError, match="need scope='tensor'"):
        merge(base, tuned, method="ties", segment_params=per_key)
    got = merge(base, tuned, method="ties", scope="tensor", segment_params=per_key, block_width=64)
    literal_ = merge(base, tuned, method="ties", scope="tensor", segment_params=per_key, backend="reference")
    for k in base:
        params = per_key(k)
        alone = merge({k: base[k]}, [{k: m[k]} for m in tuned], method="ties", scope="tensor", lam=params["lam"],
                      density=params["density"], lambdas=params["lambdas"])
        assert torch.equal(got[k], alone[k]) and torch.equal(got[k], literal_[k]), k


def test_base_copies_drop_their_per_task_values():
    base, tuned = models(2, seed=6)
    with pytest.warns(UserWarning, match="model 1 equals the base model"):
        got = merge(base, [tuned[0], base, tuned[1]], method="ties", density=[0.2, 0.9, 0.5])
    expected = merge(base, tuned, method="ties", density=[0.2, 0.5])
    assert all(torch.equal(got[k], expected[k]) for k in base)


@pytest.mark.parametrize("method,params,message", [
    ("ties", dict(density=[0.2]), "density has 1 values but there are 2 models"),
    ("ties", dict(normalize="yes"), "normalize='yes' must be true or false"),
    ("ties", dict(min_keep=-1), "min_keep=-1 must be a non-negative integer"),
    ("dare", dict(rescale="l2"), "rescale='l2' is not valid; choose one of 'inverse', 'l1', 'none'"),
    ("dare", dict(p=[0.1, 1.0]), "p=1.0 is out of range"),
    ("breadcrumbs", dict(band="layer"), "band='layer' is not valid"),
])
def test_bad_options(method, params, message):
    base, tuned = models(2, seed=0)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        merge(base, tuned, method=method, **params)


def test_search_refuses_engine_only_options():
    base, tuned = models(2, seed=0)
    with pytest.raises(ValueError, match="normalize=False is not supported by the coefficient search"):
        ContributionCache(base, tuned, method="ties", normalize=False)
    with pytest.raises(ValueError, match="density per model is not supported by the coefficient search"):
        ContributionCache(base, tuned, method="ties", density=[0.2, 0.3])
    ContributionCache(base, tuned, method="ties", normalize=True)  # the default is the search's own


@pytest.mark.skipif(fused_cpu.resolve("auto", 1 << 40) is False, reason="torch.compile cannot build CPU code here")
@pytest.mark.parametrize("method,params", [
    (merge_ties, dict(density=[0.1, 0.4, 0.9], topk="exact")), (merge_ties, dict(density=0.3, normalize=False)),
    (merge_ties, dict(density=[1e-9, 0.5, 1.0])), (merge_dare_ties, dict(p=0.5, normalize=False)),
])
def test_fused_loops_take_the_options(method, params):
    g = torch.Generator().manual_seed(0)
    tv = torch.round(torch.randn(3, 70_001, generator=g) * 4) / 4  # ties and cancellations
    outs = []
    for fused in (False, True):
        source = MatrixSource(tv)
        out = torch.empty(source.D)

        def sink(segment, lo, hi, values):
            out[lo:hi] = values

        kept = engine.run(method, source, sink, options=RunOptions(fused=fused), block_width=4096, **params)["kept"]
        outs.append((out, kept))
    assert torch.equal(outs[0][0], outs[1][0]) and outs[0][1] == outs[1][1]
    name = "ties" if method is merge_ties else "dare_ties"
    segments = [("task_vector", (tv.shape[1],))]
    assert torch.equal(outs[1][0], literal.METHODS[name](tv, segments=segments, **params))


def test_triton_refuses_engine_only_options_and_takes_their_defaults():
    pytest.importorskip("triton")  # under TRITON_INTERPRET=1 on a CPU (tests/conftest.py)
    base, tuned = models(2, seed=7, shapes={"w": (16, 8)})
    for method, params, option in [("ties", dict(normalize=False), "normalize=False"),
                                   ("ties", dict(density=[0.2, 0.4]), "density per model"),
                                   ("dare", dict(rescale="l1"), "rescale='l1'"),
                                   ("breadcrumbs", dict(band="tensor"), "band='tensor'"),
                                   ("ties", dict(segment_params=lambda key: {}), "parameters that vary by tensor")]:
        with pytest.raises(ValueError, match=f"{option.replace('(', '.').replace(')', '.')} runs on backends 'torch' "
                                             "and 'reference' in this version, not on 'triton'"):
            merge(base, tuned, method=method, backend="triton", scope="tensor", **params)
    got = merge(base, tuned, method="ties", density=0.3, normalize=True, min_keep=0, backend="triton")
    expected = merge(base, tuned, method="ties", density=0.3)
    torch.testing.assert_close(got["w"], expected["w"], rtol=0, atol=2e-5)
