import os

# Triton kernels run only under the interpreter on a CPU, and the flag must be set before any
# @triton.jit decorator runs, hence before the package is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.pop("PCB_FAST_BACKEND", None)  # tests pick backends explicitly

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)


@pytest.fixture(autouse=True, scope="session")
def _accurate_exp():
    """The oracles called directly by tests compute exp after the warm-up that the public entry
    points run (pcb_fast/core/numerics.py), so that both sides of a bit-exact test see accurate exp."""
    from pcb_fast.core.numerics import warm_up_exp

    warm_up_exp()


# Lines a test wants in CI's log even when it passes (pytest -q captures print): the header fuzzer's counts.
_SUMMARY_LINES = []


@pytest.fixture
def summary_line():
    """Call with a string: it is printed at the end of the run, after the test results."""
    return _SUMMARY_LINES.append


def pytest_terminal_summary(terminalreporter):
    for line in _SUMMARY_LINES:
        terminalreporter.write_line(line)
