"""Audit 16 (second pass): resume, the lock file and interruption, probed as a user would on random:dit-tiny.

Each test names the defect it caught. The kill tests start the CLI as a real process and send the signal
once the stage has printed that it is computing (a marker on stderr, not a fixed sleep).
"""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from diffpro_cli.artifacts import LOCK_NAME

TINY = "random:dit-tiny"
PRUNE = ["--reference-steps", "12", "--n", "2", "--batch", "2"]
# a prune long enough to be interrupted: a 200-step teacher on 8 samples after its marker line
SLOW_PRUNE = ["--steps", "5", "--reference-steps", "200", "--n", "8", "--batch", "2"]
MARKER = "prune: teacher DDIM on"


@pytest.fixture(scope="module")
def pruned_base(tmp_path_factory):
    """A workdir through profile, score and prune (4 steps), made once; tests copy it (`work`)."""
    from diffpro_cli.app import main

    work = tmp_path_factory.mktemp("resume16")
    assert main(["profile", TINY, "-w", str(work), "--samples", "2", "--timesteps", "3", "-q"]) == 0
    assert main(["score", "-w", str(work), "-q"]) == 0
    assert main(["prune", TINY, "-w", str(work), "--steps", "4", *PRUNE, "-q"]) == 0
    return work


@pytest.fixture
def work(pruned_base, tmp_path):
    dst = tmp_path / "w"
    shutil.copytree(pruned_base, dst)
    return dst


def _snapshot(root: Path) -> dict:
    """Every file under `root` (the run-lock sidecars aside: they hold a pid) → its sha256."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.name.startswith(".diffpro.")}


# the CLI with Python's own Ctrl-C handler set: a shell's `cmd &` starts the child with SIGINT ignored
# (and a preexec_fn is not safe in a process with torch's threads)
LAUNCH = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
          "sys.argv[0] = 'diffpro'; runpy.run_module('diffpro_cli', run_name='__main__')")


def _start(*args) -> subprocess.Popen:
    """The CLI as a real process (stderr plain text: CI set)."""
    env = {**os.environ, "CI": "true", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", LAUNCH, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def _read_until(proc: subprocess.Popen, marker: str) -> str:
    """stderr up to and including `marker` (all of it if the process ends first)."""
    seen = ""
    while marker not in seen:
        line = proc.stderr.readline()
        if not line:
            break
        seen += line
    return seen


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


@pytest.mark.parametrize("how", ["prune-SIGINT", "prune-SIGTERM", "run-SIGTERM"])
def test_a_stage_interrupted_mid_compute_exits_130_with_one_line_and_keeps_everything(work, tmp_path, cli, how):
    """Ctrl-C in a stage exited 0 with no message (typer turned KeyboardInterrupt into an exit code that
    the CLI dropped), so scripts took an interrupted stage for a finished one; SIGTERM (kill, timeout,
    a scheduler) ended the process with no message at all and left its temp file."""
    command, sig = how.split("-")
    if command == "run":
        cfg = tmp_path / "run.toml"
        cfg.write_text(f'model = "{TINY}"\nworkdir = "{work}"\nstages = ["prune"]\n\n[prune]\nsteps = 5\n'
                       'reference_steps = 200\nn = 8\nbatch = 2\n')
        args = ["run", cfg]
    else:
        args = ["prune", TINY, "-w", work, *SLOW_PRUNE]
    before = _snapshot(work)
    lock_before = json.loads((work / LOCK_NAME).read_text())["stages"]
    proc = _start(*args)
    seen = _read_until(proc, MARKER)
    assert MARKER in seen, seen
    proc.send_signal(getattr(signal, sig))
    out, rest = proc.communicate(timeout=120)
    err = seen + rest
    assert proc.returncode == 130, (proc.returncode, err)
    assert "Traceback" not in err
    errors = _error_lines(err)
    assert len(errors) == 1 and "interrupted" in errors[0] and "re-run" in errors[0], err
    assert {"SIGINT": "(Ctrl-C)", "SIGTERM": "(SIGTERM)"}[sig] in errors[0], err   # which one, for the logs
    assert _snapshot(work) == before            # previous artifacts and the lock untouched
    assert not list(work.rglob("*.tmp")), "a temporary file was left behind"
    if command == "run":   # the next run recomputes exactly the interrupted stage (its config changed)
        code, out, err = cli(*args, "--json", "-q")
        assert code == 0, err
        assert [(o["stage"], o["status"]) for o in json.loads(out)["stages"]] == [("prune", "computed")]
        lock = json.loads((work / LOCK_NAME).read_text())["stages"]
        assert lock["prune"]["config"]["steps"] == 5
        assert {k: lock_before[k] for k in ("profile", "score")} == {k: lock[k] for k in ("profile", "score")}


def _edit_lock(work: Path, edit) -> dict:
    path = work / LOCK_NAME
    lock = json.loads(path.read_text())
    edit(lock)
    path.write_text(json.dumps(lock))
    return lock


@pytest.mark.parametrize("record", [
    "not a record",
    {"inputs": [1, 2], "config": {}, "outputs": {}},
    {"inputs": {"profile": "f2a960d5"}, "config": {}, "outputs": {}},
    "outputs-without-path",
])
def test_a_malformed_stage_record_in_the_lock_recomputes_that_stage_instead_of_a_traceback(work, cli, record):
    """A hand-edited (or other-version) stage record in diffpro.lock.json crashed the up-to-date check with
    an AttributeError/KeyError traceback (exit 1); the record is only a cache of provenance, so the stage
    recomputes, says why, and the other stages' records are kept."""
    def edit(lock):
        if record == "outputs-without-path":
            for rec in lock["stages"]["score"]["outputs"].values():
                del rec["path"]
        else:
            lock["stages"]["score"] = record

    before = _edit_lock(work, edit)["stages"]
    code, out, err = cli("score", "-w", work, "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["status"] == "computed" and result["reason"].startswith("its lock record is malformed"), result
    after = json.loads((work / LOCK_NAME).read_text())["stages"]
    assert {k: after[k] for k in ("profile", "prune")} == {k: before[k] for k in ("profile", "prune")}
    code, out, err = cli("score", "-w", work, "--json")   # the new record is whole: up to date now
    assert code == 0 and json.loads(out)["status"] == "up to date", (out, err)


def _hold_then_profile(workdir: str, held, go) -> None:
    """Another diffpro process: holds the workdir, then re-profiles it (other samples) before letting go."""
    from diffpro_cli.app import main
    from diffpro_cli.artifacts import workdir_lock

    with workdir_lock(workdir):
        held.set()
        go.wait(120)
        assert main(["profile", TINY, "-w", workdir, "--samples", "3", "--timesteps", "3", "-q"]) == 0


def test_a_stage_that_waited_for_the_workdir_sees_the_inputs_the_holder_rewrote(work):
    """`score --wait` hashed profile.json before waiting for the process that held the workdir; that
    process re-profiled, and score then compared the stale hash with its record and said 'up to date'
    on scores of the old profile. The command now waits before it reads anything."""
    import multiprocessing as mp

    from diffpro_cli.artifacts import sha256_file

    spawn = mp.get_context("spawn")
    held, go = spawn.Event(), spawn.Event()
    holder = spawn.Process(target=_hold_then_profile, args=(str(work), held, go))
    holder.start()
    try:
        assert held.wait(120)
        proc = _start("score", "-w", work, "--wait")
        seen = _read_until(proc, "waiting for workdir")
        assert "waiting for workdir" in seen, seen
        go.set()
        holder.join(120)
        assert holder.exitcode == 0
        out, rest = proc.communicate(timeout=120)
    finally:
        go.set()
        holder.join(5)
    assert proc.returncode == 0, seen + rest
    assert "score: recomputing (inputs changed: profile" in seen + rest, seen + rest
    score = json.loads((work / LOCK_NAME).read_text())["stages"]["score"]
    assert score["inputs"]["profile"]["sha256"] == sha256_file(work / "profile" / "profile.json")


@pytest.mark.parametrize("command", [["score"], ["allocate", "--budget", "avg-bits=6"], ["quantize", TINY, "--bits", "8"]])
def test_a_workdir_that_is_a_file_is_named_so_by_every_stage_command(cli, tmp_path, command):
    """score/allocate/quantize -w FILE said 'FILE/profile: no profile here' (or another missing input,
    exit 3): the file in the way was never named. The workdir is now taken (and checked) first."""
    blocker = tmp_path / "work"
    blocker.write_text("not a directory")
    code, _, err = cli(*command, "-w", blocker, "-q")
    errors = _error_lines(err)
    assert code == 2 and len(errors) == 1 and "is a file, not a directory" in errors[0], err
    assert blocker.read_text() == "not a directory"


def test_a_stage_command_removes_the_temp_files_a_killed_earlier_command_left(work, cli):
    """A stage killed with SIGKILL (OOM killer, kill -9) mid-write leaves its `.NAME.*.tmp`; only `run`
    removed those, so a user of the stage commands kept every half-written checkpoint forever."""
    stale = [work / ".scores.json.k9x2.tmp", work / "profile" / ".stats.safetensors.a1b2.tmp"]
    for p in stale:
        p.write_bytes(b"half-written")
        os.utime(p, (1, 1))
    code, _, err = cli("score", "-w", work)
    assert code == 0, err
    assert not any(p.exists() for p in stale)
    assert f"removed {stale[0]}: left by an interrupted earlier run" in err


@pytest.mark.parametrize("content", ["", '{"schema": "diffpro.lock/1", "stages": {', '[]',
                                     '{"schema": "diffpro.lock/2", "stages": {}}', '{"schema": "diffpro.lock/1"}'])
def test_a_truncated_invalid_or_future_lock_file_names_a_fix_that_works(work, cli, content):
    """A lock file of a future schema said 're-run the stage with this version': every stage refused the
    same way, so that fix led nowhere; a truncated one said 're-run the stage that writes it', which is
    every stage and none. The line now says what deleting it costs (each stage recomputes once); the file
    is left as it was."""
    (work / LOCK_NAME).write_text(content)
    code, _, err = cli("score", "-w", work, "-q")
    errors = _error_lines(err)
    assert code == 3 and len(errors) == 1 and "Traceback" not in err, err
    assert "delete it" in errors[0] and "recomputes once" in errors[0] and "re-run the stage" not in errors[0], errors
    if "lock/2" in content:
        assert "another diffpro version" in errors[0]
    assert (work / LOCK_NAME).read_text() == content
    (work / LOCK_NAME).unlink()                  # the fix it names works
    code, _, err = cli("score", "-w", work, "-q")
    assert code == 0, err


def test_quantize_is_up_to_date_whether_the_workdir_is_spelled_relative_or_absolute(work, cli, monkeypatch):
    """quantize recorded its output directory as typed (`-w w` → 'w/quantized'), so the same workdir given
    as an absolute path (or by `run` from another directory) was 'config changed: out' and re-quantized."""
    monkeypatch.chdir(work.parent)
    args = ("quantize", TINY, "--bits", "8", "--calib-samples", "1", "--json", "-q")
    code, out, err = cli(*args, "-w", work.name)
    assert code == 0 and json.loads(out)["status"] == "computed", err
    code, out, err = cli(*args, "-w", work.resolve())
    assert code == 0, err
    assert json.loads(out)["status"] == "up to date", json.loads(out)


def test_prune_is_up_to_date_whichever_way_the_model_path_is_spelled(tiny_dit, tmp_path, cli, monkeypatch):
    """prune put the model spec as typed into its lock config, so `prune dit` then `prune /abs/dit` (or a
    run config spelling it './dit') re-ran the teacher on the same weights: 'config changed: model'. The
    model's identity is its input record (the directory's sha256), as for profile."""
    tiny_dit().save_pretrained(tmp_path / "dit")
    monkeypatch.chdir(tmp_path)
    args = ("prune", "--steps", "3", "--reference-steps", "6", "--n", "1", "-w", "w", "--json", "-q")
    code, out, err = cli(args[0], "dit", *args[1:])
    assert code == 0 and json.loads(out)["status"] == "computed", err
    code, out, err = cli(args[0], tmp_path / "dit", *args[1:])
    assert code == 0, err
    assert json.loads(out)["status"] == "up to date", json.loads(out)


def _hold(workdir: str, held, release) -> None:
    from diffpro_cli.artifacts import workdir_lock

    with workdir_lock(workdir):
        held.set()
        release.wait(120)


def test_torchrun_ranks_other_than_0_do_not_take_the_workdir_rank_0_holds(tmp_path, monkeypatch):
    """Holding the workdir for a whole stage command made `torchrun --nproc-per-node 2 -m diffpro_cli bench`
    fail on rank 1 ('workdir in use by pid <rank 0>', exit 2): the other ranks only compute, rank 0 writes."""
    import multiprocessing as mp

    from diffpro_cli.commands.common import holding_workdir, make_context
    from diffpro_cli.errors import UsageError

    spawn = mp.get_context("spawn")
    held, release = spawn.Event(), spawn.Event()
    holder = spawn.Process(target=_hold, args=(str(tmp_path), held, release))   # rank 0, holding it
    holder.start()
    try:
        assert held.wait(120)
        ctx = make_context(TINY, tmp_path, quiet=True)
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("RANK", "1")
        with holding_workdir(ctx):
            pass
        monkeypatch.setenv("RANK", "0")                      # a second rank 0 is another run: refused
        with pytest.raises(UsageError, match="in use by pid"):
            with holding_workdir(ctx):
                pass
    finally:
        release.set()
        holder.join(30)


def test_a_directory_in_place_of_the_lock_file_or_an_output_is_named_with_the_fix(work, cli):
    """A directory named diffpro.lock.json was reported as 'no such file; run the stage that writes it
    first' (the stage being run writes it), and a directory in place of an output as 'cannot write there
    (Is a directory); make it writable': neither said to move the directory out of the way."""
    lock = work / LOCK_NAME
    lock.rename(work / "lock.bak")
    lock.mkdir()
    code, _, err = cli("score", "-w", work, "-q")
    errors = _error_lines(err)
    assert code == 3 and len(errors) == 1 and "is a directory" in errors[0] and "remove" in errors[0], err
    lock.rmdir()
    (work / "lock.bak").rename(lock)
    scores = work / "scores.json"
    scores.unlink()
    scores.mkdir()
    code, _, err = cli("score", "-w", work, "-q")
    errors = _error_lines(err)
    assert code == 2 and len(errors) == 1 and "is a directory" in errors[0] and "remove" in errors[0], err
    assert scores.is_dir() and not list(work.rglob("*.tmp"))


def _as_unprivileged() -> list[str]:
    """A prefix that runs a command without root's permission overrides (mode bits then apply), or []."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    caps = "-dac_override,-dac_read_search"
    if setpriv is None or subprocess.run([setpriv, f"--inh-caps={caps}", f"--bounding-set={caps}", "--", "true"]).returncode:
        pytest.skip("root without setpriv: a mode-555 workdir is writable here")
    return [setpriv, f"--inh-caps={caps}", f"--bounding-set={caps}", "--"]


def test_a_read_only_workdir_of_finished_stages_reports_them_up_to_date(work):
    """A read-only workdir (an archived or shared result) refused even the up-to-date check ('cannot write
    there', exit 2): the run lock file was opened for writing. Up-to-date stages are now reported as such;
    a stage that must compute is refused before its work, in one line."""
    prefix = _as_unprivileged()
    for p in [work, *work.rglob("*")]:
        p.chmod(p.stat().st_mode & ~0o222)
    env = {**os.environ, "CI": "true", "OMP_NUM_THREADS": "1"}
    try:
        before = _snapshot(work)
        cli = [*prefix, sys.executable, "-m", "diffpro_cli"]
        done = subprocess.run([*cli, "score", "-w", work, "--json", "-q"], capture_output=True, text=True, env=env)
        assert done.returncode == 0 and json.loads(done.stdout)["status"] == "up to date", done.stderr
        again = subprocess.run([*cli, "prune", TINY, "-w", work, "--steps", "5", *PRUNE, "-q"], capture_output=True,
                               text=True, env=env)
        errors = _error_lines(again.stderr)
        assert again.returncode == 2 and len(errors) == 1 and "cannot write there" in errors[0], again.stderr
        assert "teacher" not in again.stderr            # refused before the work, not after it
        assert _snapshot(work) == before
    finally:
        for p in [work, *work.rglob("*")]:
            p.chmod(p.stat().st_mode | 0o200)


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_an_interrupted_sample_exits_130_with_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch, sig):
    """sample, train, export and fid-stats are not stages: Ctrl-C there exited 0 with no message (typer
    returns 130 from a KeyboardInterrupt and the CLI's main dropped it) and SIGTERM killed the process
    silently. The signal is raised at the sampler's first call (deterministic, in-process)."""
    import diffpro_cli.sampling as sampling
    from diffpro_cli.app import main

    def interrupted(*args, **kwargs):
        signal.raise_signal(getattr(signal, sig))
        pytest.fail("the signal did not interrupt the sampler")

    monkeypatch.setattr(sampling, "sample", interrupted)   # (the command imports it at call time)
    class NotHandled(Exception):
        pass

    def fallback(signum, frame):   # where the CLI installs no handler, fail the test, not the test run
        raise NotHandled

    previous = signal.signal(signal.SIGTERM, fallback)
    # Python's own Ctrl-C handler, as a terminal gives it: a test run started with `cmd &` inherits
    # SIGINT ignored, and the raised SIGINT would then do nothing (LAUNCH above does the same)
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    out = tmp_path / "grid.png"
    try:
        assert main(["sample", "--n", "2", "--steps", "2", "--out", str(out), "-q"]) == 130
        after = signal.getsignal(signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)
    errors = _error_lines(capsys.readouterr().err)
    assert len(errors) == 1 and "interrupted" in errors[0], errors
    assert not out.exists() and not out.with_suffix(".safetensors").exists()
    assert after is fallback     # the CLI's handler did not outlive the call
