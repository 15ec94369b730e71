"""The base folder's config and tokenizer files in the output: the output dtype written into
config.json, and side files that link outside the model folder refused."""

from __future__ import annotations

import json
import os

import pytest
import torch

pytest.importorskip("safetensors")
from safetensors.torch import save_file  # noqa: E402

from pcb_fast.cli import main as cli  # noqa: E402


def model_folder(path, config=None, seed=0):
    path.mkdir()
    g = torch.Generator().manual_seed(seed)
    save_file({"w": torch.randn(8, 8, generator=g)}, str(path / "model.safetensors"))
    if config is not None:
        (path / "config.json").write_text(json.dumps(config))
    (path / "tokenizer_config.json").write_text('{"model_max_length": 8}')
    return path


@pytest.mark.parametrize("fields", [("torch_dtype",), ("dtype",), ("torch_dtype", "dtype"), ()])
def test_the_output_dtype_is_written_into_config_json(tmp_path, fields):
    config = {"model_type": "llama", "hidden_size": 8, **{f: "float32" for f in fields}}
    base = model_folder(tmp_path / "base", config)
    models = [model_folder(tmp_path / f"m{i}", config, seed=i + 1) for i in range(2)]
    out = tmp_path / "out"
    assert cli(["merge", "--base", str(base), "--model", str(models[0]), "--model", str(models[1]),
                "--dtype", "bfloat16", "--quiet", "--out", str(out)]) == 0
    written = json.loads((out / "config.json").read_text())
    assert written == {**config, **{f: "bfloat16" for f in fields}}  # nothing else changed, no field added
    assert (out / "tokenizer_config.json").read_text() == '{"model_max_length": 8}'
    # without --dtype the base's dtypes are kept, and so is its config, byte for byte
    same = tmp_path / "same"
    assert cli(["merge", "--base", str(base), "--model", str(models[0]), "--quiet", "--out", str(same)]) == 0
    assert (same / "config.json").read_bytes() == (base / "config.json").read_bytes()


def test_a_side_file_linking_outside_the_model_folder_is_refused(tmp_path, capsys):
    secret = tmp_path / "secret.json"
    secret.write_text('{"token": "do not copy me"}')
    base = model_folder(tmp_path / "base")
    os.symlink(secret, base / "config.json")
    model = model_folder(tmp_path / "m0", seed=1)
    out = tmp_path / "out"
    assert cli(["merge", "--base", str(base), "--model", str(model), "--quiet", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == ("pcb-fast: error: base model: config.json links to a file outside the model folder; "
                   "copy it into the folder\n")
    assert not out.exists()


def test_the_base_listed_among_the_models_is_left_out(tmp_path, capsys):
    from safetensors.torch import load_file

    base = model_folder(tmp_path / "base")
    models = [model_folder(tmp_path / f"m{i}", seed=i + 1) for i in range(2)]
    listed = tmp_path / "listed"
    assert cli(["merge", "--base", str(base), "--model", str(models[0]), "--model", str(tmp_path / "." / "base"),
                "--model", str(models[1]), "--lambdas", "1.0,7.0,0.5", "--ratio", "0.3", "--out", str(listed)]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f"pcb-fast: warning: model 1 ({tmp_path / '.' / 'base'}) is the base model: left out of the task list " \
                     "(a zero task vector is no task)"
    assert len(err[-1].split("kept fraction per task")[1].split(";")[0].split()) == 2  # two tasks
    plain = tmp_path / "plain"
    assert cli(["merge", "--base", str(base), "--model", str(models[0]), "--model", str(models[1]),
                "--lambdas", "1.0,0.5", "--ratio", "0.3", "--quiet", "--out", str(plain)]) == 0
    assert torch.equal(load_file(str(listed / "model.safetensors"))["w"], load_file(str(plain / "model.safetensors"))["w"])


def test_per_model_parameters_follow_the_models_when_the_base_is_left_out(tmp_path):
    from pcb_fast.drivers.files import merge_checkpoints
    from safetensors.torch import load_file

    base = model_folder(tmp_path / "base")
    models = [model_folder(tmp_path / f"m{i}", seed=i + 1) for i in range(2)]
    with pytest.warns(UserWarning, match="is the base model: left out of the task list"):
        merge_checkpoints(base, [models[0], base, models[1]], tmp_path / "listed", method="ties", scope="tensor",
                          density=[0.3, 0.9, 0.6])
    merge_checkpoints(base, models, tmp_path / "plain", method="ties", scope="tensor", density=[0.3, 0.6])
    assert torch.equal(load_file(str(tmp_path / "listed" / "model.safetensors"))["w"],
                       load_file(str(tmp_path / "plain" / "model.safetensors"))["w"])
