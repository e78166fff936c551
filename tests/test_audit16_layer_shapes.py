"""Audit 16: the integer layers on the Linear/Conv2d shapes third-party networks contain.

Each quantized layer is checked two ways: against the float layer (W8A8 on Gaussian data within a few
per cent) and, tightly, against the fake-quant reference of the scheme its kernel runs
(reference.reference_activation / kernel_tolerance), with torch's own nn.Conv2d doing the padding so
the reference does not share the code under test.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from diffpro_cli.quant.formats import dequantize_weight, fold_to_channel_grid
from diffpro_cli.quant.layers import quantize_module
from diffpro_cli.quant.reference import conv_kernel_tolerance, reference_activation

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="the CPU integer kernels need oneDNN (x86)")


def _quantize(module: nn.Module, bits: int, mode: str, group: int | None = None):
    return quantize_module(module, bits, 16 if mode == "none" else 8, "dynamic" if mode == "none" else mode, group)


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref.double()).norm() / ref.double().norm())


def _kernel_weight(layer) -> torch.Tensor:
    """The weight the integer kernel multiplies: group-wise scales folded onto one int8 grid per channel."""
    q8, s8 = fold_to_channel_grid(layer.int_weight(), layer.weight_scale)
    return dequantize_weight(q8, s8.reshape(-1, 1)).reshape(layer.weight_shape).double()


def _conv_excess(conv: nn.Conv2d, layer, x: torch.Tensor) -> float:
    """max(|kernel − reference| − tolerance) for a conv layer: ≤ 0 when the kernel computes its scheme."""
    k = layer._kernel
    with torch.no_grad():
        y = layer(x).double()
    x_hat, step, amb = reference_activation(x, k.act_scheme(layer), k.act_qmax)
    ref_conv = copy.deepcopy(conv).double()
    w = _kernel_weight(layer) if k.act_qmax is not None else layer.dequantized_weight().double()
    b = None if layer.bias is None else layer.bias.double()
    with torch.no_grad():
        ref = ref_conv._conv_forward(x_hat, w, b)
        tol = conv_kernel_tolerance(lambda a, ww: ref_conv._conv_forward(a, ww, None), x_hat, step, amb, w, b)
    return float(((y - ref).abs() - tol).max())


# -- Conv2d padding -------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["dynamic", "dynamic-token", "none"])
@pytest.mark.parametrize("padding_mode", ["reflect", "replicate", "circular"])
@pytest.mark.parametrize("padding", ["same", "valid"])
def test_string_padding_with_a_non_zero_padding_mode(padding, padding_mode, mode):
    """Bug: padding="same" with padding_mode "reflect"/"replicate"/"circular" was padded with zeros by the
    integer conv (38% off the float layer), and the weight-only path (act_mode "none") raised
    "too many values to unpack" unpacking the string as (ph, pw); "valid" raised the same."""
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, padding=padding, padding_mode=padding_mode)
    x = torch.randn(2, 8, 9, 9)
    layer = _quantize(conv, 8, mode)
    with torch.no_grad():
        y, ref = layer(x), conv(x)
    assert y.shape == ref.shape
    assert _rel(y, ref) < 0.03
    assert _conv_excess(conv, layer, x) <= 0


# -- Conv2d input layouts -------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["dynamic", "dynamic-token", "static", "none"])
def test_unbatched_conv_input(mode):
    """Bug: an unbatched [C, H, W] input, which nn.Conv2d takes, raised IndexError ("Dimension out of
    range") inside the integer conv kernel; the output must be the batched result without its batch dim."""
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, padding=1)
    x = torch.randn(8, 9, 9)
    layer = quantize_module(conv, 8, 16 if mode == "none" else 8, "dynamic" if mode == "none" else mode,
                            static_absmax=float(x.abs().max()) if mode == "static" else None)
    with torch.no_grad():
        y, batched, ref = layer(x), layer(x.unsqueeze(0)), conv(x)
    assert y.shape == ref.shape == (16, 9, 9)
    assert torch.equal(y, batched[0])
    assert _rel(y, ref) < 0.03
