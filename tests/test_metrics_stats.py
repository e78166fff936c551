"""Bootstrap FID intervals, paired differences, KID, PSNR/SSIM (metrics.stats, metrics.paired, metrics.evidence).
Small synthetic features only: no Inception, no model."""

import numpy as np
import pytest
import torch

from diffpro_cli.metrics import evidence
from diffpro_cli.metrics import paired as P
from diffpro_cli.metrics import stats as S
from diffpro_cli.metrics.fid import frechet_distance, stats_from_features


def _gauss(rng, n, d, shift=0.0, scale=1.0):
    return shift + scale * rng.normal(size=(n, d))


@pytest.mark.parametrize("n,d", [(12, 30), (40, 6)])   # Gram path (n <= d) and d x d path (n > d)
def test_every_resample_fid_equals_the_fid_of_the_resampled_features(n, d):
    """Catches a wrong centring/normalisation in the n x n (or counts-based d x d) shortcut."""
    rng = np.random.default_rng(1)
    x, y = _gauss(rng, n, d), _gauss(rng, n, d, 0.2, 1.3)
    mu, sigma = stats_from_features(_gauss(rng, 200, d, 0.1))
    idx = S.bootstrap_indices(n, 6, seed=3)
    got = S.fid_replicates(x, mu, sigma, idx)
    got_between = S.fid_replicates_between(x, y, idx)
    for b, i in enumerate(idx):
        want = frechet_distance(*stats_from_features(x[i]), mu, sigma, method="eigh")
        want_between = frechet_distance(*stats_from_features(x[i]), *stats_from_features(y[i]), method="eigh")
        assert got[b] == pytest.approx(want, rel=1e-6, abs=1e-6)
        assert got_between[b] == pytest.approx(want_between, rel=1e-6, abs=1e-6)
    # the identity "resample" is the plain FID (what the bench reports as the estimate)
    assert S.fid_replicates(x, mu, sigma, np.arange(n)[None])[0] == pytest.approx(
        frechet_distance(*stats_from_features(x), mu, sigma, method="eigh"), rel=1e-6)


def test_bootstrap_indices_are_seeded_and_drawn_with_replacement():
    a, b, c = S.bootstrap_indices(50, 200, 7), S.bootstrap_indices(50, 200, 7), S.bootstrap_indices(50, 200, 8)
    assert a.shape == (200, 50) and np.array_equal(a, b) and not np.array_equal(a, c)   # seed decides
    assert all(len(np.unique(r)) < 50 for r in a[:20])   # with replacement: repeats in every resample


def _true_fid(mu1, s1, mu2, s2):
    from scipy.linalg import sqrtm

    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * np.real(sqrtm(s1 @ s2))))


def test_fid_interval_covers_the_true_fid_of_two_gaussians_in_90_percent_of_repetitions():
    """Low dimension (FID's small-N bias far below its spread): catches an interval that is too narrow
    or centred on the bootstrap mean (the plain percentile interval covers ~0 % here at larger d)."""
    d, n = 4, 200
    rng = np.random.default_rng(0)
    mu_r, s_r = np.zeros(d), np.diag(np.linspace(0.5, 2, d))
    mu_g, s_g = np.full(d, 1.0), np.diag(np.linspace(0.6, 1.8, d))
    truth = _true_fid(mu_g, s_g, mu_r, s_r)
    chol = np.linalg.cholesky(s_g)
    hits = 0
    for rep in range(100):
        x = mu_g + rng.normal(size=(n, d)) @ chol.T
        est = S.fid_replicates(x, mu_r, s_r, np.arange(n)[None])[0]
        idx = S.bootstrap_indices(n, 200, seed=rep)
        lo, hi = S.interval(S.fid_replicates(x, mu_r, s_r, idx), est, indices=idx)
        assert lo <= est <= hi
        hits += lo <= truth <= hi
    assert hits >= 90


def test_fid_interval_brackets_fid_at_n_where_small_n_bias_dominates():
    """d = 64, n = 100: replicates sit far above the estimate (bootstrap bias); the reported interval
    must still cover E[FID_N] (Monte Carlo) and the estimate, while the plain percentile one does not."""
    d, n = 64, 100
    rng = np.random.default_rng(5)
    mu_r, s_r = np.zeros(d), np.diag(np.linspace(0.5, 2, d))
    mu_g, chol = np.full(d, 0.15), np.diag(np.sqrt(np.linspace(0.6, 1.8, d)))
    ident = np.arange(n)[None]
    draws = [S.fid_replicates(mu_g + rng.normal(size=(n, d)) @ chol.T, mu_r, s_r, ident)[0] for _ in range(300)]
    expected = float(np.mean(draws))
    hits = plain_hits = 0
    widths = []
    for rep in range(30):
        x = mu_g + rng.normal(size=(n, d)) @ chol.T
        est = S.fid_replicates(x, mu_r, s_r, ident)[0]
        idx = S.bootstrap_indices(n, 200, seed=rep)
        boot = S.fid_replicates(x, mu_r, s_r, idx)
        lo, hi = S.interval(boot, est, indices=idx)
        hits += lo <= expected <= hi
        plain_lo, plain_hi = np.quantile(boot, [0.025, 0.975])
        plain_hits += plain_lo <= expected <= plain_hi
        widths.append(hi - lo)
    assert hits >= 27 and plain_hits <= 3
    true_width = np.quantile(draws, 0.975) - np.quantile(draws, 0.025)
    # duplicate-count regression: without it the width is ~4x FID's real spread here
    assert np.mean(widths) < 2.5 * true_width


def test_paired_delta_interval_is_narrower_than_unpaired_and_detects_a_real_difference():
    """Rows share seeds: sample j of row b = sample j of row a plus a small shift. The paired interval
    (same indices) excludes 0; bootstrapping the rows independently would not cancel the shared noise."""
    rng = np.random.default_rng(2)
    n, d = 150, 8
    mu_r, s_r = np.zeros(d), np.eye(d)
    a = _gauss(rng, n, d, 0.3)
    b = a + 0.08 + 0.02 * rng.normal(size=(n, d))
    ident = np.arange(n)[None]
    fa, fb = S.fid_replicates(a, mu_r, s_r, ident)[0], S.fid_replicates(b, mu_r, s_r, ident)[0]
    idx = S.bootstrap_indices(n, 300, seed=0)
    ra, rb = S.fid_replicates(a, mu_r, s_r, idx), S.fid_replicates(b, mu_r, s_r, idx)
    paired = S.paired_interval(rb, ra, fb, fa, indices=idx)
    assert S.excludes_zero(paired) and paired[0] > 0
    other = S.fid_replicates(b, mu_r, s_r, S.bootstrap_indices(n, 300, seed=1))
    unpaired = S.interval(other - ra, fb - fa)
    assert paired[1] - paired[0] < 0.5 * (unpaired[1] - unpaired[0])
    with pytest.raises(ValueError, match="same indices"):
        S.paired_interval(ra, rb[:-1], fa, fb)


def _kid_reference(x, y):
    """Unbiased polynomial MMD^2 written out with loops (independent of the vectorised one)."""
    m, d = x.shape
    k = lambda u, v: (float(u @ v) / d + 1) ** 3
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_kid_matches_a_direct_implementation_and_torchmetrics_when_installed():
    rng = np.random.default_rng(4)
    x, y = _gauss(rng, 20, 16, 0.0), _gauss(rng, 20, 16, 0.4)
    want = _kid_reference(x, y)
    assert S.polynomial_mmd2_unbiased(x, y) == pytest.approx(want, rel=1e-10)
    # one subset holding every row: the mean is that value, whatever the seed
    got = S.kid(x, y, subsets=3, subset_size=20, seed=9)
    assert got["kid"] == pytest.approx(want, rel=1e-10) and got["kid_std"] == pytest.approx(0, abs=1e-12)
    try:
        from torchmetrics.image.kid import poly_mmd
    except ImportError:
        return
    tm = float(poly_mmd(torch.from_numpy(y), torch.from_numpy(x), degree=3, gamma=None, coef=1.0))
    assert got["kid"] == pytest.approx(tm, rel=1e-8)


def test_kid_is_about_zero_for_the_same_distribution_and_positive_for_a_shifted_one(monkeypatch):
    rng = np.random.default_rng(6)
    ref = np.abs(_gauss(rng, 400, 32))
    same = np.abs(_gauss(rng, 200, 32))
    shifted = np.abs(_gauss(rng, 200, 32)) + 0.3
    k_same = S.kid(same, ref, subsets=50, seed=0)
    k_shift = S.kid(shifted, ref, subsets=50, seed=0)
    assert k_same["subset_size"] == 200          # min(1000, N, reference)
    assert abs(k_same["kid"]) < 2 * k_same["kid_std"] + 1e-3
    assert k_shift["kid"] > 10 * max(abs(k_same["kid"]), 1e-4) and k_shift["kid"] > 3 * k_shift["kid_std"]
    assert S.kid(shifted, ref, subsets=50, seed=0) == k_shift      # seeded: same subsets
    monkeypatch.setattr(S, "_KID_FULL_KERNEL_MAX", 0)              # per-subset kernels (large sets): same values
    assert S.kid(shifted, ref, subsets=50, seed=0)["kid"] == pytest.approx(k_shift["kid"], rel=1e-12)
    assert S.kid(shifted, ref, subsets=50, seed=1)["kid"] != k_shift["kid"]


def test_psnr_against_hand_computed_values():
    a = torch.zeros(2, 1, 16, 16, dtype=torch.uint8)
    b = a.clone()
    b[0, 0, :8] = 51          # half the pixels 0.2 off: MSE 0.02 → 16.99 dB
    p = P.psnr(a, b)
    assert p[0] == pytest.approx(10 * np.log10(1 / 0.02), rel=1e-9)
    # identical images: MSE floored at one pixel one level off, finite (a mean over images stays finite)
    assert p[1] == pytest.approx(10 * np.log10(255 ** 2 * 256), rel=1e-9)


def test_ssim_is_one_for_identical_images_and_matches_the_constant_image_formula():
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.integers(0, 256, size=(3, 1, 24, 24), dtype=np.uint8))
    assert P.ssim(x, x) == pytest.approx(np.ones(3), abs=1e-12)
    # constant images a, b: variances 0, SSIM = (2ab + C1) / (a^2 + b^2 + C1) at every position
    a8, b8 = 102, 51
    ca, cb = torch.full((1, 1, 16, 16), a8, dtype=torch.uint8), torch.full((1, 1, 16, 16), b8, dtype=torch.uint8)
    a, b, c1 = a8 / 255, b8 / 255, 0.01 ** 2
    assert P.ssim(ca, cb)[0] == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-9)
    noisy = (x.int() + torch.from_numpy(rng.integers(-40, 41, size=x.shape))).clamp(0, 255).to(torch.uint8)
    noisier = (x.int() + torch.from_numpy(rng.integers(-120, 121, size=x.shape))).clamp(0, 255).to(torch.uint8)
    assert (P.ssim(x, noisier) < P.ssim(x, noisy)).all() and (P.ssim(x, noisy) < 0.99).all()


def test_ssim_matches_torchmetrics_ssim_map_at_the_valid_positions_when_installed():
    """torchmetrics averages its SSIM map over reflect-padded borders too; at the positions where the
    11 x 11 window lies inside the image (Wang et al.'s 'valid' map, ours) the maps must agree."""
    tm = pytest.importorskip("torchmetrics.functional.image")
    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.integers(0, 256, size=(4, 3, 32, 32), dtype=np.uint8))
    y = (x.int() + torch.from_numpy(rng.integers(-30, 31, size=x.shape))).clamp(0, 255).to(torch.uint8)
    want = []
    for i in range(4):
        _, full = tm.structural_similarity_index_measure(x[i:i + 1].double() / 255, y[i:i + 1].double() / 255,
                                                         data_range=1.0, return_full_image=True)
        want.append(float(full[..., 5:-5, 5:-5].mean()))
    assert P.ssim(x, y) == pytest.approx(np.array(want), rel=1e-9)


def test_measure_rows_gives_every_field_and_paired_intervals_on_shared_indices():
    rng = np.random.default_rng(3)
    n, d = 40, 10
    base = np.abs(_gauss(rng, n, d))
    feats = {"fp32": base, "q": base + 0.05 * rng.normal(size=(n, d)), "far": base + 0.6}
    imgs = torch.from_numpy(rng.integers(0, 256, size=(n, 1, 16, 16), dtype=np.uint8))
    paired = {"fp32": imgs, "q": (imgs.int() + 3).clamp(0, 255).to(torch.uint8), "far": 255 - imgs}
    mu, sigma = stats_from_features(np.abs(_gauss(rng, 300, d)))
    ref = np.abs(_gauss(rng, 100, d))
    out, reps = evidence.measure_rows(feats, paired, mu, sigma, ref, seed=0, resamples=100)
    for row in out.values():
        assert row["fid_ci95"][0] <= row["fid"] <= row["fid_ci95"][1]
        assert row["kid"] is not None and row["kid_std"] >= 0
    assert out["fp32"]["fid_vs_fp"] == 0.0 and out["fp32"]["psnr_vs_fp32"] is None   # the baseline itself
    assert out["q"]["psnr_vs_fp32"] > out["far"]["psnr_vs_fp32"]
    assert out["q"]["ssim_vs_fp32"] > out["far"]["ssim_vs_fp32"]
    lo, hi = out["q"]["psnr_vs_fp32_ci95"]
    assert lo <= out["q"]["psnr_vs_fp32"] <= hi
    assert out["far"]["fid_vs_fp"] > out["q"]["fid_vs_fp"]
    far_vs_q = reps.paired_ci("far", "q", "fid_vs_fp")
    assert far_vs_q[0] > 0                          # a real difference, paired on the same resamples
    # paired Δ of fid_vs_fp against the baseline is the row's own fid_vs_fp interval
    assert reps.paired_ci("q", "fp32", "fid_vs_fp") == pytest.approx(out["q"]["fid_vs_fp_ci95"])
    assert reps.paired_ci("q", "missing") is None
