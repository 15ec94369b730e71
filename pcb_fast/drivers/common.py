"""What the merge of files (drivers/files.py) and the merge of adapters (drivers/adapters.py) share:
the checked arguments, the output's dtypes and metadata, the checks that the output is no input,
the sink that writes theta_pre + lam * tau_m into shards (one reused buffer of the base per dtype),
the engine's run with its options, and the report."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Callable

import torch

from .. import __version__
from ..core import checks, engine
from ..core.checks import parse_size
from ..core.formulas import merged_weights
from ..core.memory import available_memory, peak_rss_bytes
from ..core.options import PassBars, RunOptions
from ..core.sinks import Sink, pieces_at
from ..core.threads import CpuThreads, check_threads
from ..cpu import fused as fused_cpu, native
from ..io.output import check_not_an_input, checkpoint_files
from ..io.safetensors import show
from ..methods import SPECS, check_method_params

OUT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class MergeSettings:
    """The checked arguments of a merge of files or adapters (:func:`check_settings`)."""

    method: str
    params: dict  # the method's own parameters
    lam: float
    lambdas: list | None  # floats, so that the metadata is the same however they were given
    scope: str
    exclude: tuple
    budget: int  # bytes the merge may hold between passes
    fused: str  # "auto", "on" or "off"
    threads: object  # "auto" or a number of threads
    dtype: str | None  # the output dtype of floating tensors; None: each tensor's own
    block_width: int

    def out_dtype(self, base_ck) -> Callable[[str], torch.dtype]:
        """The dtype each key of ``base_ck`` is written in."""

        def out_dtype(key):
            own = base_ck.dtype(key)
            return OUT_DTYPES[self.dtype] if self.dtype is not None and own.is_floating_point else own

        return out_dtype

    def metadata(self, **extra) -> dict:
        """The safetensors metadata of the output: the method and every parameter of the merge."""
        parameters = dict(self.params, lam=self.lam, lambdas=self.lambdas, scope=self.scope,
                          exclude=list(self.exclude), **extra)
        return {"format": "pt", "pcb_fast_version": __version__, "merge_method": self.method,
                "merge_parameters": json.dumps(parameters, sort_keys=True)}


def check_settings(method, n, *, lam, lambdas, scope, exclude, params, max_memory, fused, threads, dtype,
                   block_width) -> MergeSettings:
    """The checks every merge of files or adapters makes before opening any: the method and its
    parameters (as a real merge checks them), lam, lambdas, the budget (default: half the available
    memory), fused, threads, the output dtype and the block width."""
    check_method_params(method, n, lam, lambdas, scope, params)
    lam = checks.check_lam(lam)
    exclude = checks.check_exclude(exclude)
    lambdas = checks.check_lambdas(lambdas, n)
    budget = available_memory() // 2 if max_memory is None else parse_size(max_memory, "max_memory")
    checks.check_choice("fused", fused, fused_cpu.MODES)
    check_threads(threads)
    if dtype is not None and dtype not in OUT_DTYPES:
        raise ValueError(f"dtype={checks.short(dtype)} is not valid; choose one of {', '.join(map(repr, OUT_DTYPES))}")
    checks.check_block_width(block_width)
    return MergeSettings(method=method, params=dict(params), lam=lam, lambdas=lambdas, scope=scope, exclude=exclude,
                         budget=budget, fused=fused, threads=threads, dtype=dtype, block_width=block_width)


def check_shard_size(shard_size) -> int:
    """The largest output shard in bytes: a positive size."""
    shard_bytes = parse_size(shard_size, "shard_size")
    if shard_bytes == 0:
        raise ValueError(f"shard_size={checks.short(shard_size)} must be positive")
    return shard_bytes


def check_out_reads_nothing(out, checkpoints) -> None:
    """``out`` is none of the files the (label, checkpoint) pairs read (shards, symlinks followed),
    which an overwrite must not delete either."""
    check_not_an_input(out, [f for label, ck in checkpoints for f in checkpoint_files(ck, label)])


class BaseSlices:
    """Slices of the base's tensors read into one reused buffer per dtype (at least ``width`` entries);
    with ``check_finite``, a slice that is not finite is an error naming the key (for sources that
    never read the base under some keys)."""

    def __init__(self, base_ck, width: int, check_finite: bool = False):
        self.base_ck, self.width, self.check_finite = base_ck, width, check_finite
        self._buffers = {}

    def read(self, key: str, lo: int, hi: int) -> torch.Tensor:
        dtype = self.base_ck.dtype(key)
        buffer = self._buffers.get(dtype)
        if buffer is None or buffer.numel() < hi - lo:
            buffer = self._buffers[dtype] = torch.empty(max(hi - lo, self.width), dtype=dtype)
        values = self.base_ck.read_into(key, lo, hi, buffer[: hi - lo])
        if self.check_finite:
            reason = checks.non_finite_reason(values)
            if reason is not None:
                raise ValueError(f"base model, key {show(key)}: {reason}")
        return values


def merged_into(key: str, base: torch.Tensor, tau_m: torch.Tensor, lam: float, out: torch.Tensor) -> torch.Tensor:
    """``out`` = theta_pre + lam * tau_m rounded to out's dtype (core.formulas.merged_weights, bit for
    bit): one native sweep, else torch's, whose check says which value is not finite."""
    if native.merged_output(base, tau_m, lam, out):
        return out
    theta = merged_weights(base, lam, tau_m)
    out.copy_(theta)
    checks.check_merged(key, theta, out)
    return out


def shard_sink(writer, out_dtype, lam: float, base_slice: Callable, *, aliases: dict | None = None, comm=None,
               from_inputs: bool = False) -> Sink:
    """The sink of a merge into shards: each block's theta_pre + lam * tau_m in the output dtype,
    written under its key (and ``aliases``: key -> other names of the tensor), or under the keys of
    a pack one after the other (core.sources.pack_segments). ``base_slice(segment, lo, hi)`` gives
    the base's slice. Distributed (``comm``), an error is recorded and raised on every rank at the
    next collective. ``from_inputs``: the sink offers the weighted merge straight from the raw
    input slices (single-process merges of files, where the C kernels load)."""
    names = {}
    for alias, key in (aliases or {}).items():
        names.setdefault(key, []).append(alias)

    def write(key, lo, values):
        writer.write(key, lo, values)
        for name in names.get(key, []):
            writer.write(name, lo, values)

    def write_segment(segment, lo, values):
        writer.write_segment(segment, lo, values)
        for name in names.get(segment.key, []):  # (a tensor with aliases is never in a pack)
            writer.write(name, lo, values)

    def tau(segment, lo, hi, tau_m, base=None):
        try:
            base = base_slice(segment, lo, hi) if base is None else base
            values = torch.empty(hi - lo, dtype=out_dtype(segment.lead_key))
            if native.merged_output(base, tau_m, lam, values):  # one sweep; else torch's, which says what is wrong
                write_segment(segment, lo, values)
                return
            for part, part_lo, part_hi, start, end in segment.pieces(lo, hi):  # (the keys of a pack, one by one)
                theta = merged_weights(base[start:end], lam, tau_m[start:end])
                values = theta.to(out_dtype(part.key))
                checks.check_merged(part.key, theta, values)
                write(part.key, part_lo, values)
        except (ValueError, OSError) as e:
            if comm is None:
                raise
            comm.fail(str(e))  # raised on every rank at the next collective

    def patchable(segment, lo, hi, tau_m, positions, other, room):
        """tau_m sunk as by ``tau``; the patch holds the base's values at ``positions`` (taken now from
        the slice at hand) and ``other``, and writes the output's values there over the first ones
        (the writer reads back the bytes around them: nothing is final before the writer closes)."""
        base = base_slice(segment, lo, hi)
        tau(segment, lo, hi, tau_m, base)
        base = room.hold(base.index_select(0, positions))
        positions, other = room.hold(positions), room.hold(other)

        def patch():
            values = torch.empty(positions.numel(), dtype=out_dtype(segment.lead_key))
            made = native.merged_output(base, other, lam, values)  # else (not finite, ...) torch's, which says why
            for part, at, taken in pieces_at(segment, lo, hi, positions):
                if made and values.dtype == out_dtype(part.key):
                    part_values = values[taken]
                else:
                    theta = merged_weights(base[taken], lam, other[taken])
                    part_values = theta.to(out_dtype(part.key))
                    checks.check_merged(part.key, theta, part_values)
                writer.patch(part.key, at, part_values)
                for name in names.get(part.key, []):
                    writer.patch(name, at, part_values)

        return patch

    def weights(segment, lo, hi, theta):
        """The merged weights themselves (pcb_fast.methods.weight_space), rounded once to the output dtype."""
        # a new tensor: theta may be an input's buffer (passthrough), which the reader reuses while the
        # writer thread still holds the values
        values = theta.to(out_dtype(segment.key), copy=True)
        checks.check_merged(segment.key, theta, values)
        write(segment.key, lo, values)

    def raw(segment, lo, hi, natives, weights, divisor) -> bool:
        """The merged block straight from the raw slices [base, model_0, ...], written; False where the
        kernel does not apply or a value is not finite (the method then takes the torch path)."""
        values = torch.empty(hi - lo, dtype=out_dtype(segment.lead_key))
        if not native.weighted_merge(natives[1:], natives[0], weights, divisor, lam, values):
            return False
        write_segment(segment, lo, values)
        return True

    return Sink(tau, weights=weights, from_inputs=raw if from_inputs else None,
                patchable=patchable if comm is None else None)


def run_engine(source, sink, settings: MergeSettings, *, progress=None, budget: int | None = None,
               scope: str | None = None, comm=None, pack_keys: bool = False) -> dict:
    """Run the settings' method over ``source`` into ``sink`` with the run's options (core/options.py):
    the memory ``budget`` (default: the settings'), the thread policy, ``progress`` (a bar factory),
    the fused loops where they apply, the communicator of a distributed merge, and whether small keys
    may share a block (``pack_keys``). ``scope`` overrides the settings'. Returns the engine's {"kept", "entries"}."""
    budget = settings.budget if budget is None else budget
    with CpuThreads(settings.threads) as cpu_threads:
        options = RunOptions(
            memory_budget=budget, threads=cpu_threads, progress=progress and PassBars(progress), comm=comm,
            errors=comm, pack_keys=pack_keys, **fused_cpu.settings(settings.fused, source.n * source.D, settings.method, settings.params,
                                              allowed=comm is None))
        spec = SPECS[settings.method]
        return engine.run(spec.merge, source, sink, options=options, scope=scope or settings.scope,
                          merge_tensors=spec.merge_tensors, lambdas=settings.lambdas,
                          block_width=settings.block_width, **settings.params)


def fill_report(report: dict | None, info: dict, started: float, merged: list, copied: list, **extra) -> None:
    """``report`` (where given) receives the engine's ``info``, the merged and copied keys, the
    seconds since ``started`` (time.perf_counter), the peak resident memory and ``extra``."""
    if report is not None:
        report.update(info, merged_keys=merged, copied_keys=copied, **extra, seconds=time.perf_counter() - started,
                      peak_rss_bytes=peak_rss_bytes())
