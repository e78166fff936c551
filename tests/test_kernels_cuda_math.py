"""The CUDA kernels' arithmetic, checked on the CPU.

torch._int_mm and torch._scaled_mm also run on the CPU, so the CUDA kernel classes of
quant/kernels_cuda.py can be built for the CPU (their `usable` check, which asks for CUDA, is bypassed)
and compared with the fake-quant reference: activation scales per scheme, _int_mm's padding of small
batches, the im2col geometry of convolutions, bias and dtypes. What only a GPU can check (cuBLASLt's
layouts and speed, tinygemm's int4 packing, which has no CPU kernel) stays in `make cuda-check`."""

import pytest
import torch
from torch import nn

from diffpro_cli.quant import kernels
from diffpro_cli.quant.layers import quantize_module
from diffpro_cli.quant.reference import conv_kernel_tolerance, kernel_tolerance, reference_activation

CPU = torch.device("cpu")


def _kernel(name: str, layer):
    return kernels.KERNELS[name]([layer], CPU)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("rows", [5, 64])          # ≤ 16 rows: the padding torch._int_mm needs on CUDA
@pytest.mark.parametrize("mode", ["dynamic", "dynamic-token", "static"])
def test_intmm_linear_matches_the_reference(mode, rows, bits):
    # catches: a wrong scale (per tensor vs per token), padded rows leaking into the output, the weight
    # scale applied per row instead of per column, or the bias dropped
    torch.manual_seed(rows + bits)
    lin = nn.Linear(64, 24)
    absmax = 3.0 if mode == "static" else None
    ql = quantize_module(lin, bits, act_mode=mode, static_absmax=absmax)
    k = _kernel("cuda-int8-intmm", ql)
    x = torch.randn(rows, 64) * torch.logspace(-1, 0.5, rows)[:, None]   # rows of very different ranges
    with torch.no_grad():
        y = k(ql, x).double()
    x_hat, step, amb = reference_activation(x, k.act_scheme(ql), 127, absmax)
    w_ref = ql.dequantized_weight().double()
    ref = x_hat @ w_ref.T + lin.bias.detach().double()
    tol = kernel_tolerance(x_hat, step, amb, w_ref, lin.bias.detach())
    assert y.shape == ref.shape
    assert bool(((y - ref).abs() <= tol).all()), f"max err {(y - ref).abs().max():.3g}"


def test_intmm_linear_keeps_the_input_dtype_and_leading_dims():
    # catches: a bf16 model getting float32 activations back, or [B, T, C] inputs flattened for good
    lin = nn.Linear(32, 16)
    ql = quantize_module(lin, 8, act_mode="dynamic-token")
    k = _kernel("cuda-int8-intmm", ql)
    x = torch.randn(2, 9, 32)
    with torch.no_grad():
        y = k(ql, x.bfloat16())
        ref = k(ql, x)
    assert y.dtype == torch.bfloat16 and y.shape == (2, 9, 16)
    assert float((y.float() - ref).abs().max()) <= 0.02 * float(ref.abs().max())


CONVS = [dict(kernel_size=3, padding=1), dict(kernel_size=3, stride=2, padding=1), dict(kernel_size=1),
         dict(kernel_size=3, padding="same"), dict(kernel_size=3, padding=1, padding_mode="reflect"),
         dict(kernel_size=3, padding=2, dilation=2)]


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_im2col_conv_matches_the_reference(mode):
    # catches: im2col columns in another order than the weight's (in, kh, kw), a wrong output size for
    # stride/dilation, "same"/reflect padding lost, or one scale shared by every sample
    torch.manual_seed(1)
    x = torch.randn(2, 8, 9, 9) * torch.tensor([0.5, 3.0]).view(2, 1, 1, 1)
    for geometry in CONVS:
        conv = nn.Conv2d(8, 16, **geometry)
        absmax = 4.0 if mode == "static" else None
        qc = quantize_module(conv, 8, act_mode=mode, static_absmax=absmax)
        k = _kernel("cuda-int8-im2col-intmm", qc)
        with torch.no_grad():
            y = k(qc, x).double()
        x_hat, step, amb = reference_activation(x, k.act_scheme(qc), 127, absmax)
        w_ref = qc.dequantized_weight().double()
        ref = qc.float_conv(x_hat, w_ref, conv.bias.detach().double())
        tol = conv_kernel_tolerance(lambda a, w: qc.float_conv(a, w, None), x_hat, step, amb, w_ref, conv.bias.detach())
        assert y.shape == ref.shape, geometry
        assert bool(((y - ref).abs() <= tol).all()), f"{geometry}: max err {(y - ref).abs().max():.3g}"


def _cpu_rowwise_scaled_mm() -> bool:
    """torch < 2.14's CPU _scaled_mm takes per-tensor scales only (the CUDA one takes row-wise scales)."""
    a = torch.ones(2, 16).to(torch.float8_e4m3fn)
    b = torch.ones(16, 2).to(torch.float8_e4m3fn).t().contiguous().t()
    try:
        torch._scaled_mm(a, b, scale_a=torch.ones(2, 1), scale_b=torch.ones(1, 2), out_dtype=torch.bfloat16)
    except RuntimeError:
        return False
    return True


@pytest.mark.skipif(not _cpu_rowwise_scaled_mm(), reason=f"torch {torch.__version__}'s CPU _scaled_mm has no row-wise scales")
def test_fp8_linear_is_close_to_the_int8_weights_it_re_rounds():
    # catches: the row-wise scales swapped or inverted (errors of 100 %+), or the bias lost; e4m3 keeps
    # 3 mantissa bits, so a few per cent of relative error is what a correct kernel gives
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    ql = quantize_module(lin, 8, act_mode="dynamic-token")
    k = _kernel("cuda-fp8", ql)
    x = torch.randn(20, 64) * torch.logspace(-1, 1, 20)[:, None]
    with torch.no_grad():
        y = k(ql, x).double()
    ref = x.double() @ ql.dequantized_weight().double().T + lin.bias.detach().double()
    rel = (y - ref).norm(dim=1) / ref.norm(dim=1)
    assert y.shape == ref.shape and float(rel.max()) < 0.08, rel


def test_intmm_runs_a_fused_qkv_group_as_one_gemm():
    # catches: stacked weights or scales of a q/k/v group misaligned with their output slices
    torch.manual_seed(3)
    layers = [quantize_module(nn.Linear(32, n), 8, act_mode="dynamic-token") for n in (16, 16, 24)]
    k = kernels.KERNELS["cuda-int8-intmm"](layers, CPU)
    x = torch.randn(40, 32)
    with torch.no_grad():
        y = k(layers[0], x)
        parts = [_kernel("cuda-int8-intmm", layer)(layer, x) for layer in layers]
    assert y.shape == (40, 56) and torch.allclose(y, torch.cat(parts, dim=1), rtol=1e-5, atol=1e-5)


def _force_cuda_classes(monkeypatch, quant):
    """Every integer layer in `quant` selects the CUDA kernel class of its kind (built for the CPU)."""
    cuda_cls = {"linear": kernels.KERNELS["cuda-int8-intmm"], "conv2d": kernels.KERNELS["cuda-int8-im2col-intmm"]}
    original = kernels.select
    monkeypatch.setattr(kernels, "select", lambda layer, device, prefer=None: cuda_cls[layer.kind]
                        if layer.act_mode != "none" and getattr(layer, "groups", 1) == 1 else original(layer, device, prefer))
    for m in quant:
        m._forget_kernel()
    return original


def _w8a8(spec):
    from diffpro_cli.loading import load_model
    from diffpro_cli.stages.quantize import apply_plan, uniform_plan

    model = load_model(spec)
    apply_plan(model, uniform_plan(model, 8, act_mode="dynamic-token"))
    torch.manual_seed(0)
    x, t = torch.randn(2, *model.sample_shape), torch.tensor([10, 700])
    y = torch.arange(2) % model.num_classes if model.num_classes else None
    quant = {n: m for n, m in model.net.named_modules() if getattr(m, "is_diffpro_quant", False)}
    return model, (x, t, y), quant


def test_a_quantized_dit_runs_end_to_end_on_the_cuda_kernel_classes(monkeypatch):
    """Every integer layer of a W8A8 DiT forced onto the CUDA kernel classes (on the CPU), fused q/k/v
    groups and the GELU after each MLP's first Linear included: the same prediction as the CPU kernels
    (both quantize each token symmetrically on the ±127 grid). Catches: a kernel contract the layers
    use differently with the CUDA classes (group slices, the post-op, output shapes)."""
    model, (x, t, y), quant = _w8a8("random:dit-tiny")
    with torch.no_grad():
        ref = model.eps(x, t, y)
    _force_cuda_classes(monkeypatch, quant.values())
    with torch.no_grad():
        out = model.eps(x, t, y)
    names = {m.kernel_name for m in quant.values()}
    assert any("cuda-int8-intmm" in n and "fused3" in n for n in names), names
    assert any(getattr(m, "post_op", None) for m in quant.values())
    assert float((out - ref).norm() / ref.norm()) < 1e-4


def test_a_quantized_unet_runs_its_convolutions_on_the_cuda_kernel_classes(monkeypatch):
    """The same for a U-Net, layer by layer: a random U-Net amplifies the few half-step roundings on which
    two correct kernels differ (3 % at the output from 4e-4 at one conv), so each integer layer's output
    under the CUDA classes is compared with the CPU kernel's on the very same input."""
    model, (x, t, y), quant = _w8a8("random:unet-tiny")
    seen = {}
    hooks = [m.register_forward_hook(lambda mod, a, o, n=n: seen.setdefault(n, (a[0].clone(), o.clone())) and None)
             for n, m in quant.items()]
    original = _force_cuda_classes(monkeypatch, quant.values())
    with torch.no_grad():
        model.eps(x, t, y)
    for h in hooks:
        h.remove()
    assert any(m.kernel_name.startswith("cuda-int8-im2col-intmm") for m in quant.values())
    monkeypatch.setattr(kernels, "select", original)
    for name, (inp, out) in seen.items():
        quant[name]._forget_kernel()
        with torch.no_grad():
            cpu = quant[name](inp)
        assert float((out - cpu).norm() / cpu.norm()) < 1e-2, name
