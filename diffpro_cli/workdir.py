"""The work directory: making it (ensure_dir, with one-line errors for a place diffpro cannot write),
holding it (workdir_lock) and removing the temp files an interrupted write left in it.

A stage holds `workdir_lock` (one process at a time per work directory, re-entrant within a process)
from its up-to-date check to its lock record; a stage command and `run` hold it for their whole run
(issue #18). Stale temp files are only removed while holding it, so a concurrent stage's live temp file
is never taken for an interrupted write's leftover. Split from artifacts.py, which re-exports these names.
"""

from __future__ import annotations

import errno
import fcntl
import os
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from diffpro_cli.errors import UsageError

RUN_LOCK_NAME = ".diffpro.run.lock"        # held by the process running stages in this workdir (holds its pid)


def cannot_write(path: str | Path, exc: OSError) -> UsageError:
    """The one-line error for an output location the user chose but diffpro cannot write (read-only,
    a file where a directory belongs or the reverse, a full disk): a usage error, not a bug."""
    fix = "remove or rename that directory" if isinstance(exc, IsADirectoryError) else "make it writable"
    return UsageError(f"{path}: cannot write there ({exc.strerror or exc}); {fix} or choose another --workdir / --out")


def ensure_dir(path: str | Path) -> Path:
    """mkdir -p, with cannot_write's one-line error instead of a traceback."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{path}: is a file, not a directory; choose another --workdir / --out or move the file")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise cannot_write(path, exc) from None
    return path


def writable_dir(path: str | Path) -> Path:
    """ensure_dir, then prove a file can be created there (cannot_write's one line otherwise): for a stage
    that would otherwise find out only when it writes its result, after all its work."""
    path = ensure_dir(path)
    try:
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-check."):
            pass
    except OSError as exc:
        raise cannot_write(path, exc) from None
    return path


def remove_stale_temp_files(root: str | Path, older_than: float) -> list[Path]:
    """Delete temporary files that an interrupted atomic write left under `root` (a kill -9 gives the
    writer no chance to clean up). Only files older than `older_than` (a time.time() value) go, so a
    concurrent writer's live temp file is kept."""
    removed = []
    for p in Path(root).rglob(".*.tmp"):
        try:
            if p.is_file() and p.stat().st_mtime < older_than:
                p.unlink()
                removed.append(p)
        except OSError:
            pass
    return removed


def clean_stale_temp_files(workdir: str | Path, ui=None) -> list[Path]:
    """Remove temp files that interrupted writes left in `workdir`, safely: only while this process holds
    the workdir lock (re-entrant, so it may be called inside `workdir_lock`). If another process holds it,
    its temp files may be live, so nothing is removed and [] is returned. Files modified after the lock was
    taken belong to a writer that ignores the lock and are kept too."""
    workdir = Path(workdir)
    if not workdir.is_dir():
        return []
    try:
        with workdir_lock(workdir, wait=False, ui=ui) as held_since:
            removed = remove_stale_temp_files(workdir, older_than=held_since)
    except UsageError:
        return []
    if ui is not None:
        for p in removed:
            ui.info(f"removed {p}: left by an interrupted earlier run")
    return removed


_held: dict[Path, list] = {}
_held_guard = threading.Lock()


def _read_holder(fd: int) -> str:
    """The pid written into the run-lock file by its holder ("?" if it has not written it yet)."""
    for _ in range(20):     # the holder writes its pid right after taking the lock
        try:
            text = os.pread(fd, 64, 0).decode(errors="replace").strip()
        except OSError:
            text = ""
        if text:
            return text
        time.sleep(0.025)
    return "?"


@contextmanager
def workdir_lock(workdir: str | Path, wait: bool = False, ui=None):
    """Hold the exclusive per-workdir run lock (fcntl.flock on WORKDIR/.diffpro.run.lock) for the block.

    Re-entrant within one process (a `diffpro run` holds it and each of its stages takes it again); threads
    of one process share it. On contention: with `wait`, print one info line and block until it is free;
    else raise UsageError naming the holder's pid. Yields the time.time() at which the lock was taken.
    """
    key = Path(workdir).resolve()
    pid = os.getpid()
    with _held_guard:
        state = _held.get(key)
        if state is not None and state[2] == pid:
            state[1] += 1
            reentered = True
        else:
            reentered = False
    if reentered:
        with _counted(key, state) as since:
            yield since
        return

    ensure_dir(key)
    fd = _open_run_lock(key)
    try:
        holder = None
        try:
            if fd is not None:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            try:    # "?" may mean the holder was just releasing: one more try before reporting
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                holder = None
            except BlockingIOError:
                pass
        if holder is not None:
            if not wait:
                raise UsageError(f"workdir {workdir} is in use by pid {holder}; wait for it or pass --wait") from None
            if ui is None:
                from diffpro_cli.console import UI

                ui = UI()
            ui.info(f"waiting for workdir {workdir} (in use by pid {holder})")
            fcntl.flock(fd, fcntl.LOCK_EX)
        if fd is not None and _writable(fd):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{pid}\n".encode(), 0)
    except BaseException:
        if fd is not None:
            os.close(fd)
        raise
    state = [fd, 1, pid, time.time()]
    with _held_guard:
        _held[key] = state
    with _counted(key, state) as since:
        yield since


@contextmanager
def _counted(key: Path, state: list):
    """One holder's share of the run lock: on exit the count drops, and the last holder releases it."""
    try:
        yield state[3]
    finally:
        with _held_guard:
            state[1] -= 1
            if state[1] == 0:
                _release(key, state)


def _release(key: Path, state: list) -> None:
    """Drop the run lock (caller holds _held_guard). The file stays: unlinking it would race a waiter."""
    if _held.get(key) is state:
        del _held[key]
    if state[0] is None:
        return
    try:
        os.ftruncate(state[0], 0)
    except OSError:
        pass
    os.close(state[0])


def _open_run_lock(key: Path) -> int | None:
    """The run-lock file's descriptor. In a workdir this process may not write (an archived result), the
    file is opened read-only (flock needs no write access), or None where it is missing (nobody has run
    there since it became read-only), so up-to-date stages still say so; run_stage refuses one that must
    compute. Opening it for writing only refused even the up-to-date check."""
    path = key / RUN_LOCK_NAME
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        if not isinstance(exc, PermissionError) and exc.errno != errno.EROFS:
            raise cannot_write(key, exc) from None
        try:
            return os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        except OSError:
            raise cannot_write(key, exc) from None


def _writable(fd: int) -> bool:
    return fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE != os.O_RDONLY
