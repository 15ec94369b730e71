"""mergekit's ``model+lora`` references (pcb_fast/io/lora_models.py): the adapter, saved by PEFT, merged
into its model on the fly. Run by mergekit 0.1.5 itself and by `pcb-fast merge --config` on small
Llama-style models (float32 and bfloat16, tied and untied heads), and against PEFT's own
merge_and_unload: the outputs must be equal entry for entry."""

import pytest
import torch
import yaml

safetensors_torch = pytest.importorskip("safetensors.torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
mk_config = pytest.importorskip("mergekit.config")
mk_merge = pytest.importorskip("mergekit.merge")

from pcb_fast.cli import main as cli  # noqa: E402
from pcb_test_helpers import assert_config_refused, llama_state, save_llama_folder  # noqa: E402
from pcb_test_helpers import assert_equal_states as assert_equal  # noqa: E402

LAYERS, HIDDEN, INTER, VOCAB = 2, 32, 48, 40


def save_llama(folder, state, dtype, tied):
    return save_llama_folder(folder, state, dtype, tied, LAYERS, HIDDEN, INTER, VOCAB)


def save_adapter(base, folder, seed, tied, **config):
    """A PEFT LoRA adapter of ``base`` with random factors (every A and B), rank 4, alpha 8: on q_proj,
    v_proj, down_proj and the embedding (and the head, untied), the final norm saved whole."""
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    targets = ["q_proj", "v_proj", "down_proj", "embed_tokens"] + ([] if tied else ["lm_head"])
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                      modules_to_save=["norm"], **config))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.copy_(p + 0.2 * torch.randn(p.shape, generator=g))
    lora.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module", params=[(torch.float32, False), (torch.bfloat16, False), (torch.float32, True),
                                        (torch.bfloat16, True)], ids=["fp32", "bf16", "fp32-tied", "bf16-tied"])
def family(request, tmp_path_factory):
    """A base, a fine-tune of it and two PEFT adapters of it."""
    dtype, tied = request.param
    tmp = tmp_path_factory.mktemp("lora")
    g = torch.Generator().manual_seed(7)
    base = llama_state(g, LAYERS, HIDDEN, INTER, VOCAB, tied=tied)
    other = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    paths = {"base": save_llama(tmp / "base", base, dtype, tied), "other": save_llama(tmp / "other", other, dtype, tied)}
    paths["lora1"] = save_adapter(paths["base"], tmp / "lora1", 1, tied)
    paths["lora2"] = save_adapter(paths["base"], tmp / "lora2", 2, tied, use_rslora=True)
    return paths, dtype


def with_paths(spec, paths):
    """A config whose model names ("base", "base+lora1") are the family's folders."""
    def ref(name):
        return "+".join(paths[part] for part in name.split("+"))

    raw = dict(spec)
    if "models" in spec:
        raw["models"] = [{"model": ref(m)} if isinstance(m, str) else {"model": ref(m[0]), "parameters": m[1]}
                         for m in spec["models"]]
    if "slices" in spec:
        raw["slices"] = [{"sources": [{"model": ref(m), "layer_range": span} for m, span in out]} for out in spec["slices"]]
    if "base_model" in spec:
        raw["base_model"] = ref(spec["base_model"])
    return raw


def run_both(raw, tmp, flags=()):
    config = mk_config.MergeConfiguration.model_validate(raw)
    mk_merge.run_merge(config, str(tmp / "mergekit"), mk_merge.MergeOptions(
        copy_tokenizer=False, quiet=True, write_model_card=False, lora_merge_cache=str(tmp / "lora_cache")))
    (tmp / "merge.yaml").write_text(yaml.safe_dump(raw))
    assert cli(["merge", "--config", str(tmp / "merge.yaml"), "--out", str(tmp / "ours"), "--quiet", *flags]) == 0
    return (safetensors_torch.load_file(tmp / "mergekit" / "model.safetensors"),
            safetensors_torch.load_file(tmp / "ours" / "model.safetensors"))


def test_a_lora_model_is_peft_merge_and_unload(family, tmp_path):
    """passthrough of base+lora: the model PEFT's merge_and_unload makes, which mergekit merges too."""
    paths, dtype = family
    theirs, ours = run_both(with_paths({"merge_method": "passthrough", "models": ["base+lora1"]}, paths), tmp_path)
    assert_equal(theirs, ours)
    model = transformers.AutoModelForCausalLM.from_pretrained(paths["base"])
    merged = peft.PeftModel.from_pretrained(model, paths["lora1"]).merge_and_unload().state_dict()
    assert_equal({k: merged[k] for k in ours}, ours)
    base = safetensors_torch.load_file(f"{paths['base']}/model.safetensors")
    changed = {k for k in ours if not torch.equal(ours[k], base[k])}
    assert {"model.embed_tokens.weight", "model.norm.weight", "model.layers.1.self_attn.q_proj.weight"} <= changed


LORA_CONFIGS = [
    ("task_arithmetic, a LoRA model and a fine-tune", {
        "merge_method": "task_arithmetic", "base_model": "base",
        "models": [("base+lora1", {"weight": 1.0}), ("other", {"weight": 0.5})]}),
    ("model_stock, the base a LoRA model too (as published configs do)", {
        "merge_method": "model_stock", "base_model": "base+lora2", "models": ["base+lora1", "other", "base", "base+lora2"]}),
    ("passthrough slices, the layers of a LoRA model and of the base", {
        "merge_method": "passthrough", "slices": [[("base+lora1", [0, 2])], [("base", [1, 2])]]}),
]


@pytest.mark.parametrize("name,spec", LORA_CONFIGS, ids=[c[0] for c in LORA_CONFIGS])
def test_lora_references_equal_mergekit(family, tmp_path, name, spec):
    paths, dtype = family
    flags = ["--compute-dtype", "mergekit"] if dtype == torch.bfloat16 else []
    theirs, ours = run_both(with_paths(spec, paths), tmp_path, flags)
    assert_equal(theirs, ours)
    recorded = yaml.safe_load((tmp_path / "ours" / "mergekit_config.yml").read_text())
    first = recorded["models"][0] if "models" in recorded else recorded["slices"][0]["sources"][0]
    assert first["model"] == f"{paths['base']}+{paths['lora1']}"


def test_lora_reference_errors(family, tmp_path, capsys):
    paths, _ = family
    cases = [(f"{paths['base']}+{paths['lora1']}+{paths['lora2']}", "is neither a path nor a model+lora reference"),
             (f"{paths['base']}+{tmp_path / 'missing'}", f"adapter {tmp_path / 'missing'}: no such folder"),
             (f"{paths['base']}+{paths['other']}", "no adapter_config.json in")]
    for ref, message in cases:
        raw = {"merge_method": "task_arithmetic", "base_model": paths["base"], "models": [{"model": ref}]}
        assert_config_refused(tmp_path, capsys, raw, message)


def test_lora_models_are_read_on_the_merging_thread(family, tmp_path, monkeypatch):
    """The products set torch's thread count, which is the process's: never on a reader thread, however
    many blocks a pass reads; the result is the same for every block width."""
    import threading

    from pcb_fast.drivers.files import merge_checkpoints
    from pcb_fast.io.lora import LoraSource
    from pcb_fast.io.lora_models import LoraModel

    paths, _ = family
    threads = set()
    product_into = LoraSource.product_into

    def recording(self, *args):
        threads.add(threading.current_thread())
        return product_into(self, *args)

    monkeypatch.setattr(LoraSource, "product_into", recording)
    outs = []
    for width in (64, 1 << 20):
        out = tmp_path / f"out{width}"
        merge_checkpoints(paths["base"], [LoraModel(paths["base"], paths["lora1"]), paths["other"]], out,
                          method="task_arithmetic", block_width=width)
        outs.append(safetensors_torch.load_file(out / "model.safetensors"))
    assert threads == {threading.main_thread()}
    assert_equal(*outs)


def test_flags_take_lora_references_and_record_them(family, tmp_path, monkeypatch):
    """--model <model>+<adapter> (relative paths) merges as the config does (the same tensors; the
    metadata says which parameters each was given); the recorded config
    names it with absolute paths and runs again, from another folder, to the same bytes."""
    import os

    paths, _ = family
    monkeypatch.chdir(os.path.dirname(paths["base"]))
    raw = with_paths(LORA_CONFIGS[0][1], paths)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    assert cli(["merge", "--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "config"), "--quiet"]) == 0
    assert cli(["merge", "--base", "base", "--model", "base+lora1", "--model", "other", "--lambdas", "1,0.5",
                "--method", "task_arithmetic", "--out", str(tmp_path / "flags"), "--quiet"]) == 0
    assert_equal(*(safetensors_torch.load_file(tmp_path / out / "model.safetensors") for out in ("config", "flags")))
    recorded = yaml.safe_load((tmp_path / "flags" / "mergekit_config.yml").read_text())
    assert recorded["models"][0]["model"] == f"{paths['base']}+{paths['lora1']}"
    monkeypatch.chdir(tmp_path)
    assert cli(["merge", "--config", str(tmp_path / "flags" / "mergekit_config.yml"), "--out", "again", "--quiet"]) == 0
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == (tmp_path / "flags" / "model.safetensors").read_bytes()
