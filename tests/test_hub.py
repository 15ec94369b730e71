"""Model names on the Hugging Face Hub (pcb_fast/io/hub.py), tested without network against a cache
built here in huggingface_hub's layout (refs, snapshots linking to blobs), with HF_HUB_OFFLINE."""

import hashlib
import json
import os

import pytest
import torch
import yaml

safetensors_torch = pytest.importorskip("safetensors.torch")
constants = pytest.importorskip("huggingface_hub.constants")

from pcb_fast.cli import main as cli  # noqa: E402
from pcb_fast.io.hub import is_hub_reference  # noqa: E402

KEYS = ["model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight"]


def publish(cache, repo, state, revision="main", adapter=None):
    """``state`` as the Hub model ``repo`` in the cache (a snapshot of links to blobs, a ref); with
    ``adapter`` (its adapter_config.json), as a PEFT adapter whose weights are ``state``."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    files = {"config.json": json.dumps({"model_type": "llama", "num_hidden_layers": 2}).encode(),
             "tokenizer_config.json": b'{"model_max_length": 8}'}
    if adapter is not None:
        files = {"adapter_config.json": json.dumps(adapter).encode()}
    local = folder / "tmp.safetensors"
    folder.mkdir(parents=True, exist_ok=True)
    safetensors_torch.save_file(state, local)
    files["adapter_model.safetensors" if adapter is not None else "model.safetensors"] = local.read_bytes()
    local.unlink()
    commit = hashlib.sha1(repo.encode() + revision.encode()).hexdigest()
    snapshot = folder / "snapshots" / commit
    (folder / "blobs").mkdir(exist_ok=True)
    snapshot.mkdir(parents=True)
    for name, data in files.items():
        blob = folder / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    (folder / "refs").mkdir(exist_ok=True)
    (folder / "refs" / revision).write_text(commit)
    return snapshot


@pytest.fixture
def hub(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    g = torch.Generator().manual_seed(0)
    base = {k: torch.randn(8, 6, generator=g) for k in KEYS}
    tuned = [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(2)]
    folders = {"org/base": publish(cache, "org/base", base), "org/ft0": publish(cache, "org/ft0", tuned[0]),
               "org/ft1@v1": publish(cache, "org/ft1", tuned[1], revision="v1")}
    return tmp_path, folders


def test_hub_names_merge_as_their_cached_folders(hub, monkeypatch):
    tmp, folders = hub
    monkeypatch.chdir(tmp)
    assert is_hub_reference("org/base") and not is_hub_reference(str(folders["org/base"]))
    raw = {"merge_method": "ties", "base_model": "org/base", "parameters": {"density": 0.5},
           "models": [{"model": "org/ft0"}, {"model": "org/ft1@v1", "parameters": {"weight": 0.5}}]}
    (tmp / "hub.yaml").write_text(yaml.safe_dump(raw))
    assert cli(["merge", "--config", "hub.yaml", "--out", "from_hub", "--quiet"]) == 0
    local = dict(raw, base_model=str(folders["org/base"]),
                 models=[{"model": str(folders["org/ft0"])}, {"model": str(folders["org/ft1@v1"]),
                                                               "parameters": {"weight": 0.5}}])
    (tmp / "local.yaml").write_text(yaml.safe_dump(local))
    assert cli(["merge", "--config", "local.yaml", "--out", "from_folders", "--quiet"]) == 0
    assert (tmp / "from_hub" / "model.safetensors").read_bytes() == (tmp / "from_folders" / "model.safetensors").read_bytes()
    assert json.loads((tmp / "from_hub" / "tokenizer_config.json").read_text()) == {"model_max_length": 8}
    recorded = yaml.safe_load((tmp / "from_hub" / "mergekit_config.yml").read_text())
    assert recorded["base_model"] == "org/base" and [m["model"] for m in recorded["models"]] == ["org/ft0", "org/ft1@v1"]
    front = yaml.safe_load((tmp / "from_hub" / "README.md").read_text().split("---")[1])
    assert front["base_model"] == ["org/base", "org/ft0", "org/ft1"]
    # the flags take Hub names too
    assert cli(["merge", "--base", "org/base", "--model", "org/ft0", "--out", "flags", "--quiet"]) == 0


def test_hub_model_with_a_hub_lora_adapter(hub, monkeypatch):
    """mergekit's org/model+org/adapter: both from the cache (the adapter's own files), merged as the
    local model+adapter folders are, and recorded as written."""
    tmp, folders = hub
    monkeypatch.chdir(tmp)
    g = torch.Generator().manual_seed(1)
    factors = {"base_model.model.model.layers.0.mlp.up_proj.lora_A.weight": torch.randn(2, 6, generator=g),
               "base_model.model.model.layers.0.mlp.up_proj.lora_B.weight": torch.randn(8, 2, generator=g)}
    folders["org/lora"] = publish(tmp / "hub", "org/lora", factors, adapter={
        "peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["up_proj"]})
    runs = {"from_hub": "org/base+org/lora", "from_folders": f"{folders['org/base']}+{folders['org/lora']}"}
    for out, ref in runs.items():
        raw = {"merge_method": "task_arithmetic", "base_model": "org/base", "models": [{"model": ref}]}
        (tmp / f"{out}.yaml").write_text(yaml.safe_dump(raw))
        assert cli(["merge", "--config", f"{out}.yaml", "--out", out, "--quiet"]) == 0
    assert (tmp / "from_hub" / "model.safetensors").read_bytes() == (tmp / "from_folders" / "model.safetensors").read_bytes()
    merged = safetensors_torch.load_file(tmp / "from_hub" / "model.safetensors")
    base = safetensors_torch.load_file(folders["org/base"] / "model.safetensors")
    key = "model.layers.0.mlp.up_proj.weight"
    lora = factors[f"base_model.model.{key[:-len('.weight')]}.lora_B.weight"] @ factors[
        f"base_model.model.{key[:-len('.weight')]}.lora_A.weight"]
    torch.testing.assert_close(merged[key], base[key] + 2.0 * lora, rtol=0, atol=1e-6)
    assert all(torch.equal(merged[k], base[k]) for k in KEYS if k != key)
    recorded = yaml.safe_load((tmp / "from_hub" / "mergekit_config.yml").read_text())
    assert recorded["models"][0]["model"] == "org/base+org/lora"


def test_a_missing_model_offline_is_named_with_how_to_fetch_it(hub, monkeypatch, capsys):
    tmp, _ = hub
    monkeypatch.chdir(tmp)
    raw = {"merge_method": "ties", "base_model": "org/base", "models": [{"model": "org/absent@v2"}]}
    (tmp / "c.yaml").write_text(yaml.safe_dump(raw))
    assert cli(["merge", "--config", "c.yaml", "--out", "out"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "models[0].model: 'org/absent@v2' is not in the Hugging Face cache and the Hub cannot " \
        "be reached (HF_HUB_OFFLINE is set); fetch it first with `hf download org/absent --revision v2`" in err[0], err
    assert not (tmp / "out").exists()
