"""Progress bars: one per pass, "pass k of n: what it does", n announced before the first pass and
revised where the data adds passes (core/options.py PassBars)."""

import re

import pytest
import torch

from pcb_fast.core import engine
from pcb_fast.drivers.files import merge_checkpoints
from pcb_fast.io.folder import save_model

BAR = re.compile(r"pass (\d+) of (\d+): [a-z0-9 ]+( \(.+\))?$")


class Bars:
    """A bar factory that records each bar's description."""

    def __init__(self):
        self.started = []

    def __call__(self, total, description):
        self.started.append(description)
        return self

    def update(self, nbytes):
        pass

    def close(self):
        pass


def assert_counted(started):
    """Bars 1..m in order, n never below k, the last "pass m of m"; n changes only on a bar that says why."""
    assert started, "no bar"
    counts = []
    for k, description in enumerate(started, 1):
        match = BAR.match(description)
        assert match, description
        assert int(match[1]) == k and int(match[2]) >= k, started
        counts.append(int(match[2]))
        if k > 1 and counts[-1] != counts[-2]:
            assert match[3], f"n changed without a reason: {started}"
    assert counts[-1] == len(started), started


def folders(tmp_path, dtype, rows=256):
    """A base and three models of three [rows, 110] tensors (rows=256: enough entries for a column
    sample that brackets the thresholds; fewer, and the radix select places them)."""
    g = torch.Generator().manual_seed(0)
    base = {f"layers.{i}.weight": torch.randn(rows, 110, generator=g) for i in range(3)}
    save_model({k: v.to(dtype) for k, v in base.items()}, tmp_path / "base")
    models = []
    for name in ("a", "b", "c"):
        save_model({k: (v + torch.randn(v.shape, generator=g)).to(dtype) for k, v in base.items()}, tmp_path / name)
        models.append(str(tmp_path / name))
    return str(tmp_path / "base"), models


RUNS = [("pcb", {}), ("pcb", {"fused": "off"}), ("pcb", {"variant": "paper"}), ("pcb", {"max_memory": "200KB"}), ("pcb", {"max_memory": "1300KB"}),
        ("pcb", {"max_memory": "550KB"}),
        ("pcb", {"max_memory": "200KB", "fused": "off", "variant": "paper"}), ("ties", {}), ("ties", {"fused": "off"}),
        ("ties", {"fused": "off", "topk": "exact", "max_memory": "200KB"}), ("ties", {"density": 1.0}),
        ("ties", {"density": 1.0, "fused": "off"}), ("dare_ties", {}), ("dare_ties", {"fused": "off", "rescale": "l1"}),
        ("breadcrumbs_ties", {}), ("breadcrumbs", {}), ("task_arithmetic", {}), ("dare", {"rescale": "l1"}),
        ("della", {})]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["cached", "from-files"])
@pytest.mark.parametrize("rows", [256, 8], ids=["sampled", "small"])
def test_every_global_run_counts_its_passes(tmp_path, dtype, rows):
    """Float32 inputs are cached in memory after the first pass, bfloat16 ones read from the files on
    every pass; small models have too few entries for a column sample (the radix select instead)."""
    base, models = folders(tmp_path, dtype, rows)
    plans = {}
    for number, (method, params) in enumerate(RUNS):
        bars = Bars()
        merge_checkpoints(base, models, str(tmp_path / f"out{number}"), method=method, progress=bars, **params)
        assert_counted(bars.started)
        plans[method, tuple(params.items())] = [d.split(": ", 1)[1] for d in bars.started]
    if rows == 256:  # what the passes do, for a few of them
        assert plans["pcb", ()] == ["clip bounds", "score and collect"]
        assert plans["pcb", (("max_memory", "200KB"),)] == ["clip bounds", "bracket", "merge"]
        # float32 inputs cached in memory: what the cache leaves of the budget is too little to collect
        assert plans["pcb", (("max_memory", "1300KB"),)] == (
            ["clip bounds", "bracket", "merge"] if dtype == torch.float32 else ["clip bounds", "score and collect"])
        # positions and scores fit where the whole collection does not: collected without tau, read again
        assert plans["pcb", (("max_memory", "550KB"),)] == ["clip bounds", "score and collect", "merge"]
        assert plans["ties", (("fused", "off"), ("topk", "exact"), ("max_memory", "200KB"))] == [
            "sample", "bracket", "tie counts", "signs", "merge"]
    else:
        assert plans["pcb", (("fused", "off"),)] == ["clip bounds", "histogram", "score and collect"]
    assert plans["task_arithmetic", ()] == ["merge"]
    assert plans["dare", (("rescale", "l1"),)] == ["l1 norms", "merge"]


def _missing(guess):
    """engine.bounds_from_sample with brackets entirely above the thresholds."""

    def bounds(sample_scores, rank, D):
        found = guess(sample_scores, rank, D)
        if found is None:
            return None
        floor, ceiling = found
        return ceiling + (ceiling - floor), ceiling + 2 * (ceiling - floor)

    return bounds


@pytest.mark.parametrize("method,params,why", [
    ("ties", {}, "bracket missed, re-reading"),
    ("pcb", {"max_memory": "200KB"}, "bracket missed, re-reading"),
    ("pcb", {"fused": "off"}, "sampled floor too high, re-reading")])
def test_a_missed_bracket_adds_passes_and_says_so(tmp_path, monkeypatch, method, params, why):
    base, models = folders(tmp_path, torch.bfloat16)
    monkeypatch.setattr(engine, "bounds_from_sample", _missing(engine.bounds_from_sample))
    bars = Bars()
    merge_checkpoints(base, models, str(tmp_path / "out"), method=method, progress=bars, **params)
    assert_counted(bars.started)
    first = int(BAR.match(bars.started[0])[2])
    assert len(bars.started) > first and any(d.endswith(f"({why})") for d in bars.started), bars.started


def test_a_bracket_too_wide_for_the_budget_adds_the_radix_passes(tmp_path):
    base, models = folders(tmp_path, torch.bfloat16)
    bars = Bars()
    merge_checkpoints(base, models, str(tmp_path / "out"), method="ties", fused="off", max_memory="20KB", progress=bars)
    assert_counted(bars.started)
    assert [d.split(": ", 1)[1] for d in bars.started] == [
        "sample", "bracket", "histogram (bracket too wide for the memory budget)", "threshold", "signs", "merge"]


def test_a_per_tensor_run_has_one_bar(tmp_path):
    base, models = folders(tmp_path, torch.float32, rows=8)
    bars = Bars()
    merge_checkpoints(base, models, str(tmp_path / "out"), method="ties", scope="tensor", progress=bars)
    assert bars.started == ["3 tensors, each with its own statistics"]


@pytest.mark.parametrize("method", ["pcb", "ties", "dare_ties"])
def test_an_adapter_merge_counts_its_passes(tmp_path, method):
    from pcb_fast import merge_adapters
    from test_lora import family

    _, base_file, adapters, _ = family(tmp_path)
    bars = Bars()
    merge_adapters(base_file, adapters, method=method, progress=bars)
    assert_counted(bars.started)


class UnitBars(Bars):
    def __call__(self, total, description, unit="B"):
        return super().__call__(total, description if unit == "B" else f"{description} [{unit}]")


@pytest.mark.parametrize("method,params", [("pcb", {}), ("pcb", {"scope": "tensor"}), ("ties", {"density": 0.3}),
                                           ("ties", {"scope": "tensor"}), ("dare", {})])
def test_a_search_counts_the_passes_of_its_cache_then_its_evaluations(method, params):
    from pcb_fast.search import search_lambdas

    g = torch.Generator().manual_seed(0)
    base = {f"w{i}": torch.randn(300, 300, generator=g) for i in range(2)}
    models = [{k: v + torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(2)]
    bars = UnitBars()
    search_lambdas(base, models, lambda state: 0.0, budget=3, method=method, progress=bars, **params)
    *passes, last = bars.started
    assert last == "search [evaluation]"
    if params.get("scope") == "tensor":
        assert passes == ["2 tensors, each with its own statistics"]
    else:
        assert_counted(passes)


def test_bars_on_a_terminal_without_a_size_and_plain_lines_elsewhere():
    """A pty nobody sized (columns 0) still gets a bar; a pipe gets one line per bar, no carriage return."""
    import os
    import subprocess
    import sys

    import pcb_fast.core.options

    # the module alone (it imports nothing of the package): no torch to import in the children
    code = ("import importlib.util, sys\n"
            f"spec = importlib.util.spec_from_file_location('options', {pcb_fast.core.options.__file__!r})\n"
            "options = importlib.util.module_from_spec(spec)\n"
            "sys.modules['options'] = options\n"
            "spec.loader.exec_module(options)\n"
            "stderr_bars = options.stderr_bars\n"
            "for unit in ('B', 'evaluation'):\n"
            "    bar = stderr_bars(100, 'pass 1 of 1: merge', unit)\n"
            "    bar.update(100)\n"
            "    bar.close()\n")
    piped = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    lines = piped.stderr.splitlines()
    assert "\r" not in piped.stderr and len(lines) == 2, piped.stderr
    assert lines[0].startswith("pcb-fast: pass 1 of 1: merge: 0.0 MiB read in ")
    assert lines[1].startswith("pcb-fast: pass 1 of 1: merge: 100 evaluations in ")
    leader, follower = os.openpty()  # (a new pty reports 0 columns and 0 rows)
    try:
        subprocess.run([sys.executable, "-c", code], stderr=follower, check=True)
        os.close(follower)
        shown = b""
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:
                break
            if not chunk:
                break
            shown += chunk
    finally:
        os.close(leader)
    assert b"pass 1 of 1: merge:" in shown and b"/100 [" in shown, shown


def test_the_compiled_pcb_route_counts_its_passes(tmp_path, monkeypatch, inter="pairwise"):
    """PCB's compiled loops (where its C sweeps do not apply), run here by their eager functions:
    the clip bounds from one bracket pass where the sample is read in place (in memory), else from
    the pass that takes the sample (files); then the score bracket and the merge."""
    from pcb_fast.core.options import PassBars, RunOptions
    from pcb_fast.core.sources import MatrixSource
    from pcb_fast.cpu import fused as fused_cpu
    from pcb_fast.methods import SPECS

    monkeypatch.setattr(fused_cpu.Fusable, "__call__", lambda self, *args: self.eager(*args))
    monkeypatch.setattr(fused_cpu, "has_c_loops", lambda method, params: False)
    monkeypatch.setattr(fused_cpu, "_probe", lambda: None)
    base, models = folders(tmp_path, torch.bfloat16)
    bars = Bars()
    merge_checkpoints(base, models, str(tmp_path / "out"), method="pcb", inter=inter, fused="on", progress=bars)
    assert_counted(bars.started)
    assert [d.split(": ", 1)[1] for d in bars.started] == ["clip bounds", "bracket", "merge"]
    bars = Bars()
    tv = torch.randn(3, 70_000, generator=torch.Generator().manual_seed(0))  # a sample of 4096 columns
    engine.run(SPECS["pcb"].merge, MatrixSource(tv), lambda *a: None, inter=inter,
               options=RunOptions(fused=True, progress=PassBars(bars)))
    assert_counted(bars.started)
    assert [d.split(": ", 1)[1] for d in bars.started] == ["clip bounds", "bracket", "merge"]


def test_an_in_memory_source_needs_no_sample_pass():
    from pcb_fast.core.options import PassBars, RunOptions
    from pcb_fast.core.sources import MatrixSource
    from pcb_fast.methods import SPECS

    tv = torch.randn(3, 100_000, generator=torch.Generator().manual_seed(0))
    bars = Bars()
    engine.run(SPECS["ties"].merge, MatrixSource(tv), lambda *a: None, options=RunOptions(fused=True, progress=PassBars(bars)))
    assert [d.split(": ", 1)[1] for d in bars.started] in (["bracket", "merge"], [
        "bracket", "merge", "merge (sign of zero sums guessed wrong, re-merging undecided blocks)"])
    assert_counted(bars.started)
