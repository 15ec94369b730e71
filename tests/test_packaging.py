"""Packaging: ``kernels/`` is installed as ``pcb_fast.kernels`` and never shadows Hugging Face's
``kernels`` package (docs/design.md 1), from a checkout, an editable install or a wheel."""

import importlib.util
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def python(code: str, cwd: Path, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)


def hf_kernels_installed(tmp_path) -> bool:
    # asked from a folder that is not the repository root, where nothing of ours can answer
    return python("import importlib.util as u; print(u.find_spec('kernels') is not None)", tmp_path).stdout.strip() == "True"


def test_the_root_kernels_folder_is_no_regular_package():
    # a folder without __init__.py is a namespace portion: it loses to any regular package `kernels`
    assert not (ROOT / "kernels" / "__init__.py").exists()
    assert (ROOT / "pcb_fast" / "kernels").resolve() == (ROOT / "kernels").resolve()


def test_from_the_repository_root_kernels_is_hugging_faces_and_transformers_imports(tmp_path):
    if not hf_kernels_installed(tmp_path):
        pytest.skip("Hugging Face's `kernels` is not installed (CI installs it through the peers extra)")
    done = python("import kernels, transformers, peft; print(kernels.__file__)", ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    found = Path(done.stdout.strip().splitlines()[-1]).resolve()
    assert not found.is_relative_to(ROOT / "kernels"), f"`import kernels` from the root found ours: {found}"


def test_a_plain_checkout_imports_pcb_fast_kernels(tmp_path):
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); import pcb_fast.kernels.keys as k, pcb_fast; "
            "print(k.__file__); print(pcb_fast.__file__)")
    done = python(code, tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    keys, package = (Path(line) for line in done.stdout.split())
    assert package.resolve().is_relative_to(ROOT) and keys.resolve() == (ROOT / "kernels" / "keys.py")


def test_the_installed_package_imports_pcb_fast_kernels(tmp_path):
    # the editable install of the test environment (or whatever install is in use)
    done = python("import pcb_fast.kernels.keys as k; print(k.__file__)", tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.skipif(importlib.util.find_spec("setuptools") is None, reason="building a wheel needs setuptools")
def test_the_wheel_ships_every_kernel_and_c_source_and_imports_them(tmp_path):
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "dist"), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("pcb_fast-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"pcb_fast/kernels/{p.name}" for p in (ROOT / "kernels").glob("*.py")} <= names
    assert {f"pcb_fast/cpu/{p.name}" for p in (ROOT / "pcb_fast" / "cpu").glob("*.[ch]")} <= names
    assert not any(name.startswith("kernels/") for name in names), "the wheel installs a top-level `kernels`"

    target = tmp_path / "site"
    installed = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                                str(wheel)], capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stderr[-2000:]
    code = ("import pcb_fast, pcb_fast.kernels.keys as k, torch; from pcb_fast.cpu import native; "
            "print(k.__file__); print(native.problem()); "
            "out = pcb_fast.merge({'w': torch.zeros(8)}, [{'w': torch.arange(1.0, 9.0)}], method='ties', density=0.5); "
            "print(float(out['w'].sum()))")
    done = python(code, tmp_path, PYTHONPATH=str(target), PCB_FAST_CACHE=str(tmp_path / "cache"))
    assert done.returncode == 0, done.stderr[-2000:]
    keys, problem, total = done.stdout.split("\n")[:3]
    assert Path(keys).is_relative_to(target)
    assert problem == "None", f"the wheel's C kernels do not build: {problem}"
    assert float(total) == 4 + 5 + 6 + 7 + 8  # the authors' kthvalue keeps the entries >= sort(|tau|)[3]


def test_every_pcb_fast_import_of_the_ci_scripts_exists():
    """.ci/wheel_check runs outside pytest: a module it imports that moved would fail only in CI."""
    import ast
    import importlib
    import re

    for script in sorted((ROOT / ".ci").iterdir()):
        text = script.read_text()
        for line in re.findall(r"^(?:from pcb_fast\S* import .+|import pcb_fast.*)$", text, re.MULTILINE):
            for node in ast.walk(ast.parse(line)):
                if isinstance(node, ast.ImportFrom):
                    module = importlib.import_module(node.module)
                    for alias in node.names:
                        assert hasattr(module, alias.name) or importlib.util.find_spec(
                            f"{node.module}.{alias.name}") is not None, (script.name, line)
                elif isinstance(node, ast.Import):
                    for alias in node.names:
                        importlib.import_module(alias.name)
