"""The FusionBench algorithms of pcb_fast.integrations.fusion_bench.

The first tests run everywhere, on a minimal model pool with FusionBench's interface; the last ones
run through FusionBench's own API (its BaseModelPool, config instantiation, YAML, and its own
implementations as the yardstick) when fusion-bench is installed, and skip otherwise.
"""

import copy

import pytest
import torch
from torch import nn

from pcb_fast import merge, merge_modules
from pcb_fast.integrations import fusion_bench as fb


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 16)
        self.fc1 = nn.Linear(16, 32)
        self.norm = nn.LayerNorm(32)
        self.fc2 = nn.Linear(32, 4)


def family(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = Net()
    with torch.no_grad():
        for p in base.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    models = []
    for _ in range(n):
        m = copy.deepcopy(base)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        models.append(m)
    return base, models


class Pool:
    """The part of FusionBench's BaseModelPool an algorithm uses."""

    def __init__(self, models: dict):
        self._models = models

    @property
    def model_names(self):
        return [k for k in self._models if k != "_pretrained_"]

    @property
    def has_pretrained(self):
        return "_pretrained_" in self._models

    def load_model(self, name):
        return self._models[name]


def pool_of(base, models):
    return Pool({"_pretrained_": base, **{f"task{i}": m for i, m in enumerate(models)}})


def states(base, models):
    return base.state_dict(), [m.state_dict() for m in models]


def assert_equal(module, expected: dict):
    got = module.state_dict()
    assert got.keys() == expected.keys()
    for k in expected:
        assert torch.equal(got[k], expected[k]), k


@pytest.mark.parametrize("algorithm,method,params", [
    (lambda: fb.PCBMergingAlgorithm(ratio=0.2, scaling_factor=0.9), "pcb", dict(ratio=0.2, lam=0.9)),
    (lambda: fb.PCBMergingAlgorithm(ratio=0.3, variant="paper", lambdas=[1.0, 0.8, 1.2], scope="tensor"), "pcb",
     dict(ratio=0.3, variant="paper", lambdas=[1.0, 0.8, 1.2], scope="tensor")),
    (lambda: fb.TaskArithmeticAlgorithm(scaling_factor=0.3), "task_arithmetic", dict(lam=0.3)),
    (lambda: fb.TiesMergingAlgorithm(scaling_factor=0.5, threshold=20, merge_func="mean"), "ties",
     dict(density=0.2, lam=0.5)),
    (lambda: fb.TiesMergingAlgorithm(scaling_factor=0.5, threshold=0.3), "ties",  # merge_func "sum", a fraction
     dict(density=0.3, lam=0.5, normalize=False)),
    (lambda: fb.DareTaskArithmetic(scaling_factor=0.4, sparsity_ratio=0.5, seed=3), "dare",
     dict(p=0.5, seed=3, lam=0.4)),
    (lambda: fb.DareTaskArithmetic(scaling_factor=0.4, sparsity_ratio=0.5, rescale=False), "dare",
     dict(p=0.5, lam=0.4, rescale="none")),
    (lambda: fb.PcbFastAlgorithm(method="dare_ties", scaling_factor=1.1, params={"p": 0.5, "seed": 1}), "dare_ties",
     dict(p=0.5, seed=1, lam=1.1)),
    (lambda: fb.PCBMergingAlgorithm(ratio=0.2, remove_keys=["fc2.bias", "norm.weight"]), "pcb",
     dict(ratio=0.2, exclude=[r"^fc2\.bias$", r"^norm\.weight$"])),
])
def test_each_algorithm_is_the_engine_with_fusion_benchs_parameters(algorithm, method, params):
    base, models = family()
    before = [copy.deepcopy(m.state_dict()) for m in [base] + models]
    merged = algorithm().run(pool_of(base, models))
    sd_base, sd_models = states(base, models)
    assert_equal(merged, merge(sd_base, sd_models, method=method, **params))
    for m, b in zip([base] + models, before):  # the pool's models are untouched
        assert all(torch.equal(m.state_dict()[k], v) for k, v in b.items())
    assert merged is not base


def test_task_arithmetic_is_fusion_benchs_formula_bit_for_bit():
    base, models = family()
    merged = fb.TaskArithmeticAlgorithm(scaling_factor=0.3).run(pool_of(base, models))
    sd_base, sd_models = states(base, models)
    for k, pre in sd_base.items():
        tv = sd_models[0][k] - pre
        for m in sd_models[1:]:
            tv = tv + (m[k] - pre)
        assert torch.equal(merged.state_dict()[k], pre + tv * 0.3), k


def test_simple_average_with_and_without_the_pretrained_model():
    base, models = family()
    mean = {k: torch.stack([m.state_dict()[k] for m in models]).mean(0) for k in base.state_dict()}
    for pool in (pool_of(base, models), Pool({f"m{i}": m for i, m in enumerate(models)}),
                 {f"m{i}": m for i, m in enumerate(models)}):
        merged = fb.SimpleAverageAlgorithm().run(pool)
        for k, v in mean.items():
            assert torch.allclose(merged.state_dict()[k], v, atol=1e-6), k


def test_a_dict_of_modules_is_a_pool_and_tied_parameters_stay_tied():
    base, models = family()
    for m in [base] + models:
        m.fc2.weight = nn.Parameter(torch.zeros(4, 32))
        m.head = nn.Linear(32, 4)
        m.head.weight = m.fc2.weight  # tied
    with torch.no_grad():
        for i, m in enumerate(models):
            m.fc2.weight.add_(0.01 * (i + 1))
    merged = fb.PCBMergingAlgorithm(ratio=0.3).run({"_pretrained_": base, "a": models[0], "b": models[1]})
    assert merged.head.weight is merged.fc2.weight
    assert_equal(merged, merge_modules(base, models[:2], method="pcb", ratio=0.3).state_dict())


def test_bad_pools_and_parameters_are_one_line_value_errors():
    base, models = family()
    with pytest.raises(ValueError, match="needs the pretrained model: add '_pretrained_'"):
        fb.PCBMergingAlgorithm().run(Pool({"a": models[0], "b": models[1]}))
    with pytest.raises(ValueError, match="holds no fine-tuned model"):
        fb.TaskArithmeticAlgorithm(scaling_factor=0.3).run(Pool({"_pretrained_": base}))
    with pytest.raises(ValueError, match="modelpool is a list"):
        fb.PCBMergingAlgorithm().run([base, models[0]])
    with pytest.raises(ValueError, match="model 'b' of the pool is a OrderedDict"):
        fb.PCBMergingAlgorithm().run(Pool({"_pretrained_": base, "a": models[0], "b": models[1].state_dict()}))
    with pytest.raises(ValueError, match="merge_func='max' is not supported"):
        fb.TiesMergingAlgorithm(scaling_factor=0.3, threshold=20, merge_func="max").run(pool_of(base, models))
    with pytest.raises(ValueError, match="threshold='20' must be a number"):
        fb.TiesMergingAlgorithm(scaling_factor=0.3, threshold="20").run(pool_of(base, models))
    with pytest.raises(ValueError, match="only_on_linear_weights=True is not supported"):
        fb.DareTaskArithmetic(scaling_factor=0.3, sparsity_ratio=0.5, only_on_linear_weights=True).run(
            pool_of(base, models))
    with pytest.raises(ValueError, match="ratio=2.0 is out of range"):
        fb.PCBMergingAlgorithm(ratio=2.0).run(pool_of(base, models))
    with pytest.raises(ValueError, match="has no parameter 'density'"):
        fb.PcbFastAlgorithm(method="pcb", params={"density": 0.2}).run(pool_of(base, models))


# ---- through FusionBench's own API (skipped without fusion-bench)


@pytest.fixture(scope="module")
def fusion_bench():
    return pytest.importorskip("fusion_bench")


def fb_pool(fusion_bench, base, models):
    from fusion_bench.modelpool import BaseModelPool

    return BaseModelPool({"_pretrained_": base, **{f"task{i}": m for i, m in enumerate(models)}})


def test_runs_from_a_fusion_bench_config_on_its_model_pool(fusion_bench, tmp_path):
    from fusion_bench.method import BaseAlgorithm
    from fusion_bench.utils import instantiate
    from omegaconf import OmegaConf

    assert fb.HAVE_FUSION_BENCH
    config = OmegaConf.create({"_target_": "pcb_fast.integrations.fusion_bench.PCBMergingAlgorithm", "ratio": 0.2,
                               "clamp_ratio": 0.01, "scaling_factor": 1.0, "lambdas": [1.0, 0.9, 1.1]})
    algorithm = instantiate(config)
    assert isinstance(algorithm, BaseAlgorithm)
    base, models = family()
    merged = algorithm.run(fb_pool(fusion_bench, base, models))
    sd_base, sd_models = states(base, models)
    assert_equal(merged, merge(sd_base, sd_models, method="pcb", ratio=0.2, clamp_ratio=0.01, lambdas=[1.0, 0.9, 1.1]))
    # its config round-trips through YAML, as FusionBench saves and reloads method configs
    path = tmp_path / "method.yaml"
    algorithm.to_yaml(path)
    again = fb.PCBMergingAlgorithm.from_yaml(path)
    assert type(again) is fb.PCBMergingAlgorithm
    assert (again.ratio, again.clamp_ratio, list(again.lambdas)) == (0.2, 0.01, [1.0, 0.9, 1.1])
    assert OmegaConf.to_container(again.config) == OmegaConf.to_container(algorithm.config)
    assert_equal(again.run(fb_pool(fusion_bench, base, models)), merged.state_dict())
    generic = instantiate(OmegaConf.create({"_target_": "pcb_fast.integrations.fusion_bench.PcbFastAlgorithm",
                                            "method": "breadcrumbs", "params": {"gamma": 0.05, "beta": 0.5}}))
    assert_equal(generic.run(fb_pool(fusion_bench, base, models)),
                 merge(sd_base, sd_models, method="breadcrumbs", gamma=0.05, beta=0.5))


def test_equals_fusion_benchs_own_task_arithmetic_ties_and_average(fusion_bench):
    # task arithmetic and TIES bit for bit (the same float32 operations); the average up to rounding
    from fusion_bench.method import SimpleAverageAlgorithm, TaskArithmeticAlgorithm, TiesMergingAlgorithm

    base, models = family(n=4, seed=2)
    cases = [
        (TaskArithmeticAlgorithm(scaling_factor=0.3), fb.TaskArithmeticAlgorithm(scaling_factor=0.3), 0.0),
        (TiesMergingAlgorithm(scaling_factor=0.5, threshold=20, remove_keys=[], merge_func="sum"),
         fb.TiesMergingAlgorithm(scaling_factor=0.5, threshold=20, merge_func="sum"), 0.0),
        # (FusionBench's own TIES cannot load its result back with remove_keys outside T5: not compared here)
        (TiesMergingAlgorithm(scaling_factor=0.7, threshold=30, remove_keys=[], merge_func="mean"),
         fb.TiesMergingAlgorithm(scaling_factor=0.7, threshold=30, merge_func="mean"), 0.0),
        (SimpleAverageAlgorithm(), fb.SimpleAverageAlgorithm(), 1e-6),
    ]
    for theirs, ours, tolerance in cases:
        # FusionBench's algorithms may write into the pool's pretrained model: give them copies
        expected = theirs.run(fb_pool(fusion_bench, copy.deepcopy(base), [copy.deepcopy(m) for m in models]))
        got = ours.run(fb_pool(fusion_bench, base, models)).state_dict()
        for k, v in expected.state_dict().items():
            if tolerance == 0.0:
                assert torch.equal(got[k], v), (type(ours).__name__, k)
            else:
                assert torch.allclose(got[k], v, rtol=0, atol=tolerance), (type(ours).__name__, k)
