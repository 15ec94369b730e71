"""Tied parameters and copies of the base among the models, through the Python API (docs/design.md 2.1).

A tied parameter (an LM head tied to the embedding) is one parameter: merged once and counted once,
as when the same model is read from a safetensors file that holds it once. A model equal to the base
is no task: left out as mergekit does, except by the average, which averages it.
"""

import pytest
import torch
from torch import nn

from pcb_fast import merge


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.body = nn.Linear(16, 16)
        self.head = nn.Linear(16, 50, bias=False)
        self.head.weight = self.embed.weight  # tied


def fine_tunes(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = TinyLM()
    with torch.no_grad():
        for p in base.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    models = []
    for _ in range(n):
        m = TinyLM()
        m.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in m.parameters():  # the tied weight is one parameter: changed once
                p.add_(0.01 * torch.randn(p.shape, generator=g))
        models.append(m)
    return base, models


def untied(state):
    return {k: v for k, v in state.items() if k != "head.weight"}


class HeadFirstLM(nn.Module):
    """transformers' naming: the head's key (lm_head.weight) sorts before the embedding's."""

    def __init__(self):
        super().__init__()
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(50, 16)
        self.lm_head = nn.Linear(16, 50, bias=False)
        self.lm_head.weight = self.model.embed_tokens.weight


def test_the_canonical_name_is_the_one_a_saved_file_keeps():
    # DARE's drops are keyed on the name; the tied group's name is the base's first
    # (the embedding, which transformers writes), not the alphabetically first (lm_head.weight)
    torch.manual_seed(0)
    base = HeadFirstLM()
    models = [HeadFirstLM() for _ in range(2)]
    for m in models:
        m.load_state_dict(base.state_dict())
        with torch.no_grad():
            m.lm_head.weight.add_(0.1 * torch.randn(50, 16))
    sd_base, sd_models = base.state_dict(), [m.state_dict() for m in models]
    report = {}
    got = merge(sd_base, sd_models, method="dare", p=0.5, seed=2, report=report)
    saved = merge({"model.embed_tokens.weight": sd_base["model.embed_tokens.weight"]},
                  [{"model.embed_tokens.weight": m["model.embed_tokens.weight"]} for m in sd_models],
                  method="dare", p=0.5, seed=2)
    assert report["aliases"] == {"lm_head.weight": "model.embed_tokens.weight"}
    assert torch.equal(got["lm_head.weight"], saved["model.embed_tokens.weight"])


@pytest.mark.parametrize("method,params", [
    ("pcb", dict(ratio=0.2)), ("pcb", dict(ratio=0.2, variant="paper")), ("dare", dict(p=0.5, seed=1)),
    ("ties", dict(density=0.3)), ("breadcrumbs", dict(gamma=0.1, beta=0.5)),
])
def test_a_tied_parameter_is_merged_once(method, params):
    base, models = fine_tunes()
    sd_base, sd_models = base.state_dict(), [m.state_dict() for m in models]
    assert sd_base["head.weight"].data_ptr() == sd_base["embed.weight"].data_ptr()
    report = {}
    got = merge(sd_base, sd_models, method=method, report=report, **params)
    # what a file with the parameter stored once gives (transformers' save_pretrained, the CLI)
    expected = merge(untied(sd_base), [untied(m) for m in sd_models], method=method, **params)
    assert got["head.weight"] is got["embed.weight"]
    for k in expected:
        assert torch.equal(got[k], expected[k]), k
    assert report["aliases"] == {"head.weight": "embed.weight"}
    assert "head.weight" not in report["merged_keys"]
    merged = TinyLM()
    merged.load_state_dict(got)
    assert torch.equal(merged.head.weight, expected["embed.weight"])


def test_a_model_whose_tied_names_disagree_is_refused():
    base, models = fine_tunes()
    bad = dict(models[1].state_dict())
    bad["head.weight"] = bad["head.weight"].clone() + 1.0
    with pytest.raises(ValueError, match="model 1: keys 'embed.weight' and 'head.weight' are one tied parameter of "
                                         "the base model but hold different values in this model"):
        merge(base.state_dict(), [models[0].state_dict(), bad])
    # untied but equal values (a model loaded from a file that stores both names) is accepted
    equal = {k: v.clone() for k, v in models[1].state_dict().items()}
    merge(base.state_dict(), [models[0].state_dict(), equal], method="task_arithmetic")


def test_exclude_may_not_split_a_tied_parameter():
    base, models = fine_tunes()
    with pytest.raises(ValueError, match="keys 'embed.weight' and 'head.weight' are one tied parameter of the base "
                                         "model, but only 'embed.weight' is merged"):
        merge(base.state_dict(), [m.state_dict() for m in models], exclude=["^head"])
    got = merge(base.state_dict(), [m.state_dict() for m in models], exclude=["^head", "^embed"])
    assert got["head.weight"] is got["embed.weight"]  # copied, and still one tensor
    assert torch.equal(got["head.weight"], base.embed.weight)


@pytest.mark.parametrize("method,params", [("pcb", dict(ratio=0.2)), ("ties", dict(density=0.3)),
                                           ("task_arithmetic", {})])
def test_the_base_listed_among_the_models_is_left_out(method, params):
    base, models = fine_tunes()
    sd_base, sd_models = base.state_dict(), [m.state_dict() for m in models]
    copy = {k: v.clone() for k, v in sd_base.items()}
    report = {}
    with pytest.warns(UserWarning, match="model 1 equals the base model: left out of the merge"):
        got = merge(sd_base, [sd_models[0], copy, sd_models[1], sd_models[2]], method=method, report=report,
                    lambdas=[1.0, 5.0, 0.5, 2.0], **params)
    expected = merge(sd_base, sd_models, method=method, lambdas=[1.0, 0.5, 2.0], **params)
    for k in expected:
        assert torch.equal(got[k], expected[k]), k
    assert report["dropped_models"] == ["model 1"]
    assert len(report["kept"]) == 3


def test_the_average_keeps_the_base_as_one_of_the_models():
    base = {"w": torch.zeros(4)}
    models = [{"w": torch.zeros(4)}, {"w": torch.full((4,), 3.0)}]
    assert torch.equal(merge(base, models, method="average")["w"], torch.full((4,), 1.5))


def test_a_copy_of_the_base_is_told_from_a_model_that_differs_anywhere():
    """A model equal to the base in its leading entries but not after them is a model, not a copy;
    equal everywhere (a copy, or the base's transposed view of itself) is the base."""
    from pcb_fast.io.tied import LEADING, same_as_base

    base = {"w": torch.randn(3 * LEADING), "v": torch.randn(64, 96)}
    late = {"w": base["w"].clone(), "v": base["v"].clone()}
    late["w"][-1] += 1.0
    early = {"w": base["w"].clone(), "v": base["v"].clone()}
    early["w"][0] += 1.0
    nan = {"w": base["w"].clone(), "v": base["v"].clone()}
    nan["w"][0] = float("nan")
    keys = ["w", "v"]
    assert not same_as_base(base, late, keys) and not same_as_base(base, early, keys)
    assert not same_as_base(base, nan, keys)
    assert same_as_base(base, {"w": base["w"].clone(), "v": base["v"].t().contiguous().t()}, keys)
    assert not same_as_base(base, {"w": base["w"].clone(), "v": base["v"].t().contiguous().t() + 1}, keys)


def test_every_model_equal_to_the_base_merges_to_the_base():
    base = {"w": torch.randn(10)}
    got = merge(base, [dict(base), {"w": base["w"].clone()}], method="pcb")
    assert torch.equal(got["w"], base["w"])


def test_the_contribution_cache_merges_a_tied_parameter_once():
    pytest.importorskip("cma")
    from pcb_fast.search import ContributionCache

    base, models = fine_tunes()
    sd_base, sd_models = base.state_dict(), [m.state_dict() for m in models]
    cache = ContributionCache(sd_base, sd_models, method="pcb", ratio=0.2)
    got = cache.apply([0.9, 1.1, 1.0], 0.8)
    expected = merge(sd_base, sd_models, method="pcb", ratio=0.2, lambdas=[0.9, 1.1, 1.0], lam=0.8)
    assert got["head.weight"] is got["embed.weight"]
    for k in expected:
        assert torch.equal(got[k], expected[k]), k
