"""The benchmark runner's plumbing on a tiny size (the figures come from `python -m benchmarks.run`)."""

from benchmarks.run import markdown, one_size


def test_one_size_runs_every_path_and_checks_agreement():
    row = one_size(3, 1 << 12, repeats=1, with_baselines=True, peers=None)
    assert {"pcb torch", "pcb reference", "average", "task_arithmetic", "ties", "dare", "dare_ties",
            "breadcrumbs"} <= set(row["paths"])
    assert row["pcb_identical"] is True
    for path in row["paths"].values():
        assert path["seconds"]["min"] <= path["seconds"]["median"] <= path["seconds"]["max"]
        assert path["peak_bytes"] >= 0
    table = markdown([row], "D")
    assert table.splitlines()[2].startswith("| 2^12 |") and table.count("\n") == 2
