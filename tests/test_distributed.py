"""Distributed merges with torch.distributed (gloo, loopback): several processes, launched as
torchrun would, give the bytes of a single-process merge; a failing rank fails them all cleanly."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch

safetensors_torch = pytest.importorskip("safetensors.torch")

from pcb_fast.io.distributed import assign_shards  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, args: list, timeout: int = 120) -> list:
    """Run `pcb-fast merge ... --distributed` in ``world`` processes with torchrun's environment."""
    port = _free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, "-m", "pcb_fast", "merge", *map(str, args), "--distributed",
                                       "--quiet"], env=env, stderr=subprocess.PIPE, text=True))
    try:
        return [(p.wait(timeout=timeout), p.stderr.read()) for p in procs]
    finally:
        for p in procs:
            p.kill()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A base and 3 fine-tunes of 8 keys, with quantized values (ties at every threshold)."""
    tmp = tmp_path_factory.mktemp("dist")
    g = torch.Generator().manual_seed(0)
    shapes = {f"layer{i}.weight": (64, 48) for i in range(6)} | {"embed": (100, 32), "bias": (48,)}
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()} | {"steps": torch.arange(3)}
    safetensors_torch.save_file(base, tmp / "base.safetensors")
    args = ["--base", tmp / "base.safetensors"]
    for i in range(3):
        tuned = {k: v + torch.randint(-3, 4, v.shape, generator=g) * 0.01 if v.is_floating_point() else v
                 for k, v in base.items()}
        safetensors_torch.save_file(tuned, tmp / f"m{i}.safetensors")
        args += ["--model", tmp / f"m{i}.safetensors"]
    return tmp, args


def _same_folder(a, b) -> bool:
    names = sorted(p.name for p in a.iterdir())

    def content(folder, name):  # the model card is titled with the output folder's name (pcb_fast/io/card.py)
        data = (folder / name).read_bytes()
        return data.replace(f"# {folder.name}\n".encode(), b"# <name>\n") if name == "README.md" else data

    return names == sorted(p.name for p in b.iterdir()) and all(content(a, n) == content(b, n) for n in names)


@pytest.mark.parametrize("world,method_args", [
    (2, ["--ratio", "0.2"]),
    (2, ["--method", "ties", "--density", "0.3", "--topk", "exact"]),
    (3, ["--variant", "paper", "--ratio", "0.3"]),
])
def test_ranks_give_the_bytes_of_one_process(models, world, method_args):
    tmp, args = models
    name = "_".join(map(str, [world] + method_args)).replace("-", "")
    single, many = tmp / f"single_{name}", tmp / f"many_{name}"
    from pcb_fast.cli import main as cli

    assert cli(["merge", *map(str, args), *method_args, "--out", str(single), "--shard-size", "20KB", "--quiet"]) == 0
    results = launch(world, args + method_args + ["--out", many, "--shard-size", "20KB"])
    assert [rc for rc, _ in results] == [0] * world, results
    assert len(list(single.glob("*.safetensors"))) == 7
    assert _same_folder(single, many)


def test_a_failing_rank_fails_every_rank_and_writes_nothing(models):
    tmp, args = models
    bad = safetensors_torch.load_file(tmp / "m1.safetensors")
    bad["layer5.weight"][3, 3] = float("nan")  # the last key: in the last rank's shards
    safetensors_torch.save_file(bad, tmp / "bad.safetensors")
    failing = [a if a != tmp / "m1.safetensors" else tmp / "bad.safetensors" for a in args]
    message = f"rank 1: model 1 ({tmp / 'bad.safetensors'}), key 'layer5.weight': contains NaN or Inf"
    for scope in ("global", "tensor"):  # per tensor, ranks meet only at the end: the message still travels
        results = launch(2, failing + ["--out", tmp / "failed", "--shard-size", "20KB", "--scope", scope])
        for rc, err in results:
            assert rc == 1 and message in err and err.count("\n") == 1, (scope, err)
        assert not (tmp / "failed").exists() and not [p for p in tmp.iterdir() if p.name.startswith(".failed")]


def test_distributed_needs_torchrun_environment(models, capsys, monkeypatch):
    tmp, args = models
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    from pcb_fast.cli import main as cli

    assert cli(["merge", *map(str, args), "--out", str(tmp / "x"), "--distributed", "--quiet"]) == 2
    assert "--distributed needs the environment torchrun sets" in capsys.readouterr().err


def test_shards_are_split_by_bytes_in_order():
    assert assign_shards([5, 5, 5, 5], 2) == [range(0, 2), range(2, 4)]
    assert assign_shards([10, 1, 1, 1], 2) == [range(0, 1), range(1, 4)]
    assert assign_shards([4, 4], 3) == [range(0, 1), range(1, 1), range(1, 2)]  # one rank idle
    assert [list(r) for r in assign_shards([1], 2)] == [[0], []]
    assert sum(len(r) for r in assign_shards([3, 1, 4, 1, 5, 9, 2, 6], 3)) == 8


# ---- the triton backend's distributed path (NCCL on GPUs; here gloo on CPU under TRITON_INTERPRET=1)

needs_triton = pytest.mark.skipif(__import__("importlib").util.find_spec("triton") is None,
                                  reason="triton is not installed")


@needs_triton
@pytest.mark.parametrize("world,method_args", [
    (2, ["--ratio", "0.2"]),
    (3, ["--variant", "paper", "--ratio", "0.3", "--shard-size", "50KB"]),  # 2 shards: one rank holds no key
    (2, ["--method", "ties", "--density", "0.3", "--topk", "exact"]),
    (3, ["--method", "ties", "--density", "0.2", "--shard-size", "50KB"]),
    (2, ["--method", "dare_ties", "--p", "0.5", "--scope", "tensor"]),
    (2, ["--inter", "pairwise", "--scope", "tensor"]),
])
def test_triton_ranks_give_the_bytes_of_one_triton_process(models, world, method_args):
    """Each rank runs the kernels on its own keys (here under the interpreter, over gloo: the collectives
    NCCL runs on GPUs); the radix histograms, extremes, partition partials, sign totals and tie counts
    combined over ranks give the bytes of one process of the same backend (which takes the sampled
    brackets instead: the same exact order statistics)."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    tmp, args = models
    args = args + ["--backend", "triton", "--device", "cpu"]
    name = "triton_" + "_".join(map(str, [world] + method_args)).replace("-", "")
    single, many = tmp / f"single_{name}", tmp / f"many_{name}"
    if "--shard-size" not in method_args:
        method_args = method_args + ["--shard-size", "20KB"]
    from pcb_fast.cli import main as cli

    assert cli(["merge", *map(str, args), *method_args, "--out", str(single), "--quiet"]) == 0
    results = launch(world, args + method_args + ["--out", many], timeout=300)
    assert [rc for rc, _ in results] == [0] * world, results
    assert _same_folder(single, many)


@needs_triton
def test_triton_failing_rank_fails_every_rank(models):
    tmp, args = models
    bad = safetensors_torch.load_file(tmp / "m1.safetensors")
    bad["layer5.weight"][3, 3] = float("inf")  # the last key: in the last rank's shards
    safetensors_torch.save_file(bad, tmp / "bad_triton.safetensors")
    failing = [a if a != tmp / "m1.safetensors" else tmp / "bad_triton.safetensors" for a in args]
    message = f"rank 1: model 1 ({tmp / 'bad_triton.safetensors'}), key 'layer5.weight': contains NaN or Inf"
    for scope in ("global", "tensor"):
        results = launch(2, failing + ["--backend", "triton", "--device", "cpu", "--out", tmp / "failed_triton",
                                       "--shard-size", "20KB", "--scope", scope], timeout=300)
        for rc, err in results:
            # the interpreter computes in numpy, which warns about the rank's Inf ("invalid value encountered")
            lines = [line for line in err.splitlines() if "warning: invalid value encountered" not in line]
            assert rc == 1 and len(lines) == 1 and message in lines[0], (scope, err)
        assert not (tmp / "failed_triton").exists()


def test_layout_per_backend_and_device():
    """gloo for the torch backend on CPUs (and the triton backend under the interpreter), NCCL with each
    rank on cuda:LOCAL_RANK for the triton backend on GPUs; what cannot run is a one-line error."""
    from pcb_fast.io.distributed import layout

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    env = {"RANK": "3", "LOCAL_RANK": "1"}
    assert layout("torch", cpu, env) == ("gloo", cpu)
    assert layout("triton", cpu, env) == ("gloo", cpu)
    assert layout("triton", cuda, env, cuda_devices=2, nccl=True) == ("nccl", torch.device("cuda", 1))
    assert layout("triton", torch.device("cuda", 0), env, cuda_devices=2, nccl=True) == ("nccl", torch.device("cuda", 0))
    problems = [
        (dict(backend="reference", device=cpu), "not backend='reference'"),
        (dict(backend="torch", device=cuda, cuda_devices=2, nccl=True), "not backend='torch' on cuda"),
        (dict(backend="triton", device=cuda, cuda_devices=2, nccl=False), "needs NCCL, which this torch build lacks"),
        (dict(backend="triton", device=cuda, cuda_devices=0, nccl=True), "no CUDA device is visible"),
        (dict(backend="triton", device=cuda, cuda_devices=1, nccl=True),
         "rank 3 would run on cuda:1 but this node has 1 CUDA device(s); run at most 1 processes per node"),
        (dict(backend="triton", device=cuda, env={"RANK": "0"}, cuda_devices=1, nccl=True),
         "places each rank on cuda:LOCAL_RANK, but LOCAL_RANK is None"),
    ]
    for kwargs, expected in problems:
        kwargs.setdefault("env", env)
        with pytest.raises(ValueError) as info:
            layout(**kwargs)
        assert expected in str(info.value) and "\n" not in str(info.value), (kwargs, str(info.value))


def test_distributed_cuda_without_cuda_is_a_one_line_error(models, capsys, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    tmp, args = models
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    from pcb_fast.cli import main as cli

    assert cli(["merge", *map(str, args), "--out", str(tmp / "x"), "--backend", "triton", "--device", "cuda",
                "--distributed", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "no CUDA device is available here" in err and err.count("\n") == 1, err


def _collectives(rank: int, world: int, port: int, queue) -> None:
    """One rank of test_collectives_the_device_path_uses (spawned)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    import torch.distributed as dist

    from pcb_fast.io.distributed import Comm

    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        comm = Comm()
        out = {}
        out["sum"] = comm.sum_(torch.tensor([rank + 1, 10 * rank], dtype=torch.int64)).tolist()
        out["max"] = comm.max_(torch.tensor([rank, -rank], dtype=torch.int32)).tolist()
        out["min"] = comm.min_(torch.tensor([rank, -rank], dtype=torch.int32)).tolist()
        # [k_r, 2] float64 partials, k_r = 0, 1, 2 ... (a rank may hold none)
        mine = torch.arange(rank * 2, dtype=torch.float64).view(rank, 2) + 0.1 * rank
        out["gather"] = comm.gather_in_order(mine).tolist()
        out["before"] = comm.before_me(torch.tensor([rank + 1, 1], dtype=torch.int64)).tolist()
        comm.barrier()
        queue.put((rank, out))
    finally:
        dist.destroy_process_group()


def test_collectives_the_device_path_uses():
    """Comm's tensor collectives (the ones the triton backend calls on GPU tensors under NCCL): exact
    sums, extremes, variable-length gathers in rank order, exclusive prefixes."""
    import torch.multiprocessing as mp

    world, port = 3, _free_port()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_collectives, args=(r, world, port, queue)) for r in range(world)]
    for p in procs:
        p.start()
    got = dict(queue.get(timeout=120) for _ in range(world))
    for p in procs:
        p.join(timeout=60)
    gathered = (torch.arange(2, dtype=torch.float64) + 0.1).view(1, 2).tolist()  # rank 0 holds none
    gathered += (torch.arange(4, dtype=torch.float64).view(2, 2) + 0.2).tolist()
    for rank in range(world):
        assert got[rank]["sum"] == [6, 30] and got[rank]["max"] == [2, 0] and got[rank]["min"] == [0, -2]
        assert got[rank]["gather"] == gathered
        assert got[rank]["before"] == [sum(r + 1 for r in range(rank)), rank]


@needs_triton
def test_multi_gpu_check_runs_under_the_interpreter(tmp_path, capsys):
    """benchmarks/gpu_check_distributed.py (gpu_check.sh's multi-GPU step) at --quick sizes over gloo:
    the plumbing a multi-GPU session will rely on (two of its cases, to keep the suite short)."""
    from benchmarks import gpu_check_distributed

    out = tmp_path / "dist.json"
    assert gpu_check_distributed.main(["--quick", "--cases", "1,3", "--out", str(out)]) == 0, capsys.readouterr()
    import json

    report = json.loads(out.read_text())
    assert len(report["checks"]) == 2 and all(c["ok"] and c["ranks"] == 2 for c in report["checks"])


def _device_selects(rank: int, world: int, port: int, queue) -> None:
    """One rank of test_device_selects_combine_over_ranks (spawned; the kernels under the interpreter)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo", TRITON_INTERPRET="1")
    import torch.distributed as dist

    from pcb_fast.io.distributed import Comm
    from pcb_fast.kernels import score as kscore, select as ks
    from pcb_fast.kernels.tiles import Rows

    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        comm = Comm()
        x = torch.randint(-40, 41, (2, 6000), generator=torch.Generator().manual_seed(5)).float() * 0.25
        x[1, ::3] = 0.0  # heavy ties at a bound
        mine = x[:, rank * 3000:(rank + 1) * 3000].contiguous()  # this rank's columns
        ranks = [100, 3000, 5990]
        bad = torch.zeros(2, dtype=torch.int32)
        out = {}
        for label, sample in (("held", x.abs()[:, ::5]), ("missed", torch.full((2, 600), 50.0))):
            bracket = ks.DeviceBracket(ranks, 6000, sample)  # the same sample on every rank
            kscore.magnitude_pass(Rows.from_matrix(mine), bracket, bad)
            held = bracket.resolve(comm)
            if held:
                values, above = bracket.values(), bracket.count_above(False)
            else:  # the radix select with histograms summed over the ranks
                select = ks.DeviceSelect([ranks] * 2, 6000, "cpu")
                for level in range(1, select.LEVELS + 1):
                    kscore.magnitude_pass(Rows.from_matrix(mine), select, bad)
                    comm.sum_(select.hist)
                    if level < select.LEVELS:
                        select.next_level()
                values, above = select.values(), select.count_above(False)
            out[label] = (held, values.tolist(), above.tolist())
        queue.put((rank, out))
    finally:
        dist.destroy_process_group()


@needs_triton
def test_device_selects_combine_over_ranks():
    """Each rank counts its own columns: a bracket's counts summed and copies gathered over the ranks, or
    the radix select's histograms summed where the bracket missed, give sort(x)[rank] of the whole
    rows and the counts above it, on every rank (the distributed triton path's selects)."""
    import torch.multiprocessing as mp

    world, port = 2, _free_port()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_device_selects, args=(r, world, port, queue)) for r in range(world)]
    for p in procs:
        p.start()
    got = dict(queue.get(timeout=240) for _ in range(world))
    for p in procs:
        p.join(timeout=60)
    x = torch.randint(-40, 41, (2, 6000), generator=torch.Generator().manual_seed(5)).float() * 0.25
    x[1, ::3] = 0.0
    magnitude = x.abs()
    index = torch.tensor([[100, 3000, 5990]] * 2)
    expected = torch.sort(magnitude, dim=1).values.gather(1, index)
    above = (magnitude.unsqueeze(1) > expected.unsqueeze(2)).sum(2)
    for rank in range(world):
        assert got[rank]["held"][0] and not got[rank]["missed"][0]
        for label in ("held", "missed"):
            assert got[rank][label][1] == expected.tolist() and got[rank][label][2] == above.tolist(), (rank, label)


def _rank_alone(tmp_path, **env):
    """Rank 0 of two, whose partner never comes: it waits in the rendezvous."""
    g = torch.Generator().manual_seed(0)
    safetensors_torch.save_file({"w": torch.randn(16, generator=g)}, tmp_path / "b.safetensors")
    safetensors_torch.save_file({"w": torch.randn(16, generator=g)}, tmp_path / "m.safetensors")
    env = dict(os.environ, RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(_free_port()), GLOO_SOCKET_IFNAME="lo", **env)
    return subprocess.Popen([sys.executable, "-m", "pcb_fast", "merge", "--base", str(tmp_path / "b.safetensors"),
                             "--model", str(tmp_path / "m.safetensors"), "--out", str(tmp_path / "o"), "--distributed",
                             "--quiet"], env=env, stderr=subprocess.PIPE, text=True)


def test_sigterm_ends_a_rank_waiting_in_the_rendezvous(tmp_path):
    import signal
    import time

    proc = _rank_alone(tmp_path)
    try:
        time.sleep(8)  # imports, checks, then the rendezvous
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 128 + signal.SIGTERM
        assert "pcb-fast: terminated (SIGTERM); no output was written" in proc.stderr.read()
    finally:
        proc.kill()
    assert not (tmp_path / "o").exists()


def test_a_rendezvous_without_the_other_ranks_times_out(tmp_path):
    proc = _rank_alone(tmp_path, PCB_FAST_RENDEZVOUS_TIMEOUT="2")
    try:
        assert proc.wait(timeout=60) == 2
        assert "the other ranks did not join within 2 s" in proc.stderr.read()
    finally:
        proc.kill()
