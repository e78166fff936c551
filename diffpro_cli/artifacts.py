"""Artifact IO: atomic writes, hashing, schema versions and the per-workdir lock file.

Every file is written to a temporary name in the same directory and renamed into place, so an
interrupted stage (Ctrl-C, kill) leaves the previous artifact readable. `diffpro.lock.json` records,
per stage, the sha256 of its inputs, its config and its outputs; a stage whose inputs, config and
outputs all still match is skipped as up to date.

Concurrency (issue #18): the lock file's read-modify-write runs under an `fcntl.flock` on a sidecar
file; the work directory's run lock (`workdir_lock`) and the removal of stale temp files are in
workdir.py (its names are imported here too, where callers have always found them).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from diffpro_cli import __version__
from diffpro_cli.errors import InputError
from diffpro_cli.workdir import (  # noqa: F401 - the names every caller imports from here
    RUN_LOCK_NAME,
    cannot_write,
    clean_stale_temp_files,
    ensure_dir,
    remove_stale_temp_files,
    workdir_lock,
    writable_dir,
)

LOCK_NAME = "diffpro.lock.json"
LOCK_SCHEMA = "diffpro.lock/1"
LOCK_FLOCK_NAME = ".diffpro.lock.flock"    # guards the read-modify-write of diffpro.lock.json


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    path = Path(path)
    ensure_dir(path.parent)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise cannot_write(path.parent, exc) from None
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except OSError as exc:
        raise cannot_write(path, exc) from None
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return _atomic_write(Path(path), lambda p: p.write_bytes(data))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    text = json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n"
    return _atomic_write(Path(path), lambda p: p.write_text(text))


def _json_default(o):
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def atomic_save_safetensors(path: str | Path, tensors: dict, metadata: dict[str, str] | None = None) -> Path:
    """safetensors file written atomically, byte-for-byte reproducible: the same tensors and metadata give
    the same sha256 in every process (sort_safetensors_metadata)."""
    from safetensors.torch import save_file

    tensors = {k: v.contiguous() for k, v in tensors.items()}

    def write(p: Path) -> None:
        save_file(tensors, str(p), metadata=metadata)
        sort_safetensors_metadata(p)

    return _atomic_write(Path(path), write)


def sort_safetensors_metadata(path: Path) -> bool:
    """Rewrite a safetensors header in place with its `__metadata__` keys sorted. Why: the writer keeps
    metadata in a hash map whose order changes from call to call, so identical checkpoints got different
    sha256 (and the lock and feature caches that key on it missed). Only the header's bytes are touched,
    within its original length (padding with spaces, as the format allows); returns False, leaving the
    file as written, where the sorted header would not fit."""
    import struct

    with open(path, "r+b") as f:
        size = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(size))
        meta = header.pop("__metadata__", None)
        if not meta or len(meta) < 2:
            return True
        text = json.dumps({"__metadata__": dict(sorted(meta.items())), **header}, separators=(",", ":"),
                          ensure_ascii=False).encode()
        if len(text) > size:
            return False
        f.seek(8)
        f.write(text + b" " * (size - len(text)))
    return True


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    import torch

    return _atomic_write(Path(path), lambda p: torch.save(obj, p))


def read_json(path: str | Path, schema: str | None = None, *, missing: str = "run the stage that writes it first or check the path",
              fix: str = "delete it and re-run the stage that writes it") -> dict:
    """Read a JSON artifact; with `schema` ("name/version"), refuse other names and newer versions.
    `missing` / `fix` end the one-line errors for a missing / unreadable file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file; {missing}")
    try:
        obj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not valid JSON ({getattr(exc, 'msg', exc)}); {fix}") from None
    if schema is not None:
        check_schema(path, obj, schema)
    return obj


# the top-level keys (and their JSON types) every reader of an artifact indexes without checking: a file
# with the right schema but one of these missing or of the wrong type is refused here, in one line
REQUIRED_KEYS: dict[str, dict[str, type]] = {
    "diffpro.lock": {"stages": dict},
    "diffpro.profile": {"model": dict, "calibration": dict, "layers": list},
    "diffpro.scores": {"model": dict, "layers": dict},
    "diffpro.plan": {"model": dict, "layers": dict},
    "diffpro.timesteps": {"timesteps": list},
    "diffpro.quantized": {"model": dict, "layers": dict},
}


def check_schema(path: Path, obj: Any, expected: str) -> None:
    name, _, version = expected.partition("/")
    found = obj.get("schema") if isinstance(obj, dict) else None
    if not isinstance(found, str) or "/" not in found:
        raise InputError(f"{path}: missing schema field (expected {expected}); it was not written by diffpro, re-run the stage")
    fname, _, fversion = found.partition("/")
    if fname != name:
        raise InputError(f"{path}: is a {fname} artifact, expected {name}; pass the right file")
    if fversion != version:
        raise InputError(f"{path}: schema {found} cannot be read by diffpro {__version__} (reads {expected}); re-run the stage with this version")
    for key, kind in REQUIRED_KEYS.get(name, {}).items():
        if not isinstance(obj.get(key), kind):
            what = "missing" if key not in obj else f"not a JSON {'object' if kind is dict else 'list'}"
            raise InputError(f"{path}: its '{key}' is {what} (an incomplete or hand-edited {name} file); "
                             "re-run the stage that writes it")


def load_safetensors(path: str | Path) -> tuple[dict, dict]:
    """Tensors and metadata; a clear error for a missing or corrupt file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file; check the path or re-run the stage that writes it")
    try:
        tensors = {}
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            for k in f.keys():
                tensors[k] = f.get_tensor(k)
    except Exception as exc:  # safetensors raises several error types for corrupt headers
        raise InputError(f"{path}: not a readable safetensors file ({str(exc).splitlines()[0][:80]}); re-create it") from None
    return tensors, meta


# ---------------------------------------------------------------------------------------------
# Lock file: per-stage provenance and up-to-date checks
# ---------------------------------------------------------------------------------------------


def model_input_record(model) -> dict:
    """Lock-file input record for a loaded model (its weights' sha256, or the spec for random/untrained)."""
    return {"path": model.spec, "sha256": model.sha256 or sha256_json({"spec": model.spec, "untrained": model.untrained})}


def input_record(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        digest = hashlib.sha256()
        for p in files:
            digest.update(str(p.relative_to(path)).encode())
            digest.update(sha256_file(p).encode())
        return {"path": str(path), "sha256": digest.hexdigest()}
    return {"path": str(path), "sha256": sha256_file(path)}


@dataclass
class StageCheck:
    up_to_date: bool
    reason: str


@contextmanager
def _flock(path: Path, mode: int):
    """fcntl.flock on `path` (created if missing) for the duration of the block."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        raise cannot_write(path.parent, exc) from None
    try:
        fcntl.flock(fd, mode)
        yield fd
    finally:
        os.close(fd)   # closing the descriptor releases the lock


# per-process state of workdir_lock: resolved workdir → [fd, depth, pid, acquired_at]
def _well_formed(record) -> bool:
    """Whether a stage's lock record has the shape `check` reads (a hand-edited one crashed it)."""
    def digests(recs, *keys):
        return isinstance(recs, dict) and all(isinstance(r, dict) and all(isinstance(r.get(k), str) for k in keys)
                                              for r in recs.values())
    return isinstance(record, dict) and digests(record.get("inputs", {}), "sha256") and \
        digests(record.get("outputs", {}), "path", "sha256")


class Lock:
    """The work directory's `diffpro.lock.json`.

    `check` and `record` hold an flock on WORKDIR/.diffpro.lock.flock around reading (and rewriting) the
    file, so two processes recording stages at once never lose each other's records."""

    def __init__(self, workdir: str | Path):
        self.workdir = Path(workdir)
        self.path = self.workdir / LOCK_NAME

    @contextmanager
    def _guard(self, exclusive: bool):
        if not exclusive and not os.access(self.workdir, os.W_OK):
            # nothing recorded yet, or a read-only workdir nobody can be recording into; the lock file
            # itself is replaced atomically, so an unguarded read still sees a whole file
            yield None
            return
        ensure_dir(self.workdir)
        with _flock(self.workdir / LOCK_FLOCK_NAME, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) as fd:
            yield fd

    def read(self) -> dict:
        """The records. An unreadable lock file is refused, naming the fix that works from any stage."""
        if not self.path.exists():
            return {"schema": LOCK_SCHEMA, "stages": {}}
        fix = "delete it to start the workdir's records afresh (each stage then recomputes once)"
        if self.path.is_dir():   # read_json said 'no such file; run the stage that writes it'
            raise InputError(f"{self.path}: is a directory, not the lock file; remove or rename it (each stage then recomputes once)")
        obj = read_json(self.path, fix=fix)
        found = obj.get("schema") if isinstance(obj, dict) else None
        if found == LOCK_SCHEMA and isinstance(obj.get("stages"), dict):
            return obj
        if found == LOCK_SCHEMA:
            why = "its 'stages' is missing or not a JSON object;"
        elif isinstance(found, str) and found.startswith("diffpro.lock/"):
            why = (f"schema {found} cannot be read by diffpro {__version__} (reads {LOCK_SCHEMA}): another diffpro "
                   "version wrote it; run that version on this workdir, or")
        else:
            why = f"not a diffpro lock file (no schema {LOCK_SCHEMA});"
        raise InputError(f"{self.path}: {why} {fix}")

    def entry(self, stage: str) -> dict | None:
        return self.read()["stages"].get(stage)

    def check(self, stage: str, inputs: dict[str, str], config: dict) -> StageCheck:
        """Compare `inputs` (name → sha256) and `config` with the last record of `stage`."""
        with self._guard(exclusive=False):
            last = self.entry(stage)
        if last is None:
            return StageCheck(False, "never run")
        if not _well_formed(last):
            return StageCheck(False, "its lock record is malformed: hand-edited or from another diffpro version")
        changed = [k for k in inputs if last.get("inputs", {}).get(k, {}).get("sha256") != inputs[k]]
        changed += [k for k in last.get("inputs", {}) if k not in inputs]
        if changed:
            return StageCheck(False, "inputs changed: " + ", ".join(sorted(set(changed))))
        if sha256_json(last.get("config")) != sha256_json(config):
            keys = sorted(set(config) | set(last.get("config") or {}))
            diff = [k for k in keys if (last.get("config") or {}).get(k) != config.get(k)]
            return StageCheck(False, "config changed: " + ", ".join(diff))
        for name, rec in last.get("outputs", {}).items():
            p = Path(rec["path"])
            p = p if p.is_absolute() else self.workdir / p
            if not p.exists():
                return StageCheck(False, f"output missing: {rec['path']}")
            if input_record(p)["sha256"] != rec["sha256"]:
                return StageCheck(False, f"output modified: {rec['path']}")
        return StageCheck(True, "up to date")

    def record(self, stage: str, inputs: dict[str, dict], config: dict, outputs: dict[str, str | Path],
               seed: int | None, wall_s: float) -> None:
        out_recs = {}
        for name, p in outputs.items():
            p = Path(p)
            rec = input_record(p)
            try:
                rec["path"] = str(p.resolve().relative_to(self.workdir.resolve()))
            except ValueError:
                rec["path"] = str(p.resolve())
            out_recs[name] = rec
        entry = {
            "stage": stage,
            "inputs": inputs,
            "config": config,
            "outputs": out_recs,
            "diffpro_version": __version__,
            "seed": seed,
            "wall_s": round(wall_s, 3),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        with self._guard(exclusive=True):   # outputs are hashed above, outside the critical section
            lock = self.read()
            lock["stages"][stage] = entry
            atomic_write_json(self.path, lock)
