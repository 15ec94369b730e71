"""benchmarks/gpu_check.sh, the GPU machine's runbook, run here with its steps stubbed: it must stop at
once when the kernels do not import as pcb_fast.kernels or Triton is older than 3.6 (an install
that ignored the kernels/ link, or a preinstalled old Triton under --no-deps), and run its steps
otherwise."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def _run(tmp_path: Path, sitecustomize: str) -> subprocess.CompletedProcess:
    """The runbook with PYTHON a wrapper: pip and the ``-m`` steps are stubbed (they print their
    module), ``-c`` runs this Python with ``sitecustomize`` loaded first."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(sitecustomize)
    wrapper = tmp_path / "python"
    wrapper.write_text(f"""#!/usr/bin/env bash
if [ "$1" = "-m" ]; then echo "STEP $2"; exit 0; fi
exec {sys.executable} "$@"
""")
    wrapper.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHON=str(wrapper), PYTHONPATH=str(site))
    return subprocess.run(["bash", str(SCRIPT)], env=env, text=True, capture_output=True, timeout=300)


def test_runbook_runs_its_steps_when_the_kernels_import(tmp_path):
    proc = _run(tmp_path, "")
    assert "STEP benchmarks.kernel_report" in proc.stdout and "STEP benchmarks.gpu_check" in proc.stdout, proc.stdout


def test_runbook_stops_at_once_on_a_triton_older_than_3_6(tmp_path):
    proc = _run(tmp_path, "import triton\ntriton.__version__ = '3.5.1'\n")
    assert proc.returncode == 1
    assert "older than 3.6" in proc.stdout + proc.stderr
    assert "STEP benchmarks." not in proc.stdout  # no step ran


def test_runbook_stops_at_once_when_the_kernels_do_not_import(tmp_path):
    # what an install through `setup.py develop` gave: pcb_fast without its kernels
    blocker = """import sys
class _NoKernels:
    def find_spec(self, name, path=None, target=None):
        if name == "pcb_fast.kernels" or name.startswith("pcb_fast.kernels."):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return None
sys.meta_path.insert(0, _NoKernels())
"""
    proc = _run(tmp_path, blocker)
    assert proc.returncode == 1
    assert "pcb_fast.kernels" in proc.stdout + proc.stderr
    assert "STEP benchmarks." not in proc.stdout
