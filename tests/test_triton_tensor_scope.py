"""scope="tensor" on the triton backend (TRITON_INTERPRET=1): every key's statistics in one launch per
pass (kernels.tiles.Segments with per_part: each part's index is its group), against the CPU engine
(torch backend, the same scope) and the reference under the per-entry tolerance of docs/design.md 9.
The launches and the radix select's histograms are counted: a pass costs the same launches for 1
key or many, and histograms exist only for the keys whose bracket missed."""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from pcb_fast import merge  # noqa: E402
from pcb_fast.kernels import select as ks, tiles as kt  # noqa: E402
from benchmarks.gpu_check import official_near, paper_near  # noqa: E402
from test_triton import compare  # noqa: E402


@pytest.fixture
def launches(monkeypatch):
    """Counts of Segments.launch by kernel name, and the DeviceSelects made (radix histograms)."""
    counts = {"selects": 0}
    launch, select_init = kt.Segments.launch, ks.DeviceSelect.__init__

    def counting_launch(self, kernel, *args, **kwargs):
        name = kernel.fn.__name__  # grids launched: full tiles and last tiles
        counts[name] = counts.get(name, 0) + len(self.launches)
        return launch(self, kernel, *args, **kwargs)

    def counting_init(self, *args, **kwargs):
        counts["selects"] += 1
        return select_init(self, *args, **kwargs)

    monkeypatch.setattr(kt.Segments, "launch", counting_launch)
    monkeypatch.setattr(ks.DeviceSelect, "__init__", counting_init)
    return counts


def _models(gen, keys: int, n: int = 3, quantized: bool = False):
    """``keys`` float32 keys of varied sizes (a partial last tile each, one of a single entry)."""
    shapes = [(37, 29), (1,), (1500,), (11, 90), (5, 5), (2100,), (300,), (3, 7)][:keys]
    base = {f"k{i}": torch.randn(s, generator=gen) * 0.02 for i, s in enumerate(shapes)}
    if quantized:
        step = lambda s: torch.randint(-2, 3, s, generator=gen).float() * 2.0**-6  # noqa: E731
    else:
        step = lambda s: 0.01 * torch.randn(s, generator=gen)  # noqa: E731
    return base, [{k: v + step(v.shape) for k, v in base.items()} for _ in range(n)]


def _near(base, models, key, ratio, clamp, variant, inter="sum"):
    tv = torch.stack([(m[key] - base[key]).reshape(-1) for m in models])
    return official_near(tv, ratio, clamp, inter) if variant == "official" else paper_near(tv, ratio)


@pytest.mark.parametrize("variant,inter", [("official", "sum"), ("official", "pairwise"), ("paper", "sum")])
def test_pcb_per_tensor_in_one_launch_per_pass(gen, launches, variant, inter):
    base, models = _models(gen, 8)
    kwargs = dict(scope="tensor", variant=variant, inter=inter, ratio=0.3, clamp_ratio=0.01, lam=0.9,
                  lambdas=[1.0, 0.8, 1.3])
    got = merge(base, models, backend="triton", **kwargs)
    ref = merge(base, models, backend="reference", **kwargs)
    for key in base:
        compare(got[key] - base[key], ref[key] - base[key], f"{variant} {inter} {key}",
                _near(base, models, key, 0.3, 0.01, variant, inter))
    # 8 keys of one dtype: each pass is one launch for the full tiles, one for the keys' last tiles
    per_pass = {"official": ["magnitude_kernel", "official_kernel", "merge_kernel"],
                "paper": ["pair_minmax_kernel", "partition_kernel", "paper_kernel", "merge_kernel"]}[variant]
    assert {k: launches.get(k) for k in per_pass} == {k: 2 for k in per_pass}, launches
    assert launches["selects"] == 0  # every bracket held: no radix histogram


def test_pcb_per_tensor_equals_the_cpu_engine_key_by_key(gen):
    """The batched run equals running each key alone on the triton backend (the same kernels, the same
    exact thresholds), and the torch backend within the tolerance."""
    base, models = _models(gen, 5)
    kwargs = dict(variant="official", ratio=0.2, clamp_ratio=0.05)
    got = merge(base, models, backend="triton", scope="tensor", **kwargs)
    cpu = merge(base, models, backend="torch", scope="tensor", **kwargs)
    for key in base:
        alone = merge({key: base[key]}, [{key: m[key]} for m in models], backend="triton", **kwargs)[key]
        assert torch.equal(got[key], alone), key
        compare(got[key] - base[key], cpu[key] - base[key], f"cpu {key}", _near(base, models, key, 0.2, 0.05, "official"))


@pytest.mark.parametrize("method,params", [
    ("ties", dict(density=0.3)), ("ties", dict(density=0.3, topk="exact")),
    ("ties", dict(density=0.25, topk="exact", sign_ties="positive")), ("ties", dict(density=1.0)),
    ("dare_ties", dict(p=0.6, seed=4)),
])
def test_ties_per_tensor_equals_the_torch_backend(gen, launches, method, params):
    """Quantized deltas (ties at every threshold, across tiles and keys; exact zero sums): every entry and
    the kept counts equal the CPU engine's, with one launch per pass (two: full and last tiles)."""
    base, models = _models(gen, 8, quantized=True)
    report_triton, report_torch = {}, {}
    got = merge(base, models, method=method, scope="tensor", backend="triton", report=report_triton, **params)
    expected = merge(base, models, method=method, scope="tensor", backend="torch", report=report_torch, **params)
    for key in base:
        assert torch.equal(got[key], expected[key]), (method, params, key)
    assert report_triton["kept"] == report_torch["kept"]
    assert launches["sign_kernel"] == 2 and launches["ties_merge_kernel"] == 2, launches
    assert launches.get("magnitude_kernel", 0) in (0, 2) and launches.get("equal_count_kernel", 0) == 0, launches


def test_a_missed_bracket_costs_the_radix_select_of_its_key_alone(gen, launches):
    """One key whose column sample misleads its brackets (every 17th column ten times larger, the key
    sampled one column in 17) next to keys whose brackets hold: the radix select runs once, over that
    key alone (one DeviceSelect per select, rows of that key only), and every key still obeys the
    tolerance (PCB) or equals the torch backend (TIES)."""
    n, m = 2, 65536 + 4096
    base, models = _models(gen, 3, n=n)
    base["big"] = torch.zeros(m)
    for model in models:
        model["big"] = torch.randn(m, generator=gen) * 0.01
        model["big"][::17] *= 10
    made = []
    init = ks.DeviceSelect.__init__

    def record(self, ranks, lengths, device, groups=None):
        made.append((torch.as_tensor(ranks).shape[0], groups))
        return init(self, ranks, lengths, device, groups)

    ks.DeviceSelect.__init__, saved = record, ks.DeviceSelect.__init__
    try:
        got = merge(base, models, backend="triton", scope="tensor", ratio=0.1, clamp_ratio=0.01)
    finally:
        ks.DeviceSelect.__init__ = saved
    ref = merge(base, models, backend="reference", scope="tensor", ratio=0.1, clamp_ratio=0.01)
    for key in base:
        compare(got[key] - base[key], ref[key] - base[key], key, _near(base, models, key, 0.1, 0.01, "official"))
    keys = sorted(base)
    assert made and all(rows == n and groups[keys.index("big")] == 0 for rows, groups in made), made
    quantized = {k: torch.randint(-2, 3, v.shape, generator=gen).float() * 0.25 for k, v in models[0].items()}
    models[0] = {k: base[k] + quantized[k] for k in base}
    for topk in ("threshold", "exact"):
        got = merge(base, models, method="ties", density=0.3, topk=topk, scope="tensor", backend="triton")
        expected = merge(base, models, method="ties", density=0.3, topk=topk, scope="tensor", backend="torch")
        for key in base:
            assert torch.equal(got[key], expected[key]), (topk, key)


def test_nan_per_tensor_names_the_model_and_key(gen):
    base, models = _models(gen, 4)
    models[1]["k2"][7] = float("inf")
    for kwargs in (dict(variant="official"), dict(variant="paper"), dict(method="ties", density=0.2)):
        with pytest.raises(ValueError, match="model 1, key 'k2': contains NaN or Inf"):
            merge(base, models, backend="triton", scope="tensor", **kwargs)


# ---- Breadcrumbs' band as a kernel (kernels/breadcrumbs.py)


def _breadcrumbs_models(gen, dtype=torch.float32, n=3):
    """Rows of 1 to 1100 entries (one per row-length class and then some), a scalar, quantized deltas:
    ties at both bounds of most bands, exact zeros."""
    shapes = {"scalar": (), "one": (4, 1), "seven": (3, 7), "rows": (6, 50), "vector": (300,), "wide": (2, 1100)}
    base = {k: (torch.randn(s, generator=gen) * 0.02).to(dtype) for k, s in shapes.items()}
    models = [{k: (v.float() + torch.randint(-2, 3, v.shape, generator=gen).float() * 2.0**-7).to(dtype)
               for k, v in base.items()} for _ in range(n)]
    return base, models


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("gamma,beta", [(0.05, 0.3), (0.0, 1.0), (0.2, 0.1), (0.5, 0.01)])
def test_breadcrumbs_kernel_equals_the_torch_backend(gen, dtype, gamma, beta):
    """Every entry and the kept counts equal the CPU engine's: the band by position among ties, keep = 0
    on short rows (beta * L < 1), float64 bases kept in float64, lambdas and lam."""
    base, models = _breadcrumbs_models(gen, dtype)
    report_triton, report_torch = {}, {}
    kwargs = dict(method="breadcrumbs", gamma=gamma, beta=beta, lambdas=[0.5, 1.0, 1.5], lam=0.7)
    got = merge(base, models, backend="triton", report=report_triton, **kwargs)
    expected = merge(base, models, backend="torch", report=report_torch, **kwargs)
    for key in base:
        assert got[key].dtype == dtype and torch.equal(got[key], expected[key]), (key, gamma, beta)
    assert report_triton["kept"] == report_torch["kept"]


def test_breadcrumbs_launches_one_kernel_per_row_class(gen, monkeypatch):
    """One launch per row-length class (and dtypes), none per key; rows longer than the kernel holds take
    the torch path (ROW_MAX lowered here to see both in one merge), with the same results."""
    from pcb_fast.kernels import breadcrumbs as kb

    base, models = _breadcrumbs_models(gen)
    base["more"], base["again"] = torch.zeros(5, 50), torch.zeros(2, 60)  # two more keys in the 64-entry class
    for model in models:
        model["more"], model["again"] = torch.randn(5, 50, generator=gen), torch.randn(2, 60, generator=gen)
    expected = merge(base, models, method="breadcrumbs", backend="torch", gamma=0.1, beta=0.4)
    grids, kernel = [], kb.breadcrumbs_kernel

    class Counting:
        def __getitem__(self, grid):
            grids.append(grid)
            return kernel[grid]

    monkeypatch.setattr(kb, "breadcrumbs_kernel", Counting())
    got = merge(base, models, method="breadcrumbs", backend="triton", gamma=0.1, beta=0.4)
    assert all(torch.equal(got[k], expected[k]) for k in base)
    # 8 keys in 3 row classes: 128 entries (rows of 1, 7, 50 and 60, the scalar), 512 (300), 2048 (1100)
    assert len(grids) == 3, grids
    monkeypatch.setattr(kb, "ROW_MAX", 64)
    got = merge(base, models, method="breadcrumbs", backend="triton", gamma=0.1, beta=0.4)
    assert all(torch.equal(got[k], expected[k]) for k in base)
    # float64 models on the torch path too: theta in float64, as the CPU forms it (it was rounded to float32)
    extra = {k: 1e-9 * torch.rand(v.shape, generator=gen, dtype=torch.float64) for k, v in base.items()}  # not float32
    wide = {k: v.double() + extra[k] for k, v in base.items()}, [{k: v.double() for k, v in m.items()} for m in models]
    got = merge(*wide, method="breadcrumbs", backend="triton", gamma=0.1, beta=0.4)
    expected = merge(*wide, method="breadcrumbs", backend="torch", gamma=0.1, beta=0.4)
    assert all(torch.equal(got[k], expected[k]) for k in base)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_breadcrumbs_long_rows_read_in_chunks(gen, monkeypatch, dtype):
    """Rows longer than a program holds (ROW_MAX lowered to 64 here) run through the long-row kernel,
    read LONG_CHUNK entries at a time (lowered to 128: ties at both bounds span chunks): every entry,
    the kept counts and the NaN/Inf report equal the CPU engine's. (Before, such rows took torch
    operations with two host synchronisations per key and task.)"""
    from pcb_fast.kernels import breadcrumbs as kb

    monkeypatch.setattr(kb, "ROW_MAX", 64)
    monkeypatch.setattr(kb, "LONG_CHUNK", 128)
    monkeypatch.setattr(kb, "LONG_BATCH", 3)  # several launches per key, one scratch buffer
    launches = []
    kernel = kb.long_rows_kernel

    class Counting:
        def __getitem__(self, grid):
            launches.append(grid)
            return kernel[grid]

    monkeypatch.setattr(kb, "long_rows_kernel", Counting())
    base, models = _breadcrumbs_models(gen, dtype)
    for gamma, beta in [(0.05, 0.3), (0.0, 1.0), (0.2, 0.1)]:
        report_triton, report_torch = {}, {}
        kwargs = dict(method="breadcrumbs", gamma=gamma, beta=beta, lambdas=[0.5, 1.0, 1.5], lam=0.7)
        got = merge(base, models, backend="triton", report=report_triton, **kwargs)
        expected = merge(base, models, backend="torch", report=report_torch, **kwargs)
        for key in base:
            assert torch.equal(got[key], expected[key]), (key, gamma, beta)
        assert report_triton["kept"] == report_torch["kept"]
    assert launches  # the rows of 300 and 1100 entries took the long-row kernel
    models[1]["wide"][1, 1000] = float("inf")
    with pytest.raises(ValueError, match="model 1, key 'wide': contains NaN or Inf"):
        merge(base, models, method="breadcrumbs", backend="triton")


def test_breadcrumbs_kernel_names_a_bad_value(gen):
    base, models = _breadcrumbs_models(gen)
    models[2]["rows"][4, 9] = float("nan")
    with pytest.raises(ValueError, match="model 2, key 'rows': contains NaN or Inf"):
        merge(base, models, method="breadcrumbs", backend="triton")


def test_sample_columns_gather_what_torch_indexing_gathers(gen):
    """kernels.tiles.sample_columns (the brackets' column sample, one launch per Segments) against torch
    indexing: strided columns of parts of two dtypes, tau = theta - base rounded as the torch form
    rounds it, parts that give no column."""
    from pcb_fast.kernels.tiles import Rows, sample_columns, segment

    n = 3
    shapes = {"a": (3000,), "b": (5,), "c": (1100,), "d": (4096,)}
    dtypes = {"a": torch.float32, "b": torch.float32, "c": torch.bfloat16, "d": torch.bfloat16}
    base = {k: torch.randn(s, generator=gen).to(dtypes[k]) for k, s in shapes.items()}
    models = [{k: (v.float() + 0.01 * torch.randn(v.shape, generator=gen)).to(v.dtype) for k, v in base.items()}
              for _ in range(n)]
    parts = [Rows.from_tensors([m[k] for m in models], base=base[k]) for k in shapes]
    picks = [(2, 17, 176), (7, 17, 0), (0, 1, 1100), (5, 1000, 5)]
    got = sample_columns(segment(parts), picks, n, torch.device("cpu"))
    expected = []
    for k, (first, stride, count) in zip(shapes, picks):
        index = torch.arange(first, first + stride * count, stride)[:count]
        expected.append(torch.stack([m[k][index].float() for m in models]) - base[k][index].float())
    assert torch.equal(got, torch.cat(expected, 1))
