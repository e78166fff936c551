"""Pair-bounded int8 weights (quant/pair_bound.py): the bound, minimal change, the conv pairing, and the
AVX2 kernels computing the exact integer GEMM with full 8-bit activations once weights are bounded."""

import json
import os
import subprocess
import sys

import pytest
import torch

from diffpro_cli.quant.formats import fp16_scale
from diffpro_cli.quant.pair_bound import (
    PAIR_BOUND,
    bounded_channel_grid,
    pair_bound,
    pair_bound_conv,
)

AVX2_ENV = {"FBGEMM_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}


def _pair_sums(q):
    q = q.to(torch.int32)
    if q.shape[1] % 2:
        q = torch.cat([q, q.new_zeros(q.shape[0], 1)], dim=1)
    return q.abs().reshape(q.shape[0], -1, 2).sum(-1)


@pytest.mark.parametrize("k", [64, 37])
def test_every_pair_is_bounded_and_only_violating_pairs_change(k):
    torch.manual_seed(0)
    q = torch.randint(-127, 128, (24, k), dtype=torch.int8)
    fixed, changed = pair_bound(q)
    assert fixed.dtype == torch.int8 and fixed.shape == q.shape
    sums_before, sums_after = _pair_sums(q), _pair_sums(fixed)
    assert int(sums_after.max()) <= PAIR_BOUND
    bad = sums_before > PAIR_BOUND
    assert bool(bad.any()) and bool((~bad).any())            # the data exercises both cases
    assert bool((sums_after[bad] == PAIR_BOUND).all())        # moved onto the bound, not below it
    pad = lambda t: torch.cat([t, t.new_zeros(t.shape[0], k % 2)], 1).reshape(t.shape[0], -1, 2)
    assert torch.equal(pad(fixed)[~bad], pad(q)[~bad])        # untouched pairs are unchanged
    assert changed == int((fixed != q).sum()) > 0
    same_sign = (fixed.int() * q.int() >= 0) & (fixed.int().abs() <= q.int().abs())
    assert bool(same_sign.all())                               # signs kept, magnitudes never grow


def test_known_pairs_split_the_excess_evenly():
    q = torch.tensor([[127, 127, 127, -3, -100, 50, 64, 64, 120]], dtype=torch.int8)
    fixed, changed = pair_bound(q)
    assert fixed.tolist() == [[64, 64, 126, -2, -89, 39, 64, 64, 120]]
    assert changed == 6


def test_violating_pairs_get_the_least_squared_error_on_the_bound():
    torch.manual_seed(1)
    target = torch.empty(40, 2).uniform_(-127.4, 127.4)
    target = target[target.abs().round().sum(-1) > PAIR_BOUND]
    q = target.round().to(torch.int8)
    grid = torch.cartesian_prod(torch.arange(-127, 128), torch.arange(-127, 128)).float()
    grid = grid[grid.abs().sum(-1) <= PAIR_BOUND]              # every feasible integer pair
    for source in (None, target):   # re-rounded from the integers or from the unrounded targets
        fixed, _ = pair_bound(q, source)
        t = q.float() if source is None else source
        best = ((t[:, None, :] - grid[None]) ** 2).sum(-1).amin(1)
        assert bool((((t - fixed.float()) ** 2).sum(-1) <= best + 1e-4).all())


def test_within_bound_weights_are_returned_as_they_are():
    q = torch.tensor([[64, -64, 127, 1, 0, -127]], dtype=torch.int8)
    fixed, changed = pair_bound(q)
    assert torch.equal(fixed, q) and changed == 0


def test_conv_pairs_run_along_input_channels_at_each_tap():
    q = torch.zeros(1, 3, 2, 2, dtype=torch.int8)
    q[0, 0, 0, 0] = q[0, 1, 0, 0] = 127     # channels 0,1 at one tap: a pair the kernel adds
    q[0, 2, 0, 1] = q[0, 0, 1, 0] = 127     # odd channel 2 and the next tap's channel 0: not paired
    q[0, 2, 1, 1] = 100                      # neighbours in the flat [in·kh·kw] layout: not paired
    q[0, 2, 1, 0] = 100
    fixed, changed = pair_bound_conv(q)
    assert fixed[0, :2, 0, 0].tolist() == [64, 64] and changed == 2
    expected = q.clone()
    expected[0, :2, 0, 0] = 64
    assert torch.equal(fixed, expected)


def test_scale_search_bounds_every_pair_and_beats_both_fixed_grids():
    torch.manual_seed(2)
    w = torch.rand(16, 64) * 2 - 1                      # near-uniform weights: many violating pairs
    w[0] = w[0] * 0.4                                   # a channel already within the bound ...
    w[0, :2] = torch.tensor([1.0, 0.005])               # ... its maximum paired with a small weight
    scale = fp16_scale(w.abs().amax(1) / 127)         # stored scales are fp16-exact
    q = torch.round(w / scale[:, None]).to(torch.int8)
    fixed, new_scale, changed = bounded_channel_grid(q, scale)
    assert int(_pair_sums(fixed).max()) <= PAIR_BOUND
    stored = q.float() * scale[:, None]
    err = ((fixed.float() * new_scale[:, None] - stored) ** 2).sum(1)
    plain = ((pair_bound(q)[0].float() * scale[:, None] - stored) ** 2).sum(1)
    s64 = fp16_scale(scale * 127 / 64)
    cap = ((torch.round(stored / s64[:, None]) * s64[:, None] - stored) ** 2).sum(1)
    assert bool((err <= plain + 1e-9).all()) and bool((err <= cap + 1e-9).all())
    assert float(err.sum()) < 0.9 * min(float(plain.sum()), float(cap.sum()))   # the search pays off
    assert torch.equal(fixed[0], q[0]) and float(new_scale[0]) == float(scale[0])   # nothing to fix: kept
    assert changed == int((fixed != q).sum())


def test_scale_search_pairs_conv_weights_along_input_channels():
    torch.manual_seed(3)
    q = torch.randint(-127, 128, (8, 6, 3, 3), dtype=torch.int8)
    fixed, _, _ = bounded_channel_grid(q.reshape(8, -1), torch.full((8,), 0.01), conv_shape=q.shape)
    per_tap = fixed.reshape(8, 6, 3, 3).permute(0, 2, 3, 1).reshape(-1, 6)
    assert int(_pair_sums(per_tap).max()) <= PAIR_BOUND


# -- the AVX2 kernels (vpmaddubsw), in a child process with the ISA caps set ------------------------

_CHILD = r"""
import json, warnings, torch
from diffpro_cli.quant.pair_bound import pair_bound, pair_bound_conv
warnings.simplefilter("ignore")
torch.manual_seed(0)
N, K = 48, 256
w_raw = torch.randint(-127, 128, (N, K), dtype=torch.int8)
w_raw[:, :2] = 127                                   # every row has at least one violating pair
codes = torch.randint(200, 256, (8, K)); codes[:, 0] = 255; codes[:, 1] = 0   # u8 0..255, row max 255

def rel(y, exact):
    return float((y.double() - exact).abs().max() / exact.abs().max())

def fbgemm(w):   # dynamic, reduce_range False: x in [0, 1] -> scale 1/255, zero point 0, codes as given
    torch.backends.quantized.engine = "x86" if "x86" in torch.backends.quantized.supported_engines else "fbgemm"
    qw = torch._make_per_channel_quantized_tensor(w, torch.ones(N, dtype=torch.double), torch.zeros(N, dtype=torch.long), 0)
    y = torch.ops.quantized.linear_dynamic(codes.float() / 255, torch.ops.quantized.linear_prepack(qw, None), False)
    return rel(y * 255, codes.double() @ w.double().T)

def onednn(w):   # symmetric +-127 grid: u8 code = q + 128
    xq = codes.clamp(1, 255).to(torch.uint8)
    y = torch.ops.onednn.qlinear_pointwise(xq, 1.0, 128, torch.ops.onednn.qlinear_prepack(w, None), torch.ones(N),
                                           torch.zeros(N, dtype=torch.long), None, 1.0, 0, torch.float32, "none", [], "")
    return rel(y, (xq.double() - 128) @ w.double().T)

def conv(w4):
    o = w4.shape[0]
    xq = torch.randint(200, 256, (2, 16, 5, 5)).to(torch.uint8).contiguous(memory_format=torch.channels_last)
    pw = torch.ops.onednn.qconv_prepack(w4.contiguous(), torch.ones(o), 1.0, 128, [1, 1], [0, 0], [1, 1], 1, None)
    y = torch.ops.onednn.qconv2d_pointwise(xq, 1.0, 128, pw, torch.ones(o), torch.zeros(o, dtype=torch.long), None,
                                           [1, 1], [0, 0], [1, 1], 1, 1.0, 0, torch.float32, "none", [], "")
    return rel(y, torch.nn.functional.conv2d(xq.double() - 128, w4.double()))

w4 = torch.randint(-127, 128, (24, 16, 3, 3), dtype=torch.int8)
w4[:, :2] = 127
out = {"capability": torch.backends.cpu.get_cpu_capability(),
       "fbgemm": [fbgemm(w_raw), fbgemm(pair_bound(w_raw)[0])],
       "onednn": [onednn(w_raw), onednn(pair_bound(w_raw)[0])],
       "conv": [conv(w4), conv(pair_bound_conv(w4)[0])]}
print(json.dumps(out))
"""


def _kernels_available() -> bool:
    engines = torch.backends.quantized.supported_engines
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_pointwise")
            and hasattr(torch.ops.onednn, "qconv2d_pointwise") and hasattr(torch.ops.quantized, "linear_dynamic")
            and any(e in engines for e in ("x86", "fbgemm")))


def _cpu_has_avx2() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return "avx2" in next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False


@pytest.mark.skipif(not _kernels_available(), reason="needs fbgemm and oneDNN int8 ops (x86)")
def test_avx2_kernels_are_exact_with_pair_bounded_weights_and_8_bit_activations():
    env = dict(os.environ, **AVX2_ENV)
    run = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    if out["capability"] != "AVX2":
        pytest.skip(f"the ISA cap did not take effect (capability {out['capability']})")
    for name in ("fbgemm", "onednn", "conv"):
        unbounded, bounded = out[name]
        assert bounded < 1e-6, f"{name}: pair-bounded weights miss the exact integer result by {bounded:.3g}"
        if _cpu_has_avx2():   # vpmaddubsw: the unbounded weights must really saturate (else the test proves nothing)
            assert unbounded > 1e-2, f"{name}: unbounded weights did not saturate ({unbounded:.3g})"


# -- integration: quantize bounds the pairs, the checkpoint records it, the kernels take 8-bit inputs --

def _uniformish_linear(k=64, n=24):
    torch.manual_seed(5)
    lin = torch.nn.Linear(k, n)
    torch.nn.init.uniform_(lin.weight, -1, 1)   # near-uniform, like the built-in DiT's: many pairs violate
    return lin


def test_bound_pairs_makes_a_layer_saturation_free_and_its_kernel_uses_the_8_bit_grid(monkeypatch):
    # catches: the flag not reaching the activation grid on a CPU without VNNI (7-bit kept for nothing),
    # or the re-rounded weights still holding a pair over the bound
    from diffpro_cli.quant import kernels
    from diffpro_cli.quant.layers import QuantLinear

    monkeypatch.setattr(kernels, "cpu_has_vnni", lambda: False)
    lin = _uniformish_linear()
    plain = QuantLinear.from_float(lin, 8, "dynamic")
    bounded = QuantLinear.from_float(lin, 8, "dynamic")
    assert bounded.bound_pairs(lin.weight) > 0
    q = bounded.int_weight().int()
    assert int((q[:, 0::2].abs() + q[:, 1::2].abs()).max()) <= PAIR_BOUND
    assert int((plain.int_weight().int()[:, 0::2].abs() + plain.int_weight().int()[:, 1::2].abs()).max()) > PAIR_BOUND
    with torch.no_grad():
        plain(torch.randn(4, 64))
        bounded(torch.randn(4, 64))
    assert plain.act_qmax == 63 and bounded.act_qmax == 127
    assert bounded.kernel_name.endswith("w8a8-dynamic") and plain.kernel_name.endswith("w8a7-dynamic")
    err = (bounded.dequantized_weight() - lin.weight).abs().max()
    assert err < 2.5 * (lin.weight.abs().amax(1) / 127).max()   # a re-rounding, not a different layer


@pytest.mark.parametrize("setting", ["on", "off"])
def test_quantize_records_pair_bounded_layers_and_loading_keeps_them(tmp_path, monkeypatch, setting):
    # catches: diffpro.json without the flag (a reload would fall back to 7-bit activations on AVX2), the
    # bound applied to layers on float activations, or "off" ignored
    import diffpro
    from diffpro_cli.quant import kernels
    from diffpro_cli.stages.quantize import (
        QuantizeConfig,
        quantize_to_dir,
        uniform_plan,
    )

    model = diffpro.load("random:dit-tiny")
    plan = uniform_plan(model, 8)
    meta = quantize_to_dir(model, plan, tmp_path / "q", cfg=QuantizeConfig(pair_bound=setting))
    layers = meta["layers"]
    integer = [n for n, r in layers.items() if r["act_mode"] != "none" and r["type"] == "linear"]
    floats = [n for n, r in layers.items() if r["act_mode"] == "none"]
    assert integer and floats and not any(layers[n]["pair_bounded"] for n in floats)
    assert all(layers[n]["pair_bounded"] is (setting == "on") for n in integer)
    monkeypatch.setattr(kernels, "cpu_has_vnni", lambda: False)
    loaded = diffpro.load(tmp_path / "q")
    mods = dict(loaded.net.named_modules())
    assert all(mods[n].pair_bounded is (setting == "on") for n in integer)


def test_auto_bounds_exactly_where_the_cpu_lacks_vnni(monkeypatch):
    # catches: "auto" costing VNNI machines accuracy, or never turning on where it helps
    from diffpro_cli.quant import kernels
    from diffpro_cli.stages.quantize import wants_pair_bound

    monkeypatch.setattr(kernels, "cpu_has_vnni", lambda: True)
    assert not wants_pair_bound("auto") and wants_pair_bound("on") and not wants_pair_bound("off")
    monkeypatch.setattr(kernels, "cpu_has_vnni", lambda: False)
    assert wants_pair_bound("auto")


def test_bad_pair_bound_value_is_one_usage_line(cli, tmp_path):
    code, _, err = cli("quantize", "random:dit-tiny", "--bits", "8", "--pair-bound", "maybe", "-w", tmp_path)
    assert code == 2 and err.strip().startswith("error: --pair-bound maybe") and "Traceback" not in err
    assert not (tmp_path / "quantized").exists()


def test_bench_reuses_a_uniform_checkpoint_only_under_the_same_saturation_rule(tmp_path, monkeypatch):
    # catches: the pair-bound marks changing the recorded plan hash (every bench re-quantizing the W8
    # baseline), or a W8 baseline made on a VNNI machine reused on an AVX2 one with 7-bit activations
    import diffpro
    from diffpro_cli.quant import kernels
    from diffpro_cli.stages.bench import uniform_checkpoint

    model = diffpro.load("random:dit-tiny")
    out = tmp_path / "w8"
    monkeypatch.setattr(kernels, "cpu_has_vnni", lambda: False)
    uniform_checkpoint(model, 8, out)
    first = (out / "model.safetensors").stat().st_mtime_ns
    uniform_checkpoint(model, 8, out)
    assert (out / "model.safetensors").stat().st_mtime_ns == first          # reused: same rule, same plan
    monkeypatch.setattr(kernels, "cpu_has_vnni", lambda: True)
    uniform_checkpoint(model, 8, out)
    meta = json.loads((out / "diffpro.json").read_text())
    assert not any(r["pair_bounded"] for r in meta["layers"].values())      # re-made for this CPU's rule


def test_the_measured_bounded_weights_are_exactly_what_quantize_stores():
    # catches: score --measure pricing another rounding than layers.bound_pairs stores (a different scale
    # search, or the conv pairing along the wrong axis), and the bound claimed for grouped convolutions
    from diffpro_cli.quant.layers import QuantConv2d, QuantLinear
    from diffpro_cli.quant.pair_bound import bound_covers, pair_bounded_weight

    lin = _uniformish_linear()
    torch.manual_seed(6)
    conv = torch.nn.Conv2d(6, 8, 3)
    torch.nn.init.uniform_(conv.weight, -1, 1)
    for mod, cls in ((lin, QuantLinear), (conv, QuantConv2d)):
        layer = cls.from_float(mod, 8, "dynamic")
        assert layer.bound_pairs(mod.weight) > 0
        measured = pair_bounded_weight(mod.weight)
        assert measured.shape == mod.weight.shape and torch.equal(measured, layer.dequantized_weight())
        assert not torch.equal(measured, cls.from_float(mod, 8, "dynamic").dequantized_weight())   # really re-rounded
        assert bound_covers(mod)
    assert not bound_covers(torch.nn.Conv2d(4, 8, 3, groups=2)) and not bound_covers(torch.nn.LayerNorm(4))


def _correlated_layer(out: int, k: int, seed: int = 0):
    """Near-uniform weights [out, k] (many pairs violate) and the second moment of correlated inputs."""
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(out, k, generator=g) * 2 - 1
    x = torch.randn(8 * k, k, generator=g) @ (torch.eye(k) + torch.randn(k, k, generator=g) / k ** 0.5)
    return w, (x.T @ x / x.shape[0]).double()


def _output_error(q, scale, w, hessian):
    e = q.double() * scale.double().reshape(-1, 1) - w.double()
    return float(((e @ hessian) * e).sum())


@pytest.mark.parametrize("k", [64, 37])
def test_bounded_gptq_keeps_every_pair_and_beats_bounded_rounding_to_nearest(k):
    # catches: an odd column rounded without the clamp (pairs over 128), a clamp on the wrong partner or
    # the wrong parity (odd K), the rounding error not pushed onto later columns (no better than bounded
    # round-to-nearest), and scales that are not fp16-exact (changed by a save and reload)
    from diffpro_cli.quant.formats import fp16_exact, gptq_quantize, quantize_weight
    from diffpro_cli.quant.pair_bound import bounded_gptq

    w, hessian = _correlated_layer(48, k)
    q, scale, changed = bounded_gptq(w, hessian)
    assert q.dtype == torch.int8 and q.shape == w.shape and scale.shape == (48,) and fp16_exact(scale)
    assert int(q.abs().max()) <= 127 and int(_pair_sums(q).max()) <= PAIR_BOUND
    plain, plain_scale = gptq_quantize(w, 8, hessian)
    assert int(_pair_sums(plain).max()) > PAIR_BOUND and changed > 0       # the data needs the bound
    rtn_q, rtn_scale, _ = bounded_channel_grid(*quantize_weight(w, 8), w)    # what bound_pairs stores without GPTQ
    t = w / scale.reshape(-1, 1)                                             # bounded RTN on bounded GPTQ's scales
    same_q, _ = pair_bound(torch.round(t).clamp(-127, 127).to(torch.int8), t)
    ours = _output_error(q, scale, w, hessian)
    assert ours < 0.7 * _output_error(rtn_q, rtn_scale, w, hessian)
    assert ours < 0.7 * _output_error(same_q, scale, w, hessian)
    assert ours > _output_error(plain, plain_scale, w, hessian)              # the bound has a price: really bounded


def test_gptq_plan_layer_with_pair_bound_is_bounded_gptq_on_the_8_bit_grid(monkeypatch):
    # catches: plan_layer skipping the bound for GPTQ layers (7-bit grid), bounding them by round-to-nearest
    # (the hessian dropped), bounding what the rule does not cover (group-wise scales), or leaving those on
    # round-to-nearest instead of plain GPTQ
    from diffpro_cli.checkpoint import plan_layer
    from diffpro_cli.quant import kernels
    from diffpro_cli.quant.formats import gptq_quantize
    from diffpro_cli.quant.pair_bound import bounded_gptq

    monkeypatch.setattr(kernels, "cpu_has_vnni", lambda: False)
    w, hessian = _correlated_layer(16, 64, seed=1)
    lin = torch.nn.Linear(64, 16)
    with torch.no_grad():
        lin.weight.copy_(w)
    entry = {"weight_bits": 8, "act_bits": 8, "act_mode": "dynamic", "pair_bound": True}
    layer = plan_layer(lin, entry, hessian=hessian)
    q, scale, _ = bounded_gptq(w, hessian)
    assert layer.pair_bounded and torch.equal(layer.int_weight(), q) and torch.equal(layer.weight_scale.reshape(-1), scale)
    with torch.no_grad():
        layer(torch.randn(4, 64))
    assert layer.act_qmax == 127
    grouped = plan_layer(lin, {**entry, "group_size": 32}, hessian=hessian)
    assert not grouped.pair_bounded and int(_pair_sums(grouped.int_weight()).max()) > PAIR_BOUND
    assert torch.equal(grouped.int_weight(), gptq_quantize(w, 8, hessian, 32)[0])


def test_bounded_gptq_runs_the_loop_on_a_few_scales_and_never_loses_to_bounded_rounding_to_nearest():
    # catches: candidate integers paired with another candidate's scale (scale not on the channel's grid),
    # the loop's damped loss taken as e H eᵀ without undoing the damping or a dead input's unit diagonal
    # (channels then lose to bounded round-to-nearest or to a larger `keep`), and a ranking that drops the
    # good multipliers (keep=4 far from all 16)
    from diffpro_cli.quant.formats import quantize_weight
    from diffpro_cli.quant.pair_bound import bounded_gptq

    w, hessian = _correlated_layer(32, 64, seed=2)
    w = w * torch.linspace(0.2, 1.0, 64)                          # channels whose best multipliers differ
    hessian[5, :] = hessian[:, 5] = 0                             # an input that never fires
    q0, s0 = quantize_weight(w, 8)
    grid = fp16_scale(s0.reshape(1, -1) * torch.linspace(1.0, 127 / 64, 16).reshape(-1, 1))   # [16, out]

    def per_channel(q, scale):
        e = q.double() * scale.double().reshape(-1, 1) - w.double()
        return ((e @ hessian) * e).sum(-1)

    rtn = per_channel(*bounded_channel_grid(q0, s0, w)[:2])
    errs = {}
    for keep in (1, 4, 16):
        q, scale, _ = bounded_gptq(w, hessian, keep=keep)
        assert int(_pair_sums(q).max()) <= PAIR_BOUND
        assert bool((grid == scale.reshape(1, -1)).any(0).all())
        errs[keep] = per_channel(q, scale)
        assert bool((errs[keep] <= rtn * (1 + 1e-9)).all())
    assert bool((errs[16] <= errs[4] * (1 + 1e-9)).all()) and bool((errs[4] <= errs[1] * (1 + 1e-9)).all())
    assert float(errs[4].sum()) < 1.01 * float(errs[16].sum()) and float(errs[16].sum()) < 0.7 * float(rtn.sum())
