"""The GPU runbook's steps write their JSON after every check or case, so a step stopped by its time
limit (gpu_check.sh runs each under `timeout`) leaves what it measured, marked incomplete."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("triton")


class Stopped(BaseException):
    """What a time limit does to a step: it ends in the middle of a check (no handler catches it)."""


def test_gpu_check_keeps_the_checks_done_before_a_stop(tmp_path, monkeypatch):
    from benchmarks import gpu_check

    def stop(device, gen):
        raise Stopped

    monkeypatch.setattr(gpu_check, "checks", lambda quick: [("first", lambda d, g: {"unexplained": 0}),
                                                            ("second", stop), ("third", lambda d, g: {})])
    out = tmp_path / "gpu_check.json"
    with pytest.raises(Stopped):
        gpu_check.main(["--quick", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["complete"] is False and report["checks_planned"] == 3
    assert [c["check"] for c in report["checks"]] == ["first"] and report["checks"][0]["ok"]


def test_bench_gpu_keeps_the_cases_done_before_a_stop(tmp_path, monkeypatch):
    from benchmarks import bench_gpu

    calls = []

    def case(n, D, dtype, device, repeats, with_reference):
        calls.append(n)
        if len(calls) == 2:
            raise Stopped
        return {"n": n, "D": D}

    monkeypatch.setattr(bench_gpu, "case", case)
    out = tmp_path / "gpu.json"
    with pytest.raises(Stopped):
        bench_gpu.main(["--smoke", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["complete"] is False and report["results"] == [{"n": 8, "D": 4096}]
