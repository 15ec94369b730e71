"""The benchmark runner's plumbing on a tiny size (the figures come from `python -m benchmarks.run`)."""

import torch

from benchmarks.memory import measure
from benchmarks.run import markdown, one_size


def test_one_size_runs_every_path_and_checks_agreement():
    row = one_size(3, 1 << 12, repeats=1, with_baselines=True, peers=None)
    assert {"pcb torch", "pcb reference", "average", "task_arithmetic", "ties", "dare", "dare_ties",
            "breadcrumbs"} <= set(row["paths"])
    assert row["pcb_identical"] is True
    for path in row["paths"].values():
        assert path["seconds"]["min"] <= path["seconds"]["median"] <= path["seconds"]["max"]
        assert isinstance(path["peak_bytes"], int)
    table = markdown([row], "D")
    assert table.splitlines()[2].startswith("| 2^12 |") and table.count("\n") == 2


def test_the_peak_counts_what_a_call_touches():
    # the plumbing above records peaks; here they must see 64 MiB written inside the call
    _, seconds, peak, before = measure(lambda: torch.ones(16 << 20).sum())
    assert seconds > 0 and peak - before >= 60 << 20
