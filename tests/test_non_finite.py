"""Finite inputs whose merge is not finite, and inputs beyond float32: one-line errors, no output:
a large lam, float16 outputs above 65504, float64 values beyond float32."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("safetensors")
from safetensors.torch import save_file  # noqa: E402

from pcb_fast import merge  # noqa: E402
from pcb_fast.cli import main as cli  # noqa: E402


def models_of(base: torch.Tensor, *deltas: float) -> tuple[dict, list]:
    return {"w": base}, [{"w": base + d} for d in deltas]


def test_a_large_lam_that_overflows_is_refused():
    base, models = models_of(torch.full((8,), 1.0), 10.0, 10.0)
    with pytest.raises(ValueError, match="key 'w': the merged values overflow torch.float32 .* although every input "
                                         "is finite; lower lam or lambdas"):
        merge(base, models, method="task_arithmetic", lam=3e37)
    with pytest.raises(ValueError, match=r"lam=1e\+300 is beyond the float32 range"):
        merge(base, models, method="task_arithmetic", lam=1e300)
    with pytest.raises(ValueError, match=r"lambdas: 1e\+300 is beyond the float32 range"):
        merge(base, models, method="task_arithmetic", lambdas=[1.0, 1e300])


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_a_float16_output_beyond_65504_is_refused(backend):
    base, models = models_of(torch.full((8,), 60000.0, dtype=torch.float16), 5000.0, 5000.0)
    with pytest.raises(ValueError, match=r"key 'w': merged values up to 7e\+04 exceed the range of torch.float16 "
                                         r"\(largest 6.55e\+04\); choose a wider output dtype"):
        merge(base, models, method="task_arithmetic", backend=backend)


def test_float64_inputs_beyond_float32_say_so():
    base = {"w": torch.zeros(8, dtype=torch.float64)}
    big = {"w": torch.full((8,), 1e300, dtype=torch.float64)}
    with pytest.raises(ValueError, match=r"model 1, key 'w': holds values beyond the float32 range the merge "
                                         r"computes in \(\|value\| up to 1e\+300\); every input value must fit float32"):
        merge(base, [{"w": torch.ones(8, dtype=torch.float64)}, big], method="task_arithmetic")
    with pytest.raises(ValueError, match=r"base model, key 'w' holds values beyond the float32 range"):
        merge(big, [base], method="task_arithmetic")
    # finite float32 values whose difference overflows
    edge = {"w": torch.full((8,), 3e38)}
    with pytest.raises(ValueError, match="model 0, key 'w': its difference from the base model overflows float32"):
        merge(edge, [{"w": torch.full((8,), -3e38)}], method="task_arithmetic")


@pytest.mark.parametrize("scope", ["global", "tensor"])
def test_pcb_paper_scores_that_overflow_are_refused(scope, tmp_path, capsys):
    """Finite task vectors whose products tau_i * tau_j leave float32 (the paper variant's pairwise
    terms): one line naming the key, from the API and the CLI, and no output (was an IndexError)."""
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.zeros(256)}
    models = [{"w": torch.rand(256, generator=g) * 1e20 + 1e20} for _ in range(3)]
    with pytest.raises(ValueError, match=r"key 'w': pcb's scores \(variant='paper'\) are not finite: products "
                                         r"tau_i \* tau_j of the task vectors overflow float32"):
        merge(base, models, method="pcb", variant="paper", scope=scope)
    folders = [write(tmp_path / name, state) for name, state in zip(["base", "m0", "m1", "m2"], [base] + models)]
    args = ["merge", "--base", str(folders[0])] + [a for f in folders[1:] for a in ("--model", str(f))]
    assert cli(args + ["--variant", "paper", "--scope", scope, "--quiet", "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pcb's scores (variant='paper') are not finite" in err
    assert not (tmp_path / "out").exists()


def write(folder, tensors):
    folder.mkdir()
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


def test_cli_refuses_non_finite_merges_and_writes_nothing(tmp_path, capsys):
    base = write(tmp_path / "base", {"w": torch.full((16,), 1.0)})
    models = [write(tmp_path / f"m{i}", {"w": torch.full((16,), 11.0)}) for i in range(2)]
    args = ["merge", "--base", str(base), "--model", str(models[0]), "--model", str(models[1]),
            "--method", "task_arithmetic", "--quiet"]
    assert cli(args + ["--lam", "3e37", "--out", str(tmp_path / "a")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "key 'w': the merged values overflow torch.float32" in err
    assert cli(args + ["--lam", "5000", "--dtype", "float16", "--out", str(tmp_path / "b")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "exceed the range of torch.float16" in err
    big = write(tmp_path / "big", {"w": torch.full((16,), 1e300, dtype=torch.float64)})
    base64 = write(tmp_path / "base64", {"w": torch.zeros(16, dtype=torch.float64)})
    assert cli(["merge", "--base", str(base64), "--model", str(big), "--quiet", "--out", str(tmp_path / "c")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds values beyond the float32 range the merge computes in" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "base64", "big", "m0", "m1"]


def test_the_base_check_names_the_first_bad_key_of_many_after_one_synchronisation(monkeypatch):
    """The base model's finiteness is checked for all keys at once (on a GPU, one wait rather than one
    per tensor), then key by key only to name the culprit: the first bad key in order, as before."""
    from pcb_fast.core import checks

    base = {f"k{i:02d}": torch.zeros(4) for i in range(50)}
    base["k07"] = torch.tensor([0.0, float("nan"), 0.0, 0.0])
    base["k30"] = torch.tensor([float("inf"), 0.0, 0.0, 0.0])
    models = [{k: v + 1 for k, v in base.items()}]
    with pytest.raises(ValueError, match=r"^base model, key 'k07' contains NaN or Inf; every input value must be finite$"):
        merge(base, models, method="task_arithmetic")
    calls = []
    real = checks.non_finite_reason
    monkeypatch.setattr(checks, "non_finite_reason", lambda t: calls.append(t) or real(t))
    clean = {k: torch.zeros(4) for k in base}
    merge(clean, [{k: v + 1 for k, v in clean.items()}], method="task_arithmetic")
    assert calls == []  # every key finite: no per-tensor look (each one a synchronisation on a GPU)
    wide = dict(clean, k03=torch.full((4,), 1e300, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"base model, key 'k03' holds values beyond the float32 range"):
        merge(wide, [{k: v.double() if k == "k03" else v for k, v in clean.items()}], method="task_arithmetic")
