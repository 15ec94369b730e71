"""The kernels' addressing under TRITON_INTERPRET=1: rows whose starts are not 16 bytes apart (ALIGN=1:
element-by-element loads) and offsets past 2^31 elements (64-bit address arithmetic, docs/design.md 4).

Sizes past 2^31 elements cost nothing here: the rows and outputs are views of a sparse file mapped
shared, so only the pages the kernels touch are ever written."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")

from pcb_fast import merge, pcb_reference  # noqa: E402
from pcb_fast.gpu import backend as triton_backend  # noqa: E402
from pcb_fast.kernels.tiles import Rows, segment  # noqa: E402
from benchmarks.gpu_check import disagreements, official_near, paper_near  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def compare(got: torch.Tensor, ref: torch.Tensor, label: str, near: torch.Tensor) -> None:
    """The per-entry tolerance rule of docs/design.md 9 (benchmarks.gpu_check.disagreements)."""
    result = disagreements(got, ref, near)
    assert result["unexplained"] == 0, f"{label}: entries {result['first_unexplained']} differ"


def _sparse(path: Path, entries: int) -> torch.Tensor:
    """A float32 tensor of ``entries`` zeros mapped from a sparse file (no page written until touched)."""
    with open(path, "wb") as f:
        f.truncate(entries * 4)
    return torch.from_file(str(path), shared=True, size=entries, dtype=torch.float32)


@pytest.mark.parametrize("variant", ["official", "paper"])
def test_unaligned_rows_of_an_odd_matrix(gen, variant):
    """An [n, D] fp32 matrix of odd D: row starts one element apart modulo 4, so the kernels run with
    ALIGN=1 (scalar loads); the results obey the tolerance rule, and padding the rows to 16 bytes
    (what a GPU with room does) gives the same bits with vector loads."""
    n, D = 3, 4099
    tv = torch.randn(n, D, generator=gen) * 0.01
    rows = Rows.from_tensors(list(tv))
    assert rows.align == 1 and segment([rows])[0].align == 1
    out = torch.empty(D)
    triton_backend.pcb_merge_matrix(list(tv), out, pad=False, variant=variant, ratio=0.2)
    near = official_near(tv, 0.2, 1e-4, "sum") if variant == "official" else paper_near(tv, 0.2)
    compare(out, pcb_reference(tv, variant=variant, ratio=0.2), f"ALIGN=1 {variant}", near)
    padded = triton_backend.padded_rows(list(tv))
    assert Rows.from_tensors(padded).align == 4 and all(torch.equal(p, t) for p, t in zip(padded, tv))
    again = torch.empty(D)
    triton_backend.pcb_merge_matrix(list(tv), again, pad=True, variant=variant, ratio=0.2)
    assert torch.equal(again, out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unaligned_model_rows_match_the_torch_backend(gen, dtype):
    """Fine-tuned tensors that are views of one buffer at odd offsets (ALIGN=1 for the rows, a base
    apart): TIES, DARE-TIES and task arithmetic equal the torch backend's results."""
    n, D = 3, 2053
    flat = (torch.randn(n * D + 1, generator=gen) * 0.02).to(dtype)
    base = {"w": (torch.randn(D, generator=gen) * 0.02).to(dtype)}
    models = [{"w": flat[1 + i * D:1 + (i + 1) * D]} for i in range(n)]
    assert Rows.from_tensors([m["w"] for m in models], base=base["w"]).align == 1
    for method, params in [("ties", dict(density=0.3)), ("dare_ties", dict(p=0.5)), ("task_arithmetic", {})]:
        got = merge(base, models, method=method, backend="triton", **params)["w"]
        expected = merge(base, models, method=method, backend="torch", **params)["w"]
        assert torch.equal(got, expected), method


def test_rows_more_than_2_31_elements_apart(gen, tmp_path):
    """Two task rows 2^31 + 4096 elements apart (8 GiB of a sparse mapping): every pass addresses the
    second row through a 64-bit offset."""
    D, gap = 4096, (1 << 31) + 4096
    mapped = _sparse(tmp_path / "rows.bin", gap + D)
    tv = torch.randn(2, D, generator=gen) * 0.01
    mapped[:D] = tv[0]
    mapped[gap:gap + D] = tv[1]
    rows = [mapped[:D], mapped[gap:gap + D]]
    assert Rows.from_tensors(rows).offsets[1] * Rows.from_tensors(rows).align == gap
    out = torch.empty(D)
    triton_backend.pcb_merge_matrix(rows, out, ratio=0.3)
    compare(out, pcb_reference(tv, ratio=0.3), "rows 2^31 apart", official_near(tv, 0.3, 1e-4, "sum"))


def test_column_sample_written_past_2_31(tmp_path):
    """The column sample's output [n, columns] with n x columns past 2^31: row i starts at i x columns,
    a product that wrapped to a negative offset in 32 bits (a write before the buffer: a crash, hence
    a subprocess)."""
    script = textwrap.dedent(f"""
        import os, sys
        os.environ["TRITON_INTERPRET"] = "1"
        sys.path.insert(0, {str(ROOT)!r})
        import torch
        from pcb_fast.kernels.tiles import Rows, SAMPLE_BLOCK, segment, sample_kernel

        n, columns = 3, (1 << 30) + 64  # 2 x columns passes 2^31
        path = {str(tmp_path / "sample.bin")!r}
        with open(path, "wb") as f:
            f.truncate(n * columns * 4)
        out = torch.from_file(path, shared=True, size=n * columns, dtype=torch.float32)
        x = torch.arange(1.0, n * 40 + 1).view(n, 40)
        seg = segment([Rows.from_tensors(list(x))])[0]
        plan = torch.tensor([[0, 3, 2, 16, 5]], dtype=torch.int64)  # part 0: columns 3, 5, ..., 33 at place 5
        sample_kernel[(1,)](seg.anchor, seg.base_anchor, seg.table, plan, n, out, columns, HAS_BASE=False,
                            ALIGN=seg.align, BASE_ALIGN=seg.base_align, BLOCK=SAMPLE_BLOCK)
        for i in range(n):
            got = out[i * columns + 5:i * columns + 21]
            assert torch.equal(got, x[i, 3:35:2]), (i, got.tolist())
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "ok" in proc.stdout, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
