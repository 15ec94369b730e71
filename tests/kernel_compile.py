"""Compile every Triton kernel of pcb_fast for a CUDA GPU (sm_90), on a machine without one.

    python tests/kernel_compile.py [--full]

A thin form of ``python -m benchmarks.kernel_report --check`` (the compile code lives there):
Triton lowers each kernel through TTIR, TTGIR, LLVM IR and PTX to a cubin with its bundled ptxas, so
errors the interpreter cannot see (globals that are not constexpr, unsupported constructs, type
mismatches) show up here. Prints each kernel's registers and spills; exits 1 and names the kernels
with a problem (kernel_report.problems: a compile failure, a spill, inexact division,
approximate math where results must be exact, 32-bit address math, a bracket plan over 1 GiB). Without --full, the CI subset (every kernel and variant, bf16 rows).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from benchmarks import kernel_report  # noqa: E402

if __name__ == "__main__":
    rows = kernel_report.run(full="--full" in sys.argv, jobs=2)
    bad = kernel_report.problems({"kernels": rows, "merges": kernel_report.merges()})
    print("failures:", bad)
    sys.exit(1 if bad else 0)
