"""Side-by-side with mergekit's own TIES and task arithmetic, when mergekit is installed (optional)."""

import pytest
import torch

from pcb_fast import merge

sparsify = pytest.importorskip("mergekit.sparsify")
gta = pytest.importorskip("mergekit.merge_methods.generalized_task_arithmetic")


def mergekit_ties(base, models, density, weights):
    """mergekit's TIES on one tensor, written with its own sparsify and get_mask."""
    deltas = torch.stack([sparsify.sparsify(m - base, density, sparsify.SparsificationMethod.magnitude) for m in models])
    w = torch.tensor(weights).view(-1, *([1] * base.dim()))
    deltas = deltas * w
    mask = gta.get_mask(deltas, method="sum")
    divisor = (w * mask).sum(dim=0)
    divisor[divisor == 0] = 1
    return base + (deltas * mask).sum(dim=0) / divisor


@pytest.mark.parametrize("weights", [[1.0, 1.0, 1.0], [0.5, 1.0, 2.0]])
def test_ties_with_mergekit_options_matches_mergekit(weights):
    g = torch.Generator().manual_seed(0)
    base = {"a": torch.randn(64, 48, generator=g), "b": torch.randn(300, generator=g)}
    models = [{k: v + torch.randn(v.shape, generator=g) * 0.01 for k, v in base.items()} for _ in range(3)]
    ours = merge(base, models, method="ties", density=0.3, scope="tensor", sign_ties="positive", topk="exact",
                 lambdas=weights)
    for k in base:
        theirs = mergekit_ties(base[k], [m[k] for m in models], 0.3, weights)
        # mergekit sums over tasks with torch.sum: equal up to the last bit of the sums
        assert torch.allclose(ours[k], theirs, rtol=0, atol=1e-6), k
        print(f"{k}: {int((ours[k] != theirs).sum())} of {theirs.numel()} entries differ in the last bits")


# ---- mergekit's YAML, run by mergekit itself and by `pcb-fast merge --config`, on a small Llama-style model

import json  # noqa: E402

import yaml  # noqa: E402

safetensors_torch = pytest.importorskip("safetensors.torch")
mk_config = pytest.importorskip("mergekit.config")
mk_merge = pytest.importorskip("mergekit.merge")

from pcb_fast.cli import main as cli  # noqa: E402
from pcb_fast.core import rng  # noqa: E402
from pcb_test_helpers import TaskVectorIndex  # noqa: E402
from pcb_test_helpers import llama_state as shared_llama_state  # noqa: E402

LAYERS, HIDDEN, INTER, VOCAB = 3, 32, 48, 40


def llama_state(g):
    return shared_llama_state(g, LAYERS, HIDDEN, INTER, VOCAB)


def save_tokenizer(folder):
    """A word-level tokenizer of VOCAB tokens (what mergekit's tokenizer_source needs to load)."""
    pytest.importorskip("tokenizers")
    from benchmarks.mergekit_acceptance import save_word_tokenizer

    save_word_tokenizer(folder, VOCAB)


def save_llama(folder, state):
    folder.mkdir()
    save_tokenizer(folder)
    safetensors_torch.save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
        "intermediate_size": INTER, "num_hidden_layers": LAYERS, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": VOCAB, "tie_word_embeddings": False, "torch_dtype": "float32", "max_position_embeddings": 64,
        "rms_norm_eps": 1e-6}))
    return str(folder)


@pytest.fixture(scope="module")
def llamas(tmp_path_factory):
    """A base and three fine-tunes (float32 safetensors folders), and a fourth on a 1/4 grid (many
    equal magnitudes: ties at every TIES threshold)."""
    tmp = tmp_path_factory.mktemp("llamas")
    g = torch.Generator().manual_seed(17)
    base = llama_state(g)
    tuned = [{k: v + 0.02 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(3)]
    tuned.append({k: v + torch.randint(-2, 3, v.shape, generator=g) * 0.25 for k, v in base.items()})
    paths = [save_llama(tmp / f"ft{i}", m) for i, m in enumerate(tuned)]
    return tmp, save_llama(tmp / "base", base), paths, base, tuned


def models_entry(paths, params):
    return [{"model": p, **({"parameters": q} if q else {})} for p, q in zip(paths, params)]


# name, config (BASE and M0..M3 stand for the paths), how the outputs compare
PEER_CONFIGS = [
    ("task_arithmetic, weights, lambda", {
        "merge_method": "task_arithmetic", "models": [("M0", {"weight": 0.5}), ("M1", {"weight": 1.0}),
                                                      ("M2", {"weight": 0.7})], "parameters": {"lambda": 0.8}}, "equal"),
    ("ties, per-model weight and density", {
        "merge_method": "ties", "models": [("M0", {"weight": 0.5, "density": 0.3}), ("M1", {"weight": 1.0, "density": 0.3}),
                                           ("M2", {"weight": 0.7, "density": 0.3})]}, "equal"),
    ("ties, per-model densities differ, normalize false, int8_mask", {
        "merge_method": "ties", "models": [("M0", {"density": 0.2}), ("M1", {"density": 0.5}), ("M2", {"density": 0.8})],
        "parameters": {"normalize": False, "int8_mask": True, "weight": 0.6}}, "equal"),
    ("ties, density gradient, weight filter, the base listed", {
        "merge_method": "ties",
        "models": [("BASE", None), ("M0", {"weight": [{"filter": "self_attn", "value": 0.3}, {"value": 1.0}]}),
                   ("M1", {"density": [0.9, 0.1]}), ("M2", None)],
        "parameters": {"density": [0.1, 0.5, 0.9], "weight": 0.8}}, "equal"),
    ("ties on quantized fine-tunes (ties at every threshold)", {
        "merge_method": "ties", "models": [("M3", {"weight": 1.0})], "parameters": {"density": 0.3}}, "ties"),
    ("dare_linear, per-model density (L1 rescale)", {
        "merge_method": "dare_linear", "models": [("M0", {"weight": 0.5, "density": 0.4}),
                                                  ("M1", {"weight": 1.0, "density": 0.6}), ("M2", {"weight": 0.7})],
        "parameters": {"density": 0.5}}, "equal"),
    ("dare_linear, rescale false, normalize true", {
        "merge_method": "dare_linear", "models": [("M0", {"weight": 0.5}), ("M1", {"weight": 1.0})],
        "parameters": {"density": 0.3, "rescale": False, "normalize": True}}, "equal"),
    ("dare_ties, defaults (sum of agreeing, L1 rescale)", {
        "merge_method": "dare_ties", "models": [("M0", {"weight": 0.5, "density": 0.3}),
                                                ("M1", {"weight": 1.0, "density": 0.5}), ("M2", {"weight": 0.7, "density": 0.9})]},
     "equal"),
    ("dare_ties, normalize, density gradient, lambda filter", {
        "merge_method": "dare_ties", "models": [("M0", {"weight": 1.0}), ("M1", {"weight": 0.5}), ("M2", {"weight": 0.8})],
        "parameters": {"normalize": True, "density": [0.2, 0.7],
                       "lambda": [{"filter": "mlp", "value": 1.2}, {"value": 0.9}]}}, "equal"),
    ("breadcrumbs, per-model density and gamma", {
        "merge_method": "breadcrumbs", "models": [("M0", {"weight": 0.5, "density": 0.4, "gamma": 0.05}),
                                                  ("M1", {"weight": 1.0, "density": 0.6, "gamma": 0.01}),
                                                  ("M2", {"weight": 0.7, "density": 0.9, "gamma": 0.2})]}, "equal"),
    ("breadcrumbs_ties, shared density and gamma, weight filter", {
        "merge_method": "breadcrumbs_ties", "models": [("M0", None), ("M1", None), ("M2", None)],
        "parameters": {"density": 0.5, "gamma": 0.02, "weight": [{"filter": "mlp", "value": 0.5}, {"value": 1.0}]}},
     "equal"),
    ("linear, no base", {
        "merge_method": "linear", "models": [("M0", {"weight": 0.5}), ("M1", {"weight": 0.3}), ("M2", {"weight": 0.2})],
        "no_base": True}, "rounding"),
    ("linear, normalize true, tokenizer block with the base source, name, vocab_size", {
        "merge_method": "linear", "models": [("M0", {"weight": 2.0}), ("M1", {"weight": 0.5, "density": 0.5})],
        "parameters": {"weight": 1.0, "normalize": True}, "tokenizer": {"source": "base"}, "name": "soup",
        "vocab_size": 40}, "rounding"),
    ("ties, tokenizer_source union over one vocabulary", {
        "merge_method": "ties", "models": [("M0", {"weight": 1.0, "density": 0.5}), ("M1", {"weight": 0.5})],
        "tokenizer_source": "union"}, "equal"),
    ("dare_ties, tokenizer block with a fine-tune's source", {
        "merge_method": "dare_ties", "models": [("M0", {"weight": 1.0, "density": 0.5}), ("M2", {"weight": 0.5})],
        "tokenizer": {"source": "M2"}}, "equal"),
    ("linear with a base, shared weight", {
        "merge_method": "linear", "models": [("M0", {"weight": 2.0}), ("M1", None)], "parameters": {"weight": 1.0}},
     "rounding"),
    ("task_arithmetic, normalize, weight gradient, dtype float32 out bfloat16, tokenizer_source base, chat_template", {
        "merge_method": "task_arithmetic", "models": [("M0", {"weight": [0.2, 1.0]}), ("M1", {"weight": 0.5})],
        "parameters": {"normalize": True}, "dtype": "float32", "out_dtype": "bfloat16", "tokenizer_source": "base",
        "chat_template": "chatml"}, "equal"),
]


def resolve_config(spec, base, paths):
    names = {"BASE": base, **{f"M{i}": p for i, p in enumerate(paths)}}
    raw = {k: v for k, v in spec.items() if k not in ("models", "no_base")}
    if "tokenizer" in raw and raw["tokenizer"].get("source") in names:
        raw["tokenizer"] = dict(raw["tokenizer"], source=names[raw["tokenizer"]["source"]])
    raw["models"] = models_entry([names[m] for m, _ in spec["models"]], [q for _, q in spec["models"]])
    if not spec.get("no_base"):
        raw["base_model"] = base
    return raw


@pytest.fixture
def dare_draws(monkeypatch, llamas):
    """mergekit's DARE drops with pcb_fast's counter-based draws (torch.bernoulli's stream cannot be
    reproduced): the task vector handed to mergekit's bernoulli is looked up among the fixture's to
    name its key and task; the mask is pcb_fast.core.rng's, mergekit's own code rescales it."""
    tmp, base_path, paths, base, tuned = llamas
    vectors = TaskVectorIndex()

    def bernoulli(tensor, density, rescale_norm=None):
        if density >= 1:
            return tensor
        key, task = vectors.find(tensor)
        keep = rng.keep_mask(0, task, key, 0, tensor.numel(), max(0.0, 1.0 - density)).view(tensor.shape)
        return sparsify.rescaled_masked_tensor(tensor, keep.to(tensor.dtype), rescale_norm)

    def use(models):  # the fine-tunes as tasks, in the config's order
        vectors.fill(base, models)

    monkeypatch.setattr(sparsify, "bernoulli", bernoulli)
    return use


def run_mergekit(raw, out):
    config = mk_config.MergeConfiguration.model_validate(raw)
    mk_merge.run_merge(config, str(out), mk_merge.MergeOptions(copy_tokenizer=False, quiet=True))
    return safetensors_torch.load_file(out / "model.safetensors")


def threshold_ties(key, tasks, base, density):
    """Positions of ``key`` where some task's |tau| equals its TIES threshold, the k-th largest
    magnitude (k = max(1, int(density N)), mergekit's count): of the entries tied there, mergekit's
    argsort keeps an arbitrary subset, pcb_fast the first by position. The only entries a TIES merge
    may leave unequal."""
    at = torch.zeros(base[key].numel(), dtype=torch.bool)
    for tuned in tasks:
        magnitude = (tuned[key] - base[key]).abs().reshape(-1)
        k = max(1, int(density * magnitude.numel()))
        at |= magnitude == magnitude.sort(descending=True).values[k - 1]
    return at


@pytest.mark.parametrize("name,spec,kind", PEER_CONFIGS, ids=[c[0] for c in PEER_CONFIGS])
def test_mergekit_yaml_runs_as_mergekit_runs_it(llamas, dare_draws, tmp_path, name, spec, kind):
    tmp, base_path, paths, base, tuned = llamas
    raw = resolve_config(spec, base_path, paths)
    listed = [m for m, _ in spec["models"] if m != "BASE"]
    tasks = [tuned[int(m[1:])] for m in listed]
    dare_draws(tasks)
    theirs = run_mergekit(raw, tmp_path / "mergekit")
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(raw))
    assert cli(["merge", "--config", str(tmp_path / "merge.yaml"), "--out", str(tmp_path / "ours"), "--quiet"]) == 0
    ours = safetensors_torch.load_file(tmp_path / "ours" / "model.safetensors")
    assert sorted(ours) == sorted(theirs)
    differ = total = tied = 0
    worst = 0.0
    for key in theirs:
        assert ours[key].dtype == theirs[key].dtype and ours[key].shape == theirs[key].shape, key
        unequal = (ours[key] != theirs[key]).reshape(-1)
        differ += int(unequal.sum())
        total += unequal.numel()
        if kind == "equal":
            assert not unequal.any(), f"{key}: {int(unequal.sum())} entries differ"
        elif kind == "ties":  # only where magnitudes tie at the threshold (mergekit keeps an arbitrary subset)
            at = threshold_ties(key, tasks, base, raw["parameters"]["density"])
            assert not (unequal & ~at).any(), f"{key}: entries differ away from the tied threshold"
            tied += int(at.sum())
        else:  # linear: mergekit sums w_i theta_i, pcb_fast theta_pre + sum w_i tau_i / sum w_i: the last bits
            scale = torch.stack([base[key].abs()] + [t[key].abs() for t in tasks]).amax(0).double()
            error = (ours[key].double() - theirs[key].double()).abs()
            assert (error <= 4 * torch.finfo(torch.float32).eps * scale).all(), key
            worst = max(worst, float((error / scale).max()))
    if "tokenizer_source" in raw or "tokenizer" in raw:  # the same vocabulary, where transformers reads it
        transformers = pytest.importorskip("transformers")
        assert (transformers.AutoTokenizer.from_pretrained(tmp_path / "ours").get_vocab()
                == transformers.AutoTokenizer.from_pretrained(tmp_path / "mergekit").get_vocab())
    if "chat_template" in raw:  # the same template, where transformers reads it
        transformers = pytest.importorskip("transformers")
        ours_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "ours")
        theirs_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "mergekit")
        assert ours_tok.chat_template == theirs_tok.chat_template and ours_tok.chat_template
        assert ours_tok.get_vocab() == theirs_tok.get_vocab()
    if "out_dtype" in raw:  # config.json names the output dtype, as mergekit's does
        ours_cfg = json.loads((tmp_path / "ours" / "config.json").read_text())
        theirs_cfg = json.loads((tmp_path / "mergekit" / "config.json").read_text())
        assert ours_cfg.get("torch_dtype", ours_cfg.get("dtype")) == theirs_cfg.get("dtype") == raw["out_dtype"]
    print(f"{name}: {differ} of {total} entries differ" + (f" ({tied} tied at the threshold)" if tied else "")
          + (f" (at most {worst / torch.finfo(torch.float32).eps:.2f} eps of the inputs' magnitude)"
             if kind == "rounding" else ""))
    if kind == "ties":
        assert differ <= tied  # zero but where TIES' threshold ties (the quantized fine-tunes)


def test_a_fine_tunes_tokenizer_brings_its_chat_template(llamas, tmp_path):
    """A fine-tune's tokenizer (same vocabulary) is saved as mergekit saves it: its chat template with
    it. (Vocabularies that differ: tests/test_mergekit_tokenizers.py.)"""
    import shutil

    transformers = pytest.importorskip("transformers")
    tmp, base_path, paths, base, tuned = llamas
    chatty = tmp_path / "chatty"
    shutil.copytree(paths[1], chatty)
    config = json.loads((chatty / "tokenizer_config.json").read_text())
    (chatty / "tokenizer_config.json").write_text(json.dumps(dict(config, chat_template="{{ messages }}" * 3)))
    raw = {"merge_method": "ties", "base_model": base_path, "models": [{"model": paths[0]}, {"model": str(chatty)}],
           "parameters": {"density": 0.5, "weight": 1.0}, "tokenizer_source": str(chatty)}
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(raw))
    assert cli(["merge", "--config", str(tmp_path / "m.yaml"), "--out", str(tmp_path / "ours"), "--quiet"]) == 0
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "ours").chat_template == "{{ messages }}" * 3
