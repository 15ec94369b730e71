"""The triton backend under TRITON_INTERPRET=1: each kernel against its torch counterpart, the whole
backend against the reference path.

Tolerance (docs/design.md 9), per entry: the kernels sum over tasks in task order but use the
device's exp and tanh and fused multiply-adds, so PCB's scores differ from the reference's by a few
float32 ulps. A merged entry may then differ from the reference by more than 2e-5 of max|tau_m|, or
be kept on one side only, only where some task's reference score lies within SCORE_RTOL (relative)
of that task's threshold t_i; there is no cap on how many such entries there are. Everywhere else
values agree within 2e-5 of max|tau_m| and keep masks agree exactly. The baselines have exact
thresholds (|tau| order statistics, DARE's hash, TIES' election in task order), so no entry may
disagree at all.
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

import triton.language as tl  # noqa: E402

from pcb_fast import merge, pcb_merge, pcb_reference  # noqa: E402
from pcb_fast.cpu import pcb_blocks as tb  # noqa: E402
from pcb_fast.kernels import score as kscore  # noqa: E402
from pcb_fast.kernels.select import DeviceBracket, DeviceSelect  # noqa: E402
from pcb_fast.kernels.tiles import Rows, tanh  # noqa: E402
from pcb_fast.core.select import RadixSelect  # noqa: E402
from benchmarks.gpu_check import disagreements, official_near, paper_near  # noqa: E402



def compare(got: torch.Tensor, ref: torch.Tensor, label: str, near: torch.Tensor | None = None) -> int:
    """Assert the per-entry tolerance rule (module docstring; benchmarks/gpu_check.py holds it, so the
    GPU check applies the same); ``near`` [D] marks the entries whose keep decision may go either way
    (None: none may). Returns the entries that differ, all of them near a threshold."""
    result = disagreements(got, ref, near)
    print(f"{label}: max |diff| / max|ref| = {result['max_rel_diff']:.2e}, entries differing {result['differing']}, "
          f"near a threshold {result['near']}, differing elsewhere {result['unexplained']}")
    assert result["unexplained"] == 0, f"{label}: entries {result['first_unexplained']} differ"
    return result["differing"]


# ---- kernels against their torch counterparts


@triton.jit
def _tanh_kernel(x_ptr, out_ptr, m, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, tanh(tl.load(x_ptr + offs, mask=offs < m)), mask=offs < m)


def test_tanh_matches_torch_to_a_few_ulp():
    x = torch.cat([torch.logspace(-30, 2, 2000), -torch.logspace(-30, 2, 2000), torch.zeros(1),
                   torch.tensor([0.2499999, 0.25, 0.2500001, 9.0, 50.0, 1e30])])
    out = torch.empty_like(x)
    _tanh_kernel[(triton.cdiv(x.numel(), 1024),)](x, out, x.numel(), BLOCK=1024)
    expected = torch.tanh(x.double())
    rel = ((out.double() - expected).abs() / expected.abs().clamp_min(1e-300)).max()
    assert float(rel) < 4e-7  # about 3 ulp
    assert bool((out == torch.tanh(x)).float().mean() > 0.5)


@pytest.mark.parametrize("n,m,parts", [(1, 1, 1), (3, 1000, 1), (4, 2049, 3), (2, 4097, 2)])
def test_device_select_equals_sort_and_torch_radix(gen, n, m, parts):
    x = torch.randn(n, m, generator=gen)
    x[:, ::7] = 0.5  # ties, including at the selected ranks
    x[:, 1::11] = -0.0
    ranks = torch.tensor([[0, m // 3, m // 2, m - 1]] * n)
    select = DeviceSelect(ranks, m, "cpu")
    torch_select = RadixSelect(n, ranks, m)
    # the rows streamed as several launches (as the keys of a model), ragged against BLOCK
    cuts = [m * p // parts for p in range(parts + 1)]
    pieces = [Rows.from_tensors(list(x[:, a:b].contiguous())) for a, b in zip(cuts, cuts[1:]) if b > a]
    bad = torch.zeros(n, dtype=torch.int32)
    for level in range(1, select.LEVELS + 1):  # a byte of the keys per pass
        for rows in pieces:
            kscore.magnitude_pass(rows, select, bad)
        if level < select.LEVELS:
            select.next_level()
    magnitude = x.abs()
    torch_select.count_high(magnitude)
    torch_select.find_buckets()
    torch_select.count_low(magnitude)
    got = select.values()
    expected = torch.sort(magnitude, dim=1).values.gather(1, ranks)
    assert torch.equal(got, expected)
    assert torch.equal(got, torch_select.values())
    above = (magnitude.unsqueeze(1) > expected.unsqueeze(2)).sum(2)
    at_or_above = (magnitude.unsqueeze(1) >= expected.unsqueeze(2)).sum(2)
    assert torch.equal(select.count_above(inclusive=False), above)
    assert torch.equal(select.count_above(inclusive=True), at_or_above)
    assert not bool(bad.any())


@pytest.mark.parametrize("n,m,parts,stride", [(1, 1, 1, 1), (3, 1000, 1, 1), (2, 4097, 3, 1), (2, 5000, 2, 5)])
def test_device_bracket_equals_sort(gen, n, m, parts, stride):
    """One counting pass around brackets from a column sample (the whole row, or every 5th column)
    gives sort(x)[rank] and the counts above it exactly, ties and -0.0 included."""
    x = torch.randn(n, m, generator=gen)
    x[:, ::7] = 0.5
    x[:, 1::11] = -0.0
    ranks = [0, m // 3, m // 2, m - 1]
    magnitude = x.abs()
    bracket = DeviceBracket(ranks, m, magnitude[:, ::stride])
    cuts = [m * p // parts for p in range(parts + 1)]
    bad = torch.zeros(n, dtype=torch.int32)
    for a, b in zip(cuts, cuts[1:]):
        if b > a:
            kscore.magnitude_pass(Rows.from_tensors(list(x[:, a:b].contiguous())), bracket, bad)
    assert bracket.resolve()
    index = torch.tensor([ranks] * n)
    expected = torch.sort(magnitude, dim=1).values.gather(1, index)
    assert torch.equal(bracket.values(), expected)
    above = (magnitude.unsqueeze(1) > expected.unsqueeze(2)).sum(2)
    at_or_above = (magnitude.unsqueeze(1) >= expected.unsqueeze(2)).sum(2)
    assert torch.equal(bracket.count_above(inclusive=False), above)
    assert torch.equal(bracket.count_above(inclusive=True), at_or_above)


@pytest.mark.parametrize("stride", [1, 5])
def test_device_bracket_counts_ties_at_its_bounds(gen, stride):
    """Quantized values (heavy ties) put the bracket's bounds on tied values: the entries at a bound are
    counted, not copied (the buffer stays small), and the statistics, the counts above them and the
    ties per tile (TIES' exact top-k) are still exact."""
    from pcb_fast.kernels.tiles import BLOCK

    n, m = 2, 3 * BLOCK + 100
    x = torch.randint(-3, 4, (n, m), generator=gen).float() * 0.5
    x[1, ::3] = 0.0  # many exact zeros in one task (a frozen layer)
    magnitude = x.abs()
    ranks = [m // 4, m // 2, m - 10]
    tiles = -(-m // BLOCK)
    bracket = DeviceBracket(ranks, m, magnitude[:, ::stride], tiles=tiles)
    kscore.magnitude_pass(Rows.from_matrix(x), bracket, torch.zeros(n, dtype=torch.int32))
    assert bracket.resolve()
    assert int(bracket.tally[..., 2].sum()) > m // 2  # ties at the bounds were counted
    assert int(bracket.tally[..., 1].max()) < m // 4  # and few values copied
    index = torch.tensor([ranks] * n)
    expected = torch.sort(magnitude, dim=1).values.gather(1, index)
    assert torch.equal(bracket.values(), expected)
    assert torch.equal(bracket.count_above(inclusive=False), (magnitude.unsqueeze(1) > expected.unsqueeze(2)).sum(2))
    assert torch.equal(bracket.count_above(inclusive=True), (magnitude.unsqueeze(1) >= expected.unsqueeze(2)).sum(2))
    padded = torch.nn.functional.pad(magnitude == expected[:, :1], (0, tiles * BLOCK - m))
    assert torch.equal(bracket.equal_per_tile(tiles), padded.view(n, tiles, BLOCK).sum(2).T)


@pytest.mark.parametrize("chunk, slack", [(64, 4096), (1 << 13, 4096), (1 << 13, 16)])
def test_device_bracket_resolves_chunk_by_chunk(gen, monkeypatch, chunk, slack):
    """The copies are resolved CHUNK at a time (a large room in pieces, or several rooms per chunk) by a
    radix select over their keys; rooms sized by the expected copies (a small slack) still hold them.
    The statistics, the counts above them and the ties per tile are those of a sort."""
    from pcb_fast.kernels import select as ks
    from pcb_fast.kernels.tiles import BLOCK

    monkeypatch.setattr(ks, "CHUNK", chunk)
    monkeypatch.setattr(ks, "ROOM_SLACK", slack)
    n, m = 3, 4 * BLOCK + 77
    x = torch.randn(n, m, generator=gen)
    x[:, ::5] = 0.25  # ties at and between the bounds
    x[2, 1::3] = -0.0
    magnitude = x.abs()
    ranks = [m // 5, m // 2, m - 3]
    tiles = -(-m // BLOCK)
    bracket = DeviceBracket(ranks, m, magnitude, tiles=tiles)  # the whole row as the sample
    assert (bracket.copies < n * len(ranks) * m) == (slack < 4096)  # rooms below the row: sized by the bracket
    kscore.magnitude_pass(Rows.from_matrix(x), bracket, torch.zeros(n, dtype=torch.int32))
    assert bracket.resolve()
    expected = torch.sort(magnitude, dim=1).values.gather(1, torch.tensor([ranks] * n))
    assert torch.equal(bracket.values(), expected)
    assert torch.equal(bracket.count_above(inclusive=False), (magnitude.unsqueeze(1) > expected.unsqueeze(2)).sum(2))
    assert torch.equal(bracket.count_above(inclusive=True), (magnitude.unsqueeze(1) >= expected.unsqueeze(2)).sum(2))
    padded = torch.nn.functional.pad(magnitude == expected[:, :1], (0, tiles * BLOCK - m))
    assert torch.equal(bracket.equal_per_tile(tiles), padded.view(n, tiles, BLOCK).sum(2).T)


def test_bracket_rooms_follow_this_ranks_entries():
    """A distributed merge sizes each slot's room by the rank's own entries, not the whole model's."""
    from pcb_fast.kernels.select import bracket_plan

    whole = bracket_plan([[90_000_000]], [100_000_000], [1 << 18], 8)
    mine = bracket_plan([[90_000_000]], [100_000_000], [1 << 18], 8, local=[12_500_000])
    assert mine["caps"][0] < whole["caps"][0] / 6 and mine["bytes"] < whole["bytes"]
    assert whole["caps"][0] < 100_000_000 // 50  # about 1.25 x 0.7% of the entries, not the whole row


def test_device_bracket_reports_a_miss():
    x = torch.rand(2, 3000)
    sample = torch.full((2, 300), 5.0)  # a sample that says nothing true: every value lies below its bracket
    bracket = DeviceBracket([1500], 3000, sample)
    kscore.magnitude_pass(Rows.from_matrix(x), bracket, torch.zeros(2, dtype=torch.int32))
    assert not bracket.resolve()


def test_backend_falls_back_to_the_radix_select_where_a_bracket_misses(gen):
    """D > 2^16: the sample takes one column in 17. Columns 0, 17, 34, ... ten times larger than the rest
    mislead every bracket, so the passes counted around them miss and the radix select runs (seen in the
    profile); the results still obey the tolerance contract. Quantized values (heavy ties, counted at
    the bracket's bounds) give TIES the torch backend's results exactly."""
    from pcb_fast.gpu import backend as triton_backend

    n, D = 2, 65536 + 4096
    tv = torch.randn(n, D, generator=gen) * 0.01
    tv[:, ::17] *= 10
    out, profile = torch.empty(D), {}
    triton_backend.pcb_merge_matrix(list(tv), out, ratio=0.1, clamp_ratio=0.01, profile=profile)
    assert "magnitude radix level 4" in profile and "score radix level 4" in profile, sorted(profile)
    compare(out, pcb_reference(tv, ratio=0.1, clamp_ratio=0.01), "misled brackets", official_near(tv, 0.1, 0.01, "sum"))
    quantized = {"w": torch.zeros(D)}, [{"w": torch.randint(-2, 3, (D,), generator=gen).float() * 0.25} for _ in range(n)]
    for topk in ("threshold", "exact"):
        got = merge(*quantized, method="ties", density=0.3, topk=topk, backend="triton")["w"]
        assert torch.equal(got, merge(*quantized, method="ties", density=0.3, topk=topk, backend="torch")["w"]), topk


def test_pair_minmax_reduces_several_tiles_per_program(gen):
    """The paper variant's pair min/max: each program folds PAIR_TILES tiles before its atomics (the last
    program's extra places repeat the last tile); the keys equal those of torch's min/max of every
    product, and a NaN in a tile that is not a program's first is flagged."""
    from pcb_fast.kernels.select import INT32_MAX, INT32_MIN
    from pcb_fast.kernels.tiles import BLOCK
    from pcb_fast.core.select import order_keys

    n, D = 3, (kscore.PAIR_TILES + 1) * BLOCK + 300  # two programs of full tiles (one partly repeated), a last tile
    x = torch.randn(n, D, generator=gen)
    lo = torch.full((1, n, n), INT32_MAX, dtype=torch.int32)
    hi = torch.full((1, n, n), INT32_MIN, dtype=torch.int32)
    bad = torch.zeros(1, n, dtype=torch.int32)
    kscore.pair_minmax_pass(Rows.from_matrix(x), lo, hi, bad)
    products = x.unsqueeze(0) * x.unsqueeze(1)  # [n, n, D]
    assert torch.equal(lo[0], order_keys(products.amin(2))) and torch.equal(hi[0], order_keys(products.amax(2)))
    assert not bool(bad.any())
    x[2, 5 * BLOCK + 7] = float("nan")
    kscore.pair_minmax_pass(Rows.from_matrix(x), lo, hi, bad)
    assert bad[0].tolist() == [0, 0, 1]


def test_magnitude_kernel_flags_nan_and_inf_per_task():
    x = torch.randn(3, 300)
    x[1, 299] = float("nan")
    x[2, 5] = float("-inf")
    bad = torch.zeros(3, dtype=torch.int32)
    kscore.magnitude_pass(Rows.from_matrix(x), DeviceSelect([[0]] * 3, 300, "cpu"), bad)
    assert bad.tolist() == [0, 1, 1]


@pytest.mark.parametrize("inter", ["sum", "normalized_sum", "pairwise"])
def test_official_score_kernel_matches_torch_scores(gen, inter):
    n, m = 3, 1500
    tv = torch.randn(n, m, generator=gen) * 0.02
    clip = tb.ClipStats.from_bounds(tv.abs().quantile(0.01, dim=1), tv.abs().quantile(0.99, dim=1))
    expected = tb.official_scores(tv, clip, inter, tb.Workspace(n, m, 4)).clone()
    ranks = torch.tensor([[0, 300, 750, 1200, m - 1]] * n)
    select = DeviceSelect(ranks, m, "cpu")
    peak = torch.full((n,), -(1 << 31), dtype=torch.int32)
    stats = (clip.lo.view(-1).contiguous(), clip.hi.view(-1).contiguous(), clip.span.view(-1).contiguous())
    rows = Rows.from_matrix(tv)
    for level in range(1, select.LEVELS + 1):
        kscore.official_pass(rows, select, peak, stats, inter)
        if level < select.LEVELS:
            select.next_level()
    want = torch.sort(expected, dim=1).values.gather(1, ranks)
    torch.testing.assert_close(select.values(), want, rtol=1e-5, atol=1e-7)
    from pcb_fast.kernels.select import keys_to_float

    torch.testing.assert_close(keys_to_float(peak), expected.amax(1), rtol=1e-5, atol=0)


def test_rows_refuse_mismatched_inputs():
    with pytest.raises(ValueError, match="rows must match"):
        Rows.from_tensors([torch.zeros(4), torch.zeros(5)])
    with pytest.raises(ValueError, match="kernels take"):
        Rows.from_tensors([torch.zeros(4, dtype=torch.int32)])



def test_rows_record_the_alignment_of_their_starts():
    """Row starts are stored in units of the largest power of two (at most 16 bytes) dividing them all:
    the kernels multiply back, so rows at any offset load the right entries (and aligned ones vectorise)."""
    x = torch.arange(3 * 24, dtype=torch.float32).view(3, 24)
    rows = Rows.from_matrix(x)
    assert rows.align == 4 and rows.offsets == [0, 6, 12]
    odd = Rows.from_matrix(torch.zeros(3, 7, dtype=torch.bfloat16))
    assert odd.align == 1 and odd.offsets == [0, 7, 14]
    assert Rows.from_matrix(torch.zeros(2, 12, dtype=torch.bfloat16)).align == 4
    # misaligned rows (views starting at odd offsets) give the same merge as aligned copies
    wide = torch.randn(3, 301, generator=torch.Generator().manual_seed(5)) * 0.01
    view = wide[:, 1:]
    assert Rows.from_tensors(list(view)).align == 1
    assert torch.equal(pcb_merge(view, backend="triton"), pcb_merge(view.contiguous().clone(), backend="triton"))


# ---- the whole backend against the reference


@pytest.mark.parametrize("n,D,inter,ratio,clamp", [
    (1, 1, "sum", 0.1, 1e-4),
    (1, 500, "sum", 0.2, 0.01),
    (2, 2049, "pairwise", 0.1, 0.01),  # BLOCK + 1: a one-entry last tile
    (3, 3000, "sum", 0.2, 1e-4),
    (3, 3000, "normalized_sum", 0.05, 0.01),
    (4, 1000, "pairwise", 0.3, 0.1),
    (4, 777, "sum", 1.0, 0.0),
])
def test_official_matches_reference(gen, n, D, inter, ratio, clamp):
    tv = torch.randn(n, D, generator=gen) * 0.01
    report = {}
    got = pcb_merge(tv, ratio=ratio, clamp_ratio=clamp, inter=inter, backend="triton", report=report)
    ref = pcb_reference(tv, ratio=ratio, clamp_ratio=clamp, inter=inter)
    near = official_near(tv, ratio, clamp, inter)
    compare(got, ref, f"official n={n} D={D} {inter}", near)
    torch_report = {}
    pcb_merge(tv, ratio=ratio, clamp_ratio=clamp, inter=inter, backend="torch", report=torch_report)
    # kept counts may differ only by entries near the threshold
    assert all(abs(a - b) <= int(near.sum()) for a, b in zip(report["kept"], torch_report["kept"]))


@pytest.mark.parametrize("n,D,ratio", [(1, 300, 0.2), (3, 2500, 0.2), (4, 2049, 0.1)])
def test_paper_matches_reference(gen, n, D, ratio):
    tv = torch.randn(n, D, generator=gen) * 0.01
    got = pcb_merge(tv, ratio=ratio, variant="paper", backend="triton")
    ref = pcb_reference(tv, ratio=ratio, variant="paper")
    compare(got, ref, f"paper n={n} D={D}", paper_near(tv, ratio))


@pytest.mark.parametrize("inter,variant", [("pairwise", "official"), ("sum", "paper")])
def test_32_tasks(gen, inter, variant):
    tv = torch.randn(32, 600, generator=gen) * 0.01
    got = pcb_merge(tv, ratio=0.2, clamp_ratio=0.01, inter=inter, variant=variant, backend="triton")
    ref = pcb_reference(tv, ratio=0.2, clamp_ratio=0.01, inter=inter, variant=variant)
    near = official_near(tv, 0.2, 0.01, inter) if variant == "official" else paper_near(tv, 0.2)
    compare(got, ref, f"n=32 {variant} {inter}", near)


def test_edge_cases_match_reference(gen):
    zeros = torch.zeros(3, 200)  # constant rows: nothing kept, no NaN
    assert torch.equal(pcb_merge(zeros, backend="triton"), torch.zeros(200))
    tv = torch.randn(3, 400, generator=gen)
    tv[1] = 0.0  # one all-zero task
    tv[2, :200] = 0.25  # heavy ties
    for variant in ("official", "paper"):
        near = official_near(tv, 0.3, 1e-4, "sum") if variant == "official" else paper_near(tv, 0.3)
        compare(pcb_merge(tv, variant=variant, ratio=0.3, backend="triton"),
                pcb_reference(tv, variant=variant, ratio=0.3), f"edge {variant}", near)
    lambdas = [0.5, 1.0, 1.7]
    compare(pcb_merge(tv, lambdas=lambdas, backend="triton"), pcb_reference(tv, lambdas=lambdas), "lambdas",
            official_near(tv, 0.1, 1e-4, "sum"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(gen, dtype):
    tv = (torch.randn(3, 1200, generator=gen) * 0.01).to(dtype)
    got = pcb_merge(tv, ratio=0.2, clamp_ratio=0.01, backend="triton")
    assert got.dtype == torch.float32
    compare(got, pcb_reference(tv.float(), ratio=0.2, clamp_ratio=0.01), f"{dtype} inputs",
            official_near(tv.float(), 0.2, 0.01, "sum"))


def test_results_are_identical_run_to_run(gen):
    tv = torch.randn(4, 3000, generator=gen)
    a = pcb_merge(tv, inter="pairwise", backend="triton")
    assert torch.equal(a, pcb_merge(tv, inter="pairwise", backend="triton"))


def _models(gen, dtype=torch.float32, n=3):
    base = {"enc.weight": torch.randn(40, 30, generator=gen).to(dtype), "enc.bias": torch.randn(30, generator=gen).to(dtype),
            "head.weight": torch.randn(7, 40, generator=gen).to(dtype), "steps": torch.tensor(12)}
    models = [{k: (v + 0.02 * torch.randn(v.shape, generator=gen)).to(dtype) if v.is_floating_point() else v
               for k, v in base.items()} for _ in range(n)]
    return base, models


@pytest.mark.parametrize("scope,variant", [("global", "official"), ("tensor", "official"), ("global", "paper")])
def test_state_dicts_match_reference(gen, scope, variant):
    base, models = _models(gen)
    kwargs = dict(scope=scope, variant=variant, ratio=0.3, clamp_ratio=0.01, lam=0.8, lambdas=[1.0, 0.9, 1.2])
    got = merge(base, models, backend="triton", exclude=["head"], **kwargs)
    ref = merge(base, models, backend="reference", exclude=["head"], **kwargs)
    assert list(got) == list(ref)
    assert torch.equal(got["head.weight"], base["head.weight"]) and torch.equal(got["steps"], base["steps"])
    keys = ("enc.weight", "enc.bias")
    taus = {k: torch.stack([(m[k] - base[k]).reshape(-1) for m in models]) for k in keys}
    near = {}
    for group in ([keys] if scope == "global" else [(k,) for k in keys]):
        tv = torch.cat([taus[k] for k in group], dim=1)
        flags = official_near(tv, 0.3, 0.01, "sum") if variant == "official" else paper_near(tv, 0.3)
        for k, part in zip(group, flags.split([taus[k].shape[1] for k in group])):
            near[k] = part
    for key in keys:
        compare(got[key] - base[key], ref[key] - base[key], f"{scope} {variant} {key}", near[key])


def test_bf16_state_dicts_keep_their_dtype(gen):
    base, models = _models(gen, torch.bfloat16)
    got = merge(base, models, backend="triton", ratio=0.3)
    ref = merge(base, models, backend="reference", ratio=0.3)
    for key in ("enc.weight", "enc.bias", "head.weight"):
        assert got[key].dtype == torch.bfloat16
        # float32 results within tolerance round to the same bf16 value or to a neighbour
        ulp = (ref[key].float().abs() * 2.0**-7).clamp_min(2.0**-133)
        assert bool(((got[key].float() - ref[key].float()).abs() <= ulp).all()), key


def test_nan_in_a_model_names_model_and_key(gen):
    base, models = _models(gen)
    models[2]["enc.bias"][3] = float("nan")
    for variant in ("official", "paper"):
        with pytest.raises(ValueError, match="model 2, key 'enc.bias': contains NaN or Inf"):
            merge(base, models, backend="triton", variant=variant)


@pytest.mark.parametrize("method,params", [
    ("average", {}), ("task_arithmetic", {}), ("dare", dict(p=0.5, seed=3)), ("ties", dict(density=0.3)),
    ("ties", dict(density=0.2, sign_ties="positive", scope="tensor")), ("ties", dict(density=1.0)),
    ("dare_ties", dict(p=0.7, seed=1)), ("ties", dict(density=0.3, topk="exact")),
    ("ties", dict(density=0.25, topk="exact", sign_ties="positive", scope="tensor")),
    ("breadcrumbs", dict(gamma=0.05, beta=0.3)),
])
def test_baselines_match_the_torch_backend(gen, method, params):
    base, models = _models(gen)
    for lambdas in (None, [0.5, 1.0, 1.5]):
        report_triton, report_torch = {}, {}
        got = merge(base, models, method=method, backend="triton", lambdas=lambdas, lam=0.8, report=report_triton,
                    **params)
        expected = merge(base, models, method=method, backend="torch", lambdas=lambdas, lam=0.8, report=report_torch,
                         **params)
        for key in ("enc.weight", "enc.bias", "head.weight"):
            compare(got[key] - base[key], expected[key] - base[key], f"{method} {params} {key}")
        # DARE's drop is the same counter-based draw on both backends: the same entries are kept
        assert report_triton["kept"] == report_torch["kept"]


def test_exact_top_k_keeps_ties_by_position_across_tiles_and_keys(gen):
    """Quantized values: many magnitudes equal the threshold, spread over tiles and keys."""
    base = {"a": torch.zeros(3000), "b": torch.zeros(50, 41)}
    models = [{k: torch.randint(-3, 4, v.shape, generator=gen).float() * 0.5 for k, v in base.items()} for _ in range(3)]
    for scope in ("global", "tensor"):
        report_triton, report_torch = {}, {}
        got = merge(base, models, method="ties", density=0.3, topk="exact", scope=scope, backend="triton",
                    report=report_triton)
        expected = merge(base, models, method="ties", density=0.3, topk="exact", scope=scope, backend="torch",
                         report=report_torch)
        assert report_triton["kept"] == report_torch["kept"]
        for key in base:
            assert torch.equal(got[key], expected[key]), (scope, key)


def test_ties_elects_the_cpu_signs_where_sums_cancel(gen):
    """Quantized deltas whose sums cancel exactly, and tiny values a sum in another order would keep or
    lose (2^-30 + 1 - 1 is 0 left to right, 2^-30 right to left): TIES and DARE-TIES on the device
    equal the torch backend bit for bit, because the election sums in task order without fused
    multiply-adds (docs/design.md 9)."""
    n, D = 5, 3000
    steps = torch.randint(-2, 3, (n, D), generator=gen).float() * 0.5
    tiny = torch.randint(-1, 2, (n, D), generator=gen).float() * 2.0**-30
    tv = torch.where(torch.rand(n, D, generator=gen) < 0.3, tiny, steps)
    forward = torch.sign(sum(tv[i] for i in range(n)))
    backward = torch.sign(sum(tv[i] for i in reversed(range(n))))
    assert int((forward != backward).sum()) > 20  # the data tells the two orders apart
    base = {"w": torch.zeros(D)}
    models = [{"w": row.clone()} for row in tv]
    for method, params in [("ties", dict(density=1.0)), ("ties", dict(density=0.6, lambdas=[0.5, 1.0, 1.5, 2.0, 0.25])),
                           ("dare_ties", dict(p=0.5, seed=2))]:
        got = merge(base, models, method=method, backend="triton", **params)["w"]
        expected = merge(base, models, method=method, backend="torch", **params)["w"]
        assert torch.equal(got, expected), (method, params, int((got != expected).sum()))


def test_segments_put_every_key_of_a_dtype_in_one_launch_per_pass(gen):
    """Keys of two dtypes and of sizes that fill whole tiles, end in a partial tile or hold one entry:
    two Segments (one per dtype), each launched as its full tiles and its last tiles, tiles numbered in
    position order across both (TIES' exact top-k keeps ties by position across them); the merges obey
    the tolerance contract (PCB) and equal the torch backend (TIES)."""
    from pcb_fast.kernels.tiles import BLOCK, segment

    shapes = {"a": (2 * BLOCK,), "b": (1,), "c": (3, 500), "d": (300,), "e": (4 * BLOCK,)}
    dtypes = {"a": torch.float32, "b": torch.float32, "c": torch.float32, "d": torch.bfloat16, "e": torch.bfloat16}
    base = {k: (torch.randn(shape, generator=gen) * 0.02).to(dtypes[k]) for k, shape in shapes.items()}
    steps = lambda k: torch.randint(-2, 3, shapes[k], generator=gen).float() * 2.0**-6  # noqa: E731
    models = [{k: (base[k].float() + steps(k)).to(dtypes[k]) for k in base} for _ in range(3)]
    parts = [Rows.from_tensors([m[k] for m in models], base=base[k]) for k in base]
    segments = segment(parts, [torch.empty_like(base[k]) for k in base])
    assert [len(s.parts) for s in segments] == [3, 2] and [s.first_tile for s in segments] == [0, 5]
    assert [[full for _, full in s.launches] for s in segments] == [[True, False], [True, False]]
    for topk in ("threshold", "exact"):
        report_triton, report_torch = {}, {}
        got = merge(base, models, method="ties", density=0.3, topk=topk, backend="triton", report=report_triton)
        expected = merge(base, models, method="ties", density=0.3, topk=topk, backend="torch", report=report_torch)
        assert report_triton["kept"] == report_torch["kept"], topk
        for k in base:
            assert torch.equal(got[k], expected[k]), (topk, k)
    models = [{k: (base[k].float() + 0.01 * torch.randn(shapes[k], generator=gen)).to(dtypes[k]) for k in base}
              for _ in range(3)]
    got = merge(base, models, backend="triton", ratio=0.3, clamp_ratio=0.01)
    ref = merge(base, models, backend="reference", ratio=0.3, clamp_ratio=0.01)
    taus = torch.cat([torch.stack([(m[k].float() - base[k].float()).reshape(-1) for m in models]) for k in base], 1)
    near = official_near(taus, 0.3, 0.01, "sum")
    for k, flags in zip(base, near.split([base[k].numel() for k in base])):
        if dtypes[k] == torch.float32:
            compare(got[k] - base[k], ref[k] - base[k], f"segments {k}", flags)
        else:  # bf16 outputs: within one bf16 ulp of the reference, or near a threshold
            ulp = (ref[k].float().abs() * 2.0**-7).clamp_min(2.0**-133)
            off = ((got[k].float() - ref[k].float()).abs() > ulp).reshape(-1) & ~flags
            assert not bool(off.any()), k


def test_float64_bases_keep_their_precision(gen):
    """theta = theta_pre + lam * tau_m with a float64 base is formed in float64, as the CPU path does
    (docs/design.md 2.5): the kernels read the base again in float64 for a float64 output instead of
    rounding theta to float32 (which moved values by ~1e-8 relative)."""
    base = {"w": 1.0 + torch.randn(2500, generator=gen, dtype=torch.float64) * 1e-3}
    models = [{"w": base["w"] + 1e-3 * torch.randn(2500, generator=gen, dtype=torch.float64)} for _ in range(3)]
    for method in ("ties", "task_arithmetic", "dare_ties"):
        got = merge(base, models, method=method, backend="triton", lam=0.7)["w"]
        expected = merge(base, models, method=method, backend="torch", lam=0.7)["w"]
        assert got.dtype == torch.float64 and torch.equal(got, expected), method
    got = merge(base, models, backend="triton", ratio=0.3)["w"]
    ref = merge(base, models, backend="reference", ratio=0.3)["w"]
    tv = torch.stack([m["w"] - base["w"] for m in models]).float()
    # PCB: the contract on theta - theta_pre (rounding theta to float32 alone would break it: ~6e-8 of ~1e-3)
    compare(got - base["w"], ref - base["w"], "float64 base", official_near(tv, 0.3, 1e-4, "sum"))


def test_baselines_on_triton_name_the_model_and_key_of_a_bad_value(gen):
    base, models = _models(gen)
    models[1]["enc.bias"][0] = float("inf")
    for method in ("task_arithmetic", "ties", "dare_ties", "breadcrumbs"):
        with pytest.raises(ValueError, match="model 1, key 'enc.bias': contains NaN or Inf"):
            merge(base, models, method=method, backend="triton")


def test_gpu_benchmark_runs_under_the_interpreter(capsys):
    from benchmarks import bench_gpu

    assert bench_gpu.main(["--smoke"]) == 0
    out = capsys.readouterr().out
    assert "| 8 | 4,096 | float32 |" in out and "| 8 | 4,096 | bfloat16 |" in out
    assert "| dare_ties |" in out


def test_gpu_check_runs_under_the_interpreter(tmp_path, capsys):
    """The GPU runbook's checks (benchmarks/gpu_check.py) at --quick sizes: the plumbing a GPU session
    will rely on, kept working here."""
    from benchmarks import gpu_check

    out = tmp_path / "gpu_check.json"
    assert gpu_check.main(["--quick", "--out", str(out)]) == 0
    import json

    report = json.loads(out.read_text())
    assert report["machine"]["device"] == "cpu (Triton interpreter)"
    assert len(report["checks"]) >= 20 and all(c["ok"] for c in report["checks"])
    assert "FAIL" not in capsys.readouterr().out
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0  # the runbook parses

