"""The disk pipeline (docs/design.md 3.7): reads ahead of the engine in order, falls back to reading
in place when asked for something else, hands the reader's errors to the engine, stops cleanly
when a pass is abandoned, and leaves every merged byte as it was."""

import threading

import pytest
import torch
from safetensors.torch import load_file, save_file

import pcb_fast
from pcb_fast.core.options import RunOptions
from pcb_fast.core.prefetch import Prefetcher
from pcb_fast.io.checkpoints import StateDictCheckpoint, open_checkpoint


class CountingCheckpoint(StateDictCheckpoint):
    """A state dict that records its reads and hints (and can fail on one key)."""

    def __init__(self, state, name, fail_key=None):
        super().__init__(state, name)
        self.reads, self.hints, self.fail_key = [], [], fail_key

    def read_into(self, key, lo, hi, out):
        if key == self.fail_key:
            raise ValueError(f"{self.name}: key {key!r} ends early (truncated file)")
        self.reads.append((key, lo, hi, threading.current_thread().name))
        return super().read_into(key, lo, hi, out)

    def advise(self, key, lo, hi):
        self.hints.append((key, lo, hi))


def test_prefetcher_hands_out_ranges_in_order_with_their_values():
    cks = [CountingCheckpoint({"a": torch.arange(10.0), "b": torch.arange(6, dtype=torch.bfloat16)}, f"m{i}")
           for i in range(3)]
    ranges = [("a", 0, 4), ("a", 4, 8), ("a", 8, 10), ("b", 0, 6)]
    reader = Prefetcher(cks, ranges, depth=2, advise_ahead=2)
    try:
        for key, lo, hi in ranges:
            slot, views = reader.take(key, lo, hi)
            assert [v.dtype for v in views] == [cks[0].dtype(key)] * 3
            for view, ck in zip(views, cks):
                assert torch.equal(view, ck.state[key][lo:hi])
            reader.release(slot)
        assert reader.take("a", 0, 4) is None  # every range was read: nothing more ahead
    finally:
        reader.close()
    assert all(name == "pcb_fast-reader" for ck in cks for *_, name in ck.reads)
    assert cks[0].hints == ranges  # every range announced before it is read


def test_prefetcher_out_of_order_request_reads_in_place():
    ck = CountingCheckpoint({"a": torch.arange(10.0)}, "m")
    reader = Prefetcher([ck], [("a", 0, 5), ("a", 5, 10)], depth=1)
    try:
        assert reader.take("a", 5, 10) is None  # not the next range: the caller reads it itself
        slot, (view,) = reader.take("a", 0, 5)  # the next one is still there
        assert torch.equal(view, torch.arange(5.0))
        reader.release(slot)
    finally:
        reader.close()


def test_prefetcher_raises_the_readers_error_in_the_engines_thread():
    ck = CountingCheckpoint({"a": torch.arange(4.0), "b": torch.arange(4.0)}, "model 1", fail_key="b")
    reader = Prefetcher([ck], [("a", 0, 4), ("b", 0, 4)])
    try:
        slot, _ = reader.take("a", 0, 4)
        reader.release(slot)
        with pytest.raises(ValueError, match="model 1: key 'b' ends early"):
            reader.take("b", 0, 4)
    finally:
        reader.close()


def test_prefetcher_close_stops_a_reader_blocked_on_its_slots():
    ck = CountingCheckpoint({"a": torch.arange(100.0)}, "m")
    reader = Prefetcher([ck], [("a", i, i + 1) for i in range(100)], depth=2)
    reader.take("a", 0, 1)  # one slot held, never released: the reader waits for one
    reader.close()
    assert not reader._thread.is_alive()
    assert len(ck.reads) <= 3


def _folders(tmp_path, n=3, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(1)
    base = {"a.weight": torch.randn(300, 70, generator=g).to(dtype), "b.bias": torch.randn(257, generator=g).to(dtype),
            "c.weight": torch.randn(64, 64, generator=g).to(dtype)}
    paths = []
    for i, state in enumerate([base] + [{k: (v.float() + 0.1 * torch.randn(v.shape, generator=g)).to(dtype)
                                         for k, v in base.items()} for _ in range(n)]):
        path = tmp_path / f"m{i}.safetensors"
        save_file(state, str(path))
        paths.append(path)
    return paths[0], paths[1:]


@pytest.mark.parametrize("method,params", [("task_arithmetic", {}), ("ties", {"density": 0.3}),
                                           ("pcb", {"ratio": 0.2}), ("dare_ties", {"p": 0.5}),
                                           ("ties", {"density": 0.3, "scope": "tensor"})])
def test_read_ahead_changes_no_byte(tmp_path, monkeypatch, method, params):
    """The same merged bytes with the reader thread as with every read made in place (small blocks,
    so that a pass has many ranges read ahead; a small budget, so that passes re-read the files)."""
    from pcb_fast.core.sources import CheckpointSource

    base, models = _folders(tmp_path)
    outputs = []
    for ahead in (True, False):
        if not ahead:
            monkeypatch.setattr(CheckpointSource, "_reading", lambda self, *a: __import__("contextlib").nullcontext())
        out = tmp_path / f"out_{ahead}"
        pcb_fast.merge_checkpoints(base, models, out, method=method, block_width=1000, max_memory="20KB", **params)
        outputs.append(load_file(str(out / "model.safetensors")))
    assert outputs[0].keys() == outputs[1].keys()
    for key in outputs[0]:
        assert torch.equal(outputs[0][key], outputs[1][key]), key


def test_a_failing_read_ahead_leaves_no_output_and_no_thread(tmp_path, monkeypatch):
    from pcb_fast.io import safetensors as st

    base, models = _folders(tmp_path)
    real = st.SafetensorsReader.read_into

    def failing(self, key, lo, hi, out):
        if self.path.name == models[1].name and key == "c.weight":
            raise st.FormatError(f"{self.path}: key {key!r} ends early (truncated file)")
        return real(self, key, lo, hi, out)

    monkeypatch.setattr(st.SafetensorsReader, "read_into", failing)
    before = threading.active_count()
    with pytest.raises(ValueError, match=r"model 1 .*key 'c.weight' ends early"):
        pcb_fast.merge_checkpoints(base, models, tmp_path / "out", method="task_arithmetic", block_width=1000)
    assert not (tmp_path / "out").exists()
    assert threading.active_count() == before


def test_base_block_is_the_base_just_read(tmp_path):
    from pcb_fast.core.sources import CheckpointSource

    base, models = _folders(tmp_path)
    base_ck, model_cks = open_checkpoint(base, "base"), [open_checkpoint(m, f"model {i}") for i, m in enumerate(models)]
    source = CheckpointSource(base_ck, model_cks, ["a.weight", "b.bias"])
    for block in source.blocks(5000, options=RunOptions()):
        expected = base_ck.read("a.weight" if block.segment.key == "a.weight" else "b.bias").reshape(-1)
        got = source.base_block(block.segment.key, block.lo, block.hi)
        assert got.dtype == torch.float32 and torch.equal(got, expected[block.lo:block.hi].float())
        assert source.base_block(block.segment.key, block.lo + 1, block.hi) is None


def test_a_pass_over_some_blocks_reads_ahead_those_only(tmp_path, monkeypatch):
    """blocks(only=...) of a file source: the blocks of those numbers, equal to the full pass's, and
    the reader thread reads no other range (those of the full pass: every one)."""
    from pcb_fast.core import prefetch
    from pcb_fast.core.sources import CheckpointSource

    base, models = _folders(tmp_path)
    source = CheckpointSource(open_checkpoint(base, "base"), [open_checkpoint(m, f"model {i}")
                                                              for i, m in enumerate(models)], ["a.weight", "b.bias"])
    planned = []
    real = prefetch.Prefetcher.__init__
    monkeypatch.setattr(prefetch.Prefetcher, "__init__", lambda self, inputs, ranges, **k:
                        planned.append(list(ranges)) or real(self, inputs, ranges, **k))
    every = [(b.segment.key, b.lo, b.hi, b.tv.clone()) for b in source.blocks(1000, options=RunOptions())]
    some = [(b.segment.key, b.lo, b.hi, b.tv.clone()) for b in source.blocks(1000, options=RunOptions(), only=[4, 1])]
    assert len(every) > 5 and [r[:3] for r in some] == [every[1][:3], every[4][:3]]
    assert all(torch.equal(a[3], b[3]) for a, b in zip(some, [every[1], every[4]]))
    assert planned == [[r[:3] for r in every], [r[:3] for r in some]]


def test_a_cached_source_passes_over_some_blocks_without_caching_them():
    """blocks(only=...) of a CachedSource before its first complete pass reads the inner source and
    caches nothing (the next full pass still fills the cache); after it, reads the cache."""
    from pcb_fast.core.sources import CachedSource, MatrixSource

    tv = torch.randn(3, 5000, generator=torch.Generator().manual_seed(0))
    source = CachedSource(MatrixSource(tv))
    assert [(b.lo, b.hi) for b in source.blocks(1000, options=RunOptions(), only={3})] == [(3000, 4000)]
    assert not source.complete
    assert torch.equal(torch.cat([b.tv for b in source.blocks(1000, options=RunOptions())], 1), tv)
    assert source.complete
    some = list(source.blocks(1000, options=RunOptions(), only=[0, 4]))
    assert [(b.lo, b.hi) for b in some] == [(0, 1000), (4000, 5000)]
    assert torch.equal(some[1].tv, tv[:, 4000:]) and some[1].tv.data_ptr() == source.cache[:, 4000:].data_ptr()


def test_the_run_options_are_an_argument_and_sources_carry_data_only():
    """engine.run hands its options to the method and to every pass; the source keeps none, so a
    second run over the same source does not see the first one's (its progress bars here)."""
    from pcb_fast.core import engine
    from pcb_fast.core.options import PassBars
    from pcb_fast.core.sources import MatrixSource
    from pcb_fast.methods import SPECS

    source = MatrixSource(torch.randn(3, 5000, generator=torch.Generator().manual_seed(0)))
    started = []

    class Bar:
        def update(self, nbytes):
            pass

        def close(self):
            pass

    bars = PassBars(lambda total, what: started.append(what) or Bar())
    engine.run(SPECS["ties"].merge, source, lambda *a: None, options=RunOptions(progress=bars), density=0.2)
    assert started and started[0].startswith("pass 1 of ")
    first = list(started)
    engine.run(SPECS["ties"].merge, source, lambda *a: None, density=0.2)
    assert started == first  # the second run has no progress: no bar
    view = source.restrict(source.segments[0])
    assert not hasattr(source, "options") and not hasattr(view, "options")


def test_a_sink_says_what_it_takes():
    """The merge from the raw inputs runs only where the sink offers it (core.sinks.Sink), and never
    under a per-tensor lam, which only the task-vector way in applies."""
    from pcb_fast.core import engine
    from pcb_fast.core.sinks import Sink
    from pcb_fast.core.sources import StateDictSource
    from pcb_fast.methods import SPECS

    g = torch.Generator().manual_seed(1)
    base = {"a": torch.randn(300, generator=g), "b": torch.randn(40, generator=g)}
    models = [{k: v + torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(2)]
    source = StateDictSource(base, models, ["a", "b"])
    calls = {"tau": 0, "from_inputs": 0}

    def tau(segment, lo, hi, tau_m):
        calls["tau"] += 1

    def from_inputs(segment, lo, hi, natives, weights, divisor):
        calls["from_inputs"] += 1
        return True  # written

    merge = SPECS["task_arithmetic"].merge
    engine.run(merge, source, Sink(tau, from_inputs=from_inputs), block_width=128)
    assert calls == {"tau": 0, "from_inputs": 4}  # a: 3 blocks of at most 128 entries, b: 1
    calls.update(tau=0, from_inputs=0)
    engine.run(merge, source, tau, block_width=128)  # a plain function: task vectors only
    assert calls == {"tau": 4, "from_inputs": 0}
    calls.update(tau=0, from_inputs=0)
    engine.run(merge, source, Sink(tau, from_inputs=from_inputs), scope="tensor", block_width=128,
               segment_params=lambda key: {"lam": 0.5})
    assert calls == {"tau": 4, "from_inputs": 0}


def test_write_behind_writes_in_order_and_raises_its_error(tmp_path):
    from pcb_fast.io.safetensors import ShardedWriter
    from pcb_fast.io.write_behind import WriteBehind

    entries = [("a", torch.float32, (1000,)), ("b", torch.bfloat16, (10,))]
    writer = WriteBehind(ShardedWriter(tmp_path, entries, 1 << 30, {"format": "pt"}), max_pending=1000, sync_every=2000)
    for lo in range(0, 1000, 100):
        writer.write("a", lo, torch.arange(lo, lo + 100, dtype=torch.float32))
    writer.write("b", 0, torch.ones(10, dtype=torch.bfloat16))
    writer.close()
    out = load_file(str(tmp_path / "model.safetensors"))
    assert torch.equal(out["a"], torch.arange(1000, dtype=torch.float32)) and torch.equal(out["b"], torch.ones(10, dtype=torch.bfloat16))

    (tmp_path / "x").mkdir()
    failing = WriteBehind(ShardedWriter(tmp_path / "x", entries, 1 << 30, {}))
    failing.write("b", 0, torch.ones(10))  # float32 values for a bfloat16 tensor: the writer refuses them
    with pytest.raises(ValueError, match="write 'b': values are torch.float32, the file holds torch.bfloat16"):
        failing.close()
    failing.abort()


def test_write_behind_flushes_on_a_thread_of_its_own_and_keeps_its_errors(tmp_path, monkeypatch):
    """The shards written so far are flushed (fdatasync) by the syncer thread while the writer thread
    writes on; the fsync of every shard at close stays (the folder is durable when published); a
    flush that fails is raised at close, never lost."""
    import os
    import threading

    from pcb_fast.io.safetensors import ShardedWriter
    from pcb_fast.io.write_behind import WriteBehind

    entries = [("a", torch.float32, (1000,)), ("b", torch.float32, (1000,))]
    flushed, synced, flushing = [], [], threading.Event()
    # close() skips a flush the syncer has not started (the fsync at close covers it): on a busy
    # machine the syncer may not run before close, so the test waits for its first flush
    monkeypatch.setattr(os, "fdatasync", lambda fd: flushed.append(threading.current_thread().name) or flushing.set())
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))
    writer = WriteBehind(ShardedWriter(tmp_path, entries, 4000, {}), max_pending=1000, sync_every=2000)
    for key in "ab":
        for lo in range(0, 1000, 100):
            writer.write(key, lo, torch.arange(lo, lo + 100, dtype=torch.float32))
    assert flushing.wait(60), "the syncer never flushed"
    writer.close()
    assert flushed and set(flushed) == {"pcb_fast-syncer"}, flushed
    assert len(synced) == 2  # both shards, at close
    assert torch.equal(load_file(str(tmp_path / "model-00002-of-00002.safetensors"))["b"], torch.arange(1000.0))

    failed = threading.Event()

    def failing(fd):
        failed.set()
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", failing)
    (tmp_path / "x").mkdir()
    with pytest.raises(OSError, match="Input/output error"):
        with WriteBehind(ShardedWriter(tmp_path / "x", entries, 4000, {}), max_pending=1000, sync_every=2000) as w:
            for lo in range(0, 1000, 100):
                w.write("a", lo, torch.zeros(100))
            assert failed.wait(60), "the syncer never flushed"


def test_a_writer_block_closes_on_success_and_aborts_on_an_error(tmp_path, monkeypatch):
    """``with writer:`` flushes and closes the shards when the block succeeds; when the block raises,
    or the write behind fails at close, the shards are closed unflushed, each descriptor once."""
    import os

    from pcb_fast.io.safetensors import ShardedWriter
    from pcb_fast.io.write_behind import WriteBehind

    entries = [("a", torch.float32, (4,)), ("b", torch.bfloat16, (4,))]
    with ShardedWriter(tmp_path, entries, 16, {"format": "pt"}) as writer:  # two shards
        writer.write("a", 0, torch.arange(4.0))
        writer.write("b", 0, torch.ones(4, dtype=torch.bfloat16))
    assert writer.files == []
    assert torch.equal(load_file(str(tmp_path / "model-00001-of-00002.safetensors"))["a"], torch.arange(4.0))

    synced, closed = [], []
    real_close = os.close
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd))
    monkeypatch.setattr(os, "close", lambda fd: closed.append(fd) or real_close(fd))
    (tmp_path / "x").mkdir()
    with pytest.raises(RuntimeError, match="stop"):
        with ShardedWriter(tmp_path / "x", entries, 16, {}) as writer:
            raise RuntimeError("stop")
    assert synced == [] and len(closed) == 2 and writer.files == []

    def fail_second(fd):  # the second shard cannot be flushed: the first is closed once, the second by abort
        if synced:
            raise OSError(5, "Input/output error")
        synced.append(fd)

    monkeypatch.setattr(os, "fsync", fail_second)
    closed.clear()
    (tmp_path / "y").mkdir()
    with pytest.raises(OSError, match="Input/output error"):
        with ShardedWriter(tmp_path / "y", entries, 16, {}):
            pass
    assert len(closed) == len(set(closed)) == 2

    monkeypatch.setattr(os, "fsync", lambda fd: None)
    (tmp_path / "z").mkdir()
    with pytest.raises(ValueError, match="values are torch.float32, the file holds torch.bfloat16"):
        with WriteBehind(ShardedWriter(tmp_path / "z", entries, 16, {})) as behind:
            behind.write("b", 0, torch.ones(4))  # refused by the writer thread, raised at close
    assert behind.writer.files == []


MEMORY_CHILD = r"""
import sys
import torch
from pcb_fast.drivers.files import merge_checkpoints
from pcb_fast.core.memory import release_free_memory

def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

folder, method = sys.argv[1], sys.argv[2]
models = [f"{folder}/m{i}.safetensors" for i in range(3)]
# warm up what every merge loads once (imports, thread pools), so that only the merge's own memory is measured
merge_checkpoints(f"{folder}/base.safetensors", models, f"{folder}/warm", method=method, max_memory="16MB",
                  overwrite=True)
release_free_memory()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets VmHWM to the current RSS
before = status("VmRSS")
merge_checkpoints(f"{folder}/base.safetensors", models, f"{folder}/out", method=method, max_memory="16MB",
                  overwrite=True)
print(status("VmHWM") - before)
"""


@pytest.mark.parametrize("method", ["pcb", "ties", "task_arithmetic"])
def test_max_memory_bounds_the_process(tmp_path, method):
    """A merge from files under --max-memory 16MB of 3 models of 2^22 float32 entries (48 MiB of task
    vectors: nothing cached, nothing collected) grows the process by at most the budget plus the
    pipeline's own 128 MiB (blocks, read-ahead slots, write-behind queue, temporaries; 20-90 MiB
    measured), the constant the README states."""
    import subprocess
    import sys

    import os
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("needs Linux's /proc/self/clear_refs")
    g = torch.Generator().manual_seed(0)
    base = {"a": torch.randn(2048, 1024, generator=g), "b": torch.randn(1024, 2048, generator=g)}
    save_file(base, str(tmp_path / "base.safetensors"))
    for i in range(3):
        save_file({k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()},
                  str(tmp_path / f"m{i}.safetensors"))
    proc = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(tmp_path), method], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    grown = int(proc.stdout.split()[-1])
    assert grown <= (16 << 20) + (128 << 20), f"{method}: the merge grew the process by {grown / 2**20:.1f} MiB"


def test_scope_tensor_caches_one_tensor_at_a_time(tmp_path):
    """A budget that holds the largest tensor's task vectors but not the model's: scope="tensor"
    keeps each tensor's in RAM for its passes (one read of the files); the output is the same."""
    from pcb_fast.core import sources

    base, models = _folders(tmp_path)
    passes = []
    real = sources.CheckpointSource._pass  # every pass over the files goes through it
    monkey = pytest.MonkeyPatch()
    monkey.setattr(sources.CheckpointSource, "_pass", lambda self, *a, **k: passes.append(1) or real(self, *a, **k))
    try:
        # the largest tensor: 3 x 21000 float32 = 252 KB; the model's: 3 x 25353 x 4 = 304 KB
        pcb_fast.merge_checkpoints(base, models, tmp_path / "small", method="ties", density=0.3, scope="tensor",
                                   max_memory="280KB")
    finally:
        monkey.undo()
    assert len(passes) == 2  # one file pass for a.weight, one for b.bias and c.weight, small enough to share a pack
    pcb_fast.merge_checkpoints(base, models, tmp_path / "large", method="ties", density=0.3, scope="tensor",
                               max_memory="1KB")
    a, b = load_file(str(tmp_path / "small" / "model.safetensors")), load_file(str(tmp_path / "large" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("threads,expected", [(2, False), (1, True), ("auto", True)])
def test_io_threads_stay_out_of_the_way_of_torch_pinned_to_every_core(tmp_path, monkeypatch, threads, expected):
    """torch pinned to every usable core leaves no room for the reader and writer threads (waking
    them would stall torch's parallel regions): the merge then reads and writes in place."""
    from pcb_fast.core import prefetch, threads as th
    from pcb_fast.io import write_behind

    monkeypatch.setattr(th, "usable_cores", lambda: 2)
    started = []
    for module, name in ((prefetch, "Prefetcher"), (write_behind, "WriteBehind")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _real=real, _name=name, **k: started.append(_name) or _real(*a, **k))
    from pcb_fast.drivers import files as file_merge
    monkeypatch.setattr(file_merge, "WriteBehind", write_behind.WriteBehind)
    base, models = _folders(tmp_path)
    pcb_fast.merge_checkpoints(base, models, tmp_path / "out", method="ties", density=0.3, block_width=1000,
                               max_memory="1KB", threads=threads)
    assert ("Prefetcher" in started and "WriteBehind" in started) is expected
    assert ("Prefetcher" in started or "WriteBehind" in started) is expected

