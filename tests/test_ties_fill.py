"""TIES' and DARE-TIES' sign of zero sums (the fill) when the fused sweep guesses it wrong: the entries
that depend on it are patched into the output (files and memory, global and per tensor), with no
pass over the blocks again; the bits are those of a right guess and of the eager engine."""

import functools

import pytest
import torch

import pcb_fast
from pcb_fast.core.sources import CachedSource, TaskVectorSource
from pcb_fast.io.safetensors import PATCH_GAP, ShardedWriter
from pcb_fast.io.write_behind import WriteBehind
from pcb_fast.methods import ties


def cancelling_models(dtype=torch.bfloat16, seed=0):
    """A small Llama-like base and two fine-tunes whose task vectors cancel exactly at a third of the
    entries and are both negative elsewhere (a clear negative majority: the fill is -1). Values are
    multiples of 1/128 in [1, 2) in magnitude, exact in bfloat16."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"embed.weight": (128, 160), "layers.0.q.weight": (32, 32), "layers.0.norm.weight": (32,),
              "layers.1.q.weight": (32, 32), "layers.1.norm.weight": (32,), "head.weight": (96, 128)}
    base, tunes = {}, [{}, {}]
    for key, shape in shapes.items():
        b = (torch.randint(160, 224, shape, generator=g) / 128) * (torch.randint(0, 2, shape, generator=g) * 2 - 1)
        d, e0, e1 = (torch.randint(1, 32, shape, generator=g) / 128 for _ in range(3))  # (|b +- d| stays in [1, 2))
        cancel = torch.rand(shape, generator=g) < 1 / 3
        base[key] = b.to(dtype)
        tunes[0][key] = torch.where(cancel, b + d, b - e0).to(dtype)
        tunes[1][key] = torch.where(cancel, b - d, b - e1).to(dtype)
    return base, tunes


def save(folder, base, tunes):
    from safetensors.torch import save_file

    paths = []
    for name, state in [("base", base)] + [(f"m{i}", t) for i, t in enumerate(tunes)]:
        (folder / name).mkdir()
        save_file(state, str(folder / name / "model.safetensors"))
        paths.append(str(folder / name))
    return paths[0], paths[1:]


@pytest.fixture
def passes(monkeypatch):
    """The passes over the task vectors a merge makes (each call of a source's ``blocks``)."""
    calls = []
    for cls in (TaskVectorSource, CachedSource):
        real = cls.blocks
        monkeypatch.setattr(cls, "blocks", functools.partialmethod(
            lambda self, *a, _real=real, **k: calls.append(1) or _real(self, *a, **k)))
    return calls


def force_guess(monkeypatch, fill: float):
    """The sweep of TIES (which guesses from its sample) and DARE-TIES (+1) guesses ``fill``."""
    real = ties.sweep_with_fill

    def sweep(source, options, sink, merge_block, sign_ties, block_width, guess=None):
        real(source, options, sink, merge_block, sign_ties, block_width, torch.tensor(fill))

    monkeypatch.setattr(ties, "sweep_with_fill", sweep)


METHODS = [("ties", dict(density=0.9)), ("ties", dict(density=1.0, topk="exact")), ("dare_ties", dict(p=0.0))]


@pytest.mark.parametrize("method,params", METHODS)
@pytest.mark.parametrize("scope", ["global", "tensor"])
def test_a_wrong_fill_guess_is_patched_into_the_files_without_another_pass(tmp_path, monkeypatch, passes, method,
                                                                          params, scope):
    base, tunes = cancelling_models()
    base_path, paths = save(tmp_path, base, tunes)
    outputs, counts = {}, {}
    for fill in (-1.0, 1.0):  # right, then wrong
        with monkeypatch.context() as m:
            force_guess(m, fill)
            passes.clear()
            out = tmp_path / f"out{fill}"
            pcb_fast.merge_checkpoints(base_path, paths, out, method=method, scope=scope, block_width=4096, **params)
            outputs[fill], counts[fill] = (out / "model.safetensors").read_bytes(), len(passes)
    eager = tmp_path / "eager"
    pcb_fast.merge_checkpoints(base_path, paths, eager, method=method, scope=scope, block_width=4096, fused="off",
                               **params)
    assert outputs[1.0] == outputs[-1.0] == (eager / "model.safetensors").read_bytes()
    assert counts[1.0] == counts[-1.0]


@pytest.mark.parametrize("method,params", METHODS)
@pytest.mark.parametrize("scope", ["global", "tensor"])
def test_a_wrong_fill_guess_is_patched_in_memory_without_another_pass(monkeypatch, passes, method, params, scope):
    base, tunes = cancelling_models(torch.float32, seed=1)
    merged, counts = {}, {}
    for fill in (-1.0, 1.0):
        with monkeypatch.context() as m:
            force_guess(m, fill)
            passes.clear()
            merged[fill] = pcb_fast.merge(base, tunes, method=method, scope=scope, block_width=4096, **params)
            counts[fill] = len(passes)
    eager = pcb_fast.merge(base, tunes, method=method, scope=scope, block_width=4096, fused="off", **params)
    for key in base:
        assert torch.equal(merged[1.0][key].view(torch.int32), merged[-1.0][key].view(torch.int32)), key
        assert torch.equal(merged[1.0][key], eager[key]), key
    assert counts[1.0] == counts[-1.0]
    if params.get("density", 1.0) < 1.0:
        return
    # every entry kept: the cancelling entries took the negative majority's side (the negative entry)
    changed = merged[1.0]["embed.weight"] - base["embed.weight"]
    cancels = (tunes[0]["embed.weight"] + tunes[1]["embed.weight"] == 2 * base["embed.weight"]) & (
        tunes[0]["embed.weight"] != base["embed.weight"])
    assert cancels.any() and (changed[cancels] < 0).all()


def balanced_models():
    """A base and two fine-tunes whose elected signs sum to zero in every tensor (the fill is then 0,
    which elects as -1 does: the negative entries agree): a third of the entries cancel, a third are
    positive in both task vectors, a third negative."""
    g = torch.Generator().manual_seed(3)
    base, tunes = {}, [{}, {}]
    for key, shape in {"a.weight": (96, 160), "b.weight": (48, 96)}.items():
        b = torch.randint(160, 224, shape, generator=g) / 128
        d = torch.randint(1, 32, shape, generator=g) / 128
        kind = torch.arange(b.numel()).reshape(shape) % 3  # 0: cancel, 1: positive, 2: negative
        base[key] = b
        tunes[0][key] = torch.where(kind == 0, b + d, torch.where(kind == 1, b + d, b - d))
        tunes[1][key] = torch.where(kind == 0, b - d, torch.where(kind == 1, b + d / 2, b - d / 2))
    return base, tunes


@pytest.mark.parametrize("scope", ["global", "tensor"])
def test_a_zero_fill_guessed_either_way_gives_the_eager_values(monkeypatch, scope):
    base, tunes = balanced_models()
    eager = pcb_fast.merge(base, tunes, method="ties", density=1.0, scope=scope, block_width=4096, fused="off")
    for fill in (-1.0, 1.0):
        with monkeypatch.context() as m:
            force_guess(m, fill)
            merged = pcb_fast.merge(base, tunes, method="ties", density=1.0, scope=scope, block_width=4096)
        for key in base:
            assert torch.equal(merged[key], eager[key]), (fill, key)
    cancels = torch.arange(base["a.weight"].numel()).reshape(base["a.weight"].shape) % 3 == 0
    assert torch.equal(eager["a.weight"][cancels], tunes[1]["a.weight"][cancels])  # the negative entry


@pytest.mark.parametrize("method,params", METHODS[::2])
def test_patches_beyond_the_memory_budget_merge_those_blocks_again(tmp_path, monkeypatch, passes, method, params):
    """Where the values under the other fill would not fit the budget, the blocks that hold such
    entries are read, merged and written again (one more pass, over those blocks only): the same bytes."""
    base, tunes = cancelling_models(seed=2)
    base_path, paths = save(tmp_path, base, tunes)
    outputs, counts = [], []
    for max_memory in (None, 1):
        with monkeypatch.context() as m:
            force_guess(m, 1.0)
            passes.clear()
            out = tmp_path / f"out{max_memory}"
            pcb_fast.merge_checkpoints(base_path, paths, out, method=method, block_width=4096, max_memory=max_memory,
                                       **params)
            outputs.append((out / "model.safetensors").read_bytes())
            counts.append(len(passes))
    assert outputs[0] == outputs[1]
    assert counts[1] == counts[0] + 1


@pytest.mark.parametrize("behind", [False, True])
def test_the_writer_patches_entries_written_before(tmp_path, behind):
    """Patched entries near each other share one read and write; far ones (more than PATCH_GAP bytes
    apart) are patched by runs; the other entries keep their bytes, also after a flush."""
    size = 3 * PATCH_GAP
    entries = [("a", torch.bfloat16, (size,)), ("b", torch.float32, (7,))]
    writer = ShardedWriter(tmp_path, entries, 1 << 30, {})
    if behind:
        writer = WriteBehind(writer, sync_every=1)
    first = torch.randn(size).to(torch.bfloat16)
    with writer:
        writer.write("a", 0, first)
        writer.write("b", 0, torch.arange(7.0))
        positions = torch.tensor([0, 5, 6, 900, 2 * PATCH_GAP, size - 1], dtype=torch.int32)
        values = torch.arange(1.0, 7.0).to(torch.bfloat16)
        writer.patch("a", positions, values)
        writer.patch("b", torch.tensor([3]), torch.tensor([-1.0]))
        with pytest.raises(ValueError, match="values of torch.float32 for 1 positions of a tensor of torch.bfloat16"):
            (writer.writer if behind else writer).patch("a", torch.tensor([1]), torch.tensor([1.0]))
    from safetensors.torch import load_file

    loaded = load_file(str(tmp_path / "model.safetensors"))
    expected = first.clone()
    expected[positions.long()] = values
    assert torch.equal(loaded["a"].view(torch.int16), expected.view(torch.int16))
    assert torch.equal(loaded["b"], torch.tensor([0.0, 1, 2, -1, 4, 5, 6]))
