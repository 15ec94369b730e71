"""The C row select of pcb_fast.cpu.native against a sort, on rows made to reach every branch of the
radix select: ties, zeros of both signs, subnormals, infinities, NaN, values that differ only in
their last bits, rows of one to tens of thousands of entries, rows split over threads.

The CI machine has a C compiler, so the kernel must build here (as the fused loops must compile).
"""

import pytest
import torch

import pcb_fast
from pcb_fast.cpu import native


def sorted_ranks(x, rank_a, rank_b):
    """The literal answer: |x| sorted descending per row."""
    values = x.abs().sort(dim=-1, descending=True).values
    return values[..., rank_a : rank_a + 1], values[..., rank_b : rank_b + 1]


def assert_bitwise(actual, expected):
    # bit patterns, not values: +0 and -0 compare equal, NaN does not
    assert torch.equal(actual.view(torch.int32), expected.view(torch.int32))


def rows(kind, shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    if kind == "quantized":  # long runs of equal magnitudes, each bound tied
        return torch.round(x * 2) / 2
    if kind == "signed_zeros":
        x = torch.where(x > 0.5, x, torch.where(x > 0, 0.0, -0.0))
        return x
    if kind == "last_bits":  # one top bucket and one middle bucket: only the last 9 bits differ
        return (1 + torch.randint(0, 512, shape, generator=g) * 2.0**-23) * torch.sign(x)
    if kind == "subnormal":
        return torch.randint(-300, 300, shape, generator=g) * 2.0**-149
    if kind == "extremes":
        x[..., ::7] = float("inf")
        x[..., 3::11] = -float("inf")
        x[..., 1::13] = 3.4e38
        return x
    return x


def test_builds_here():
    assert native.problem() is None


def test_every_c_file_is_built_and_shipped():
    """Every .c and .h beside native.py is compiled (and part of the cache key), and setup.py ships
    them all (the package data of an earlier version named one file of two)."""
    from pathlib import Path

    folder = Path(native.__file__).parent
    assert {p.name for p in native.SOURCES} == {p.name for p in folder.glob("*.c")}
    assert {p.name for p in native.HEADERS} == {p.name for p in folder.glob("*.h")}
    setup = (folder.parent.parent / "setup.py").read_text()
    assert '"pcb_fast.cpu": ["*.c", "*.h"]' in setup


@pytest.mark.parametrize("kind", ["normal", "quantized", "signed_zeros", "last_bits", "subnormal", "extremes"])
@pytest.mark.parametrize("length", [1, 2, 3, 20, 32, 33, 64, 4099])
def test_every_rank_pair_matches_a_sort(kind, length):
    x = rows(kind, (3, 5, length), seed=length)
    for rank_a, rank_b in {(0, 0), (0, length - 1), (length // 3, length // 2), (length - 1, length - 1),
                           (length // 100, length // 9)}:
        a, b = native.row_order_statistics(x, rank_a, rank_b)
        expected_a, expected_b = sorted_ranks(x, rank_a, rank_b)
        assert a.shape == (3, 5, 1)
        assert_bitwise(a, expected_a)
        assert_bitwise(b, expected_b)


def test_long_rows_and_rows_split_over_threads():
    x = rows("normal", (3, 70_001), seed=1)
    for rank_a, rank_b in ((0, 70_000), (700, 7700)):
        a, b = native.row_order_statistics(x, rank_a, rank_b)
        expected_a, expected_b = sorted_ranks(x, rank_a, rank_b)
        assert_bitwise(a, expected_a)
        assert_bitwise(b, expected_b)
    many = rows("quantized", (2000, 33), seed=2)  # enough rows for every thread
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = native.row_order_statistics(many, 3, 20)
    finally:
        torch.set_num_threads(threads)
    split = native.row_order_statistics(many, 3, 20)
    expected = sorted_ranks(many, 3, 20)
    for one, other, exact in zip(single, split, expected):
        assert_bitwise(one, exact)
        assert_bitwise(other, exact)


@pytest.mark.parametrize("length", [20, 300])
def test_ranks_in_either_order(length):
    x = rows("quantized", (6, length), seed=4)
    a, b = native.row_order_statistics(x, length - 2, 3)
    expected_b, expected_a = sorted_ranks(x, 3, length - 2)
    assert_bitwise(a, expected_a)
    assert_bitwise(b, expected_b)


def test_rows_read_in_place_from_a_wider_matrix():
    wide = rows("normal", (4, 10 * 128), seed=3)
    block = wide[:, 256:768].reshape(4, 4, 128)  # rows contiguous within a task, not across tasks
    assert not block.is_contiguous()
    for got, expected in zip(native.row_order_statistics(block, 2, 40), sorted_ranks(block.contiguous(), 2, 40)):
        assert_bitwise(got, expected)


def test_nan_ranks_first():
    x = torch.tensor([[1.0, float("nan"), -3.0, 2.0]])
    a, b = native.row_order_statistics(x, 0, 1)
    assert torch.isnan(a).all() and b.item() == 3.0


def test_bad_input():
    with pytest.raises(ValueError, match="rank 5 is outside a row of 5 entries"):
        native.row_order_statistics(torch.zeros(2, 5), 0, 5)
    with pytest.raises(ValueError, match="needs rows of float32 on the CPU, got torch.float64"):
        native.row_order_statistics(torch.zeros(2, 5, dtype=torch.float64), 0, 1)
    empty_a, empty_b = native.row_order_statistics(torch.zeros(0, 5), 0, 1)
    assert empty_a.shape == empty_b.shape == (0, 1)


def test_builds_into_the_cache_dir_and_reports_a_failed_build(monkeypatch, tmp_path):
    monkeypatch.setenv("PCB_FAST_CACHE", str(tmp_path / "cache"))
    native._library.cache_clear()
    try:
        assert native.problem() is None
        assert len(list((tmp_path / "cache").glob("native-*.so"))) == 1
        native._library.cache_clear()
        broken = tmp_path / "row_select.c"
        broken.write_text("int row_order_statistics(void) { return }\n")
        monkeypatch.setattr(native, "SOURCES", (broken, native.SOURCES[1]))
        assert "could not build row_select.c, dare_hash.c" in native.problem()
        native._library.cache_clear()
        monkeypatch.setattr(native, "_compiler", lambda: None)
        assert native.problem() == "no C compiler found ($CC, cc, gcc, clang)"
        with pytest.raises(RuntimeError, match="native kernel unavailable: no C compiler"):
            native.row_order_statistics(torch.zeros(2, 5), 0, 1)
    finally:
        native._library.cache_clear()


def test_breadcrumbs_without_the_kernel_warns_and_agrees(monkeypatch):
    g = torch.Generator().manual_seed(5)
    base = {"w": torch.randn(40, 300, generator=g)}
    models = [{"w": base["w"] + torch.round(torch.randn(40, 300, generator=g) * 4) / 16} for _ in range(3)]
    with_kernel = pcb_fast.merge(base, models, method="breadcrumbs", fused="on", gamma=0.02, beta=0.2)
    monkeypatch.setattr(native, "_library", lambda: "no C compiler found ($CC, cc, gcc, clang)")
    with pytest.warns(UserWarning, match="native row select unavailable .no C compiler"):
        without = pcb_fast.merge(base, models, method="breadcrumbs", fused="on", gamma=0.02, beta=0.2)
    eager = pcb_fast.merge(base, models, method="breadcrumbs", fused="off", gamma=0.02, beta=0.2)
    assert torch.equal(with_kernel["w"], without["w"]) and torch.equal(with_kernel["w"], eager["w"])


@pytest.mark.parametrize("lo,m", [(0, 1000), (5, 100_003), ((1 << 32) - 700, 1500)])
def test_dare_keep_masks_equal_the_torch_hash(lo, m):
    """The C hash (uint32 arithmetic) gives rng's int64 formulation bit for bit, past 2^32 too."""
    from pcb_fast.core import rng

    ps = [0.1, 0.5, 0.9, 0.0, 1.0]
    streams = [rng.stream_constant(3, i, "a.weight") for i in range(len(ps))]
    got = native.dare_keep_masks(lo, m, streams, [rng.mix32(h) for h in streams], [rng.keep_threshold(p) for p in ps])
    assert torch.equal(got, rng.keep_masks(3, "a.weight", lo, lo + m, ps))


# --- weighted_merge.c: task arithmetic from the stored inputs, and the sink's last step --------------

def _bits(x):
    return x.view({2: torch.int16, 4: torch.int32}[x.element_size()])


def _torch_weighted(models, base, weights, divisor, lam, dtype):
    """The torch engine's operations: float32 task vectors, summed in task order, base + lam * total."""
    from pcb_fast.core.formulas import merged_weights, sum_over_tasks

    b = base.float()
    tv = torch.stack([torch.sub(m, b) for m in models])
    tv = tv if weights is None else tv * weights.reshape(-1, 1)
    total = sum_over_tasks(tv)
    total = total if divisor is None else total / divisor
    return merged_weights(base, lam, total).to(dtype)


@pytest.mark.parametrize("dtypes", [(torch.bfloat16,) * 3, (torch.float16,) * 3, (torch.float32,) * 3,
                                    (torch.bfloat16, torch.float32, torch.float16), (torch.float16, torch.bfloat16, torch.bfloat16)])
@pytest.mark.parametrize("n,weights,divisor,lam", [(1, None, None, 1.0), (2, [0.5, -1.25], 3.0, 0.3),
                                                   (5, None, 7, 1.7), (4, [1.0, 2.0, 0.0, -0.5], None, -2.0)])
def test_weighted_merge_is_the_torch_engine_bit_for_bit(dtypes, n, weights, divisor, lam):
    base_dtype, model_dtype, out_dtype = dtypes
    g = torch.Generator().manual_seed(n)
    m = 100_003  # several threads' chunks and a ragged end
    base = (torch.randn(m, generator=g) * 0.05).to(base_dtype)
    models = [(base.float() + torch.randn(m, generator=g) * 1e-3).to(model_dtype) for _ in range(n)]
    models[0][:50] = base[:50].to(model_dtype)  # zero task vectors: signed zeros
    w = None if weights is None else torch.tensor(weights)
    out = torch.empty(m, dtype=out_dtype)
    assert native.weighted_merge(models, base, w, divisor, lam, out)
    assert torch.equal(_bits(out), _bits(_torch_weighted(models, base, w, divisor, lam, out_dtype)))


@pytest.mark.parametrize("dtypes", [(torch.bfloat16,) * 3, (torch.float16,) * 3, (torch.float32,) * 3,
                                    (torch.float32, torch.bfloat16, torch.float16), (torch.float16, torch.float32, torch.bfloat16)])
def test_task_vectors_are_torch_sub_bit_for_bit(dtypes):
    """The files' float32 task vectors from the raw slices, against torch.sub on the converted base:
    signed zeros where a model equals the base, every half value (subnormals), infinities and NaN."""
    base_dtype, *model_dtypes = dtypes
    g = torch.Generator().manual_seed(len(set(dtypes)))
    m = 70_001  # several threads' chunks and a ragged end
    halves = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.float16)
    base = (torch.randn(m, generator=g) * 0.05).to(base_dtype)
    models = [(base.float() + torch.randn(m, generator=g) * 1e-3).to(t) for t in model_dtypes]
    models[0][:100] = base[:100].to(model_dtypes[0])  # x - x: +0
    models[1][100:65636] = halves.to(model_dtypes[1])  # every half value, in each dtype it rounds to
    models[1][-4:] = torch.tensor([float("inf"), float("-inf"), float("nan"), -0.0]).to(model_dtypes[1])
    base[-8:-4] = torch.tensor([float("inf"), float("nan"), -0.0, 0.0]).to(base_dtype)
    out, base32 = torch.full((4, m), 7.0), torch.empty(m)  # rows of a wider buffer, as the sources hand out
    assert native.task_vectors([base] + models, base32, out[1:3])
    expected = torch.stack([torch.sub(x, base.float()) for x in models])
    assert torch.equal(_bits(base32), _bits(base.float()))
    assert torch.equal(_bits(out[1:3]), _bits(expected))
    assert torch.equal(out[0], torch.full((m,), 7.0)) and torch.equal(out[3], torch.full((m,), 7.0))


def test_task_vectors_leave_float64_and_mismatched_slices_to_torch():
    base32, out = torch.empty(8), torch.empty(1, 8)
    assert not native.task_vectors([torch.zeros(8, dtype=torch.float64), torch.zeros(8)], base32, out)
    assert not native.task_vectors([torch.zeros(8), torch.zeros(7)], base32, out)
    assert not native.task_vectors([torch.zeros(8), torch.zeros(16)[::2]], base32, out)
    assert native.task_vectors([torch.zeros(0), torch.zeros(0)], torch.empty(0), torch.empty(1, 0))


def test_half_conversions_are_exact_over_every_half_value():
    """Every float16 value (the input conversion), and float32 values around every half rounding
    boundary, subnormals and the overflow edge (the output rounding), against torch's conversions."""
    halves = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.float16)
    finite = halves[torch.isfinite(halves)]
    zero = torch.zeros(finite.numel(), dtype=torch.float16)
    out = torch.empty(finite.numel(), dtype=torch.float32)
    assert native.weighted_merge([finite], zero, None, None, 1.0, out)  # 0 + (x - 0): x itself (-0 -> +0)
    assert torch.equal(_bits(out), _bits(_torch_weighted([finite], zero, None, None, 1.0, torch.float32)))
    assert torch.equal(out, finite.float())
    # float32 values between and at the midpoints of neighbouring halves, and just past the largest half
    f = finite.float().sort().values
    mids = (f[1:] + f[:-1]) / 2
    near = torch.cat([f, mids, torch.nextafter(mids, f[1:]), torch.nextafter(mids, f[:-1]),
                      torch.tensor([65504.0, 65519.996, 65520.0, -65520.0, 1e-8, -3e-8, 2.0**-25, 2.0**-24 * 1.5])])
    base = torch.zeros(near.numel(), dtype=torch.float32)
    rounded = torch.empty(near.numel(), dtype=torch.float16)
    ok = native.merged_output(base, near, 1.0, rounded)
    expected = (base + near).to(torch.float16)  # 0 + x: x, but -0 becomes +0
    assert not ok  # 65520 rounds to infinity: reported, as check_merged would
    fine = torch.isfinite(expected)
    assert torch.equal(_bits(rounded)[fine], _bits(expected)[fine])


def test_merged_output_is_merged_weights_then_the_cast():
    from pcb_fast.core.formulas import merged_weights

    g = torch.Generator().manual_seed(5)
    for base_dtype in (torch.float32, torch.bfloat16, torch.float16):
        for out_dtype in (torch.float32, torch.bfloat16, torch.float16):
            for lam in (1.0, 0.7, -3.0):
                base = torch.randn(70_001, generator=g).to(base_dtype)
                tau = torch.randn(70_001, generator=g) * 1e-2
                tau[:10] = -0.0
                out = torch.empty(70_001, dtype=out_dtype)
                assert native.merged_output(base, tau, lam, out)
                assert torch.equal(_bits(out), _bits(merged_weights(base, lam, tau).to(out_dtype)))
    # not finite: reported, not written silently
    base, tau = torch.zeros(8), torch.ones(8)
    tau[3] = float("inf")
    assert not native.merged_output(base, tau, 1.0, torch.empty(8))
    assert not native.merged_output(torch.full((4,), 3e38), torch.full((4,), 1e38), 1.0, torch.empty(4, dtype=torch.bfloat16))
    # a float64 base is not for the kernel (the torch path keeps it in float64)
    assert not native.merged_output(torch.zeros(4, dtype=torch.float64), torch.zeros(4), 1.0, torch.empty(4, dtype=torch.float64))


def test_collect_is_nonzero_then_take():
    """collect.c: the entries at or above each task's floor, task-major, from strided rows, NaN never
    collected, empty and full rows; the values of torch's nonzero and take."""
    g = torch.Generator().manual_seed(0)
    for n, m in [(1, 1), (3, 5), (4, 70_001), (8, 1000)]:
        scores = torch.randn(n, m, generator=g)
        scores[:, ::7] = float("nan")
        tv = torch.randn(n, m + 13, generator=g)[:, :m]  # a strided view, as blocks of a wider buffer are
        floor = torch.randn(n, generator=g)
        floor[0] = float("inf")  # nothing collected
        if n > 1:
            floor[1] = float("-inf")  # everything but NaN
        flat, values, tau = native.collect(scores, tv, floor)
        expected = (scores >= floor.unsqueeze(1)).view(-1).nonzero().squeeze(1)
        assert torch.equal(flat.long(), expected)
        assert torch.equal(values.view(torch.int32), torch.take(scores, expected).view(torch.int32))
        assert torch.equal(tau.view(torch.int32), torch.take(tv, expected).view(torch.int32))


def feed_tails(tails, blocks, first, step):
    """Feed consecutive ``blocks`` (float32 [n, m] or raw slices) to native.ClipTails; returns their
    row maxima and the sampled columns first, first + step, ... of the whole row."""
    maxima, parts, offset = [], [], 0
    for block in blocks:
        m = block.shape[1] if isinstance(block, torch.Tensor) else block[0].numel()
        start = (first - offset) % step  # the block's first sampled column
        part = torch.empty(tails.n, len(range(start, m, step)))
        maxima.append(tails.update(block, start, step, part))
        parts.append(part)
        offset += m
    return torch.stack(maxima), torch.cat(parts, 1)


@pytest.mark.parametrize("kind", ["normal", "quantized", "signed_zeros", "subnormal", "last_bits"])
def test_clip_tails_equal_a_sort(kind):
    """PCB's clip pass in C: the k_low-th smallest and k_high-th largest |tau| of every row, fed in
    blocks of several widths (ragged ends, sets compacted many times), equal a sort's, bit for bit;
    each block's max |tau| is torch.amax's and its sampled columns are tau's."""
    n, D = 3, 30_011
    tv = rows(kind, (n, D), seed=4)
    s = tv.abs().sort(dim=1).values
    for k_low, k_high, width in [(1, 1, 30_011), (37, 120, 1000), (400, 3, 4097), (1, 469, 777)]:
        tails = native.ClipTails(n, k_low, k_high)
        blocks = [tv[:, lo : lo + width] for lo in range(0, D, width)]
        maxima, sample = feed_tails(tails, blocks, 0, 17)
        assert_bitwise(tails.values(), torch.stack([s[:, k_low - 1], s[:, D - k_high]], dim=1))
        assert torch.equal(maxima, torch.stack([b.abs().amax(1) for b in blocks]))
        assert_bitwise(sample, tv[:, ::17])
    tv[1, 5] = float("nan")
    assert torch.isnan(native.ClipTails(n, 1, 1).update(tv, 0, 17, torch.empty(n, len(range(0, D, 17))))[1])


def test_clip_tails_form_tau_from_raw_slices():
    """From the stored slices (a bfloat16 base; float16, float32 and bfloat16 models; widths past the
    sweep's chunk of 1024), the clip pass sees torch.sub's task vectors: the same tails, maxima and
    sample as from those task vectors."""
    g = torch.Generator().manual_seed(2)
    D = 5000
    base = torch.randn(D, generator=g).to(torch.bfloat16)
    models = [(base.float() + torch.randn(D, generator=g) * 1e-2).to(dtype)
              for dtype in (torch.float16, torch.float32, torch.bfloat16)]
    expected = torch.stack([torch.sub(model, base.float()) for model in models])
    for width in (1, 1000, 2500):
        raw, formed = native.ClipTails(3, 7, 9), native.ClipTails(3, 7, 9)
        spans = [(lo, min(lo + width, D)) for lo in range(0, D, width)][:40]
        got = feed_tails(raw, [[t[lo:hi] for t in [base] + models] for lo, hi in spans], 5, 23)
        want = feed_tails(formed, [expected[:, lo:hi] for lo, hi in spans], 5, 23)
        assert_bitwise(got[0], want[0])
        assert_bitwise(got[1], expected[:, 5 : spans[-1][1] : 23])
        assert_bitwise(got[1], want[1])
        if width == 1000:
            assert_bitwise(raw.values(), formed.values())
    with pytest.raises(ValueError, match="the sample must be"):
        native.ClipTails(3, 1, 1).update([base] + models, 0, 17, torch.empty(3, 5))


def test_c_loops_read_rows_with_other_steps():
    """A float32 block whose rows step by more than one entry is copied to unit steps for the C loops;
    the copy lives while they run (it had been freed before they read it: wrong values, silently)."""
    g = torch.Generator().manual_seed(6)
    full = torch.randn(3, 4000, generator=g)
    for _ in range(3):
        tv = full[:, ::2]
        rows = tv.contiguous()
        floor, ceiling = torch.full((3,), 0.5), torch.full((3,), 1.5)
        got, want = native.bracket(tv, floor, ceiling), native.bracket(rows, floor, ceiling)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        assert all(torch.equal(a, b) for a, b in zip(got[2], want[2]))
        t, cut, lam = torch.full((3,), 0.7), torch.zeros(3, dtype=torch.int64), torch.ones(3)
        for a, b in zip(native.ties_block(tv, t, cut, lam, 1.0, True), native.ties_block(rows, t, cut, lam, 1.0, True)):
            assert torch.equal(a, b)
        tails = [native.ClipTails(3, 5, 7) for _ in range(2)]
        samples = [torch.empty(3, len(range(0, 2000, 17))) for _ in range(2)]
        maxima = [tails[0].update(tv, 0, 17, samples[0]), tails[1].update(rows, 0, 17, samples[1])]
        assert torch.equal(maxima[0], maxima[1]) and torch.equal(samples[0], samples[1])
        assert torch.equal(tails[0].values(), tails[1].values())
