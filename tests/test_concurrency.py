"""Issue #18 defect 5: concurrent processes on one workdir must not corrupt each other.

Real processes (multiprocessing, spawn): the locks are fcntl.flock locks, which a thread of the same
process would not contend for the same way.
"""

import multiprocessing as mp
import os
import time
from pathlib import Path

import pytest

from diffpro_cli.artifacts import LOCK_NAME, Lock, atomic_write_json, clean_stale_temp_files, workdir_lock
from diffpro_cli.console import UI
from diffpro_cli.errors import UsageError
from diffpro_cli.stages.common import run_stage

N_STAGES = 40
CTX = mp.get_context("spawn")


def _record_many(workdir: str, tag: str, go, via_run_stage: bool) -> None:
    """Record N_STAGES stages, each with its own artifact, as fast as possible once `go` is set."""
    workdir = Path(workdir)
    go.wait(60)
    for i in range(N_STAGES):
        out = workdir / f"{tag}-{i}.json"
        if via_run_stage:
            run_stage(workdir, f"{tag}-{i}", {}, {"i": i}, {"out": out},
                      lambda: atomic_write_json(out, {"tag": tag, "i": i}), seed=i, wait=True)
        else:
            atomic_write_json(out, {"tag": tag, "i": i})
            Lock(workdir).record(f"{tag}-{i}", {}, {"i": i}, {"out": out}, seed=i, wall_s=0.0)


def _hold_workdir(workdir: str, held, release, temp_name: str | None = None) -> None:
    """Hold the workdir lock (optionally writing a slow 'live' temp file) until `release` is set."""
    with workdir_lock(workdir):
        if temp_name:
            tmp = Path(workdir) / temp_name
            tmp.write_bytes(b"half-written")
            old = time.time() - 3600        # a slow writer: its temp file has not been touched for a while
            os.utime(tmp, (old, old))
        held.set()
        release.wait(60)


def _start(target, *args):
    p = CTX.Process(target=target, args=args)
    p.start()
    return p


def _join(*procs):
    for p in procs:
        p.join(120)
        assert p.exitcode == 0, f"worker exited with {p.exitcode}"


@pytest.mark.parametrize("via_run_stage", [False, True], ids=["Lock.record", "run_stage"])
def test_two_processes_recording_stages_lose_no_record_and_no_artifact(tmp_path, via_run_stage):
    go = CTX.Event()
    procs = [_start(_record_many, str(tmp_path), tag, go, via_run_stage) for tag in ("a", "b")]
    go.set()
    _join(*procs)
    lock = Lock(tmp_path)
    stages = lock.read()["stages"]
    expected = {f"{tag}-{i}" for tag in ("a", "b") for i in range(N_STAGES)}
    assert set(stages) == expected
    for name in expected:
        tag, i = name.split("-")
        assert stages[name]["seed"] == int(i)
        assert lock.check(name, {}, {"i": int(i)}).up_to_date, name     # artifact present, hash recorded
        assert (tmp_path / f"{name}.json").exists()
    assert not list(tmp_path.glob(".*.tmp"))


def test_second_process_gets_usage_error_naming_the_holder_then_waits(tmp_path):
    held, release = CTX.Event(), CTX.Event()
    holder = _start(_hold_workdir, str(tmp_path), held, release)
    try:
        assert held.wait(60)
        out = tmp_path / "out.json"
        calls = []

        def compute():
            calls.append(1)
            atomic_write_json(out, {"ok": True})

        with pytest.raises(UsageError) as exc:
            run_stage(tmp_path, "demo", {}, {}, {"out": out}, compute)
        assert exc.value.exit_code == 2
        assert exc.value.message == f"workdir {tmp_path} is in use by pid {holder.pid}; wait for it or pass --wait"
        assert calls == [] and not (tmp_path / LOCK_NAME).exists()

        class ReleasingUI(UI):
            """Lets the holder go only once the waiting line was printed, so the wait is certain."""
            said: list = []

            def info(self, message):
                self.said.append(message)
                if message.startswith("waiting for workdir"):
                    release.set()

        ui = ReleasingUI(quiet=True)
        outcome = run_stage(tmp_path, "demo", {}, {}, {"out": out}, compute, ui=ui, wait=True)
        assert outcome.status == "computed" and calls == [1]
        assert ui.said == [f"waiting for workdir {tmp_path} (in use by pid {holder.pid})"]
        assert Lock(tmp_path).entry("demo") is not None
    finally:
        release.set()
        _join(holder)


def test_workdir_lock_is_reentrant_in_one_process_and_released_at_the_outer_exit(tmp_path):
    import fcntl

    def other_open_can_lock() -> bool:
        """An independent open file description contends like another process would."""
        fd = os.open(tmp_path / ".diffpro.run.lock", os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        finally:
            os.close(fd)

    with workdir_lock(tmp_path):
        assert (tmp_path / ".diffpro.run.lock").read_text().strip() == str(os.getpid())
        out = tmp_path / "o.json"
        # a stage inside a held lock (as in `diffpro run`) takes it again without blocking
        assert run_stage(tmp_path, "s", {}, {}, {"out": out}, lambda: atomic_write_json(out, {})).status == "computed"
        assert not other_open_can_lock()
    assert other_open_can_lock()


def test_cleanup_keeps_a_concurrent_stages_live_temp_file_and_removes_it_once_abandoned(tmp_path):
    held, release = CTX.Event(), CTX.Event()
    tmp_name = ".report.json.abc123.tmp"
    holder = _start(_hold_workdir, str(tmp_path), held, release, tmp_name)
    try:
        assert held.wait(60)
        live = tmp_path / tmp_name
        assert clean_stale_temp_files(tmp_path, UI(quiet=True)) == []
        assert live.exists()
        # the old cleanup (mtime older than a second ago) would have deleted the live file
        assert live.stat().st_mtime < time.time() - 1
    finally:
        release.set()
        _join(holder)
    # the holder is gone and left its temp file behind (as a kill -9 would): now it is stale
    assert clean_stale_temp_files(tmp_path, UI(quiet=True)) == [live]
    assert not live.exists()


def test_cleanup_inside_a_held_lock_removes_stale_files(tmp_path):
    stale = tmp_path / "sub" / ".x.json.zz.tmp"
    stale.parent.mkdir()
    stale.write_text("partial")
    old = time.time() - 60
    os.utime(stale, (old, old))
    with workdir_lock(tmp_path):
        assert clean_stale_temp_files(tmp_path) == [stale]

