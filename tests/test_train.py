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


def test_min_snr_weights():
    acp = linear_alphas_cumprod().float()
    w = loss_weights(acp, "min-snr", snr_gamma=5.0)
    snr = acp / (1 - acp)
    assert torch.allclose(w, torch.minimum(snr, torch.tensor(5.0)) / snr)
    assert float(w.max()) <= 1.0 + 1e-6
    assert float(w[-1]) == pytest.approx(1.0)          # pure-noise end: SNR < gamma, weight 1
    assert float(w[0]) < 0.01                          # almost clean: heavily down-weighted
    assert torch.equal(loss_weights(acp, "uniform"), torch.ones_like(acp))
    with pytest.raises(ValueError):
        loss_weights(acp, "bogus")


def test_training_phases_are_recorded_and_resume(tmp_path):
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


def test_new_phase_needs_more_steps(cli, tmp_path):
    data = _fake_mnist(tmp_path / "mnist")
    out = tmp_path / "run"
    train("unet-mnist", out, data_dir=data, steps=1, batch=2, log=lambda *a: None)
    code, _, err = cli("train", "unet-mnist", "--out", out, "--data", data, "--steps", "1", "--batch", "2",
                       "--loss-weighting", "min-snr", "-q")
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert code != 0 and "Traceback" not in err and "--steps" in lines[-1]
    code, _, err = cli("train", "unet-mnist", "--out", out, "--loss-weighting", "nope", "-q")
    assert code != 0 and "--loss-weighting" in err and "Traceback" not in err
    code, _, err = cli("train", "unet-mnist", "--out", tmp_path / "never", "--data", tmp_path / "no-data", "-q")
    assert code != 0 and "--data" in err and "Traceback" not in err and not (tmp_path / "never").exists()
