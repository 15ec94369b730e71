"""The output folder of a merge: checked, written in a temporary folder, published atomically
(docs/design.md 7.2).

Output safety: nothing is ever deleted but what this run created, or the previous ``out`` with
``overwrite``. ``out`` may not be, contain or lie inside an input (compared as real paths), nor be
the current folder or one of its parents. The temporary folder ``.<out>.tmp-<pid>-<random>`` holds
``owner.json`` (pid, process start time, boot id, host, pid namespace) and the output being written
(``output/``, made by a plain mkdir, so it gets the mode the umask gives). It is published with
``renameat2(RENAME_NOREPLACE)`` (never replacing a folder that appeared meanwhile: :class:`OutputExists`)
or, with ``overwrite``, ``renameat2(RENAME_EXCHANGE)`` (one atomic swap; the previous output is then
deleted). Where the system or filesystem lacks renameat2 (not Linux, NFS, glibc < 2.28): without
``overwrite`` a check then ``rename(2)``, which fails on an existing file or non-empty folder and can
at worst replace an empty folder created in between; with ``overwrite`` the previous output is
moved aside to ``.<out>.old-*``, ours renamed in, and the previous one put back if that fails.
SIGINT, SIGTERM and SIGHUP are held back while publishing. Temporary folders of a process that has
ended (killed, power loss) are removed by the next run on the same ``out``.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import stat
import sys
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path

from .checkpoints import side_files
from .safetensors import show_path


class MergeFailed(ValueError):
    """A merge that passed every check on its inputs but failed while running (a NaN found in a pass,
    a file that ends early, a full disk): nothing was written."""


class OutputExists(ValueError):
    """The output folder appeared while the merge ran (another process created it) and ``overwrite``
    was not given: it was left untouched and nothing was written."""


OWNER_FILE = "owner.json"  # inside the temporary folder: who writes it
BODY = "output"  # inside the temporary folder: the output being written


def check_output(out, overwrite: bool, inputs=()) -> Path:
    """The output folder, if it may be written: a folder name that is not the current folder or one
    of its parents, nor an input or a folder holding one (``inputs``: (label, path) pairs), absent (or
    ``overwrite``), in a writable folder, and a name that folder can hold."""
    out = Path(out)
    if out.name in ("", ".", ".."):
        raise ValueError(f"output {show_path(out)} is not a new folder's name (it is the current folder or a "
                         "parent); choose a folder such as ./merged")
    check_not_an_input(out, inputs)
    if os.path.lexists(out) and not overwrite:
        raise ValueError(f"output {show_path(out)} already exists; choose another folder or allow overwrite "
                         "(--overwrite)")
    check_writable_parent(out)
    return out


def check_writable_parent(path, what: str = "output folder's parent") -> Path:
    """The folder that will hold ``path`` (a new file or folder; ``what`` names it in messages): it
    exists, is writable, and allows a name as long as ``path``'s; a one-line ValueError otherwise."""
    path = Path(path)
    parent = path.absolute().parent
    try:
        is_folder = stat.S_ISDIR(os.stat(parent).st_mode)
    except (FileNotFoundError, NotADirectoryError):
        is_folder = False
    except OSError as e:  # a path too long, a loop of links, no permission to search
        raise ValueError(f"{what} {show_path(parent)} cannot be reached ({e.strerror or e})") from None
    if not is_folder:
        raise ValueError(f"{what} {show_path(parent)} is not an existing folder")
    if not os.access(parent, os.W_OK):
        raise ValueError(f"{what} {show_path(parent)} is not writable")
    try:
        longest = os.pathconf(parent, "PC_NAME_MAX")
    except (OSError, ValueError):
        longest = 255
    if len(os.fsencode(path.name)) > longest:
        raise ValueError(f"output name {show_path(path.name, 60)} is {len(os.fsencode(path.name))} bytes long; "
                         f"{show_path(parent)} allows names of at most {longest} bytes")
    return parent


def check_file_output(path, overwrite: bool, inputs=(), folders=(), flag: str = "--history") -> Path:
    """A file the run writes besides its output folder (the search's history), checked as an output
    before any heavy work: not an input nor inside one (``inputs``), not inside an output folder of
    the run (``folders``: (label, path) pairs, replaced as a whole), not an existing folder, absent
    unless ``overwrite``, in an existing writable folder that allows its name."""
    path = Path(path)
    if path.name in ("", ".", "..") or os.path.isdir(path):
        raise ValueError(f"{show_path(path)} is a folder; name a file to write")
    check_not_an_input(path, inputs, "file", flag)
    real = os.path.realpath(path)
    for label, folder in folders:
        if _within(real, os.path.realpath(folder)):
            raise ValueError(f"{show_path(path)} lies inside {label} ({show_path(folder)}), which is written as a "
                             "whole; choose a path outside it")
    if os.path.lexists(path) and not overwrite:
        raise ValueError(f"{show_path(path)} already exists; choose another file or allow overwrite (--overwrite)")
    check_writable_parent(path, f"{flag}'s folder")
    return path


def write_file_atomically(path, data: bytes) -> None:
    """Write ``data`` to ``path`` whole or not at all: a temporary file in the same folder, flushed
    to disk, then renamed over ``path`` (a link at ``path`` is replaced, never written through)."""
    path = Path(path)
    fd, partial = tempfile.mkstemp(prefix=f".{_stem(path)}.tmp-", dir=path.absolute().parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(partial)
        raise


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


MAX_WALK = 100_000  # entries of an existing output folder looked at for links to inputs


def _files_read(label: str, path) -> list:
    """``(label, path)`` and, for a folder, every entry directly in it (what a run may read: weights,
    shards, index, side files, adapter_config.json), each as its own (label, path)."""
    found = [(label, path)]
    try:
        if os.path.isdir(path):
            with os.scandir(path) as entries:
                found += [(f"a {'shard' if entry.name.endswith('.safetensors') else 'file'} of {label}", entry.path)
                          for entry in entries]
    except OSError:
        pass
    return found


def _identities(folder) -> set:
    """(st_dev, st_ino) of ``folder`` and of everything under it (links not followed): the files a
    replaced output takes with it, whatever name or link leads to them."""
    found = set()
    try:
        st = os.lstat(folder)
    except OSError:
        return found
    found.add((st.st_dev, st.st_ino))
    if not stat.S_ISDIR(st.st_mode):
        return found
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            try:
                st = os.lstat(os.path.join(root, name))
            except OSError:
                continue
            found.add((st.st_dev, st.st_ino))
            if len(found) > MAX_WALK:
                return found
    return found


def check_not_an_input(out, inputs, what: str = "output", flag: str = "--out") -> None:
    """Refuse an output that is, contains or lies inside one of ``inputs`` ((label, path) pairs), or
    that is the current folder or one of its parents: what ``overwrite`` would delete. Every entry of
    an input folder counts as an input too (a model folder's weights, shards and side files). Paths
    are compared resolved (os.path.realpath, links followed), ``out`` both with and without its last
    component resolved; an existing ``out`` is also searched for the inputs' files themselves
    (device and inode: hard links, bind mounts)."""
    out = Path(out)
    forms = {os.path.realpath(out), os.path.join(os.path.realpath(out.absolute().parent), out.name)}
    cwd = os.path.realpath(os.getcwd())
    if any(_within(cwd, form) for form in forms):
        raise ValueError(f"{what} {show_path(out)} is the current folder or one of its parents; choose a folder such "
                         "as ./merged")
    identities = None
    for given_label, given_path in inputs:
        for label, path in _files_read(given_label, given_path):
            real = os.path.realpath(path)
            for form in forms:
                relation = ("is" if real == form else "contains" if _within(real, form)
                            else "lies inside" if _within(form, real) else None)
                if relation:
                    raise ValueError(f"{what} {show_path(out)} {relation} {label} ({show_path(path)}); {flag} must "
                                     "not be, contain or lie inside an input")
            if os.path.lexists(out):
                if identities is None:
                    identities = _identities(out)
                try:
                    st = os.stat(path)
                except (OSError, ValueError):
                    continue
                if (st.st_dev, st.st_ino) in identities:
                    raise ValueError(f"{what} {show_path(out)} contains {label} ({show_path(path)}) through a link; "
                                     f"{flag} must not be, contain or lie inside an input")


def checkpoint_files(ck, label: str) -> list:
    """(label, path) of the files an opened checkpoint reads besides its own path: its safetensors
    shards, the torch file it loaded and the side files copied from its folder."""
    files = [(f"a shard of {label}", r.path) for r in getattr(ck, "readers", ()) if getattr(r, "path", None)]
    files += [(f"a file of {label}", path) for path in getattr(ck, "files", ())]
    files += [(f"a file of {label}", path) for path in side_files(ck.folder, ck.name)]
    return files


# ---- the temporary folder, its owner, and publishing it


def _read_small(path, limit: int = 4096) -> str | None:
    """The text of a small regular file, or None (never blocks on a FIFO, never follows a symlink)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return os.read(fd, limit).decode("utf-8", "replace")
    except OSError:
        return None
    finally:
        os.close(fd)


def _start_time(pid: int):
    """The start time of process ``pid`` in clock ticks since boot (/proc/<pid>/stat), or None."""
    text = _read_small(f"/proc/{pid}/stat")
    try:
        return int(text.rsplit(")", 1)[1].split()[19])
    except (AttributeError, IndexError, ValueError):
        return None


def _owner_record(pid: int | None = None) -> dict:
    """Who owns a temporary folder: enough to tell later, on this host, whether that process is gone."""
    pid = os.getpid() if pid is None else pid
    try:
        pid_ns = os.readlink("/proc/self/ns/pid")
    except OSError:
        pid_ns = None
    boot_id = _read_small("/proc/sys/kernel/random/boot_id")
    return {"pid": pid, "start": _start_time(pid), "boot_id": boot_id.strip() if boot_id else None,
            "host": socket.gethostname(), "pid_ns": pid_ns}


def _owner_gone(record: dict) -> bool:
    """True only when the process that wrote ``record`` has certainly ended: written on this host in
    this pid namespace, and on an earlier boot, or no process has its pid, or another process does
    (another start time). A folder of another host or container is never judged."""
    me = _owner_record()
    pid = record.get("pid")
    if record.get("host") != me["host"] or record.get("pid_ns") != me["pid_ns"]:
        return False
    if type(pid) is not int or pid <= 0:
        return False
    if record.get("boot_id") and me["boot_id"] and record["boot_id"] != me["boot_id"]:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # EPERM: alive, another user's
        pass
    start = record.get("start")
    return start is not None and _start_time(pid) not in (None, start)


def _stem(out: Path) -> str:
    """The part of ``out``'s name that its temporary folders' names carry: the whole name, or where
    that would make them longer than a name may be, its start and a hash of the whole (a temporary
    name fits wherever the final name fits)."""
    name = out.name
    room = 255 - 40  # ".<stem>.tmp-<pid>-<8 random>" and ".<stem>.old-<8 random>" within 255 bytes
    if len(os.fsencode(name)) <= room:
        return name
    digest = hashlib.sha256(os.fsencode(name)).hexdigest()[:12]
    while len(os.fsencode(name)) > room - 13:
        name = name[:-1]
    return f"{name}~{digest}"


def _temporary_pattern(out: Path):
    return re.compile(re.escape(f".{_stem(out)}.tmp-") + r"(\d+)-[a-z0-9_]{8}")


def remove_stale_temporaries(out) -> list:
    """Remove the temporary folders of ``out`` left by runs that have ended without cleaning up
    (SIGKILL, power loss): those whose owner.json says their process is gone. Returns their names."""
    out = Path(out)
    pattern = _temporary_pattern(out)
    removed = []
    try:
        entries = list(os.scandir(out.absolute().parent))
    except OSError:
        return removed
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        try:
            if match is None or not entry.is_dir(follow_symlinks=False):
                continue
        except OSError:
            continue
        try:
            record = json.loads(_read_small(os.path.join(entry.path, OWNER_FILE)) or "null")
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("pid") == int(match.group(1)) and _owner_gone(record):
            _discard(Path(entry.path))
            removed.append(entry.name)
    return removed


def _make_temporary(out: Path) -> Path:
    """A new temporary folder next to ``out`` with its owner record and an empty output folder."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{_stem(out)}.tmp-{os.getpid()}-", dir=out.absolute().parent))
    try:
        (tmp / "owner.part").write_text(json.dumps(_owner_record()))
        os.replace(tmp / "owner.part", tmp / OWNER_FILE)  # whole or absent: a later run reads it or keeps the folder
        os.mkdir(tmp / BODY)  # not mkdtemp's 0700: the mode a plain mkdir gives (umask, default ACLs)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


def _remove(path: Path) -> None:
    """Delete a file, symlink or folder tree, if it is there."""
    try:
        if stat.S_ISDIR(os.lstat(path).st_mode):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.unlink(path)
    except OSError:
        pass


def _discard(tmp: Path) -> None:
    """Delete a temporary folder: its output (or the previous output swapped into it) first, the
    owner record last, so that a folder interrupted here is still recognised as ours."""
    _remove(tmp / BODY)
    shutil.rmtree(tmp, ignore_errors=True)


RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
_AT_FDCWD = -100
_renameat2_fn = []


def _renameat2(src, dst, flags: int) -> bool:
    """renameat2(2) with ``flags``: True when done, False where the system or the filesystem lacks it
    (not Linux, glibc < 2.28, EINVAL on NFS and the like); other failures raise OSError."""
    if not _renameat2_fn:
        fn = None
        if sys.platform.startswith("linux"):
            try:
                fn = ctypes.CDLL(None, use_errno=True).renameat2
                fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
                fn.restype = ctypes.c_int
            except (AttributeError, OSError):
                fn = None
        _renameat2_fn.append(fn)
    fn = _renameat2_fn[0]
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(dst))


def _appeared(out: Path) -> OutputExists:
    return OutputExists(f"output {show_path(out)} appeared while this merge ran (another process created it); it was "
                        "left untouched and nothing was written")


def _publish(body: Path, out: Path, overwrite: bool):
    """Move the finished ``body`` to ``out``, replacing an existing ``out`` only with ``overwrite``.
    Returns what is left to delete afterwards (the previous output, moved away), or None."""
    for _ in range(3):  # out may appear or vanish between two steps; a few rounds settle it
        if overwrite and os.path.lexists(out):
            try:
                if _renameat2(body, out, RENAME_EXCHANGE):
                    return body  # one atomic swap: the previous output is now in our temporary folder
            except FileNotFoundError:
                continue  # out vanished meanwhile: place ours without replacing anything
            return _replace_by_renames(body, out)
        try:
            if _renameat2(body, out, RENAME_NOREPLACE):
                return None
            if os.path.lexists(out):
                raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(out))
            os.rename(body, out)  # fails on a file or a non-empty folder; replaces at most an empty one
            return None
        except OSError as e:
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR):
                raise
            if not overwrite:
                raise _appeared(out) from None
    raise OSError(errno.EBUSY, "the output kept changing while it was being replaced", str(out))


def _replace_by_renames(body: Path, out: Path) -> Path:
    """Without renameat2: move the previous output aside to .<out>.old-*, ours in, and the previous
    one back if that fails (signals are held back by the caller). Returns the folder to delete."""
    aside = Path(tempfile.mkdtemp(prefix=f".{_stem(out)}.old-", dir=out.absolute().parent))
    previous = aside / out.name
    try:
        os.rename(out, previous)
    except BaseException:
        os.rmdir(aside)
        raise
    try:
        os.rename(body, out)
    except BaseException as e:
        try:
            os.rename(previous, out)
            os.rmdir(aside)
        except OSError as restore:
            raise OSError(e.errno if isinstance(e, OSError) else errno.EINTR,
                          f"could not move the new output into place ({e}) nor put the previous one back "
                          f"({restore.strerror}); the previous output is in {previous}") from e
        raise
    return aside


@contextmanager
def _signals_held():
    """Hold back SIGINT, SIGTERM and SIGHUP while the block runs, then deliver them (in the main
    thread; elsewhere Python handlers never run, so there is nothing to hold)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught, saved = [], {}
    for signum in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if signum is not None and signal.getsignal(signum) not in (None, signal.SIG_IGN):
            saved[signum] = signal.signal(signum, lambda n, frame: caught.append(n))
    try:
        yield
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)
        for signum in dict.fromkeys(caught):
            signal.raise_signal(signum)


@contextmanager
def atomic_folder(out: Path, comm=None, overwrite: bool = False):
    """Yield a temporary folder next to ``out`` that becomes ``out`` when the block succeeds and is
    removed when it fails (errors while writing become :class:`MergeFailed`). An ``out`` that
    appears meanwhile is never replaced without ``overwrite`` (:class:`OutputExists`). Distributed
    (``comm``): rank 0 creates, publishes and removes it, after every rank has agreed that none failed.
    An exception (a signal held back while publishing) that ends the block after ``out`` was
    published has ``output_written`` set to ``out``."""
    parent = out.absolute().parent
    leader = comm is None or comm.rank == 0
    tmp, error = None, None
    if leader:
        remove_stale_temporaries(out)
        try:
            tmp = _make_temporary(out)
        except OSError as e:
            error = f"output folder's parent {show_path(parent)} is not writable ({e.strerror})"
    if comm is not None:
        tmp, error = comm.broadcast((tmp, error))
    if error is not None:
        raise ValueError(error)
    published, leftover = False, None
    try:
        yield tmp / BODY
        if comm is not None:
            comm.barrier()  # every rank's shards are written, and no rank failed
        failure = None
        if leader:
            try:
                with _signals_held():
                    leftover = _publish(tmp / BODY, out, overwrite)
                    published = True
            except (ValueError, OSError) as e:
                if comm is None:
                    raise
                failure = (isinstance(e, OutputExists), str(e))
        if comm is not None:
            failure = comm.broadcast(failure)
            if failure is not None:
                raise (OutputExists if failure[0] else ValueError)(failure[1])
    except OutputExists:
        if leader:
            _discard(tmp)
        raise
    except (ValueError, OSError, RuntimeError) as e:  # RuntimeError: a collective broken by a dead rank
        if leader:
            _discard(tmp)
        if published:
            raise
        raise MergeFailed(str(e).splitlines()[0] if str(e) else type(e).__name__) from e
    except BaseException as e:
        if published:
            e.output_written = out
        if leader:
            _discard(tmp)
        raise
    finally:
        if leader and leftover is not None and leftover != tmp / BODY:
            _remove(leftover)  # a previous output moved aside to .old-*
    if leader:
        _discard(tmp)
