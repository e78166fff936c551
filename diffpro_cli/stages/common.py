"""The shared skeleton of a resumable stage: check the lock, compute, record."""

from __future__ import annotations

import errno
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from diffpro_cli.artifacts import Lock, workdir_lock
from diffpro_cli.console import UI, QUIET_UI
from diffpro_cli.errors import UsageError


@dataclass
class StageOutcome:
    stage: str
    status: str          # "computed" | "up to date"
    reason: str
    outputs: dict[str, str]
    wall_s: float

    def as_dict(self) -> dict:
        return {"stage": self.stage, "status": self.status, "reason": self.reason,
                "outputs": self.outputs, "wall_s": round(self.wall_s, 3)}


def run_stage(
    workdir: str | Path,
    stage: str,
    inputs: dict[str, dict],
    config: dict,
    outputs: dict[str, Path],
    compute: Callable[[], None],
    *,
    force: bool = False,
    seed: int | None = None,
    ui: UI = QUIET_UI,
    wait: bool = False,
) -> StageOutcome:
    """Run `compute` unless the lock says this stage is up to date.

    inputs: name → {"path": ..., "sha256": ...} (see artifacts.input_record); config must be JSON-able.
    `compute` must write every path in `outputs` atomically. The workdir lock is held from the check to
    the record, so a concurrent process cannot interleave; if another process holds it, `wait` blocks
    (with one info line), else a UsageError names its pid.
    """
    workdir = Path(workdir)
    with workdir_lock(workdir, wait=wait, ui=ui):
        return _run_locked(workdir, stage, inputs, config, outputs, compute, force=force, seed=seed, ui=ui)


def _run_locked(workdir: Path, stage: str, inputs: dict[str, dict], config: dict, outputs: dict[str, Path],
                compute: Callable[[], None], *, force: bool, seed: int | None, ui: UI) -> StageOutcome:
    lock = Lock(workdir)
    digests = {k: v["sha256"] for k, v in inputs.items()}
    check = lock.check(stage, digests, config)
    out_paths = {k: str(v) for k, v in outputs.items()}
    if check.up_to_date and not force:
        ui.info(f"{stage}: up to date (use --force to recompute)")
        return StageOutcome(stage, "up to date", check.reason, out_paths, 0.0)
    reason = "forced" if force else check.reason
    if check.reason != "never run" or force:
        ui.info(f"{stage}: recomputing ({reason})")
    if not os.access(workdir, os.W_OK):   # a read-only workdir: refused before the work, not at its end
        raise UsageError(f"{workdir}: cannot write there ({os.strerror(errno.EACCES)}) and {stage} must recompute "
                         f"({reason}); make it writable or choose another --workdir")
    blocked = [str(p) for p in outputs.values() if Path(p).is_dir()]
    if blocked:   # found before the work, not when its result is renamed into place
        raise UsageError(f"{blocked[0]}: is a directory where {stage} writes a file; remove or rename it")
    t0 = time.time()
    compute()
    wall = time.time() - t0
    lock.record(stage, inputs, config, outputs, seed, wall)
    return StageOutcome(stage, "computed", reason, out_paths, wall)
