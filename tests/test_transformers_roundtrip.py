"""The Llama-style round trip a user makes: fine-tunes saved by transformers (tied
embeddings, bf16), a mergekit-style YAML config, `pcb-fast merge --config`, then
AutoModelForCausalLM.from_pretrained on the output and generate. Skipped without transformers."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from pcb_fast.cli import main as cli  # noqa: E402


def tiny_llama(seed: int):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=True)
    return transformers.LlamaForCausalLM(config)


def test_merge_a_mergekit_config_then_load_and_generate(tmp_path):
    base = tiny_llama(0)
    base.to(torch.bfloat16).save_pretrained(tmp_path / "base")
    for i in range(3):
        model = tiny_llama(0)
        with torch.no_grad():
            g = torch.Generator().manual_seed(i + 1)
            for p in model.parameters():  # the tied embedding is one parameter: changed once
                p.add_(0.02 * torch.randn(p.shape, generator=g))
        model.to(torch.bfloat16).save_pretrained(tmp_path / f"ft{i}")
    (tmp_path / "merge.yaml").write_text(f"""
merge_method: ties
base_model: {tmp_path / 'base'}
models:
  - model: {tmp_path / 'base'}
  - model: {tmp_path / 'ft0'}
    parameters: {{weight: 1.0, density: 0.5}}
  - model: {tmp_path / 'ft1'}
    parameters: {{weight: 0.8, density: 0.5}}
  - model: {tmp_path / 'ft2'}
    parameters: {{weight: 1.0, density: 0.5}}
parameters: {{normalize: true}}
dtype: bfloat16
""")
    out = tmp_path / "merged"
    assert cli(["merge", "--config", str(tmp_path / "merge.yaml"), "--quiet", "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    merged = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert merged.dtype == torch.bfloat16
    assert merged.lm_head.weight.data_ptr() == merged.model.embed_tokens.weight.data_ptr()  # still tied
    from safetensors.torch import load_file

    files = sorted(out.glob("*.safetensors"))
    written = {k: v for f in files for k, v in load_file(str(f)).items()}
    for name, tensor in merged.state_dict().items():
        if name in written:
            assert torch.equal(tensor, written[name]), name
    # the merge moved the weights, and the model runs
    assert not torch.equal(merged.model.layers[0].mlp.up_proj.weight, base.model.layers[0].mlp.up_proj.weight.bfloat16())
    tokens = merged.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False)
    assert tokens.shape == (1, 7)
    assert (out / "mergekit_config.yml").is_file() and (out / "README.md").is_file()
