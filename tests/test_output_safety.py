"""Output safety of the disk merge: --out never is, holds or lies inside an input; nothing is
deleted that this run did not create (an output folder that appears meanwhile, a concurrent run on
the same --out); --overwrite never leaves the previous output only under .old-*; nothing to merge
is exit 2; SIGHUP cleans up like SIGTERM; temporary folders of killed runs are removed by the next
run; the output folder's mode follows the umask. The concurrency cases run real processes, paused with SIGSTOP at the moment that matters."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

safetensors_torch = pytest.importorskip("safetensors.torch")
save_file, load_file = safetensors_torch.save_file, safetensors_torch.load_file

from pcb_fast.cli import main as cli  # noqa: E402
from pcb_fast.io import output  # noqa: E402
from pcb_fast.drivers.files import merge_checkpoints  # noqa: E402
from pcb_fast.io.output import MergeFailed, OutputExists  # noqa: E402


def write_models(folder: Path, n: int = 2, entries: int = 64) -> tuple[Path, list]:
    """base.safetensors and m0..m{n-1}.safetensors in ``folder``: one float tensor and one integer one."""
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(entries, generator=g), "steps": torch.arange(3)}
    save_file(base, folder / "base.safetensors")
    paths = []
    for i in range(n):
        save_file({"w": base["w"] + 0.01 * torch.randn(entries, generator=g), "steps": base["steps"]},
                  folder / f"m{i}.safetensors")
        paths.append(folder / f"m{i}.safetensors")
    return folder / "base.safetensors", paths


def hidden(parent: Path) -> list:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def merge_cli(base, models, out, *extra) -> int:
    return cli(["merge", "--base", str(base), *[f"--model={m}" for m in models], "--out", str(out), "--quiet",
                *map(str, extra)])


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("pcb-fast: error: "), err
    return err


def tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---- 1. --out is, holds or lies inside an input; the current folder and its parents


def test_overwrite_refuses_a_folder_holding_the_inputs(tmp_path, capsys):
    d = tmp_path / "d"
    base, models = write_models(d)
    (d / "notes.txt").write_text("unrelated")
    before = tree(d)
    assert merge_cli(base, models, d, "--overwrite") == 2
    err = one_error_line(capsys)
    assert f"output {d} contains the base model ({base}); --out must not be, contain or lie inside an input" in err
    assert tree(d) == before and hidden(tmp_path) == []
    with pytest.raises(ValueError, match="contains the base model"):  # the Python API, the same refusal
        merge_checkpoints(base, models, d, overwrite=True)
    assert tree(d) == before


def test_out_may_not_be_or_lie_inside_an_input(tmp_path, capsys):
    base, models = write_models(tmp_path / "flat")
    folder = tmp_path / "hf"
    folder.mkdir()
    save_file(load_file(models[0]), folder / "model.safetensors")
    (folder / "config.json").write_text("{}")
    before = tree(folder)
    cases = [
        ([base], [folder], folder, "is model 0"),  # a Hugging Face folder as --out
        ([base], [models[0]], models[0], "is model 0"),  # a model file as --out
        ([folder], [models[1]], folder / "merged", "lies inside the base model"),  # inside an input folder
    ]
    for (b,), ms, out, message in cases:
        assert merge_cli(b, ms, out, "--overwrite") == 2, message
        assert message in one_error_line(capsys)
    assert tree(folder) == before and not (folder / "merged").exists() and models[0].is_file()
    # a sibling of the inputs is fine
    assert merge_cli(base, models, tmp_path / "flat" / "out") == 0


def test_a_symlinked_shard_is_an_input_too(tmp_path, capsys):
    _, models = write_models(tmp_path / "models")
    elsewhere = tmp_path / "shards"
    elsewhere.mkdir()
    save_file(load_file(tmp_path / "models" / "base.safetensors"), elsewhere / "weights.safetensors")
    base = tmp_path / "base"
    base.mkdir()
    (base / "model.safetensors").symlink_to(elsewhere / "weights.safetensors")
    assert merge_cli(base, models, elsewhere, "--overwrite") == 2
    assert f"contains a shard of the base model ({base / 'model.safetensors'})" in one_error_line(capsys)
    assert (elsewhere / "weights.safetensors").is_file()


def test_config_and_eval_files_are_inputs(tmp_path, capsys):
    base, models = write_models(tmp_path / "models")
    d = tmp_path / "d"
    d.mkdir()
    config = d / "merge.yaml"
    config.write_text(f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n"
                      + "".join(f"  - model: {m}\n" for m in models))
    assert cli(["merge", "--config", str(config), "--out", str(d), "--overwrite", "--quiet"]) == 2
    assert f"output {d} contains the config file ({config})" in one_error_line(capsys)
    evaluate = d / "score.py"
    evaluate.write_text("def score(state):\n    return 0.0\n")
    assert cli(["search", "--base", str(base), *[f"--model={m}" for m in models], "--eval", f"{evaluate}:score",
                "--budget", "2", "--out", str(d), "--overwrite", "--quiet"]) == 2
    assert f"output {d} contains the --eval file ({evaluate})" in one_error_line(capsys)
    assert sorted(p.name for p in d.iterdir()) == ["merge.yaml", "score.py"]


def test_the_current_folder_and_its_parents_are_refused(tmp_path, capsys, monkeypatch):
    base, models = write_models(tmp_path / "d")
    work = tmp_path / "work" / "here"
    work.mkdir(parents=True)
    (work / "mine.txt").write_text("keep")
    monkeypatch.chdir(work)
    for out in (".", "..", "", str(tmp_path / "work"), "../here", "/"):
        assert merge_cli(base, models, out, "--overwrite") == 2, out
        err = one_error_line(capsys)
        assert "is the current folder or one of its parents" in err or "is not a new folder's name" in err, err
    assert (work / "mine.txt").read_text() == "keep" and hidden(tmp_path / "work") == []


# ---- 2. an output that appears meanwhile is never deleted; --overwrite never loses the previous output


def slow_merge_args(tmp_path: Path, out: Path) -> list:
    # long enough to be stopped while writing: eager PCB re-reading its inputs for three passes on one
    # thread (task arithmetic, one C sweep since, could end before a signal sent after the folder
    # appeared was handled, and a signal handled after the merge's end is moot)
    base, models = write_models(tmp_path / "in", entries=1 << 20)
    return [sys.executable, "-m", "pcb_fast", "merge", "--base", str(base), *[f"--model={m}" for m in models],
            "--method", "pcb", "--fused", "off", "--threads", "1", "--out", str(out), "--quiet", "--max-memory", "1KB"]


def stopped_while_writing(proc: subprocess.Popen, out: Path) -> str:
    """Wait until ``proc`` writes a temporary folder next to ``out`` (a new .out.tmp-*), SIGSTOP it,
    and return the folder's name."""
    before = set(hidden(out.parent))
    deadline = time.time() + 60
    while proc.poll() is None and time.time() < deadline:
        # a folder counts once its owner record is written (a kill between the two leaves a folder that no
        # later run may judge, so it is kept: the safe side)
        new = [name for name in set(hidden(out.parent)) - before
               if name.startswith(f".{out.name}.tmp-") and (out.parent / name / "owner.json").is_file()]
        if new:
            proc.send_signal(signal.SIGSTOP)
            assert not out.exists(), "the merge published before it could be stopped"
            return new[0]
        time.sleep(0.002)
    raise AssertionError(f"the merge ended (rc {proc.poll()}) before it wrote its temporary folder")


def test_an_output_created_during_the_merge_is_kept(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen(slow_merge_args(tmp_path, out), stderr=subprocess.PIPE, text=True)
    stopped_while_writing(proc, out)
    out.mkdir()
    (out / "precious").write_text("mine")
    proc.send_signal(signal.SIGCONT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2, err
    assert err == (f"pcb-fast: error: output {out} appeared while this merge ran (another process created it); "
                   "it was left untouched and nothing was written\n")
    assert tree(out) == {"precious": b"mine"} and hidden(tmp_path) == []


def test_two_concurrent_runs_on_one_output_one_wins(tmp_path):
    out = tmp_path / "out"
    args = slow_merge_args(tmp_path, out)
    first = subprocess.Popen(args, stderr=subprocess.PIPE, text=True)
    stopped_while_writing(first, out)  # both are past every check and writing when they publish
    second = subprocess.Popen(args, stderr=subprocess.PIPE, text=True)
    stopped_while_writing(second, out)
    first.send_signal(signal.SIGCONT)
    second.send_signal(signal.SIGCONT)
    results = sorted([(p.wait(timeout=60), p.stderr.read()) for p in (first, second)])
    assert [code for code, _ in results] == [0, 2], results
    assert "appeared while this merge ran" in results[1][1]
    merged = load_file(out / "model.safetensors")
    assert merged["w"].numel() == 1 << 20 and hidden(tmp_path) == []


def previous_output(tmp_path: Path) -> Path:
    out = tmp_path / "out"
    out.mkdir()
    (out / "previous.txt").write_text("old")
    return out


def test_overwrite_swaps_atomically_and_a_held_signal_comes_after(tmp_path, monkeypatch):
    base, models = write_models(tmp_path / "in")
    out = previous_output(tmp_path)
    real = output._renameat2

    def signalled(src, dst, flags):  # a SIGTERM right at the final rename is held until it is done
        os.kill(os.getpid(), signal.SIGTERM)
        return real(src, dst, flags)

    class Stop(BaseException):
        pass

    def stop(signum, frame):
        raise Stop()

    monkeypatch.setattr(output, "_renameat2", signalled)
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        with pytest.raises(Stop) as caught:
            merge_checkpoints(base, models, out, overwrite=True)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert caught.value.output_written == out
    assert sorted(tree(out)) == MERGED and hidden(tmp_path) == []


# a merge's output folder: the weights and what made them (pcb_fast/io/card.py)
MERGED = ["README.md", "mergekit_config.yml", "model.safetensors"]


@pytest.mark.parametrize("when", ["no failure", "OSError", "signal"])
def test_overwrite_without_renameat2_restores_or_replaces(tmp_path, monkeypatch, when):
    base, models = write_models(tmp_path / "in")
    out = previous_output(tmp_path)
    monkeypatch.setattr(output, "_renameat2", lambda src, dst, flags: False)  # NFS and the like
    real = os.rename
    calls = []

    class Stop(BaseException):
        pass

    def rename(src, dst):
        calls.append((Path(src).name, Path(dst).name))
        if len(calls) == 2 and when == "OSError":  # ours into place
            raise OSError(5, "Input/output error")
        real(src, dst)
        if len(calls) == 1 and when == "signal":  # between the two renames
            os.kill(os.getpid(), signal.SIGTERM)

    def stop(signum, frame):
        raise Stop()

    monkeypatch.setattr(output.os, "rename", rename)
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        if when == "OSError":
            with pytest.raises(MergeFailed, match="Input/output error"):
                merge_checkpoints(base, models, out, overwrite=True)
        elif when == "signal":
            with pytest.raises(Stop):
                merge_checkpoints(base, models, out, overwrite=True)
        else:
            merge_checkpoints(base, models, out, overwrite=True)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert calls[0] == ("out", "out") and calls[1] == ("output", "out")  # aside to .out.old-*/out, then ours
    expected = ["previous.txt"] if when == "OSError" else MERGED
    assert sorted(tree(out)) == expected and hidden(tmp_path) == []


@pytest.mark.parametrize("renameat2", [True, False])
def test_without_overwrite_even_an_empty_folder_that_appears_is_kept(tmp_path, monkeypatch, renameat2):
    base, models = write_models(tmp_path / "in")
    out = tmp_path / "out"
    real = output._renameat2

    def appears(src, dst, flags):
        out.mkdir()  # created by someone else just before we publish
        return real(src, dst, flags) if renameat2 else False

    monkeypatch.setattr(output, "_renameat2", appears)
    with pytest.raises(OutputExists, match=f"output {out} appeared while this merge ran"):
        merge_checkpoints(base, models, out)
    assert out.is_dir() and list(out.iterdir()) == [] and hidden(tmp_path) == []


# ---- 8. nothing to merge


def test_nothing_to_merge_is_exit_2_and_no_output(tmp_path, capsys):
    save_file({}, tmp_path / "empty.safetensors")
    save_file({"steps": torch.arange(3)}, tmp_path / "ints.safetensors")
    base, models = write_models(tmp_path / "in")
    cases = [
        ([tmp_path / "empty.safetensors"] * 2, (), "holds no tensors; nothing to merge"),
        ([tmp_path / "ints.safetensors"] * 2, (), "has no floating-point tensor with entries (its keys: 'steps')"),
        ([base, models[0]], ("--exclude", "w"), "every floating-point tensor matches an exclude pattern"),
    ]
    for (b, m), extra, message in cases:
        assert merge_cli(b, [m], tmp_path / "out", *extra) == 2, message
        assert message in one_error_line(capsys)
        assert not (tmp_path / "out").exists() and hidden(tmp_path) == []
    with pytest.raises(ValueError, match="holds no tensors"):
        merge_checkpoints({}, [{}], tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---- 9. SIGHUP, and temporary folders of killed runs


def test_sighup_cleans_up_like_sigterm(tmp_path):
    if signal.getsignal(signal.SIGHUP) is signal.SIG_IGN:  # inherited by the CLI, which keeps it ignored
        pytest.skip("SIGHUP is ignored in this process (started under nohup): the CLI rightly ignores it too")
    out = tmp_path / "out"
    proc = subprocess.Popen(slow_merge_args(tmp_path, out), stderr=subprocess.PIPE, text=True)
    stopped_while_writing(proc, out)
    proc.send_signal(signal.SIGHUP)
    proc.send_signal(signal.SIGCONT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 129 and err == "pcb-fast: terminated (SIGHUP); no output was written\n", err
    assert not out.exists() and hidden(tmp_path) == []


def test_a_killed_runs_temporary_folder_is_removed_by_the_next_run(tmp_path):
    out = tmp_path / "out"
    args = slow_merge_args(tmp_path, out)
    proc = subprocess.Popen(args, stderr=subprocess.DEVNULL)
    name = stopped_while_writing(proc, out)
    proc.kill()
    proc.wait(timeout=60)
    assert hidden(tmp_path) == [name] and name.startswith(f".out.tmp-{proc.pid}-")
    assert json.loads((tmp_path / name / "owner.json").read_text())["pid"] == proc.pid
    base, models = write_models(tmp_path / "small")
    merge_checkpoints(base, models, out)
    assert hidden(tmp_path) == [] and (out / "model.safetensors").is_file()


def test_only_temporary_folders_of_ended_processes_are_removed(tmp_path):
    out = tmp_path / "out"
    me = output._owner_record()
    dead = int(Path("/proc/sys/kernel/pid_max").read_text())  # pids are below pid_max: never alive

    def folder(name, record):
        (tmp_path / name).mkdir()
        (tmp_path / name / "data").write_text("x")
        if record is not None:
            (tmp_path / name / "owner.json").write_text(json.dumps(record))
        return name

    removed = {
        folder(f".out.tmp-{dead}-aaaaaaaa", dict(me, pid=dead, start=None)),  # no such process
        folder(f".out.tmp-{os.getpid()}-bbbbbbbb", dict(me, boot_id="another-boot")),  # before a reboot
        folder(f".out.tmp-{os.getpid()}-cccccccc", dict(me, start=me["start"] - 1)),  # the pid was reused
    }
    kept = {
        folder(f".out.tmp-{os.getpid()}-dddddddd", me),  # alive (this process)
        folder(f".out.tmp-{dead}-eeeeeeee", dict(me, pid=dead, host="elsewhere")),  # another host: cannot tell
        folder(f".out.tmp-{dead}-ffffffff", dict(me, pid=dead, pid_ns="pid:[1]")),  # another container
        folder(f".out.tmp-{dead}-gggggggg", None),  # no owner record: not provably ours
        folder(f".out.tmp-{os.getpid() + 1}-hhhhhhhh", dict(me, pid=dead)),  # the name's pid disagrees
        folder(f".other.tmp-{dead}-iiiiiiii", dict(me, pid=dead, start=None)),  # another --out
        folder(f".out.old-{dead}-jjjjjjjj", dict(me, pid=dead, start=None)),  # a previous output: never removed
    }
    (tmp_path / f".out.tmp-{dead}-kkkkkkkk").symlink_to(tmp_path / sorted(kept)[0])  # a link is never followed
    kept.add(f".out.tmp-{dead}-kkkkkkkk")
    assert sorted(output.remove_stale_temporaries(out)) == sorted(removed)
    assert set(hidden(tmp_path)) == kept


# ---- 10. the output folder's mode follows the umask


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_output_folder_mode_follows_the_umask(tmp_path, umask):
    base, models = write_models(tmp_path / "in")
    previous = os.umask(umask)
    try:
        out = merge_checkpoints(base, models, tmp_path / "out")
    finally:
        os.umask(previous)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # as a plain mkdir, not mkdtemp's 0o700
