"""The Triton kernels compile for a CUDA GPU (sm_90) without spilling, checked on this CPU machine by
Triton's own compiler and its bundled ptxas (``python -m benchmarks.kernel_report --fast --check``);
the interpreter used by test_triton.py cannot see compile errors or register pressure."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import kernel_report  # noqa: E402


def _nvidia_backend() -> bool:
    try:
        from triton.backends import backends
    except ImportError:
        return False
    return "nvidia" in backends


@pytest.mark.skipif(not _nvidia_backend(), reason="triton's NVIDIA backend (with ptxas) is not installed")
def test_every_kernel_compiles_for_an_h100_without_spilling(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "kernels.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.kernel_report", "--fast", "--check", "--jobs", "2",
                           "--out", str(out)], env=env, text=True, capture_output=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    report = json.loads(out.read_text())
    rows = report["kernels"]
    assert len(rows) >= 26
    kernels = {r["kernel"] for r in rows}
    assert kernels >= {"find", "magnitude", "official", "merge", "pair_minmax", "partition", "paper", "linear",
                       "sign", "ties_merge", "equal_count", "breadcrumbs", "sample"}
    for r in rows:
        assert r["spill_bytes"] == 0 and 0 < r["registers"] <= 128, r
        # correctly rounded division everywhere, no approximate op where results must equal the CPU's,
        # 64-bit address arithmetic (docs/design.md 4)
        assert r["inexact_div"] == 0 and r["address_multiplies_32"] == 0, r
        assert r["kernel"] not in kernel_report.EXACT_KERNELS or r["approx_math"] == 0, r
    assert any(r["approx_math"] for r in rows if r["kernel"] == "official")  # the reader sees tl.exp's ex2.approx
    # task rows and the base load as 128-bit vectors in full tiles (aligned row starts, no mask at an
    # unknown length; docs/design.md 4); the parts' last tiles load element by element. Breadcrumbs'
    # rows (a program per row) hold 8 entries per thread up to 1024 entries (128-bit bf16 loads), 4
    # beyond (64 bits: 8 per thread spilled there, kernels/breadcrumbs.py row_warps)
    # (the column sample gathers strided columns: scalar loads by nature, a small fraction of a read)
    full_tiles = [r for r in rows if r["kernel"] not in ("find", "breadcrumbs", "sample") and "last tiles" not in r["variant"]
                  and "ALIGN=1" not in r["variant"]]
    assert len(full_tiles) >= 26 and all(r["load_vector_bits"] == 128 for r in full_tiles)
    # rows whose starts are not 16 bytes apart (an odd [n, D] matrix that the device had no room to pad)
    # compile for every pass of PCB, with 32-bit loads
    unaligned = [r for r in rows if "ALIGN=1" in r["variant"]]
    assert {r["kernel"] for r in unaligned} == {"magnitude", "official", "merge", "pair_minmax", "partition", "paper"}
    assert all(r["load_vector_bits"] == 32 for r in unaligned), unaligned
    crumbs = [r for r in rows if r["kernel"] == "breadcrumbs"]
    half = lambda v: "up to 4096" in v and ("bf16" in v or "fp16" in v)  # noqa: E731 - 4 half floats: 64 bits
    # long rows, read in chunks of 1024 at 16 warps: 2 entries per thread (32 bits of bf16)
    width = lambda v: 32 if "long rows" in v else 64 if half(v) else 128  # noqa: E731
    assert crumbs and all(r["load_vector_bits"] == width(r["variant"]) for r in crumbs), crumbs
    assert set(report["merges"]) == {"pcb_official", "pcb_official_pairwise", "pcb_paper", "ties"}
    for merge in report["merges"].values():
        assert all(0 < v <= 1 << 30 for v in merge["bracket_bytes_per_rank"].values()), merge


def test_report_reads_ptx_and_ttir():
    """The readers of the report on hand-written snippets (so a change of Triton's output format fails here)."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.kernel_report import atomics_per_element, load_vector_bits

    ptx = "\n".join(["@%p1 ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];"] * 2
                    + ["@%p2 ld.global.b32 { %r5 }, [ %rd2 + 0 ];"] * 3 + ["ld.global.b64 { %rd3 }, [ %rd4 + 0 ];"] * 9)
    assert load_vector_bits(ptx) == 128
    ttir = """  tt.func public @k() {
    %0 = tt.atomic_rmw max, relaxed, gpu, %a, %b, %c : (!tt.ptr<i32>, i32, i1) -> i32
    %1 = scf.for %i = %c0 to %n step %c1 iter_args(%x = %y) -> (tensor<1024xf32>)  : i32 {
      %2 = tt.atomic_rmw add, relaxed, gpu, %p, %q, %r : (tensor<1024x!tt.ptr<i64>>, tensor<1024xi64>, tensor<1024xi1>) -> tensor<1024xi64>
      scf.yield %x : tensor<1024xf32>
    }
    tt.return
  }"""
    # per program: 1 scalar atomic + 8 tasks x 1024 histogram atomics, over 8 x 1024 entries
    assert atomics_per_element(ttir, 8, 8 * 1024) == pytest.approx(1 + 1 / 8192)


def test_report_counts_inexact_division_and_approximate_math():
    ptx = """
\tdiv.rn.f32 \t%r12, %r3, %r11;
\t@%p1 div.full.f32 \t%r13, %r3, %r11;
\tdiv.approx.ftz.f32 \t%r15, %r14, %r13;
\trcp.approx.ftz.f64 \t%rd2, %rd1;
\tex2.approx.f32 \t%r10, %r9;
\ttanh.approx.f32 \t%r16, %r9;
\tdiv.s64 \t%rd3, %rd4, %rd5;
// div.full.f32 in a comment
"""
    assert kernel_report.division_counts(ptx) == {"inexact_div": 3, "approx_math": 2}


def test_report_finds_32_bit_multiplies_that_feed_addresses():
    ttir = """
    %c2_i32 = arith.constant 2 : i32 loc(#loc1)
    %pid = tt.get_program_id x : i32 loc(#loc2)
    %part = arith.muli %pid, %c2_i32 : i32 loc(#loc3)
    %p = tt.addptr %programs_ptr, %part : !tt.ptr<i64>, i32 loc(#loc4)
    %wide = arith.extsi %pid : i32 to i64 loc(#loc5)
    %ok = arith.muli %wide, %wide : i64 loc(#loc6)
    %q = tt.addptr %programs_ptr, %ok : !tt.ptr<i64>, i64 loc(#loc7)
    %r = tt.make_range {end = 128 : i32, start = 0 : i32} : tensor<128xi32> loc(#loc8)
    %narrow = arith.muli %pid, %n : i32 loc(#loc9)
    %widened = arith.extsi %narrow : i32 to i64 loc(#loc10)
    %s = tt.addptr %x_ptr, %widened : !tt.ptr<f32>, i64 loc(#loc11)
    %count = arith.muli %pid, %pid : i32 loc(#loc12)
    %t = tt.addptr %x_ptr, %r : tensor<128x!tt.ptr<f32>>, tensor<128xi32> loc(#loc13)
"""
    # %part (i32, straight in) and %narrow (i32, widened after the product); %ok is 64-bit and
    # %count feeds no address
    assert kernel_report.address_multiplies_32(ttir) == 2


def _report(**row):
    good = {"kernel": "linear", "variant": "v", "tasks": 64, "spill_bytes": 0, "inexact_div": 0, "approx_math": 0,
            "address_multiplies_32": 0}
    return {"kernels": [dict(good, **row)],
            "merges": {"pcb_official": {"bracket_bytes_per_rank": {"7B_n8_1rank": 1 << 29}}}}


@pytest.mark.parametrize("row, reason", [
    (dict(inexact_div=1), "not correctly rounded"),
    (dict(approx_math=2), "approximate ops"),
    (dict(address_multiplies_32=1), "32-bit multiplies"),
    (dict(spill_bytes=8), "spills"),
    (dict(error="boom"), "does not compile"),
])
def test_check_fails_on_each_problem(row, reason):
    assert kernel_report.problems(_report()) == []
    found = kernel_report.problems(_report(**row))
    assert len(found) == 1 and reason in found[0], found


def test_check_allows_approximate_exp_in_pcb_scores_only():
    assert kernel_report.problems(_report(kernel="official", approx_math=16)) == []
    assert kernel_report.problems(_report(kernel="sign", approx_math=1))


def test_check_fails_on_a_bracket_plan_over_1_gib_per_rank(monkeypatch):
    report = _report()
    report["merges"]["pcb_official"]["bracket_bytes_per_rank"]["7B_n8_1rank"] = (1 << 30) + 1
    found = kernel_report.problems(report)
    assert len(found) == 1 and "7B_n8_1rank" in found[0] and "GiB" in found[0]


def test_check_exits_1_through_the_command_line(monkeypatch, tmp_path, capsys):
    """``--check`` turns a problem into exit status 1 (here an inexact division in an exact kernel)."""
    row = dict(_report(inexact_div=2)["kernels"][0], registers=32, shared_bytes=0, atomics_per_element=0.0,
               load_vector_bits=128, compile_s=0.1)
    monkeypatch.setattr(kernel_report, "run", lambda full, jobs: [row])
    assert kernel_report.main(["--fast", "--check", "--out", str(tmp_path / "k.json")]) == 1
    assert "CHECK linear [v]: 2 divisions" in capsys.readouterr().out
    monkeypatch.setattr(kernel_report, "run", lambda full, jobs: [dict(row, inexact_div=0)])
    assert kernel_report.main(["--fast", "--check", "--out", str(tmp_path / "k.json")]) == 0


def test_bracket_plans_stay_under_1_gib_per_rank_and_the_old_sizing_did_not(monkeypatch):
    """The planner the bracket allocates by (kernels.select.bracket_plan) for Llama-7B on one rank and
    Llama-70B on eight: under 1 GiB on the busiest rank. With the sizing before (a 2^18-column sample
    and rooms of twice the expected copies) the 7B plan passed 1 GiB and --check fails on it."""
    from pcb_fast.kernels import select as ks

    report = {"kernels": [], "merges": kernel_report.merges()}
    sizes = report["merges"]["pcb_official"]["bracket_bytes_per_rank"]
    assert set(sizes) == {"7B_n8_1rank", "70B_n8_8ranks"} and all(0 < v <= 1 << 30 for v in sizes.values()), sizes
    assert kernel_report.problems(report) == []
    monkeypatch.setattr(ks, "SAMPLE_COLUMNS", (1 << 18, 1 << 18))
    monkeypatch.setattr(ks, "ROOM_FACTOR", 2.0)
    old = kernel_report.merges()
    assert old["pcb_official"]["bracket_bytes_per_rank"]["7B_n8_1rank"] > 1 << 30
    assert any("pcb_official" in line and "7B_n8_1rank" in line
               for line in kernel_report.problems({"kernels": [], "merges": old}))


def test_reads_by_n_state_where_rereads_leave_the_l2():
    reads = kernel_report.merges()["pcb_official"]["reads_by_n"]
    assert reads["8"] == {"float32": 3, "bfloat16": 3}  # n=8: every re-read from the L2
    assert reads["64"]["float32"] > 3  # n=64 fp32: the inter term's re-reads come from memory
    pairwise = kernel_report.merges()["pcb_official_pairwise"]["reads_by_n"]
    assert pairwise["64"]["float32"] > 64
