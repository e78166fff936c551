"""The data diffpro reads by default (MNIST, FID reference statistics, built-in weights) ships inside the
package: nothing resolves outside the installed package directory (issue #18, defect 3)."""

import fnmatch
import gzip
import hashlib
import tomllib
from pathlib import Path

import numpy as np
import pytest

import diffpro_cli
from diffpro_cli.errors import InputError
from diffpro_cli.metrics import fid as M
from diffpro_cli.mnist import IMAGE_MAGIC, LABEL_MAGIC, default_mnist_dir, load_mnist
from diffpro_cli.models.builtin import BUILTIN_CONFIGS, load_builtin, weights_path

PACKAGE = Path(diffpro_cli.__file__).resolve().parent
REPO = Path(__file__).resolve().parents[1]
MNIST_SHA256 = {  # as documented in diffpro_cli/data/mnist/README.md
    "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
    "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
}
LABEL_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]  # the MNIST test set's digits 0..9


def _inside_package(path) -> bool:
    return Path(path).resolve().is_relative_to(PACKAGE)


def _glob_matches(relative: str, pattern: str) -> bool:
    """setuptools' package-data glob: '*' stays within one path component."""
    parts, pats = relative.split("/"), pattern.split("/")
    return len(parts) == len(pats) and all(fnmatch.fnmatchcase(a, b) for a, b in zip(parts, pats))


def _header(path: Path) -> tuple[int, list[int]]:
    with gzip.open(path, "rb") as f:
        raw = f.read(16)
    ndim = raw[3]
    return int.from_bytes(raw[:4], "big"), [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]


def test_default_mnist_dir_is_inside_the_package(monkeypatch):
    monkeypatch.delenv("DIFFPRO_MNIST", raising=False)
    directory = default_mnist_dir()
    assert _inside_package(directory), directory
    for name, sha in MNIST_SHA256.items():
        assert hashlib.sha256((directory / name).read_bytes()).hexdigest() == sha, name


def test_shipped_mnist_has_idx_magic_and_10000_labelled_digits(monkeypatch):
    monkeypatch.delenv("DIFFPRO_MNIST", raising=False)
    directory = default_mnist_dir()
    assert _header(directory / "t10k-images-idx3-ubyte.gz") == (IMAGE_MAGIC, [10000, 28, 28])
    assert _header(directory / "t10k-labels-idx1-ubyte.gz") == (LABEL_MAGIC, [10000])
    images, labels = load_mnist()
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels, minlength=10).tolist() == LABEL_COUNTS
    assert 0 < images.mean() < 255  # real pixels, not an all-black or all-white array


def test_diffpro_mnist_env_overrides_the_shipped_set(monkeypatch, tmp_path):
    monkeypatch.setenv("DIFFPRO_MNIST", str(tmp_path))
    assert default_mnist_dir() == tmp_path
    with pytest.raises(InputError, match=str(tmp_path)):
        load_mnist()  # reads the override (empty), not the package copy


def test_builtin_fid_stats_are_inside_the_package_and_load():
    from importlib.resources import files

    for name, filename in M.BUILTIN_STATS.items():
        path = Path(str(files("diffpro_cli") / "data" / filename))
        assert _inside_package(path) and path.exists(), path
        mu, sigma, n = M.load_reference_stats(name)
        assert mu.shape == (2048,) and sigma.shape == (2048, 2048) and n == 10000


@pytest.mark.parametrize("name", sorted(BUILTIN_CONFIGS))
def test_builtin_weights_are_inside_the_package_and_load_trained(name):
    path = weights_path(name)
    assert _inside_package(path) and path.exists(), path
    model = load_builtin(name, allow_untrained=False)  # raises if the weights are missing
    assert model.untrained is False
    assert model.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_package_data_globs_cover_every_shipped_data_file_and_stay_under_30_mb():
    """An editable install reads the tree, so a file missing from package-data only breaks pip users."""
    pyproject = REPO / "pyproject.toml"
    if not pyproject.exists():
        pytest.skip("not a source checkout")
    globs = tomllib.loads(pyproject.read_text())["tool"]["setuptools"]["package-data"]["diffpro_cli"]
    data = [p for d in ("data", "models/weights") for p in (PACKAGE / d).rglob("*")
            if p.is_file() and p.suffix not in (".py", ".pyc")]
    assert len(data) >= 8  # MNIST images, labels, README; FID stats npz+json; two weights + cards
    unmatched = [p.relative_to(PACKAGE).as_posix() for p in data
                 if not any(_glob_matches(p.relative_to(PACKAGE).as_posix(), g) for g in globs)]
    assert not unmatched, f"add to [tool.setuptools.package-data]: {unmatched}"
    total = sum(p.stat().st_size for p in data)
    assert total < 30 * 2**20, total   # 25 MB until builtin:flow-mnist (4.6 MB of weights) joined the three models


def test_no_code_reads_the_shared_directory_beside_the_checkout():
    """CI's clone has the shared assets folder beside it; a user's install does not."""
    if not (REPO / "Makefile").exists():
        pytest.skip("not a source checkout")
    needles = ["../" + "shared", '"shared" / ' + '"assets"', "shared/" + "assets"]
    files = [REPO / "Makefile"] + [p for d in ("diffpro_cli", "tests", "scripts", "benchmarks")
                                   for p in (REPO / d).rglob("*.py")]
    hits = [f"{p.relative_to(REPO)}: {n}" for p in files for n in needles if n in p.read_text(errors="replace")]
    assert not hits, hits
