"""Compile every Triton kernel of pcb_fast for an H100/H200 (sm_90) on a machine without a GPU, and
report what the hardware will see (docs/design.md 4).

    python -m benchmarks.kernel_report            # every kernel and variant; writes benchmarks/results/kernels.json
    python -m benchmarks.kernel_report --fast     # the subset CI compiles (every kernel and variant, bf16 rows)
    options: --out PATH, --jobs N (compiles side by side, default 2), --check (exit 1 on a problem: problems())

Run without TRITON_INTERPRET (the interpreter replaces @triton.jit). Triton lowers each kernel through
TTIR, TTGIR, LLVM IR and PTX to a cubin with its bundled ptxas, so errors the interpreter cannot see
show up here. Integer arguments are compiled as i32, as a launch passes values below 2^31. Per
kernel and variant it reads:
- ``registers``, ``spill_bytes`` (spill stores + spill loads): the ``ptxas -v`` log of Triton's own
  ptxas run (its flags, whatever the Triton version); ``shared_bytes``: the compiled kernel's metadata;
- ``atomics_per_element``: global atomics a program issues per task entry it reads, from the
  TTIR: each ``tt.atomic_rmw`` counts the elements of its tensor (1 for a scalar), times ``tasks``
  for each ``scf.for`` around it (every loop of these kernels runs over the tasks), divided by
  tasks x BLOCK; masks are ignored (an upper bound: masked-off lanes count);
- ``load_vector_bits``: the width of the global loads that move the most bits in the PTX (a tile
  loaded as ``ld.global.v4.b32`` is 128, as scalar ``ld.global.b32`` 32);
- ``inexact_div`` (PTX ``div.full``, ``div.approx``, ``rcp.approx``: what fp32 ``/`` compiles to)
  and ``approx_math`` (``ex2.approx`` from ``tl.exp``, ...): :func:`division_counts`;
- ``address_multiplies_32``: 32-bit multiplies that feed an address (TTIR): :func:`address_multiplies_32`;
- ``compile_s``: seconds of ``triton.compile`` into an empty cache (ptxas included).
Then per merge (``merges``): the passes and their modelled bytes against one read of the inputs,
``bracket_bytes_per_rank`` (the largest bracket pass's device bytes on the busiest rank, Llama-7B on
one GPU and Llama-70B on eight, n=8) and ``reads_by_n`` (reads of the inputs from memory by tasks n
and dtype, where a program's re-reads of its rows miss the L2). The JSON: {"kernels": [{"kernel",
"variant", "tasks", "registers", "spill_bytes", "shared_bytes", "atomics_per_element",
"load_vector_bits", "inexact_div", "approx_math", "address_multiplies_32", "compile_s"}, ...],
"merges": {"pcb_official": {"reads", "bytes_over_one_read", "bytes", "bracket_bytes_per_rank",
"reads_by_n"}, "pcb_official_pairwise": ..., "pcb_paper": ..., "ties": ...}}.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
VIT_B32_D = 113_448_705
SIZES = (1 << 24, VIT_B32_D)
TASKS = 8  # tasks of the modelled merges


@dataclass
class Case:
    """One compile: ``module.kernel`` with argument types ``sig`` and constexprs ``consts``."""

    kernel: str  # the name in the report
    variant: str
    tasks: int
    module: str  # pcb_fast.kernels.<module>
    fn: str
    sig: dict
    consts: dict
    entries: int = 0  # task entries one program reads (tasks x BLOCK); 0: not a per-entry kernel
    aligned: list = field(default_factory=list)  # arguments specialised as multiples of 16 (as a launch sees them)
    options: dict = field(default_factory=dict)  # compile options (as the launcher passes them)

    @property
    def label(self) -> str:
        return f"{self.kernel} [{self.variant}] tasks={self.tasks}"


# ---- the cases

# kernels whose statistics can be kept per part (scope "tensor", constexpr PER_PART)
PER_PART_KERNELS = {"magnitude_kernel", "official_kernel", "merge_kernel", "pair_minmax_kernel", "partition_kernel",
                    "paper_kernel", "sign_kernel", "ties_merge_kernel", "equal_count_kernel"}


# the passes of PCB over an [n, D] matrix (the one input whose rows may start at any element)
UNALIGNED_KERNELS = {"magnitude_kernel", "official_kernel", "merge_kernel", "pair_minmax_kernel", "partition_kernel",
                     "paper_kernel"}


def _tile(dtype: str) -> dict:
    return {"x_ptr": dtype, "base_ptr": dtype, "table_ptr": "*i64", "programs_ptr": "*i64", "n": "i32"}


def cases(full: bool) -> list:
    """Every kernel and variant. The kernels loop over the tasks, so their code does not depend on the
    number of tasks: one compile serves 1 to 64, reported as 64 (the per-program atomics are counted
    for 64 tasks). Each kernel is compiled for full tiles (the bulk: no mask) and for the parts' last,
    partial tiles. Fast: bf16 fine-tuned rows with a base (a model merge), and PCB's passes over
    float32 task vectors whose row starts are not 16 bytes apart (ALIGN=1: an [n, D] matrix of odd
    D, as the ViT-B/32 size, where the device has no room to pad the rows); ``full``: also float32
    task vectors without a base (``pcb_merge`` on a matrix), fp16 and fp64 rows with a base."""
    from pcb_fast.kernels.merge import tail_warps as merge_tail_warps
    from pcb_fast.kernels.score import PAIR_TILES, tail_warps
    from pcb_fast.kernels.ties import SIGN_TAIL_WARPS
    from pcb_fast.kernels.tiles import BLOCK, TAIL_WARPS, warps

    tasks = 64
    out = [Case("find", "bucket search", 0, "select", "find_kernel",
                {"hist_ptr": "*i64", "rank_ptr": "*i64", "index_ptr": "*i64", "below_ptr": "*i64"},
                {"R": 2, "PER_ROW": True})]
    inputs = [("*bf16", True, full_tiles, False) for full_tiles in (True, False)] + [("*fp32", False, True, True)]
    inputs += [(d, b, f, False) for d, b in (("*fp32", False), ("*fp16", True), ("*fp64", True))
               for f in (True, False)] if full else []
    for dtype, has_base, full_tiles, unaligned in inputs:
        align = 1 if unaligned else 16 // {"*bf16": 2, "*fp16": 2, "*fp32": 4, "*fp64": 8}[dtype]
        common = dict(HAS_BASE=has_base, ALIGN=align, BASE_ALIGN=align, FULL=full_tiles, BLOCK=BLOCK)
        tile = _tile(dtype)
        suffix = f", {dtype[1:]}" + (" + base" if has_base else "") + ("" if full_tiles else ", last tiles")
        suffix += ", unaligned rows (ALIGN=1)" if unaligned else ""

        def add(kernel, variant, module, fn, sig, consts, options=None):
            if unaligned and fn not in UNALIGNED_KERNELS:
                return
            if "out_ptr" in sig:
                consts = dict(consts, OUT_ALIGN=16 // {"*fp32": 4, "*fp64": 8}.get(sig["out_ptr"], 2))
            sig = dict(tile, **sig)
            aligned = [a for a, t in sig.items() if t.startswith("*")] + ["m"]
            tail = TAIL_WARPS  # the last tiles' warps, as each launcher picks them
            if fn in ("magnitude_kernel", "official_kernel"):
                tail = tail_warps(fn, consts.get("LEVEL", 0))
            elif fn == "merge_kernel":
                tail = merge_tail_warps(consts["VARIANT"], consts["INTER"])
            elif fn == "sign_kernel":
                tail = SIGN_TAIL_WARPS
            options = dict(options or {}, num_warps=warps(full_tiles, tail))  # as the launchers pass it
            grouped = [False, True] if dtype == "*bf16" else [False]  # scope "tensor": bf16 rows (the CI subset)
            for per_part in grouped if fn in PER_PART_KERNELS else [None]:
                flags = {} if per_part is None else {"PER_PART": per_part}
                reduced = 1
                if fn == "pair_minmax_kernel":  # tiles reduced per program, as pair_minmax_pass launches it
                    reduced = flags["TILES"] = 1 if per_part else PAIR_TILES
                out.append(Case(kernel, variant + suffix + (", per tensor" if per_part else ""), tasks, module, fn,
                                sig, dict(common, **consts, **flags), tasks * BLOCK * reduced, aligned, options))

        count = dict(hist_ptr="*i64", bucket_ptr="*i64", map_ptr="*i64", bounds_ptr="*fp32", tally_ptr="*i64",
                     kept_ptr="*fp32", layout_ptr="*i64", copies="i32", tiles_ptr="*i32")
        # the radix select's levels 2 and 3 are the same code as 4 but for their shifts
        levels = [(0, "bracket"), (1, "radix level 1"), (2, "radix level 2"), (4, "radix level 4")]
        for level, name in levels:
            add("magnitude", name, "score", "magnitude_kernel", dict(count, bad_ptr="*i32"),
                dict(LEVEL=level, R=2, TILES=False))
        add("magnitude", "bracket recording tiles (TIES exact top-k)", "score", "magnitude_kernel",
            dict(count, bad_ptr="*i32"), dict(LEVEL=0, R=1, TILES=True))
        out_dtype = dtype if has_base else "*fp32"  # outputs in the base's dtype (theta), float32 without (tau_m)
        merge_sig = dict(out_ptr=out_dtype, s0_ptr="*fp32", s1_ptr="*fp32", s2_ptr="*fp32",
                         s3_ptr="*fp32", s4_ptr="*fp32", t_ptr="*fp32", span_ptr="*fp32", lambda_ptr="*fp32",
                         lam="fp32")
        for inter, name in enumerate(("sum", "normalized_sum", "pairwise")):
            for level, select in levels:
                add("official", f"{name} {select}", "score", "official_kernel",
                    dict(lo_ptr="*fp32", hi_ptr="*fp32", span_ptr="*fp32", **count, peak_ptr="*i32"),
                    dict(INTER=inter, LEVEL=level, R=1, TILES=False))
            add("merge", f"official {name}", "merge", "merge_kernel", merge_sig, dict(VARIANT=0, INTER=inter))
        add("pair_minmax", "paper", "score", "pair_minmax_kernel",
            dict(min_ptr="*i32", max_ptr="*i32", bad_ptr="*i32", count="i32"), {})
        add("partition", "paper", "score", "partition_kernel",
            dict(lo_ptr="*fp32", span_ptr="*fp32", peak_ptr="*fp32", inter_ptr="*fp32", intra_ptr="*fp32"), {})
        for level, select in levels:
            add("paper", select, "score", "paper_kernel",
                dict(lo_ptr="*fp32", span_ptr="*fp32", peak_ptr="*fp32", inv_inter_ptr="*fp32", inv_intra_ptr="*fp32",
                     **count), dict(LEVEL=level, R=1, TILES=False))
        add("merge", "paper", "merge", "merge_kernel", merge_sig, dict(VARIANT=1, INTER=0))
        for dare in (False, True):
            add("linear", "dare" if dare else "weighted sum", "linear", "linear_kernel",
                dict(out_ptr=out_dtype, weight_ptr="*fp32", divisor="fp32", lam="fp32", streams_ptr="*i64",
                     threshold="i32", keep_scale="fp32", bad_ptr="*i32", kept_ptr="*i64"), dict(DARE=dare))
        trim = dict(t_ptr="*fp32", weight_ptr="*fp32", streams_ptr="*i64", threshold="i32", keep_scale="fp32",
                    ties_ptr="*i64", budget_ptr="*i64")
        no_fma = {"enable_fp_fusion": False}  # as ties.py launches them
        for dare, exact, name in [(False, False, "threshold"), (False, True, "exact top-k"), (True, False, "dare")]:
            add("sign", name, "ties", "sign_kernel", dict(trim, total_ptr="*i64", kept_ptr="*i64", bad_ptr="*i32"),
                dict(DARE=dare, EXACT=exact), no_fma)
            add("ties_merge", name, "ties", "ties_merge_kernel",
                dict(trim, out_ptr=out_dtype, fill_ptr="*fp32", lam="fp32"), dict(DARE=dare, EXACT=exact), no_fma)
        add("equal_count", "exact top-k", "ties", "equal_count_kernel",
            dict(t_ptr="*fp32", counts_ptr="*i64"), {})
        if full_tiles and not unaligned:  # the column sample: one gather of strided columns per part
            sig = dict(tile, plan_ptr="*i64", out_ptr="*fp32", columns="i32")
            del sig["programs_ptr"]
            out.append(Case("sample", "strided columns, " + dtype[1:] + (" + base" if has_base else ""), tasks, "tiles",
                            "sample_kernel", sig, dict(HAS_BASE=has_base, ALIGN=align, BASE_ALIGN=align, BLOCK=1024),
                            0, [a for a, t in sig.items() if t.startswith("*")], {"num_warps": 4}))
        if full_tiles and not unaligned:  # Breadcrumbs: a program per row (no tiles), its row in registers
            from pcb_fast.kernels.breadcrumbs import LONG_CHUNK, LONG_WARPS, ROW_MAX, row_warps

            for block in sorted({256, 1024, ROW_MAX // 2 if dtype == "*fp64" else ROW_MAX}):
                sig = dict(tile, out_ptr=out_dtype, band_ptr="*i64", weight_ptr="*fp32", lam="fp32", kept_ptr="*i64",
                           bad_ptr="*i32")
                consts = dict(HAS_BASE=has_base, ALIGN=align, BASE_ALIGN=align,
                              OUT_ALIGN=16 // {"*fp32": 4, "*fp64": 8}.get(out_dtype, 2), ROW_BLOCK=block)
                consts["ROW_ALIGN"] = min(consts["ALIGN"], consts["OUT_ALIGN"])  # rows of a multiple of 16 bytes
                out.append(Case("breadcrumbs", f"rows of up to {block}, {dtype[1:]}" + (" + base" if has_base else ""),
                                tasks, "breadcrumbs", "breadcrumbs_kernel", sig, consts, tasks * block,
                                [a for a, t in sig.items() if t.startswith("*")], {"num_warps": row_warps(block)}))
            # rows longer than a program holds: read in chunks (every 70B projection)
            sig = dict(tile, out_ptr=out_dtype, band_ptr="*i64", weight_ptr="*fp32", lam="fp32", kept_ptr="*i64",
                       bad_ptr="*i32", scratch_ptr="*i64")
            consts = dict(HAS_BASE=has_base, ALIGN=align, BASE_ALIGN=align,
                          OUT_ALIGN=16 // {"*fp32": 4, "*fp64": 8}.get(out_dtype, 2), CHUNK=LONG_CHUNK)
            consts["ROW_ALIGN"] = min(consts["ALIGN"], consts["OUT_ALIGN"])
            out.append(Case("breadcrumbs", f"long rows, chunks of {LONG_CHUNK}, {dtype[1:]}"
                            + (" + base" if has_base else ""), tasks, "breadcrumbs", "long_rows_kernel", sig, consts,
                            0, [a for a, t in sig.items() if t.startswith("*")], {"num_warps": LONG_WARPS}))
    return out


# ---- compiling and reading the results


TARGET_ARCH = 90


def _ptxas_path() -> str:
    """The ptxas Triton itself runs for sm_90 (its bundled one; the API moved between versions)."""
    from triton import knobs
    from triton.backends.nvidia import compiler

    try:
        return compiler.get_ptxas(TARGET_ARCH).path
    except TypeError:  # no arch argument in some versions
        return compiler.get_ptxas().path
    except AttributeError:
        return knobs.nvidia.ptxas.path


def parse_ptxas(log: str) -> dict | None:
    """registers and spill bytes (stores + loads) from a ``ptxas -v`` log; None if it has none."""
    registers = re.search(r"Used (\d+) registers", log)
    stores = re.search(r"(\d+) bytes spill stores", log)
    loads = re.search(r"(\d+) bytes spill loads", log)
    if registers is None or stores is None or loads is None:
        return None
    return {"registers": int(registers.group(1)), "spill_bytes": int(stores.group(1)) + int(loads.group(1))}


def ptxas_usage(ptx: str, fmad: bool = True) -> dict:
    """registers and spill bytes of the (single) kernel in ``ptx``, from ``ptxas -v`` run again (when
    Triton's own log is not at hand), with Triton 3.9's flags."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        cmd = [_ptxas_path(), "-lineinfo", *([] if fmad else ["--fmad=false"]), "-v", "--regAllocOptLevel=2",
               "--gpu-name=sm_90a", str(src), "-o", str(src.with_suffix(".o"))]
        log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    usage = parse_ptxas(log)
    if usage is None:
        raise RuntimeError(f"unexpected ptxas -v output:\n{log}")
    return usage


_SHAPE = re.compile(r"->\s*tensor<([0-9x]+)x[a-z0-9]+>")


def atomics_per_element(ttir: str, tasks: int, entries: int) -> float:
    """Global atomics per task entry (see the module docstring) from the TTIR of one kernel."""
    if not entries:
        return 0.0
    total, loops = 0, []  # loops: indentation of each open scf.for
    for line in ttir.splitlines():
        indent = len(line) - len(line.lstrip())
        if loops and indent == loops[-1] and line.strip().startswith("}"):
            loops.pop()
        if "scf.for" in line and line.rstrip().endswith("{"):
            loops.append(indent)
        if "tt.atomic_rmw" in line or "tt.atomic_cas" in line:
            shape = _SHAPE.search(line)
            elements = 1
            if shape:
                for d in shape.group(1).split("x"):
                    elements *= int(d)
            total += elements * tasks ** len(loops)
    return total / entries


_LOAD = re.compile(r"ld\.global(?:\.[a-z]+)*?(?:\.v(\d))?\.[bfsu](\d+)\b")


def load_vector_bits(ptx: str, wide_rows: bool = False) -> int:
    """Width in bits of the global loads of 8- to 32-bit elements (the task rows, the base) that move
    the most data; 64-bit loads (offsets, histograms, counters) are left out, unless ``wide_rows``
    (float64 rows). 0 if there are none."""
    moved = {}
    for match in _LOAD.finditer(ptx):
        if int(match.group(2)) > 32 and not wide_rows:
            continue
        width = int(match.group(1) or 1) * int(match.group(2))
        moved[width] = moved.get(width, 0) + width
    return max(moved, key=lambda w: (moved[w], w)) if moved else 0


_INEXACT_DIV = ("div.full.", "div.approx.", "rcp.approx.")


def _opcodes(ptx: str):
    """The opcode of every PTX instruction (its predicate guard dropped)."""
    for line in ptx.splitlines():
        words = line.split()
        if words and words[0].startswith("@"):
            words = words[1:]
        if words and not words[0].startswith((".", "//", "$", "{", "}")):
            yield words[0]


def division_counts(ptx: str) -> dict:
    """``inexact_div``: PTX divisions that are not correctly rounded (``div.full``, up to 2 ulp;
    ``div.approx``; ``rcp.approx``), what fp32 ``/`` compiles to, where ``tl.math.div_rn`` gives
    ``div.rn``; ``approx_math``: other approximate ops (``ex2.approx`` from ``tl.exp``,
    ``tanh.approx``, ``lg2.approx``, ...)."""
    inexact = approx = 0
    for op in _opcodes(ptx):
        if op.startswith(_INEXACT_DIV):
            inexact += 1
        elif ".approx" in op:
            approx += 1
    return {"inexact_div": inexact, "approx_math": approx}


_DEF = re.compile(r"^\s*(%[\w.#$-]+)\s*=\s*([a-z_]+\.[\w.]+)(.*)$")
_STOP = {"tt.load", "arith.cmpi", "arith.cmpf", "tt.atomic_rmw", "tt.atomic_cas", "arith.constant", "tt.get_program_id",
         "tt.make_range", "tt.histogram", "tt.reduce", "tt.scan"}


def _is_i32(type_text: str) -> bool:
    type_text = type_text.strip()
    return type_text == "i32" or type_text.endswith("xi32>")


def address_multiplies_32(ttir: str) -> int:
    """32-bit integer multiplies (``arith.muli`` / ``arith.shli`` on i32) whose result flows into an
    address (an offset of ``tt.addptr``, through additions, casts, splats and selects), in a
    kernel's TTIR: each can wrap past 2^31 (docs/design.md 4: 64-bit offsets). A product formed in
    i32 and then widened counts too. Values loaded from memory, compared, or reduced end a chain."""
    defs, offsets = {}, []
    for line in ttir.splitlines():
        line = re.sub(r"\sloc\(.*\)\s*$", "", line)
        match = _DEF.match(line)
        if match is None:
            continue
        result, op, rest = match.groups()
        rest = re.sub(r"\{[^{}]*\}", "", rest)  # attribute dictionaries hold ": i32" too
        operands, _, types = rest.partition(" : ")
        names = re.findall(r"%[\w.#$-]+", operands)
        defs[result] = (op, names, types.split("->")[-1].split(",")[-1])
        if op == "tt.addptr" and len(names) == 2:
            offsets.append(names[1])
    flagged, seen, stack = set(), set(), offsets
    while stack:
        value = stack.pop()
        if value in seen or value not in defs:  # kernel and loop arguments end a chain
            continue
        seen.add(value)
        op, names, result_type = defs[value]
        if op in _STOP:
            continue
        if op in ("arith.muli", "arith.shli") and _is_i32(result_type):
            flagged.add(value)
        stack.extend(names[1:] if op == "arith.select" else names)
    return len(flagged)


def compile_case(case: Case) -> dict:
    """Compile one case for sm_90 and read its figures; {"error": ...} if it does not compile."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(f"pcb_fast.kernels.{case.module}"), case.fn)
    names = fn.arg_names
    signature = {a: ("constexpr" if a in case.consts else case.sig[a]) for a in names}
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in case.aligned if a in names}
    row = {"kernel": case.kernel, "variant": case.variant, "tasks": case.tasks}
    try:
        log = io.StringIO()
        start = time.perf_counter()
        with contextlib.redirect_stdout(log):  # Triton prints its own ptxas -v log (TRITON_DUMP_PTXAS_LOG)
            compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=case.consts, attrs=attrs),
                                      target=GPUTarget("cuda", TARGET_ARCH, 32), options=case.options or None)
        seconds = time.perf_counter() - start
        usage = parse_ptxas(log.getvalue())
        row.update(usage or ptxas_usage(compiled.asm["ptx"], case.options.get("enable_fp_fusion", True)))
    except Exception as e:  # noqa: BLE001 - reported, and --check fails on it
        return dict(row, error=f"{type(e).__name__}: {str(e)[:1500]}")
    row["shared_bytes"] = int(compiled.metadata.shared)
    row["atomics_per_element"] = round(atomics_per_element(compiled.asm["ttir"], case.tasks, case.entries), 4)
    row["load_vector_bits"] = load_vector_bits(compiled.asm["ptx"], case.sig.get("x_ptr") == "*fp64")
    row.update(division_counts(compiled.asm["ptx"]))
    row["address_multiplies_32"] = address_multiplies_32(compiled.asm["ttir"])
    row["compile_s"] = round(seconds, 2)
    return row


def _worker_init(cache: str) -> None:
    # this process is ours (a pool worker): an empty cache makes compile_s a real compile, and Triton
    # prints the log of its own ptxas run (its flags, whatever its version)
    os.environ["TRITON_CACHE_DIR"] = cache
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    os.environ.pop("TRITON_INTERPRET", None)


# ---- the modelled merges


def llama_keys(layers: int, hidden: int, intermediate: int, vocab: int, kv_hidden: int) -> list:
    """Entries of every floating tensor of a Llama model, in file order (embeddings, the layers'
    projections and norms, the final norm, an untied head)."""
    layer = [hidden * hidden, kv_hidden * hidden, kv_hidden * hidden, hidden * hidden,
             intermediate * hidden, intermediate * hidden, hidden * intermediate, hidden, hidden]
    return [vocab * hidden] + layer * layers + [hidden, vocab * hidden]


# (model, ranks): Llama-2-7B on one GPU, Llama-2-70B (grouped-query attention) on eight
LLM_SHAPES = {"7B_n8_1rank": (llama_keys(32, 4096, 11008, 32000, 4096), 1),
              "70B_n8_8ranks": (llama_keys(80, 8192, 28672, 32000, 1024), 8)}


def bracket_bytes_per_rank(brackets, n: int = TASKS) -> dict:
    """Device bytes the largest bracket pass of a merge allocates on the busiest rank, from the planner
    the kernels allocate by (kernels.select.bracket_plan), for each of LLM_SHAPES at scope "global":
    ``brackets(D)`` gives the ranks of each bracket pass; keys go to ranks as a distributed merge
    assigns them (balanced by size, in order)."""
    from pcb_fast.io.distributed import assign_shards
    from pcb_fast.kernels.select import bracket_plan, sample_stride

    out = {}
    for label, (keys, world) in LLM_SHAPES.items():
        D = sum(keys)
        local = max(sum(keys[k] for k in part) for part in assign_shards(keys, world))
        stride = sample_stride(D)
        sampled = -(-D // stride)
        out[label] = max(bracket_plan([ranks], [D], [sampled], n, [local])["bytes"] for ranks in brackets(D))
    return out


# an H100's L2 and the programs resident at once (132 SMs x 8 programs of 4 warps at 64 registers)
L2_BYTES = 50 * 2**20
RESIDENT_PROGRAMS = 132 * 8


def reads_by_n(rereads: dict) -> dict:
    """Reads of the inputs from device memory per merge, by tasks n and input dtype: a program re-reads
    its tile's task rows (the inter term, the paper's pairs) from the L2 while the resident programs'
    tiles (RESIDENT_PROGRAMS x n x BLOCK x element bytes) fit in it, else from memory. ``rereads``:
    {pass: extra reads of the rows as a function of n}."""
    from pcb_fast.kernels.tiles import BLOCK

    out = {}
    for n in (8, 16, 32, 64):
        row = {}
        for dtype, size in (("float32", 4), ("bfloat16", 2)):
            fits = RESIDENT_PROGRAMS * n * BLOCK * size <= L2_BYTES
            row[dtype] = sum(1 + (0 if fits else extra(n)) for extra in rereads.values())
        out[str(n)] = row
    return out


def merges(n: int = TASKS) -> dict:
    """Passes over the inputs per merge when every sampled bracket holds (a miss adds the radix
    select's four), modelled bytes (fp32 inputs, no base) over one read of the inputs, the device
    bytes of the largest bracket pass per rank for Llama-7B and -70B shapes, and the reads of the
    inputs from memory by tasks n (``reads_by_n``: where the re-reads of a program's rows miss the L2).

    Bytes: every pass reads the n task rows once (4 n D); the merge writes D float32 values; the
    column sample reads one column in sample_stride(D) (a 32-byte sector for each value it takes);
    each bracket pass copies and sorts the entries inside its brackets (about twice its buffer,
    read and written, per rank). Rereads of other tasks' rows inside a program (the inter term) hit
    the cache and are not counted there."""
    from pcb_fast.core.formulas import clip_indices, keep_index
    from pcb_fast.kernels.select import sample_stride

    plans = {  # (reads of the inputs, ranks counted in bracket passes, each bracket pass's ranks, rereads per pass)
        "pcb_official": (3, 3, lambda D: [list(clip_indices(D, 1e-4)), [keep_index(D, 0.1)]],
                         {"magnitude": lambda k: 0, "score": lambda k: 1, "merge": lambda k: 1}),  # inter "sum"
        "pcb_official_pairwise": (3, 3, lambda D: [list(clip_indices(D, 1e-4)), [keep_index(D, 0.1)]],
                                  {"magnitude": lambda k: 0, "score": lambda k: k, "merge": lambda k: k}),
        "pcb_paper": (4, 1, lambda D: [[keep_index(D, 0.1)]],
                      {"pair min/max": lambda k: k // 2, "partition": lambda k: k, "score": lambda k: k,
                       "merge": lambda k: k}),
        "ties": (3, 1, lambda D: [[D - int(D * 0.2) - 1]],  # density 0.2
                 {"magnitude": lambda k: 0, "signs": lambda k: 0, "merge": lambda k: 1}),
    }
    out = {}
    for name, (reads, ranks, brackets, rereads) in plans.items():
        sizes = {}
        for D in SIZES:
            stride = sample_stride(D)
            s = D // stride
            window = 2 * (6 * (s * 0.25) ** 0.5 + 8)  # the widest bracket (q = 1/2), in sample ranks
            inside = n * ranks * window * stride  # entries copied, all tasks and ranks
            sample = 32 * n * s
            sizes[str(D)] = int(reads * 4 * n * D + 4 * D + sample + 4 * 4 * inside)
        out[name] = {"reads": reads,
                     "bytes_over_one_read": round(max(b / (4 * n * int(D)) for D, b in sizes.items()), 3),
                     "bytes": sizes,
                     "bracket_bytes_per_rank": bracket_bytes_per_rank(brackets, n),
                     "reads_by_n": reads_by_n(rereads)}
    return out


# ---- main


def run(full: bool, jobs: int, echo=print) -> list:
    todo = cases(full)
    with tempfile.TemporaryDirectory() as cache, \
            ProcessPoolExecutor(max_workers=jobs, initializer=_worker_init, initargs=(cache,)) as pool:
        rows = []
        for case, row in zip(todo, pool.map(compile_case, todo)):
            rows.append(row)
            if "error" in row:
                echo(f"FAIL {case.label}: {row['error']}")
            else:
                echo(f"ok   {case.label}: {row['registers']} registers, {row['spill_bytes']} B spilled, "
                     f"{row['shared_bytes']} B shared, {row['atomics_per_element']} atomics/entry, "
                     f"{row['load_vector_bits']}-bit loads, {row['compile_s']} s")
    return rows


def table(rows: list) -> str:
    lines = ["| kernel | variant | tasks | registers | spill bytes | shared bytes | atomics / entry | load bits "
             "| inexact div | approx ops | 32-bit address multiplies | compile s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['kernel']} | {r['variant']} | {r['tasks']} | failed | | | | | | | | |")
        else:
            lines.append(f"| {r['kernel']} | {r['variant']} | {r['tasks']} | {r['registers']} | {r['spill_bytes']} | "
                         f"{r['shared_bytes']} | {r['atomics_per_element']} | {r['load_vector_bits']} | "
                         f"{r['inexact_div']} | {r['approx_math']} | {r['address_multiplies_32']} | {r['compile_s']} |")
    return "\n".join(lines)


NOT_TILED = {"find": "n/a (int64 counts only)", "sample": "n/a (strided columns: scalar loads)"}


def summary(rows: list) -> str:
    """One row per kernel over its variants and input dtypes (the table of docs/benchmarks.md)."""
    lines = ["| kernel | variants | registers | spill bytes | global atomics / entry | load width, full tiles (bits) "
             "| compile s (max) |",
             "|---|---|---|---|---|---|---|"]
    name = lambda r: r["kernel"] + (" (radix fallback)" if "radix" in r["variant"] else "")  # noqa: E731
    for kernel in dict.fromkeys(name(r) for r in rows):
        group = [r for r in rows if name(r) == kernel and "error" not in r]
        if not group:
            lines.append(f"| {kernel} | failed to compile | | | | | |")
            continue
        regs = sorted({r["registers"] for r in group})
        atomics = sorted({r["atomics_per_element"] for r in group})
        bits = sorted({r["load_vector_bits"] for r in group
                       if "last tiles" not in r["variant"] and "ALIGN=1" not in r["variant"]})
        span = lambda v: f"{v[0]}" if len(v) == 1 else f"{v[0]}-{v[-1]}"  # noqa: E731
        lines.append(f"| {kernel} | {len(group)} | {span(regs)} | {sum(r['spill_bytes'] for r in group)} | "
                     f"{span(atomics)} | {span(bits) if kernel not in NOT_TILED else NOT_TILED[kernel]} | "
                     f"{max(r['compile_s'] for r in group)} |")
    return "\n".join(lines)


FIELDS = ("kernel", "variant", "tasks", "registers", "spill_bytes", "shared_bytes", "atomics_per_element",
          "load_vector_bits", "inexact_div", "approx_math", "address_multiplies_32", "compile_s")
# Kernels whose results are claimed equal to the CPU path's (docs/design.md 9: the baselines, the
# order statistics and the column sample): no approximate op may run in them. PCB's scores use the
# device's exp (ex2.approx), which the tolerance of docs/design.md 9 covers.
EXACT_KERNELS = {"find", "magnitude", "sample", "linear", "sign", "ties_merge", "equal_count", "breadcrumbs"}
BRACKET_BYTES_LIMIT = 1 << 30  # device bytes of a bracket pass on one rank (kernels.json merges.*.bracket_bytes_per_rank)


def problems(report: dict) -> list:
    """What ``--check`` fails on, one line each: a kernel that does not compile or spills; any
    division that is not correctly rounded (memory-bound kernels afford ``div.rn``); an approximate
    op in a kernel claimed exact (EXACT_KERNELS); a 32-bit multiply feeding an address; a bracket
    pass planned over BRACKET_BYTES_LIMIT on one rank."""
    out = []
    for r in report["kernels"]:
        label = f"{r['kernel']} [{r['variant']}]"
        if r.get("error"):
            out.append(f"{label}: does not compile: {r['error'][:200]}")
            continue
        if r.get("spill_bytes"):
            out.append(f"{label}: spills {r['spill_bytes']} bytes")
        if r.get("inexact_div"):
            out.append(f"{label}: {r['inexact_div']} divisions that are not correctly rounded (use tl.math.div_rn)")
        if r.get("approx_math") and r["kernel"] in EXACT_KERNELS:
            out.append(f"{label}: {r['approx_math']} approximate ops in a kernel whose results must equal the CPU's")
        if r.get("address_multiplies_32"):
            out.append(f"{label}: {r['address_multiplies_32']} 32-bit multiplies feed addresses (can wrap past 2^31)")
    for name, merge in report.get("merges", {}).items():
        for shape, size in merge.get("bracket_bytes_per_rank", {}).items():
            if size > BRACKET_BYTES_LIMIT:
                out.append(f"{name}: the bracket pass plans {size / 2**30:.2f} GiB on one rank for {shape} "
                           f"(at most {BRACKET_BYTES_LIMIT / 2**30:.0f} GiB)")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="the CI subset: every kernel and variant, bf16 rows with a base")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default: results/kernels.json, not with --fast)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--check", action="store_true",
                        help="exit 1 on a kernel that fails to compile, spills, divides inexactly, runs approximate "
                             "math where it claims exactness or multiplies addresses in 32 bits, or on a bracket "
                             "plan over 1 GiB per rank")
    args = parser.parse_args(argv)
    rows = run(full=not args.fast, jobs=args.jobs)
    report = {"kernels": [{k: r.get(k) for k in FIELDS} | ({"error": r["error"]} if "error" in r else {})
                          for r in rows],
              "merges": merges()}
    out = args.out if args.out is not None else (None if args.fast else RESULTS / "kernels.json")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {out}")
    print(table(rows))
    print()
    print(summary(rows))
    found = problems(report)
    for line in found:
        print("CHECK", line)
    failed = [r for r in rows if "error" in r]
    print(f"{len(rows)} kernels compiled, {len(failed)} failed, {len(found)} problems")
    return 1 if args.check and found else 0


if __name__ == "__main__":
    sys.exit(main())
