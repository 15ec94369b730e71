"""Coefficient search: the contribution cache against fresh merges, CMA-ES and grid search on a
synthetic evaluation with a known optimum, budgets, bounds, failures, and the search CLI."""

from __future__ import annotations

import functools
import json

import pytest
import torch

pytest.importorskip("cma")

from pcb_fast import merge  # noqa: E402
from pcb_fast.core.options import RunOptions  # noqa: E402
from pcb_fast.cli import main as cli  # noqa: E402
from pcb_fast.search import ContributionCache, EvaluateError, grid_search, search_lambdas  # noqa: E402


def make_models(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = {"a.weight": torch.randn(120, 80, generator=g), "a.bias": torch.randn(80, generator=g).bfloat16(),
            "b.weight": torch.randn(40, 30, generator=g), "step": torch.tensor(7)}
    models = [{k: (v.float() + 0.01 * torch.randn(v.shape, generator=g)).to(v.dtype) if v.is_floating_point() else v
               for k, v in base.items()} for _ in range(n)]
    return base, models


def distance_to(target):
    def evaluate(state):
        return -sum(float(((state[k].float() - target[k].float()) ** 2).sum()) for k in target)
    return evaluate


@pytest.mark.parametrize("method,params", [
    ("pcb", dict(ratio=0.2)), ("pcb", dict(ratio=0.3, variant="paper")), ("pcb", dict(scope="tensor", inter="pairwise")),
    ("task_arithmetic", {}), ("dare", dict(p=0.7, seed=4)), ("ties", dict(density=0.3)),
    ("ties", dict(density=0.2, topk="exact", sign_ties="positive", scope="tensor")),
])
def test_apply_equals_a_fresh_merge_bit_for_bit(method, params):
    base, models = make_models()
    cache = ContributionCache(base, models, method=method, exclude=["b.weight"], **params)
    g = torch.Generator().manual_seed(1)
    first = None
    for trial in range(4):
        lambdas = None if trial == 0 else (0.8 + 0.5 * torch.rand(4, generator=g)).tolist()
        lam = 1.0 if trial < 2 else 0.6
        got = cache.apply(lambdas, lam)
        first = first or got
        assert got is first  # written in place, the same dict every time
        expected = merge(base, models, method=method, lambdas=lambdas, lam=lam, exclude=["b.weight"], **params)
        for k in expected:
            assert got[k].dtype == expected[k].dtype
            assert got[k].view(-1).view(torch.uint8).tolist() == expected[k].view(-1).view(torch.uint8).tolist(), (k, trial)


@pytest.mark.parametrize("variant", ["official", "paper"])
def test_cache_built_over_the_memory_budget_applies_like_a_merge(monkeypatch, variant):
    # Nothing collected: the scores are recomputed in a merge pass, whose entries are recorded.
    import pcb_fast.search as search

    monkeypatch.setattr(search, "RunOptions", functools.partial(RunOptions, memory_budget=0))
    base, models = make_models()
    cache = ContributionCache(base, models, method="pcb", ratio=0.2, variant=variant, block_width=512)
    lambdas = [0.9, 1.2, 1.0, 0.8]
    got = cache.apply(lambdas, 0.7)
    expected = merge(base, models, method="pcb", ratio=0.2, variant=variant, lambdas=lambdas, lam=0.7)
    for k in expected:
        assert torch.equal(got[k], expected[k]), k


def test_pcb_cache_is_sparse():
    base, models = make_models()
    cache = ContributionCache(base, models, ratio=0.1)
    task_vectors = 4 * sum(base[k].numel() for k in ("a.weight", "a.bias", "b.weight")) * 4
    assert cache.nbytes < task_vectors
    report = {}
    merge(base, models, ratio=0.1, report=report)
    assert cache.kept == report["kept"]


def test_cma_es_finds_a_known_optimum():
    base, models = make_models()
    hidden = [0.9, 1.2, 1.05, 0.85]
    evaluate = distance_to(merge(base, models, lambdas=hidden, ratio=0.2))
    result = search_lambdas(base, models, evaluate, budget=100, ratio=0.2, seed=0)
    assert max(abs(a - b) for a, b in zip(result.lambdas, hidden)) < 0.05, result.lambdas
    assert len(result.history) == 100
    assert all(0.8 <= x <= 1.3 for h in result.history for x in h["lambdas"])
    assert result.history[0]["lambdas"] == [1.0] * 4  # x0 is evaluated first
    assert result.score == max(h["score"] for h in result.history)
    assert torch.equal(result.model["a.weight"], merge(base, models, lambdas=result.lambdas, ratio=0.2)["a.weight"])
    again = search_lambdas(base, models, evaluate, budget=100, ratio=0.2, seed=0)
    assert again.lambdas == result.lambdas  # reproducible for a fixed seed


def test_budget_bounds_callback_and_history(tmp_path):
    base, models = make_models(n=3)
    evaluate = distance_to(merge(base, models, method="task_arithmetic", lambdas=[1.5, 0.5, 1.0]))
    result = search_lambdas(base, models, evaluate, method="task_arithmetic", bounds=(0.9, 1.1), budget=13,
                            popsize=4, history_path=tmp_path / "h.json")
    assert len(result.history) == 13
    assert all(0.9 <= x <= 1.1 for h in result.history for x in h["lambdas"])
    saved = json.loads((tmp_path / "h.json").read_text())
    assert len(saved["history"]) == 13 and saved["best"]["score"] == result.score
    result.write_history(tmp_path / "h.csv")
    assert (tmp_path / "h.csv").read_text().splitlines()[0] == "candidate,score,seconds,lambda_0,lambda_1,lambda_2"
    stopped = search_lambdas(base, models, evaluate, method="task_arithmetic", budget=50,
                             callback=lambda entry: entry["candidate"] >= 4)
    assert len(stopped.history) == 5


def test_failing_evaluate_names_the_candidate():
    base, models = make_models(n=2)

    def broken(state):
        raise RuntimeError("out of GPU memory")

    with pytest.raises(EvaluateError, match=r"evaluate raised RuntimeError: out of GPU memory \(candidate 0, lambdas=\[1.0, 1.0\]\)"):
        search_lambdas(base, models, broken, budget=5)
    with pytest.raises(EvaluateError, match="evaluate returned nan"):
        search_lambdas(base, models, lambda s: float("nan"), budget=5)


@pytest.mark.parametrize("kwargs,message", [
    (dict(bounds=(1.3, 0.8)), "bounds=\\(1.3, 0.8\\) must be \\(low, high\\)"),
    (dict(budget=0), "budget=0 must be a positive integer"),
    (dict(x0=2.0), "x0=2.0 must be one number or 2 numbers inside bounds"),
    (dict(method="average"), "method='average' has no per-task coefficients to search"),
    (dict(density=0.2), "method 'pcb' has no parameter 'density'"),
])
def test_bad_search_parameters(kwargs, message):
    base, models = make_models(n=2)
    with pytest.raises(ValueError, match=message):
        search_lambdas(base, models, lambda s: 0.0, **kwargs)


def test_grid_search_over_lam_and_ratio_reuses_the_clip_statistics():
    base, models = make_models()
    evaluate = distance_to(merge(base, models, ratio=0.3, lam=0.7))
    result = grid_search(base, models, evaluate, lams=(0.5, 0.7, 0.9), ratios=(0.1, 0.3, 0.5))
    assert (result.lam, result.ratio) == (0.7, 0.3) and result.score == 0.0
    assert len(result.history) == 9
    with pytest.raises(ValueError, match="method 'ties' has no keep ratio"):
        grid_search(base, models, evaluate, ratios=(0.1,), method="ties")


def test_search_cli(tmp_path, capsys):
    from safetensors.torch import save_file

    base, models = make_models(n=3)
    save_file(base, tmp_path / "base.safetensors")
    args = ["search", "--base", str(tmp_path / "base.safetensors"), "--ratio", "0.2", "--budget", "30", "--quiet"]
    for i, m in enumerate(models):
        save_file(m, tmp_path / f"m{i}.safetensors")
        args += ["--model", str(tmp_path / f"m{i}.safetensors")]
    torch.save(merge(base, models, lambdas=[0.9, 1.2, 1.0], ratio=0.2), tmp_path / "target.pt")
    (tmp_path / "user_eval.py").write_text(
        "import torch\nT = torch.load(%r)\n" % str(tmp_path / "target.pt")
        + "def score(sd):\n    return -sum(float(((sd[k].float() - T[k].float()) ** 2).sum()) for k in T)\n"
        + "def broken(sd):\n    raise KeyError('logits')\n")
    good = args + ["--eval", f"{tmp_path / 'user_eval.py'}:score", "--out", str(tmp_path / "best"),
                   "--history", str(tmp_path / "h.csv")]
    assert cli(good) == 0
    assert (tmp_path / "best" / "model.safetensors").exists() and len((tmp_path / "h.csv").read_text().splitlines()) == 31
    # the folder records the merge as a merge's does: its config, run again, gives the same model
    assert "PCB-Merging" in (tmp_path / "best" / "README.md").read_text()
    assert cli(["merge", "--config", str(tmp_path / "best" / "mergekit_config.yml"), "--out", str(tmp_path / "again"),
                "--quiet"]) == 0
    from safetensors.torch import load_file

    best, again = (load_file(tmp_path / name / "model.safetensors") for name in ("best", "again"))
    assert best.keys() == again.keys() and all(torch.equal(best[k], again[k]) for k in best)
    assert cli(args + ["--eval", f"{tmp_path / 'user_eval.py'}:broken", "--out", str(tmp_path / "b2")]) == 1
    assert "search failed: evaluate raised KeyError: 'logits' (candidate 0" in capsys.readouterr().err
    assert not (tmp_path / "b2").exists()
    assert cli(args + ["--eval", "no_such_module_xyz:f", "--out", str(tmp_path / "b3")]) == 2
    assert "cannot import no_such_module_xyz" in capsys.readouterr().err
    assert cli(args + ["--eval", "x", "--out", str(tmp_path / "b3")]) == 2
    assert "must be module:function" in capsys.readouterr().err
