"""Models of many small tensors (docs/design.md 3.7): runs of small keys share a block (packs) for
the methods whose values do not depend on where a key begins, read and written in a few calls; every
output byte is that of the merge without packs, and errors still name the key."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import pcb_fast
from pcb_fast.core import sources
from pcb_fast.io import safetensors as st
from pcb_fast.io.folder import save_model

MIXED = {  # dtypes by key, in key order: runs of small bf16 keys, a float32 one, a large one, an integer one
    **{f"a.{i:03d}": torch.bfloat16 for i in range(120)}, "b.norm": torch.float32,
    **{f"c.{i:03d}": torch.bfloat16 for i in range(80)}, "d.big": torch.bfloat16, "d.count": torch.int64,
    **{f"e.{i:03d}": torch.float16 for i in range(60)},
}


def _models(folder, n=3, seed=0, bad=None):
    """A base and ``n`` fine-tunes of MIXED (1 to 5 entries per key; d.big 3000), as safetensors files
    (the library lays out its keys by dtype, then name); ``bad``: (model, key) given a NaN."""
    g = torch.Generator().manual_seed(seed)
    shapes = {k: ((3000,) if k == "d.big" else (1 + i % 5,)) for i, k in enumerate(MIXED)}
    base = {k: (torch.randn(s, generator=g) if MIXED[k].is_floating_point else torch.arange(s[0])).to(MIXED[k])
            for k, s in shapes.items()}
    paths = []
    for j in range(n + 1):
        state = base if j == 0 else {k: (v.float() + 0.05 * torch.randn(v.shape, generator=g)).to(v.dtype)
                                    if v.is_floating_point() else v for k, v in base.items()}
        if bad is not None and bad[0] == j:
            state = dict(state)
            state[bad[1]] = state[bad[1]].clone()
            state[bad[1]][-1] = float("nan")
        path = folder / f"m{j}.safetensors"
        save_file(state, str(path))
        paths.append(str(path))
    return paths[0], paths[1:]


def _saved(folder, base, models) -> list:
    """The paths of ``base`` and ``models`` saved as safetensors files in ``folder``."""
    paths = []
    for j, state in enumerate([base] + models):
        paths.append(str(folder / f"m{j}.safetensors"))
        save_file(state, paths[-1])
    return paths


def _unpacked(monkeypatch):
    monkeypatch.setattr(sources, "pack_segments", lambda segments, width, signatures: list(segments))


def _packed_and_alone(tmp_path, monkeypatch, base, models, **kwargs) -> list:
    """The output files (name -> bytes) of merge_checkpoints with packs of small keys, then without
    (each in its own folder named "merged": the model card names the folder)."""
    outputs = []
    for packed in (True, False):
        if not packed:
            _unpacked(monkeypatch)
        (tmp_path / str(packed)).mkdir()
        out = tmp_path / str(packed) / "merged"
        pcb_fast.merge_checkpoints(base, models, out, **kwargs)
        outputs.append({f.name: f.read_bytes() for f in out.iterdir()})
    return outputs


CASES = [("task_arithmetic", {}), ("average", {}), ("ties", {"density": 0.3}), ("ties", {"topk": "exact", "sign_ties": "positive"}),
         ("pcb", {"ratio": 0.2}), ("pcb", {"ratio": 0.2, "inter": "normalized_sum"}), ("pcb", {"inter": "pairwise"}),
         ("pcb", {"variant": "paper"}), ("dare_ties", {"p": 0.5}), ("breadcrumbs", {}),
         ("dare", {"p": [0.2, 0.6, 0.9], "rescale": "none", "lambdas": [0.5, -1.0, 2.0], "fused": "off"}),
         ("dare", {"p": 0.5, "rescale": "l1"}), ("dare_ties", {"p": 0.3, "sign_ties": "positive", "normalize": False})]


@pytest.mark.parametrize("method,params", CASES)
@pytest.mark.parametrize("budget", [None, "2KB"])
def test_packs_change_no_byte(tmp_path, monkeypatch, method, params, budget):
    base, models = _models(tmp_path)
    outputs = _packed_and_alone(tmp_path, monkeypatch, base, models, method=method, max_memory=budget, shard_size="2KB",
                                **params)
    assert outputs[0] == outputs[1]


@pytest.mark.parametrize("method", ["task_arithmetic", "pcb"])
def test_packs_over_sharded_inputs_change_no_byte(tmp_path, monkeypatch, method):
    # the keys of a pack lie in several shards of each input (folders written with 1 KB shards)
    files = _models(tmp_path)
    folders = []
    for i, path in enumerate([files[0]] + files[1]):
        folders.append(str(save_model(load_file(path), tmp_path / f"in{i}", shard_size="1KB")))
    outputs = _packed_and_alone(tmp_path, monkeypatch, folders[0], folders[1:], method=method)
    assert outputs[0] == outputs[1]


def test_a_model_of_small_keys_is_read_and_written_in_few_calls(tmp_path, monkeypatch):
    base, models = _models(tmp_path)
    reads, writes = [], []
    read, pwrite = st.read_exactly, st.ShardedWriter._pwrite
    monkeypatch.setattr(st, "read_exactly", lambda fd, out, at, *rest: reads.append(at) or read(fd, out, at, *rest))
    monkeypatch.setattr(st.ShardedWriter, "_pwrite", staticmethod(lambda fd, view, at: writes.append(at) or pwrite(fd, view, at)))
    pcb_fast.merge_checkpoints(base, models, tmp_path / "out", method="task_arithmetic")
    # 262 merged keys in 4 inputs: one read per run of keys that lie together in a file, not one per key
    assert len(reads) < 40 and len(writes) < 20, (len(reads), len(writes))
    merged = load_file(str(tmp_path / "out" / "model.safetensors"))
    inputs = [load_file(p) for p in [base] + models]
    for key, value in merged.items():
        expected = inputs[0][key] if not value.is_floating_point() else (
            inputs[0][key].float() + sum(m[key].float() - inputs[0][key].float() for m in inputs[1:])).to(value.dtype)
        assert torch.equal(value, expected), key


@pytest.mark.parametrize("method", ["task_arithmetic", "pcb", "ties"])
@pytest.mark.parametrize("bad,named", [((2, "c.041"), "model 1 .*key 'c.041'"), ((0, "a.017"), "base model, key 'a.017'")])
def test_a_value_that_is_not_finite_is_named_by_its_key(tmp_path, method, bad, named):
    base, models = _models(tmp_path, bad=bad)
    with pytest.raises(ValueError, match=named):
        pcb_fast.merge_checkpoints(base, models, tmp_path / "out", method=method)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method", ["task_arithmetic", "pcb"])
def test_an_overflow_of_the_output_dtype_is_named_by_its_key(tmp_path, method):
    base, models = _models(tmp_path)
    for path in [base] + models:  # one small key of a pack beyond float16's range in every model
        state = load_file(path)
        state["c.041"] = torch.full_like(state["c.041"], 1e5)
        save_file(state, path)
    with pytest.raises(ValueError, match=r"key 'c.041': merged values up to 9.98e\+04 exceed the range of torch.float16"):
        pcb_fast.merge_checkpoints(base, models, tmp_path / "out", method=method, dtype="float16")
    assert not (tmp_path / "out").exists()


def test_packs_join_only_small_keys_of_one_dtype_in_every_input():
    segments = sources.segments_of(["a", "b", "c", "d", "e", "f"], {"a": (2,), "b": (3,), "c": (9,), "d": (1,),
                                                                    "e": (2,), "f": (2,)}.get)
    kinds = {"a": 1, "b": 1, "c": 1, "d": 1, "e": 2, "f": 2}
    packed = sources.pack_segments(segments, 8, [kinds[seg.key] for seg in segments])
    assert [seg.key for seg in packed] == [("a", "b"), "c", "d", ("e", "f")]  # c does not fit 8; e, f differ from d
    assert [seg.offset for seg in packed] == [0, 5, 14, 15] and packed[0].numel == 5
    assert packed[3].pieces(0, 4) == [(segments[4], 0, 2, 0, 2), (segments[5], 0, 2, 2, 4)]


def test_header_text_is_json_dumps():
    keys = ["a", 'q"uote', "back\\slash", "ctl\x01", "é", "\U0001f600", "del\x7f"]
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.bool, torch.uint8, torch.float64]
    shapes = [(2, 3), (), (0,), (1,), (4, 1, 1), (7,), (1,)]
    sizes = [dtype.itemsize * __import__("math").prod(shape) for dtype, shape in zip(dtypes, shapes)]
    ends = list(__import__("itertools").accumulate(sizes))
    begins = [0] + ends[:-1]
    metadata = {"format": "pt", "p": '{"x": "é"}'}
    header = {k: {"dtype": st.NAMES[d], "shape": list(s), "data_offsets": [b, e]}
              for k, d, s, b, e in zip(keys, dtypes, shapes, begins, ends)}
    header["__metadata__"] = metadata
    assert st._header_text(keys, dtypes, shapes, begins, ends, metadata) == json.dumps(header, separators=(",", ":"))
    plain = keys[:1] + ["b.c"]
    header = {k: {"dtype": "F32", "shape": [1], "data_offsets": [4 * i, 4 * i + 4]} for i, k in enumerate(plain)}
    header["__metadata__"] = {}
    assert st._header_text(plain, [torch.float32] * 2, [(1,)] * 2, [0, 4], [4, 8], {}) == json.dumps(header, separators=(",", ":"))


def _tied_states(n=3, seed=1):
    """A base and ``n`` fine-tunes of MIXED in memory whose changes are multiples of 1/4: magnitudes tie
    at the thresholds and task vectors cancel (zero sums), so every TIES rule is exercised."""
    g = torch.Generator().manual_seed(seed)
    shapes = {k: ((3000,) if k == "d.big" else (1 + i % 5,)) for i, k in enumerate(MIXED)}
    base = {k: (torch.randn(s, generator=g) if MIXED[k].is_floating_point else torch.arange(s[0])).to(MIXED[k])
            for k, s in shapes.items()}
    models = [{k: (v.float() + torch.randint(-2, 3, v.shape, generator=g) / 4).to(v.dtype) if v.is_floating_point()
               else v for k, v in base.items()} for _ in range(n)]
    models[0]["c.007"] = base["c.007"].clone()  # an all-zero task vector in one tensor
    return base, models


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8),
                                                                       b.reshape(-1).view(torch.uint8))


TENSOR_CASES = [{"density": 0.3}, {"density": 0.5, "topk": "exact", "sign_ties": "positive", "min_keep": 1},
                {"density": [0.2, 0.6, 1.0], "topk": "exact"}, {"density": 1.0, "topk": "exact", "min_keep": 1},
                {"density": 0.4, "normalize": False, "lambdas": [0.5, -1.0, 2.0]}, {"density": 0.01}]


DARE_TIES_CASES = [{"p": 0.5}, {"p": 0.3, "rescale": "l1", "sign_ties": "positive", "normalize": False},
                   {"p": [0.2, 0.6, 0.9], "rescale": "none", "seed": 7, "lambdas": [0.5, -1.0, 2.0]},
                   {"p": 0.5, "rescale": "l1", "normalize": True, "lambdas": [1.0, 2.0, 3.0]}]
DARE_CASES = [{"p": 0.5}, {"p": [0.2, 0.6, 0.9], "rescale": "l1", "seed": 3},
              {"p": 0.3, "rescale": "none", "normalize": True, "lambdas": [0.5, -1.0, 2.0]}]


PCB_CASES = [{"ratio": 0.2}, {"ratio": 0.5, "clamp_ratio": 0.2, "lambdas": [0.5, -1.0, 2.0]},
             {"ratio": 0.3, "inter": "normalized_sum", "fused": "off"}, {"ratio": 1.0, "inter": "pairwise"},
             {"variant": "paper"}]


@pytest.mark.parametrize("method,params", [("ties", c) for c in TENSOR_CASES] + [("dare_ties", c) for c in DARE_TIES_CASES]
                         + [("dare", c) for c in DARE_CASES] + [("pcb", c) for c in PCB_CASES])
def test_tensor_packs_change_no_byte_in_memory(monkeypatch, method, params):
    # scope="tensor": each small key of a pack gets the values of its merge alone, bit for bit
    base, models = _tied_states()
    reports = {}, {}
    packed = pcb_fast.merge(base, models, method=method, scope="tensor", report=reports[0], **params)
    _unpacked(monkeypatch)
    alone = pcb_fast.merge(base, models, method=method, scope="tensor", report=reports[1], **params)
    assert all(_same_bits(packed[key], alone[key]) for key in base)
    assert reports[0]["kept"] == reports[1]["kept"]


@pytest.mark.parametrize("method,params", [("ties", TENSOR_CASES[0]), ("ties", TENSOR_CASES[1]),
                                           ("dare_ties", DARE_TIES_CASES[1]), ("dare", {"p": 0.5, "rescale": "l1"}),
                                           ("pcb", PCB_CASES[0]), ("pcb", PCB_CASES[2])])
def test_tensor_packs_change_no_byte_from_files(tmp_path, monkeypatch, method, params):
    paths = _saved(tmp_path, *_tied_states())
    outputs = _packed_and_alone(tmp_path, monkeypatch, paths[0], paths[1:], method=method, scope="tensor",
                                shard_size="2KB", **params)
    assert outputs[0] == outputs[1]


def test_tensor_packs_follow_parameters_that_vary_by_tensor(monkeypatch):
    # runs of keys with the same parameters share a pack; a key whose own parameters differ is alone
    def segment_params(key):
        own = {"density": 0.7 if key.startswith("a.0") else 0.3}
        if key.endswith("5"):
            own.update(lam=0.5, lambdas=[1.0, 2.0, 0.5])
        return own

    base, models = _tied_states()
    packed = pcb_fast.merge(base, models, method="ties", scope="tensor", segment_params=segment_params)
    _unpacked(monkeypatch)
    alone = pcb_fast.merge(base, models, method="ties", scope="tensor", segment_params=segment_params)
    assert all(_same_bits(packed[key], alone[key]) for key in base)


@pytest.mark.parametrize("method", ["task_arithmetic", "average"])
def test_weighted_sums_per_tensor_with_parameters_that_vary_by_tensor_in_packs(monkeypatch, method):
    def segment_params(key):
        return {"lambdas": [1.0, 2.0, 0.5] if key.startswith("c") else [0.3, 0.3, 0.4], "lam": 0.5 if "9" in key else 1.0}

    base, models = _tied_states()
    # blocks narrower than most packs: packs no wider than a block
    packed = pcb_fast.merge(base, models, method=method, scope="tensor", segment_params=segment_params, block_width=16)
    _unpacked(monkeypatch)
    alone = pcb_fast.merge(base, models, method=method, scope="tensor", segment_params=segment_params, block_width=16)
    assert all(_same_bits(packed[key], alone[key]) for key in base)


@pytest.mark.parametrize("params", [{"ratio": 0.3, "clamp_ratio": 0.1}, {"ratio": 0.2, "inter": "normalized_sum"}])
def test_pcb_tensor_packs_equal_the_reference(params):
    # the reference scores each tensor alone by sorts (pcb_fast.reference): the values of a pack, bit for bit
    base, models = _tied_states()
    models[1] = {k: (v.float() + 0.01 * torch.arange(v.numel()).reshape(v.shape)).to(v.dtype) if v.is_floating_point()
                 else v for k, v in models[1].items()}  # fewer ties
    packed = pcb_fast.merge(base, models, method="pcb", scope="tensor", **params)
    expected = pcb_fast.merge(base, models, method="pcb", scope="tensor", backend="reference", **params)
    assert all(_same_bits(packed[key], expected[key]) for key in base)


@pytest.mark.parametrize("method", ["ties", "dare_ties", "dare", "task_arithmetic", "pcb", "breadcrumbs"])
def test_tensor_scope_merges_runs_of_small_keys_together(monkeypatch, method):
    base, models = _tied_states()
    views = []
    restrict = sources.TaskVectorSource.restrict
    monkeypatch.setattr(sources.TaskVectorSource, "restrict", lambda self, seg: views.append(seg) or restrict(self, seg))
    pcb_fast.merge(base, models, method=method, scope="tensor")
    # 261 merged keys: a.* (bf16), b.norm (fp32), c.* and d.big (bf16), e.* (fp16): four parts, not 261
    assert [seg.key for seg in views] == [("a.000", "a.119"), "b.norm", ("c.000", "d.big"), ("e.000", "e.059")]


@pytest.mark.parametrize("method,params", [("task_arithmetic", {}), ("dare", {"p": 0.5}), ("dare_ties", {"p": 0.5}),
                                           ("breadcrumbs", {}), ("breadcrumbs", {"band": "tensor"})])
def test_a_global_merge_in_memory_reads_small_keys_in_packs(monkeypatch, method, params):
    base, models = _tied_states()
    planned = []
    plan = sources.TaskVectorSource.plan

    def plan_noted(self, *args, **kwargs):
        ranges = plan(self, *args, **kwargs)
        planned.extend(seg for seg, _, _ in ranges)
        return ranges

    monkeypatch.setattr(sources.TaskVectorSource, "plan", plan_noted)
    pcb_fast.merge(base, models, method=method, **params)
    # the packs of test_tensor_scope_merges_runs_of_small_keys_together (in every pass), no key alone
    assert {seg.key for seg in planned} == {("a.000", "a.119"), "b.norm", ("c.000", "d.big"), ("e.000", "e.059")}


DARE_GLOBAL_CASES = [("dare", {"p": 0.5}), ("dare", {"p": [0.2, 0.6, 0.9], "rescale": "none", "normalize": True}),
                     ("dare", {"p": 0.5, "fused": "off", "lambdas": [0.5, -1.0, 2.0]}),
                     ("dare_ties", {"p": 0.5}), ("dare_ties", {"p": 0.3, "sign_ties": "positive", "normalize": False,
                                                               "lambdas": [1.0, 2.0, 3.0]}),
                     ("dare_ties", {"p": 0.4, "fused": "off"})]


@pytest.mark.parametrize("method,params", [("task_arithmetic", {}), ("pcb", {"ratio": 0.2}), ("ties", {"density": 0.3}),
                                           ("average", {"lambdas": [1.0, 2.0, 3.0]}), *DARE_GLOBAL_CASES])
def test_global_packs_in_memory_change_no_byte(monkeypatch, method, params):
    base, models = _tied_states()
    packed = pcb_fast.merge(base, models, method=method, **params)
    _unpacked(monkeypatch)
    alone = pcb_fast.merge(base, models, method=method, **params)
    assert all(_same_bits(packed[key], alone[key]) for key in base)


def test_an_overflow_inside_a_pack_in_memory_is_named_by_its_key():
    base, models = _tied_states()
    base["e.041"] = torch.full_like(base["e.041"], 6e4)
    for state in models:  # float16: 6e4 + 3 * 3000 is beyond its range
        state["e.041"] = torch.full_like(state["e.041"], 6.3e4)
    with pytest.raises(ValueError, match=r"key 'e.041': merged values up to 6.9e\+04 exceed the range of torch.float16"):
        pcb_fast.merge(base, models, method="task_arithmetic")


@pytest.mark.parametrize("bad,named", [((2, "c.041"), "model 1 .*key 'c.041'"), ((0, "a.017"), "base model, key 'a.017'")])
def test_a_value_that_is_not_finite_in_a_tensor_pack_is_named_by_its_key(tmp_path, bad, named):
    base, models = _models(tmp_path, bad=bad)
    with pytest.raises(ValueError, match=named):
        pcb_fast.merge_checkpoints(base, models, tmp_path / "out", method="ties", scope="tensor")
    assert not (tmp_path / "out").exists()


def test_inputs_with_the_same_header_share_one_parse(tmp_path, monkeypatch):
    base, models = _models(tmp_path)  # the fine-tunes' headers are the base's, byte for byte
    parses = []
    parse = st.header_columns
    monkeypatch.setattr(st, "header_columns", lambda raw, size: parses.append(size) or parse(raw, size))
    pcb_fast.merge_checkpoints(base, models, tmp_path / "out", method="ties", density=0.3)
    assert len(parses) == 1
    inputs = [load_file(p) for p in [base] + models]
    expected = pcb_fast.merge(inputs[0], inputs[1:], method="ties", density=0.3)
    assert all(_same_bits(t, expected[k]) for k, t in load_file(str(tmp_path / "out" / "model.safetensors")).items())


def test_a_truncated_input_with_the_base_header_is_refused(tmp_path):
    base, models = _models(tmp_path)
    with open(models[1], "r+b") as f:  # the same header bytes, a shorter file
        f.truncate(f.seek(0, 2) - 2)
    with pytest.raises(ValueError, match="model 1 .*truncated or corrupt"):
        pcb_fast.merge_checkpoints(base, models, tmp_path / "out", method="task_arithmetic")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_a_bad_base_value_among_many_small_keys_in_memory_is_named(dtype):
    base, models = _tied_states()
    base["c.041"] = base["c.041"].to(dtype)
    base["c.041"][-1] = float("nan") if dtype == torch.bfloat16 else 1e300
    models = [dict(m, **{"c.041": m["c.041"].to(dtype)}) for m in models]
    with pytest.raises(ValueError, match="base model, key 'c.041' (contains NaN|holds values beyond the float32)"):
        pcb_fast.merge(base, models, method="task_arithmetic")


def _small_matrices(n=3, seed=2):
    """A base and ``n`` fine-tunes of many small 2-D and 1-D float32 tensors (and one of 2400 entries)
    whose changes are multiples of 1/4: magnitudes tie at every band's bounds."""
    g = torch.Generator().manual_seed(seed)
    shapes = {f"m.{i:03d}": [(2, 3), (3, 4), (4,), (2, 5), (5, 2), (2, 2)][i % 6] for i in range(90)}
    shapes["z.big"] = (40, 60)
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    models = [{k: v + torch.randint(-2, 3, v.shape, generator=g) / 4 for k, v in base.items()} for _ in range(n)]
    return base, models


@pytest.mark.parametrize("params", [
    {"gamma": 0.2, "beta": 0.6}, {"gamma": 0.25, "beta": 0.5, "normalize": True, "lambdas": [0.5, -1.0, 2.0]},
    {"gamma": 0.1, "beta": 0.5, "scope": "tensor", "block_width": 64},
    {"gamma": [0.1, 0.3, 0.0], "beta": [0.5, 0.2, 1.0], "band": "tensor"},
    {"gamma": 0.2, "beta": 0.5, "band": "tensor", "scope": "tensor", "lambdas": [1.0, 2.0, 3.0]}])
def test_breadcrumbs_packs_change_no_byte(monkeypatch, params):
    # each row (band "row") or tensor ("tensor") of a pack of small keys gets its band alone, ties by position
    base, models = _small_matrices()
    reports = {}, {}
    packed = pcb_fast.merge(base, models, method="breadcrumbs", report=reports[0], **params)
    _unpacked(monkeypatch)
    alone = pcb_fast.merge(base, models, method="breadcrumbs", report=reports[1], **params)
    assert all(_same_bits(packed[key], alone[key]) for key in base)
    assert reports[0]["kept"] == reports[1]["kept"] and sum(reports[0]["kept"]) > 0


@pytest.mark.parametrize("params", [{"gamma": 0.2, "beta": 0.6}, {"gamma": 0.1, "beta": 0.4, "band": "tensor"}])
@pytest.mark.parametrize("scope", ["global", "tensor"])
def test_breadcrumbs_packs_from_files_change_no_byte(tmp_path, monkeypatch, params, scope):
    paths = _saved(tmp_path, *_small_matrices())
    outputs = _packed_and_alone(tmp_path, monkeypatch, paths[0], paths[1:], method="breadcrumbs", scope=scope,
                                **params)
    assert outputs[0] == outputs[1]


def test_shards_take_the_most_keys_that_fit():
    # shard_plan: in order, each shard the most entries that fit the shard size, a larger tensor alone
    g = torch.Generator().manual_seed(4)
    entries = [(f"k{i}", torch.bfloat16, (int(n),)) for i, n in enumerate(torch.randint(0, 9, (300,), generator=g))]
    for shard_size in (1, 2, 7, 16, 100, 10**6):
        shards, current, used = [], [], 0
        for entry in entries:
            size = 2 * entry[2][0]
            if current and used + size > shard_size:
                shards.append(current)
                current, used = [], 0
            current.append(entry)
            used += size
        assert st.shard_plan(entries, shard_size) == shards + [current], shard_size


def test_passes_of_whole_tensors_pack_small_keys_only(monkeypatch):
    # Breadcrumbs' tensor band reads blocks as wide as the largest tensor; its packs stay small (a pack's
    # band takes a sort of its entries, a large tensor alone two selections)
    g = torch.Generator().manual_seed(5)
    big = sources.MAX_PACK_WIDTH
    shapes = {"a.big": (big + 1000,), "b.0": (big - 100,), "b.1": (200,), "c.0": (3,), "c.1": (5,)}
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    models = [{k: v + torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(2)]
    reads = []
    read = sources.StateDictSource._read
    monkeypatch.setattr(sources.StateDictSource, "_read", lambda self, seg, *rest: reads.append(seg) or read(self, seg, *rest))
    packed = pcb_fast.merge(base, models, method="breadcrumbs", band="tensor", gamma=0.1, beta=0.5)
    assert max(seg.numel for seg in reads if seg.parts) <= sources.MAX_PACK_WIDTH
    _unpacked(monkeypatch)
    alone = pcb_fast.merge(base, models, method="breadcrumbs", band="tensor", gamma=0.1, beta=0.5)
    assert all(_same_bits(packed[key], alone[key]) for key in base)


def test_global_dare_ties_packs_from_files_patched_where_the_fill_is_negative(tmp_path, monkeypatch):
    # the zero sums' fill guessed +1 turns out -1 here: the undecided entries of packs are patched too
    base, models = _tied_states(seed=3)
    models = [{k: (2 * base[k].float() - v.float()).to(v.dtype) if v.is_floating_point() else v for k, v in m.items()}
              for m in models]  # (the task vectors negated)
    paths = _saved(tmp_path, base, models)
    outputs = _packed_and_alone(tmp_path, monkeypatch, paths[0], paths[1:], method="dare_ties", p=0.5,
                                shard_size="2KB")
    assert outputs[0] == outputs[1]
