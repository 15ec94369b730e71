"""Merges across processes with torch.distributed (docs/design.md 8): the same bytes as one process.

Every rank reads the headers of every model and plans the output shards the same way; whole shards
(contiguous in key order) are assigned to ranks, balanced by bytes, and each rank merges and
writes the keys of its shards. Global statistics are local reductions combined by collectives that
are exact: integer histogram sums, min/max, and float partial sums gathered in block order and
added in that order, as one process would. Methods make every collective on every rank in the same
sequence, even a rank that holds no key. The torch backend takes its radix-select path (no collected
entries); the triton backend keeps its sampled brackets, with the sample and the few entries inside
a bracket gathered over the ranks (pcb_fast.gpu.backend).

Two layouts: the torch backend on CPUs over gloo, and the triton backend on CUDA GPUs over NCCL,
each rank on its own GPU (``cuda:LOCAL_RANK``; pcb_fast.drivers.distributed loads the rank's keys there
and runs pcb_fast.gpu.backend with this module's :class:`Comm`). The collectives take tensors on
any device: each is copied to the process group's device (CPU for gloo, the rank's GPU for NCCL)
when it is not there already.

Failures: a rank that meets bad data (NaN/Inf, a file that ends early, a write error) records the
first message and carries on with harmless values until the next collective, where all ranks
agree on errors and raise the lowest failing rank's message together; the output is then removed.
"""

from __future__ import annotations

import os
import time
from datetime import timedelta

import torch

from ..core.checks import short


class Comm:
    """The collectives a distributed merge needs, over the default process group."""

    def __init__(self, device: torch.device | str = "cpu"):
        import torch.distributed as dist

        self.dist = dist
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        self.device = torch.device(device)  # where the collectives' tensors live: CPU (gloo) or this rank's GPU (NCCL)
        self.error = None

    def close(self) -> None:
        """Leave the process group if this merge created it (a process that exits with the group
        still open is killed by gloo's destructor)."""
        if getattr(self, "owns_group", False) and self.dist.is_initialized():
            self.dist.destroy_process_group()

    def fail(self, message: str) -> None:
        """Record a failure; it is raised on every rank at the next collective."""
        if self.error is None:
            self.error = f"rank {self.rank}: {message}"

    def agree(self) -> None:
        """Raise the lowest failing rank's message on every rank, if any rank failed."""
        errors = [None] * self.world
        self.dist.all_gather_object(errors, self.error)
        first = next((e for e in errors if e), None)
        if first is not None:
            raise ValueError(first)

    def _here(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` on the process group's device, contiguous (a copy only where needed)."""
        return t.contiguous() if t.device == self.device else t.to(self.device, copy=True).contiguous()

    def _reduce(self, t: torch.Tensor, op) -> torch.Tensor:
        self.agree()
        work = self._here(t)
        self.dist.all_reduce(work, op=op)
        if work is not t:
            t.copy_(work)
        return t

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """In-place sum over ranks (use integer tensors where the result must be exact)."""
        return self._reduce(t, self.dist.ReduceOp.SUM)

    def max_(self, t: torch.Tensor) -> torch.Tensor:
        return self._reduce(t, self.dist.ReduceOp.MAX)

    def min_(self, t: torch.Tensor) -> torch.Tensor:
        return self._reduce(t, self.dist.ReduceOp.MIN)

    def _all_gather(self, t: torch.Tensor) -> list:
        """Every rank's ``t`` (one shape on every rank), in rank order, on the process group's device."""
        work = self._here(t)
        parts = [torch.empty_like(work) for _ in range(self.world)]
        self.dist.all_gather(parts, work)
        return parts

    def gather_in_order(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's [k_r, ...] tensor (k_r may differ, and be 0), concatenated in rank order (= key
        order), on ``t``'s device. The values travel as they are: no rounding, no reordering."""
        self.agree()
        sizes = self._all_gather(torch.tensor([t.shape[0]], dtype=torch.int64))
        counts = [int(size) for size in torch.cat(sizes).tolist()]
        padded = torch.zeros((max(max(counts), 1),) + tuple(t.shape[1:]), dtype=t.dtype, device=self.device)
        padded[: t.shape[0]] = t
        parts = self._all_gather(padded)
        return torch.cat([part[:count] for part, count in zip(parts, counts)]).to(t.device)

    def before_me(self, t: torch.Tensor) -> torch.Tensor:
        """The sum of ``t`` over the ranks before this one (an exclusive prefix sum; integer tensors for
        an exact one), on ``t``'s device."""
        self.agree()
        parts = self._all_gather(t)
        return sum((part.to(t.device) for part in parts[: self.rank]), torch.zeros_like(t))

    def broadcast(self, value):
        """Rank 0's ``value`` on every rank."""
        box = [value]
        self.dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        self.agree()
        if self.device.type == "cuda":
            self.dist.barrier(device_ids=[self.device.index])
        else:
            self.dist.barrier()


def assign_shards(shard_bytes: list, world: int) -> list:
    """Contiguous ranges of shard indices, one per rank, balanced by bytes (some may be empty)."""
    total = sum(shard_bytes) or 1
    ranges, start, done = [], 0, 0
    for r in range(world):
        end = start
        target = total * (r + 1) / world
        while end < len(shard_bytes) and (r == world - 1 or done + shard_bytes[end] / 2 <= target):
            done += shard_bytes[end]
            end += 1
        ranges.append(range(start, end))
        start = end
    return ranges


def layout(backend: str, device: torch.device, env=None, cuda_devices: int | None = None,
           nccl: bool | None = None) -> tuple:
    """(torch.distributed backend, this rank's device) of a distributed merge on ``backend`` and
    ``device`` (as resolved for one process): the torch backend on CPU over gloo; the triton backend
    on CUDA over NCCL, rank with LOCAL_RANK l on ``cuda:l`` (``device`` without an index), or on
    CPU over gloo under TRITON_INTERPRET=1 (tests). A layout that cannot run is a one-line
    ValueError saying why. ``cuda_devices`` and ``nccl`` default to what this machine has."""
    env = os.environ if env is None else env
    device = torch.device(device)
    if backend not in ("torch", "triton"):
        raise ValueError(f"--distributed runs the torch backend on CPUs or the triton backend on CUDA GPUs, "
                         f"not backend={short(backend)}")
    if device.type == "cpu":
        return "gloo", device
    if device.type != "cuda" or backend != "triton":
        raise ValueError(f"--distributed runs the torch backend on CPUs or the triton backend on CUDA GPUs, "
                         f"not backend={short(backend)} on {device}")
    import torch.distributed as dist

    nccl = dist.is_nccl_available() if nccl is None else nccl
    cuda_devices = torch.cuda.device_count() if cuda_devices is None else cuda_devices
    if cuda_devices == 0:
        raise ValueError(f"device={short(str(device))}: no CUDA device is visible to this process; use --device cpu")
    if not nccl:
        raise ValueError("--distributed on CUDA GPUs needs NCCL, which this torch build lacks "
                         "(torch.distributed.is_nccl_available() is False); use --device cpu")
    if device.index is None:
        local = env.get("LOCAL_RANK")
        if local is None or not local.isdigit():
            raise ValueError(f"--distributed with --device cuda places each rank on cuda:LOCAL_RANK, but LOCAL_RANK "
                             f"is {short(local)}; launch with torchrun, or give --device cuda:N")
        device = torch.device("cuda", int(local))
    if device.index >= cuda_devices:
        raise ValueError(f"rank {env.get('RANK', '?')} would run on {device} but this node has {cuda_devices} CUDA "
                         f"device(s); run at most {cuda_devices} processes per node (torchrun --nproc-per-node "
                         f"{cuda_devices})")
    return "nccl", device


RENDEZVOUS_SECONDS = 600.0  # how long the ranks may take to meet (PCB_FAST_RENDEZVOUS_TIMEOUT overrides)


def rendezvous(join, device: torch.device) -> None:
    """Run ``join`` (the process group's rendezvous, which waits in C++ for the other ranks) in a
    helper thread while this thread waits in short slices: a signal (SIGTERM, Ctrl-C) is handled at
    once, and ranks that never come end the wait after RENDEZVOUS_SECONDS with a one-line error."""
    import threading

    try:
        limit = float(os.environ.get("PCB_FAST_RENDEZVOUS_TIMEOUT", RENDEZVOUS_SECONDS))
    except ValueError:
        raise ValueError("PCB_FAST_RENDEZVOUS_TIMEOUT must be a number of seconds") from None
    outcome = []

    def run():
        try:
            if device.type == "cuda":
                torch.cuda.set_device(device)  # the current device is per thread
            join()
            outcome.append(None)
        except BaseException as e:  # handed to the waiting thread
            outcome.append(e)

    helper = threading.Thread(target=run, name="pcb_fast-rendezvous", daemon=True)
    helper.start()
    deadline = time.monotonic() + limit
    while helper.is_alive() and time.monotonic() < deadline:
        helper.join(0.2)  # signal handlers run between the slices
    if helper.is_alive():
        raise ValueError(f"--distributed: the other ranks did not join within {limit:g} s (MASTER_ADDR="
                         f"{os.environ.get('MASTER_ADDR')}, MASTER_PORT={os.environ.get('MASTER_PORT')}, WORLD_SIZE="
                         f"{os.environ.get('WORLD_SIZE')}); check that every rank was launched")
    if outcome and outcome[0] is not None:
        raise outcome[0]


def init_from_env(backend: str = "torch", device: torch.device | str = "cpu") -> Comm:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT): gloo
    for the torch backend on CPUs, NCCL for the triton backend on CUDA GPUs, each rank on its own
    (:func:`layout`; ``torch.cuda.set_device``). ``comm.device`` is the rank's device."""
    import torch.distributed as dist

    missing = [v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise ValueError(f"--distributed needs the environment torchrun sets ({', '.join(missing)} missing); "
                         "launch with: torchrun --nproc-per-node N -m pcb_fast merge ... --distributed")
    group_backend, device = layout(backend, torch.device(device))
    comm_owner = not dist.is_initialized()
    if comm_owner:
        if device.type == "cuda":
            torch.cuda.set_device(device)  # NCCL's communicator and every kernel on this rank's GPU
        rendezvous(lambda: dist.init_process_group(group_backend, timeout=timedelta(minutes=30)), device)
    elif dist.get_backend() != group_backend:
        raise ValueError(f"a {dist.get_backend()} process group is already open; this merge needs {group_backend}")
    comm = Comm(device if group_backend == "nccl" else "cpu")
    comm.owns_group = comm_owner
    comm.merge_device = device
    return comm
