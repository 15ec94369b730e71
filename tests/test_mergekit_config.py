"""mergekit's YAML as users write it (pcb_fast/io/mergekit_config.py) and what the output folder
records (pcb_fast/io/card.py). The side-by-side runs with mergekit itself are tests/test_peers.py."""

import json
import warnings

import pytest
import torch
import yaml

safetensors_torch = pytest.importorskip("safetensors.torch")
save_file, load_file = safetensors_torch.save_file, safetensors_torch.load_file

from pcb_fast import merge  # noqa: E402
from pcb_fast.cli import main as cli  # noqa: E402
from pcb_fast.io.card import CHATML  # noqa: E402
from pcb_fast.io.config import parse_config  # noqa: E402
from pcb_fast.io.mergekit_config import _evaluate, layer_position  # noqa: E402

KEYS = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight",
        "model.layers.1.self_attn.q_proj.weight", "model.layers.1.mlp.up_proj.weight", "model.norm.weight"]


def make(folder, state, layers=2, tokenizer=None):
    folder.mkdir(parents=True)
    save_file(state, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": layers}))
    if tokenizer is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer))
    return folder


@pytest.fixture
def llama(tmp_path):
    """A base with two layers and three fine-tunes, as folders with a config.json."""
    g = torch.Generator().manual_seed(0)
    base = {k: torch.randn(8, 6, generator=g) for k in KEYS}
    tuned = [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(3)]
    paths = [str(make(tmp_path / f"m{i}", m)) for i, m in enumerate(tuned)]
    return tmp_path, str(make(tmp_path / "base", base, tokenizer={"model_max_length": 8})), paths, base, tuned


def config(base, paths, method="ties", per_model=None, parameters=None, **top):
    models = [{"model": p, **({"parameters": per_model[i]} if per_model and per_model[i] else {})}
              for i, p in enumerate(paths)]
    raw = {"merge_method": method, "base_model": base, "models": models, **top}
    if parameters is not None:
        raw["parameters"] = parameters
    return raw


def without_card(kwargs):
    return {k: v for k, v in kwargs.items() if k != "card"}


# ---- resolving settings as mergekit does


def test_evaluate_setting_filters_gradients_and_scalars():
    number = "number"
    assert _evaluate(0.5, "a", 0.3, number) == 0.5
    assert _evaluate([0.0, 1.0], "a", 0.25, number) == 0.25
    # mergekit: scaled = t (len - 1), i0 = int(scaled), linear between i0 and i0 + 1
    assert _evaluate([0.0, 1.0, 0.0], "a", 0.75, number) == (1 - 0.5) * 1.0 + 0.5 * 0.0
    assert _evaluate([0.2, 0.4, 0.8], "a", 1.0, number) == 0.8
    filters = [{"filter": "self_attn", "value": 0.3}, {"filter": "mlp", "value": [0.0, 1.0]}, {"value": 0.9}]
    assert _evaluate(filters, "model.layers.0.self_attn.q_proj.weight", 0.0, number) == 0.3
    assert _evaluate(filters, "model.layers.1.mlp.up_proj.weight", 1.0, number) == 1.0
    assert _evaluate(filters, "model.norm.weight", 0.0, number) == 0.9
    assert _evaluate([{"filter": "mlp", "value": 1.0}], "model.norm.weight", 0.0, number) is None  # falls through
    assert _evaluate({"filter": "*", "value": 2}, "x", 0.0, number) == 2.0
    assert _evaluate([True, False], "x", 0.6, "bool") is True  # non-numbers are picked, not interpolated


def test_layer_position_is_mergekits_t():
    assert layer_position("model.layers.0.mlp.up_proj.weight", 4) == 0.0
    assert layer_position("model.layers.3.mlp.up_proj.weight", 4) == 1.0
    assert layer_position("model.layers.1.mlp.up_proj.weight", 4) == 1 / 3
    assert layer_position("model.embed_tokens.weight", 4) == 0.0 and layer_position("lm_head.weight", 4) == 0.0
    assert layer_position("model.layers.0.mlp.up_proj.weight", 1) == 1.0


def test_model_parameters_override_shared_ones_then_defaults(llama):
    tmp, base, paths, *_ = llama
    raw = config(base, paths, per_model=[{"weight": 0.5, "density": 0.3}, {"density": 0.6}, None],
                 parameters={"weight": 0.8, "density": 0.2, "lambda": 0.9})
    kwargs = parse_config(raw)
    assert without_card(kwargs) == dict(base=base, models=paths, method="ties", scope="tensor", lambdas=[0.5, 0.8, 0.8],
                                        lam=0.9, density=[0.3, 0.6, 0.2], sign_ties="positive", topk="exact",
                                        min_keep=1)
    # pcb_fast's own names keep pcb_fast's defaults; mergekit's TIES defaults density to 1
    assert parse_config(config(base, paths))["density"] == 1.0
    assert without_card(parse_config(config(base, paths, method="pcb"))) == dict(base=base, models=paths, method="pcb",
                                                                                 scope="global")


def test_per_tensor_settings_run_per_tensor_with_their_values(llama):
    tmp, base, paths, base_sd, tuned = llama
    raw = config(base, paths, per_model=[{"weight": [1.0, 0.5], "density": 0.5},
                                         {"weight": [{"filter": "self_attn", "value": 0.2}, {"value": 1.0}]}, None],
                 parameters={"density": [0.2, 0.8], "lambda": [{"filter": "norm", "value": 2.0}, {"value": 1.0}]})
    kwargs = parse_config(raw)
    assert kwargs["scope"] == "tensor" and kwargs["lam"] == 1.0
    params = kwargs["segment_params"]
    assert params("model.layers.0.self_attn.q_proj.weight") == dict(
        lambdas=[1.0, 0.2, 1.0], lam=1.0, density=[0.5, 0.2, 0.2], min_keep=1, normalize=True, sign_ties="positive",
        topk="exact")
    assert params("model.layers.1.mlp.up_proj.weight")["lambdas"] == [0.5, 1.0, 1.0]
    assert params("model.layers.1.mlp.up_proj.weight")["density"] == [0.5, 0.8, 0.8]
    assert params("model.norm.weight")["lam"] == 2.0 and "lambdas" not in params("model.norm.weight")
    # the merge equals merging each tensor alone with its own values
    out = tmp / "out"
    assert cli(["merge", "--config", str(write(tmp / "c.yaml", raw)), "--out", str(out), "--quiet"]) == 0
    got = load_file(out / "model.safetensors")
    for key in KEYS:
        own = params(key)
        alone = merge({key: base_sd[key]}, [{key: m[key]} for m in tuned], method="ties", scope="tensor",
                      lam=own.pop("lam"), lambdas=own.pop("lambdas", None), **own)
        assert torch.equal(got[key], alone[key]), key


def write(path, raw):
    path.write_text(yaml.safe_dump(raw))
    return path


def test_mergekit_names_map_onto_the_engine(llama):
    tmp, base, paths, *_ = llama

    def parsed(method, **parameters):
        return without_card(parse_config(config(base, paths, method=method, parameters=parameters)))

    assert parsed("dare_linear", density=0.3)["p"] == 1 - 0.3
    assert parsed("dare_linear", density=0.3)["rescale"] == "l1"
    assert parsed("dare_ties", density=0.3, rescale=False)["rescale"] == "none"
    assert parsed("dare_ties", density=0.3, rescale="inverse", normalize=True) == dict(
        base=base, models=paths, method="dare_ties", scope="tensor", p=1 - 0.3, sign_ties="positive")
    assert parsed("dare", p=0.8) == dict(base=base, models=paths, method="dare", scope="global", p=0.8)
    # a model without its own value nor a shared one takes the method's default
    own = parse_config(config(base, paths, method="dare", per_model=[{"p": 0.5}, None, None]))
    assert own["p"] == [0.5, 0.9, 0.9]
    assert parsed("breadcrumbs", density=0.4, gamma=0.05)["beta"] == 0.4
    # mergekit: density >= 1 keeps everything (gamma ignored)
    assert {k: v for k, v in parsed("breadcrumbs").items() if k in ("beta", "gamma")} == dict(beta=1.0, gamma=0.0)
    assert parsed("ties", density=1.5)["density"] == 1.0
    assert parsed("task_arithmetic", normalize=True, int8_mask=True)["normalize"] is True
    assert parsed("linear", weight=0.5)["method"] == "average"
    # the authors' TIES under mergekit's name: pcb_fast's defaults, so nothing beyond the scope is passed
    authors = parsed("ties", density=0.2, scope="global", sign_ties="majority", topk="threshold", min_keep=0)
    assert authors == dict(base=base, models=paths, method="ties", scope="global")


def test_the_base_among_the_models(llama):
    tmp, base, paths, *_ = llama
    with pytest.warns(UserWarning, match=r"models\[1\] is the base model: left out of the task list"):
        kwargs = parse_config(config(base, [paths[0], base, paths[1]], per_model=[{"weight": 2.0}, {"weight": 5.0},
                                                                                 {"weight": 1.0}]))
    assert kwargs["models"] == [paths[0], paths[1]] and kwargs["lambdas"] == [2.0, 1.0]
    # linear averages it in, as mergekit does (and needs its weight when it is not listed)
    kwargs = parse_config(config(base, paths[:2], method="linear", parameters={"weight": 1.0}))
    assert kwargs["models"] == paths[:2] + [base]
    with pytest.raises(ValueError, match="linear averages the base model too"):
        parse_config(config(base, paths[:2], method="linear"))


@pytest.mark.parametrize("change,message", [
    (dict(slices=[{"sources": []}]), "give models or slices, not both"),
    (dict(models=None, slices=[{"sources": []}]), "slices[0] must be a mapping with sources: [{model, layer_range}"),
    (dict(models=None, slices=[{"sources": [{"model": "m", "layer_range": [2, 1]}]}]),
     "slices[0].sources[0].layer_range=[2, 1] must be [first, end] with 0 <= first < end"),
    (dict(models=None, slices=[{"sources": [{"model": "m", "layer_range": [0, 1]}, {"model": "n", "layer_range": [0, 2]}]}]),
     "slices[0]: every source must span as many layers (as mergekit requires); got [1, 2]"),
    (dict(models=None, slices=[{"sources": [{"model": "m", "layer_range": [0, 1]}]}]),
     "slices[0]: ties needs the base model among the sources of every slice"),
    (dict(models=None, slices=[{"sources": [{"model": "m", "layer_range": [0, 1]}], "residual_weight": 0.5}]),
     "not supported: slices[0].residual_weight"),
    (dict(merge_method="passthrough"), "passthrough takes exactly one model (per slice); got 4"),
    (dict(merge_method="model_stock", models=[{"model": "m"}]), "model_stock needs at least two fine-tuned models"),
    (dict(merge_method="ram", models=[{"model": "m", "parameters": {"epsilon": 0.1}}, {"model": "n"}]),
     "models[0].parameters.epsilon is not supported per model (it is shared by every model); set it under the "
     "top-level parameters; per model: none"),
    (dict(merge_method="ramplus_tl", parameters={"alpha": float("inf")}), "alpha=inf must be a finite number"),
    (dict(merge_method="nuslerp"), "nuslerp interpolates exactly two models (besides an optional base); got 3"),
    (dict(merge_method="multislerp"), "multislerp needs a weight for every model (as mergekit does): models[0] has "
                                      "none"),
    (dict(merge_method="karcher", parameters={"max_iter": -1}), "max_iter=-1 must be a non-negative integer"),
    (dict(merge_method="della", parameters={"density": 0.5, "epsilon": 0.6}),
     "epsilon=0.6 with density=0.5: density +/- epsilon must lie in (0, 1)"),
    (dict(tokenizer={"source": "union"}), "tokenizer.source: union: the base model ("),
    (dict(tokenizer={"source": "base", "tokens": {"<x>": {"source": "zero"}}}), "tokenizer.tokens['<x>'].source: zero is "
     "not one of the models merged"),
    (dict(tokenizer={"sorce": "base"}), "tokenizer.sorce is not an entry of the tokenizer block (did you mean 'source'"),
    (dict(tokenizer={"source": "base"}, tokenizer_source="base"), "give tokenizer_source or tokenizer, not both"),
    (dict(Parameters={"density": 0.5}), "unknown entry 'Parameters' (did you mean 'parameters'?)"),
    (dict(name=3), "name=3 must be a string"),
    (dict(parameters={"densty": 0.5}), "parameters.densty is not a parameter of ties (did you mean 'density'?)"),
    (dict(merge_method="linear", parameters={"weight": 1, "foo": 2}),
     "parameters.foo is not a parameter of linear; valid: weight, lam, lambda, scope, exclude, normalize"),
    (dict(tokenizer_source="union"), "has no tokenizer that transformers loads"),
    (dict(chat_template="hello"), "chat_template='hello' is neither a template name"),
    (dict(parameters={"rescale": True}), "not supported: rescale: true with ties"),
    (dict(parameters={"density": 0}), "parameters.density: density=0.0 is out of range; valid: 0 < density <= 1"),
    (dict(parameters={"density": "lots"}), "parameters.density='lots' must be a number"),
    (dict(parameters={"normalize": "yes"}), "parameters.normalize='yes' must be true or false"),
    (dict(parameters={"density": [{"filter": "mlp"}]}), "parameters.density=[{'filter': 'mlp'}] must be a value"),
    (dict(parameters={"scope": "global", "density": [0.1, 0.5]}),
     "parameters.density varies by tensor (a gradient), which needs scope: tensor, but parameters.scope is global"),
    (dict(parameters={"lam": 1, "lambda": 2}), "parameters.lam and parameters.lambda are the same parameter"),
    (dict(parameters={"weight": float("inf")}), "parameters.weight=inf must be a finite number"),
    (dict(parameters={"sign_ties": "minority"}), "parameters.sign_ties: sign_ties='minority' is not valid"),
    (dict(models=[{"model": "m+lora+x"}]), "models[0].model: 'm+lora+x' is neither a path nor a model+lora reference"),
    (dict(models=[{"model": "m", "parameters": {"normalize": False}}]),
     "models[0].parameters.normalize is not supported per model (it is shared by every model)"),
    (dict(merge_method="linear", parameters={"weight": 1, "normalize": False}),
     "not supported: linear with normalize: false"),
    (dict(merge_method="dare_linear", parameters={"density": 0.5, "p": 0.5}),
     "parameters.density and parameters.p say the same thing for dare_linear"),
])
def test_bad_configs_are_one_line_errors(llama, capsys, change, message):
    tmp, base, paths, *_ = llama
    raw = dict(config(base, paths), **change)
    with pytest.raises(ValueError) as caught:
        parse_config(raw)
    assert message in str(caught.value) and "\n" not in str(caught.value)
    assert cli(["merge", "--config", str(write(tmp / "c.yaml", raw)), "--out", str(tmp / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pcb-fast: error: ") and message in err[0]
    assert not (tmp / "out").exists()


def test_a_gradient_needs_the_number_of_layers(llama):
    tmp, base, paths, *_ = llama
    (tmp / "base" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"parameters.density is a gradient, which needs the number of layers: the "
                                         r"base model's config.json \(.*\) has no num_hidden_layers"):
        parse_config(config(base, paths, parameters={"density": [0.1, 0.9]}))


def test_dtype_and_out_dtype(llama):
    tmp, base, paths, *_ = llama
    assert parse_config(config(base, paths, dtype="float32"))["dtype"] == "float32"
    assert parse_config(config(base, paths, dtype="float32", out_dtype="bfloat16"))["dtype"] == "bfloat16"
    assert "dtype" not in parse_config(config(base, paths, tokenizer_source="base"))


# ---- what the output records


def test_output_records_its_config_and_a_model_card(llama):
    tmp, base, paths, *_ = llama
    raw = config(base, paths, per_model=[{"weight": 0.5, "density": [0.3, 0.7]}, {"density": 0.5}, None],
                 parameters={"normalize": True})
    assert cli(["merge", "--config", str(write(tmp / "c.yaml", raw)), "--out", str(tmp / "a"), "--quiet"]) == 0
    resolved = yaml.safe_load((tmp / "a" / "mergekit_config.yml").read_text())
    assert resolved["parameters"] == dict(normalize=True, scope="tensor", density=1.0, sign_ties="positive",
                                          topk="exact", min_keep=1)
    assert resolved["models"][0] == {"model": paths[0], "parameters": {"weight": 0.5, "density": [0.3, 0.7]}}
    card = (tmp / "a" / "README.md").read_text()
    for text in ("[TIES](https://arxiv.org/abs/2306.01708)", f"using {base} as a base", f"* {paths[2]}",
                 "pcb_fast", "sign_ties: \"positive\"", "tags: [merge, pcb-fast]"):
        assert text in card, text
    # the recorded config runs the same merge again
    assert cli(["merge", "--config", str(tmp / "a" / "mergekit_config.yml"), "--out", str(tmp / "b"), "--quiet"]) == 0
    a, b = load_file(tmp / "a" / "model.safetensors"), load_file(tmp / "b" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # flags record their merge too
    assert cli(["merge", "--base", base, "--model", paths[0], "--model", paths[1], "--method", "ties", "--density",
                "0.3", "--lambdas", "1,0.5", "--out", str(tmp / "c"), "--quiet"]) == 0
    recorded = yaml.safe_load((tmp / "c" / "mergekit_config.yml").read_text())
    assert recorded["parameters"] == dict(density=0.3, sign_ties="majority", topk="threshold", normalize=True,
                                          min_keep=0, lam=1.0, scope="global")
    assert [m["parameters"]["weight"] for m in recorded["models"]] == [1.0, 0.5]
    assert cli(["merge", "--config", str(tmp / "c" / "mergekit_config.yml"), "--out", str(tmp / "d"), "--quiet"]) == 0
    assert (tmp / "c" / "model.safetensors").read_bytes() == (tmp / "d" / "model.safetensors").read_bytes()


def test_chat_template_goes_into_the_tokenizer_config(llama):
    tmp, base, paths, *_ = llama
    jinja = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    for template, expected in (("chatml", CHATML), (jinja, jinja)):
        out = tmp / f"out-{len(expected)}"
        raw = config(base, paths, chat_template=template)
        assert cli(["merge", "--config", str(write(tmp / "c.yaml", raw)), "--out", str(out), "--quiet"]) == 0
        tokenizer = json.loads((out / "tokenizer_config.json").read_text())
        assert tokenizer == {"model_max_length": 8, "chat_template": expected}
        assert (out / "chat_template.jinja").read_text() == expected  # where transformers 5 (and mergekit) put it
        assert json.loads((tmp / "base" / "tokenizer_config.json").read_text()) == {"model_max_length": 8}
    # auto: the template most inputs have (mergekit's plurality)
    for i, path in enumerate(paths):
        (tmp / f"m{i}" / "tokenizer_config.json").write_text(json.dumps({"chat_template": "A{x}" * 7 if i else jinja}))
    (tmp / "m2" / "chat_template.jinja").write_text(jinja)
    raw = config(base, paths, chat_template="auto")
    assert cli(["merge", "--config", str(write(tmp / "c.yaml", raw)), "--out", str(tmp / "auto"), "--quiet"]) == 0
    assert json.loads((tmp / "auto" / "tokenizer_config.json").read_text())["chat_template"] == jinja
    # no tokenizer in the base: nothing to hold it (mergekit warns too)
    (tmp / "base" / "tokenizer_config.json").unlink()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from pcb_fast.io.config import load_config
        from pcb_fast.drivers.files import merge_checkpoints

        merge_checkpoints(out=tmp / "none", **load_config(write(tmp / "c.yaml", config(base, paths,
                                                                                         chat_template="chatml"))))
    assert any("the chat template was not saved" in str(w.message) for w in caught)
    assert not (tmp / "none" / "tokenizer_config.json").exists()


# ---- entries mergekit accepts, refusals that are the only line printed (issue 28, item 6)


def test_linear_normalize_true_is_the_weighted_mean(llama):
    tmp, base, paths, *_ = llama
    plain = config(base, paths[:2], method="linear", per_model=[{"weight": 1.0}, {"weight": 3.0}])
    del plain["base_model"]
    normalized = dict(plain, parameters={"normalize": True})
    assert without_card(parse_config(normalized)) == without_card(parse_config(plain))
    assert cli(["merge", "--config", str(write(tmp / "c.yaml", normalized)), "--out", str(tmp / "a"), "--quiet"]) == 0
    assert cli(["merge", "--config", str(write(tmp / "d.yaml", plain)), "--out", str(tmp / "b"), "--quiet"]) == 0
    assert (tmp / "a" / "model.safetensors").read_bytes() == (tmp / "b" / "model.safetensors").read_bytes()


def test_parameters_of_other_methods_are_ignored_with_a_note(llama, capsys):
    tmp, base, paths, *_ = llama
    plain = config(base, paths[:2], method="linear", per_model=[{"weight": 1.0}, {"weight": 3.0}],
                   parameters={"weight": 1.0})
    extra = config(base, paths[:2], method="linear", per_model=[{"weight": 1.0, "density": 0.5}, {"weight": 3.0}],
                   parameters={"weight": 1.0, "epsilon": 0.1, "int8_mask": True})
    with pytest.warns(UserWarning, match="density, epsilon, int8_mask are not parameters of linear: ignored"):
        parsed = parse_config(extra)
    assert without_card(parsed) == without_card(parse_config(plain))


def test_a_warning_never_precedes_a_refusal(llama, capsys):
    tmp, base, paths, *_ = llama
    raw = config(base, [base] + paths, parameters={"density": "lots", "gamma": 0.1}, vocab_size=40)
    assert cli(["merge", "--config", str(write(tmp / "c.yaml", raw)), "--out", str(tmp / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "parameters.density" in err[0], err


def test_name_and_vocab_size_are_accepted(llama, capsys):
    tmp, base, paths, *_ = llama
    raw = config(base, paths, name="my-merge", vocab_size=40)
    assert cli(["merge", "--config", str(write(tmp / "c.yaml", raw)), "--out", str(tmp / "out"), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "vocab_size is ignored" in err and "name" not in err.replace("vocab_size", "")


def test_tokenizer_block_with_the_base_source_is_tokenizer_source_base(llama):
    tmp, base, paths, *_ = llama
    block = parse_config(config(base, paths, tokenizer={"source": "base"}))
    assert without_card(block) == without_card(parse_config(config(base, paths, tokenizer_source="base")))


def test_multi_document_yaml_names_mergekit_multimerge(llama):
    tmp, base, paths, *_ = llama
    from pcb_fast.io.config import load_config

    first = dict(config(base, paths), name="first")
    second = dict(config(base, [str(tmp / "first")]), name="second")
    (tmp / "multi.yaml").write_text(yaml.safe_dump(first) + "---\n" + yaml.safe_dump(second))
    with pytest.raises(ValueError, match=r"not supported: 2 YAML documents \(a mergekit-multimerge configuration: "
                                         r"first, second\); pcb-fast runs one merge per file"):
        load_config(tmp / "multi.yaml")
    (tmp / "one.yaml").write_text("---\n" + yaml.safe_dump(first))  # one document after a separator
    assert load_config(tmp / "one.yaml")["method"] == "ties"


def test_recorded_config_runs_from_any_folder_and_the_card_names_the_base(llama, monkeypatch):
    tmp, base, paths, *_ = llama
    config_json = json.loads((tmp / "base" / "config.json").read_text())
    (tmp / "base" / "config.json").write_text(json.dumps(dict(config_json, _name_or_path="org/base-model")))
    monkeypatch.chdir(tmp)
    raw = config("base", ["m0", "m1"], parameters={"density": 0.5})  # paths relative to the current folder
    assert cli(["merge", "--config", str(write(tmp / "c.yaml", raw)), "--out", "a", "--quiet"]) == 0
    recorded = yaml.safe_load((tmp / "a" / "mergekit_config.yml").read_text())
    assert recorded["base_model"] == str(tmp / "base") and [m["model"] for m in recorded["models"]] == [
        str(tmp / "m0"), str(tmp / "m1")]
    elsewhere = tmp / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert cli(["merge", "--config", str(tmp / "a" / "mergekit_config.yml"), "--out", "b", "--quiet"]) == 0
    assert (tmp / "a" / "model.safetensors").read_bytes() == (elsewhere / "b" / "model.safetensors").read_bytes()
    card = (tmp / "a" / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["base_model"] == ["org/base-model"]


def test_recorded_slices_config_runs_from_any_folder(llama, monkeypatch):
    """A configuration with slices and relative paths: recorded with absolute paths, it runs again
    from another folder to the same bytes; the card's front matter names the base's Hub id."""
    tmp, base, paths, *_ = llama
    config_json = json.loads((tmp / "base" / "config.json").read_text())
    (tmp / "base" / "config.json").write_text(json.dumps(dict(config_json, _name_or_path="org/base-model")))
    monkeypatch.chdir(tmp)
    raw = {"merge_method": "slerp", "base_model": "base", "parameters": {"t": 0.3},
           "slices": [{"sources": [{"model": "base", "layer_range": [0, 2]}, {"model": "m0", "layer_range": [0, 2]}]}]}
    assert cli(["merge", "--config", str(write(tmp / "s.yaml", raw)), "--out", "a", "--quiet"]) == 0
    recorded = yaml.safe_load((tmp / "a" / "mergekit_config.yml").read_text())
    assert recorded["base_model"] == str(tmp / "base")
    assert [s["model"] for s in recorded["slices"][0]["sources"]] == [str(tmp / "base"), str(tmp / "m0")]
    (tmp / "elsewhere").mkdir()
    monkeypatch.chdir(tmp / "elsewhere")
    assert cli(["merge", "--config", str(tmp / "a" / "mergekit_config.yml"), "--out", "b", "--quiet"]) == 0
    assert (tmp / "a" / "model.safetensors").read_bytes() == (tmp / "elsewhere" / "b" / "model.safetensors").read_bytes()
    front = yaml.safe_load((tmp / "a" / "README.md").read_text().split("---")[1])
    assert front["base_model"] == ["org/base-model"]


def test_a_lower_compute_dtype_is_noted_by_default_and_taken_on_request(llama, capsys):
    tmp, base, paths, *_ = llama
    raw = config(base, paths, parameters={"density": 0.5}, dtype="bfloat16")
    with pytest.warns(UserWarning, match="config: dtype bfloat16: pcb-fast computes in float32 \\(mergekit computes "
                                         "in bfloat16; --compute-dtype mergekit reproduces its rounding\\)"):
        kwargs = parse_config(raw)
    assert kwargs["method"] == "ties" and "compute_dtype" not in kwargs
    asked = parse_config(raw, compute_dtype="mergekit")
    assert (asked["method"], asked["mergekit_method"], asked["compute_dtype"]) == ("gta", "ties", "bfloat16")
    assert parse_config(dict(raw, dtype=None), compute_dtype="mergekit")["compute_dtype"] == "inputs"
    assert "compute_dtype" not in parse_config(dict(raw, dtype="float32"), compute_dtype="mergekit")
    with pytest.raises(ValueError, match="--compute-dtype bfloat16: pcb computes in float32 only"):
        parse_config(config(base, paths, method="pcb"), compute_dtype="bfloat16")
    capsys.readouterr()
    assert cli(["merge", "--config", str(write(tmp / "c.yaml", raw)), "--out", str(tmp / "o"), "--compute-dtype",
                "float8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "compute_dtype='float8' is not valid; choose one of 'float32'" in err[0], err
    assert not (tmp / "o").exists()


def test_the_recorded_config_keeps_the_compute_dtype(llama, monkeypatch):
    """--compute-dtype given on the command line (with --config, or with flags) is recorded in the
    output's mergekit_config.yml (compute_dtype, pcb-fast's own entry): run again without the flag,
    it gives the same bytes (float32 arithmetic would not)."""
    tmp, base, paths, *_ = llama
    monkeypatch.chdir(tmp)
    raw = config(base, paths, parameters={"density": 0.5, "weight": 0.7}, dtype="bfloat16")
    runs = {"flag": ["--config", str(write(tmp / "c.yaml", raw)), "--compute-dtype", "mergekit"],
            "flags": ["--base", base, "--model", paths[0], "--method", "slerp", "--t", "0.3", "--compute-dtype",
                      "bfloat16"]}
    for name, args in runs.items():
        assert cli(["merge", *args, "--out", name, "--quiet"]) == 0
        recorded = yaml.safe_load((tmp / name / "mergekit_config.yml").read_text())
        assert recorded["compute_dtype"] == args[-1], recorded
        assert cli(["merge", "--config", str(tmp / name / "mergekit_config.yml"), "--out", f"{name}-again",
                    "--quiet"]) == 0
        assert (tmp / name / "model.safetensors").read_bytes() == (tmp / f"{name}-again" / "model.safetensors").read_bytes()
        without = [a for a in args if a not in ("--compute-dtype", args[-1])]
        assert cli(["merge", *without, "--out", f"{name}-float32", "--quiet"]) == 0
        assert (tmp / name / "model.safetensors").read_bytes() != (tmp / f"{name}-float32" / "model.safetensors").read_bytes()
    with pytest.raises(ValueError, match="compute_dtype: mergekit and --compute-dtype float32 differ; give one"):
        parse_config(yaml.safe_load((tmp / "flag" / "mergekit_config.yml").read_text()), compute_dtype="float32")
    with pytest.raises(ValueError, match="config: compute_dtype='half' is not valid; choose one of 'float32'"):
        parse_config(dict(raw, compute_dtype="half"))


def test_per_model_values_are_checked_with_that_models_other_values(llama):
    """DELLA's density +/- epsilon is checked per model: one model's epsilon with another's density is
    no combination any tensor sees (a published config was refused for it)."""
    tmp, base, paths, *_ = llama
    per_model = [{"weight": 0.2, "density": 0.5, "epsilon": 0.4}, {"weight": 0.4, "density": 0.4, "epsilon": 0.3}]
    kwargs = parse_config(config(base, paths[:2], method="della_linear", per_model=per_model,
                                 parameters={"lambda": 0.9, "normalize": True}))
    assert kwargs["method"] == "della_linear" and kwargs["epsilon"] == [0.4, 0.3]
    per_model[1]["epsilon"] = 0.4  # now this model's own pair leaves (0, 1)
    with pytest.raises(ValueError, match=r"models\[1\]\.parameters\.(epsilon|density): epsilon=0\.4 with density=0\.4"):
        parse_config(config(base, paths[:2], method="della_linear", per_model=per_model))
    # a shared epsilon is checked against each model's own density
    with pytest.raises(ValueError, match=r"parameters\.epsilon: epsilon=0\.45 with density=0\.4"):
        parse_config(config(base, paths[:2], method="della_linear", parameters={"epsilon": 0.45},
                            per_model=[{"density": 0.5}, {"density": 0.4}]))
    assert parse_config(config(base, paths[:2], method="della_linear", parameters={"epsilon": 0.3},
                               per_model=[{"density": 0.6}, {"density": 0.4}]))["epsilon"] == 0.3


def test_chat_templates_mergekit_ships_and_a_top_level_int8_mask(llama, capsys, monkeypatch):
    """chat_template: alpaca (llama3, ...) is mergekit's own file, read from an installed mergekit;
    int8_mask written outside parameters: (a published config's indentation slip) is ignored with a
    note, as mergekit ignores it."""
    from pcb_fast.io import card

    tmp, base, paths, *_ = llama
    expected = card.mergekit_template("alpaca")
    if expected is None:
        pytest.skip("mergekit is not installed")
    assert cli(["merge", "--config", str(write(tmp / "c.yaml", config(base, paths, chat_template="alpaca"))),
                "--out", str(tmp / "alpaca"), "--quiet"]) == 0
    assert json.loads((tmp / "alpaca" / "tokenizer_config.json").read_text())["chat_template"] == expected
    monkeypatch.setattr(card, "mergekit_template", lambda name: None)
    with pytest.raises(ValueError, match="chat_template: alpaca is a template mergekit ships, read from an installed "
                                         "mergekit"):
        parse_config(config(base, paths, chat_template="alpaca"))
    with pytest.warns(UserWarning, match="config: int8_mask is ignored \\(a parameter written outside parameters:"):
        kwargs = parse_config(config(base, paths, parameters={"density": 0.5}, int8_mask=True))
    assert without_card(kwargs) == without_card(parse_config(config(base, paths, parameters={"density": 0.5})))


def test_published_configs_are_accepted(tmp_path):
    """The configurations collected from published models (tests/data/mergekit_configs, each naming its
    source) validate, their model names mapped to tiny local folders; the one that mergekit cannot run
    either is refused, with its reason (the merges themselves: benchmarks/mergekit_acceptance.py)."""
    from pathlib import Path

    from benchmarks.mergekit_acceptance import localised

    refused = {}
    files = sorted((Path(__file__).parent / "data" / "mergekit_configs").glob("*.yaml"))
    assert len(files) >= 40
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for path in files:
            raw = localised(yaml.safe_load(path.read_text()), tmp_path / path.stem, weights=False)
            try:
                parse_config(raw, path.stem)
            except ValueError as e:
                refused[path.stem] = str(e)
    assert sorted(refused) == ["35_slerp_openchat_seraph_union"], refused
    assert "slerp needs the base model among the sources of every slice" in refused["35_slerp_openchat_seraph_union"]
