"""The pcb-fast command line and the demo."""

import subprocess
import sys

from pcb_fast.cli import main


def test_demo_runs_and_matches_reference(capsys):
    assert main(["demo", "--models", "2"]) == 0
    out = capsys.readouterr().out
    assert "merged 27 tensors" in out
    assert "kept fraction per task: 0.1000 0.1000" in out
    assert "results identical bit for bit: yes" in out


def test_the_demo_shows_it_is_alive_during_a_long_step(capsys):
    """The reference check takes many times the merge's time: the demo says how long it has run."""
    import time

    from pcb_fast.demo import _ticking

    with _ticking("reference path", every=0.05):
        time.sleep(0.18)
    ticks = capsys.readouterr().out.splitlines()
    assert len(ticks) >= 2 and all(t.startswith("  reference path: ") and t.endswith(" s ...") for t in ticks), ticks


def test_bad_argument_is_one_line_error_and_exit_2():
    proc = subprocess.run([sys.executable, "-m", "pcb_fast", "demo", "--ratio", "1.5"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "pcb-fast: error: ratio=1.5 is out of range; valid: 0 < ratio <= 1"
    assert proc.stdout == ""


def _three_tensor_models(tmp_path):
    import torch

    from pcb_fast.io.folder import save_model

    g = torch.Generator().manual_seed(0)
    base = {f"layers.{i}.weight": torch.randn(32, 16, generator=g) for i in range(3)}
    save_model(base, tmp_path / "base")
    for name in ("a", "b"):
        save_model({k: v + torch.randn(v.shape, generator=g) for k, v in base.items()}, tmp_path / name)
    return ["--base", str(tmp_path / "base"), "--model", str(tmp_path / "a"), "--model", str(tmp_path / "b")]


def test_progress_outside_a_terminal_is_plain_lines_and_one_for_a_per_tensor_run(tmp_path):
    """A log gets lines, not carriage returns; a per-tensor merge one line for the run, not one per pass
    of every tensor; a global merge one line per pass."""
    models = _three_tensor_models(tmp_path)
    run = [sys.executable, "-m", "pcb_fast", "merge", *models, "--method", "ties", "--density", "0.5"]
    per_tensor = subprocess.run(run + ["--scope", "tensor", "--out", str(tmp_path / "t")], capture_output=True,
                                text=True)
    assert per_tensor.returncode == 0, per_tensor.stderr
    assert "\r" not in per_tensor.stderr
    lines = [line for line in per_tensor.stderr.splitlines() if " read in " in line]
    assert len(lines) == 1 and lines[0].startswith("pcb-fast: 3 tensors, each with its own statistics: "), per_tensor.stderr
    whole = subprocess.run(run + ["--out", str(tmp_path / "g")], capture_output=True, text=True)
    assert whole.returncode == 0, whole.stderr
    passes = [line for line in whole.stderr.splitlines() if " read in " in line]
    assert passes and passes[0].startswith("pcb-fast: pass 1 of ") and "\r" not in whole.stderr, whole.stderr


OPTIONAL = ("transformers", "peft", "huggingface_hub", "triton", "cma", "sklearn", "scipy", "matplotlib", "mergekit",
            "accelerate", "datasets", "safetensors", "jinja2")


def test_a_plain_merge_imports_no_optional_package(tmp_path):
    """The command line imports what a merge of files needs (torch, PyYAML for mergekit_config.yml),
    not the optional packages that other paths use (Hub names, tokenizers, adapters, search, GPUs)."""
    models = _three_tensor_models(tmp_path)
    code = ("import runpy, sys\nsys.argv = sys.argv[1:]\ntry:\n    runpy.run_module('pcb_fast', run_name='__main__')\n"
            "except SystemExit as e:\n    assert not e.code, e.code\nprint(' '.join(sorted(sys.modules)))")
    run = subprocess.run([sys.executable, "-c", code, "pcb-fast", "merge", *models, "--method", "ties", "--quiet",
                          "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    loaded = {name.split(".")[0] for name in run.stdout.split()}
    assert (tmp_path / "out" / "model.safetensors").exists() and "pcb_fast" in loaded
    assert not loaded & set(OPTIONAL), sorted(loaded & set(OPTIONAL))
