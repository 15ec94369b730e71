"""The merge-quality benchmark's plumbing on a small version (two tasks, a few epochs): it checks
that the pipeline trains, merges and reports sensibly, not which method wins."""

from __future__ import annotations

import pytest

pytest.importorskip("sklearn")

from benchmarks.quality.__main__ import markdown, summarize  # noqa: E402
from benchmarks.quality.run import SMOKE, run  # noqa: E402

EXPECTED_ROWS = ["pre-trained", "individual", "average", "task arithmetic", "TIES", "DARE-TIES",
                 "PCB official, inter=sum", "PCB official, inter=normalized_sum", "PCB official, inter=pairwise",
                 "PCB paper", "PCB + CMA-ES lambdas"]


def test_smoke_run():
    result = run(SMOKE, seed=0, log=lambda *a: None)
    rows = {r["row"]: r for r in result["rows"]}
    assert list(rows) == EXPECTED_ROWS
    assert result["tasks"] == ["rot90", "hflip"]
    for r in result["rows"]:
        assert len(r["test"]) == 2 and all(0.0 <= a <= 1.0 for a in r["test"]), r
    # fine-tuning helps each task on its own test split
    assert all(i > p for i, p in zip(rows["individual"]["test"], rows["pre-trained"]["test"]))
    # hyperparameters come from the validation grids
    assert rows["task arithmetic"]["chosen"]["lam"] in SMOKE["ta_lams"]
    assert rows["PCB paper"]["chosen"]["ratio"] in SMOKE["ratios"]
    assert len(rows["PCB + CMA-ES lambdas"]["chosen"]["lambdas"]) == 2
    table = markdown(result["tasks"], summarize([result]))
    assert table.count("\n") == len(EXPECTED_ROWS) + 1 and "| rot90 | hflip |" in table
