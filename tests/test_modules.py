"""merge_modules: a merged copy of an nn.Module (tied parameters kept tied, inputs untouched)."""

import pytest
import torch
from torch import nn

from pcb_fast import merge, merge_modules


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x):
        q, k, v = self.qkv(self.norm(x)).chunk(3, dim=-1)
        att = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
        x = x + self.proj(att @ v)
        return x + self.mlp(x)


class TinyTransformer(nn.Module):
    """A transformer-like module: tied embeddings, a frozen positional table, float and int buffers."""

    def __init__(self, vocab=40, d=16, layers=2):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.zeros(8, d), requires_grad=False)  # frozen
        self.blocks = nn.ModuleList(Block(d) for _ in range(layers))
        self.bn = nn.BatchNorm1d(d)  # running_mean/var (float) and num_batches_tracked (int64) buffers
        self.register_buffer("rope", torch.zeros(d))  # a persistent float buffer
        self.register_buffer("cache", torch.zeros(3), persistent=False)  # not in the state dict
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.embed.weight  # tied

    def forward(self, ids):
        x = self.embed(ids) + self.pos[: ids.shape[-1]]
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def family(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = TinyTransformer()
    with torch.no_grad():
        for t in list(base.parameters()) + [base.bn.running_mean, base.bn.running_var, base.rope, base.cache]:
            value = torch.randn(t.shape, generator=g)
            t.copy_(value.abs() if t is base.bn.running_var else value)
        base.bn.num_batches_tracked.fill_(7)
    models = []
    for _ in range(n):
        m = TinyTransformer()
        m.load_state_dict(base.state_dict())
        with torch.no_grad():
            for t in list(m.parameters()) + [m.bn.running_mean, m.rope, m.cache]:
                t.add_(0.01 * torch.randn(t.shape, generator=g))
            m.bn.num_batches_tracked.fill_(100)
        models.append(m)
    return base, models


def snapshot(module):
    return ({k: v.clone() for k, v in module.state_dict().items()}, module.cache.clone(),
            {k: (id(p), p.requires_grad) for k, p in module.named_parameters(remove_duplicate=False)})


def assert_unchanged(module, before):
    state, cache, params = before
    now = module.state_dict()
    assert now.keys() == state.keys()
    for k in state:
        assert torch.equal(now[k], state[k]), k
    assert torch.equal(module.cache, cache)
    assert {k: (id(p), p.requires_grad) for k, p in module.named_parameters(remove_duplicate=False)} == params
    assert module.head.weight is module.embed.weight


@pytest.mark.parametrize("method,params", [
    ("pcb", dict(ratio=0.2)), ("ties", dict(density=0.3)), ("dare", dict(p=0.5, seed=3)),
    ("task_arithmetic", dict(lam=0.7)), ("pcb", dict(ratio=0.3, scope="tensor", lambdas=[1.0, 0.8, 1.2])),
])
def test_equals_merge_on_the_state_dicts(method, params):
    base, models = family()
    expected = merge(base.state_dict(), [m.state_dict() for m in models], method=method, **params)
    merged = merge_modules(base, models, method=method, **params)
    got = merged.state_dict()
    assert got.keys() == expected.keys()
    for k in expected:
        assert got[k].dtype == expected[k].dtype and torch.equal(got[k], expected[k]), k
    assert not torch.equal(got["embed.weight"], base.embed.weight)  # something was merged


def test_tied_parameters_stay_tied_and_flags_are_the_bases():
    base, models = family()
    base.eval()
    merged = merge_modules(base, models, method="pcb", ratio=0.2)
    assert merged.head.weight is merged.embed.weight
    assert sum(1 for _ in merged.parameters()) == sum(1 for _ in base.parameters())  # one parameter, not two
    assert isinstance(merged.embed.weight, nn.Parameter)
    for (name, p), (_, q) in zip(merged.named_parameters(), base.named_parameters()):
        assert p.requires_grad == q.requires_grad, name
        assert p.grad is None
    assert not merged.pos.requires_grad and merged.embed.weight.requires_grad
    assert not merged.training  # the base's mode
    # training the merged copy moves the tied parameter once, under both names, and nothing of the base
    before = snapshot(base)
    merged.train()
    loss = merged(torch.tensor([[1, 2, 3, 4]])).logsumexp(-1).mean()
    loss.backward()
    with torch.no_grad():
        for p in merged.parameters():
            if p.grad is not None:
                p.sub_(0.1 * p.grad)
    assert merged.head.weight is merged.embed.weight
    assert_unchanged(base, before)


def test_the_inputs_are_untouched_and_share_nothing_with_the_result():
    base, models = family()
    for m in [base] + models:  # a gradient left on an input is neither copied nor cleared
        m.embed.weight.grad = torch.ones_like(m.embed.weight)
    before = [snapshot(m) for m in [base] + models]
    merged = merge_modules(base, models, method="ties", density=0.3)
    for m, b in zip([base] + models, before):
        assert_unchanged(m, b)
        assert torch.equal(m.embed.weight.grad, torch.ones_like(m.embed.weight))
    assert merged.embed.weight.grad is None
    inputs = {t.untyped_storage().data_ptr() for m in [base] + models
              for t in list(m.parameters()) + list(m.buffers())}
    assert not inputs & {t.untyped_storage().data_ptr() for t in list(merged.parameters()) + list(merged.buffers())}


def test_buffers():
    base, models = family()
    merged = merge_modules(base, models, method="task_arithmetic")
    expected = merge(base.state_dict(), [m.state_dict() for m in models], method="task_arithmetic")
    # floating buffers are merged
    assert torch.equal(merged.bn.running_mean, expected["bn.running_mean"])
    assert not torch.equal(merged.bn.running_mean, base.bn.running_mean)
    assert torch.equal(merged.rope, expected["rope"]) and not torch.equal(merged.rope, base.rope)
    assert torch.equal(merged.bn.running_var, base.bn.running_var)  # the models did not change it
    # integer buffers are the base's; a non-persistent buffer is not in the state dict: the base's
    assert int(merged.bn.num_batches_tracked) == 7 and merged.bn.num_batches_tracked.dtype == torch.int64
    assert torch.equal(merged.cache, base.cache)
    assert merged.cache.data_ptr() != base.cache.data_ptr()
    assert "cache" in dict(merged.named_buffers()) and "cache" not in merged.state_dict()


def test_excluded_keys_come_from_the_base():
    base, models = family()
    merged = merge_modules(base, models, method="pcb", ratio=0.2, exclude=[r"^blocks\.0\."])
    for k, v in base.state_dict().items():
        if k.startswith("blocks.0."):
            assert torch.equal(merged.state_dict()[k], v), k
    assert not torch.equal(merged.blocks[1].qkv.weight, base.blocks[1].qkv.weight)


def test_layouts_and_dtypes_are_the_bases():
    conv = nn.Conv2d(3, 8, 3).to(memory_format=torch.channels_last).to(torch.bfloat16)
    fine = []
    for i in range(2):
        m = nn.Conv2d(3, 8, 3).to(memory_format=torch.channels_last).to(torch.bfloat16)
        m.load_state_dict(conv.state_dict())
        with torch.no_grad():
            m.weight.add_(0.05 * (i + 1))
        fine.append(m)
    merged = merge_modules(conv, fine, method="average")
    assert merged.weight.dtype == torch.bfloat16
    assert merged.weight.is_contiguous(memory_format=torch.channels_last)
    expected = merge(conv.state_dict(), [m.state_dict() for m in fine], method="average")
    assert torch.equal(merged.weight, expected["weight"])


class Renamed(nn.Module):
    """A module whose state dict names its weight differently from the attribute (hooks)."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(4, 4)
        self._register_state_dict_hook(Renamed._save)
        self._register_load_state_dict_pre_hook(Renamed._load)

    @staticmethod
    def _save(module, state, prefix, local):
        for key in [k for k in state if k.startswith(prefix + "inner.")]:
            state[prefix + "renamed." + key[len(prefix + "inner."):]] = state.pop(key)

    @staticmethod
    def _load(state, prefix, *args):
        for key in [k for k in state if k.startswith(prefix + "renamed.")]:
            state[prefix + "inner." + key[len(prefix + "renamed."):]] = state.pop(key)


class WithExtraState(nn.Linear):
    def __init__(self):
        super().__init__(4, 4)
        self.note = {"calibrated": True}

    def get_extra_state(self):
        return self.note

    def set_extra_state(self, state):
        self.note = state


def test_modules_whose_state_dicts_rename_keys_or_hold_extra_state():
    g = torch.Generator().manual_seed(5)
    for cls in (Renamed, WithExtraState):
        base = cls()
        models = []
        for _ in range(2):
            m = cls()
            m.load_state_dict(base.state_dict())
            with torch.no_grad():
                for p in m.parameters():
                    p.add_(0.1 * torch.randn(p.shape, generator=g))
            models.append(m)
        tensors = lambda s: {k: v for k, v in s.items() if isinstance(v, torch.Tensor)}  # noqa: E731
        expected = merge(tensors(base.state_dict()), [tensors(m.state_dict()) for m in models],
                         method="task_arithmetic")
        merged = merge_modules(base, models, method="task_arithmetic")
        got = tensors(merged.state_dict())
        assert got.keys() == expected.keys()
        for k in expected:
            assert torch.equal(got[k], expected[k]), (cls.__name__, k)
        if cls is WithExtraState:
            assert merged.note == {"calibrated": True} and merged.note is not base.note


def test_bad_inputs_are_one_line_value_errors():
    base, models = family()
    with pytest.raises(ValueError, match="base_module is a OrderedDict, expected a torch.nn.Module"):
        merge_modules(base.state_dict(), models)
    with pytest.raises(ValueError, match="single torch.nn.Module"):
        merge_modules(base, models[0])
    with pytest.raises(ValueError, match=r"modules\[1\] is a OrderedDict"):
        merge_modules(base, [models[0], models[1].state_dict()])
    with pytest.raises(ValueError, match="at least one"):
        merge_modules(base, [])
    other = TinyTransformer(vocab=41)
    with pytest.raises(ValueError, match="shape"):
        merge_modules(base, [models[0], other])
    with pytest.raises(ValueError, match="ratio"):
        merge_modules(base, models, ratio=2.0)
    assert base.head.weight is base.embed.weight
