"""LoRA adapters merged without materialising their deltas (pcb_fast/io/lora.py reads them,
pcb_fast/drivers/adapters.py merges them).

The yardstick is the obvious dense way: materialise every adapter's delta (PEFT's formulas, written
out here independently) and merge those task vectors with pcb_fast.merge. Factors are quantised
(multiples of 1/8 with small numerators), so B @ A is exact in float32 whatever order BLAS sums in,
and the two ways must agree bit for bit; a separate test uses ordinary random factors.
"""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import pcb_fast
from pcb_fast import merge, merge_adapters
from pcb_fast.cli import main
from pcb_fast.core import engine
from pcb_fast.core.formulas import merged_weights
from pcb_fast.core.options import RunOptions
from pcb_fast.io import lora
from pcb_fast.io.lora import GROUP_ENTRIES, LoraSource

P = "base_model.model."


def q(gen, *shape, denom=8):
    """Quantised values: products and short sums of them are exact in float32."""
    return torch.randint(-3, 4, shape, generator=gen).float() / denom


def base_model(gen):
    w = lambda *s: torch.randint(-32, 33, s, generator=gen).float() / 64  # noqa: E731
    return {
        "model.embed_tokens.weight": w(12, 8),
        "model.layers.0.self_attn.q_proj.weight": w(8, 8), "model.layers.0.self_attn.q_proj.bias": w(8),
        "model.layers.0.self_attn.v_proj.weight": w(8, 8), "model.layers.0.self_attn.v_proj.bias": w(8),
        "model.layers.1.self_attn.q_proj.weight": w(8, 8), "model.layers.1.self_attn.q_proj.bias": w(8),
        "model.layers.1.self_attn.v_proj.weight": w(8, 8), "model.layers.1.self_attn.v_proj.bias": w(8),
        "model.layers.0.mlp.c_fc.weight": w(8, 16), "model.layers.0.mlp.c_fc.bias": w(16),  # Conv1D: [in, out]
        "model.conv.weight": w(6, 3, 3, 3), "model.conv.bias": w(6),
        "model.norm.weight": w(8),
        "score.weight": w(3, 8),
        "lm_head.weight": w(12, 8),
        "model.steps": torch.tensor(5),
    }


def save_adapter(folder, tensors, config):
    os.makedirs(folder)
    save_file(tensors, os.path.join(folder, "adapter_model.safetensors"))
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", **config}, f)
    return str(folder)


def family(tmp_path, seed=0):
    """A base (file and state dict), four PEFT-style adapters covering every supported convention,
    and each adapter's dense delta computed with PEFT's formulas."""
    gen = torch.Generator().manual_seed(seed)
    base = base_model(gen)
    save_file(base, tmp_path / "base.safetensors")
    folders, deltas = [], []

    def new_delta():
        return {k: torch.zeros_like(v) for k, v in base.items() if v.is_floating_point()}

    # 0: plain Linear LoRA, scale = lora_alpha / r = 2
    t, d = {}, new_delta()
    for layer in (0, 1):
        for proj in ("q_proj", "v_proj"):
            m = f"model.layers.{layer}.self_attn.{proj}"
            A, B = q(gen, 2, 8), q(gen, 8, 2)
            t[f"{P}{m}.lora_A.weight"], t[f"{P}{m}.lora_B.weight"] = A, B
            d[f"{m}.weight"] = (B @ A) * 2.0
    folders.append(save_adapter(tmp_path / "a0", t, {"r": 2, "lora_alpha": 4}))
    deltas.append(d)

    # 1: rsLoRA (scale lora_alpha / sqrt(r)), rank_pattern and alpha_pattern, an Embedding LoRA
    t, d = {}, new_delta()
    for layer in (0, 1):
        for proj, r in (("q_proj", 4), ("v_proj", 2)):
            m = f"model.layers.{layer}.self_attn.{proj}"
            A, B = q(gen, r, 8), q(gen, 8, r)
            t[f"{P}{m}.lora_A.weight"], t[f"{P}{m}.lora_B.weight"] = A, B
            alpha = 2 if (layer, proj) == (1, "q_proj") else 8
            d[f"{m}.weight"] = (B @ A) * (alpha / r ** 0.5)
    A, B = q(gen, 4, 12), q(gen, 8, 4)  # lora_embedding_A [r, num_embeddings], lora_embedding_B [dim, r]
    t[f"{P}model.embed_tokens.lora_embedding_A"], t[f"{P}model.embed_tokens.lora_embedding_B"] = A, B
    d["model.embed_tokens.weight"] = (B @ A).T * (8 / 2)
    folders.append(save_adapter(tmp_path / "a1", t, {
        "r": 4, "lora_alpha": 8, "use_rslora": True, "rank_pattern": {"v_proj": 2},
        "alpha_pattern": {"layers.1.self_attn.q_proj": 2}}))
    deltas.append(d)

    # 2: fan_in_fan_out (GPT-2's Conv1D) with lora_bias, a module saved whole (modules_to_save) and a
    # trained bias saved whole (bias="all")
    t, d = {}, new_delta()
    m = "model.layers.0.mlp.c_fc"
    A, B, b = q(gen, 2, 8), q(gen, 16, 2), q(gen, 16)
    t[f"{P}{m}.lora_A.weight"], t[f"{P}{m}.lora_B.weight"], t[f"{P}{m}.lora_B.bias"] = A, B, b
    d[f"{m}.weight"] = (B @ A).T * 1.0
    d[f"{m}.bias"] = b * 1.0
    score = base["score.weight"] + q(gen, 3, 8)
    t[f"{P}score.weight"] = score
    d["score.weight"] = score - base["score.weight"]
    qbias = base["model.layers.0.self_attn.q_proj.bias"] + q(gen, 8)
    t[f"{P}model.layers.0.self_attn.q_proj.bias"] = qbias
    d["model.layers.0.self_attn.q_proj.bias"] = qbias - base["model.layers.0.self_attn.q_proj.bias"]
    folders.append(save_adapter(tmp_path / "a2", t, {"r": 2, "lora_alpha": 2, "fan_in_fan_out": True,
                                                     "lora_bias": True, "bias": "all"}))
    deltas.append(d)

    # 3: a Conv2d LoRA (lora_B is a 1x1 convolution) and an embedding layer saved whole under base_layer
    t, d = {}, new_delta()
    A, B = q(gen, 2, 3, 3, 3), q(gen, 6, 2, 1, 1)
    t[f"{P}model.conv.lora_A.weight"], t[f"{P}model.conv.lora_B.weight"] = A, B
    d["model.conv.weight"] = F.conv2d(A.transpose(0, 1), B).transpose(0, 1) * 1.0  # PEFT's formula for k > 1
    emb = base["model.embed_tokens.weight"] + q(gen, 12, 8)
    t[f"{P}model.embed_tokens.base_layer.weight"] = emb
    d["model.embed_tokens.weight"] = emb - base["model.embed_tokens.weight"]
    folders.append(save_adapter(tmp_path / "a3", t, {"r": 2, "lora_alpha": 2}))
    deltas.append(d)
    return base, str(tmp_path / "base.safetensors"), folders, deltas


def dense_merge(base, deltas, dtype=None, **params):
    """The dense yardstick: merge the materialised deltas as task vectors (on a zero base, so that
    tau_i is exactly the delta), then theta = theta_pre + lam * tau_m as every merge forms it. The
    keys merged are those some delta changes (the population of an adapter merge); the rest are the
    base's."""
    zero = {k: torch.zeros_like(v) for k, v in base.items()}
    lam = params.pop("lam", 1.0)
    touched = {k for d in deltas for k, v in d.items() if bool(v.any())}
    params["exclude"] = list(params.get("exclude", ())) + [f"^{re.escape(k)}$" for k in base if k not in touched]
    tau_m = merge(zero, [{**zero, **d} for d in deltas], **params)
    out = {}
    for k, v in base.items():
        if v.is_floating_point() and not any(re.search(p, k) for p in params["exclude"]):
            out[k] = merged_weights(v, lam, tau_m[k]).to(dtype or v.dtype)
        else:
            out[k] = v.to(dtype) if dtype and v.is_floating_point() else v
    return out


def assert_same(got, expected):
    assert got.keys() == expected.keys()
    for k in expected:
        assert got[k].dtype == expected[k].dtype, k
        assert torch.equal(got[k], expected[k]), k


def test_the_dense_deltas_are_exact(tmp_path):
    # the yardstick itself: quantised factors make B @ A exact, so any order of summation agrees
    base, _, folders, deltas = family(tmp_path)
    source_deltas = {}
    from pcb_fast.io.checkpoints import open_checkpoint, split_keys

    ck = open_checkpoint(base, "base model")
    merged, _ = split_keys(ck, ())
    adapters = [lora.open_adapter(f, f"adapter {i}", ck, merged) for i, f in enumerate(folders)]
    source = LoraSource(ck, adapters, merged)
    for block in source.blocks(width=5, options=RunOptions()):
        for i in range(len(folders)):
            source_deltas.setdefault((i, block.segment.key), []).append(block.tv[i].clone())
    for i, d in enumerate(deltas):
        for k in merged:
            assert torch.equal(torch.cat(source_deltas[(i, k)]), d[k].reshape(-1)), (i, k)
    touched = [sorted(a.deltas) for a in adapters]
    assert touched[1] == ["model.embed_tokens.weight"] + [f"model.layers.{i}.self_attn.{p}.weight" for i in (0, 1)
                                                           for p in ("q_proj", "v_proj")]
    assert "model.norm.weight" not in set().union(*map(set, touched))  # an untouched key: zeros for every task


@pytest.mark.parametrize("block_width,max_memory", [(1 << 17, None), (7, None), (64, "1KB")])
def test_pcb_global_equals_the_dense_deltas(tmp_path, block_width, max_memory):
    base, base_path, folders, deltas = family(tmp_path)
    report, dense_report = {}, {}
    got = merge_adapters(base_path, folders, method="pcb", ratio=0.2, block_width=block_width, max_memory=max_memory,
                         report=report)
    expected = dense_merge(base, deltas, method="pcb", ratio=0.2, report=dense_report)
    assert_same(got, expected)
    assert report["kept"] == dense_report["kept"] and report["entries"] == dense_report["entries"]
    touched = {k for d in deltas for k, v in d.items() if bool(v.any())}
    assert report["entries"] == sum(base[k].numel() for k in touched)  # the adapted keys only
    assert sorted(report["copied_keys"]) == sorted(k for k in base if k not in touched)
    assert report["population"] == "the entries of the keys the adapters change"


def test_the_zeros_of_untouched_keys_do_not_count_in_global_statistics(tmp_path):
    # a key no adapter touches is not part of the population (its zeros would fill
    # the global top-k); the merge equals the dense merge of the touched keys alone
    base, base_path, folders, deltas = family(tmp_path)
    got = merge_adapters(base_path, folders, method="ties", density=0.2)
    touched = {k for d in deltas for k, v in d.items() if bool(v.any())}
    only = {k: v for k, v in base.items() if k in touched}
    without_zeros = merge(only, [{k: only[k] + d[k] for k in touched} for d in deltas], method="ties", density=0.2)
    for k in touched:
        assert torch.equal(got[k], without_zeros[k]), k
    for k in set(base) - touched:
        assert torch.equal(got[k], base[k]), k


@pytest.mark.parametrize("method,params", [
    ("task_arithmetic", dict(lam=0.7, lambdas=[1.0, 0.5, 2.0, 1.5])),
    ("average", {}),
    ("ties", dict(density=0.3)),
    ("ties", dict(density=0.3, scope="tensor", sign_ties="positive", topk="exact")),
    ("dare", dict(p=0.5, seed=4)),
    ("dare_ties", dict(p=0.3, seed=1)),
    ("breadcrumbs", dict(gamma=0.1, beta=0.5)),
    ("pcb", dict(ratio=0.3, variant="paper")),
    ("pcb", dict(ratio=0.3, inter="pairwise", clamp_ratio=0.01, scope="tensor")),
    ("pcb", dict(ratio=0.1, exclude=[r"q_proj"])),
])
def test_methods_equal_the_dense_deltas(tmp_path, method, params):
    base, base_path, folders, deltas = family(tmp_path)
    got = merge_adapters(base_path, folders, method=method, **params)
    expected = dense_merge(base, deltas, method=method, **params)
    assert_same(got, expected)
    if "exclude" in params:  # an adapted key that is excluded is the base's
        key = "model.layers.0.self_attn.q_proj.weight"
        assert torch.equal(got[key], base[key])


def test_output_folder_and_dtype(tmp_path):
    base, _, folders, deltas = family(tmp_path)
    folder = tmp_path / "hf-base"
    folder.mkdir()
    save_file(base, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "torch_dtype": "float32"}))
    out = merge_adapters(str(folder), folders, tmp_path / "merged", method="ties", density=0.4, dtype="bfloat16")
    written = load_file(out / "model.safetensors")
    in_memory = merge_adapters(str(folder), folders, method="ties", density=0.4, dtype="bfloat16")
    assert_same(written, in_memory)
    assert_same(written, dense_merge(base, deltas, dtype=torch.bfloat16, method="ties", density=0.4))
    assert written["model.steps"].dtype == torch.int64
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    with pytest.raises(ValueError, match="already exists"):
        merge_adapters(str(folder), folders, tmp_path / "merged")
    with pytest.raises(ValueError, match="lies inside adapter 0"):
        merge_adapters(str(folder), folders, os.path.join(folders[0], "out"))


def test_state_dict_base_with_tied_parameters(tmp_path):
    gen = torch.Generator().manual_seed(3)
    embed = q(gen, 12, 8)
    base = {"lm_head.weight": embed, "model.embed_tokens.weight": embed, "model.norm.weight": q(gen, 8)}
    A, B = q(gen, 2, 8), q(gen, 12, 2)
    a0 = save_adapter(tmp_path / "a0", {f"{P}lm_head.lora_A.weight": A, f"{P}lm_head.lora_B.weight": B},
                      {"r": 2, "lora_alpha": 4})
    A1, B1 = q(gen, 2, 12), q(gen, 8, 2)
    a1 = save_adapter(tmp_path / "a1", {f"{P}model.embed_tokens.lora_embedding_A": A1,
                                        f"{P}model.embed_tokens.lora_embedding_B": B1}, {"r": 2, "lora_alpha": 2})
    report = {}
    got = merge_adapters(base, [a0, a1], method="pcb", ratio=0.3, report=report)
    assert got["lm_head.weight"] is got["model.embed_tokens.weight"]
    assert report["aliases"] == {"model.embed_tokens.weight": "lm_head.weight"}
    d0, d1 = (B @ A) * 2.0, (B1 @ A1).T * 1.0
    models = []
    for d in (d0, d1):
        t = base["lm_head.weight"] + d
        models.append({"lm_head.weight": t, "model.embed_tokens.weight": t,
                       "model.norm.weight": base["model.norm.weight"]})
    assert_same({k: got[k] for k in ("lm_head.weight", "model.norm.weight")},
                {k: v for k, v in merge(base, models, method="pcb", ratio=0.3, exclude=["norm"]).items()
                 if k != "model.embed_tokens.weight"})
    both = save_adapter(tmp_path / "both", {f"{P}lm_head.lora_A.weight": A, f"{P}lm_head.lora_B.weight": B,
                                            f"{P}model.embed_tokens.lora_embedding_A": A1,
                                            f"{P}model.embed_tokens.lora_embedding_B": B1}, {"r": 2, "lora_alpha": 4})
    with pytest.raises(ValueError, match="both change the base model's key 'lm_head.weight'"):
        merge_adapters(base, [both])


def test_random_factors_within_rounding_and_independent_of_blocks_and_threads(tmp_path):
    gen = torch.Generator().manual_seed(7)
    base = {"w.weight": torch.randn(300, 257, generator=gen), "v.weight": torch.randn(70000, 3, generator=gen)}
    save_file(base, tmp_path / "base.safetensors")
    folders, deltas = [], []
    for i in range(3):
        A, B = torch.randn(8, 257, generator=gen) * 0.1, torch.randn(300, 8, generator=gen) * 0.1
        A2, B2 = torch.randn(5, 3, generator=gen), torch.randn(70000, 5, generator=gen)
        folders.append(save_adapter(tmp_path / f"a{i}", {f"{P}w.lora_A.weight": A, f"{P}w.lora_B.weight": B,
                                                         f"{P}v.lora_A.weight": A2, f"{P}v.lora_B.weight": B2},
                                    {"r": 8, "lora_alpha": 16, "rank_pattern": {"v": 5}}))
        deltas.append({"w.weight": (B @ A) * 2.0, "v.weight": (B2 @ A2) * (16 / 5)})
    from pcb_fast.io.checkpoints import open_checkpoint

    ck = open_checkpoint(str(tmp_path / "base.safetensors"))
    keys = ["v.weight", "w.weight"]
    source = LoraSource(ck, [lora.open_adapter(f, f"adapter {i}", ck, keys) for i, f in enumerate(folders)], keys)
    for block in source.blocks(width=1 << 15, options=RunOptions()):
        for i, d in enumerate(deltas):
            want = d[block.segment.key].reshape(-1)[block.lo:block.hi]
            assert torch.allclose(block.tv[i], want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))
    path = str(tmp_path / "base.safetensors")
    first = merge_adapters(path, folders, method="pcb", ratio=0.1)
    threads = torch.get_num_threads()
    for width, budget, count in [(1000, None, 1), (1 << 17, "1KB", 2), (33333, None, 2)]:
        got = merge_adapters(path, folders, method="pcb", ratio=0.1, block_width=width, max_memory=budget,
                             threads=count)
        assert_same(got, first)
    assert torch.get_num_threads() == threads


def test_the_source_reads_blocks_only(tmp_path, monkeypatch):
    base, base_path, folders, _ = family(tmp_path)
    seen = []
    real_run = engine.run

    def spy(method, source, sink, **kw):
        seen.append(source)
        return real_run(method, source, sink, **kw)

    monkeypatch.setattr(engine, "run", spy)
    report = {}
    merge_adapters(base_path, folders, method="pcb", ratio=0.2, block_width=16, report=report)
    source = seen[-1]  # (the first ones check the parameters on a two-entry model)
    assert source.D == sum(base[k].numel() for k in report["merged_keys"])
    assert type(source) is LoraSource  # not wrapped in a CachedSource: no [n, D] copy of the task vectors
    widest = max(p.R.shape[1] for a in source.adapters for p in a.deltas.values() if isinstance(p, lora.Product))
    assert 0 < source.largest_product <= max(GROUP_ENTRIES, widest)
    assert source.products > 0


MEMORY_SCRIPT = r"""
import sys, torch
from pcb_fast import merge_adapters
from pcb_fast.core.memory import peak_rss_bytes
torch.ones(1 << 20).exp_()  # torch's own first-use allocations, before the baseline
before = peak_rss_bytes()
merge_adapters(sys.argv[1], sys.argv[2:-1], sys.argv[-1], method="task_arithmetic")
print(peak_rss_bytes() - before)
"""


def test_memory_is_the_blocks_not_the_dense_deltas(tmp_path):
    # 8 adapters of rank 8 on every tensor of a 16M-entry model: their dense deltas take 512 MiB. Task
    # arithmetic holds nothing between passes, so what the merge adds is the source's own memory
    # (PCB adds its selection state, the same as for models streamed from files), plus about 20 MiB
    # that any merge adds in a fresh process (libraries loaded, thread stacks, the writer): the model
    # is large enough for that constant not to matter.
    gen = torch.Generator().manual_seed(11)
    keys = [f"layers.{i}.proj" for i in range(16)]
    save_file({f"{k}.weight": torch.randn(1024, 1024, generator=gen) for k in keys}, tmp_path / "base.safetensors")
    folders = []
    for i in range(8):
        tensors = {}
        for k in keys:
            tensors[f"{P}{k}.lora_A.weight"] = torch.randn(8, 1024, generator=gen) * 0.01
            tensors[f"{P}{k}.lora_B.weight"] = torch.randn(1024, 8, generator=gen) * 0.01
        folders.append(save_adapter(tmp_path / f"a{i}", tensors, {"r": 8, "lora_alpha": 16}))
    proc = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(tmp_path / "base.safetensors"), *folders,
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    extra = int(proc.stdout.split()[-1])
    dense = 8 * 16 * 1024 * 1024 * 4
    assert extra < dense / 4, (f"peak memory grew by {extra / 2**20:.0f} MiB; "
                               f"the dense deltas are {dense / 2**20:.0f} MiB")


@pytest.mark.filterwarnings("ignore:Adapter .default.")  # PEFT flags the 1-D lora_B.bias it saved itself
def test_peft_conventions(tmp_path):
    """What PEFT itself merges (merge_and_unload) equals merge_adapters' task vector, bit for bit
    (quantised factors and power-of-two scales make PEFT's float32 sums exact)."""
    peft = pytest.importorskip("peft")
    Conv1D = pytest.importorskip("transformers.pytorch_utils").Conv1D
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(12, 8)
            self.q = nn.Linear(8, 8)
            self.v = nn.Linear(8, 8)
            self.conv = nn.Conv2d(3, 6, 3)
            self.c_fc = Conv1D(16, 8)  # weight [8, 16]
            self.head = nn.Linear(8, 3)

    gen = torch.Generator().manual_seed(5)
    base = Net()
    with torch.no_grad():
        for p in base.parameters():
            p.copy_(torch.randint(-32, 33, p.shape, generator=gen).float() / 64)
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    save_file(base_state, tmp_path / "base.safetensors")
    configs = [
        dict(r=4, lora_alpha=8, target_modules=["q", "v", "embed", "conv"], use_rslora=True, alpha_pattern={"q": 2},
             modules_to_save=["head"]),
        dict(r=4, lora_alpha=8, target_modules=["q", "v"], rank_pattern={"v": 2}, bias="all"),
        dict(r=2, lora_alpha=4, target_modules=["c_fc"], fan_in_fan_out=True, lora_bias=True),
    ]
    folders, tuned = [], []
    for i, config in enumerate(configs):
        model = Net()
        model.load_state_dict(base_state)
        peft_model = peft.get_peft_model(model, peft.LoraConfig(**config))
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                trained_bias = config.get("bias") == "all" and name.endswith("bias")
                if "lora_" in name or "modules_to_save" in name or trained_bias:
                    p.copy_(torch.randint(-3, 4, p.shape, generator=gen).float() / 8)
        folder = tmp_path / f"peft{i}"
        peft_model.save_pretrained(folder)
        folders.append(str(folder))
        tuned.append({k: v.clone() for k, v in peft_model.merge_and_unload().state_dict().items()})
    base_path = str(tmp_path / "base.safetensors")
    for folder, theta in zip(folders, tuned):  # one adapter: theta = base + its delta, as PEFT merges it
        got = merge_adapters(base_path, [folder], method="task_arithmetic")
        assert_same(got, {k: theta[k] for k in got})
        assert any(not torch.equal(got[k], base_state[k]) for k in got)
    got = merge_adapters(base_path, folders, method="pcb", ratio=0.3)
    expected = merge(base_state, tuned, method="pcb", ratio=0.3)
    assert_same(got, {k: expected[k] for k in got})


def bad_cases(tmp_path):
    """(adapter folder, expected message) pairs, each wrong in one way; base: family()'s."""
    gen = torch.Generator().manual_seed(9)
    m = f"{P}model.layers.0.self_attn.q_proj"
    A, B = q(gen, 2, 8), q(gen, 8, 2)
    ok = {f"{m}.lora_A.weight": A, f"{m}.lora_B.weight": B}
    cfg = {"r": 2, "lora_alpha": 4}
    cases = []

    def add(name, tensors, config, message, raw_config=None):
        folder = save_adapter(tmp_path / name, tensors, config)
        if raw_config is not None:
            with open(os.path.join(folder, "adapter_config.json"), "w") as f:
                f.write(raw_config)
        cases.append((folder, message))

    add("no-config", ok, cfg, "no adapter_config.json in")
    os.remove(os.path.join(cases[-1][0], "adapter_config.json"))
    add("no-weights", ok, cfg, "no adapter_model.safetensors")
    os.remove(os.path.join(cases[-1][0], "adapter_model.safetensors"))
    add("not-json", ok, cfg, "adapter_config.json is not valid JSON", raw_config="{r: 2")
    add("ia3", ok, {**cfg, "peft_type": "IA3"}, "peft_type='IA3'; only LoRA adapters")
    add("r0", ok, {**cfg, "r": 0}, "r=0; expected a positive integer rank")
    add("alpha", ok, {**cfg, "lora_alpha": "8"}, "lora_alpha='8'; expected a finite number")
    add("dora", ok, {**cfg, "use_dora": True}, "DoRA adapters are not supported")
    add("pissa", ok, {**cfg, "init_lora_weights": "pissa_niter_4"}, "changes the base weights")
    add("pattern", ok, {**cfg, "rank_pattern": {"q_proj": "2"}}, "rank_pattern=")
    add("rank-ab", {f"{m}.lora_A.weight": A, f"{m}.lora_B.weight": q(gen, 8, 3)}, cfg,
        "rank mismatch at 'base_model.model.model.layers.0.self_attn.q_proj.lora_A/lora_B'")
    add("rank-config", ok, {**cfg, "r": 4}, "the factors have rank 2 but adapter_config.json says r=4")
    add("rank-pattern", ok, {**cfg, "rank_pattern": {"q_proj": 8}}, "says r=8 \\(rank_pattern\\)")
    add("missing-key", {f"{P}model.layers.9.q_proj.lora_A.weight": A, f"{P}model.layers.9.q_proj.lora_B.weight": B},
        cfg, "changes 'model.layers.9.q_proj.weight', a key the base model lacks")
    add("shape", {f"{m}.lora_A.weight": q(gen, 2, 7), f"{m}.lora_B.weight": B}, cfg,
        "gives a delta of shape \\(8, 7\\) but the base model's")
    add("fan-in", {f"{P}model.layers.0.mlp.c_fc.lora_A.weight": A, f"{P}model.layers.0.mlp.c_fc.lora_B.weight":
                   q(gen, 16, 2)}, cfg, "check fan_in_fan_out")
    add("half", {f"{m}.lora_A.weight": A}, cfg, "has no matching lora_B.weight")
    add("prefix", {"model.layers.0.self_attn.q_proj.lora_A.weight": A}, cfg, "does not start with 'base_model.model.'")
    add("magnitude", {**ok, f"{m}.lora_magnitude_vector": q(gen, 8)}, cfg, "DoRA magnitude")
    add("unknown", {**ok, f"{m}.lora_E": q(gen, 2)}, cfg, "not a LoRA factor this reader knows")
    add("nan", {f"{m}.lora_A.weight": A * float("nan"), f"{m}.lora_B.weight": B}, cfg, "contains NaN or Inf")
    add("full-shape", {**ok, f"{P}score.weight": q(gen, 4, 8)}, cfg, "has shape \\(4, 8\\) but the base model's")
    add("both", {**ok, f"{P}model.layers.0.self_attn.q_proj.weight": q(gen, 8, 8)}, cfg, "both change")
    add("int-key", {**ok, f"{P}model.steps": torch.tensor(3)}, cfg, "only floating tensors are merged")
    add("lora-bias", ok, {**cfg, "lora_bias": True}, "lora_bias=true but")
    add("conv-fan", {f"{P}model.conv.lora_A.weight": q(gen, 2, 3, 3, 3), f"{P}model.conv.lora_B.weight":
                     q(gen, 6, 2, 1, 1)}, {**cfg, "fan_in_fan_out": True}, "fan_in_fan_out does not apply")
    return cases


def test_bad_adapters_are_one_line_value_errors(tmp_path):
    (tmp_path / "f").mkdir()
    _, base_path, folders, _ = family(tmp_path / "f")
    for folder, message in bad_cases(tmp_path):
        with pytest.raises(ValueError, match=message) as info:
            merge_adapters(base_path, [folders[0], folder])
        assert "\n" not in str(info.value)
        assert "adapter 1" in str(info.value) or "lora" in message
    with pytest.raises(ValueError, match="adapter 1 \\(.*nowhere\\): no such folder"):
        merge_adapters(base_path, [folders[0], str(tmp_path / "nowhere")])
    with pytest.raises(ValueError, match="is not a folder"):
        merge_adapters(base_path, [base_path])
    with pytest.raises(ValueError, match="torch backend on CPU"):
        merge_adapters(base_path, folders, backend="triton")
    with pytest.raises(ValueError, match="has no parameter 'density'"):
        merge_adapters(base_path, folders, method="pcb", density=0.2)
    with pytest.raises(ValueError, match="at least one"):
        merge_adapters(base_path, [])
    for width in (0, -3):  # checked as for a merge of files (once accepted, the merge then ran)
        with pytest.raises(ValueError, match=f"block_width={width} is not valid"):
            merge_adapters(base_path, folders, method="task_arithmetic", block_width=width)
    base = load_file(base_path)
    base["model.layers.0.self_attn.q_proj.weight"][1, 2] = float("nan")  # a key the adapters change
    save_file(base, tmp_path / "nan.safetensors")
    with pytest.raises(ValueError, match="base model, key 'model.layers.0.self_attn.q_proj.weight': contains NaN"):
        merge_adapters(str(tmp_path / "nan.safetensors"), folders, method="task_arithmetic")
    with pytest.raises(ValueError, match="base model, key 'model.layers.0.self_attn.q_proj.weight' contains NaN"):
        merge_adapters(base, folders)  # a state dict: checked before any pass


def test_cli(tmp_path, capsys):
    base, base_path, folders, deltas = family(tmp_path)
    out = tmp_path / "merged"
    args = ["merge", "--base", base_path, "--method", "ties", "--density", "0.3", "--out", str(out), "--quiet"]
    assert main(args[:1] + [x for f in folders for x in ("--adapter", f)] + args[1:]) == 0
    assert_same(load_file(out / "model.safetensors"), dense_merge(base, deltas, method="ties", density=0.3))
    for extra, message in [
        (["--model", base_path], "--model and --adapter cannot be combined"),
        (["--distributed"], "--distributed does not merge --adapter folders"),
        (["--backend", "reference"], "torch backend on CPU"),
    ]:
        code = main(["merge", "--base", base_path, "--adapter", folders[0], "--out", str(tmp_path / "x")] + extra)
        assert code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("pcb-fast: error: ") and message in err and "\n" not in err
    config = tmp_path / "c.yaml"
    config.write_text(f"merge_method: ties\nbase_model: {base_path}\nmodels:\n  - model: {base_path}\n")
    assert main(["merge", "--config", str(config), "--adapter", folders[0], "--out", str(tmp_path / "x")]) == 2
    assert "--adapter cannot be combined with --config" in capsys.readouterr().err
    (tmp_path / "bad").mkdir()
    bad = bad_cases(tmp_path / "bad")[0][0]
    proc = subprocess.run([sys.executable, "-m", "pcb_fast", "merge", "--base", base_path, "--adapter", bad, "--out",
                           str(tmp_path / "y")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("pcb-fast: error: adapter 0 (") and "no adapter_config.json" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "y").exists()


def test_exported():
    assert pcb_fast.merge_adapters is merge_adapters and "merge_adapters" in pcb_fast.__all__


def test_keys_no_adapter_changes_are_copied_in_slices(tmp_path, monkeypatch):
    """A large tensor no adapter touches streams into the output within the memory budget, as a merge of
    files copies it, instead of being read whole."""
    from pcb_fast.io.folder import COPY_CHUNK
    from pcb_test_helpers import slices_read

    gen = torch.Generator().manual_seed(0)
    base = {"model.layers.0.self_attn.q_proj.weight": q(gen, 8, 8),
            "model.buffer": torch.zeros(2 * COPY_CHUNK + 3, dtype=torch.int8)}
    save_file(base, tmp_path / "base.safetensors")
    m = "model.layers.0.self_attn.q_proj"
    folder = save_adapter(tmp_path / "a", {f"{P}{m}.lora_A.weight": q(gen, 2, 8), f"{P}{m}.lora_B.weight": q(gen, 8, 2)},
                          {"r": 2, "lora_alpha": 2})
    largest = slices_read(monkeypatch, "model.buffer")
    out = merge_adapters(str(tmp_path / "base.safetensors"), [folder], tmp_path / "o", method="task_arithmetic",
                         max_memory="1MB")
    assert largest and max(largest) <= COPY_CHUNK
    assert torch.equal(load_file(out / "model.safetensors")["model.buffer"], base["model.buffer"])
