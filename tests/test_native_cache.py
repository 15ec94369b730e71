"""The C kernels' build cache (pcb_fast/cpu/native.py): a cached library is loaded only after its
recorded SHA-256 matches (a truncated or replaced file is built again, never loaded), the cache
folder must be the user's and writable by no one else (a library planted there is never loaded),
the key follows what the build depends on (the target -march=native resolves to), processes
starting together compile once, and every kernel's signature is checked against native.h."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pcb_fast.cpu import native

pytestmark = pytest.mark.skipif(native._compiler() is None, reason="no C compiler here")


def run_python(code: str, cache: Path, **env) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter whose kernel cache is ``cache``."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PCB_FAST_CACHE": str(cache), **env})


USE_THE_KERNEL = """
    import torch
    from pcb_fast.cpu import native
    print("problem:", native.problem())
    a, b = native.row_order_statistics(torch.arange(10.0).reshape(2, 5), 0, 4)
    print("values:", a.flatten().tolist(), b.flatten().tolist())
"""


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """A kernel cache with the library built once for this module's tests (copied by each)."""
    cache = tmp_path_factory.mktemp("built") / "cache"
    done = run_python(USE_THE_KERNEL, cache)
    assert done.returncode == 0 and "problem: None" in done.stdout, done.stderr
    return cache


@pytest.mark.parametrize("damage", ["truncated", "another library"])
def test_a_damaged_cached_library_is_built_again_not_loaded(tmp_path, built, damage):
    cache = tmp_path / "cache"
    shutil.copytree(built, cache)
    (library,) = cache.glob("native-*.so")
    good = library.read_bytes()
    if damage == "truncated":
        library.write_bytes(good[: len(good) // 3])
    else:  # a valid ELF of another build: loading it would call kernels that are not there
        other = tmp_path / "other.c"
        other.write_text("int unrelated(void) { return 1; }\n")
        subprocess.run([native._compiler(), "-shared", "-fPIC", "-o", str(library), str(other)], check=True)
    done = run_python(USE_THE_KERNEL, cache)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "problem: None" in done.stdout and "values: [4.0, 9.0] [0.0, 5.0]" in done.stdout
    assert library.read_bytes() == good


def test_a_cache_folder_others_can_write_is_refused_and_nothing_planted_runs(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir()
    os.chmod(cache, 0o777)
    planted = tmp_path / "planted.c"
    marker = tmp_path / "constructor-ran"
    planted.write_text(f'#include <stdio.h>\n__attribute__((constructor)) static void run(void) {{ FILE *f = '
                       f'fopen("{marker}", "w"); if (f) fclose(f); }}\n')
    compiler = native._compiler()
    monkeypatch.setenv("PCB_FAST_CACHE", str(cache))
    for flags in native.FLAG_SETS:  # at the very name a load would use, with a matching record
        path = str(native.library_path(compiler, list(flags)))
        subprocess.run([compiler, "-shared", "-fPIC", "-o", path, str(planted)], check=True)
        digest = subprocess.run(["sha256sum", path], capture_output=True, text=True, check=True).stdout.split()[0]
        Path(path).with_suffix(".sha256").write_text(digest + "\n")
    done = run_python(USE_THE_KERNEL.replace('    a, b = native', '    raise SystemExit(0)\n    a, b = native'), cache)
    assert "others can write the kernel cache" in done.stdout, done.stdout + done.stderr
    assert not marker.exists()


def test_the_key_follows_the_target_the_flags_resolve_to(monkeypatch, tmp_path):
    monkeypatch.setenv("PCB_FAST_CACHE", str(tmp_path))
    compiler, flags = native._compiler(), list(native.FLAG_SETS[0])
    here = native.library_path(compiler, flags)
    assert here == native.library_path(compiler, flags)
    monkeypatch.setattr(native, "_target", lambda c, f: b"#define __AVX512F__ 1")
    assert native.library_path(compiler, flags) != here


def test_processes_starting_together_compile_once(tmp_path):
    log = tmp_path / "compiles.log"
    wrapper = tmp_path / "cc"
    wrapper.write_text(f'#!/bin/sh\ncase "$*" in *-shared*) echo x >> "{log}";; esac\nexec {native._compiler()} "$@"\n')
    wrapper.chmod(0o755)
    env = {**os.environ, "PCB_FAST_CACHE": str(tmp_path / "cache"), "CC": str(wrapper)}
    code = "from pcb_fast.cpu import native; print(native.problem())"
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(3)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(o.strip() == "None" for o in outs), outs
    assert log.read_text().count("x") == 1


def test_signatures_match_the_prototypes_of_native_h():
    declared = native.prototypes(native.HEADERS[0].read_text())
    assert set(declared) == set(native.SIGNATURES)
    assert all(declared[name] == native.SIGNATURES[name] for name in declared)


def test_a_signature_drift_is_never_called(monkeypatch, tmp_path):
    header = native.HEADERS[0].read_text().replace("int64_t merged_output(int64_t m,", "int64_t merged_output(int m,")
    assert header != native.HEADERS[0].read_text()
    drifted = tmp_path / "native.h"
    drifted.write_text(header)
    monkeypatch.setenv("PCB_FAST_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(native, "HEADERS", (drifted,))
    native._library.cache_clear()
    try:
        assert "native.h and native.py disagree on the signature of merged_output" in native.problem()
    finally:
        native._library.cache_clear()


def test_the_default_cache_made_under_a_loose_umask_is_tightened(tmp_path, built):
    home = tmp_path / "home"
    (home / ".cache").mkdir(parents=True)
    shutil.copytree(built, home / ".cache" / "pcb_fast")  # the library built already: nothing to compile
    os.chmod(home / ".cache" / "pcb_fast", 0o775)
    env = {k: v for k, v in os.environ.items() if k != "PCB_FAST_CACHE"}
    done = subprocess.run([sys.executable, "-c", "from pcb_fast.cpu import native; print(native.problem())"],
                          env=dict(env, HOME=str(home)), capture_output=True, text=True, timeout=300)
    assert done.stdout.strip() == "None", done.stdout + done.stderr
    assert (home / ".cache" / "pcb_fast").stat().st_mode & 0o777 == 0o755
