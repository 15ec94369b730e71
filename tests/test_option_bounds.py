"""Bounds on every numeric option, deep or huge structured input, and the API's one-line
ValueErrors: each case here was a crash, a hang or a traceback (overlapping views, which merge as
their values, are driven through every public entry point)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

import pcb_fast
from pcb_fast.cli import main as cli
from pcb_fast.search import search_lambdas


@pytest.fixture
def small():
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(16, generator=g)}
    return base, [{"w": base["w"] + 0.1 * torch.randn(16, generator=g)} for _ in range(2)]


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("pcb-fast: error: "), err
    assert len(err) < 1200
    return err


@pytest.fixture
def files(tmp_path, small):
    base, models = small
    save_file(base, tmp_path / "base.safetensors")
    for i, m in enumerate(models):
        save_file(m, tmp_path / f"m{i}.safetensors")
    return tmp_path


# ---- 6. numeric options


@pytest.mark.parametrize("threads", ["100000", "65536", str(10**30)])
def test_thread_counts_beyond_the_machine_are_refused(files, threads):
    done = subprocess.run([sys.executable, "-m", "pcb_fast", "merge", "--base", str(files / "base.safetensors"),
                           "--model", str(files / "m0.safetensors"), "--out", str(files / "o"), "--threads", threads,
                           "--quiet"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "four per CPU of this machine" in done.stderr, done.stderr[-500:]
    assert not (files / "o").exists()


@pytest.mark.parametrize("entry", ["merge", "pcb_merge", "search"])
def test_the_api_bounds_threads(small, entry):
    base, models = small
    with pytest.raises(ValueError, match="threads=1000000000000 is out of range"):
        if entry == "merge":
            pcb_fast.merge(base, models, threads=10**12)
        elif entry == "pcb_merge":
            pcb_fast.pcb_merge(torch.randn(2, 16), threads=10**12)
        else:
            search_lambdas(base, models, lambda s: 0.0, budget=2, threads=10**12)


@pytest.mark.parametrize("option, message", [(dict(popsize=0), "popsize=0 is out of range"),
                                             (dict(popsize=10**12), "popsize=1000000000000 is out of range"),
                                             (dict(sigma0=float("nan")), "sigma0=nan is out of range"),
                                             (dict(sigma0=-1.0), "sigma0=-1.0 is out of range"),
                                             (dict(seed=2**40), "seed=1099511627776 is out of range"),
                                             (dict(bounds=(0.8, float("inf"))), "must be finite"),
                                             (dict(x0=[1.0, "x"]), "must be one number or 2 numbers")],
                         ids=["popsize0", "popsize_huge", "sigma0_nan", "sigma0_negative", "seed", "bounds", "x0"])
def test_search_numbers_are_checked_before_the_search(small, option, message):
    base, models = small
    calls = []
    with pytest.raises(ValueError, match=message):
        search_lambdas(base, models, lambda s: calls.append(1) or 0.0, budget=3, method="task_arithmetic", **option)
    assert calls == []


# ---- 7. deep or huge structured input


@pytest.fixture
def deep_config(tmp_path, small):
    """A base folder whose config.json nests 200,000 levels, and a model file."""
    base, models = small
    folder = tmp_path / "base"
    folder.mkdir()
    save_file(base, folder / "model.safetensors")
    (folder / "config.json").write_text("[" * 200_000 + "]" * 200_000)
    save_file(models[0], tmp_path / "m.safetensors")
    return folder, tmp_path / "m.safetensors"


def test_a_deep_config_json_is_one_line(tmp_path, deep_config, capsys):
    folder, model = deep_config
    assert cli(["merge", "--base", str(folder), "--model", str(model), "--out", str(tmp_path / "o"), "--dtype",
                "bfloat16", "--quiet"]) == 2
    assert "nested deeper than 127 levels" in one_error_line(capsys)


def test_a_deep_config_json_for_a_gradient_is_one_line(tmp_path, deep_config, capsys):
    folder, model = deep_config
    (tmp_path / "c.yaml").write_text(f"merge_method: ties\nbase_model: {folder}\nmodels:\n  - model: {model}\n"
                                     "    parameters: {weight: 1.0, density: [0.3, 0.6]}\n")
    assert cli(["merge", "--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "needs the number of layers" in one_error_line(capsys)


BOMB = "\n".join(["a: &a [x, x, x, x, x, x, x, x, x]"]
                 + [f"{c}: &{c} [{', '.join(['*' + p] * 9)}]" for p, c in zip("abcdefgh", "bcdefghi")])


@pytest.mark.parametrize("entry", ["dtype: *i", "parameters: {exclude: *i}", "models: *i"],
                         ids=["dtype", "exclude", "models"])
def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path, capsys, entry):
    (tmp_path / "c.yaml").write_text(f"{BOMB}\nmerge_method: ties\nbase_model: b\n"
                                     + ("" if entry.startswith("models") else "models: [m]\n") + entry + "\n")
    started = time.perf_counter()
    assert cli(["merge", "--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "aliases expand to more than" in one_error_line(capsys)
    assert time.perf_counter() - started < 10


def test_ordinary_aliases_still_work(tmp_path, files):
    (files / "c.yaml").write_text(f"merge_method: task_arithmetic\nbase_model: {files / 'base.safetensors'}\n"
                                  f"models:\n  - model: {files / 'm0.safetensors'}\n    parameters: &p {{weight: 0.5}}\n"
                                  f"  - model: {files / 'm1.safetensors'}\n    parameters: *p\n")
    assert cli(["merge", "--config", str(files / "c.yaml"), "--out", str(files / "o"), "--quiet"]) == 0


# ---- 10. the API's promise: one-line ValueErrors


@pytest.mark.parametrize("case, message", [
    ("sparse base", "a torch.sparse_coo tensor; only dense tensors"),
    ("sparse model", "a torch.sparse_coo tensor; only dense tensors"),
    ("block_width=0", "block_width=0 is not valid"),
    ("block_width=-3", "block_width=-3 is not valid"),
    ("exclude=[5]", "exclude: 5 is a int, not a regular expression"),
    ("lam=10**400", "is beyond the range of a float"),
    ("lambdas=[10**400, 1]", "a value is beyond the range of a float"),
    ("density=10**5000", "density=<a int too large to print>"),
], ids=["sparse_base", "sparse_model", "block_width0", "block_width_negative", "exclude_int", "lam", "lambdas",
        "density"])
def test_api_refusals_are_value_errors(small, case, message):
    base, models = small
    kwargs = {}
    if case == "sparse base":
        base = {"w": base["w"].to_sparse()}
    elif case == "sparse model":
        models = [{"w": models[0]["w"].to_sparse()}, models[1]]
    else:
        name, value = case.split("=", 1)
        kwargs[name] = eval(value)
        if name == "density":
            kwargs["method"] = "ties"
    with pytest.raises(ValueError, match=message) as error:
        pcb_fast.merge(base, models, **kwargs)
    assert "\n" not in str(error.value) and len(str(error.value)) < 300


def test_pcb_merge_refusals_are_value_errors():
    with pytest.raises(ValueError, match="sparse_coo tensor"):
        pcb_fast.pcb_merge(torch.randn(2, 16).to_sparse())
    with pytest.raises(ValueError, match="block_width=0 is not valid"):
        pcb_fast.pcb_merge(torch.randn(2, 16), block_width=0)


def test_exclude_none_excludes_nothing(small):
    base, models = small
    assert torch.equal(pcb_fast.merge(base, models, exclude=None)["w"], pcb_fast.merge(base, models)["w"])


def _lora_folder(folder):
    import json

    folder.mkdir()
    save_file({"base_model.model.q.lora_A.weight": torch.ones(2, 4), "base_model.model.q.lora_B.weight": torch.ones(4, 2)},
              folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2,
                                                            "target_modules": ["q"]}))
    return folder


def _linear(weight):
    module = torch.nn.Linear(4, 4, bias=False)
    module.weight = torch.nn.Parameter(weight)
    return module


# Each public entry point, given inputs whose rows share entries (as_strided views): the merge of
# their values, as of dense copies (never a RuntimeError from writing into or through them).
ENTRY_POINTS = {
    "merge": lambda b, m, tmp: pcb_fast.merge({"w": b}, [{"w": x} for x in m], method="ties")["w"],
    "merge, reference": lambda b, m, tmp: pcb_fast.merge({"w": b}, [{"w": x} for x in m], method="ties",
                                                         backend="reference")["w"],
    "pcb_merge": lambda b, m, tmp: pcb_fast.pcb_merge(m[0]),  # four task vectors of four entries
    "pcb_reference": lambda b, m, tmp: pcb_fast.pcb_reference(m[0]),
    "merge_checkpoints": lambda b, m, tmp: load_file(pcb_fast.merge_checkpoints(
        {"w": b}, [{"w": x} for x in m], tmp / f"o{len(list(tmp.iterdir()))}", method="ties")
        / "model.safetensors")["w"],
    "merge_modules": lambda b, m, tmp: pcb_fast.merge_modules(_linear(b), [_linear(x) for x in m],
                                                              method="ties").weight.detach(),
    "search_lambdas": lambda b, m, tmp: search_lambdas({"w": b}, [{"w": x} for x in m], lambda s: float(s["w"].sum()),
                                                       budget=2, method="task_arithmetic").model["w"],
    "grid_search": lambda b, m, tmp: pcb_fast.grid_search({"w": b}, [{"w": x} for x in m],
                                                          lambda s: float(s["w"].sum()), lams=[0.5],
                                                          method="task_arithmetic").model["w"],
    "merge_adapters": lambda b, m, tmp: pcb_fast.merge_adapters(
        {"q.weight": b}, [_lora_folder(tmp / f"a{len(list(tmp.iterdir()))}")], method="task_arithmetic")["q.weight"],
}


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_overlapping_views_merge_as_their_values(tmp_path, entry):
    storage = torch.randn(19, generator=torch.Generator().manual_seed(1))
    base = storage.as_strided((4, 4), (1, 1))  # rows share entries
    models = [(storage + 0.5).as_strided((4, 4), (1, 1)), (storage - 0.25).as_strided((4, 4), (1, 1))]
    inputs = [t.clone() for t in [base, *models]]
    run = ENTRY_POINTS[entry]
    got = run(base, models, tmp_path)
    assert all(torch.equal(t, kept) for t, kept in zip([base, *models], inputs))  # nothing written into them
    assert torch.equal(got, run(inputs[0], inputs[1:], tmp_path))  # dense copies of the same values


def test_a_path_that_is_not_utf8_is_refused_before_the_merge(tmp_path, small):
    import os

    base, models = small
    odd = os.fsdecode(bytes(tmp_path) + b"/bad\xffname.safetensors")
    save_file(base, odd)
    save_file(models[0], tmp_path / "m.safetensors")
    done = subprocess.run([sys.executable, "-m", "pcb_fast", "merge", "--base", odd, "--model",
                           str(tmp_path / "m.safetensors"), "--out", str(tmp_path / "o"), "--quiet"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "bad\\xffname.safetensors: its name is not UTF-8 text" in done.stderr


@pytest.mark.parametrize("count", ["0", "100000"])
def test_the_demo_bounds_its_model_count(capsys, count):
    assert cli(["demo", "--models", count, "--no-check"]) == 2
    assert "--models=" + count + " is out of range; valid: 1 to 64" in one_error_line(capsys)


HUGE = "x" * 1_000_000
BASE, MODELS = {"w": torch.zeros(4)}, [{"w": torch.ones(4)}, {"w": -torch.ones(4)}]


@pytest.mark.parametrize("call", [
    lambda: pcb_fast.merge(BASE, MODELS, method=HUGE),
    lambda: pcb_fast.merge(BASE, MODELS, method="ties", scope=HUGE),
    lambda: pcb_fast.merge(BASE, MODELS, method="ties", topk=HUGE),
    lambda: pcb_fast.merge(BASE, MODELS, method="pcb", inter=HUGE),
    lambda: pcb_fast.merge(BASE, MODELS, method="dare", seed=HUGE),
    lambda: pcb_fast.merge(BASE, MODELS, method="della", density=HUGE),
    lambda: pcb_fast.merge(BASE, MODELS, backend=HUGE),
    lambda: pcb_fast.merge(BASE, MODELS, fused=HUGE),
    lambda: pcb_fast.merge_checkpoints("a", ["b"], "c", dtype=HUGE),
    lambda: search_lambdas(BASE, MODELS, lambda sd: 0.0, method=HUGE),
], ids=["method", "scope", "topk", "inter", "seed", "density", "backend", "fused", "dtype", "search-method"])
def test_a_huge_argument_gives_a_short_message(call):
    """Every refusal quotes what it got, never all of a huge value (a 1 MB string gave a 1 MB line)."""
    with pytest.raises(ValueError) as e:
        call()
    assert len(str(e.value)) < 600 and "\n" not in str(e.value), str(e.value)[:200]
