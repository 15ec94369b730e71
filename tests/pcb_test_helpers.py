"""Helpers shared by test modules (pytest puts tests/ on sys.path)."""

from __future__ import annotations

import torch

from pcb_fast.core import engine
from pcb_fast.core.options import RunOptions
from pcb_fast.core.sources import MatrixSource


def run_method(method, tv, fused, block_width=4096, budget=None, **params):
    """Run an engine method on a [n, D] matrix; returns (tau_m, kept per task). Checks that every
    block is written (TIES' fused sweep may write a block a second time, docs/design.md 5.3)."""
    source = MatrixSource(tv)
    out = torch.full((source.D,), float("nan"))

    def sink(segment, lo, hi, values):
        out[segment.offset + lo : segment.offset + hi] = values

    info = engine.run(method, source, sink, options=RunOptions(fused=fused, memory_budget=budget),
                      block_width=block_width, **params)
    assert not torch.isnan(out).any(), "a block was never written"
    return out, info["kept"]


def write_fine_tunes(folder, g: torch.Generator, n: int = 3):
    """A small base (a [256, 300] weight and a bias) and ``n`` fine-tunes of it as safetensors files in
    ``folder``; returns (base state dict, base path, model paths)."""
    from safetensors.torch import save_file

    base = {"w": torch.randn(256, 300, generator=g), "b": torch.randn(300, generator=g)}
    paths = []
    for i in range(n):
        path = folder / f"m{i}.safetensors"
        save_file({k: v + torch.randn(v.shape, generator=g) * 0.01 for k, v in base.items()}, str(path))
        paths.append(str(path))
    save_file(base, str(folder / "base.safetensors"))
    return base, str(folder / "base.safetensors"), paths


def llama_state(g, layers: int, hidden: int = 32, inter: int = 48, vocab: int = 40, tied: bool = False) -> dict:
    """A tiny Llama-style state dict (random float32 values from ``g``); ``tied``: no lm_head.weight
    (it is the embedding)."""
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    if not tied:
        shapes["lm_head.weight"] = (vocab, hidden)
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (16, hidden),
                       p + "self_attn.v_proj.weight": (16, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
                       p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
                       p + "mlp.down_proj.weight": (hidden, inter), p + "input_layernorm.weight": (hidden,),
                       p + "post_attention_layernorm.weight": (hidden,)})
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}


def save_llama_folder(folder, state: dict, dtype, tied: bool, layers: int, hidden: int, inter: int, vocab: int) -> str:
    """``state`` in ``dtype`` as a Hugging Face folder (model.safetensors, a Llama config.json that
    transformers loads: 4 heads, 2 key-value heads, as llama_state's shapes)."""
    import json

    from safetensors.torch import save_file

    folder.mkdir()
    save_file({k: v.to(dtype) for k, v in state.items()}, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": vocab, "tie_word_embeddings": tied, "torch_dtype": str(dtype).split(".")[1],
        "max_position_embeddings": 64, "rms_norm_eps": 1e-6}))
    return str(folder)


def slices_read(monkeypatch, key: str) -> list:
    """The lengths of the slices of ``key`` that safetensors checkpoints read from now on (filled as they are)."""
    from pcb_fast.io.checkpoints import SafetensorsCheckpoint

    lengths = []
    read_into = SafetensorsCheckpoint.read_into

    def spy(self, name, lo, hi, out):
        if name == key:
            lengths.append(hi - lo)
        return read_into(self, name, lo, hi, out)

    monkeypatch.setattr(SafetensorsCheckpoint, "read_into", spy)
    return lengths


class TaskVectorIndex:
    """The fine-tunes' task vectors by (key, task), to name the one a peer's code is handed: the tests
    that swap pcb_fast's counter-based draws into mergekit's DARE and DELLA look it up to pick its
    stream."""

    def __init__(self):
        self._deltas = {}

    def fill(self, base: dict, models: list) -> None:
        """Index the task vectors of ``models`` (in task order) against ``base``."""
        self._deltas = {(key, task): m[key] - base[key] for task, m in enumerate(models) for key in base}

    def find(self, tensor: torch.Tensor) -> tuple:
        """The (key, task) of the task vector equal to ``tensor``: exactly one must be."""
        hits = [kt for kt, d in self._deltas.items() if d.shape == tensor.shape and torch.equal(d, tensor)]
        assert len(hits) == 1, "a task vector mergekit drops was not found among the inputs"
        return hits[0]


def assert_config_refused(tmp_path, capsys, raw: dict, message: str) -> None:
    """``pcb-fast merge --config`` of the configuration ``raw`` exits 2 with one line that contains
    ``message``, and writes no output folder."""
    import yaml

    from pcb_fast.cli import main as cli

    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    capsys.readouterr()
    assert cli(["merge", "--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out").exists()


def assert_equal_states(theirs: dict, ours: dict) -> None:
    """The same keys, and per key the same dtype, shape and values (naming the key and how many differ)."""
    assert sorted(ours) == sorted(theirs)
    for key in theirs:
        assert ours[key].dtype == theirs[key].dtype and ours[key].shape == theirs[key].shape, key
        unequal = int((ours[key] != theirs[key]).sum())
        assert unequal == 0, f"{key}: {unequal} of {theirs[key].numel()} entries differ"
