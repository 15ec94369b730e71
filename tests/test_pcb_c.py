"""PCB official's C sweeps (pcb_fast/cpu/pcb_loops.c, taken by fused="auto" and "on") against the eager
engine and the reference, bit for bit.

The candidate sweep scores every entry with its own vectorised exp and tanh and keeps the entries
within a wide margin (2^-12, relative) of the floor; torch's exp and tanh then give those entries'
exact scores. So the collection, the thresholds and the merge are the eager engine's exactly,
provided the approximations stay far inside the margin: measured here against torch's functions.
"""

import pytest
import torch

import pcb_fast
import pcb_fast.reference.pcb as reference
from pcb_fast.core import engine
from pcb_fast.core.engine import ColumnSample
from pcb_fast.core.options import RunOptions
from pcb_fast.core.sources import Block, MatrixSource, Segment, StateDictSource
from pcb_fast.cpu import fused as fused_cpu
from pcb_fast.cpu import native
from pcb_fast.cpu import pcb_blocks as tb
from pcb_fast.methods import pcb
from pcb_fast.methods.pcb import merge_pcb

from pcb_test_helpers import run_method

MARGIN = 2.0**-12  # CANDIDATE_MARGIN of pcb_loops.c
APPROXIMATION_BOUND = 2.0**-21  # each approximation's relative error, 2^9 times inside the margin


def relative_error(approx, exact):
    return ((approx.double() - exact.double()).abs() / exact.double().abs().clamp_min(1e-300)).max().item()


def test_approximations_far_inside_the_margin():
    # exp's arguments are n * N^2 in [0, 80] (the C path takes n <= 80); tanh's any product tau * total
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.linspace(0, 80, 1 << 21), torch.rand(1 << 20, generator=g) * 80, torch.tensor([0.0, 80.0])])
    approx_exp, _ = native.pcb_approximations(x)
    assert relative_error(approx_exp, torch.exp(x)) <= APPROXIMATION_BOUND
    magnitude = torch.exp2(torch.rand(1 << 21, generator=g) * 280 - 149)
    w = torch.cat([magnitude, -magnitude, torch.linspace(-12, 12, 1 << 21), torch.tensor([0.625, -0.625, 1e30, -1e30])])
    _, approx_tanh = native.pcb_approximations(w)
    assert relative_error(approx_tanh, torch.tanh(w)) <= APPROXIMATION_BOUND
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 1e-45, -1e-45])
    _, approx_tanh = native.pcb_approximations(special)
    assert torch.equal(approx_tanh.view(torch.int32), torch.tanh(special).view(torch.int32))  # signed zeros


def test_score_bound_lies_above_torch_scores():
    """The bound of the test at a positive floor is at least torch's score less far under the margin (at
    most 2^-17 below it, relative, from the rounding of e log2 e; the margin is 2^-12), for exp's
    arguments in [0, 80] and tanh's from subnormal to large; above it by at most 7% where w is small
    (task vectors), 40% anywhere (min(w, 1) against tanh(w) near w = 1), where the score is a normal
    number; 0 where tanh(w) <= 0 or w is NaN."""
    g = torch.Generator().manual_seed(3)
    e = torch.cat([torch.linspace(0, 80, 1 << 18), torch.rand(1 << 18, generator=g) * 80])
    w = torch.exp2(torch.rand(e.numel(), generator=g) * 160 - 149)
    w[::7] = torch.rand(w[::7].numel(), generator=g) * 20
    exact = torch.exp(e) * torch.tanh(w)
    bound = native.pcb_score_bounds(e, w)
    ratio = bound.double() / exact.double()
    assert ratio.min().item() >= 1 - 2.0**-17
    normal = exact > 1e-37
    assert ratio[normal & (w < 1e-2)].max().item() <= 1.07
    assert ratio[normal].max().item() <= 1.4
    negative = native.pcb_score_bounds(e[:5], torch.tensor([-1e-3, -0.0, 0.0, -5.0, float("nan")]))
    assert torch.equal(negative, torch.zeros(5))


def task_vectors(kind, n, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    tv = torch.randn(n, D, generator=g) * 1e-3
    if kind == "quantized":  # heavy ties at every threshold, zeros and -0.0
        tv = torch.round(tv * 4e3) / 4e3
        tv[0, ::5] = -0.0
    elif kind == "sparse":  # most scores exactly 0: floors and thresholds at 0
        tv[:, torch.rand(D, generator=g) < 0.8] = 0.0
    elif kind == "large":  # products beyond tanh's polynomial range
        tv = torch.randn(n, D, generator=g) * 3
    elif kind == "overflow":  # the sum over tasks overflows at a few columns: tanh(0 * inf), NaN scores
        tv[:, 100:103] = 3e38
        tv[-1, 100:103] = 0.0
    return tv


@pytest.mark.parametrize("inter", ["sum", "normalized_sum"])
@pytest.mark.parametrize("kind", ["normal", "quantized", "sparse", "large"])
@pytest.mark.parametrize("n", [1, 3, 8])
def test_candidates_give_the_eager_collection(inter, kind, n):
    """pcb_candidates, torch's exp and tanh on the arguments, then pcb_keep: the entries, scores and
    values of engine.collect_block over the eager scores, for floors at, above and below scores."""
    D = 20_011
    tv = task_vectors(kind, n, D)
    clip = pcb.clip_bounds(MatrixSource(tv), RunOptions(), 0.01, D, ColumnSample(D, n))
    eager = tb.official_scores(tv, clip, inter, tb.Workspace(n, D, 3)).clone()
    out = pcb.candidate_buffers(n, D)
    block = Block(Segment("w", (D,), D, 0), 0, D, tv)
    floors = [eager.quantile(q, dim=1) for q in (0.0, 0.5, 0.9, 0.999)]
    floors += [eager[:, 123].clone(), torch.zeros(n), torch.full((n,), -1.0), torch.full((n,), float("-inf")),
               torch.full((n,), 1e30)]
    for floor in floors:
        counts, flat, tau, exp_arg, tanh_arg = native.pcb_candidates(tv, clip.lo, clip.hi, clip.span, n,
                                                                     inter == "normalized_sum", floor, out)
        assert int(counts.sum()) == flat.numel()
        score = torch.exp(exp_arg).mul_(torch.tanh(tanh_arg))
        flat, score, tau = native.pcb_keep(counts, flat, score, tau, floor)
        expected = engine.collect_block(block, eager, floor)
        assert torch.equal(flat, expected.flat)
        assert torch.equal(score.view(torch.int32), expected.score.view(torch.int32))
        assert torch.equal(tau.view(torch.int32), expected.tau.view(torch.int32))
        assert counts.tolist() == expected.counts()


@pytest.mark.parametrize("inter", ["sum", "normalized_sum"])
@pytest.mark.parametrize("kind", ["normal", "quantized", "sparse", "large", "overflow"])
def test_bracket_counts_equal_the_eager_ones(inter, kind):
    """pcb_candidates with a ceiling, then pcb_bracket_counts on the exact scores: engine.bracket_counts of
    the eager scores (counts, the scores inside in order, the max), for brackets around, at, above
    and below the scores."""
    n, D = 3, 20_011
    tv = task_vectors(kind, n, D, seed=7)
    clip = pcb.clip_bounds(MatrixSource(tv), RunOptions(), 0.01, D, ColumnSample(D, n))
    eager = tb.official_scores(tv, clip, inter, tb.Workspace(n, D, 3)).clone()
    out = pcb.candidate_buffers(n, D)
    q = lambda x: eager.nan_to_num(0.0).quantile(x, dim=1)  # noqa: E731
    brackets = [(q(0.89), q(0.91)), (eager[:, 77].clone(), eager[:, 77].clone()), (q(0.0), q(1.0)),
                (torch.full((n,), float("-inf")), q(0.5)), (q(0.5), torch.full((n,), float("inf"))),
                (torch.zeros(n), torch.zeros(n)), (torch.full((n,), 1e30), torch.full((n,), 2e30))]
    for floor, ceiling in brackets:
        above, at_ceiling, at_floor = (torch.zeros(n, dtype=torch.int64) for _ in range(3))
        peak = torch.full((n,), float("-inf"))
        counts, _, _, exp_arg, tanh_arg = native.pcb_candidates(tv, clip.lo, clip.hi, clip.span, n,
                                                                inter == "normalized_sum", floor, out, ceiling, above)
        score = torch.exp(exp_arg).mul_(torch.tanh(tanh_arg))
        inside = native.pcb_bracket_counts(counts, score, floor, ceiling, above, at_ceiling, at_floor, peak)
        expected = engine.bracket_counts(eager, floor, ceiling)
        for got, want in zip((above, at_ceiling, at_floor), expected[:3]):
            assert torch.equal(got, want)
        assert all(torch.equal(a, b) for a, b in zip(inside, expected[3]))
        # the max: exact (NaN where the eager max is NaN) where it reaches the floor, as in the pass that
        # finds t (t >= floor); else only known to lie below the floor (the candidates are those above)
        want = expected[4]
        reaches = (want >= floor) | want.isnan()
        assert torch.equal(peak[reaches].nan_to_num(7.0), want[reaches].nan_to_num(7.0))
        assert (peak[~reaches] < floor[~reaches]).all()


def run(tv, fused, **params):
    return run_method(merge_pcb, tv, fused, **params)


@pytest.mark.parametrize("inter", ["sum", "normalized_sum"])
@pytest.mark.parametrize("kind", ["normal", "quantized", "sparse", "large"])
def test_merge_equals_eager_and_reference(inter, kind):
    tv = task_vectors(kind, 3, 100_003, seed=1)
    for params in (dict(), dict(ratio=0.05, clamp_ratio=0.01, lambdas=[0.5, -1.0, 2.0]), dict(ratio=1.0),
                   dict(clamp_ratio=0.0), dict(clamp_ratio=0.3, ratio=0.2)):
        ref = reference.pcb_official(tv, inter=inter, **params)
        # the eager engine once: its budget paths give the same bits (tests/test_select.py, test_fused_pcb.py)
        eager_out, eager_kept = run(tv, False, inter=inter, **params)
        assert torch.equal(eager_out, ref), params
        # budgets: no limit (collected), over it with the bracket in C, and too small for the bracket (radix)
        for budget in (None, 3_000_000, 1000):
            c_out, c_kept = run(tv, True, inter=inter, budget=budget, **params)
            assert torch.equal(c_out, ref), (params, budget)
            assert c_kept == eager_kept


@pytest.mark.parametrize("n, D", [(1, 30_000), (2, 1), (2, 2), (8, 5000), (80, 3000)])
def test_shapes_and_block_widths(n, D):
    tv = task_vectors("normal", n, D, seed=2)
    for block_width in (1000, 4096, 1 << 17):
        c_out, _ = run(tv, True, block_width=block_width)
        assert torch.equal(c_out, reference.pcb_official(tv)), block_width


def test_edge_rows():
    tv = task_vectors("normal", 4, 20_000, seed=3)
    tv[1] = 0.0  # an all-zero task vector contributes nothing
    tv[2] = 0.25  # a constant row normalises to 0
    assert torch.equal(run(tv, True)[0], reference.pcb_official(tv))
    assert torch.equal(run(torch.zeros(3, 5000), True)[0], torch.zeros(5000))


def test_the_c_sweeps_are_taken(monkeypatch):
    """fused=True runs the candidate sweep and the C merge (not the eager scores nor the compiled
    loops); the pairwise term and more than 80 tasks (exp shifted) have no C sweep."""
    calls = {"candidates": 0, "merge": 0}
    candidates, merge_entries = native.pcb_candidates, native.pcb_merge_entries

    def counting(name, function):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(native, "pcb_candidates", counting("candidates", candidates))
    monkeypatch.setattr(native, "pcb_merge_entries", counting("merge", merge_entries))
    monkeypatch.setattr(fused_cpu, "PCB_BLOCK", None)  # the compiled loops must not run
    tv = task_vectors("normal", 3, 50_000, seed=4)
    assert torch.equal(run(tv, True, block_width=10_000)[0], reference.pcb_official(tv))
    assert calls == {"candidates": 5, "merge": 5}
    # over the budget: one bracket pass and the merge pass, both C sweeps, no eager scores of a block
    calls.update(candidates=0, merge=0)
    eager_scores = tb.official_scores
    # (the column sample, 1 column in 17, is scored eagerly; a block never)
    monkeypatch.setattr(tb, "official_scores", lambda tv, *a: eager_scores(tv, *a) if tv.shape[1] < 10_000 else None)
    tv = task_vectors("normal", 3, 100_000, seed=4)
    assert torch.equal(run(tv, True, block_width=20_000, budget=500_000)[0], reference.pcb_official(tv))
    assert calls == {"candidates": 10, "merge": 5}
    source, fused = MatrixSource(tv), RunOptions(fused=True)
    assert pcb._c_loops(source, fused, dict(inter="sum", variant="official"))
    assert not pcb._c_loops(source, fused, dict(inter="pairwise", variant="official"))
    many = MatrixSource(task_vectors("normal", 81, 100))
    assert not pcb._c_loops(many, fused, dict(inter="sum", variant="official"))
    # more than 80 tasks: the eager path (bit-exact), not the compiled loops, even with fused="on"
    x = task_vectors("normal", 81, 3000, seed=9)
    assert torch.equal(pcb_fast.pcb_merge(x, fused="on"), reference.pcb_official(x))
    assert not pcb._c_loops(source, RunOptions(fused=False), dict(inter="sum", variant="official"))


def test_auto_takes_the_c_sweeps_at_any_size():
    # nothing to compile: "auto" fuses PCB at any size where the C library builds (the eager values)
    assert fused_cpu.resolve("auto", 1 << 10, "pcb") is True
    assert fused_cpu.resolve("auto", 1 << 10, "pcb", dict(inter="normalized_sum")) is True
    assert fused_cpu.resolve("off", 1 << 10, "pcb") is False
    # the pairwise term and the paper variant have no C sweep: "auto" compiles nothing below 2^31
    assert fused_cpu.resolve("auto", 1 << 10, "pcb", dict(inter="pairwise")) is False
    assert fused_cpu.resolve("auto", 1 << 10, "pcb", dict(variant="paper")) is False


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_every_entry_point_same_bytes(tmp_path, dtype):
    """merge, merge_checkpoints and pcb_merge: fused="auto" (the C sweeps) and "off" (the eager torch
    ops) give the same bytes, global and per tensor."""
    from safetensors.torch import load_file, save_file

    g = torch.Generator().manual_seed(6)
    base = {"a.weight": torch.randn(300, 70, generator=g).to(dtype), "n.weight": torch.ones(70, dtype=dtype),
            "z.weight": torch.randn(64, 40, generator=g).to(dtype)}
    models = [{k: (v.float() + 1e-2 * torch.randn(v.shape, generator=g)).to(dtype) for k, v in base.items()}
              for _ in range(3)]
    for scope in ("global", "tensor"):
        merged = [pcb_fast.merge(base, models, method="pcb", fused=f, scope=scope) for f in ("auto", "off")]
        assert all(torch.equal(merged[0][k], merged[1][k]) for k in base)
    paths = []
    for i, state in enumerate([base] + models):
        paths.append(tmp_path / f"m{i}.safetensors")
        save_file(state, str(paths[-1]))
    outs = []
    for fused in ("auto", "off"):
        outs.append(tmp_path / f"out-{fused}")
        pcb_fast.merge_checkpoints(paths[0], paths[1:], outs[-1], method="pcb", fused=fused, block_width=1024)
    a, b = (load_file(str(o / "model.safetensors")) for o in outs)
    assert all(torch.equal(a[k], b[k]) for k in base)
    tv = torch.stack([torch.cat([(m[k].float() - base[k].float()).reshape(-1) for k in sorted(base)]) for m in models])
    assert torch.equal(pcb_fast.pcb_merge(tv), reference.pcb_official(tv))


def test_search_and_pcb_merge_take_the_c_sweeps(monkeypatch):
    """The coefficient search's cache and pcb_merge take PCB's C sweeps by default, as merge does, with
    the same bits (the search's apply equals merge with those lambdas)."""
    from pcb_fast.search import ContributionCache

    calls = []
    candidates = native.pcb_candidates
    monkeypatch.setattr(native, "pcb_candidates", lambda *a, **k: calls.append(1) or candidates(*a, **k))
    g = torch.Generator().manual_seed(8)
    base = {"w": torch.randn(200, 300, generator=g)}
    models = [{"w": base["w"] + 1e-2 * torch.randn(200, 300, generator=g)} for _ in range(3)]
    cache = ContributionCache(base, models, method="pcb")
    assert calls
    lambdas = [0.9, 1.2, 0.7]
    assert torch.equal(cache.apply(lambdas, 1.0)["w"], pcb_fast.merge(base, models, method="pcb", lambdas=lambdas,
                                                                      fused="off")["w"])
    calls.clear()
    tv = torch.stack([(m["w"] - base["w"]).reshape(-1) for m in models])
    assert torch.equal(pcb_fast.pcb_merge(tv), pcb_fast.pcb_merge(tv, fused="off"))
    assert calls


def test_portable_build_gives_the_same_bits(monkeypatch, tmp_path):
    """The library built without -march=native (no FMA, no AVX-512: the sweeps' portable branches)
    gives the reference's bits too, collected and over the budget."""
    monkeypatch.setenv("PCB_FAST_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(native, "FLAG_SETS", tuple(flags for flags in native.FLAG_SETS if "-march=native" not in flags))
    native._library.cache_clear()
    try:
        assert native.problem() is None
        for kind in ("normal", "sparse"):
            tv = task_vectors(kind, 3, 40_000, seed=11)
            ref = reference.pcb_official(tv)
            for budget in (None, 300_000):  # collected, and over the budget (bracket pass, merge pass)
                assert torch.equal(run(tv, True, budget=budget, block_width=10_000)[0], ref), (kind, budget)
    finally:
        native._library.cache_clear()


@pytest.mark.parametrize("ceiling", [False, True])
def test_candidates_from_raw_slices_equal_those_from_tau(ceiling):
    """The sweep forming tau itself from the stored slices (a float16 base, bfloat16, float32 and
    float16 models) gives the candidates of the float32 task vectors that torch.sub forms."""
    g = torch.Generator().manual_seed(12)
    D = 30_011
    base = (torch.randn(D, generator=g) * 0.05).to(torch.float16)
    models = [(base.float() + torch.randn(D, generator=g) * 1e-3).to(dtype)
              for dtype in (torch.bfloat16, torch.float32, torch.float16)]
    tv = torch.stack([torch.sub(m, base.float()) for m in models])
    n = tv.shape[0]
    clip = pcb.clip_bounds(MatrixSource(tv), RunOptions(), 0.01, D, ColumnSample(D, n))
    eager = tb.official_scores(tv, clip, "sum", tb.Workspace(n, D, 3)).clone()
    floor, top = eager.quantile(0.85, dim=1), (eager.quantile(0.9, dim=1) if ceiling else None)
    results = []
    for inputs in (tv, [base] + models):
        above = torch.zeros(n, dtype=torch.int64)
        found = native.pcb_candidates(inputs, clip.lo, clip.hi, clip.span, n, False, floor,
                                      pcb.candidate_buffers(n, D), top, above)
        results.append([x.clone() for x in found] + [above])
    assert results[0][0].sum() > 0
    for a, b in zip(*results):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="raw slices must be float32, bfloat16 or float16"):
        native.pcb_candidates([base.double()] + models, clip.lo, clip.hi, clip.span, n, False, floor,
                              pcb.candidate_buffers(n, D))


def test_float64_inputs_take_the_torch_subtraction():
    """State dicts with a float64 model: the sweeps get float32 task vectors formed as the sources form
    them (rounded to float32 first), with the bits of fused="off"."""
    g = torch.Generator().manual_seed(13)
    base = {"w": torch.randn(300, 200, generator=g).to(torch.bfloat16)}
    models = [{"w": (base["w"].double() + 1e-2 * torch.randn(300, 200, generator=g, dtype=torch.float64))}]
    models += [{"w": (base["w"].float() + 1e-2 * torch.randn(300, 200, generator=g)).to(torch.bfloat16)}]
    merged = [pcb_fast.merge(base, models, method="pcb", fused=f, block_width=7000) for f in ("auto", "off")]
    assert torch.equal(merged[0]["w"], merged[1]["w"])


@pytest.mark.parametrize("kind", ["normal", "quantized", "sparse"])
def test_scores_only_collection_over_the_budget(monkeypatch, kind):
    """Over a budget that holds the collected positions and scores but not their tau, the merge collects
    without tau and reads it again in the merge pass (no second scoring sweep): the reference's
    bits, from a matrix and from files (tau from the stored bf16 slices)."""
    calls = []
    gather = pcb.gather_tau
    monkeypatch.setattr(pcb, "gather_tau", lambda *a: calls.append(1) or gather(*a))
    n, D = 3, 60_000
    tv = task_vectors(kind, n, D, seed=14)
    rank = pcb.keep_index(D, 0.1)
    entries = (n * (D - rank)) * 1.05 + n * 4096
    budget = int(entries * 14)  # between the scores only (12 bytes an entry) and the whole collection (16)
    source, options = MatrixSource(tv), RunOptions(fused=True, memory_budget=budget)
    assert pcb.collects_scores_only(source, options, rank) and not engine.can_collect(source, options, rank)
    out, kept = run(tv, True, budget=budget, block_width=7000)
    assert calls and torch.equal(out, reference.pcb_official(tv))
    assert kept == run(tv, False)[1]
    # state dicts of bf16 weights: the sweeps and the gather read the stored slices
    g = torch.Generator().manual_seed(15)
    base = {"w": (torch.randn(D, generator=g) * 0.02).to(torch.bfloat16)}
    models = [{"w": (base["w"].float() + tv[i]).to(torch.bfloat16)} for i in range(n)]
    merged = []
    calls.clear()
    for fused in (True, False):
        out = torch.empty(D)
        engine.run(merge_pcb, StateDictSource(base, models, ["w"]),
                   lambda segment, lo, hi, values: out[lo:hi].copy_(values),
                   options=RunOptions(fused=fused, memory_budget=budget), block_width=7000)
        merged.append(out)
    assert calls and torch.equal(merged[0], merged[1])


def test_without_the_c_library_files_merge_eagerly(monkeypatch, tmp_path):
    """Where the C library does not build, PCB from bf16 files takes the eager engine (no C sweep, no
    raw slices) and writes the bytes of the C path, under the default budget and over it (both tiers)."""
    from safetensors.torch import load_file, save_file

    g = torch.Generator().manual_seed(16)
    base = {"w": (torch.randn(400, 150, generator=g) * 0.02).to(torch.bfloat16)}
    paths = [tmp_path / "base.safetensors"]
    save_file(base, str(paths[0]))
    for i in range(3):
        paths.append(tmp_path / f"m{i}.safetensors")
        save_file({"w": (base["w"].float() + 1e-3 * torch.randn(400, 150, generator=g)).to(torch.bfloat16)},
                  str(paths[-1]))
    outs = {}
    for budget in (None, "420KB", "300KB"):  # collected; positions and scores only; bracket
        pcb_fast.merge_checkpoints(paths[0], paths[1:], tmp_path / f"c-{budget}", method="pcb", max_memory=budget,
                                   block_width=8192)
        outs[("c", budget)] = load_file(str(tmp_path / f"c-{budget}" / "model.safetensors"))["w"]
    monkeypatch.setattr(native, "_library", lambda: "no C compiler found ($CC, cc, gcc, clang)")
    monkeypatch.setattr(native, "pcb_candidates", None)  # must not be reached
    for budget in (None, "420KB", "300KB"):  # collected; positions and scores only; bracket
        pcb_fast.merge_checkpoints(paths[0], paths[1:], tmp_path / f"e-{budget}", method="pcb", max_memory=budget,
                                   block_width=8192)
        eager = load_file(str(tmp_path / f"e-{budget}" / "model.safetensors"))["w"]
        assert torch.equal(eager, outs[("c", budget)]), budget


def test_c_sweeps_take_wider_blocks_at_the_default_width(monkeypatch):
    """At the default block width the C sweeps read blocks of about C_SWEEP_ENTRIES entries (fewer,
    wider blocks for few tasks: here one block of a 300,000-entry row instead of three); a width the
    caller chose is kept. The merge equals the eager engine's at its own width, bit for bit."""
    from pcb_fast.core.sources import DEFAULT_BLOCK_WIDTH

    assert pcb.c_sweep_width(4, DEFAULT_BLOCK_WIDTH) == pcb.C_SWEEP_ENTRIES // 4
    assert pcb.c_sweep_width(64, DEFAULT_BLOCK_WIDTH) == DEFAULT_BLOCK_WIDTH
    assert pcb.c_sweep_width(4, 10_000) == 10_000
    widths = []
    candidates = native.pcb_candidates
    monkeypatch.setattr(native, "pcb_candidates", lambda tv, *a, **k: widths.append(tv[0].numel()) or candidates(
        tv, *a, **k))
    g = torch.Generator().manual_seed(5)
    base = torch.randn(300_000, generator=g).to(torch.bfloat16)
    models = [(base.float() + torch.randn(300_000, generator=g) * 1e-2).to(torch.bfloat16) for _ in range(2)]
    source = StateDictSource({"w": base}, [{"w": m} for m in models], ["w"])
    out = {}
    for fused in (True, False):
        merged = torch.empty(300_000)

        def sink(segment, lo, hi, values):
            merged[lo:hi] = values

        engine.run(merge_pcb, source, sink, options=RunOptions(fused=fused), block_width=DEFAULT_BLOCK_WIDTH)
        out[fused] = merged
    assert widths == [300_000]  # the collection: one block (the clip pass reads the same blocks)
    assert torch.equal(out[True].view(torch.int32), out[False].view(torch.int32))
