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
