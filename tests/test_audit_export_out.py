"""`diffpro export ... OUT --force` never deletes what the user still needs: the current directory, the
checkpoint being exported, or the old OUT when the final rename fails."""

import shutil

import pytest

import diffpro
from diffpro_cli import export as export_mod


@pytest.fixture(scope="module")
def qdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("exportout")
    diffpro.quantize("random:dit-tiny", root / "work", bits=8, out_dir=root / "q")
    return root / "q"


def _one_error(code, err, want_code=2):
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == want_code and len(lines) == 1 and lines[0].startswith("error:"), err
    return lines[0]


@pytest.mark.parametrize("target", ["torchao", "diffusers"])
def test_force_export_to_dot_keeps_the_current_directory(qdir, tmp_path, monkeypatch, cli, target):
    """Bug caught: `diffpro export q . --force` emptied the current directory (the user's files, the
    checkpoint, the export it had just written) and ended in an `OSError: Invalid argument: '.'` traceback."""
    (tmp_path / "mine.txt").write_text("keep me")
    monkeypatch.chdir(tmp_path)
    line = _one_error(*cli("export", qdir, ".", "--to", target, "--force")[::2])
    assert "current directory" in line
    shutil.copytree(qdir, tmp_path / "q")       # the checkpoint in the current directory, a relative QDIR
    line = _one_error(*cli("export", "q", ".", "--to", target, "--force")[::2])
    assert "holds the checkpoint" in line
    assert (tmp_path / "mine.txt").read_text() == "keep me" and (tmp_path / "q" / "diffpro.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt", "q"]    # no staging folder left over
    # a relative OUT below the current directory still works (its staging folder needs OUT's real name)
    code, _, err = cli("export", "q", "sub/out", "--to", target)
    assert code == 0, err
    assert (tmp_path / "sub" / "out").is_dir() and [p.name for p in (tmp_path / "sub").iterdir()] == ["out"]


def test_force_export_into_a_folder_holding_the_checkpoint_is_refused(qdir, tmp_path, cli):
    """Bug caught: OUT = the checkpoint's own folder (torchao) or a folder above it, with --force, deleted
    the checkpoint after reading it: the quantized model was gone, replaced by the export."""
    work = tmp_path / "work"
    shutil.copytree(qdir, work / "q")
    for out in (work, work / "q"):
        line = _one_error(*cli("export", work / "q", out, "--to", "torchao", "--force")[::2])
        assert "holds the checkpoint" in line
    line = _one_error(*cli("export", work / "q", work, "--to", "diffusers", "--force")[::2])
    assert "holds the checkpoint" in line
    assert sorted(p.name for p in (work / "q").iterdir()) == ["diffpro.json", "model.safetensors"]


def test_a_failed_final_rename_keeps_the_old_out(qdir, tmp_path, monkeypatch, cli):
    """Bug caught: --force deleted the old OUT before renaming the new export into place, so a failed
    rename (or an interrupt between the two) left neither, and the OSError was a traceback."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    real_rename = type(out).rename

    def failing_rename(self, target):
        if self.name.endswith(".tmp"):
            raise OSError(28, "No space left on device")
        return real_rename(self, target)

    monkeypatch.setattr(type(out), "rename", failing_rename)
    line = _one_error(*cli("export", qdir, out, "--to", "torchao", "--force")[::2])
    assert "cannot write" in line
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (out / "old.txt").read_text() == "old"
    monkeypatch.undo()
    assert export_mod.export_torchao(qdir, out, force=True)["fqn_to_config"]
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors", "torchao_config.json"]


def test_force_export_over_a_symlinked_out_replaces_the_link_not_its_target(qdir, tmp_path, cli):
    """Bug caught: OUT a symlink to an earlier export (`latest -> run3`) with --force ended in rmtree's
    `OSError: Cannot call rmtree on a symbolic link` traceback."""
    (tmp_path / "run3").mkdir()
    (tmp_path / "run3" / "old.txt").write_text("old")
    (tmp_path / "latest").symlink_to(tmp_path / "run3", target_is_directory=True)
    code, _, err = cli("export", qdir, tmp_path / "latest", "--to", "torchao", "--force")
    assert code == 0, err
    assert not (tmp_path / "latest").is_symlink() and (tmp_path / "latest" / "torchao_config.json").is_file()
    assert (tmp_path / "run3" / "old.txt").read_text() == "old"       # the link's target is left alone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "run3"]


def test_a_workdir_given_as_qdir_names_its_checkpoint(qdir, tmp_path, cli):
    """Bug caught: `diffpro export WORKDIR OUT` (the folder `diffpro run` wrote) answered "run `diffpro
    quantize` first" to a user who had, instead of naming WORKDIR/quantized."""
    shutil.copytree(qdir, tmp_path / "work" / "quantized")
    line = _one_error(*cli("export", tmp_path / "work", tmp_path / "out")[::2], want_code=3)
    assert str(tmp_path / "work" / "quantized") in line and "diffpro quantize" not in line
    assert not (tmp_path / "out").exists()


def test_a_full_disk_while_copying_the_weights_is_one_line_and_leaves_nothing(qdir, tmp_path, monkeypatch, cli):
    """Bug caught: ENOSPC while the diffusers export copied model.safetensors ended in an OSError traceback
    (the staging folder was removed, but the user saw a crash, not what to do)."""
    real_copy = shutil.copyfile

    def full_disk(src, dst, *args, **kwargs):
        if str(src).endswith("model.safetensors"):
            with open(dst, "wb") as f:
                f.write(b"partial")
            raise OSError(28, "No space left on device")
        return real_copy(src, dst, *args, **kwargs)

    monkeypatch.setattr(shutil, "copyfile", full_disk)
    line = _one_error(*cli("export", qdir, tmp_path / "out", "--to", "diffusers")[::2])
    assert "cannot write" in line and "No space left" in line
    assert list(tmp_path.iterdir()) == []
