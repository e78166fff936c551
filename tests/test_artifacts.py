import json

import pytest
import torch

from diffpro_cli.artifacts import (Lock, atomic_save_safetensors, atomic_write_json, input_record, load_safetensors,
                                   read_json, sha256_file)
from diffpro_cli.errors import InputError
from diffpro_cli.stages.common import run_stage


def test_json_and_safetensors_round_trip(tmp_path):
    p = atomic_write_json(tmp_path / "a" / "x.json", {"schema": "diffpro.test/1", "v": [1, 2]})
    assert read_json(p, "diffpro.test/1")["v"] == [1, 2]
    t = {"w": torch.arange(6, dtype=torch.int8).view(2, 3), "s": torch.rand(3)}
    q = atomic_save_safetensors(tmp_path / "t.safetensors", t, metadata={"k": "v"})
    back, meta = load_safetensors(q)
    assert torch.equal(back["w"], t["w"]) and torch.equal(back["s"], t["s"]) and meta == {"k": "v"}
    assert not list(tmp_path.rglob("*.tmp"))


def test_interrupted_write_keeps_previous_artifact(tmp_path):
    p = atomic_write_json(tmp_path / "x.json", {"v": 1})
    from diffpro_cli import artifacts

    def boom(path):
        path.write_text('{"v": 2, "half')
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        artifacts._atomic_write(p, boom)
    assert json.loads(p.read_text()) == {"v": 1}
    assert sorted(x.name for x in tmp_path.iterdir()) == ["x.json"]


@pytest.mark.parametrize("content,expect", [
    (None, "no such file"),
    ("{not json", "not valid JSON"),
    ('{"v": 1}', "missing schema"),
    ('{"schema": "diffpro.other/1"}', "is a diffpro.other artifact"),
    ('{"schema": "diffpro.test/9"}', "cannot be read"),
])
def test_read_json_errors(tmp_path, content, expect):
    p = tmp_path / "x.json"
    if content is not None:
        p.write_text(content)
    with pytest.raises(InputError, match=expect):
        read_json(p, "diffpro.test/1")


def test_corrupt_safetensors_is_clear_error(tmp_path):
    p = tmp_path / "bad.safetensors"
    p.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(InputError, match="not a readable safetensors"):
        load_safetensors(p)


def test_run_stage_skips_names_changes_and_forces(tmp_path):
    calls = []
    src = tmp_path / "in.txt"
    src.write_text("a")
    out = tmp_path / "w" / "out.json"

    def go(config, force=False):
        def compute():
            calls.append(1)
            atomic_write_json(out, {"n": len(calls)})
        return run_stage(tmp_path / "w", "demo", {"src": input_record(src)}, config, {"out": out}, compute, force=force, seed=0)

    assert go({"k": 1}).status == "computed"
    assert go({"k": 1}).status == "up to date" and len(calls) == 1
    r = go({"k": 2})
    assert r.status == "computed" and "config changed: k" in r.reason
    src.write_text("b")
    r = go({"k": 2})
    assert r.status == "computed" and r.reason == "inputs changed: src"
    assert go({"k": 2}, force=True).status == "computed" and len(calls) == 4
    out.write_text('{"n": 99}')  # someone edited the output
    assert "output modified" in go({"k": 2}).reason
    out.unlink()
    assert "output missing" in go({"k": 2}).reason
    entry = Lock(tmp_path / "w").entry("demo")
    assert entry["seed"] == 0 and entry["inputs"]["src"]["sha256"] == sha256_file(src)
    assert entry["outputs"]["out"]["path"] == "out.json"


def test_lock_refuses_other_schema_version(tmp_path):
    (tmp_path / "diffpro.lock.json").write_text('{"schema": "diffpro.lock/99", "stages": {}}')
    with pytest.raises(InputError, match="cannot be read"):
        Lock(tmp_path).read()


def test_safetensors_files_are_byte_reproducible(tmp_path):
    # catches: metadata written in the safetensors writer's hash-map order, which gave the same checkpoint
    # another sha256 on every save (lock records and feature caches keyed on it then missed)
    from diffpro_cli.artifacts import sha256_file

    tensors = {"a": torch.arange(10.0), "b": torch.ones(3, dtype=torch.int8)}
    meta = {f"k{i}": f"v{i}" for i in range(6)} | {"prompt": 'a "quoted" café\nline'}
    shas = {sha256_file(atomic_save_safetensors(tmp_path / f"{i}.safetensors", tensors, meta)) for i in range(8)}
    assert len(shas) == 1
    loaded, got = load_safetensors(tmp_path / "0.safetensors")
    assert got == meta and torch.equal(loaded["a"], tensors["a"]) and torch.equal(loaded["b"], tensors["b"])
