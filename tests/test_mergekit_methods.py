"""mergekit's other merge methods (slerp, ...), run by mergekit 0.1.5 itself and by `pcb-fast merge
--config` on small Llama-style models in float32 and bfloat16, with tied and untied heads: the
outputs must be equal entry for entry (pcb_fast/methods/slerp.py, ...)."""

import json

import pytest
import torch
import yaml

safetensors_torch = pytest.importorskip("safetensors.torch")
mk_config = pytest.importorskip("mergekit.config")
mk_merge = pytest.importorskip("mergekit.merge")
mk_slerp = pytest.importorskip("mergekit.merge_methods.slerp")

from pcb_fast import merge  # noqa: E402
from pcb_fast.cli import main as cli  # noqa: E402
from pcb_fast.methods.slerp import slerp  # noqa: E402
from pcb_test_helpers import TaskVectorIndex, assert_config_refused  # noqa: E402
from pcb_test_helpers import assert_equal_states as assert_equal  # noqa: E402
from pcb_test_helpers import llama_state as shared_llama_state  # noqa: E402
from pcb_test_helpers import save_llama_folder  # noqa: E402
from pcb_test_helpers import slices_read  # noqa: E402

LAYERS, HIDDEN, INTER, VOCAB = 4, 32, 48, 40  # every tensor under 32768 entries: torch reduces it on one thread


def llama_state(g, tied):
    return shared_llama_state(g, LAYERS, HIDDEN, INTER, VOCAB, tied=tied)


def save_llama(folder, state, dtype, tied):
    return save_llama_folder(folder, state, dtype, tied, LAYERS, HIDDEN, INTER, VOCAB)


def sparse_change(shape, g):
    """A change of about a third of the entries (some of them by less than RAM's default epsilon)."""
    changed = (torch.rand(shape, generator=g) < 0.3) * 0.05 * torch.randn(shape, generator=g)
    return changed + (torch.rand(shape, generator=g) < 0.1) * 4e-6


KINDS = [(torch.float32, False), (torch.bfloat16, False), (torch.float32, True), (torch.bfloat16, True)]


@pytest.fixture(scope="module", params=KINDS, ids=["fp32", "bf16", "fp32-tied", "bf16-tied"])
def family(request, tmp_path_factory):
    """A base and fine-tunes: "near" (every tensor within mergekit's colinear threshold of the base: the
    lerp fallback), "far" (true spherical interpolation), "mixed" (far in the attention, near
    elsewhere) and "sparse0".."sparse2" (changing a third of the entries, overlapping, as RL updates)."""
    dtype, tied = request.param
    tmp = tmp_path_factory.mktemp("family")
    g = torch.Generator().manual_seed(5)
    base = llama_state(g, tied)
    near = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    far = {k: v + torch.randn(v.shape, generator=g) for k, v in base.items()}
    mixed = {k: v + (1.0 if "self_attn" in k else 0.01) * torch.randn(v.shape, generator=g) for k, v in base.items()}
    sparse = [{k: v + sparse_change(v.shape, g) for k, v in base.items()} for _ in range(3)]
    paths = {name: save_llama(tmp / name, m, dtype, tied) for name, m in
             [("base", base), ("near", near), ("far", far), ("mixed", mixed)]
             + [(f"sparse{i}", m) for i, m in enumerate(sparse)]}
    return tmp, paths


def run_both(raw, tmp):
    """The config run by mergekit and by pcb-fast: (theirs, ours) state dicts."""
    config = mk_config.MergeConfiguration.model_validate(raw)
    mk_merge.run_merge(config, str(tmp / "mergekit"), mk_merge.MergeOptions(copy_tokenizer=False, quiet=True))
    (tmp / "merge.yaml").write_text(yaml.safe_dump(raw))
    assert cli(["merge", "--config", str(tmp / "merge.yaml"), "--out", str(tmp / "ours"), "--quiet"]) == 0
    theirs = safetensors_torch.load_file(tmp / "mergekit" / "model.safetensors")
    ours = safetensors_torch.load_file(tmp / "ours" / "model.safetensors")
    return theirs, ours


T_FILTERS = [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
             {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]}, {"value": 0.5}]

SLERP_CONFIGS = [
    ("t scalar, far model, the base listed", ["base", "far"], {"t": 0.3}),
    ("t gradients and filters, mixed model", ["base", "mixed"], {"t": T_FILTERS}),
    ("t filters, near model (the lerp fallback), the base not listed", ["near"], {"t": T_FILTERS}),
    ("t outside [0, 1], far model", ["far", "base"], {"t": [1.2, -0.1]}),
]


@pytest.mark.parametrize("name,models,parameters", SLERP_CONFIGS, ids=[c[0] for c in SLERP_CONFIGS])
def test_slerp_equals_mergekit(family, tmp_path, name, models, parameters):
    _, paths = family
    raw = {"merge_method": "slerp", "base_model": paths["base"], "models": [{"model": paths[m]} for m in models],
           "parameters": parameters}
    theirs, ours = run_both(raw, tmp_path)
    assert_equal(theirs, ours)


def test_slerp_function_is_mergekits_bit_for_bit():
    """Both branches (spherical, and the lerp of nearly colinear or opposite tensors), zero vectors,
    several chunks of 2^20 entries, t outside [0, 1]; float32, bfloat16 and float16 values."""
    g = torch.Generator().manual_seed(3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # mergekit's sums over more than 32768 entries depend on the thread count
    try:
        for shape in [(64, 48), (7,), (0,), (1100, 1000)]:
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                a = torch.randn(shape, generator=g).to(dtype)
                for b in ((a.float() + 0.5 * torch.randn(shape, generator=g)).to(dtype), (a.float() * 3).to(dtype),
                          (-a.float()).to(dtype), torch.zeros(shape, dtype=dtype)):
                    for t in (0.0, 0.25, 1.0, 1.3, -0.4):
                        theirs = mk_slerp.slerp(torch.tensor([t]), a.unsqueeze(0), b.unsqueeze(0))[0]
                        assert torch.equal(slerp(t, a.float(), b.float()).to(dtype), theirs), (shape, dtype, t)
    finally:
        torch.set_num_threads(threads)


def test_slerp_in_memory_and_its_errors():
    g = torch.Generator().manual_seed(4)
    base = {"w": torch.randn(8, 6, generator=g), "steps": torch.tensor([3])}
    other = {"w": base["w"] + torch.randn(8, 6, generator=g), "steps": torch.tensor([3])}
    out = merge(base, [other], method="slerp", t=0.4)
    assert torch.equal(out["w"], slerp(0.4, base["w"], other["w"])) and torch.equal(out["steps"], base["steps"])
    assert torch.equal(merge(base, [other], method="slerp", t=0.0)["w"], base["w"])
    with pytest.raises(ValueError, match="slerp interpolates the base model and exactly one other model; got 2"):
        merge(base, [other, other], method="slerp", t=0.4)
    with pytest.raises(ValueError, match="method 'slerp' takes no per-model weights"):
        merge(base, [other], method="slerp", t=0.4, lambdas=[0.5])
    with pytest.raises(ValueError, match=r"t=nan must be a finite number"):
        merge(base, [other], method="slerp", t=float("nan"))
    with pytest.raises(ValueError, match="runs on backends 'torch' in this version, not on 'reference'"):
        merge(base, [other], method="slerp", t=0.4, backend="reference")
    bad = {"w": other["w"].clone(), "steps": other["steps"]}
    bad["w"][1, 2] = float("nan")
    with pytest.raises(ValueError, match="model 0, key 'w': contains NaN or Inf"):
        merge(base, [bad], method="slerp", t=0.4)


@pytest.mark.parametrize("change,message", [
    (dict(parameters={}), "slerp needs parameters.t (interpolation factor: 0 gives the base model"),
    (dict(models=["base", "near", "far"]), "slerp interpolates the base model and exactly one other model; got 2 "
                                           "others"),
    (dict(parameters={"t": 0.5, "tt": 2}), "parameters.tt is not a parameter of slerp (did you mean 't'?)"),
    (dict(parameters={"t": "half"}), "parameters.t='half' must be a number"),
])
def test_slerp_config_errors(family, tmp_path, capsys, change, message):
    _, paths = family
    raw = {"merge_method": "slerp", "base_model": paths["base"], "models": [{"model": paths["far"]}],
           "parameters": {"t": 0.5}}
    if "models" in change:
        change = dict(change, models=[{"model": paths[m]} for m in change["models"]])
    raw.update(change)
    assert_config_refused(tmp_path, capsys, raw, message)


def test_slerp_filter_without_default_names_the_tensor(family, tmp_path, capsys):
    _, paths = family
    raw = {"merge_method": "slerp", "base_model": paths["base"], "models": [{"model": paths["far"]}],
           "parameters": {"t": [{"filter": "self_attn", "value": 0.5}]}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    assert cli(["merge", "--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "out")]) == 2
    assert "parameters.t has filters but no value without filter" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    # merged in memory with such a rule (segment_params giving no t): the tensor is named
    base = {"a.weight": torch.ones(3), "b.weight": torch.ones(3)}
    with pytest.raises(ValueError, match="slerp needs t for every tensor; none is given for 'b.weight'"):
        merge(base, [{k: v * 2 for k, v in base.items()}], method="slerp", scope="tensor",
              segment_params=lambda key: {"t": 0.5 if key.startswith("a") else None})


# name, config (paths by the family's names; "weight" per model where given), the families it runs on
METHOD_CONFIGS = [
    ("model_stock", {"merge_method": "model_stock", "base_model": "base", "models": ["near", "far", "mixed"]}),
    ("model_stock, filter_wise, the base listed", {
        "merge_method": "model_stock", "base_model": "base", "models": ["base", "far", "mixed"],
        "parameters": {"filter_wise": True}}),
    ("nearswap", {"merge_method": "nearswap", "base_model": "base", "models": ["far"], "parameters": {"t": 0.5}}),
    ("nearswap, t gradient", {"merge_method": "nearswap", "base_model": "base", "models": ["mixed"],
                              "parameters": {"t": [0.001, 1.0]}}),
    ("nuslerp with a base", {"merge_method": "nuslerp", "base_model": "base",
                             "models": [("far", {"weight": 0.3}), ("mixed", {"weight": 0.7})]}),
    ("nuslerp without a base, per column", {
        "merge_method": "nuslerp", "models": [("far", {"weight": 1.0}), ("mixed", {"weight": 2.0})],
        "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True}}),
    ("nuslerp without a base, per row", {
        "merge_method": "nuslerp", "models": [("near", {"weight": 1.0}), ("far", {"weight": 1.0})],
        "parameters": {"nuslerp_flatten": False}}),
    ("multislerp with a base", {"merge_method": "multislerp", "base_model": "base",
                                "models": [("far", {"weight": 0.5}), ("mixed", {"weight": 1.0}), ("near", {"weight": 0.2})]}),
    ("multislerp without a base, weights not normalised", {
        "merge_method": "multislerp", "models": [("far", {"weight": 0.5}), ("mixed", {"weight": 0.8})],
        "parameters": {"normalize_weights": False}}),
    ("karcher, the base added as an input", {"merge_method": "karcher", "base_model": "base",
                                             "models": ["far", "mixed", "near"]}),
    ("karcher without a base, max_iter", {"merge_method": "karcher", "models": ["far", "mixed"],
                                          "parameters": {"max_iter": 3}}),
    ("sce, select_topk", {"merge_method": "sce", "base_model": "base", "models": ["near", "far", "mixed"],
                          "parameters": {"select_topk": 0.5}}),
    ("sce", {"merge_method": "sce", "base_model": "base", "models": ["far", "mixed"]}),
    ("arcee_fusion", {"merge_method": "arcee_fusion", "base_model": "base", "models": ["base", "far"]}),
    ("ram", {"merge_method": "ram", "base_model": "base", "models": ["sparse0", "sparse1", "sparse2"]}),
    ("ram, epsilon filters, the base listed", {
        "merge_method": "ram", "base_model": "base", "models": ["base", "sparse1", "near", "sparse2"],
        "parameters": {"epsilon": [{"filter": "mlp", "value": 0.02}, {"value": 1e-6}]}}),
    ("ramplus_tl", {"merge_method": "ramplus_tl", "base_model": "base", "models": ["sparse0", "sparse1", "sparse2"]}),
    ("ramplus_tl, r, alpha, epsilon gradient", {
        "merge_method": "ramplus_tl", "base_model": "base", "models": ["sparse2", "sparse0", "mixed"],
        "parameters": {"r": 0.5, "alpha": 2.0, "epsilon": [1e-6, 0.03]}}),
]


def config_of(spec, paths):
    raw = {k: v for k, v in spec.items() if k not in ("models", "base_model")}
    if "base_model" in spec:
        raw["base_model"] = paths[spec["base_model"]]
    raw["models"] = [{"model": paths[m]} if isinstance(m, str) else {"model": paths[m[0]], "parameters": m[1]}
                     for m in spec["models"]]
    return raw


@pytest.mark.parametrize("name,spec", METHOD_CONFIGS, ids=[c[0] for c in METHOD_CONFIGS])
def test_weight_space_methods_equal_mergekit(family, tmp_path, name, spec):
    """float32 models: equal with pcb_fast's default float32 arithmetic. bfloat16 models: mergekit
    computes in bfloat16, which --compute-dtype mergekit reproduces (equal); float32 arithmetic, the
    default, is more exact and differs from it by bfloat16 rounding (in a third to a half of the
    entries here: mergekit rounds every intermediate result)."""
    _, paths = family
    raw = config_of(spec, paths)
    config = mk_config.MergeConfiguration.model_validate(raw)
    mk_merge.run_merge(config, str(tmp_path / "mergekit"), mk_merge.MergeOptions(copy_tokenizer=False, quiet=True))
    theirs = safetensors_torch.load_file(tmp_path / "mergekit" / "model.safetensors")
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(raw))
    bf16 = next(iter(safetensors_torch.load_file(f"{paths['base']}/model.safetensors").values())).dtype == torch.bfloat16
    flags = ["--compute-dtype", "mergekit"] if bf16 else []
    assert cli(["merge", "--config", str(tmp_path / "merge.yaml"), "--out", str(tmp_path / "ours"), "--quiet"]
               + flags) == 0
    if spec["merge_method"] in ("arcee_fusion", "ramplus_tl") and bf16:
        # mergekit's float32 0/1 mask (arcee_fusion) or lambda_i (ramplus_tl) promotes the bfloat16 result,
        # which it writes as float32; pcb-fast keeps the models' dtype: the same values once rounded to it
        assert all(v.dtype == torch.float32 for k, v in theirs.items()
                   if "norm" not in k or spec["merge_method"] == "ramplus_tl")
        theirs = {k: v.to(torch.bfloat16) for k, v in theirs.items()}
    assert_equal(theirs, safetensors_torch.load_file(tmp_path / "ours" / "model.safetensors"))
    if bf16:  # float32 arithmetic: the same dtype and shapes, values within bfloat16 rounding of mergekit's
        assert cli(["merge", "--config", str(tmp_path / "merge.yaml"), "--out", str(tmp_path / "exact"), "--quiet"]) == 0
        exact = safetensors_torch.load_file(tmp_path / "exact" / "model.safetensors")
        differ = sum(int((exact[k] != theirs[k]).sum()) for k in theirs)
        total = sum(v.numel() for v in theirs.values())
        print(f"{name}, bf16 in float32 arithmetic: {differ} of {total} entries differ from mergekit's")


# ---- DELLA: mergekit's own code with pcb_fast's draws (torch.bernoulli's stream cannot be reproduced)

sparsify = pytest.importorskip("mergekit.sparsify")


@pytest.fixture
def della_draws(monkeypatch):
    """mergekit's MAGPRUNE, its code unchanged, drawing from pcb_fast.core.rng: the task vector it is
    given is looked up among the fine-tunes' (which names its key and task) and torch.bernoulli(probs)
    becomes u / 2^24 < probs with that stream's 24-bit draws u."""
    from pcb_fast.core import rng

    vectors, current = TaskVectorIndex(), []
    magprune = sparsify.della_magprune
    bernoulli = torch.bernoulli

    def drawn(probs, *args, **kwargs):
        if not current:
            return bernoulli(probs, *args, **kwargs)
        key, task = current[-1]
        u = rng.uniform24(0, task, key, 0, probs.numel()).view(probs.shape).to(torch.float32) / (1 << 24)
        return (u < probs.float()).to(probs.dtype)

    def traced(tensor, density, epsilon, rescale_norm=None):
        current.append(vectors.find(tensor))
        try:
            return magprune(tensor, density, epsilon, rescale_norm)
        finally:
            current.pop()

    monkeypatch.setattr(sparsify, "della_magprune", traced)
    monkeypatch.setattr(torch, "bernoulli", drawn)
    return vectors.fill


DELLA_CONFIGS = [
    ("della, per-model density and epsilon", {
        "merge_method": "della", "base_model": "base",
        "models": [("near", {"weight": 0.5, "density": 0.4, "epsilon": 0.1}), ("far", {"weight": 1.0, "density": 0.6}),
                   ("mixed", {"weight": 0.7, "density": 0.5, "epsilon": 0.3})]}),
    ("della, density gradient, lambda, rescale false", {
        "merge_method": "della", "base_model": "base", "models": [("far", {"weight": 1.0}), ("mixed", {"weight": 0.6})],
        "parameters": {"density": [0.3, 0.7], "epsilon": 0.2, "lambda": 0.9, "rescale": False}}),
    ("della_linear, the base listed", {
        "merge_method": "della_linear", "base_model": "base",
        "models": ["base", ("far", {"weight": 0.5}), ("mixed", {"weight": 1.0})],
        "parameters": {"density": 0.5, "epsilon": 0.1}}),
    ("della_linear, normalize, density 1 for one model", {
        "merge_method": "della_linear", "base_model": "base",
        "models": [("far", {"weight": 0.5, "density": 1.0}), ("near", {"weight": 2.0, "density": 0.3})],
        "parameters": {"normalize": True, "epsilon": 0.05}}),
]


@pytest.mark.parametrize("name,spec", DELLA_CONFIGS, ids=[c[0] for c in DELLA_CONFIGS])
def test_della_equals_mergekit_with_the_same_draws(family, della_draws, tmp_path, name, spec):
    _, paths = family
    states = {k: safetensors_torch.load_file(f"{p}/model.safetensors") for k, p in paths.items()}
    if next(iter(states["base"].values())).dtype != torch.float32:
        pytest.skip("mergekit computes DELLA in bfloat16 on bfloat16 models; pcb-fast in float32 (the task "
                    "vectors, exactly)")
    raw = config_of(spec, paths)
    listed = [m if isinstance(m, str) else m[0] for m in spec["models"]]
    della_draws(states["base"], [states[m] for m in listed if m != "base"])
    theirs, ours = run_both(raw, tmp_path)
    assert_equal(theirs, ours)


# ---- slices: layer ranges, merged and stacked (pcb_fast/io/slices.py)

SLICE_CONFIGS = [
    ("slerp over one slice of every layer, t filters", {
        "merge_method": "slerp", "base_model": "base", "parameters": {"t": T_FILTERS},
        "slices": [[("base", [0, 4]), ("far", [0, 4])]]}),
    ("slerp over two slices, t restarting per slice, slice parameters first", {
        "merge_method": "slerp", "base_model": "base", "parameters": {"t": [0.0, 1.0]},
        "slices": [[("far", [0, 2]), ("base", [0, 2])],
                   {"sources": [("base", [2, 4]), ("far", [2, 4])],
                    "parameters": {"t": [{"filter": "mlp", "value": 0.9}]}}]}),
    ("passthrough: layers stacked from two models (6 layers out of 4)", {
        "merge_method": "passthrough", "slices": [[("far", [0, 3])], [("mixed", [1, 4])]]}),
    ("passthrough with scale filters", {
        "merge_method": "passthrough",
        "slices": [[("near", [0, 2])], [("far", [1, 4], {"scale": [{"filter": "o_proj", "value": 0.0},
                                                                  {"value": 1.0}]})]]}),
    ("passthrough to float16 (the copy, cast)", {
        "merge_method": "passthrough", "dtype": "float16", "slices": [[("far", [0, 2])], [("mixed", [2, 4])]]}),
    ("ties over two slices, per-source density", {
        "merge_method": "ties", "base_model": "base", "parameters": {"density": 0.5, "weight": 1.0},
        "slices": [[("base", [0, 2]), ("far", [0, 2], {"density": 0.3}), ("mixed", [0, 2])],
                   [("base", [2, 4]), ("far", [2, 4]), ("mixed", [2, 4], {"weight": 0.5})]]}),
    ("model_stock over one slice", {
        "merge_method": "model_stock", "base_model": "base",
        "slices": [[("base", [1, 3]), ("far", [1, 3]), ("mixed", [1, 3]), ("near", [1, 3])]]}),
]


def slices_of(spec, paths):
    raw = {k: v for k, v in spec.items() if k not in ("slices", "base_model")}
    if "base_model" in spec:
        raw["base_model"] = paths[spec["base_model"]]
    raw["slices"] = []
    for out in spec["slices"]:
        entry = dict(out) if isinstance(out, dict) else {"sources": out}
        entry["sources"] = [{"model": paths[src[0]], "layer_range": list(src[1]),
                             **({"parameters": src[2]} if len(src) > 2 else {})} for src in entry["sources"]]
        raw["slices"].append(entry)
    return raw


@pytest.mark.parametrize("name,spec", SLICE_CONFIGS, ids=[c[0] for c in SLICE_CONFIGS])
def test_slices_equal_mergekit(family, tmp_path, name, spec):
    _, paths = family
    base_state = safetensors_torch.load_file(f"{paths['base']}/model.safetensors")
    bf16 = next(iter(base_state.values())).dtype == torch.bfloat16
    if bf16 and spec["merge_method"] == "ties":
        pytest.skip("mergekit computes TIES in bfloat16 on bfloat16 models; pcb-fast in float32")
    raw = slices_of(spec, paths)
    config = mk_config.MergeConfiguration.model_validate(raw)
    mk_merge.run_merge(config, str(tmp_path / "mergekit"), mk_merge.MergeOptions(copy_tokenizer=False, quiet=True))
    theirs = safetensors_torch.load_file(tmp_path / "mergekit" / "model.safetensors")
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(raw))
    flags = ["--compute-dtype", "mergekit"] if bf16 and spec["merge_method"] != "ties" else []
    assert cli(["merge", "--config", str(tmp_path / "merge.yaml"), "--out", str(tmp_path / "ours"), "--quiet"]
               + flags) == 0
    assert_equal(theirs, safetensors_torch.load_file(tmp_path / "ours" / "model.safetensors"))
    ours_cfg = json.loads((tmp_path / "ours" / "config.json").read_text())
    theirs_cfg = json.loads((tmp_path / "mergekit" / "config.json").read_text())
    layers = sum(src[1][1] - src[1][0] for src in [(out["sources"] if isinstance(out, dict) else out)[0]
                                                   for out in spec["slices"]])
    assert ours_cfg["num_hidden_layers"] == theirs_cfg["num_hidden_layers"] == layers


def test_passthrough_writes_the_model_itself(tmp_path):
    """Every tensor of the one model, bit for bit, run after run: the output must not be a view of
    the reader's buffers, which the reader reuses while the writer thread still holds the values."""
    g = torch.Generator().manual_seed(9)
    state = {f"model.layers.{i}.w{j}": torch.randn(64, 48, generator=g) for i in range(8) for j in range(8)}
    (tmp_path / "m").mkdir()
    safetensors_torch.save_file(state, tmp_path / "m" / "model.safetensors")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"merge_method": "passthrough",
                                                      "models": [{"model": str(tmp_path / "m")}]}))
    for run in range(3):
        out = tmp_path / f"out{run}"
        assert cli(["merge", "--config", str(tmp_path / "c.yaml"), "--out", str(out), "--quiet"]) == 0
        got = safetensors_torch.load_file(out / "model.safetensors")
        assert all(torch.equal(got[k], state[k]) for k in state)


def test_the_default_module_equals_mergekit(family, tmp_path, capsys):
    """modules: {default: ...} (a single-module model's one module): its slices or models, its parameters
    between the slice's and the configuration's, as mergekit runs it; other modules: one line."""
    _, paths = family
    bf16 = next(iter(safetensors_torch.load_file(f"{paths['base']}/model.safetensors").values())).dtype == torch.bfloat16
    flags = ["--compute-dtype", "mergekit"] if bf16 else []
    sliced = slices_of({"merge_method": "slerp", "base_model": "base",
                        "slices": [[("base", [0, 4]), ("far", [0, 4])]]}, paths)
    for i, module in enumerate([{"slices": sliced.pop("slices"), "parameters": {"t": [{"filter": "mlp", "value": 0.8}]}},
                                {"models": [{"model": paths["far"]}], "parameters": {"t": [0.2, 0.9]}}]):
        raw = dict(sliced, modules={"default": module}, parameters={"t": 0.3})
        config = mk_config.MergeConfiguration.model_validate(raw)
        mk_merge.run_merge(config, str(tmp_path / f"mergekit{i}"), mk_merge.MergeOptions(copy_tokenizer=False, quiet=True))
        (tmp_path / "merge.yaml").write_text(yaml.safe_dump(raw))
        assert cli(["merge", "--config", str(tmp_path / "merge.yaml"), "--out", str(tmp_path / f"ours{i}"), "--quiet"]
                   + flags) == 0
        assert_equal(safetensors_torch.load_file(tmp_path / f"mergekit{i}" / "model.safetensors"),
                     safetensors_torch.load_file(tmp_path / f"ours{i}" / "model.safetensors"))
    raw = dict(sliced, modules={"text_decoder": module, "vision_tower": module})
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(raw))
    capsys.readouterr()
    assert cli(["merge", "--config", str(tmp_path / "merge.yaml"), "--out", str(tmp_path / "multi")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not supported: modules text_decoder, vision_tower (the modules of a multi-module" in err[0]


def test_passthrough_copies_each_tensor_once(tmp_path, monkeypatch):
    """A passthrough is a copy: each tensor read once (the model; no base beside it), in slices."""
    g = torch.Generator().manual_seed(4)
    state = {f"model.layers.{i}.w": torch.randn(64, 48, generator=g) for i in range(4)}
    (tmp_path / "m").mkdir()
    safetensors_torch.save_file(state, tmp_path / "m" / "model.safetensors")
    (tmp_path / "m" / "config.json").write_text(json.dumps({"num_hidden_layers": 4}))
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(tmp_path / "m"), "layer_range": [0, 3]}]},
        {"sources": [{"model": str(tmp_path / "m"), "layer_range": [2, 4]}]}]}))
    reads = slices_read(monkeypatch, "model.layers.2.w")
    assert cli(["merge", "--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    assert reads == [64 * 48] * 2  # output layers 2 and 3 (model layer 2 twice), once each
    got = safetensors_torch.load_file(tmp_path / "out" / "model.safetensors")
    assert torch.equal(got["model.layers.3.w"], state["model.layers.2.w"])


def test_passthrough_refuses_a_non_finite_input(tmp_path, capsys):
    state = {"model.layers.0.w": torch.ones(8, 8), "model.layers.1.w": torch.ones(8, 8)}
    state["model.layers.1.w"][3, 4] = float("nan")
    (tmp_path / "m").mkdir()
    safetensors_torch.save_file(state, tmp_path / "m" / "model.safetensors")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"merge_method": "passthrough",
                                                      "models": [{"model": str(tmp_path / "m")}]}))
    assert cli(["merge", "--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "out"), "--quiet"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'model.layers.1.w'" in err[0] and "NaN" in err[0], err
    assert not (tmp_path / "out").exists()


# ---- mergekit's compute dtype for its task-arithmetic family (methods/gta.py)

GTA_CONFIGS = [
    ("task_arithmetic, weights, lambda", {"merge_method": "task_arithmetic", "base_model": "base",
                                          "models": [("far", {"weight": 0.5}), ("mixed", {"weight": 1.0})],
                                          "parameters": {"lambda": 0.8}}),
    ("ties, per-model density", {"merge_method": "ties", "base_model": "base",
                                 "models": [("far", {"weight": 0.5, "density": 0.3}), ("mixed", {"weight": 1.0}),
                                            ("near", {"weight": 0.7, "density": 0.7})],
                                 "parameters": {"density": 0.5}}),
    ("dare_linear, L1 rescale", {"merge_method": "dare_linear", "base_model": "base",
                                 "models": [("far", {"weight": 0.5, "density": 0.4}), ("mixed", {"weight": 1.0})],
                                 "parameters": {"density": 0.6}}),
    ("dare_ties, normalize, density gradient", {"merge_method": "dare_ties", "base_model": "base",
                                                "models": [("far", {"weight": 1.0}), ("mixed", {"weight": 0.5})],
                                                "parameters": {"normalize": True, "density": [0.2, 0.7]}}),
    ("breadcrumbs_ties", {"merge_method": "breadcrumbs_ties", "base_model": "base",
                          "models": [("far", {"weight": 1.0}), ("mixed", {"weight": 1.0})],
                          "parameters": {"density": 0.5, "gamma": 0.02}}),
    ("della", {"merge_method": "della", "base_model": "base",
               "models": [("far", {"weight": 1.0, "density": 0.5}), ("mixed", {"weight": 0.7, "density": 0.4})],
               "parameters": {"epsilon": 0.1}}),
    ("linear, no base", {"merge_method": "linear",
                         "models": [("far", {"weight": 0.5}), ("mixed", {"weight": 1.0}), ("near", {"weight": 0.7})]}),
    ("linear, the base added, a weight filter", {"merge_method": "linear", "base_model": "base",
                                                "models": [("far", {"weight": 0.3}), ("mixed", {"weight": 1.0})],
                                                "parameters": {"weight": [{"filter": "mlp", "value": 0.2},
                                                                          {"value": 0.9}]}}),
]


@pytest.fixture
def dare_draws(monkeypatch):
    """mergekit's DARE drop with pcb_fast's draws (as tests/test_peers.py's fixture)."""
    from pcb_fast.core import rng

    vectors = TaskVectorIndex()

    def bernoulli(tensor, density, rescale_norm=None):
        if density >= 1:
            return tensor
        key, task = vectors.find(tensor)
        work = tensor.dtype if tensor.dtype == torch.bfloat16 else torch.float32
        keep = rng.keep_mask(0, task, key, 0, tensor.numel(), max(0.0, 1.0 - density)).view(tensor.shape)
        return sparsify.rescaled_masked_tensor(tensor.to(work), keep.to(work), rescale_norm).to(tensor.dtype)

    monkeypatch.setattr(sparsify, "bernoulli", bernoulli)
    return vectors.fill


@pytest.mark.parametrize("name,spec", GTA_CONFIGS, ids=[c[0] for c in GTA_CONFIGS])
def test_compute_dtype_mergekit_reproduces_its_task_arithmetic_family(family, della_draws, dare_draws, tmp_path,
                                                                       name, spec):
    """bfloat16 models: mergekit's arithmetic in bfloat16, bit for bit, with --compute-dtype mergekit
    (float32 models: a config's dtype: bfloat16 asks for it)."""
    _, paths = family
    states = {k: safetensors_torch.load_file(f"{p}/model.safetensors") for k, p in paths.items()}
    bf16 = next(iter(states["base"].values())).dtype == torch.bfloat16
    raw = config_of(spec, paths)
    if not bf16:
        raw["dtype"] = "bfloat16"
        states = {k: {n: v.to(torch.bfloat16) for n, v in s.items()} for k, s in states.items()}
    listed = [m if isinstance(m, str) else m[0] for m in spec["models"]]
    della_draws(states["base"], [states[m] for m in listed])
    dare_draws(states["base"], [states[m] for m in listed])
    config = mk_config.MergeConfiguration.model_validate(raw)
    mk_merge.run_merge(config, str(tmp_path / "mergekit"), mk_merge.MergeOptions(copy_tokenizer=False, quiet=True))
    theirs = safetensors_torch.load_file(tmp_path / "mergekit" / "model.safetensors")
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(raw))
    assert cli(["merge", "--config", str(tmp_path / "merge.yaml"), "--out", str(tmp_path / "ours"), "--quiet",
                "--compute-dtype", "mergekit"]) == 0
    assert_equal(theirs, safetensors_torch.load_file(tmp_path / "ours" / "model.safetensors"))


@pytest.mark.parametrize("method,extra", [("slerp", {"t": 0.3}), ("della", {"density": 0.5})])
def test_whole_tensor_methods_read_one_tensor_ahead_at_most(family, tmp_path, monkeypatch, method, extra):
    """Blocks are whole tensors: the reader thread may hold one block (not four) of every model."""
    from pcb_fast.core import prefetch

    _, paths = family
    depths = []
    real = prefetch.Prefetcher.__init__

    def recording(self, checkpoints, ranges, depth=4, advise_ahead=8):
        depths.append(depth)
        real(self, checkpoints, ranges, depth, advise_ahead)

    monkeypatch.setattr(prefetch.Prefetcher, "__init__", recording)
    from pcb_fast.drivers.files import merge_checkpoints

    merge_checkpoints(paths["base"], [paths["far"]], tmp_path / "out", method=method, scope="tensor", **extra)
    # slerp: one pass over every key; della per tensor: one block per pass, read without a reader thread
    assert set(depths) == ({1} if method == "slerp" else set()), depths
