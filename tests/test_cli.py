"""The pcb-fast command line and the demo."""

import subprocess
import sys

from pcb_fast.cli import main


def test_demo_runs_and_matches_reference(capsys):
    assert main(["demo", "--models", "2"]) == 0
    out = capsys.readouterr().out
    assert "merged 27 tensors" in out
    assert "kept fraction per task: 0.1000 0.1000" in out
    assert "results identical bit for bit: yes" in out


def test_bad_argument_is_one_line_error_and_exit_2():
    proc = subprocess.run([sys.executable, "-m", "pcb_fast", "demo", "--ratio", "1.5"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "pcb-fast: error: ratio=1.5 is out of range; valid: 0 < ratio <= 1"
    assert proc.stdout == ""
