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
    # task rows and the base load as 128-bit vectors in full tiles (aligned row starts, no mask at an
    # unknown length; docs/design.md 4); the parts' last tiles load element by element. Breadcrumbs'
    # rows (a program per row) hold 8 entries per thread up to 1024 entries (128-bit bf16 loads), 4
    # beyond (64 bits: 8 per thread spilled there, kernels/breadcrumbs.py row_warps)
    # (the column sample gathers strided columns: scalar loads by nature, a small fraction of a read)
    full_tiles = [r for r in rows if r["kernel"] not in ("find", "breadcrumbs", "sample") and "last tiles" not in r["variant"]]
    assert len(full_tiles) >= 26 and all(r["load_vector_bits"] == 128 for r in full_tiles)
    crumbs = [r for r in rows if r["kernel"] == "breadcrumbs"]
    half = lambda v: "up to 4096" in v and ("bf16" in v or "fp16" in v)  # noqa: E731 - 4 half floats: 64 bits
    assert crumbs and all(r["load_vector_bits"] == (64 if half(r["variant"]) else 128) for r in crumbs), crumbs
    assert set(report["merges"]) == {"pcb_official", "pcb_paper", "ties"}


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
