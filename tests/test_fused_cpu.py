"""The fused CPU loops (pcb_fast.fused_cpu: the C loops of TIES, DARE and DARE-TIES, Breadcrumbs'
torch.compile ones) against the eager engine and the reference.

Fused and eager merges must give equal values and equal kept counts: the C loops bit for bit,
the compiled ones by torch.equal (the sign of a zero may differ, since compiled code adds from +0).
Compiling takes a few seconds per function once per process, so the cases share few shapes of
arguments.
"""

import types

import pytest
import torch

import pcb_fast
import pcb_fast.reference.baselines
from pcb_fast.core import engine
from pcb_fast.cpu import fused as fused_cpu
from pcb_fast.methods.ties import merge_dare_ties, merge_ties
from pcb_fast.methods.linear import merge_dare

from pcb_test_helpers import run_method, write_fine_tunes


def run(method, tv, fused, block_width=4096, **params):
    return run_method(method, tv, fused, block_width=block_width, **params)


@pytest.fixture
def loops():
    """The loops TIES, DARE and DARE-TIES run: their C ones (they have no other fused tier)."""
    return "c"


def assert_same(method, tv, loops="compiled", **params):
    eager, kept_eager = run(method, tv, False, **params)
    fused, kept_fused = run(method, tv, True, **params)
    assert torch.equal(eager, fused), f"{(eager != fused).sum()} entries differ"
    if loops == "c" and method is not merge_ties:  # the same bits, signed zeros included
        assert_bits(fused, eager)
    assert kept_eager == kept_fused
    return fused


def assert_bits(actual, expected):
    """The same float32 bit patterns (signed zeros included). TIES' C loops give the bits of the literal
    formulation (pcb_fast.reference); the eager engine's collected path adds from +0 where nothing is
    collected, so its zeros may differ in sign from both."""
    assert torch.equal(actual.view(torch.int32), expected.view(torch.int32))


def task_vectors(n, D, kind, seed=0):
    g = torch.Generator().manual_seed(seed)
    tv = torch.randn(n, D, generator=g)
    if kind == "quantized":  # many ties at any threshold, exact cancellations between tasks
        tv = torch.round(tv * 4) / 4
    elif kind == "sparse":  # half the entries exactly zero
        tv[:, ::2] = 0
    return tv


@pytest.mark.parametrize("kind", ["normal", "quantized", "sparse"])
@pytest.mark.parametrize("params", [dict(density=0.2), dict(density=0.2, topk="exact"),
                                    dict(density=0.7, lambdas=[0.5, 1.5, 2.0]),
                                    dict(density=0.5, topk="exact", sign_ties="positive")])
def test_ties_fused_equals_eager(kind, params, loops):
    tv = task_vectors(3, 100_003, kind)
    fused = assert_same(merge_ties, tv, loops, **params)
    reference = pcb_fast.reference.baselines.ties(tv, **params)
    assert torch.equal(fused, reference)
    if loops == "c":
        assert_bits(fused, reference)


@pytest.mark.parametrize("params", [dict(density=1.0), dict(density=1e-9, topk="exact"), dict(density=1e-9)])
def test_ties_fused_keeps_all_or_nothing(params, loops):
    tv = task_vectors(2, 70_000, "normal")
    assert torch.equal(assert_same(merge_ties, tv, loops, **params), pcb_fast.reference.baselines.ties(tv, **params))


def test_ties_fused_many_tasks_sum_in_task_order(loops):
    # 32 tasks with widely different scales: any other order of the sums over tasks rounds differently
    tv = task_vectors(32, 80_000, "normal") * torch.logspace(-3, 3, 32).unsqueeze(1)
    fused, reference = assert_same(merge_ties, tv, loops, density=0.3), pcb_fast.reference.baselines.ties(tv, density=0.3)
    assert torch.equal(fused, reference)
    if loops == "c":
        assert_bits(fused, reference)


def test_ties_fused_majority_fill_negative_with_cancellations(loops):
    # Positions where +x and -x cancel are "undecided": their value depends on the whole model's
    # majority sign, known only after the sweep (here negative), so their blocks are merged again.
    D = 20_000
    tv = torch.zeros(2, D)
    tv[0] = -torch.rand(D) - 0.5
    tv[1] = -torch.rand(D) - 0.5
    tv[0, ::7], tv[1, ::7] = 1.0, -1.0
    tv[1, 3::7] = torch.rand(len(range(3, D, 7))) + 0.5  # still a majority of negative elected signs
    fused = assert_same(merge_ties, tv, loops, density=1.0, block_width=1000)
    assert torch.equal(fused, pcb_fast.reference.baselines.ties(tv, density=1.0))
    assert (fused[::7] == -1.0).all()  # filled with the negative majority: the mean of the -1 entries


@pytest.mark.parametrize("sign_ties,wrong_guess,passes", [("positive", False, 2), ("majority", False, 2),
                                                           ("majority", True, 3)])
def test_ties_fused_reads_undecided_blocks_again_only_when_the_fill_guess_was_wrong(monkeypatch, sign_ties,
                                                                                      wrong_guess, passes):
    """Quantized task vectors cancel exactly in many blocks. The fill is guessed from the column
    sample (+1 for mergekit's rule): the sweep sinks every block at once, and only a wrong guess
    costs one more pass over the blocks with undecided positions, with the same result."""
    from pcb_fast.core.sources import MatrixSource
    from pcb_fast.methods import ties

    tv = task_vectors(3, 100_003, "quantized", seed=3)
    tv[:, 1::3] -= 0.25  # a clear negative majority of elected signs
    if wrong_guess:
        monkeypatch.setattr(ties, "guess_fill", lambda *args: torch.ones(()))
    count = []
    real = MatrixSource.blocks
    monkeypatch.setattr(MatrixSource, "blocks", lambda self, *a, **k: count.append(1) or real(self, *a, **k))
    fused, _ = run(merge_ties, tv, True, density=0.3, sign_ties=sign_ties)
    assert len(count) == passes  # the sample is read in place: the bracket pass, the sweep (and the redo)
    assert torch.equal(fused, pcb_fast.reference.baselines.ties(tv, density=0.3, sign_ties=sign_ties))


@pytest.mark.parametrize("method", [merge_ties, merge_dare_ties])
def test_a_wrong_fill_guess_reads_only_the_undecided_blocks_again(monkeypatch, method):
    """Exact cancellations in blocks 3 and 11 of 20 only, a negative majority and a fill guessed +1:
    the second sweep reads those two blocks, nothing else, and the result is the eager engine's."""
    from pcb_fast.core.sources import MatrixSource
    from pcb_fast.methods import ties

    tv = -torch.rand(2, 20_000, generator=torch.Generator().manual_seed(0)) - 0.5
    for first in (3000, 11000):
        tv[0, first:first + 1000:7], tv[1, first:first + 1000:7] = 1.0, -1.0
    monkeypatch.setattr(ties, "guess_fill", lambda *args: torch.ones(()))  # (DARE-TIES guesses +1 anyway)
    reads = []
    real_blocks, real_read = MatrixSource.blocks, MatrixSource._read
    monkeypatch.setattr(MatrixSource, "blocks", lambda self, *a, **k: reads.append([]) or real_blocks(self, *a, **k))
    monkeypatch.setattr(MatrixSource, "_read", lambda self, seg, lo, hi, out: reads[-1].append((lo, hi)) or
                        real_read(self, seg, lo, hi, out))
    params = dict(density=1.0) if method is merge_ties else dict(p=0.0)
    fused, _ = run(method, tv, True, block_width=1000, **params)
    assert reads[-1] == [(3000, 4000), (11000, 12000)]
    eager, _ = run(method, tv, False, block_width=1000, **params)
    if method is merge_dare_ties:
        assert_bits(fused, eager)
    else:  # (the eager engine's zeros may differ in sign: see assert_bits)
        assert torch.equal(fused, eager)
        assert_bits(fused, pcb_fast.reference.baselines.ties(tv, density=1.0))
    assert (fused[3000:4000:7] == -1.0).all()  # filled with the negative majority


@pytest.mark.parametrize("params", [dict(p=0.9), dict(p=0.3, seed=5, lambdas=[0.5, -1.0, 2.0]), dict(p=0.0)])
def test_dare_and_dare_ties_fused_equal_eager(params, loops):
    tv = task_vectors(3, 50_001, "quantized")
    assert_same(merge_dare, tv, loops, **params)
    assert_same(merge_dare_ties, tv, loops, **params)


@pytest.mark.parametrize("params", [dict(p=[0.2, 0.5, 0.9]), dict(p=0.8, rescale="l1"), dict(p=0.6, rescale="none"),
                                    dict(p=0.5, rescale="l1", normalize=False, sign_ties="positive"),
                                    dict(p=0.7, normalize=True, lambdas=[0.5, 1.0, 2.0])])
def test_dare_options_in_the_c_loops_equal_eager(params):
    """mergekit's options (a drop rate per model, the L1 rescale, no rescale, normalize) run in the C
    loops too, with the eager engine's bits."""
    tv = task_vectors(3, 50_001, "quantized", seed=4)
    for method in (merge_dare, merge_dare_ties):
        own = {k: v for k, v in params.items() if k != "sign_ties" or method is merge_dare_ties}
        if method is merge_dare and "normalize" in own and own.get("rescale") == "l1":
            own.pop("normalize")
        assert_same(method, tv, "c", **own)


def test_dare_ties_fused_matches_reference():
    tv = task_vectors(4, 30_000, "normal")
    segments = [("task_vector", (30_000,))]
    assert torch.equal(run(merge_dare_ties, tv, True, p=0.5, seed=3)[0],
                       pcb_fast.reference.baselines.dare_ties(tv, p=0.5, seed=3, segments=segments))


def test_breadcrumbs_fused_equals_eager_with_tied_rows():
    g = torch.Generator().manual_seed(3)
    base = {"w": torch.randn(300, 257, generator=g), "b": torch.randn(257, generator=g),
            "q": torch.randn(64, 64, generator=g)}
    models = []
    for _ in range(4):
        model = {k: v + torch.randn(v.shape, generator=g) * 0.1 for k, v in base.items()}
        model["q"] = base["q"] + torch.round(torch.randn(64, 64, generator=g) * 3) / 8  # rows with tied bounds
        models.append(model)
    for params in (dict(gamma=0.01, beta=0.1), dict(gamma=0.2, beta=0.5, lambdas=[1, 2, 0.5, -1]),
                   dict(gamma=0.0, beta=1.0), dict(gamma=0.001, beta=0.001), dict(gamma=0.05, beta=0.3, scope="tensor")):
        eager_report, fused_report = {}, {}
        eager = pcb_fast.merge(base, models, method="breadcrumbs", fused="off", report=eager_report, **params)
        fused = pcb_fast.merge(base, models, method="breadcrumbs", fused="on", report=fused_report, **params)
        assert all(torch.equal(eager[k], fused[k]) for k in base), params
        assert eager_report["kept"] == fused_report["kept"], params


def test_state_dicts_scope_tensor_and_bf16():
    g = torch.Generator().manual_seed(1)
    base = {"a": torch.randn(70, 300, generator=g).bfloat16(), "b": torch.randn(5000, generator=g)}
    models = [{k: (v.float() + torch.randn(v.shape, generator=g) * 0.01).to(v.dtype) for k, v in base.items()}
              for _ in range(3)]
    for method, params in (("ties", dict(density=0.3)), ("dare_ties", dict(p=0.5)), ("dare", dict(p=0.5))):
        for scope in ("global", "tensor"):
            eager = pcb_fast.merge(base, models, method=method, scope=scope, fused="off", **params)
            fused = pcb_fast.merge(base, models, method=method, scope=scope, fused="on", **params)
            assert all(torch.equal(eager[k], fused[k]) for k in base), (method, scope)


def test_nan_is_named():
    tv = task_vectors(3, 20_000, "normal")
    tv[1, 12_345] = float("nan")
    for method, params in ((merge_ties, dict(density=0.2)), (merge_dare, dict(p=0.5)), (merge_dare_ties, dict(p=0.5))):
        with pytest.raises(ValueError, match="task vector 1.*NaN or Inf"):
            run(method, tv, True, **params)


def test_select_in_bracket_hand_checked():
    # scores of one task: 0..9 plus duplicates of 4 and 7; ascending: 0 1 2 3 4 4 4 5 6 7 7 8 9
    scores = torch.tensor([[0, 1, 2, 3, 4, 4, 4, 5, 6, 7, 7, 8, 9]], dtype=torch.float32)
    D = scores.shape[1]

    def bracket_pass(floor, ceiling):
        s = scores
        inside = [row[(row > f) & (row < c)] for row, f, c in zip(s, floor, ceiling)]
        return (s > ceiling[:, None]).sum(1), (s == ceiling[:, None]).sum(1), (s == floor[:, None]).sum(1), inside

    for rank in range(D):
        expected = scores[0].sort().values[rank]
        for sample in (None, torch.tensor([[4.0] * 5000]), torch.tensor([[7.0] * 5000]),
                       torch.linspace(0, 9, 9000).unsqueeze(0), torch.linspace(4, 5, 9000).unsqueeze(0)):
            t, greater, at_least = engine.select_in_bracket(1, D, rank, sample, bracket_pass)
            assert t[0] == expected, (rank, sample)
            assert greater[0] == (scores > expected).sum() and at_least[0] == (scores >= expected).sum()


def test_modes():
    assert fused_cpu.resolve("off", 1 << 40) is False
    assert fused_cpu.resolve("auto", fused_cpu.AUTO_MIN_ENTRIES - 1) is False
    assert fused_cpu.resolve("on", 10) is True  # a C++ compiler is present on the CI machine
    with pytest.raises(ValueError, match="fused='yes' is not valid; choose one of 'auto', 'on', 'off'"):
        pcb_fast.merge({"w": torch.zeros(3)}, [{"w": torch.ones(3)}], fused="yes")


def test_unavailable_compiler(monkeypatch):
    monkeypatch.setattr(fused_cpu, "_probe", lambda: "CalledProcessError: g++ not found")
    with pytest.raises(fused_cpu.FusedUnavailable, match="fused='on' but torch.compile cannot build CPU code here"):
        fused_cpu.resolve("on", 10)
    with pytest.warns(UserWarning, match="fused CPU loops unavailable"):
        assert fused_cpu.resolve("auto", 1 << 40) is False


def test_without_the_c_loops_ties_and_dare_take_the_eager_engine(monkeypatch):
    """TIES, DARE and DARE-TIES have no compiled tier: where their C loops do not build, "auto" warns and
    runs the eager engine (never torch.compile, which would need a compiler too), "on" raises."""
    def probe():
        raise AssertionError("probed")

    monkeypatch.setattr(fused_cpu, "_probe", probe)
    monkeypatch.setattr(fused_cpu, "native", types.SimpleNamespace(problem=lambda: "cc: not found"))
    for method in ("ties", "dare", "dare_ties"):
        assert not fused_cpu.has_loops(method, {})
        assert fused_cpu.resolve("off", 1 << 40, method) is False
        with pytest.warns(UserWarning, match=r"unavailable \(its C loops do not build here \(cc: not found\)\)"):
            assert fused_cpu.resolve("auto", 1 << 40, method) is False
        with pytest.raises(fused_cpu.FusedUnavailable, match="fused='on' but its C loops do not build here"):
            fused_cpu.resolve("on", 10, method)
    base = {"w": torch.zeros(1000)}
    tuned = [{"w": row} for row in task_vectors(3, 1000, "normal")]
    with pytest.warns(UserWarning, match="fused CPU loops unavailable"):
        auto = pcb_fast.merge(base, tuned, method="ties", density=0.3, fused="auto")
    assert torch.equal(auto["w"], pcb_fast.merge(base, tuned, method="ties", density=0.3, fused="off")["w"])


def test_methods_without_compiled_loops_never_probe(monkeypatch):
    """task arithmetic has no fused loops: a large merge must not pay the compiler probe (seconds)."""
    def probe():
        raise AssertionError("probed")

    monkeypatch.setattr(fused_cpu, "_probe", probe)
    for method in ("task_arithmetic", "average", "linear"):
        assert fused_cpu.resolve("auto", 1 << 40, method) is False
        assert fused_cpu.resolve("on", 1 << 40, method) is False
    # options the loops do not cover take the eager path: no probe either
    for method, params in [("breadcrumbs", {"band": "tensor"}), ("pcb", {"variant": "paper"})]:
        assert fused_cpu.resolve("auto", 1 << 40, method, params) is False, (method, params)
    # the C loops of TIES, DARE and DARE-TIES take every option, at any size, with nothing to compile
    for method, params in [("dare_ties", {"rescale": "l1"}), ("dare", {"p": [0.5, 0.6]}), ("dare", {"normalize": True}),
                           ("ties", {}), ("dare", {})]:
        for entries in (10, 1 << 40):
            assert fused_cpu.resolve("auto", entries, method, params) is True, (method, params)


def test_disk_merge_fused_equals_eager(tmp_path):
    from safetensors.torch import load_file

    g = torch.Generator().manual_seed(2)
    base, base_path, paths = write_fine_tunes(tmp_path, g)
    for method, params in (("ties", dict(density=0.3)), ("breadcrumbs", dict(gamma=0.02, beta=0.2))):
        results = {}
        for fused, budget in (("off", None), ("on", None), ("on", "1KB")):  # 1KB: no cache, the sample takes a pass
            out = tmp_path / f"out-{method}-{fused}-{budget}"
            pcb_fast.merge_checkpoints(base_path, paths, out, method=method, fused=fused,
                                       max_memory=budget, **params)
            results[(fused, budget)] = load_file(str(next(out.glob("*.safetensors"))))
        first = results[("off", None)]
        for other in results.values():
            assert all(torch.equal(first[k], other[k]) for k in first), method


def test_only_compiled_loops_keep_the_thread_count(monkeypatch):
    """Compiled loops are specialised to the thread count, so a merge running them keeps the one chosen
    at its start; the C loops are not, so threads="auto" keeps following the machine."""
    entries = 2 << 15
    assert fused_cpu.settings("on", entries, "ties", {}) == {"fused": True, "fixed_threads": False}
    assert fused_cpu.settings("on", entries, "breadcrumbs", {}) == {"fused": True, "fixed_threads": True}
    assert fused_cpu.settings("on", entries, "ties", {}, allowed=False) == {"fused": False, "fixed_threads": False}
    monkeypatch.setattr(fused_cpu, "native", types.SimpleNamespace(problem=lambda: "off for this test"))
    assert fused_cpu.settings("off", entries, "ties", {}) == {"fused": False, "fixed_threads": False}


@pytest.mark.parametrize("dtypes", [(torch.bfloat16,) * 4,
                                    (torch.float16, torch.float32, torch.bfloat16, torch.float16)])
def test_c_loops_form_tau_from_the_stored_slices_with_the_blocks_bits(dtypes):
    """The TIES, DARE-TIES and bracket loops given the stored slices [base, model_0, ...] (any mix of
    float32, bfloat16, float16) form tau themselves: the same outputs as given the float32 block."""
    from pcb_fast.cpu import native

    g = torch.Generator().manual_seed(5)
    base = torch.randn(10_007, generator=g)
    raw = [base.to(dtypes[0])] + [(base + torch.randn(10_007, generator=g) * 0.01).to(d) for d in dtypes[1:]]
    tv = torch.stack([model.float() - raw[0].float() for model in raw[1:]])
    t, cut, lam = torch.full((3,), 0.005), torch.tensor([1 << 62, 3000, 0]), torch.tensor([[0.5], [1.0], [2.0]])
    for fill in (1.0, -1.0):
        for a, b in zip(*(native.ties_block(x, t, cut, lam, fill, True) for x in (raw, tv))):
            assert_bits(a.float(), b.float())
    drop = ([11, 22, 33], [44, 55, 66], [1 << 22] * 3, 500, [0.5, 0.5, 0.5], False)
    for a, b in zip(*(native.dare_ties_block(x, drop, lam, -1.0, False) for x in (raw, tv))):
        assert_bits(a.float(), b.float())
    floor, ceiling = torch.full((3,), 0.004), torch.full((3,), 0.006)
    (max_raw, counts_raw, inside_raw), (max_tv, counts_tv, inside_tv) = (native.bracket(x, floor, ceiling)
                                                                         for x in (raw, tv))
    assert torch.equal(max_raw, max_tv) and torch.equal(counts_raw, counts_tv)
    assert all(torch.equal(x, y) and x.numel() for x, y in zip(inside_raw, inside_tv))
