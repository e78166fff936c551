"""Integer formats, kernels vs the fake-quant reference, the checkpoint round trip, sizes and bad input."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from diffpro_cli.quant import formats, kernels
from diffpro_cli.quant.groups import fuse_shared_inputs, unfuse
from diffpro_cli.quant.layers import QuantConv2d, QuantLinear, quantize_module, timestep_context
from diffpro_cli.quant.reference import (conv_kernel_tolerance, fake_quant_act_per_token, fake_quant_weight,
                                         kernel_tolerance, reference_activation)

BITS = formats.STORAGE_BITS


# -- formats -------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", BITS)
def test_pack_unpack_round_trip(bits):
    qmax = formats.qmax_for(bits)
    for numel in (1, 7, 64, 1001):
        q = torch.randint(-qmax - 1, qmax + 1, (numel,), dtype=torch.int8)
        packed = formats.pack_bits(q, bits)
        assert packed.numel() == formats.packed_numel(numel, bits)
        assert torch.equal(formats.unpack_bits(packed, bits, numel), q)


def test_packed_byte_counts_per_width():
    assert formats.packed_numel(1000, 4) == 500      # two per byte
    assert formats.packed_numel(1000, 2) == 250
    assert formats.packed_numel(1000, 3) == 375      # 8 values in 3 bytes
    assert formats.packed_numel(1000, 6) == 750      # 4 values in 3 bytes


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group", [None, 16])
def test_stored_weights_equal_reference(bits, group):
    w = torch.randn(24, 64)
    q, scale = formats.quantize_weight(w, bits, group)
    assert int(q.abs().max()) <= formats.qmax_for(bits)
    assert torch.equal(formats.dequantize_weight(q, scale), fake_quant_weight(w, bits, group))


def test_group_fold_error_is_half_an_int8_step():
    w = torch.randn(8, 64) * torch.linspace(0.01, 1, 64)
    q, scale = formats.quantize_weight(w, 4, 16)
    q8, s8 = formats.fold_to_channel_grid(q, scale)
    err = (q8.float() * s8[:, None] - formats.dequantize_weight(q, scale)).abs()
    assert bool((err <= s8[:, None] / 2 + 1e-7).all())


# -- kernels vs the reference ---------------------------------------------------------------------

def _linear_check(ql, lin, x, static_absmax=None):
    k = ql._kernel
    assert k is not None and k.act_qmax is not None, "an integer kernel must run on CPU"
    x2 = x.reshape(-1, x.shape[-1])
    y = ql(x).reshape(-1, lin.out_features).double()
    x_hat, step, amb = reference_activation(x2, k.act_scheme(ql), k.act_qmax, static_absmax, getattr(k, "reduce_range", False))
    w_ref = ql.dequantized_weight().double()
    ref = x_hat @ w_ref.T + lin.bias.double()
    grid = formats.fold_to_channel_grid(ql.int_weight(), ql.weight_scale)[1] if ql.group_size else None
    tol = kernel_tolerance(x_hat, step, amb, w_ref, lin.bias, grid)
    assert bool(((y - ref).abs() <= tol).all()), f"{ql.kernel_name}: max err {(y - ref).abs().max():.3g}"
    # the reference weight is the documented fake-quant one
    assert torch.equal(ql.dequantized_weight(), fake_quant_weight(lin.weight.detach(), ql.weight_bits, ql.group_size))


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("mode", ["dynamic", "dynamic-token", "static"])
def test_quant_linear_matches_reference(bits, mode):
    torch.manual_seed(bits)
    lin = nn.Linear(96, 40)
    x = torch.randn(3, 7, 96) * torch.rand(3, 7, 1) * 4          # tokens of very different size
    for group in (None, 32):
        absmax = 3.0 if mode == "static" else None                  # below the max: clamping is exercised
        ql = quantize_module(lin, bits, act_mode=mode, group_size=group, static_absmax=absmax)
        assert ql.kernel_name.startswith("cpu-") and f"w{bits}" in ql.kernel_name
        _linear_check(ql, lin, x, absmax)


def test_per_token_kernel_is_the_per_token_reference():
    lin = nn.Linear(64, 32)
    x = torch.randn(10, 64) * torch.logspace(-2, 1, 10)[:, None]
    ql = quantize_module(lin, 8, act_mode="dynamic-token")
    ref = fake_quant_act_per_token(x, 8 if ql.act_qmax == 127 else 7) @ ql.dequantized_weight().T + lin.bias
    with torch.no_grad():
        assert torch.allclose(ql(x), ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


def test_weight_only_layer_is_float_math():
    lin = nn.Linear(32, 16)
    ql = quantize_module(lin, 4, act_bits=16)
    x = torch.randn(5, 32)
    assert ql.kernel_name.startswith("dequant-float") and ql.act_mode == "none"
    assert torch.allclose(ql(x), F.linear(x, fake_quant_weight(lin.weight.detach(), 4), lin.bias), atol=1e-6)


CONVS = [dict(kernel_size=3, padding=1), dict(kernel_size=3, stride=2, padding=1), dict(kernel_size=1),
         dict(kernel_size=3, padding="same", groups=2), dict(kernel_size=3, padding=1, padding_mode="reflect")]


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_quant_conv_matches_reference(bits, mode):
    torch.manual_seed(bits)
    x = torch.randn(2, 8, 9, 9) * torch.tensor([0.5, 3.0]).view(2, 1, 1, 1)
    for geometry in CONVS:
        conv = nn.Conv2d(8, 12, **geometry)
        absmax = 4.0 if mode == "static" else None
        qc = quantize_module(conv, bits, act_mode=mode, static_absmax=absmax)
        k = qc._kernel
        assert k.act_qmax is not None, "conv must run the integer kernel"
        y = qc(x).double()
        x_hat, step, amb = reference_activation(x, k.act_scheme(qc), k.act_qmax, absmax)
        w_ref = qc.dequantized_weight().double()
        ref = qc.float_conv(x_hat, w_ref, conv.bias.double())
        tol = conv_kernel_tolerance(lambda a, w: qc.float_conv(a, w, None), x_hat, step, amb, w_ref, conv.bias)
        assert y.shape == ref.shape
        assert bool(((y - ref).abs() <= tol).all()), f"{geometry}: max err {(y - ref).abs().max():.3g}"


def test_static_scales_follow_the_timestep():
    ql = quantize_module(nn.Linear(8, 4), 8, act_mode="static", static_absmax=1.0)
    ql.set_static_ranges([0, 500, 999], [1.0, 2.0, 4.0])
    with timestep_context(torch.tensor([420, 420])):
        assert ql.static_scale(127) == pytest.approx(2.0 / 127)
    with timestep_context(torch.tensor([10, 990])):            # a mixed batch takes the widest range
        assert ql.static_scale(127) == pytest.approx(4.0 / 127)
    assert ql.static_scale(127) == pytest.approx(4.0 / 127)     # no context: the widest range


def test_registry_names_only_registered_kernels_and_ends_in_the_float_fallback():
    for key, names in kernels.REGISTRY.items():
        assert set(names) <= set(kernels.KERNELS), key     # a misspelt name fails only when a layer selects it
        # every layer can always run: the last kernel tried (opt-in ones are not) is the float fallback
        assert [n for n in names if n not in kernels.OPT_IN][-1] == "dequant-float", key


@pytest.mark.parametrize("op", ["linear", "conv2d"])
def test_cpu_selects_an_integer_kernel_for_every_width_and_int8_mode(op):
    """What the CLI reaches on a CPU: every plan entry (bits × activation mode) gets an integer kernel
    from its registry list, and float activations ("none") get the dequant-float path."""
    for bits in BITS:
        for mode in kernels.ACT_MODES:
            module = nn.Linear(32, 16) if op == "linear" else nn.Conv2d(8, 8, 3, padding=1)
            layer = quantize_module(module, bits, act_bits=16 if mode == "none" else 8, act_mode=mode,
                                    static_absmax=1.0 if mode == "static" else None)
            name = layer.kernel_name.split(":")[0]
            assert name in kernels.candidates(op, "cpu", bits, mode), (op, bits, mode, name)
            if mode == "none":
                assert name == "dequant-float" and layer._kernel.act_qmax is None
            else:
                assert name.startswith("cpu-") and layer._kernel.act_qmax is not None, (op, bits, mode, name)


def test_unsupported_bits_are_refused():
    from diffpro_cli.errors import UsageError

    with pytest.raises(UsageError, match="supported widths"):
        quantize_module(nn.Linear(8, 8), 5)
    with pytest.raises(UsageError, match="group size"):
        quantize_module(nn.Linear(10, 8), 4, group_size=4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA kernels need a GPU")
@pytest.mark.parametrize("bits,mode", [(8, "dynamic-token"), (8, "dynamic"), (4, "none"), (4, "dynamic-token")])
def test_cuda_linear_matches_reference(bits, mode):
    lin = nn.Linear(256, 128).cuda()
    ql = quantize_module(lin, bits, act_bits=16 if mode == "none" else 8, act_mode=mode)
    x = torch.randn(64, 256, device="cuda")
    ql(x)
    assert ql.kernel_name.startswith("cuda-")
    x_hat, step, amb = reference_activation(x.cpu(), ql._kernel.act_scheme(ql), ql._kernel.act_qmax or 127)
    ref = x_hat @ ql.dequantized_weight().double().T + lin.bias.double().cpu()
    tol = 2e-2 * float(ref.abs().max()) if mode == "none" else 1e-3 * float(ref.abs().max())   # bf16 activations for W4A16
    assert float((ql(x).double().cpu() - ref).abs().max()) <= tol


# -- models: fusion, checkpoint round trip, sizes --------------------------------------------------

def _inputs(model, batch=2):
    torch.manual_seed(0)
    x = torch.randn(batch, *model.sample_shape)
    t = torch.tensor([3, 700])[:batch]
    y = (torch.arange(batch) % model.num_classes) if model.num_classes else None
    return x, t, y


def test_fused_qkv_equals_separate_layers():
    from diffpro_cli.loading import load_model
    from diffpro_cli.stages.quantize import apply_plan, uniform_plan

    m = load_model("random:dit-tiny")
    apply_plan(m, uniform_plan(m, 8), fuse=False)
    x, t, y = _inputs(m)
    with torch.no_grad():
        separate = m.eps(x, t, y)
        assert fuse_shared_inputs(m.net) == 2
        fused = m.eps(x, t, y)
        assert any("fused3" in mod.kernel_name for mod in m.net.modules() if isinstance(mod, QuantLinear) and mod._group)
    unfuse(m.net)
    assert torch.allclose(fused, separate, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("spec", ["random:dit-tiny", "random:unet-tiny"])
def test_checkpoint_round_trip_without_float_weights(spec, tmp_path):
    from safetensors import safe_open

    from diffpro_cli.loading import load_model
    from diffpro_cli.checkpoint import load_quantized, save_quantized

    m = load_model(spec)
    names = list(m.quantizable_layers())
    plan = {"layers": {n: {"weight_bits": BITS[i % len(BITS)], "act_bits": 8,
                           "act_mode": ("dynamic", "dynamic-token")[i % 2]} for i, n in enumerate(names)}}
    plan["layers"][names[-1]] = {"weight_bits": 16}                    # one layer stays in float
    meta = save_quantized(m, plan, tmp_path / "q")
    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    quantized = [n for n in names[:-1]]
    assert not any(f"{n}.weight" in keys for n in quantized)           # no float copy of quantized weights
    assert f"{names[-1]}.weight" in keys
    assert meta["totals"]["quantized_layers"] == len(names) - 1
    del m
    q1, q2 = load_quantized(tmp_path / "q"), load_quantized(tmp_path / "q")
    assert not any(p.is_meta for p in list(q1.net.parameters()) + list(q1.net.buffers()))
    x, t, y = _inputs(q1)
    with torch.no_grad():
        assert torch.equal(q1.eps(x, t, y), q2.eps(x, t, y))
    layers = q1.quantizable_layers()
    assert sum(isinstance(mod, (QuantLinear, QuantConv2d)) for mod, _ in layers.values()) == len(names) - 1
    assert meta["layers"][names[0]]["weight_bits"] == BITS[0]


def test_static_checkpoint_calibrates_per_timestep(tmp_path, cli):
    from diffpro_cli.checkpoint import load_quantized

    ts = {"schema": "diffpro.timesteps/1", "model": {"spec": "random:dit-tiny", "sha256": None}, "timesteps": [0, 300, 999]}
    (tmp_path / "ts.json").write_text(json.dumps(ts))
    code, out, err = cli("quantize", "random:dit-tiny", "--bits", "8", "--act-mode", "static", "--timesteps", tmp_path / "ts.json",
                         "--workdir", tmp_path / "w", "--json")
    assert code == 0, err
    meta = json.loads((tmp_path / "w" / "quantized" / "diffpro.json").read_text())
    assert meta["timesteps"] == [0, 300, 999] and meta["activation"]["static_timesteps"] == [0, 300, 999]
    q = load_quantized(tmp_path / "w" / "quantized")
    layer = next(mod for mod, _ in q.quantizable_layers().values() if isinstance(mod, QuantLinear))
    assert layer.act_absmax.shape == (3,) and bool((layer.act_absmax > 0).all())
    x, t, y = _inputs(q)
    with torch.no_grad():
        assert torch.isfinite(q.eps(x, t, y)).all()


def test_checkpoint_sizes_on_disk(tmp_path):
    from diffpro_cli.models.builtin import load_builtin
    from diffpro_cli.checkpoint import save_quantized
    from diffpro_cli.stages.quantize import uniform_plan

    m = load_builtin("dit-mnist")
    fp32 = sum(t.numel() * 4 for t in m.net.state_dict().values() if t.is_floating_point())
    sizes = {}
    for bits in (8, 4):
        meta = save_quantized(m, uniform_plan(m, bits), tmp_path / f"w{bits}")
        sizes[bits] = (tmp_path / f"w{bits}" / "model.safetensors").stat().st_size
        assert meta["totals"]["bytes"] == sizes[bits]
    # everything but the quantized Linear/Conv weights (embedding table, biases, scales) stays float
    assert fp32 / sizes[8] > 3.3
    assert fp32 / sizes[4] > 5.5


# -- the CLI and bad input ------------------------------------------------------------------------

def _one_error_line(err):
    lines = [line for line in err.strip().splitlines() if line.strip()]
    return len(lines) == 1 and lines[0].startswith("error:")


def test_cli_quantize_computes_then_is_up_to_date(tmp_path, cli):
    code, out, err = cli("quantize", "random:dit-tiny", "--bits", "4", "--workdir", tmp_path / "w", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["status"] == "computed" and result["avg_bits"] == 4.0
    assert any(k.startswith("cpu-") for k in result["kernels"])
    code, out, _ = cli("quantize", "random:dit-tiny", "--bits", "4", "--workdir", tmp_path / "w", "--json")
    assert code == 0 and json.loads(out)["status"] == "up to date"


@pytest.mark.parametrize("layers,code_expected,needle", [
    ({"no.such.layer": {"weight_bits": 4}}, 3, "does not exist"),
    ({"proj_out_2": {"weight_bits": 5}}, 3, "weight_bits 5"),   # the file is bad, not an option
])
def test_cli_bad_plan_writes_nothing(tmp_path, cli, layers, code_expected, needle):
    plan = {"schema": "diffpro.plan/1", "model": {"spec": "random:dit-tiny", "sha256": None}, "layers": layers}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    code, out, err = cli("quantize", "random:dit-tiny", "--plan", tmp_path / "plan.json", "--out", tmp_path / "q",
                         "--workdir", tmp_path / "w")
    assert code == code_expected and _one_error_line(err) and needle in err
    assert not (tmp_path / "q").exists() and not (tmp_path / "w").exists()


def test_cli_bad_bits_and_foreign_plan(tmp_path, cli):
    code, _, err = cli("quantize", "random:dit-tiny", "--bits", "5", "--out", tmp_path / "q")
    assert code == 2 and _one_error_line(err) and not (tmp_path / "q").exists()
    plan = {"schema": "diffpro.plan/1", "model": {"spec": "random:dit-tiny", "sha256": "0" * 64}, "layers": {}}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    code, _, err = cli("quantize", "random:dit-tiny", "--plan", tmp_path / "plan.json", "--out", tmp_path / "q")
    assert code == 3 and _one_error_line(err) and "another model" in err and not (tmp_path / "q").exists()


def test_checkpoint_with_foreign_weights_is_refused(tmp_path, cli):
    from diffpro_cli.errors import InputError
    from diffpro_cli.checkpoint import load_quantized

    for name, bits in (("a", "8"), ("b", "4")):
        code, _, err = cli("quantize", "random:dit-tiny", "--bits", bits, "--out", tmp_path / name, "--workdir", tmp_path / f"w{name}")
        assert code == 0, err
    (tmp_path / "a" / "model.safetensors").write_bytes((tmp_path / "b" / "model.safetensors").read_bytes())
    with pytest.raises(InputError, match="sha256 does not match"):
        load_quantized(tmp_path / "a")
    code, _, err = cli("sample", str(tmp_path / "a"), "--n", "1", "--steps", "2", "--out", tmp_path / "s.png")
    assert code == 3 and _one_error_line(err) and not (tmp_path / "s.png").exists()


@pytest.mark.parametrize("spec", ["random:dit-tiny", "random:unet-tiny"])
def test_uniform_baseline_keeps_the_ends_on_float_activations(spec, tmp_path, cli):
    """`quantize --bits 8` (bench's w8a8-uniform): the patch embedding / conv_in and the final layer store
    int8 weights but compute on float activations, every other layer runs the integer kernel; `--float-act
    none` makes them integer too. Catches the default being lost, applied to the wrong roles, or the
    checkpoint recording float activations without running them."""
    from diffpro_cli.checkpoint import load_quantized
    from diffpro_cli.loading import load_model
    from diffpro_cli.stages.quantize import uniform_plan

    m = load_model(spec)
    plan = uniform_plan(m, 8)
    roles = {n: r for n, (_, r) in m.quantizable_layers().items()}
    ends = {n for n, r in roles.items() if r in ("patch_embed", "final")}
    assert ends and len(ends) < len(roles)
    assert {n for n, e in plan["layers"].items() if e["act_bits"] == 16} == ends
    assert all(e["weight_bits"] == 8 for e in plan["layers"].values())
    for flag, float_layers in (([], ends), (["--float-act", "none"], set())):
        out = tmp_path / ("q" + "".join(flag))
        code, _, err = cli("quantize", spec, "--bits", "8", *flag, "--out", out, "--workdir", tmp_path / "w", "--force")
        assert code == 0, err
        q = load_quantized(out)
        for name, (mod, _) in q.quantizable_layers().items():
            assert mod.weight_bits == 8
            assert (mod.act_mode == "none") == (name in float_layers), (name, mod.act_mode)
    code, _, err = cli("quantize", spec, "--bits", "8", "--float-act", "bogus", "--out", tmp_path / "bad", "--workdir", tmp_path / "w")
    assert code == 2 and _one_error_line(err) and "--float-act bogus" in err and not (tmp_path / "bad").exists()


def test_a_fused_group_never_pairs_one_call_input_with_another_calls_outputs():
    """Two threads calling one network share each q/k/v group's cache of the fused GEMM's slices. A thread
    switch between a member's "is this my input?" check and its read of the slices must not hand it the
    other call's slice. The switch is forced deterministically: the pending-members set runs the other
    call inside the membership test. Catches the cache read from the group after the check (it held the
    other call's outputs by then) instead of from the entry that was checked."""
    from diffpro_cli.quant.groups import SharedInputGroup
    from diffpro_cli.quant.layers import QuantLinear

    torch.manual_seed(0)
    q, k, v = (QuantLinear.from_float(nn.Linear(32, 16), 8, "dynamic") for _ in range(3))
    xa, xb = torch.randn(4, 32), torch.randn(4, 32) * 3
    with torch.no_grad():
        want = k(xa)                      # k alone on xa, before any grouping
        group = SharedInputGroup([q, k, v])
        q(xa)                             # the group's GEMM on xa; k's and v's slices wait in the cache

        class Preempted(set):
            def __contains__(self, item):
                if not getattr(self, "fired", False):
                    self.fired = True
                    q(xb)                 # the other thread's call replaces the cache
                return super().__contains__(item)

        x0, outs, pending = group._cached
        group._cached = (x0, outs, Preempted(pending))
        got = k(xa)
    assert torch.equal(got, want)
