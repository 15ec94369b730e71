"""BatchNorm running statistics are averaged, not merged as task vectors."""

import copy

import pytest
import torch
from torch import nn

from pcb_fast import merge, merge_modules
from pcb_fast.integrations import fusion_bench as fb


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.bn(self.conv(x)).mean((2, 3)))


def family(variances=(0.2, 0.3)):
    """A base whose BatchNorm saw unit-variance activations and fine-tunes that saw smaller ones:
    task arithmetic adds both decreases and lands below zero."""
    torch.manual_seed(0)
    base = ConvNet()
    base.bn.running_var.fill_(1.0)
    base.bn.running_mean.fill_(0.5)
    models = []
    for i, var in enumerate(variances):
        m = copy.deepcopy(base)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.01 * torch.randn(p.shape))
        m.bn.running_var.fill_(var)
        m.bn.running_mean.fill_(float(i))
        m.bn.num_batches_tracked.fill_(100 + i)
        models.append(m)
    return base, models


def test_task_arithmetic_averages_the_running_statistics():
    base, models = family()
    states = [m.state_dict() for m in models]
    report = {}
    out = merge(base.state_dict(), states, method="task_arithmetic", report=report)
    assert torch.allclose(out["bn.running_var"], torch.full((4,), 0.25))
    assert torch.allclose(out["bn.running_mean"], torch.full((4,), 0.5))
    assert torch.equal(out["bn.num_batches_tracked"], base.bn.num_batches_tracked)
    assert sorted(report["running_stat_keys"]) == ["bn.running_mean", "bn.running_var"]
    # the weights are the models' lambdas, normalised
    out = merge(base.state_dict(), states, method="task_arithmetic", lambdas=[3.0, 1.0])
    assert torch.allclose(out["bn.running_var"], torch.full((4,), 0.225))
    # the learned weights are merged as task vectors, as before
    w = base.state_dict()["conv.weight"]
    assert torch.allclose(out["conv.weight"], w + 3.0 * (states[0]["conv.weight"] - w)
                          + 1.0 * (states[1]["conv.weight"] - w), atol=1e-6)


@pytest.mark.parametrize("method,params", [("task_arithmetic", {}), ("ties", dict(density=0.5)),
                                           ("pcb", dict(ratio=0.5)), ("dare", dict(p=0.5))])
def test_no_method_gives_a_negative_variance_or_nan_outputs(method, params):
    base, models = family()
    merged = merge_modules(base, models, method=method, **params).eval()
    assert bool((merged.bn.running_var >= 0).all())
    assert bool(torch.isfinite(merged(torch.randn(2, 3, 8, 8))).all())


def test_running_stats_base_takes_the_bases():
    base, models = family()
    out = merge(base.state_dict(), [m.state_dict() for m in models], method="task_arithmetic", running_stats="base")
    assert torch.equal(out["bn.running_var"], base.bn.running_var)
    assert torch.equal(out["bn.running_mean"], base.bn.running_mean)
    with pytest.raises(ValueError, match="running_stats='mean' is not valid"):
        merge(base.state_dict(), [m.state_dict() for m in models], running_stats="mean")
    with pytest.raises(ValueError, match="non-negative"):
        merge(base.state_dict(), [m.state_dict() for m in models], method="task_arithmetic", lambdas=[1.0, -1.0])


def test_fusion_bench_task_arithmetic_averages_them():
    base, models = family()
    pool = {"_pretrained_": base, "a": models[0], "b": models[1]}
    merged = fb.TaskArithmeticAlgorithm(scaling_factor=1.0).run(pool)
    assert torch.allclose(merged.bn.running_var, torch.full((4,), 0.25))


def test_a_buffer_named_running_var_without_a_counter_is_merged():
    # only a layer that tracks its statistics (num_batches_tracked) has them averaged
    base = {"x.running_var": torch.ones(3)}
    out = merge(base, [{"x.running_var": torch.full((3,), 0.2)}, {"x.running_var": torch.full((3,), 0.3)}],
                method="task_arithmetic")
    assert torch.allclose(out["x.running_var"], torch.full((3,), -0.5))


def test_a_non_finite_running_statistic_is_named():
    base, models = family()
    models[1].bn.running_var[0] = float("nan")
    with pytest.raises(ValueError, match="model 1, key 'bn.running_var'"):
        merge(base.state_dict(), [m.state_dict() for m in models], method="task_arithmetic")


@pytest.mark.parametrize("mode", ["average", "base"])
def test_a_merge_from_files_treats_running_statistics_as_a_merge_in_memory_does(tmp_path, mode):
    from pcb_fast import merge_checkpoints
    from pcb_fast.io.checkpoints import open_checkpoint
    from pcb_fast.io.folder import save_model

    base, models = family()
    save_model(base.state_dict(), tmp_path / "base")
    for i, m in enumerate(models):
        save_model(m.state_dict(), tmp_path / f"m{i}")
    report = {}
    merge_checkpoints(tmp_path / "base", [tmp_path / "m0", tmp_path / "m1"], tmp_path / "out", method="task_arithmetic",
                      lambdas=[3.0, 1.0], running_stats=mode, report=report)
    ck = open_checkpoint(tmp_path / "out", "out")
    got = {k: ck.read(k) for k in ck.keys()}
    ck.close()
    expected = merge(base.state_dict(), [m.state_dict() for m in models], method="task_arithmetic",
                     lambdas=[3.0, 1.0], running_stats=mode)
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
    assert bool((got["bn.running_var"] >= 0).all())  # task arithmetic would give 1 + 3(-0.8) + (-0.7) < 0
    assert sorted(report["running_stat_keys"]) == ["bn.running_mean", "bn.running_var"]


@pytest.mark.parametrize("method", ["task_arithmetic", "pcb"])
def test_the_coefficient_search_applies_running_statistics_as_a_merge_does(method):
    from pcb_fast import ContributionCache

    base, models = family()
    states = [m.state_dict() for m in models]
    cache = ContributionCache(base.state_dict(), states, method=method)
    for lambdas in ([3.0, 1.0], [0.9, 1.2]):
        got = cache.apply(lambdas, 1.0)
        expected = merge(base.state_dict(), states, method=method, lambdas=lambdas)
        assert all(torch.equal(got[k], expected[k]) for k in expected), lambdas
        assert bool((got["bn.running_var"] >= 0).all())
