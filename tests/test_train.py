"""`diffpro train`: loss weighting, resumable phases, bad input. Tiny runs (a few steps, 8 images)."""

import struct

import numpy as np
import pytest
import torch

from diffpro_cli.mnist import IMAGE_MAGIC, LABEL_MAGIC
from diffpro_cli.models.base import linear_alphas_cumprod
from diffpro_cli.train import loss_weights, train


def _fake_mnist(directory, n=8):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = (np.arange(n) % 10).astype(np.uint8)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "t10k-images-idx3-ubyte").write_bytes(struct.pack(">iiii", IMAGE_MAGIC, n, 28, 28) + images.tobytes())
    (directory / "t10k-labels-idx1-ubyte").write_bytes(struct.pack(">ii", LABEL_MAGIC, n) + labels.tobytes())
    return directory


def test_min_snr_weights_are_min_snr_gamma_over_snr_and_uniform_is_ones():
    acp = linear_alphas_cumprod().float()
    w = loss_weights(acp, "min-snr", snr_gamma=5.0)
    snr = acp / (1 - acp)
    assert torch.allclose(w, torch.minimum(snr, torch.tensor(5.0)) / snr)
    assert float(w[-1]) == pytest.approx(1.0)          # pure-noise end: SNR < gamma, weight 1
    assert float(w[0]) < 0.01                          # almost clean: heavily down-weighted
    assert torch.equal(loss_weights(acp, "uniform"), torch.ones_like(acp))
    with pytest.raises(ValueError):
        loss_weights(acp, "bogus")


def test_training_resumes_and_records_each_weighting_phase(tmp_path):
    data = _fake_mnist(tmp_path / "mnist")
    out = tmp_path / "run"
    card = train("unet-mnist", out, data_dir=data, steps=2, batch=2, checkpoint_every=1, log=lambda *a: None)
    assert card["steps"] == 2 and len(card["phases"]) == 1 and card["phases"][0]["weighting"] == "uniform"
    first = torch.load(out / "ckpt.pt", weights_only=True)

    card = train("unet-mnist", out, data_dir=data, steps=4, batch=2, loss_weighting="min-snr", log=lambda *a: None)
    phases = card["phases"]
    assert card["steps"] == 4 and [p["start"] for p in phases] == [0, 2]
    assert phases[1]["weighting"] == "min-snr" and phases[1]["snr_gamma"] == 5.0 and phases[1]["end"] == 4
    assert card["objective"].endswith("steps 0-2 uniform; steps 2-4 min-snr (gamma 5)")
    second = torch.load(out / "ckpt.pt", weights_only=True)
    assert second["losses"][:2] == first["losses"]     # resumed, not restarted
    assert any(not torch.equal(second["net"][k], first["net"][k]) for k in first["net"])

    # same settings again: nothing left to do, no new phase
    card = train("unet-mnist", out, data_dir=data, steps=4, batch=2, loss_weighting="min-snr", log=lambda *a: None)
    assert len(card["phases"]) == 2 and card["steps"] == 4


def _error_line(err):
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    return lines[0]


def test_train_cli_errors_new_phase_without_steps_bad_weighting_missing_data(cli, tmp_path):
    data = _fake_mnist(tmp_path / "mnist")
    out = tmp_path / "run"
    train("unet-mnist", out, data_dir=data, steps=1, batch=2, log=lambda *a: None)
    code, _, err = cli("train", "unet-mnist", "--out", out, "--data", data, "--steps", "1", "--batch", "2",
                       "--loss-weighting", "min-snr", "-q")
    assert code == 2 and "--steps" in _error_line(err)
    code, _, err = cli("train", "unet-mnist", "--out", out, "--loss-weighting", "nope", "-q")
    assert code == 2 and "--loss-weighting" in _error_line(err)
    code, _, err = cli("train", "unet-mnist", "--out", tmp_path / "never", "--data", tmp_path / "no-data", "-q")
    assert code == 3 and "--data" in _error_line(err) and not (tmp_path / "never").exists()


def test_train_cli_refuses_corrupt_or_foreign_checkpoint_and_file_out(cli, tmp_path):
    """Each of these ended in a traceback (UnpicklingError, RuntimeError from load_state_dict, KeyError
    'settings', FileExistsError) instead of one error line; nothing is written in their place."""
    data = _fake_mnist(tmp_path / "mnist")
    args = ("--data", data, "--steps", "1", "--batch", "2", "-q")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "ckpt.pt").write_bytes(b"garbage")
    code, _, err = cli("train", "unet-mnist", "--out", corrupt, *args)
    assert code == 3 and "not a readable training checkpoint" in _error_line(err)
    assert (corrupt / "ckpt.pt").read_bytes() == b"garbage" and not (corrupt / "unet-mnist.safetensors").exists()

    unet = tmp_path / "unet"
    train("unet-mnist", unet, data_dir=data, steps=1, batch=2, log=lambda *a: None)
    before = (unet / "ckpt.pt").read_bytes()
    for other in ("dit-mnist", "flow-mnist"):      # RuntimeError (missing keys), KeyError 'settings'
        code, _, err = cli("train", other, "--out", unet, *args)
        assert code == 3 and "checkpoint of unet-mnist, not " + other in _error_line(err)
    assert (unet / "ckpt.pt").read_bytes() == before

    # a checkpoint from before the model name was recorded: caught by its weights' keys
    ck = torch.load(unet / "ckpt.pt", weights_only=True)
    del ck["built_in"]
    torch.save(ck, unet / "ckpt.pt")
    code, _, err = cli("train", "dit-mnist", "--out", unet, *args)
    assert code == 3 and "not a training checkpoint of dit-mnist" in _error_line(err)

    a_file = tmp_path / "a-file"
    a_file.write_text("mine")
    code, _, err = cli("train", "unet-mnist", "--out", a_file, *args)
    assert code == 2 and "is a file" in _error_line(err) and a_file.read_text() == "mine"


def test_train_cli_refuses_nan_or_infinite_rates_and_a_budget_that_trains_nothing(cli, tmp_path):
    """--lr inf and --snr-gamma nan passed the `> 0` checks and exported NaN weights with exit 0; a
    --max-minutes that ran out before step 1 exported the random init and then crashed formatting
    final_loss None (TypeError)."""
    data = _fake_mnist(tmp_path / "mnist")
    args = ("--data", data, "--steps", "1", "--batch", "2", "-q")
    code, _, err = cli("train", "unet-mnist", "--out", tmp_path / "a", "--lr", "inf", *args)
    assert code == 2 and "--lr" in _error_line(err) and not (tmp_path / "a").exists()
    code, _, err = cli("train", "unet-mnist", "--out", tmp_path / "b", "--loss-weighting", "min-snr",
                       "--snr-gamma", "nan", *args)
    assert code == 2 and "--snr-gamma" in _error_line(err) and not (tmp_path / "b").exists()
    code, _, err = cli("train", "unet-mnist", "--out", tmp_path / "c", "--max-minutes", "1e-12", *args)
    assert code == 4 and "--max-minutes" in _error_line(err)
    assert not list((tmp_path / "c").glob("*"))


def test_train_install_copies_whole_files_and_an_unwritable_package_is_one_line(cli, tmp_path, monkeypatch):
    """--install used shutil.copy: a package folder it cannot write ended in a NotADirectoryError /
    PermissionError traceback after the whole training run, and an interrupted copy left a
    half-written weights file in the package."""
    from diffpro_cli.models import builtin

    data = _fake_mnist(tmp_path / "mnist")
    args = ("--data", data, "--steps", "1", "--batch", "2", "-q", "--install")
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    monkeypatch.setattr(builtin, "WEIGHTS_DIR", pkg)
    code, _, err = cli("train", "unet-mnist", "--out", tmp_path / "run", *args)
    assert code == 0, err
    for ext in (".safetensors", ".json"):
        assert (pkg / f"unet-mnist{ext}").read_bytes() == (tmp_path / "run" / f"unet-mnist{ext}").read_bytes()

    (tmp_path / "a-file").write_text("mine")
    monkeypatch.setattr(builtin, "WEIGHTS_DIR", tmp_path / "a-file" / "weights")
    code, _, err = cli("train", "unet-mnist", "--out", tmp_path / "run2", *args)
    assert code == 2 and "--install: cannot write" in _error_line(err)
    assert (tmp_path / "a-file").read_text() == "mine"
    assert not (tmp_path / "run2").exists()      # refused before training, not after it


def test_a_diverging_run_stops_with_one_line_and_exports_no_nan_weights(cli, tmp_path):
    """--lr 1e6 turned every weight into NaN within two steps and still exported them (exit 0, a model
    card with "final_loss": NaN); the last good checkpoint must stay as it was."""
    from diffpro_cli.train_loop import save_fp16_weights

    data = _fake_mnist(tmp_path / "mnist")
    out = tmp_path / "run"
    train("unet-mnist", out, data_dir=data, steps=1, batch=2, log=lambda *a: None)
    good = (out / "ckpt.pt").read_bytes()
    weights = (out / "unet-mnist.safetensors").read_bytes()
    code, _, err = cli("train", "unet-mnist", "--out", out, "--data", data, "--steps", "8", "--batch", "2",
                       "--lr", "1e6", "-q")
    assert code == 2 and "training diverged" in _error_line(err) and "--lr" in _error_line(err)
    assert (out / "ckpt.pt").read_bytes() == good and (out / "unet-mnist.safetensors").read_bytes() == weights

    with pytest.raises(Exception, match="do not fit float16"):   # 1e6 is inf in float16
        save_fp16_weights({"w": torch.tensor([1e6])}, tmp_path / "w.safetensors", "unet-mnist")
    assert not (tmp_path / "w.safetensors").exists()


def test_resuming_with_another_seed_is_refused_not_mislabelled(cli, tmp_path):
    """Resuming restored the checkpoint's generator, so a new --seed changed nothing but the model
    card, which then named a seed the model was never trained with."""
    data = _fake_mnist(tmp_path / "mnist")
    out = tmp_path / "run"
    card = train("unet-mnist", out, data_dir=data, steps=1, batch=2, seed=3, log=lambda *a: None)
    assert card["seed"] == 3
    code, _, err = cli("train", "unet-mnist", "--out", out, "--data", data, "--steps", "2", "--batch", "2",
                       "--seed", "4", "-q")
    assert code == 2 and "--seed 3" in _error_line(err)
    card = train("unet-mnist", out, data_dir=data, steps=2, batch=2, seed=3, log=lambda *a: None)
    assert card["seed"] == 3 and card["steps"] == 2


def test_a_label_file_with_a_label_beyond_9_is_refused_before_training(cli, tmp_path):
    """A label 200 reached the class embedding as an IndexError traceback mid-run (--out already created)."""
    data = _fake_mnist(tmp_path / "mnist")
    (data / "t10k-labels-idx1-ubyte").write_bytes(struct.pack(">ii", LABEL_MAGIC, 8) + bytes([0, 1, 2, 3, 4, 5, 6, 200]))
    for name in ("unet-mnist", "flow-mnist"):
        code, _, err = cli("train", name, "--out", tmp_path / name, "--data", data, "--steps", "2", "--batch", "8", "-q")
        assert code == 3 and "label 200" in _error_line(err) and not (tmp_path / name).exists()
