"""merge() on state dicts: keys, dtypes, scope, exclude, properties of docs/design.md 9, and bad inputs."""

import random

import pytest
import torch

from pcb_fast import merge, pcb_merge
from pcb_fast.reference import pcb_official


def make_models(n=3, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = {"enc.weight": (64, 48), "enc.bias": (64,), "head.weight": (10, 64), "norm.weight": (64,)}
    base = {k: torch.randn(s, generator=g).to(dtype) for k, s in shapes.items()}
    base["steps"] = torch.tensor([3])
    models = []
    for _ in range(n):
        m = {k: (v.float() + torch.randn(v.shape, generator=g) * 0.01).to(dtype) if v.is_floating_point() else v.clone()
             for k, v in base.items()}
        models.append(m)
    return base, models


def flat_task_vectors(base, models, keys):
    return torch.stack([torch.cat([(m[k].float() - base[k].float()).reshape(-1) for k in keys]) for m in models])


def test_global_merge_equals_reference_on_concatenated_row():
    base, models = make_models()
    keys = sorted(k for k in base if base[k].is_floating_point())
    tau_m = pcb_official(flat_task_vectors(base, models, keys), ratio=0.2)
    out = merge(base, models, ratio=0.2, lam=0.7, block_width=100)
    offset = 0
    for k in keys:
        numel = base[k].numel()
        expected = (base[k].reshape(-1) + 0.7 * tau_m[offset : offset + numel]).view(base[k].shape)
        assert torch.equal(out[k], expected), k
        offset += numel
    assert torch.equal(out["steps"], base["steps"])


def test_reference_backend_equals_torch_backend_for_state_dicts():
    base, models = make_models(n=4)
    for scope in ("global", "tensor"):
        a = merge(base, models, scope=scope, ratio=0.3, inter="pairwise", backend="torch")
        b = merge(base, models, scope=scope, ratio=0.3, inter="pairwise", backend="reference")
        assert all(torch.equal(a[k], b[k]) for k in base), scope


def test_scope_tensor_merges_each_key_alone():
    base, models = make_models()
    out = merge(base, models, scope="tensor", ratio=0.1)
    for k in ("enc.weight", "head.weight"):
        tau_m = pcb_official(flat_task_vectors(base, models, [k]), ratio=0.1)
        assert torch.equal(out[k], base[k] + tau_m.view(base[k].shape)), k


def test_scope_tensor_equals_global_on_one_tensor_model():
    base, models = make_models()
    base = {"w": base["enc.weight"]}
    models = [{"w": m["enc.weight"]} for m in models]
    a, b = merge(base, models, scope="tensor"), merge(base, models, scope="global")
    assert torch.equal(a["w"], b["w"])


def test_key_order_does_not_matter():
    base, models = make_models()
    out = merge(base, models)
    keys = list(base)
    random.Random(0).shuffle(keys)
    shuffled = merge({k: base[k] for k in keys}, [{k: m[k] for k in reversed(keys)} for m in models])
    assert list(shuffled) == keys
    assert all(torch.equal(out[k], shuffled[k]) for k in base)


def test_streaming_state_dict_equals_in_memory_matrix():
    base, models = make_models()
    keys = sorted(k for k in base if base[k].is_floating_point())
    tv = flat_task_vectors(base, models, keys)
    out = merge(base, models, lam=1.0, block_width=33)
    offset = 0
    tau_m = pcb_merge(tv)
    for k in keys:
        numel = base[k].numel()
        assert torch.equal(out[k].reshape(-1), base[k].reshape(-1) + tau_m[offset : offset + numel])
        offset += numel


def test_permuting_models_changes_nothing_beyond_rounding():
    base, models = make_models(n=4, seed=3)
    out = merge(base, models)
    permuted = merge(base, [models[i] for i in (2, 0, 3, 1)])
    # Task sums run in another order, so scores may move by an ulp; a kept/not-kept flip at the
    # threshold would show as a large difference: report how many entries moved beyond 1e-6.
    moved = sum(int(((out[k] - permuted[k]).abs() > 1e-6).sum()) for k in base if base[k].is_floating_point())
    total = sum(base[k].numel() for k in base)
    print(f"permuted models: {moved} of {total} entries differ beyond 1e-6")
    assert moved <= 2


def test_bf16_models_keep_dtype_and_merge_in_float32():
    base, models = make_models(dtype=torch.bfloat16)
    out = merge(base, models, ratio=0.2)
    assert all(out[k].dtype == base[k].dtype for k in base)
    ref = merge(base, models, ratio=0.2, backend="reference")
    assert all(torch.equal(out[k], ref[k]) for k in base)


def test_exclude_and_lambdas():
    base, models = make_models()
    out = merge(base, models, exclude=[r"norm\.", r"bias$"], lambdas=[1.0, 0.5, 2.0])
    assert torch.equal(out["norm.weight"], base["norm.weight"])
    assert torch.equal(out["enc.bias"], base["enc.bias"])
    assert not torch.equal(out["enc.weight"], base["enc.weight"])
    keys = ["enc.weight", "head.weight"]
    tau_m = pcb_official(flat_task_vectors(base, models, keys), lambdas=[1.0, 0.5, 2.0])
    assert torch.equal(out["enc.weight"].reshape(-1), base["enc.weight"].reshape(-1) + tau_m[: 64 * 48])


def test_paper_variant_through_merge():
    base, models = make_models()
    a = merge(base, models, variant="paper", ratio=0.3)
    b = merge(base, models, variant="paper", ratio=0.3, backend="reference")
    for k in base:
        assert torch.allclose(a[k], b[k], atol=1e-5), k


# ---- bad inputs: one ValueError naming the value, the model/key and the valid range

@pytest.mark.parametrize("kwargs,message", [
    (dict(ratio=0), "ratio=0 is out of range; valid: 0 < ratio <= 1"),
    (dict(ratio=1.5), "ratio=1.5 is out of range"),
    (dict(clamp_ratio=0.5), "clamp_ratio=0.5 is out of range; valid: 0 <= clamp_ratio < 0.5"),
    (dict(clamp_ratio=-0.1), "clamp_ratio=-0.1 is out of range"),
    (dict(inter="max"), "inter='max' is not valid"),
    (dict(variant="v2"), "variant='v2' is not valid"),
    (dict(lambdas=[1.0]), "lambdas has 1 values but there are 3 models"),
    (dict(lambdas=[1.0, float("nan"), 1.0]), "must all be finite"),
    (dict(backend="cuda"), "backend='cuda' is not valid"),
])
def test_pcb_merge_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        pcb_merge(torch.randn(3, 50), **kwargs)


def test_triton_backend_on_cpu_needs_the_interpreter(monkeypatch):
    # as if TRITON_INTERPRET were unset: the variable itself stays, since triton reads it once per
    # process and every later test's kernels must still run under the interpreter
    from pcb_fast.core import backends

    monkeypatch.setattr(backends, "interpreting", lambda: False)
    with pytest.raises(ValueError, match="backend='triton' needs CUDA tensors, got tensors on cpu"):
        pcb_merge(torch.randn(3, 50), backend="triton")


def test_pcb_merge_bad_inputs():
    with pytest.raises(ValueError, match="at least one fine-tuned model"):
        pcb_merge(torch.zeros(0, 10))
    with pytest.raises(ValueError, match="at least one fine-tuned model"):
        pcb_merge([])
    with pytest.raises(ValueError, match=r"different sizes \[10, 11\]"):
        pcb_merge([torch.zeros(10), torch.zeros(11)])
    with pytest.raises(ValueError, match="dtype torch.int64; valid: a floating dtype"):
        pcb_merge(torch.ones(2, 10, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"shape \(10,\); expected \[n, D\]"):
        pcb_merge(torch.ones(10))
    with pytest.raises(ValueError, match="backend='torch' merges CPU tensors only, got tensors on meta"):
        pcb_merge(torch.zeros(2, 10, device="meta"))
    with pytest.raises(ValueError, match="task vector 1 is on meta but task vector 0 is on cpu"):
        pcb_merge([torch.zeros(10), torch.zeros(10, device="meta")])
    bad = torch.randn(3, 100)
    bad[2, 40] = float("nan")
    with pytest.raises(ValueError, match="task vector 2: contains NaN or Inf"):
        pcb_merge(bad)
    bad[2, 40] = float("inf")
    with pytest.raises(ValueError, match="task vector 2: contains NaN or Inf"):
        pcb_merge(bad, variant="paper")


def test_merge_bad_inputs():
    base, models = make_models()
    with pytest.raises(ValueError, match="model 1, key 'enc.weight': shape \\(64, 47\\) but the base has \\(64, 48\\)"):
        merge(base, [models[0], {**models[1], "enc.weight": torch.zeros(64, 47)}, models[2]])
    with pytest.raises(ValueError, match="model 2 lacks key 'head.weight'"):
        merge(base, models[:2] + [{k: v for k, v in models[2].items() if k != "head.weight"}])
    with pytest.raises(ValueError, match="model 0 has key 'extra' that the base model lacks"):
        merge(base, [{**models[0], "extra": torch.zeros(1)}] + models[1:])
    with pytest.raises(ValueError, match="model 0, key 'enc.bias': torch.int64 where the base has a floating tensor"):
        merge(base, [{**models[0], "enc.bias": torch.zeros(64, dtype=torch.int64)}] + models[1:])
    nan_model = {**models[1], "head.weight": models[1]["head.weight"].clone()}
    nan_model["head.weight"][3, 3] = float("nan")
    with pytest.raises(ValueError, match="model 1, key 'head.weight': contains NaN or Inf"):
        merge(base, [models[0], nan_model, models[2]])
    with pytest.raises(ValueError, match="method='rams' is not valid; choose one of 'pcb', 'average'"):
        merge(base, models, method="rams")
    with pytest.raises(ValueError, match="method 'pcb' has no parameter 'density'"):
        merge(base, models, density=0.2)
    with pytest.raises(ValueError, match="scope='layer' is not valid"):
        merge(base, models, scope="layer")
    with pytest.raises(ValueError, match="exclude pattern '\\(' is not a valid regular expression"):
        merge(base, models, exclude=["("])
    with pytest.raises(ValueError, match="at least one fine-tuned model"):
        merge(base, [])


def test_an_exclude_pattern_that_matches_nothing_warns():
    base = {"w": torch.zeros(4), "b": torch.zeros(2)}
    models = [{"w": torch.ones(4), "b": torch.ones(2)}]
    with pytest.warns(UserWarning, match="exclude pattern .* matches no key of the base model; it excludes nothing"):
        merged = merge(base, models, method="task_arithmetic", exclude=[r"\.b$"])
    assert torch.equal(merged["b"], torch.ones(2))  # merged, as the pattern excluded nothing
    merged = merge(base, models, method="task_arithmetic", exclude=[r"^b$"])  # the Quickstart's pattern
    assert torch.equal(merged["b"], torch.zeros(2))


def test_quickstart_runs():
    """The README's Quickstart block, run as written."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme[readme.index("## Quickstart"):]
    code = re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. an exclude pattern that matches nothing
        namespace = {}
        exec(compile(code, "README Quickstart", "exec"), namespace)
    assert torch.equal(namespace["merged"]["b"], namespace["base"]["b"])
    assert namespace["tau_m"].shape == (100_000,)


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_non_contiguous_state_dicts_merge_as_their_contiguous_copies(backend):
    g = torch.Generator().manual_seed(3)
    base = {"w": torch.randn(8, 6, generator=g).t(),  # a transposed view
            "conv": torch.randn(4, 3, 5, 5, generator=g).to(memory_format=torch.channels_last)}
    models = [{k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(3)]
    for method, params in [("pcb", {}), ("ties", {}), ("dare", dict(p=0.5))]:
        got = merge(base, models, method=method, backend=backend, **params)
        expected = merge({k: v.contiguous() for k, v in base.items()},
                         [{k: v.contiguous() for k, v in m.items()} for m in models], method=method, backend=backend,
                         **params)
        for k in base:
            assert torch.equal(got[k], expected[k]), (method, k)


def test_tensors_that_require_grad_are_read_as_data():
    base = {"w": torch.randn(8, 6, requires_grad=True)}
    models = [{"w": (base["w"] + 0.01 * torch.randn(8, 6)).detach().requires_grad_()} for _ in range(2)]
    plain = [{"w": m["w"].detach()} for m in models]
    for method in ("pcb", "ties", "task_arithmetic", "breadcrumbs"):
        got = merge(base, models, method=method)
        assert not got["w"].requires_grad
        assert torch.equal(got["w"], merge({"w": base["w"].detach()}, plain, method=method)["w"])
    tv = torch.randn(3, 50, requires_grad=True)
    assert torch.equal(pcb_merge(tv), pcb_merge(tv.detach()))


def test_a_float64_base_keeps_its_values_where_nothing_changes():
    # theta = theta_pre + lam * tau_m is taken in float64 for a float64 base: unchanged entries are
    # the base's own values, not their float32 roundings
    g = torch.Generator().manual_seed(5)
    base = {"w": torch.randn(40, 30, generator=g, dtype=torch.float64) + 1 / 3}
    assert not torch.equal(base["w"].float().double(), base["w"])  # float32 would change them
    same = merge(base, [dict(base), {"w": base["w"].clone()}], method="task_arithmetic")
    assert same["w"].dtype == torch.float64 and torch.equal(same["w"], base["w"])
    tuned = [{"w": base["w"] + 0.01 * torch.randn(40, 30, generator=g, dtype=torch.float64)} for _ in range(3)]
    for method in ("pcb", "ties"):
        got = merge(base, tuned, method=method)
        untouched = got["w"] == base["w"]
        assert untouched.any()  # entries nobody kept are the base's, exactly
        assert torch.equal(got["w"], merge(base, tuned, method=method, backend="reference")["w"])


def test_search_apply_equals_merge_for_a_float64_base():
    pytest.importorskip("cma")
    from pcb_fast.search import ContributionCache

    g = torch.Generator().manual_seed(6)
    base = {"w": torch.randn(40, 30, generator=g, dtype=torch.float64)}
    tuned = [{"w": base["w"] + 0.01 * torch.randn(40, 30, generator=g, dtype=torch.float64)} for _ in range(3)]
    for method in ("pcb", "task_arithmetic"):
        cache = ContributionCache(base, tuned, method=method)
        got = cache.apply([0.9, 1.2, 1.0], 0.7)
        assert torch.equal(got["w"], merge(base, tuned, method=method, lambdas=[0.9, 1.2, 1.0], lam=0.7)["w"])
