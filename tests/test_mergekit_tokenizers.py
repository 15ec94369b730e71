"""mergekit's tokenizer sources over vocabularies that differ (pcb_fast/io/vocabulary.py), run by
mergekit 0.1.5 itself and by `pcb-fast merge --config` on small Llama-style models whose tokenizers
(built with the tokenizers library, loaded by transformers) add different tokens: the output's
tensors, config.json's vocab_size and tokenizer files must equal mergekit's."""

import json

import pytest
import torch
import yaml

safetensors_torch = pytest.importorskip("safetensors.torch")
tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")
mk_config = pytest.importorskip("mergekit.config")
mk_merge = pytest.importorskip("mergekit.merge")

from pcb_fast.cli import main as cli  # noqa: E402
from pcb_test_helpers import llama_state, save_llama_folder  # noqa: E402

LAYERS, HIDDEN, INTER = 2, 16, 24
WORDS = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(21)]  # the base's 24 tokens


def save_tokenizer(folder, words, special=(), added=()):
    """A word-level tokenizer: ``words`` (ids in order), then ``special`` and ``added`` tokens."""
    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)},
                                                                  unk_token="<unk>"))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens([tokenizers.AddedToken(t, special=True) for t in ("<unk>", "<s>", "</s>")
                                  + tuple(special)])
    tokenizer.add_tokens([tokenizers.AddedToken(t) for t in added])
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>",
        "model_max_length": 64}))
    return tokenizer.get_vocab_size()


def save_model(folder, g, base, rows, dtype, tied, scale):
    """A model whose first rows (the base's tokens) are near the base's, with ``rows`` rows."""
    state = llama_state(g, LAYERS, HIDDEN, INTER, rows, tied=tied)
    if base is not None:
        for key, value in base.items():
            if state[key].shape == value.shape:
                state[key] = value + scale * torch.randn(value.shape, generator=g)
            else:  # the embedding and head: the base's rows near the base's, the new ones random
                state[key][: value.shape[0]] = value + scale * torch.randn(value.shape, generator=g)
    save_llama_folder(folder, state, dtype, tied, LAYERS, HIDDEN, INTER, rows)
    return state


KINDS = [(torch.float32, False), (torch.bfloat16, True)]  # (float32 and bfloat16, untied and tied heads)


@pytest.fixture(scope="module", params=KINDS, ids=["fp32", "bf16-tied"])
def family(request, tmp_path_factory):
    return make_family(tmp_path_factory.mktemp("vocab"), *request.param)


@pytest.fixture(scope="module")
def fp32_family(tmp_path_factory):
    return make_family(tmp_path_factory.mktemp("vocab"), torch.float32, False)


def make_family(tmp, dtype, tied):
    """base (24 tokens); chat (+ special <|im_start|>, <|im_end|>); tool (+ words x0, x1, + special
    <|im_end|>, + <tool>: its ids of the shared tokens differ from chat's); calm (the base's
    tokenizer)."""
    g = torch.Generator().manual_seed(3)
    paths = {name: tmp / name for name in ("base", "chat", "tool", "calm")}
    base = save_model(paths["base"], g, None, 24, dtype, tied, 0)
    assert save_tokenizer(paths["base"], WORDS) == 24
    save_model(paths["chat"], g, base, 26, dtype, tied, 0.05)
    assert save_tokenizer(paths["chat"], WORDS, special=["<|im_start|>", "<|im_end|>"]) == 26
    save_model(paths["tool"], g, base, 28, dtype, tied, 0.05)
    assert save_tokenizer(paths["tool"], WORDS + ["x0", "x1"], special=["<|im_end|>"], added=["<tool>"]) == 28
    save_model(paths["calm"], g, base, 24, dtype, tied, 0.05)
    save_tokenizer(paths["calm"], WORDS)
    return {k: str(v) for k, v in paths.items()}


CONFIGS = [
    ("ties, union", {"merge_method": "ties", "base_model": "base", "tokenizer_source": "union",
                     "models": [("chat", {"weight": 1.0, "density": 0.5}), ("tool", {"weight": 0.7, "density": 0.5}),
                                ("calm", {"weight": 0.5, "density": 0.5})]}),
    ("multislerp without base (a mean row), a fine-tune's tokenizer", {
        "merge_method": "multislerp", "tokenizer_source": "tool",
        "models": [("chat", {"weight": 1.0}), ("tool", {"weight": 0.5}), ("calm", {"weight": 0.25})]}),
    ("task_arithmetic, tokenizer block: tokens, force, padding", {
        "merge_method": "task_arithmetic", "base_model": "base",
        "tokenizer": {"source": "union", "pad_to_multiple_of": 16, "tokens": {
            "<|im_start|>": {"source": "chat", "force": True},
            "<new>": {"source": {"kind": "zero"}},
            "<alias>": {"source": {"kind": "model_token", "model": "base", "token": "w3"}},
            "<tool>": {"source": {"kind": "model_token", "model": "tool", "token_id": 5}}}},
        "models": [("chat", {"weight": 0.6}), ("tool", {"weight": 0.8})]}),
    ("slerp, the base's tokenizer over a larger fine-tune", {
        "merge_method": "slerp", "base_model": "base", "tokenizer_source": "base",
        "models": [("base", None), ("chat", None)], "parameters": {"t": 0.4}}),
    ("passthrough slices, union (the embedding from the first slice, the head from the last)", {
        "merge_method": "passthrough", "tokenizer_source": "union",
        "slices": [{"sources": [{"model": "chat", "layer_range": [0, 2]}]},
                   {"sources": [{"model": "tool", "layer_range": [1, 2]}]}]}),
]


def resolve(spec, paths):
    raw = {k: v for k, v in spec.items() if k != "models"}
    if "models" in spec:
        raw["models"] = [{"model": paths[m], **({"parameters": q} if q else {})} for m, q in spec["models"]]
    for out in raw.get("slices", []):
        for source in out["sources"]:
            source["model"] = paths[source["model"]]
    if "base_model" in raw:
        raw["base_model"] = paths[raw["base_model"]]
    if raw.get("tokenizer_source") in paths:
        raw["tokenizer_source"] = paths[raw["tokenizer_source"]]
    for entry in raw.get("tokenizer", {}).get("tokens", {}).values():
        source = entry["source"]
        if isinstance(source, str):
            entry["source"] = paths[source]
        elif "model" in source:
            source["model"] = paths[source["model"]]
    return raw


def run_mergekit(raw, out, monkeypatch):
    """mergekit's merge, its models taken in the configuration's order and each vocabulary in the
    order of its ids, as pcb-fast takes them (mergekit's own orders are those of a Python set of
    models and of a fast tokenizer's get_vocab(), which change from run to run, and with them the
    union's ids of the tokens it adds)."""
    listed = [raw["base_model"]] if raw.get("base_model") else []
    listed += [m["model"] for m in raw.get("models", [])]
    listed += [src["model"] for out in raw.get("slices", []) for src in out["sources"]]
    backend = type(transformers.AutoTokenizer.from_pretrained(listed[0]))
    unsorted = backend.get_vocab
    monkeypatch.setattr(backend, "get_vocab", lambda self: dict(sorted(unsorted(self).items(), key=lambda i: i[1])))
    config = mk_config.MergeConfiguration.model_validate(raw)
    order = {path: i for i, path in enumerate(dict.fromkeys(listed))}
    unordered = mk_config.MergeConfiguration.referenced_models
    monkeypatch.setattr(mk_config.MergeConfiguration, "referenced_models",
                        lambda self: sorted(unordered(self), key=lambda m: order[m.model.path]))
    mk_merge.run_merge(config, str(out), mk_merge.MergeOptions(copy_tokenizer=True, quiet=True))


@pytest.mark.parametrize("name,spec", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_tokenizer_sources_equal_mergekit(family, tmp_path, monkeypatch, name, spec):
    raw = resolve(json.loads(json.dumps(spec)), family)
    run_mergekit(raw, tmp_path / "mergekit", monkeypatch)
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    assert cli(["merge", "--config", str(tmp_path / "merge.yaml"), "--out", str(tmp_path / "ours"), "--quiet",
                "--compute-dtype", "mergekit"]) == 0  # (bf16 models: mergekit rounds its arithmetic to bf16)
    theirs = safetensors_torch.load_file(tmp_path / "mergekit" / "model.safetensors")
    ours = safetensors_torch.load_file(tmp_path / "ours" / "model.safetensors")
    assert sorted(ours) == sorted(theirs)
    for key in theirs:
        assert ours[key].dtype == theirs[key].dtype and ours[key].shape == theirs[key].shape, key
        unequal = int((ours[key] != theirs[key]).sum())
        assert unequal == 0, f"{key}: {unequal} of {theirs[key].numel()} entries differ"
    ours_cfg = json.loads((tmp_path / "ours" / "config.json").read_text())
    theirs_cfg = json.loads((tmp_path / "mergekit" / "config.json").read_text())
    assert ours_cfg["vocab_size"] == theirs_cfg["vocab_size"] == ours["model.embed_tokens.weight"].shape[0]
    files = sorted(p.name for p in (tmp_path / "mergekit").iterdir() if "token" in p.name or "chat" in p.name)
    assert files == sorted(p.name for p in (tmp_path / "ours").iterdir() if "token" in p.name or "chat" in p.name)
    for name in files:
        assert (json.loads((tmp_path / "ours" / name).read_text())
                == json.loads((tmp_path / "mergekit" / name).read_text())), name


BAD_TOKENS = [
    ({"<new>": {}}, "tokenizer.tokens['<new>'] needs a source (a model lacks the token)"),
    ({"w3": {"force": True}}, "tokenizer.tokens['w3'] needs a source (force)"),
    ({"<x>": {"source": "elsewhere"}}, "tokenizer.tokens['<x>'].source: elsewhere is not one of the models merged"),
    ({"<x>": {"source": "chat"}}, "tokenizer.tokens['<x>'].source: CHAT has no token '<x>'"),
    ({"<x>": {"source": {"kind": "model_token", "model": "chat", "token": "w1", "token_id": 1}}},
     "give token or token_id (one of them)"),
    ({"<x>": {"source": {"kind": "zero"}, "forse": True}}, "tokenizer.tokens['<x>'].forse is not an entry of a token"),
    ({"<x>": {"source": {"kind": "model_token", "model": "chat", "token": "nowhere"}}},
     "token 'nowhere' is not in the vocabulary of CHAT"),
    ({"z" * 100_000: {"source": {"kind": "model_token", "model": "chat", "token": "y" * 100_000}}},
     "token 'yyyyyyyy"),  # a huge token: the line stays short
]


@pytest.mark.parametrize("tokens,message", BAD_TOKENS, ids=[m for _, m in BAD_TOKENS])
def test_bad_tokens_are_one_line_errors(fp32_family, tmp_path, capsys, tokens, message):
    family = fp32_family
    tokens = json.loads(json.dumps(tokens))
    for entry in tokens.values():
        source = entry.get("source")
        if source == "chat":
            entry["source"] = family["chat"]
        elif isinstance(source, dict) and source.get("model") == "chat":
            source["model"] = family["chat"]
    raw = {"merge_method": "task_arithmetic", "base_model": family["base"], "models": [{"model": family["chat"]}],
           "tokenizer": {"source": "union", "tokens": tokens}}
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    assert cli(["merge", "--config", str(tmp_path / "merge.yaml"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message.replace("CHAT", family["chat"]) in err[0], err
    assert len(err[0]) < 1000, len(err[0])
    assert not (tmp_path / "out").exists()


def test_the_recorded_config_runs_again_with_the_same_tokenizer(fp32_family, tmp_path, monkeypatch):
    """The output's mergekit_config.yml keeps the tokenizer block (its paths absolute): run again
    from another folder it gives the same tensors and tokenizer."""
    raw = resolve(json.loads(json.dumps(CONFIGS[2][1])), fp32_family)
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    assert cli(["merge", "--config", str(tmp_path / "merge.yaml"), "--out", str(tmp_path / "first"), "--quiet"]) == 0
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert cli(["merge", "--config", str(tmp_path / "first" / "mergekit_config.yml"), "--out", "again", "--quiet"]) == 0
    first = safetensors_torch.load_file(tmp_path / "first" / "model.safetensors")
    again = safetensors_torch.load_file(tmp_path / "elsewhere" / "again" / "model.safetensors")
    assert sorted(first) == sorted(again) and all(torch.equal(first[k], again[k]) for k in first)
    assert ((tmp_path / "first" / "tokenizer.json").read_text()
            == (tmp_path / "elsewhere" / "again" / "tokenizer.json").read_text())


def test_the_tokenizer_source_is_an_input_the_output_may_not_replace(fp32_family, tmp_path, capsys):
    """A tokenizer source outside the merged models is read too: --overwrite may not delete it."""
    import shutil

    elsewhere = tmp_path / "tokenizer-only"
    shutil.copytree(fp32_family["tool"], elsewhere)
    raw = {"merge_method": "task_arithmetic", "base_model": fp32_family["base"],
           "models": [{"model": fp32_family["calm"]}], "tokenizer_source": str(elsewhere)}
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(raw))
    assert cli(["merge", "--config", str(tmp_path / "merge.yaml"), "--out", str(elsewhere), "--overwrite"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the tokenizer source" in err[0], err
    assert (elsewhere / "tokenizer.json").is_file()


@pytest.mark.parametrize("index", [0, 2], ids=[CONFIGS[0][0], CONFIGS[2][0]])
def test_streamed_passes_read_the_re_mapped_rows(fp32_family, tmp_path, monkeypatch, index):
    """The streamed engine (float32 arithmetic, a 1 KB budget: every pass reads the files again, in
    blocks) merges the re-mapped rows as mergekit does."""
    raw = resolve(json.loads(json.dumps(CONFIGS[index][1])), fp32_family)
    run_mergekit(raw, tmp_path / "mergekit", monkeypatch)
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    assert cli(["merge", "--config", str(tmp_path / "merge.yaml"), "--out", str(tmp_path / "ours"), "--quiet",
                "--max-memory", "1KB"]) == 0
    theirs = safetensors_torch.load_file(tmp_path / "mergekit" / "model.safetensors")
    ours = safetensors_torch.load_file(tmp_path / "ours" / "model.safetensors")
    assert sorted(ours) == sorted(theirs) and all(torch.equal(ours[k], theirs[k]) for k in theirs)


def save_bpe_tokenizer(folder, beyond):
    """A BPE tokenizer of 24 tokens (<unk>, <s>, </s>, w, 0-9, w0-w9); ``beyond``: also q, qq (and the
    merge q q) and a special <pad>, ids 24-26, beyond a model of 24 rows (as published tokenizers
    list padding tokens the embedding has no row for)."""
    words = ["<unk>", "<s>", "</s>", "w"] + [str(i) for i in range(10)] + [f"w{i}" for i in range(10)]
    merges = [("w", str(i)) for i in range(10)] + ([("q", "q")] if beyond else [])
    vocab = {t: i for i, t in enumerate(words + (["q", "qq"] if beyond else []))}
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE(vocab, merges, unk_token="<unk>"))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens([tokenizers.AddedToken(t, special=True) for t in ("<unk>", "<s>", "</s>")
                                  + (("<pad>",) if beyond else ())])
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>",
        "model_max_length": 64}))
    return tokenizer.get_vocab_size()


@pytest.mark.parametrize("source", ["union", "base"])
def test_base_tokens_beyond_its_vocab_size_are_left_out(fp32_family, tmp_path, monkeypatch, source):
    """A base whose BPE tokenizer lists 3 tokens beyond its 24 rows: mergekit strips them (and their
    merge) from the base's tokenizer before it builds the output's; so does pcb-fast."""
    import shutil

    base = tmp_path / "bpe_base"
    shutil.copytree(fp32_family["base"], base)
    assert save_bpe_tokenizer(base, beyond=True) == 27
    raw = {"merge_method": "task_arithmetic", "base_model": str(base), "tokenizer_source": source,
           "models": [{"model": fp32_family["chat"], "parameters": {"weight": 0.6}},
                      {"model": fp32_family["tool"], "parameters": {"weight": 0.8}}]}
    run_mergekit(raw, tmp_path / "mergekit", monkeypatch)
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    assert cli(["merge", "--config", str(tmp_path / "merge.yaml"), "--out", str(tmp_path / "ours"), "--quiet"]) == 0
    theirs = safetensors_torch.load_file(tmp_path / "mergekit" / "model.safetensors")
    ours = safetensors_torch.load_file(tmp_path / "ours" / "model.safetensors")
    assert sorted(ours) == sorted(theirs) and all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert (json.loads((tmp_path / "ours" / "config.json").read_text())["vocab_size"]
            == json.loads((tmp_path / "mergekit" / "config.json").read_text())["vocab_size"])
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (json.loads((tmp_path / "ours" / name).read_text())
                == json.loads((tmp_path / "mergekit" / name).read_text())), name
    vocab = json.loads((tmp_path / "ours" / "tokenizer.json").read_text())
    assert not {"q", "qq", "<pad>"} & (set(vocab["model"]["vocab"]) | {t["content"] for t in vocab["added_tokens"]})


def test_tokens_beyond_the_vocab_size_of_a_word_level_base_are_refused(fp32_family, tmp_path, capsys):
    """mergekit strips BPE tokenizers only; pcb-fast says so in one line (mergekit fails too)."""
    import shutil

    base = tmp_path / "base"
    shutil.copytree(fp32_family["base"], base)
    save_tokenizer(base, WORDS, special=["<pad>"])
    raw = {"merge_method": "task_arithmetic", "base_model": str(base), "tokenizer_source": "union",
           "models": [{"model": fp32_family["chat"]}]}
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(raw))
    assert cli(["merge", "--config", str(tmp_path / "merge.yaml"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has 1 tokens beyond the model's vocab_size 24 (e.g. '<pad>'); they can be left out of " \
                              "a fast BPE tokenizer only, not a WordLevel one" in err[0], err
    assert not (tmp_path / "out").exists()
