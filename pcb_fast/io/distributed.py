"""Merges across processes with torch.distributed (docs/design.md 8): the same bytes as one process.

Every rank reads the headers of every model and plans the output shards the same way; whole shards
(contiguous in key order) are assigned to ranks, balanced by bytes, and each rank merges and
writes the keys of its shards. Global statistics are local reductions combined by collectives that
are exact: integer histogram sums, min/max, and float partial sums gathered in block order and
added in that order, as one process would. Methods therefore take their radix-select path (no
collected entries) and make every collective on every rank in the same sequence, even a rank that
holds no key.

Failures: a rank that meets bad data (NaN/Inf, a file that ends early, a write error) records the
first message and carries on with harmless values until the next collective, where all ranks
agree on errors and raise the lowest failing rank's message together; the output is then removed.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch


class Comm:
    """The collectives a distributed merge needs, over the default process group."""

    def __init__(self):
        import torch.distributed as dist

        self.dist = dist
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
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

    def _reduce(self, t: torch.Tensor, op) -> torch.Tensor:
        self.agree()
        self.dist.all_reduce(t, op=op)
        return t

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """In-place sum over ranks (use integer tensors where the result must be exact)."""
        return self._reduce(t, self.dist.ReduceOp.SUM)

    def max_(self, t: torch.Tensor) -> torch.Tensor:
        return self._reduce(t, self.dist.ReduceOp.MAX)

    def min_(self, t: torch.Tensor) -> torch.Tensor:
        return self._reduce(t, self.dist.ReduceOp.MIN)

    def gather_in_order(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's [k_r, ...] tensor, concatenated in rank order (= key order)."""
        self.agree()
        parts = [None] * self.world
        self.dist.all_gather_object(parts, t)
        return torch.cat(parts)

    def before_me(self, t: torch.Tensor) -> torch.Tensor:
        """The sum of ``t`` over the ranks before this one (an exclusive prefix sum)."""
        self.agree()
        parts = [None] * self.world
        self.dist.all_gather_object(parts, t)
        return sum(parts[: self.rank], torch.zeros_like(t))

    def broadcast(self, value):
        """Rank 0's ``value`` on every rank."""
        box = [value]
        self.dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        self.agree()
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


def init_from_env() -> Comm:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), over gloo:
    distributed merges run the torch backend on CPUs in this version."""
    import torch.distributed as dist

    missing = [v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise ValueError(f"--distributed needs the environment torchrun sets ({', '.join(missing)} missing); "
                         "launch with: torchrun --nproc-per-node N -m pcb_fast merge ... --distributed")
    comm_owner = not dist.is_initialized()
    if comm_owner:
        dist.init_process_group("gloo", timeout=timedelta(minutes=30))
    comm = Comm()
    comm.owns_group = comm_owner
    return comm
