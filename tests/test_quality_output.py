"""Where `python -m benchmarks.quality` writes: a new run folder by default, never the tracked
benchmarks/results/quality.* unless the user names that folder with --out."""

from __future__ import annotations

import pytest

import benchmarks.quality.__main__ as quality


def fake_run(config, seed, log):
    """A finished run's shape (run.py), without the minutes of training."""
    rows = [{"row": "pre-trained", "chosen": {}, "test": [0.3, 0.4]},
            {"row": "individual", "chosen": {}, "test": [0.9, 0.95]},
            {"row": "TIES", "chosen": {"density": 0.2, "lam": 1.0}, "test": [0.5 + 0.01 * seed, 0.6]}]
    return {"tasks": ["a", "b"], "rows": rows, "seconds": 1.0, "parameters": 10}


def stubbed(monkeypatch, tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    monkeypatch.setattr(quality, "RESULTS", results)
    monkeypatch.setattr(quality, "run", fake_run)
    monkeypatch.setattr(quality, "chart", lambda rows, path: path.write_bytes(b"png"))
    return results


def test_a_run_without_out_writes_a_new_run_folder_not_the_tracked_results(monkeypatch, tmp_path):
    results = stubbed(monkeypatch, tmp_path)
    assert quality.main(["--seeds", "2"]) == 0
    assert not (results / "quality.json").exists(), "the tracked results were overwritten"
    runs = sorted((results / "runs").glob("quality-*"))
    assert len(runs) == 1
    assert {p.name for p in runs[0].iterdir()} == {"quality.json", "quality.md", "quality.png"}
    # a second run gets a folder of its own, even within the same second
    assert quality.main(["--seeds", "1"]) == 0
    assert len(list((results / "runs").glob("quality-*"))) == 2


def test_out_names_the_folder(monkeypatch, tmp_path):
    results = stubbed(monkeypatch, tmp_path)
    assert quality.main(["--seeds", "1", "--out", str(results)]) == 0  # refreshing the tracked results
    assert (results / "quality.json").is_file() and not (results / "runs").exists()


def test_the_chart_of_a_single_seed_has_no_error_bars(tmp_path):
    pytest.importorskip("matplotlib")
    rows = quality.summarize([fake_run(None, 0, None)])
    quality.chart(rows, tmp_path / "quality.png")  # the sample deviation of one value is undefined
    assert (tmp_path / "quality.png").stat().st_size > 0
