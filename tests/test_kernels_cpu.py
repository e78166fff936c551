"""CPU capability detection, the activation grid it implies, and the AVX2 integer code paths run on any
x86 CPU through the libraries' ISA caps (a fresh process: fbgemm and oneDNN read them once)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from diffpro_cli.quant import kernels
from diffpro_cli.quant.layers import quantize_module

AVX2_ENV = {"FBGEMM_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
ISA_VARS = (*AVX2_ENV, "DNNL_MAX_CPU_ISA")


@pytest.fixture
def clean_isa_env(monkeypatch):
    for name in ISA_VARS:
        monkeypatch.delenv(name, raising=False)
    kernels.cpu_has_vnni.cache_clear()
    yield monkeypatch
    kernels.cpu_has_vnni.cache_clear()


def _cpuinfo_vnni() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & set(f.read().split()))
    except OSError:
        return False


@pytest.mark.parametrize("name,value", [("ONEDNN_MAX_CPU_ISA", "AVX2"), ("ONEDNN_MAX_CPU_ISA", "avx512_core"),
                                        ("DNNL_MAX_CPU_ISA", "AVX2"), ("FBGEMM_ENABLE_INSTRUCTIONS", "avx2"),
                                        ("FBGEMM_ENABLE_INSTRUCTIONS", "AVX512"), ("ATEN_CPU_CAPABILITY", "avx2"),
                                        ("ATEN_CPU_CAPABILITY", "default")])
def test_an_isa_cap_below_vnni_turns_vnni_off(clean_isa_env, name, value):
    clean_isa_env.setenv(name, value)
    kernels.cpu_has_vnni.cache_clear()
    assert kernels.cpu_has_vnni() is False
    assert kernels.isa_cap_without_vnni() == f"{name}={value}"
    assert kernels.cpu_act_qmax(8) == 63


@pytest.mark.parametrize("name,value", [("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_VNNI"), ("ONEDNN_MAX_CPU_ISA", "AVX2_VNNI"),
                                        ("ONEDNN_MAX_CPU_ISA", "ALL"), ("FBGEMM_ENABLE_INSTRUCTIONS", "AVX512_E1"),
                                        ("FBGEMM_ENABLE_INSTRUCTIONS", "nonsense"), ("ATEN_CPU_CAPABILITY", "avx512")])
def test_a_cap_at_or_above_vnni_leaves_the_cpu_flags_in_charge(clean_isa_env, name, value):
    clean_isa_env.setenv(name, value)
    kernels.cpu_has_vnni.cache_clear()
    assert kernels.isa_cap_without_vnni() is None
    assert kernels.cpu_has_vnni() is _cpuinfo_vnni()


def test_the_answer_is_cached_until_cleared(clean_isa_env):
    kernels.cpu_has_vnni.cache_clear()
    before = kernels.cpu_has_vnni()
    clean_isa_env.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert kernels.cpu_has_vnni() is before          # the libraries read the caps once per process too
    kernels.cpu_has_vnni.cache_clear()
    assert kernels.cpu_has_vnni() is False


@pytest.mark.parametrize("vnni", [True, False])
def test_activation_grid_follows_the_integer_weights_the_gemm_multiplies(monkeypatch, vnni):
    monkeypatch.setattr(kernels, "cpu_has_vnni", lambda: vnni)
    expected = {  # (weight bits, group size) -> grid without VNNI: only |q_w| <= 64 cannot saturate int16 pairs
        (8, None): 63, (6, None): 127, (4, None): 127, (3, None): 127, (2, None): 127,
        (8, 32): 63, (6, 32): 63, (4, 32): 63, (2, 16): 63,
    }
    for (bits, group), qmax in expected.items():
        assert kernels.cpu_act_qmax(bits, group) == (127 if vnni else qmax), (bits, group)
    assert kernels.cpu_act_qmax(4) == kernels.cpu_act_qmax(4, None)     # callers that know no group size


def test_layers_report_the_grid_they_run(monkeypatch):
    monkeypatch.setattr(kernels, "cpu_has_vnni", lambda: False)
    lin = nn.Linear(64, 32)
    assert ":w8a7-" in quantize_module(lin, 8).kernel_name
    assert ":w4a8-" in quantize_module(lin, 4).kernel_name
    assert ":w4a7-" in quantize_module(lin, 4, group_size=32).kernel_name
    assert quantize_module(lin, 4)._kernel.act_qmax == 127
    assert quantize_module(lin, 4, group_size=32)._kernel.act_qmax == 63


# The AVX2 code paths themselves, in a child process with the caps set. Every kernel (fbgemm dynamic and
# static, oneDNN per-token, oneDNN conv) must equal the exact integer result on the grid cpu_act_qmax
# chose, and the grid it did NOT choose for 8-bit weights must really saturate there (else the rule is
# wasting a bit).
_CHILD = r"""
import json, torch
from torch import nn
from diffpro_cli.quant import kernels
from diffpro_cli.quant.formats import fold_to_channel_grid
from diffpro_cli.quant.layers import quantize_module
from diffpro_cli.quant.reference import conv_kernel_tolerance, kernel_tolerance, reference_activation

def worst(ql, x, absmax):
    k = ql._kernel
    with torch.no_grad():
        y = ql(x).double()
    x_hat, step, amb = reference_activation(x, k.act_scheme(ql), k.act_qmax, absmax, getattr(k, "reduce_range", False))
    w_ref = ql.dequantized_weight().double()
    b = ql.bias
    if ql.kind == "conv2d":
        ref = ql.float_conv(x_hat, w_ref, b.double())
        tol = conv_kernel_tolerance(lambda a, w: ql.float_conv(a, w, None), x_hat, step, amb, w_ref, b)
    else:
        ref = x_hat @ w_ref.T + b.double()
        grid = fold_to_channel_grid(ql.int_weight(), ql.weight_scale)[1] if ql.group_size else None
        tol = kernel_tolerance(x_hat, step, amb, w_ref, b, grid)
    return float(((y - ref).abs() - tol).max()), k.act_qmax

torch.manual_seed(0)
out = {"vnni": kernels.cpu_has_vnni(), "capability": torch.backends.cpu.get_cpu_capability(), "rows": []}
lin, conv = nn.Linear(256, 48), nn.Conv2d(16, 24, 3, padding=1)
xl, xc = torch.randn(40, 256) * 3, torch.randn(2, 16, 8, 8) * 3
for bits, group in ((8, None), (6, None), (4, None), (4, 32)):
    for mode in ("dynamic", "dynamic-token", "static"):
        ql = quantize_module(lin, bits, act_mode=mode, group_size=group, static_absmax=6.0 if mode == "static" else None)
        out["rows"].append([f"linear w{bits} g{group} {mode} {ql.kernel_name}", *worst(ql, xl, 6.0 if mode == "static" else None)])
    if group is None:
        qc = quantize_module(conv, bits, act_mode="dynamic")
        out["rows"].append([f"conv w{bits} {qc.kernel_name}", *worst(qc, xc, None)])
# the grid the rule refuses for 8-bit weights: force +-127 and show that it saturates here
kernels.cpu_act_qmax = lambda bits, group=None, pair_bounded=False: 127
ql = quantize_module(lin, 8, act_mode="dynamic-token")
out["forced_127_w8_excess"] = worst(ql, xl, None)[0]
print(json.dumps(out))
"""


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN (x86)")
def test_avx2_code_paths_match_the_exact_integer_result():
    env = dict(os.environ, **AVX2_ENV)
    run = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["vnni"] is False and out["capability"] == "AVX2"
    for name, excess, qmax in out["rows"]:
        assert excess <= 0.0, f"{name}: beyond the exact-integer tolerance by {excess:.3g}"
        assert qmax == (63 if " w8 " in name or "g32" in name else 127), name
    if _cpuinfo_vnni():   # a VNNI CPU capped to AVX2 runs vpmaddubsw: full-range weights x +-127 must saturate
        assert out["forced_127_w8_excess"] > 1e-3


# -- the compiled execution path (quant/compiled.py) ----------------------------------------------

def _compiled_check(layer, x, qmax, w_ref=None):
    from diffpro_cli.quant import compiled
    from diffpro_cli.quant.reference import kernel_tolerance, reference_activation

    with torch.no_grad():
        y = layer(x).reshape(-1, layer.out_features).double()
    x2 = x.reshape(-1, x.shape[-1])
    x_hat, step, amb = reference_activation(x2, compiled.act_scheme(layer), qmax)
    w_ref = layer.dequantized_weight().double() if w_ref is None else w_ref
    ref = x_hat @ w_ref.T + layer.bias.double()
    tol = kernel_tolerance(x_hat, step, amb, w_ref, layer.bias, None)
    assert bool(((y - ref).abs() <= tol).all()), f"max err {(y - ref).abs().max():.3g}"


@pytest.mark.parametrize("mode", ["dynamic", "dynamic-token"])
@pytest.mark.parametrize("bits", [8, 4])
def test_compiled_path_ops_match_the_reference(mode, bits):
    """The ops the compiled path hands to inductor, run eagerly: the exact integer result on the
    kernel's grid (per-tensor symmetric or per-token, u8 with zero point 128), for a plain layer and for
    each member of a fused q/k/v group."""
    from diffpro_cli.quant import compiled
    from diffpro_cli.quant.groups import SharedInputGroup
    from diffpro_cli.quant.layers import QuantLinear

    if not compiled.compiled_available():
        pytest.skip(compiled.unavailable_reason())
    torch.manual_seed(bits)
    x = torch.randn(2, 9, 64) * torch.rand(2, 9, 1) * 4
    single = quantize_module(nn.Linear(64, 24), bits, act_mode=mode)
    group = [QuantLinear.from_float(nn.Linear(64, 16 + 8 * i), bits, mode) for i in range(3)]
    SharedInputGroup(group)
    net = nn.ModuleList([single, *group])
    assert compiled.enable(net) == {"compiled": 4, "eager": 0}
    for layer in net:
        assert layer._compiled_state["qmax"] == kernels.cpu_act_qmax(bits)
        _compiled_check(layer, x, layer._compiled_state["qmax"])
    assert "_c_w" not in single.state_dict()      # the checkpoint's state is unchanged
    compiled.disable(net)
    assert single._compiled_lead is None and "_c_w" not in dict(single.named_buffers())


@pytest.mark.parametrize("mode", ["dynamic", "dynamic-token"])
def test_compiled_path_attaches_layers_whose_integers_were_released_at_load(mode):
    """An inference-only load (diffpro.load) keeps only the eager kernel's packed copy (fbgemm for
    "dynamic", oneDNN for "dynamic-token"); the compiled path must recover the same integer weights,
    scales and bias from it (bench --compile once ran such checkpoints' integer layers eager)."""
    from diffpro_cli.quant import compiled
    from diffpro_cli.quant.groups import SharedInputGroup
    from diffpro_cli.quant.layers import QuantLinear

    if not compiled.compiled_available():
        pytest.skip(compiled.unavailable_reason())
    torch.manual_seed(3)
    x = torch.randn(2, 9, 64) * torch.rand(2, 9, 1) * 4
    single = quantize_module(nn.Linear(64, 24), 8, act_mode=mode)
    group = [QuantLinear.from_float(nn.Linear(64, 16 + 8 * i), 4, mode) for i in range(3)]
    SharedInputGroup(group)
    net = nn.ModuleList([single, *group])
    refs = [layer.dequantized_weight().double() for layer in net]
    for layer in net:
        layer.prepare("cpu")
    for layer in net:
        layer.release_integers()
    assert all(layer.integers_released for layer in net)
    assert compiled.enable(net) == {"compiled": 4, "eager": 0}
    for layer, w_ref in zip(net, refs):
        _compiled_check(layer, x, layer._compiled_state["qmax"], w_ref)


def test_compiled_path_leaves_static_and_conv_layers_eager():
    from diffpro_cli.quant import compiled

    static = quantize_module(nn.Linear(16, 8), 8, act_mode="static", static_absmax=1.0)
    conv = quantize_module(nn.Conv2d(4, 8, 3, padding=1), 8)
    assert compiled.enable(nn.ModuleList([static, conv])) == {"compiled": 0, "eager": 2}


def test_compile_falls_back_to_eager_with_one_notice(monkeypatch, capsys):
    from diffpro_cli.quant import compiled

    monkeypatch.setattr(compiled, "unavailable_reason", lambda: "no C++ compiler (test)")
    layer = quantize_module(nn.Linear(16, 8), 8)
    assert compiled.compile_module(layer) is layer and compiled.compiled_available() is False
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("notice:") and "no C++ compiler (test)" in err[0]


def test_compiled_layer_runs_and_matches_its_eager_ops():
    """One real torch.compile (inductor, freezing) of a small quantized MLP: same numbers as the same
    ops run eagerly (the graph computes with oneDNN's int8 GEMM; fused elementwise code may round the
    last float bit differently). Takes ~20-40 s on 2 cores (C++ compile)."""
    from diffpro_cli.quant import compiled

    if not compiled.compiled_available():
        pytest.skip(compiled.unavailable_reason())
    torch.manual_seed(0)
    net = nn.Sequential(quantize_module(nn.Linear(32, 64), 8), nn.GELU(), quantize_module(nn.Linear(64, 16), 8, act_mode="dynamic-token"))
    x = torch.randn(24, 32)
    with torch.no_grad():
        fast = compiled.compile_module(net)
        y = fast(x)
        ref = net(x)   # enabled in place: the same traceable ops, eagerly
    assert torch.allclose(y, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


@pytest.mark.parametrize("post", ["gelu", "gelu-tanh"])
def test_compiled_path_runs_a_per_tensor_layers_gelu_in_the_int8_gemm(post, monkeypatch):
    """The MLP's GELU runs in oneDNN's epilogue on the compiled path (computed after the GEMM, inductor's
    tanh-GELU cost more than the GEMM: 368 against 189 µs a call on the built-in's 512×768 in the bf16
    world). Catches the activation applied a second time or not at all, a per-token layer (whose output is
    scaled after the GEMM) given the fused activation, and a bf16 input not answered in bf16."""
    import torch.nn.functional as F

    from diffpro_cli.quant import compiled

    if not compiled.compiled_available():
        pytest.skip(compiled.unavailable_reason())
    torch.manual_seed(0)
    x = torch.randn(2, 9, 64) * 2
    fn = {"gelu": F.gelu, "gelu-tanh": lambda y: F.gelu(y, approximate="tanh")}[post]
    for mode in ("dynamic", "dynamic-token"):
        layer = quantize_module(nn.Linear(64, 48), 8, act_mode=mode)
        layer.post_op = post
        layer._forget_kernel()
        compiled.enable(nn.ModuleList([layer]))
        with torch.no_grad():
            plain = compiled.linear_forward(layer, x)        # the GEMM alone
            calls = []
            real = compiled.apply_post_op
            monkeypatch.setattr(compiled, "apply_post_op", lambda p, y: (calls.append(p), real(p, y))[1])
            out = layer(x)
            monkeypatch.setattr(compiled, "apply_post_op", real)
            assert torch.allclose(out, fn(plain), atol=2e-3), f"{mode}: max err {(out - fn(plain)).abs().max():.3g}"
            assert calls == ([] if mode == "dynamic" else [post])   # in the epilogue only where oneDNN can
            low = layer(x.to(torch.bfloat16))
            assert low.dtype == torch.bfloat16 and torch.allclose(low.float(), out, atol=0.1, rtol=0.05)


_COMPILED_CHILD = """
import json, torch
from torch import nn
from diffpro_cli.quant import compiled, kernels
from diffpro_cli.quant.layers import quantize_module
from diffpro_cli.quant.reference import kernel_tolerance, reference_activation

torch.manual_seed(0)
x = torch.randn(40, 256) * 3
rows = []
for bits in (8, 4):
    for mode in ("dynamic", "dynamic-token"):
        layer = quantize_module(nn.Linear(256, 48), bits, act_mode=mode)
        compiled.enable(nn.ModuleList([layer]))
        qmax = layer._compiled_state["qmax"]
        with torch.no_grad():
            y = layer(x).double()
        x_hat, step, amb = reference_activation(x, compiled.act_scheme(layer), qmax)
        w_ref = layer.dequantized_weight().double()
        ref = x_hat @ w_ref.T + layer.bias.double()
        tol = kernel_tolerance(x_hat, step, amb, w_ref, layer.bias, None)
        rows.append([f"w{bits} {mode}", float(((y - ref).abs() - tol).max()), qmax])
print(json.dumps({"vnni": kernels.cpu_has_vnni(), "rows": rows}))
"""


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN (x86)")
def test_the_compiled_path_does_not_saturate_on_avx2():
    """The compiled path's ops on AVX2 code (no VNNI): catches the u8 zero point 128 on the ±63 grid,
    whose values up to 191 overflowed vpmaddubsw's int16 pair sums (errors of ~0.9 against the exact
    integer result), where the eager kernels use 64."""
    from diffpro_cli.quant import compiled

    if not compiled.compiled_available():
        pytest.skip(compiled.unavailable_reason())
    env = dict(os.environ, **AVX2_ENV)
    run = subprocess.run([sys.executable, "-c", _COMPILED_CHILD], env=env, capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["vnni"] is False
    for name, excess, qmax in out["rows"]:
        assert excess <= 0.0, f"{name}: beyond the exact-integer tolerance by {excess:.3g}"
    assert any(qmax == 63 for _, _, qmax in out["rows"])   # the 7-bit grid was exercised
