"""LoRA adapters as PEFT makes and saves them, against PEFT's own merge.

A tiny Llama with tied word embeddings is built and saved by transformers; its adapters are made
by ``peft.get_peft_model`` and written by ``save_pretrained`` with PEFT's defaults (which save an
adapted embedding's base layer beside its factors). The yardstick is PEFT's ``merge_and_unload``.
"""

import json
import warnings

import pytest
import torch

from pcb_fast import merge, merge_adapters

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

P = "base_model.model."


def tiny_llama(tie=True):
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                                      tie_word_embeddings=tie)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def load_base(folder, dtype=torch.float32):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.LlamaForCausalLM.from_pretrained(folder, dtype=dtype).eval()


def make_adapter(base_folder, folder, seed, dtype=None, touch=None, **lora):
    """An adapter made and saved by PEFT (save_pretrained's defaults), with random factors."""
    model = load_base(base_folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = peft.get_peft_model(model, peft.LoraConfig(init_lora_weights=False, **lora))
        torch.manual_seed(seed)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape) * 0.3)
            if touch is not None:
                touch(peft_model)
        if dtype is not None:
            for name, p in peft_model.named_parameters():
                if "lora_" in name:
                    p.data = p.data.to(dtype)
        peft_model.save_pretrained(folder)
    return str(folder)


def peft_merged(base_folder, adapter):
    """PEFT's own merge of one adapter: the fine-tuned model as a state dict (tied names included)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.PeftModel.from_pretrained(load_base(base_folder), adapter).merge_and_unload()
    return model.state_dict()


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("peft")
    model = tiny_llama()
    model.save_pretrained(root / "base")
    base = str(root / "base")

    def touch_norm(peft_model):  # modules_to_save: a trained copy of the final norm
        for name, p in peft_model.named_parameters():
            if "modules_to_save" in name:
                p.add_(0.25)

    adapters = {
        "qv": make_adapter(base, root / "qv", 1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        "rs": make_adapter(base, root / "rs", 2, r=4, lora_alpha=8, use_rslora=True,
                           target_modules=["q_proj", "o_proj"],
                           rank_pattern={"o_proj": 2}, alpha_pattern={r"layers\.1\.self_attn\.q_proj": 3}),
        "embed": make_adapter(base, root / "embed", 3, r=4, lora_alpha=4, target_modules=["embed_tokens", "q_proj"]),
        "head": make_adapter(base, root / "head", 4, r=2, lora_alpha=4, target_modules=["lm_head", "v_proj"]),
        "save": make_adapter(base, root / "save", 5, r=2, lora_alpha=2, target_modules=["k_proj"],
                             modules_to_save=["norm"], touch=touch_norm),
        "bf16": make_adapter(base, root / "bf16", 6, dtype=torch.bfloat16, r=4, lora_alpha=8,
                             target_modules=["q_proj", "v_proj"]),
    }
    return base, model, adapters, root


def assert_close(got: dict, expected: dict, keys=None, atol=2e-6):
    for key in keys or expected:
        assert got[key].dtype == expected[key].dtype, key
        assert torch.allclose(got[key], expected[key], rtol=0, atol=atol), \
            (key, (got[key] - expected[key]).abs().max().item())


@pytest.mark.parametrize("name", ["qv", "rs", "embed", "head", "save", "bf16"])
def test_one_adapter_equals_peft_merge_and_unload(llama, name):
    # items 2 and 6: every adapter PEFT writes by default merges as PEFT merges it, from a folder base
    # (which holds the tied parameter once) and from model.state_dict() (which holds both names)
    base, model, adapters, _ = llama
    expected = peft_merged(base, adapters[name])
    for source in (base, model.state_dict()):
        got = merge_adapters(source, [adapters[name]], method="task_arithmetic")
        assert set(got) == set(expected)
        assert_close(got, expected)
        assert torch.equal(got["lm_head.weight"], got["model.embed_tokens.weight"])


def test_the_saved_base_layer_must_be_the_base(llama, tmp_path):
    # a saved base_layer equal to the base is no change; a differing one is an error naming the key
    base, _, adapters, _ = llama
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "changed"
    folder.mkdir()
    tensors = load_file(f"{adapters['embed']}/adapter_model.safetensors")
    key = f"{P}model.embed_tokens.base_layer.weight"
    tensors[key] = tensors[key] + 1
    save_file(tensors, folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(open(f"{adapters['embed']}/adapter_config.json").read())
    with pytest.raises(ValueError, match=r"base_layer.weight' and .* both change the base model's key "
                                         r"'model.embed_tokens.weight'"):
        merge_adapters(base, [str(folder)])


def test_dare_drops_on_a_tied_parameter_are_the_same_from_every_entry_point(llama):
    # the drop of an entry is keyed on one canonical name of the tied group, so a folder base,
    # a state-dict base and the dense fine-tuned models give the same merged embedding
    base, model, adapters, _ = llama
    folders = [adapters["embed"], adapters["head"]]
    params = dict(method="dare", p=0.5, seed=3)
    from_folder = merge_adapters(base, folders, **params)
    from_state = merge_adapters(model.state_dict(), folders, **params)
    dense = merge(model.state_dict(), [peft_merged(base, f) for f in folders], **params)
    key = "model.embed_tokens.weight"
    assert_close(from_state, from_folder, [key, "lm_head.weight"])
    assert_close(dense, from_folder, [key, "lm_head.weight"], atol=1e-5)


def test_the_in_memory_result_loads_strictly(llama):
    # the result of a folder base holds every alias (lm_head.weight), as merge's does
    base, _, adapters, _ = llama
    merged = merge_adapters(base, [adapters["qv"], adapters["head"]], method="ties", density=0.5)
    fresh = tiny_llama()
    fresh.load_state_dict(merged, strict=True)
    assert fresh.lm_head.weight.data_ptr() == fresh.model.embed_tokens.weight.data_ptr()


def test_global_scope_counts_only_what_the_adapters_change(llama):
    # TIES at density 0.2 over q/v adapters is not density 1.0 (the untouched keys' zeros used
    # to fill the global top 20%)
    base, _, adapters, _ = llama
    folders = [adapters["qv"], adapters["bf16"]]
    report = {}
    sparse = merge_adapters(base, folders, method="ties", density=0.2, report=report)
    full = merge_adapters(base, folders, method="ties", density=1.0)
    key = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(sparse[key], full[key])
    kept = [k / report["entries"] for k in report["kept"]]
    assert all(abs(k - 0.2) < 0.01 for k in kept), kept
    assert report["entries"] == 2 * 2 * 16 * 16  # q and v of two layers, nothing else


def test_dora_is_refused_in_one_line(llama, tmp_path):
    base, _, _, _ = llama
    folder = make_adapter(base, tmp_path / "dora", 7, r=2, lora_alpha=2, target_modules=["q_proj"], use_dora=True)
    with pytest.raises(ValueError, match="DoRA adapters are not supported") as info:
        merge_adapters(base, [folder])
    assert "\n" not in str(info.value)


def test_rank_pattern_regexes_are_matched_with_bounded_work(llama, tmp_path):
    # a catastrophic pattern does not hang (PEFT's own re.match would)
    base, _, adapters, _ = llama
    folder = tmp_path / "evil"
    folder.mkdir()
    config = json.loads(open(f"{adapters['qv']}/adapter_config.json").read())
    config["rank_pattern"] = {"(a|a)+": 4, "(x+x+)+y": 4}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    from safetensors.torch import load_file, save_file

    tensors = load_file(f"{adapters['qv']}/adapter_model.safetensors")
    long_name = "a" * 60 + "b"
    tensors[f"{P}{long_name}.lora_A.weight"] = torch.zeros(4, 16)
    tensors[f"{P}{long_name}.lora_B.weight"] = torch.zeros(16, 4)
    save_file(tensors, folder / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="a key the base model lacks"):
        merge_adapters(base, [str(folder)])  # reached in bounded time: the patterns were matched
    config["rank_pattern"] = {"(a)\\2": 4}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="rank_pattern pattern .* is refused"):
        merge_adapters(base, [str(folder)])


def test_a_zero_dimensional_factor_is_a_one_line_error(llama, tmp_path):
    # a 0-d lora_A.weight (an IndexError before)
    base, _, adapters, _ = llama
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "zero_d"
    folder.mkdir()
    tensors = load_file(f"{adapters['qv']}/adapter_model.safetensors")
    tensors[f"{P}model.layers.0.self_attn.q_proj.lora_A.weight"] = torch.tensor(1.0)
    save_file(tensors, folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(open(f"{adapters['qv']}/adapter_config.json").read())
    with pytest.raises(ValueError, match="rank mismatch") as info:
        merge_adapters(base, [str(folder)])
    assert "\n" not in str(info.value)


def run_cli(*args):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "pcb_fast", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def generate(model, steps=5):
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=steps, do_sample=False, pad_token_id=0)


def test_round_trip_cli_merge_and_out_adapter_load_and_generate(llama, tmp_path):
    # the round trip a PEFT user makes: PEFT adapters (default save) -> pcb-fast merge --adapter and --out-adapter
    # -> transformers / PEFT load them -> generate
    base, _, adapters, _ = llama
    folders = [adapters["qv"], adapters["head"]]
    proc = run_cli("merge", "--base", base, *[x for f in folders for x in ("--adapter", f)], "--method", "ties",
                   "--density", "0.5", "--out", tmp_path / "merged", "--quiet")
    assert proc.returncode == 0, proc.stderr
    merged = load_base(tmp_path / "merged")
    expected = merge_adapters(base, folders, method="ties", density=0.5)
    assert_close(merged.state_dict(), expected, atol=0)
    proc = run_cli("merge", "--base", base, *[x for f in folders for x in ("--adapter", f)], "--method", "ties",
                   "--density", "0.5", "--out", tmp_path / "adapter", "--out-adapter", 16)
    assert proc.returncode == 0, proc.stderr
    assert "relative error" in proc.stderr and "lm_head" in proc.stderr
    assert "global statistics over the entries of the keys the adapters change" in proc.stderr
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        via_adapter = peft.PeftModel.from_pretrained(load_base(base), tmp_path / "adapter").merge_and_unload()
    # rank 16 is full rank for every module here (hidden size 16: TIES's trim makes the deltas full rank)
    assert_close(via_adapter.state_dict(), expected, atol=1e-5)
    assert torch.equal(generate(via_adapter), generate(merged))


def test_out_adapter_errors_are_the_reported_ones(llama, tmp_path):
    # PEFT's merge_and_unload of the written adapter is the merged model within the reported
    # relative error of each module; the error falls with the rank and vanishes at full rank
    base, _, adapters, _ = llama
    folders = [adapters["embed"], adapters["rs"], adapters["qv"]]
    dense = merge_adapters(base, folders, method="pcb", ratio=0.3)
    base_state = load_base(base).state_dict()
    previous = None
    for rank in (1, 4, 16):
        report = {}
        out = merge_adapters(base, folders, tmp_path / f"r{rank}", method="pcb", ratio=0.3, out_rank=rank,
                             report=report)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = peft.PeftModel.from_pretrained(load_base(base), out).merge_and_unload().state_dict()
        modules = report["adapter_modules"]
        assert set(modules) == {k.rpartition(".")[0] for k in report["merged_keys"]}
        for module, (r, error) in modules.items():
            key = f"{module}.weight"
            delta = dense[key] - base_state[key]
            actual = ((got[key] - dense[key]).norm() / delta.norm()).item()
            assert r == min(rank, *delta.shape)
            assert abs(actual - error) <= 1e-4 + 1e-3 * error, (module, actual, error)
        total = sum(e for _, e in modules.values())
        assert previous is None or total < previous
        previous = total
    assert max(e for _, e in modules.values()) < 1e-5  # rank 16 is full rank here


def test_out_adapter_refuses_what_an_adapter_cannot_hold_and_writes_nothing(llama, tmp_path):
    base, _, adapters, _ = llama
    out = tmp_path / "adapter"
    with pytest.raises(ValueError, match="out_rank=0 must be a positive integer"):
        merge_adapters(base, [adapters["qv"]], out, out_rank=0)
    with pytest.raises(ValueError, match="give out"):
        merge_adapters(base, [adapters["qv"]], out_rank=4)
    assert not out.exists()
    # modules_to_save are written whole, as PEFT saves them
    merge_adapters(base, [adapters["save"], adapters["qv"]], out, method="task_arithmetic", out_rank=8)
    config = json.loads((out / "adapter_config.json").read_text())
    assert "model.norm" in config["modules_to_save"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = peft.PeftModel.from_pretrained(load_base(base), out).merge_and_unload().state_dict()
    expected = merge_adapters(base, [adapters["save"], adapters["qv"]], method="task_arithmetic")
    assert torch.equal(got["model.norm.weight"], expected["model.norm.weight"])
    assert_close(got, expected, atol=1e-5)


def test_low_rank_randomized_is_near_the_exact_truncation():
    from pcb_fast.io.lora_out import low_rank

    gen = torch.Generator().manual_seed(0)
    u = torch.linalg.qr(torch.randn(700, 60, generator=gen)).Q
    v = torch.linalg.qr(torch.randn(500, 60, generator=gen)).Q
    delta = u @ torch.diag(torch.logspace(0, -3, 60)) @ v.T
    state = torch.random.get_rng_state()
    left, right, error = low_rank(delta, 8)  # randomized: 2 * (8 + 8) < 500
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's generator is untouched
    s = torch.linalg.svdvals(delta)
    best = (s[8:].square().sum().sqrt() / s.square().sum().sqrt()).item()
    assert left.shape == (700, 8) and right.shape == (8, 500)
    assert best * (1 - 1e-5) <= error <= best * 1.01  # the optimum, up to float32 rounding
    assert abs(error - ((delta - left @ right).norm() / delta.norm()).item()) < 1e-6


def test_a_torch_file_base_holding_both_tied_names(llama, tmp_path):
    # a pytorch_model.bin written from model.state_dict() holds both names on one storage: one parameter
    base, model, adapters, _ = llama
    folder = tmp_path / "bin-base"
    folder.mkdir()
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    (folder / "config.json").write_text(open(f"{base}/config.json").read())
    expected = peft_merged(base, adapters["head"])
    got = merge_adapters(str(folder), [adapters["head"]], method="task_arithmetic")
    assert_close(got, expected)
    out = merge_adapters(str(folder), [adapters["head"]], tmp_path / "out", method="task_arithmetic")
    assert_close(load_base(out).state_dict(), expected)


def test_cli_out_adapter_errors_are_one_line(llama, tmp_path, capsys):
    from pcb_fast.cli import main

    base, _, adapters, _ = llama
    assert main(["merge", "--base", base, "--adapter", adapters["qv"], "--out", str(tmp_path / "a"),
                 "--out-adapter", "0"]) == 2
    assert main(["merge", "--base", base, "--model", base, "--out", str(tmp_path / "b"), "--out-adapter", "4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["pcb-fast: error: out_rank=0 must be a positive integer (the rank of the adapter written)",
                   "pcb-fast: error: --out-adapter writes the merge of --adapter folders as an adapter; give --adapter"]
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_extract_an_adapter_from_two_full_models(llama, tmp_path):
    # mergekit's extract-lora through the same SVD: PEFT's merge of the extracted adapter gives back
    # the fine-tuned model within the reported error (exactly, where the rank holds the change)
    from pcb_fast.drivers.adapters import extract_adapter

    base, _, adapters, _ = llama
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tuned = peft.PeftModel.from_pretrained(load_base(base), adapters["save"]).merge_and_unload()
    tuned.save_pretrained(tmp_path / "tuned")
    report = {}
    out = extract_adapter(base, str(tmp_path / "tuned"), tmp_path / "extracted", 2, report=report)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = peft.PeftModel.from_pretrained(load_base(base), out).merge_and_unload().state_dict()
    assert_close(back, tuned.state_dict(), atol=1e-5)
    assert max(e for _, e in report["adapter_modules"].values()) < 1e-5  # rank 2 holds the rank-2 changes
    config = json.loads((out / "adapter_config.json").read_text())
    assert "model.norm" in config["modules_to_save"]
    report = {}
    extract_adapter(base, str(tmp_path / "tuned"), tmp_path / "rank1", 1, report=report)
    assert all(0.1 < e < 1 for _, e in report["adapter_modules"].values())
    with pytest.raises(ValueError, match="equals the base model"):
        extract_adapter(base, base, tmp_path / "none", 2)
    assert not (tmp_path / "none").exists()


def test_only_a_model_with_an_lm_head_gets_one_back(llama, tmp_path):
    # a folder whose config ties the embeddings of an architecture without lm_head (an encoder) gains
    # no key: its result still loads strictly into its own model
    base, _, adapters, _ = llama
    folder = tmp_path / "encoder"
    folder.mkdir()
    import shutil

    shutil.copy(f"{base}/model.safetensors", folder / "model.safetensors")
    config = json.loads(open(f"{base}/config.json").read())
    config["architectures"] = ["LlamaModel"]
    (folder / "config.json").write_text(json.dumps(config))
    got = merge_adapters(str(folder), [adapters["qv"]], method="task_arithmetic")
    assert "lm_head.weight" not in got
    assert "lm_head.weight" in merge_adapters(base, [adapters["qv"]], method="task_arithmetic")
