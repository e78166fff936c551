"""bf16 compute (`diffpro.load(..., dtype=torch.bfloat16)` / `set_compute_dtype`): the float math of a float or
quantized network runs under autocast, integer kernels keep float32 at their edges, the sampler sees float32."""

import pytest
import torch

import diffpro
from diffpro_cli.errors import UsageError
from diffpro_cli.quant import kernels


def _plan(model, act_bits):
    layers = {n: {"weight_bits": 8, "act_bits": act_bits, "act_mode": "dynamic" if act_bits < 16 else "none"}
              for n, (m, _) in model.quantizable_layers().items() if isinstance(m, torch.nn.Linear)}
    return {"layers": layers}


def _inputs(model):
    g = torch.Generator().manual_seed(0)
    return torch.randn(4, *model.sample_shape, generator=g), torch.tensor([999, 500, 200, 10]), torch.tensor([0, 1, 2, 3])


@pytest.mark.parametrize("act_bits", [8, 16])
def test_bf16_compute_of_a_quantized_network_matches_float32_and_returns_float32(act_bits):
    # catches: an integer kernel (fbgemm takes float32 only) handed bf16 activations, bf16 leaking into the
    # sampler, or the weight-only path silently computing in float32 (then bf16 would change nothing)
    model = diffpro.load("random:dit-tiny", seed=1)
    diffpro.quantize_(model, _plan(model, act_bits))
    x, t, y = _inputs(model)
    with torch.no_grad():
        ref = model.eps(x, t, y)
        diffpro.set_compute_dtype(model, torch.bfloat16)
        out = model.eps(x, t, y)
    assert out.dtype == torch.float32
    rel = float((out - ref).norm() / ref.norm())
    assert 0 < rel < 0.05, rel      # bf16 rounding (8-bit mantissa) changes the output, slightly
    assert model.compute_dtype == torch.bfloat16


def test_weight_only_layers_cast_their_weights_once_per_dtype():
    # catches a per-call cast (a pass over every weight at every step) and a cache keyed wrongly
    model = diffpro.load("random:dit-tiny", seed=1)
    diffpro.quantize_(model, _plan(model, 16))
    diffpro.set_compute_dtype(model, torch.bfloat16)
    x, t, y = _inputs(model)
    with torch.no_grad():
        model.eps(x, t, y)
        first = {id(m): dict(m._kernel._cast) for m in model.net.modules()
                 if isinstance(getattr(m, "_kernel", None), kernels.DequantFloat) and hasattr(m._kernel, "_cast")}
        model.eps(x, t, y)
    assert first, "no weight-only layer ran in bf16"
    for m in model.net.modules():
        k = getattr(m, "_kernel", None)
        if id(m) in first:
            assert set(k._cast) == {torch.bfloat16}
            assert k._cast[torch.bfloat16][0] is first[id(m)][torch.bfloat16][0]


def test_float_network_in_bf16_and_back():
    model = diffpro.load("random:dit-tiny", seed=1)
    x, t, y = _inputs(model)
    with torch.no_grad():
        ref = model.eps(x, t, y)
        diffpro.set_compute_dtype(model, "bfloat16")
        assert next(model.net.parameters()).dtype == torch.bfloat16
        out = model.eps(x, t, y)
        diffpro.set_compute_dtype(model, torch.float32)
        back = model.eps(x, t, y)
    assert out.dtype == torch.float32 and 0 < float((out - ref).norm() / ref.norm()) < 0.05
    assert model.compute_dtype is None and float((back - ref).norm() / ref.norm()) < 0.01   # weights went through bf16
    with pytest.raises(UsageError, match="dtype"):
        diffpro.set_compute_dtype(model, torch.int8)
