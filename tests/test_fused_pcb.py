"""The fused PCB path (pcb_fast.cpu.fused: PCB_BRACKET, PCB_BLOCK, magnitude_runs) against the
reference and the eager engine.

Tolerance (docs/design.md 9, the triton backend's contract): the compiled loops compute exp with
inductor's vectorised exp (Sleef, within 1 ulp) and tanh with their own (within 1.5 ulp), where
eager torch calls MKL's; every other float32 operation is the eager path's, in the same order. So
the scores P agree to a few ulps, merged values lie within 2e-5 of max|tau_m| of the reference, and
the keep masks agree except for entries whose score lies within a few ulps of the threshold. Two
fused runs, and runs on 1 or 2 threads, are identical. The paper variant has no fused mode: with
fused="on" it is the eager path, bit for bit.
"""

import pytest
import torch

import pcb_fast
import pcb_fast.reference.pcb as reference
from pcb_fast.core import engine
from pcb_fast.core.engine import ColumnSample
from pcb_fast.core.formulas import EXACT_EXP_MAX_N, keep_index
from pcb_fast.core.options import RunOptions
from pcb_fast.core.sources import MatrixSource
from pcb_fast.cpu import fused as fused_cpu
from pcb_fast.cpu import pcb_blocks as tb
from pcb_fast.methods import pcb
from pcb_fast.methods.pcb import merge_pcb

from pcb_test_helpers import run_method, write_fine_tunes

RTOL = 2e-5  # merged values: |fused - reference| <= RTOL * max|reference|
SCORE_ULPS = 6  # fused scores against eager ones (exp: 1.5 ulp apart, tanh: 2, their product)
MASK_ULPS = 16  # keep-mask disagreements only where |P - t| is within this many ulps of t


@pytest.fixture(autouse=True)
def compiled_loops(monkeypatch):
    """These are the compiled loops' tests: PCB's C sweeps (which fused="auto" and "on" take where the
    C library builds, bit-exact: tests/test_pcb_c.py) are turned off here."""
    has_c_loops = fused_cpu.has_c_loops
    monkeypatch.setattr(fused_cpu, "has_c_loops", lambda method, params: method != "pcb" and has_c_loops(method, params))


def run(tv, fused, block_width=4096, budget=None, **params):
    out, kept = run_method(merge_pcb, tv, fused, block_width=block_width, budget=budget, **params)
    return out, torch.tensor(kept)


def ulp(x: torch.Tensor) -> torch.Tensor:
    x = x.abs().float()
    return torch.nextafter(x, torch.tensor(float("inf"))) - x


def scores(tv, inter, clamp_ratio):
    """(eager P, fused P, the magnitude each P's rounding error scales with) of a whole [n, D] matrix
    with the exact clip bounds. The magnitude is |P|, except for the pairwise inter term, a sum of
    n signed tanh terms that may cancel: intra * sum_j |tanh(N-hat_i N-hat_j)|."""
    n, D = tv.shape
    clip = pcb.clip_bounds(MatrixSource(tv), RunOptions(), clamp_ratio, D, ColumnSample(D, n))
    eager = tb.official_scores(tv, clip, inter, tb.Workspace(n, D, 4)).clone()
    shift = torch.tensor(float(n) if n > EXACT_EXP_MAX_N else 0.0)
    infinite = torch.full((n, 1), float("inf"))
    fused = fused_cpu.PCB_BRACKET[inter](tv, clip.lo, clip.hi, clip.span, shift, -infinite, infinite)[5]
    magnitude = eager.abs()
    if inter == "pairwise":
        normalized = (torch.clamp(tv.abs(), clip.lo, clip.hi) - clip.lo) / clip.span
        signed = torch.sign(tv) * normalized
        terms = sum(torch.tanh(signed * signed[j]).abs() for j in range(n))
        magnitude = torch.exp(normalized * normalized * n - shift) * terms
    return eager, fused, magnitude


def check_official(tv, ratio=0.1, clamp_ratio=1e-4, inter="sum", lambdas=None, block_width=4096):
    """Fused against the reference and the eager engine; returns the number of mask disagreements."""
    params = dict(ratio=ratio, clamp_ratio=clamp_ratio, inter=inter, lambdas=lambdas)
    fused, kept_fused = run(tv, True, block_width, **params)
    eager, kept_eager = run(tv, False, block_width, **params)
    ref = reference.pcb_official(tv, **params)
    assert torch.equal(eager, ref)  # the eager engine stays bit-exact
    n, D = tv.shape
    p_eager, p_fused, magnitude = scores(tv, inter, clamp_ratio)
    assert bool(((p_fused - p_eager).abs() <= SCORE_ULPS * ulp(magnitude)).all()), "fused scores beyond a few ulps"
    k = keep_index(D, ratio)
    t_eager = p_eager.kthvalue(k + 1, dim=1, keepdim=True).values
    t_fused = p_fused.kthvalue(k + 1, dim=1, keepdim=True).values
    keep_eager, keep_fused = p_eager > t_eager, p_fused > t_fused
    assert torch.equal(kept_eager, keep_eager.sum(1)) and torch.equal(kept_fused, keep_fused.sum(1))
    differ = keep_eager != keep_fused
    near = (p_eager - t_eager).abs() <= MASK_ULPS * torch.maximum(ulp(t_eager), ulp(magnitude))
    assert bool((near | ~differ).all()), "a keep-mask disagreement away from the threshold"
    disagreements = int(differ.sum())
    scale = float(ref.abs().max()) or 1.0
    far = (fused - ref).abs() > RTOL * scale
    print(f"n={n} D={D} {params}: max |fused - ref| / max|ref| = {float((fused - ref).abs().max()) / scale:.2e}, "
          f"mask disagreements {disagreements}, values beyond tolerance {int(far.sum())}")
    # an entry kept on one side only may differ by more, and only there
    assert int(far.sum()) <= disagreements
    if far.any():
        assert bool(differ[:, far].any(0).all())
    return fused


@pytest.mark.parametrize("inter", ["sum", "normalized_sum", "pairwise"])
@pytest.mark.parametrize("kind", ["normal", "quantized"])
def test_official_within_tolerance(inter, kind):
    g = torch.Generator().manual_seed(0)
    tv = torch.randn(3, 100_003, generator=g) * 1e-3
    if kind == "quantized":  # heavy ties at every threshold, zeros and -0.0
        tv = torch.round(tv * 4e3) / 4e3
        tv[1, ::5] = -0.0
    check_official(tv, inter=inter)
    check_official(tv, inter=inter, ratio=0.05, clamp_ratio=0.01, lambdas=[0.5, -1.0, 2.0])


@pytest.mark.parametrize("inter", ["sum", "normalized_sum", "pairwise"])
def test_official_edge_cases(inter):
    g = torch.Generator().manual_seed(1)
    tv = torch.randn(4, 20_000, generator=g)
    tv[1] = 0.0  # an all-zero task vector: P = 0, contributes nothing
    tv[2] = 0.25  # a constant row: N = 0
    for params in (dict(), dict(ratio=1.0), dict(clamp_ratio=0.0), dict(clamp_ratio=0.3)):
        check_official(tv, inter=inter, **params)
    check_official(tv[:, :1000], inter=inter, block_width=4096)  # D < block
    check_official(tv[:, :2], inter=inter)  # D = 2
    zero = torch.zeros(3, 5000)
    assert torch.equal(run(zero, True, inter=inter)[0], torch.zeros(5000))


def test_one_task_and_many_tasks():
    g = torch.Generator().manual_seed(2)
    check_official(torch.randn(1, 30_000, generator=g))
    check_official(torch.randn(100, 3000, generator=g), inter="sum")  # n > 80: exp(n N^2 - n)


def test_run_to_run_and_threads_identical():
    g = torch.Generator().manual_seed(3)
    base = {"w": torch.randn(300, 500, generator=g), "b": torch.randn(500, generator=g)}
    models = [{k: v + torch.randn(v.shape, generator=g) * 0.01 for k, v in base.items()} for _ in range(4)]
    # each thread count is a compile variant of the loops (a cold compile costs ~15 s here): one
    # thread is compared on the sum term, run to run on both
    runs = [pcb_fast.merge(base, models, method="pcb", fused="on", threads=threads, inter=inter)
            for inter, counts in (("sum", (1, 2, 2)), ("pairwise", (2, 2))) for threads in counts]
    for first, *others in (runs[:3], runs[3:]):
        assert all(torch.equal(first[k], other[k]) for other in others for k in base)


@pytest.mark.parametrize("scope", ["global", "tensor"])
def test_state_dicts_bf16_scope(scope):
    g = torch.Generator().manual_seed(4)
    base = {"a": torch.randn(70, 300, generator=g).bfloat16(), "b": torch.randn(5000, generator=g),
            "c": torch.randn(40, generator=g)}
    models = [{k: (v.float() + torch.randn(v.shape, generator=g) * 0.01).to(v.dtype) for k, v in base.items()}
              for _ in range(3)]
    params = dict(method="pcb", scope=scope, lambdas=[1.0, 0.5, 2.0], clamp_ratio=0.01)
    fused_report, eager_report = {}, {}
    fused = pcb_fast.merge(base, models, fused="on", report=fused_report, **params)
    eager = pcb_fast.merge(base, models, fused="off", report=eager_report, **params)
    ref = pcb_fast.merge(base, models, backend="reference", **params)
    for key in base:
        assert torch.equal(eager[key], ref[key]), key
        assert fused[key].dtype == ref[key].dtype
        diff = (fused[key].float() - ref[key].float()).abs()
        # theta = theta_pre + tau_m rounded to the output dtype: tau_m's tolerance plus a rounding step
        bound = RTOL * float(ref[key].float().abs().max()) + ulp(ref[key].float()) * (2 if key == "a" else 0) * 2**16
        assert bool((diff <= bound).all()) or int((diff > bound).sum()) <= 2, key
    kept_gap = (torch.tensor(fused_report["kept"]) - torch.tensor(eager_report["kept"])).abs()
    assert int(kept_gap.max()) <= 2 * (1 if scope == "global" else len(base))


def test_memory_budget_and_files(tmp_path):
    from safetensors.torch import load_file

    g = torch.Generator().manual_seed(5)
    tv = torch.randn(3, 50_000, generator=g) * 1e-2
    free, _ = run(tv, True)
    budgeted, _ = run(tv, True, budget=1024)  # nothing collected either way: the same loops
    assert torch.equal(free, budgeted)
    assert torch.equal(run(tv, False, budget=1024)[0], reference.pcb_official(tv))

    base, base_path, paths = write_fine_tunes(tmp_path, g)
    results = {}
    for fused, budget in (("off", None), ("on", None), ("on", "1KB")):  # 1KB: no cache, re-read per pass
        out = tmp_path / f"out-{fused}-{budget}"
        pcb_fast.merge_checkpoints(base_path, paths, out, method="pcb", fused=fused,
                                   max_memory=budget)
        results[(fused, budget)] = load_file(str(next(out.glob("*.safetensors"))))
    eager, fused, fused_budget = results[("off", None)], results[("on", None)], results[("on", "1KB")]
    assert all(torch.equal(fused[k], fused_budget[k]) for k in base)
    in_memory = pcb_fast.merge(base, [load_file(p) for p in paths], method="pcb", fused="on")
    assert all(torch.equal(fused[k], in_memory[k]) for k in base)
    tau = {k: eager[k] - base[k] for k in base}
    scale = max(float(v.abs().max()) for v in tau.values())
    for k in base:
        assert int(((fused[k] - eager[k]).abs() > RTOL * scale + ulp(eager[k])).sum()) <= 2, k


def test_paper_variant_stays_eager():
    g = torch.Generator().manual_seed(6)
    tv = torch.randn(3, 20_000, generator=g)
    assert torch.equal(run(tv, True, variant="paper")[0], run(tv, False, variant="paper")[0])


def test_nan_is_named():
    tv = torch.randn(3, 20_000)
    tv[1, 12_345] = float("nan")
    with pytest.raises(ValueError, match="task vector 1.*NaN or Inf"):
        run(tv, True)


def test_auto_rule_for_pcb():
    # PCB's compile pays for itself from 2^31 entries (cpu.fused.AUTO_MIN_ENTRIES_BY_METHOD); the others from 2^29
    assert fused_cpu.resolve("auto", 1 << 30, "pcb") is False
    assert fused_cpu.resolve("auto", 1 << 31, "pcb") is True  # a C++ compiler is present on the CI machine
    assert fused_cpu.resolve("auto", 1 << 30, "ties") is True
    assert fused_cpu.resolve("on", 10, "pcb") is True


def test_sample_order_statistic_equals_kthvalue():
    # the bracket guesses near either end of a row (PCB's clip ranks) take a partial top-k: same values
    g = torch.Generator().manual_seed(7)
    x = torch.randn(5, 10_000, generator=g)
    x[:, ::3] = 0.5  # ties
    for k in (1, 2, 100, 156, 157, 5000, 9844, 9845, 9999, 10_000):
        assert torch.equal(engine._order_statistic(x, k), torch.kthvalue(x, k, dim=1).values), k


def test_files_with_tensors_shorter_than_the_sample_stride(tmp_path):
    """From files the column sample is taken block by block: a tensor shorter than the sample's stride
    (a norm vector) may contribute no column at all, which the fused PCB's sample scoring must take
    (it raised 'torch.cat(): expected a non-empty list' on a 1B-parameter model)."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(8)
    base = {"a.weight": torch.randn(300, 70, generator=g), "n1.weight": torch.ones(5), "n2.weight": torch.ones(3),
            "z.weight": torch.randn(64, 40, generator=g)}
    paths = []
    for i in range(4):
        state = base if i == 0 else {k: v + 1e-2 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        paths.append(tmp_path / f"m{i}.safetensors")
        save_file(state, str(paths[-1]))
    outs = {}
    for fused in ("off", "on"):
        outs[fused] = tmp_path / f"out-{fused}"
        pcb_fast.merge_checkpoints(paths[0], paths[1:], outs[fused], method="pcb", fused=fused, max_memory="1KB",
                                   block_width=1024)
    from safetensors.torch import load_file

    eager, fused = (load_file(str(outs[f] / "model.safetensors")) for f in ("off", "on"))
    scale = max(float((eager[k] - base[k]).abs().max()) for k in base)
    for k in base:
        assert int(((fused[k] - eager[k]).abs() > RTOL * scale + ulp(eager[k])).sum()) <= 2, k
