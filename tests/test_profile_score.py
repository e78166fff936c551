"""profile + score: streaming statistics, sensitivity definitions, artifacts, CLI, measured validation."""

import json
import math

import numpy as np
import pytest
import torch

from diffpro_cli.stages.profile import ProfileConfig, load_profile, write_profile
from diffpro_cli.stages.profile_stats import (PERCENTILES, LayerStats, abs_percentiles, layer_input_matrix, magnitude_hist,
                                              hist_magnitude_edges, signed_log_hist)
from diffpro_cli.stages.score import ScoreConfig, parse_weights, spearman
from diffpro_cli.stages.score_components import (cdf_and_rank, combined_scores, dimension_ratio, k_for_variance,
                                                 layer_components, pca_sensitivity)

TINY = ["--samples", "2", "--batch", "2", "--timesteps", "999:0:500"]


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: 10x faster than 2 on the busy CI box, and GEMMs cannot change their threading
    between two runs (MKL/oneDNN may adapt it to load), so same-seed artifacts are bit-identical."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _with_spectrum(n, lam, mean=None, seed=0):
    """n rows whose population covariance has exactly the eigenvalues lam (random orientation)."""
    g = torch.Generator().manual_seed(seed)
    d = len(lam)
    z = torch.randn(n, d, generator=g, dtype=torch.float64)
    z -= z.mean(0)
    q, _ = torch.linalg.qr(z)                                   # orthonormal, zero-mean columns
    rot, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    x = math.sqrt(n) * q * torch.tensor(lam, dtype=torch.float64).sqrt() @ rot.T
    return (x + (0 if mean is None else torch.as_tensor(mean, dtype=torch.float64))).float()


@pytest.fixture
def tiny_unet():
    from diffusers import UNet2DModel

    from diffpro_cli.models.base import DiffusionModel, linear_alphas_cumprod
    from diffpro_cli.models.builtin import unet_forward

    torch.manual_seed(0)
    net = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
                      down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                      norm_num_groups=4, attention_head_dim=8).eval()
    return DiffusionModel(spec="test:unet", net=net, kind="unet", sample_shape=(1, 8, 8),
                          alphas_cumprod=linear_alphas_cumprod(), forward_fn=unet_forward)


# ---------------------------------------------------------------------------------------------
# Definitions on known inputs
# ---------------------------------------------------------------------------------------------


def test_known_activations_give_expected_k95_and_energy():
    d = 64
    lam = [1.0] * 10 + [1e-3] * (d - 10)     # 95% of 10.054 needs exactly 10 components
    mean = torch.full((d,), 0.5)
    x = _with_spectrum(4096, lam, mean)
    st = LayerStats(d, n_timesteps=2, max_rows=10_000)
    st.add(0, x[:1000])
    st.add(1, x[1000:])
    spec = st.spectrum()
    assert torch.allclose(spec[:10], torch.ones(10, dtype=torch.float64), rtol=1e-4)
    assert k_for_variance(spec, 0.95) == 10
    tensors = {"L/pca_eigvals": spec, **{f"L/{k}": v for k, v in st.timestep_tensors().items()}}
    comps = layer_components(tensors, "L", d, ScoreConfig())
    assert comps["k95"] == 10 and comps["k95_over_d"] == pytest.approx(10 / d)
    energy = sum(lam) + float(mean.square().sum())               # E Σx² = tr Σ + ‖μ‖²
    assert comps["log10_energy"] == pytest.approx(math.log10(energy), abs=1e-5)


def test_pca_sensitivity_metrics_on_known_spectra():
    d = 50
    iso = torch.ones(d)
    one = torch.zeros(d)
    one[0] = 3.0
    for metric in ("erank", "participation"):
        assert pca_sensitivity(iso, metric) == pytest.approx(0.0, abs=1e-9)
        assert pca_sensitivity(one, metric) == pytest.approx(1 - 1 / d)
    assert pca_sensitivity(iso, "top1") == pytest.approx(1 / d)
    assert pca_sensitivity(one, "top1") == pytest.approx(1.0)
    assert k_for_variance(iso, 0.95) == math.ceil(0.95 * d)
    assert k_for_variance(torch.zeros(5)) == 0 and pca_sensitivity(torch.zeros(5)) == 0.0
    assert dimension_ratio(7, d, d) == pytest.approx(7 / d)      # exact spectrum: plain ratio


def test_streaming_stats_equal_batch_computation():
    g = torch.Generator().manual_seed(1)
    d = 24
    x = torch.randn(3000, d, generator=g) * torch.linspace(0.1, 3, d) + torch.linspace(-1, 2, d)
    x[5, 3] = 0.0
    chunks = [(0, x[:700]), (1, x[700:1900]), (0, x[1900:2000]), (1, x[2000:])]
    st = LayerStats(d, n_timesteps=2, max_rows=100_000)
    for ti, c in chunks:
        st.add(ti, c)
    ref = np.cov(x.double().numpy(), rowvar=False, bias=True)
    assert np.allclose(st.covariance().numpy(), ref, atol=1e-6, rtol=1e-5)
    assert np.allclose(st.spectrum().numpy(), np.sort(np.linalg.eigvalsh(ref))[::-1].clip(0), atol=1e-6)
    ch = st.channel_tensors()
    assert torch.allclose(ch["ch_mean"], x.mean(0), atol=1e-5)
    assert torch.allclose(ch["ch_meansq"], x.square().mean(0), rtol=1e-5)
    assert torch.equal(ch["ch_absmax"], x.abs().amax(0))
    ts = st.timestep_tensors()
    for ti in (0, 1):
        rows = torch.cat([c for t, c in chunks if t == ti])
        assert int(ts["ts_rows"][ti]) == rows.shape[0]
        assert float(ts["ts_energy"][ti]) == pytest.approx(float(rows.double().square().sum(1).mean()), rel=1e-6)
        assert float(ts["ts_min"][ti]) == float(rows.min()) and float(ts["ts_max"][ti]) == float(rows.max())
        assert torch.equal(ts["ts_hist"][ti], signed_log_hist(rows))
        exact = np.percentile(rows.abs().numpy(), PERCENTILES)
        assert np.allclose(ts["ts_percentiles"][ti].numpy(), exact, rtol=0.13)   # bin width ≤ 12.5%


def test_histogram_bins_and_percentiles():
    x = torch.tensor([0.0, -0.0, 1e-9, 1.0, -1.0, 1.0625, 3.0, -5e7])
    h = signed_log_hist(x)
    assert int(h.sum()) == len(x)
    mag = magnitude_hist(h)
    edges = hist_magnitude_edges()
    idx = (torch.searchsorted(edges, x.abs().double(), right=True) - 1).clamp(0, len(edges) - 2)
    assert torch.equal(mag, torch.bincount(idx, minlength=len(mag)))
    assert int(h[len(h) // 2 + 1:].sum()) == 3 and int(h[: len(h) // 2].sum()) == 2   # signs kept, 1e-9 tiny
    assert abs_percentiles(torch.zeros_like(h)) == [0.0] * len(PERCENTILES)


def test_sketch_keeps_memory_and_estimates_spread():
    d, width = 96, 32
    lam = [1.0 / (i + 1) for i in range(d)]
    x = _with_spectrum(3000, lam)
    exact, sketched = LayerStats(d, 1, max_dim=d), LayerStats(d, 1, max_dim=width, seed=3)
    for s in range(0, 3000, 500):
        exact.add(0, x[s:s + 500])
        sketched.add(0, x[s:s + 500])
    assert sketched.sketched and sketched.gram.shape == (width, width) and not exact.sketched
    e, s = exact.spectrum(), sketched.spectrum()
    assert float(s.sum()) == pytest.approx(float(e.sum()), rel=0.1)            # trace kept in expectation
    k_exact = k_for_variance(e) / d
    assert dimension_ratio(k_for_variance(s), width, d) == pytest.approx(k_exact, abs=0.1)
    assert pca_sensitivity(s, "erank", d) == pytest.approx(pca_sensitivity(e, "erank"), abs=0.1)


def test_conv_input_matrix_is_the_gemm_operand():
    conv = torch.nn.Conv2d(3, 5, 3, stride=2, padding=1)
    x = torch.randn(2, 3, 9, 9)
    mat = layer_input_matrix(conv, x)
    assert mat.shape == (2 * 5 * 5, 3 * 9)
    y = mat @ conv.weight.reshape(5, -1).T + conv.bias
    ref = conv(x).permute(0, 2, 3, 1).reshape(-1, 5)
    assert torch.allclose(y, ref, atol=1e-5)


def test_combined_score_cdf_rank_and_weights():
    comps = {"a": {"pca_sensitivity": 0.9, "log10_energy": 2.0, "k95_over_d": 0.1, "range_variability": 0.3},
             "b": {"pca_sensitivity": 0.5, "log10_energy": 1.0, "k95_over_d": 0.5, "range_variability": 0.1},
             "c": {"pca_sensitivity": 0.7, "log10_energy": 1.5, "k95_over_d": 0.3, "range_variability": 0.2}}
    for normalize in ("zscore", "rank"):
        scores = combined_scores(comps, parse_weights(""), normalize)
        assert scores["a"] > scores["c"] > scores["b"]
        cdf, rank = cdf_and_rank(scores)
        assert rank == {"a": 1, "c": 2, "b": 3} and cdf == pytest.approx({"a": 1.0, "c": 2 / 3, "b": 1 / 3})
    only_energy = combined_scores(comps, parse_weights("pca=0,k95=0,range=0,energy=2"))
    assert only_energy["a"] == pytest.approx(2 * 1.224744871, rel=1e-6)
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40])["rho"] == 1.0


# ---------------------------------------------------------------------------------------------
# The stages on tiny models
# ---------------------------------------------------------------------------------------------


def test_profile_of_a_unet_covers_its_convs(tiny_unet, tmp_path):
    write_profile(tiny_unet, ProfileConfig(samples=2, batch=2, timesteps="999,500,0", max_rows=64), tmp_path)
    doc, tensors, _ = load_profile(tmp_path)
    rows = {r["name"]: r for r in doc["layers"]}
    convs = {n: m for n, m in tiny_unet.net.named_modules() if isinstance(m, torch.nn.Conv2d)}
    linears = {n for n, m in tiny_unet.net.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(convs) | linears == set(rows) and len(convs) >= 10
    for name, conv in convs.items():
        d = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
        r = rows[name]
        assert r["kind"] == "Conv2d" and r["in_features"] == d and r["out_features"] == conv.out_channels
        assert tensors[f"{name}/pca_eigvals"].shape == (d,) and tensors[f"{name}/ch_absmax"].shape == (d,)
        assert tensors[f"{name}/ts_hist"].shape[0] == 3 and (tensors[f"{name}/ts_rows"] > 0).all()
        assert r["macs"] == pytest.approx(r["rows_per_sample"] * d * conv.out_channels)
    assert doc["calibration"]["timesteps"] == [0, 500, 999] and doc["model"]["spec"] == "test:unet"


def test_profile_shares_qkv_input_and_counts_rows(tmp_path):
    from diffpro_cli.loading import load_model

    m = load_model("builtin:dit-mnist")
    write_profile(m, ProfileConfig(samples=2, batch=2, timesteps="999,0"), tmp_path)
    doc, tensors, _ = load_profile(tmp_path)
    rows = {r["name"]: r for r in doc["layers"]}
    q, k = "transformer_blocks.0.attn1.to_q", "transformer_blocks.0.attn1.to_k"
    assert rows[k]["shares_input_with"] == q and rows[q]["shares_input_with"] is None
    assert torch.equal(tensors[f"{k}/pca_eigvals"], tensors[f"{q}/pca_eigvals"])
    assert rows[q]["rows_per_sample"] == 64 and rows["pos_embed.proj"]["kind"] == "Conv2d"
    assert int(tensors[f"{q}/ts_rows"].sum()) == 2 * 2 * 64          # samples × timesteps × tokens


def test_same_seed_gives_identical_artifacts_and_rerun_is_skipped(cli, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for w in (a, b):
        assert cli("profile", "builtin:dit-mnist", *TINY, "--workdir", w, "-q")[0] == 0
        assert cli("score", "--workdir", w, "-q", "--no-figures")[0] == 0
    # bit-identical across fresh processes; within one process oneDNN may pick another GEMM blocking,
    # so compare the statistics to float32 rounding and the table exactly
    from safetensors.torch import load_file

    ta, tb = (load_file(str(w / "profile/stats.safetensors")) for w in (a, b))
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.allclose(ta[k].double(), tb[k].double(), rtol=1e-5, atol=1e-6), k
    pa, pb = (json.loads((w / "profile/profile.json").read_text()) for w in (a, b))
    pa.pop("stats_sha256"), pb.pop("stats_sha256")
    assert pa == pb
    sa, sb = (json.loads((w / "scores.json").read_text()) for w in (a, b))
    assert sa.pop("profile") != sb.pop("profile")
    assert sa["layers"].keys() == sb["layers"].keys()
    for name in sa["layers"]:
        assert sa["layers"][name]["rank"] == sb["layers"][name]["rank"], name
    code, out, _ = cli("profile", "builtin:dit-mnist", *TINY, "--workdir", a, "--json")
    assert code == 0 and json.loads(out)["status"] == "up to date"
    code, out, _ = cli("profile", "builtin:dit-mnist", *TINY, "--workdir", a, "--json", "--seed", "1")
    assert json.loads(out)["status"] == "computed"
    assert (a / "profile/stats.safetensors").read_bytes() != (b / "profile/stats.safetensors").read_bytes()
    code, out, _ = cli("score", "--workdir", a, "--json", "--no-figures")
    assert code == 0 and json.loads(out)["status"] == "computed"          # its profile changed


def test_score_measure_writes_contract_validation_and_figures(cli, tmp_path):
    assert cli("profile", "builtin:dit-mnist", *TINY, "--workdir", tmp_path, "-q")[0] == 0
    code, out, _ = cli("score", tmp_path / "profile" / "profile.json", "--workdir", tmp_path, "--measure",
                       "--calib-samples", "2", "--calib-timesteps", "2", "--json")
    assert code == 0, out
    res = json.loads(out)
    doc = json.loads((tmp_path / "scores.json").read_text())
    assert doc["schema"] == "diffpro.scores/1" and len(doc["profile_sha256"]) == 64
    assert doc["model"]["spec"] == "builtin:dit-mnist"
    keys = {"role", "kind", "in_features", "out_features", "params", "macs", "k95", "k95_over_d", "pca_sensitivity",
            "log10_energy", "range_variability", "combined_score", "cdf", "rank", "measured_error", "taylor_error"}
    for name, layer in doc["layers"].items():
        assert keys <= set(layer), name
        assert set(layer["measured_error"]) == {"4", "8"} and layer["measured_error"]["4"] >= layer["measured_error"]["8"]
        act = layer["measured_act_error"]      # keyed by the input grid the CPU's kernels use: "8", or "7" without VNNI
        assert act and set(act) <= {"7", "8"} and all(v > 0 for v in act.values())
    ranks = sorted(layer["rank"] for layer in doc["layers"].values())
    assert ranks == list(range(1, len(ranks) + 1))
    sp = doc["validation"]["spearman"]["4"]
    assert set(sp) >= {"combined_score", "pca_sensitivity", "log10_energy", "k95_over_d", "range_variability", "taylor_error"}
    assert sp["taylor_error"]["rho"] > 0.8                # first-order estimate tracks the measurement
    assert res["spearman"]["4"]["combined_score"] == sp["combined_score"]["rho"]
    for f in ("score_pca_spectra", "score_activation_timesteps", "score_energy_vs_pca", "score_cdf", "score_measured"):
        assert (tmp_path / "figures" / f"{f}.png").read_bytes()[:4] == b"\x89PNG"


def test_score_taylor_formula_ranks_by_estimated_error(cli, tmp_path):
    assert cli("profile", "builtin:dit-mnist", *TINY, "--workdir", tmp_path, "-q")[0] == 0
    code, _, err = cli("score", "--workdir", tmp_path, "--formula", "taylor", "--calib-samples", "2",
                       "--calib-timesteps", "2", "--bits", "4", "--layer", "proj_out_2", "-q")
    assert code == 0, err
    doc = json.loads((tmp_path / "scores.json").read_text())
    layers = doc["layers"]
    top = min(layers, key=lambda n: layers[n]["rank"])
    assert max(layers[n]["taylor_error"]["4"] for n in layers) == layers[top]["taylor_error"]["4"]
    assert all(layers[n]["combined_score"] == layers[n]["output_error_proxy"] for n in layers)
    assert doc["config"]["proxy_bits"] == 4 and doc["formula"] == "taylor"


@pytest.mark.parametrize("args,code,needle", [
    (["score", "--workdir", "{tmp}"], 3, "no profile here"),
    (["profile", "builtin:dit-mnist", "--samples", "0", "--workdir", "{tmp}"], 2, "--samples"),
    (["profile", "builtin:dit-mnist", "--classes", "0,x", "--workdir", "{tmp}"], 2, "--classes"),
    (["profile", "builtin:dit-mnist", "--classes", "12", "--samples", "1", "--workdir", "{tmp}"], 2, "--classes"),
    (["profile", "builtin:dit-mnist", "--timesteps", "a:b", "--workdir", "{tmp}"], 2, "timesteps"),
    (["score", "--workdir", "{tmp}", "--measure", "--act-mode", "fast"], 2, "--act-mode"),
])
def test_user_errors_are_one_line(cli, tmp_path, args, code, needle):
    got, _, err = cli(*[a.replace("{tmp}", str(tmp_path)) for a in args])
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert got == code and lines[-1].startswith("error: ") and needle in lines[-1] and "Traceback" not in err


def test_score_option_errors_and_tampered_stats(cli, tmp_path):
    assert cli("profile", "builtin:dit-mnist", *TINY, "--workdir", tmp_path, "-q")[0] == 0
    for args, needle in ((["--pca-metric", "nope"], "--pca-metric"), (["--component-weights", "foo=1"], "--component-weights"),
                         (["--formula", "x"], "--formula"), (["--layer", "nope"], "--layer"), (["--bits", "1"], "--bits")):
        code, _, err = cli("score", "--workdir", tmp_path, *args)
        assert code == 2 and needle in err.strip().splitlines()[-1], (args, err)
    stats = tmp_path / "profile" / "stats.safetensors"
    stats.write_bytes(stats.read_bytes()[:-10] + b"0123456789")
    code, _, err = cli("score", "--workdir", tmp_path)
    assert code == 3 and "re-run `diffpro profile --force`" in err


def test_non_finite_activations_are_an_input_error(tmp_path):
    from diffpro_cli.errors import InputError
    from diffpro_cli.loading import load_model

    m = load_model("builtin:dit-mnist")
    with torch.no_grad():
        m.net.transformer_blocks[0].attn1.to_out[0].weight[0, 0] = float("nan")
    with pytest.raises(InputError, match="NaN/Inf"):
        write_profile(m, ProfileConfig(samples=1, batch=1, timesteps="999"), tmp_path)


def test_profile_and_score_a_diffusers_directory(cli, tmp_path):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    DiTTransformer2DModel(sample_size=8, in_channels=4, out_channels=8, patch_size=2, num_attention_heads=2,
                          attention_head_dim=8, num_layers=1, num_embeds_ada_norm=10, norm_type="ada_norm_zero",
                          norm_elementwise_affine=False).save_pretrained(tmp_path / "dit")
    w = tmp_path / "work"
    assert cli("profile", tmp_path / "dit", *TINY, "--workdir", w, "-q")[0] == 0
    assert cli("score", "--workdir", w, "-q", "--no-figures")[0] == 0
    layers = json.loads((w / "scores.json").read_text())["layers"]
    assert "pos_embed.proj" in layers and layers["pos_embed.proj"]["in_features"] == 4 * 2 * 2


def test_measured_activation_error_is_what_the_integer_kernel_adds():
    """measure_act_errors quantises one layer's input as its integer kernel does: its error plus the
    8-bit weight error is the error of that layer really running W8A8 (errors add to first order).
    The trained DiT's patch embedding, fed x_t itself, loses far more to its inputs than to its weights."""
    from diffpro_cli.loading import load_model
    from diffpro_cli.checkpoint import set_submodule
    from diffpro_cli.quant.kernels import act_bits_of, cpu_act_qmax
    from diffpro_cli.quant.layers import quantize_module
    from diffpro_cli.stages.score_errors import _eps_all, measure_act_errors, measure_layer_errors

    torch.manual_seed(0)
    model = load_model("builtin:dit-mnist")
    names = ["pos_embed.proj", "proj_out_2", "transformer_blocks.0.attn1.to_v", "transformer_blocks.1.ff.net.2"]
    x, t, y = torch.randn(4, 1, 32, 32), torch.tensor([100, 400, 700, 950]), torch.tensor([0, 3, 7, 9])
    act = measure_act_errors(model, names, x, t, y)
    weight = measure_layer_errors(model, names, x, t, y, [8])
    ref = _eps_all(model, x, t, y, 16)
    layers = model.quantizable_layers()
    for name in names:
        float_layer = layers[name][0]
        set_submodule(model.net, name, quantize_module(float_layer, 8, act_bits=8, act_mode="dynamic"))
        try:
            out = _eps_all(model, x, t, y, 16)
        finally:
            set_submodule(model.net, name, float_layer)
        real = float((out - ref).double().square().sum() / ref.double().square().sum())
        grid = str(act_bits_of(cpu_act_qmax(8)))     # the input grid an 8-bit-weight kernel uses here
        predicted = act[name][grid] + weight[name]["8"]
        assert act[name][grid] > 0 and 0.8 * predicted <= real <= 1.25 * predicted, (name, act[name], weight[name], real)
    assert act["pos_embed.proj"][grid] > 20 * weight["pos_embed.proj"]["8"]


def test_score_measures_the_profiled_random_network_not_one_drawn_from_another_seed(tmp_path):
    """`diffpro score` has no --seed: a random model must be rebuilt from the profile's recorded seed
    (with seed 0 it measured a different network than the one profiled)."""
    from diffpro_cli.stages.context import StageContext
    from diffpro_cli.stages.score import load_profiled_model

    ctx = StageContext.create("random:dit-tiny", tmp_path, seed=0)
    seeded = StageContext.create("random:dit-tiny", tmp_path, seed=7).model()
    doc = {"model": {"spec": "random:dit-tiny", **{k: seeded.describe()[k] for k in ("sha256", "untrained", "params")}},
           "calibration": {"seed": 7}}
    model = load_profiled_model(doc, ctx)
    first = lambda m: next(iter(m.net.state_dict().values()))   # noqa: E731
    assert torch.equal(first(model), first(seeded)) and not torch.equal(first(model), first(ctx.model()))
