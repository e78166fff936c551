"""Artifact IO: atomic writes, hashing, schema versions and the per-workdir lock file.

Every file is written to a temporary name in the same directory and renamed into place, so an
interrupted stage (Ctrl-C, kill) leaves the previous artifact readable. `diffpro.lock.json` records,
per stage, the sha256 of its inputs, its config and its outputs; a stage whose inputs, config and
outputs all still match is skipped as up to date.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from diffpro_cli import __version__
from diffpro_cli.errors import InputError

LOCK_NAME = "diffpro.lock.json"
LOCK_SCHEMA = "diffpro.lock/1"


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
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
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
    from safetensors.torch import save_file

    tensors = {k: v.contiguous() for k, v in tensors.items()}
    return _atomic_write(Path(path), lambda p: save_file(tensors, str(p), metadata=metadata))


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    import torch

    return _atomic_write(Path(path), lambda p: torch.save(obj, p))


def read_json(path: str | Path, schema: str | None = None) -> dict:
    """Read a JSON artifact; with `schema` ("name/version"), refuse other names and newer versions."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file; run the stage that writes it first or check the path")
    try:
        obj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not valid JSON ({exc.msg if hasattr(exc, 'msg') else exc}); delete it and re-run the stage that writes it") from None
    if schema is not None:
        check_schema(path, obj, schema)
    return obj


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


def load_safetensors(path: str | Path) -> tuple[dict, dict]:
    """Tensors and metadata; a clear error for a missing or corrupt file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
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


class Lock:
    """The work directory's `diffpro.lock.json`."""

    def __init__(self, workdir: str | Path):
        self.workdir = Path(workdir)
        self.path = self.workdir / LOCK_NAME

    def read(self) -> dict:
        if not self.path.exists():
            return {"schema": LOCK_SCHEMA, "stages": {}}
        return read_json(self.path, LOCK_SCHEMA)

    def entry(self, stage: str) -> dict | None:
        return self.read()["stages"].get(stage)

    def check(self, stage: str, inputs: dict[str, str], config: dict) -> StageCheck:
        """Compare `inputs` (name → sha256) and `config` with the last record of `stage`."""
        last = self.entry(stage)
        if last is None:
            return StageCheck(False, "never run")
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
        lock = self.read()
        out_recs = {}
        for name, p in outputs.items():
            p = Path(p)
            rec = input_record(p)
            try:
                rec["path"] = str(p.resolve().relative_to(self.workdir.resolve()))
            except ValueError:
                rec["path"] = str(p.resolve())
            out_recs[name] = rec
        lock["stages"][stage] = {
            "stage": stage,
            "inputs": inputs,
            "config": config,
            "outputs": out_recs,
            "diffpro_version": __version__,
            "seed": seed,
            "wall_s": round(wall_s, 3),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        atomic_write_json(self.path, lock)
