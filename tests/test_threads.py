"""The CPU engine's thread count (core/threads.py): results do not depend on it, "auto" leaves the
cores other processes use, and torch's own setting is restored after every merge."""

from __future__ import annotations

import io
import sys

import pytest
import torch

from pcb_fast import merge, pcb_merge
from pcb_fast.cli import main as cli
from pcb_fast.core import threads as th


def models(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = {"a": torch.randn(300, 200, generator=g), "b": torch.randn(1000, generator=g).bfloat16()}
    tuned = [{k: (v.float() + 0.01 * torch.randn(v.shape, generator=g)).to(v.dtype) for k, v in base.items()}
             for _ in range(n)]
    return base, tuned


@pytest.mark.parametrize("method,params", [
    ("pcb", {}), ("pcb", dict(inter="pairwise", clamp_ratio=0.01)), ("pcb", dict(variant="paper")),
    ("pcb", dict(scope="tensor", max_memory=0)), ("ties", dict(density=0.3)), ("dare_ties", dict(p=0.5)),
    ("breadcrumbs", {}), ("average", {}),
])
def test_one_thread_equals_two_byte_for_byte(method, params):
    base, tuned = models()
    one = merge(base, tuned, method=method, threads=1, block_width=4096, fused="off", **params)
    two = merge(base, tuned, method=method, threads=2, block_width=4096, fused="off", **params)
    for k in base:
        assert one[k].view(torch.uint8).tolist() == two[k].view(torch.uint8).tolist(), k


@pytest.mark.parametrize("method,params", [
    ("dare_ties", dict(p=0.5, rescale="l1", scope="tensor")), ("dare", dict(p=0.5, rescale="l1")),
])
def test_l1_rescale_does_not_depend_on_the_thread_count(method, params):
    """mergekit's L1 rescale sums |tau| over whole tensors: blocks wider than torch's grain size
    (32768) would be summed in one split per thread, so 1 and 2 threads rounded differently
    (found on an LLM-size DARE-TIES merge: 1366 entries differed)."""
    base, tuned = models()
    one = merge(base, tuned, method=method, threads=1, fused="off", **params)
    two = merge(base, tuned, method=method, threads=2, fused="off", **params)
    for k in base:
        assert one[k].view(torch.uint8).tolist() == two[k].view(torch.uint8).tolist(), k


@pytest.mark.parametrize("n,D,width", [(4, 100_003, 1 << 17), (3, 70_001, 20_000), (1, 5, 4096)])
def test_l1_factors_are_mergekit_s_sums_over_each_tensor(n, D, width):
    """l1_factors sums the rows of a block at once (sum(1) on one thread): the bits of mergekit's
    ``tensor.abs().sum()`` per task for a tensor of one block; block sums added in float64 otherwise."""
    from pcb_fast.core.options import RunOptions
    from pcb_fast.core.sources import MatrixSource
    from pcb_fast.methods.linear import l1_factors

    g = torch.Generator().manual_seed(n)
    tv = torch.randn(n, D, generator=g) * torch.logspace(-2, 2, n).unsqueeze(1)
    keep = torch.rand(n, D, generator=g) < 0.3
    keep[:, 0] = True
    source = MatrixSource(tv)
    factors = l1_factors(source, RunOptions(), lambda block: keep[:, block.lo : block.hi], width)
    with th.one_thread():
        if D <= width:
            before = torch.stack([tv[i].abs().sum() for i in range(n)])
            after = torch.stack([(tv[i] * keep[i]).abs().sum() for i in range(n)])
        else:
            chunks = [(lo, min(lo + width, D)) for lo in range(0, D, width)]
            before = torch.tensor([sum(float(tv[i, a:b].abs().sum()) for a, b in chunks) for i in range(n)]).float()
            after = torch.tensor([sum(float((tv[i, a:b] * keep[i, a:b]).abs().sum()) for a, b in chunks)
                                  for i in range(n)]).float()
    expected = torch.where((before < 1e-7) | (after < 1e-7), 1.0, before / after)  # mergekit's rule for empty sums
    assert torch.equal(expected.view(torch.int32), factors[:, 0].view(torch.int32))


def test_torch_setting_is_restored_even_when_the_merge_fails():
    before = torch.get_num_threads()
    base, tuned = models()
    merge(base, tuned, threads=1)
    assert torch.get_num_threads() == before
    tuned[1]["a"][3, 4] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        merge(base, tuned, threads=1)
    assert torch.get_num_threads() == before
    pcb_merge(torch.randn(3, 5000), threads=1)
    assert torch.get_num_threads() == before


def test_auto_uses_the_cores_other_processes_leave(monkeypatch):
    monkeypatch.setattr(th, "usable_cores", lambda: 4)
    busy = iter([3, 3, 3] + [0, 0, 0] * 100)
    monkeypatch.setattr(th, "runnable_elsewhere", lambda: next(busy))
    seen = []
    real = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda k: (seen.append(k), real(min(k, 2))))
    monkeypatch.setattr(th, "ADAPT_SECONDS", 0.0)  # look at every block
    policy = th.CpuThreads("auto")
    with policy:
        policy.adapt()
    assert policy.history == [1, 4]  # three others runnable: one core left; then all four
    assert seen[0] == 1 and 4 in seen
    # without /proc, auto takes every usable core
    monkeypatch.setattr(th, "runnable_elsewhere", lambda: None)
    assert th.CpuThreads("auto").choose() == 4
    assert th.CpuThreads(3).choose() == 3


def test_the_other_processes_are_counted_without_this_one(monkeypatch):
    if sys.platform.startswith("linux"):
        assert th.runnable_elsewhere() is not None  # /proc tells on Linux
    stat = b"cpu  1 2 3\nprocs_running 5\nprocs_blocked 0\n"
    monkeypatch.setattr(th, "open", lambda path, mode="r": io.BytesIO(stat), raising=False)
    monkeypatch.setattr(th, "_own_running_threads", lambda: 2)
    assert th.runnable_elsewhere() == 3  # five running, two of them ours
    monkeypatch.setattr(th, "_own_running_threads", lambda: 7)
    assert th.runnable_elsewhere() == 0  # never negative (the two reads are not one snapshot)


@pytest.mark.parametrize("bad", [0, -1, 1.5, "two", True])
def test_bad_thread_counts(bad):
    with pytest.raises(ValueError, match="threads=.* is not valid; use 'auto' or a positive number of threads"):
        merge(*models(), threads=bad)


def test_cli_threads_flag(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli(["merge", "--base", "b", "--model", "m", "--out", str(tmp_path / "o"), "--threads", "0"])
    assert e.value.code == 2
    assert "--threads: '0' is not 'auto' or a positive number of threads" in capsys.readouterr().err


def test_a_compiled_merge_keeps_the_thread_count_it_started_with(monkeypatch):
    # compiled loops are specialised to the thread count: changing it mid-merge would recompile them;
    # the C loops (TIES) are not, and follow the machine as the eager engine does
    monkeypatch.setattr(th, "ADAPT_SECONDS", 0.0)
    looks = iter(range(1000))
    monkeypatch.setattr(th, "runnable_elsewhere", lambda: next(looks) % 2)  # the machine changes all the time
    chosen = []
    real = th.CpuThreads.adapt

    def adapt(self, force=False):
        real(self, force)
        chosen.append(torch.get_num_threads())

    monkeypatch.setattr(th.CpuThreads, "adapt", adapt)
    base, tuned = models()
    merge(base, tuned, method="breadcrumbs", fused="on", block_width=4096)
    assert len(chosen) == 1  # chosen once, at the start
    for fused in ("on", "off"):
        chosen.clear()
        merge(base, tuned, method="ties", fused=fused, block_width=4096)
        assert len(chosen) > 10  # the C loops and the eager engine look again between blocks


def test_the_contribution_cache_takes_threads_and_restores_them():
    pytest.importorskip("cma")
    from pcb_fast.search import ContributionCache

    before = torch.get_num_threads()
    base, tuned = models()
    one = ContributionCache(base, tuned, method="pcb", threads=1, block_width=4096)
    two = ContributionCache(base, tuned, method="pcb", threads=2, block_width=4096)
    assert torch.get_num_threads() == before
    lambdas = [0.9, 1.1, 1.0, 1.2]
    a = {k: v.clone() for k, v in one.apply(lambdas, 0.8).items()}
    b = two.apply(lambdas, 0.8)
    assert all(torch.equal(a[k], b[k]) for k in base) and torch.get_num_threads() == before
    with pytest.raises(ValueError, match="threads=0 is not valid"):
        ContributionCache(base, tuned, method="pcb", threads=0)
