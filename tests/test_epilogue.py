"""GELU fused into the int8 GEMM's epilogue (quant/epilogue.py, kernels.CpuOnednnLinear)."""

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.activations import GELU

import diffpro
from diffpro_cli.quant import kernels
from diffpro_cli.quant.epilogue import (
    activation_after,
    fuse_activations,
    unfuse_activations,
)
from diffpro_cli.quant.layers import quantize_module

ONEDNN = kernels.CpuOnednnLinear.usable(None, torch.device("cpu"))


def _mlp_in(approximate: str, mode: str = "dynamic", bits: int = 8):
    torch.manual_seed(0)
    act = GELU(32, 96, approximate=approximate)
    act.proj = quantize_module(act.proj, bits, act_mode=mode)
    return act


@pytest.mark.parametrize("approximate", ["tanh", "none"])
@pytest.mark.parametrize("mode", ["dynamic", "dynamic-token"])
def test_fused_gelu_equals_the_layer_then_the_modules_own_gelu(approximate, mode):
    # catches: the wrong GELU form in the epilogue (erf vs tanh differ by ~1e-3), the activation applied
    # twice or not at all, a per-token layer handed to a kernel that cannot fuse after its row scaling
    act = _mlp_in(approximate, mode)
    x = torch.randn(2, 40, 32) * 3
    with torch.no_grad():
        assert fuse_activations(act) == 1
        got = act(x)
        post = act.proj.post_op
        act.proj.prefer = act.proj.kernel_name.split(":")[0]   # the same kernel, activation as its own pass
        act.proj._forget_kernel()
        unfuse_activations(act)
        expected = F.gelu(act.proj(x), approximate=approximate)
    assert post == {"tanh": "gelu-tanh", "none": "gelu"}[approximate]
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, F.gelu(expected, approximate=approximate), rtol=1e-3, atol=1e-3)


@pytest.mark.skipif(not ONEDNN, reason="oneDNN int8 matmul unavailable")
def test_the_gelu_layer_runs_the_fusing_kernel_and_says_so():
    # catches: the post-op layer staying on fbgemm (no epilogue: GELU as its own pass) while the report
    # claims fusion, or the label missing from the kernel counts
    act = _mlp_in("tanh")
    assert act.proj.kernel_name.startswith("cpu-fbgemm-int8") or not act.proj.kernel_name.endswith("gelu-tanh")
    fuse_activations(act)
    with torch.no_grad():
        act(torch.randn(4, 32))
    assert act.proj.kernel_name == "cpu-onednn-int8:w8a8-dynamic+gelu-tanh"


def test_fusing_twice_changes_nothing_and_unfuse_restores_the_module():
    # catches: a second pass wrapping the forward again (GELU applied twice) or unfuse leaving the proj
    # applying GELU while the module applies it as well
    act = _mlp_in("tanh")
    act.proj.prefer = "cpu-onednn-int8"   # the fusing kernel also unfused, so only the fusion differs
    act.proj._forget_kernel()
    x = torch.randn(3, 32)
    with torch.no_grad():
        plain = act(x)
        assert fuse_activations(act) == 1 and fuse_activations(act) == 0
        fused = act(x)
        unfuse_activations(act)
        again = act(x)
    assert act.proj.post_op is None and "forward" not in act.__dict__
    assert torch.allclose(fused, plain, atol=1e-5) and torch.equal(again, plain)


def test_float_proj_is_left_alone():
    # catches: a float Linear (a 16-bit layer in a mixed plan) marked, so its module skips the GELU
    act = GELU(8, 16, approximate="tanh")
    assert fuse_activations(act) == 0 and "forward" not in act.__dict__


@pytest.mark.skipif(not ONEDNN, reason="oneDNN int8 matmul unavailable")
def test_bf16_model_gets_bf16_from_the_kernel_close_to_float32():
    # catches: low_precision_io returning float32 into a bf16 model, or quantizing the bf16 input without
    # going through float32 (bf16 cannot hold x/scale to integer precision above 128)
    act = _mlp_in("tanh")
    fuse_activations(act)
    x = torch.randn(64, 32) * 2
    with torch.no_grad():
        ref = act(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = act(x.bfloat16())
    assert low.dtype == torch.bfloat16
    assert (low.float() - ref).abs().max() <= 0.02 * ref.abs().max()


def test_built_in_style_dit_fuses_every_mlp_and_keeps_its_outputs():
    # catches: the pass missing diffusers FeedForward's GELU (ff.net.0), touching attention layers, or the
    # fused network drifting from the unfused one
    model = diffpro.load("random:dit-tiny")
    names = [n for n, _ in model.quantizable_layers().items()]
    fusable = [n for n in names if activation_after(model.net, n)]
    assert fusable and all(n.endswith("ff.net.0.proj") for n in fusable)
    plan = {"layers": {n: {"weight_bits": 8, "act_bits": 8, "act_mode": "dynamic"} for n in names}}
    diffpro.quantize_(model, plan, fuse=False)
    ref_model = diffpro.quantize_(diffpro.load("random:dit-tiny"), plan, fuse=False)   # same seed, same weights
    for name in fusable:   # the kernel the fused layers get, with GELU as its own pass
        ref_model.net.get_submodule(name).prefer = "cpu-onednn-int8"
        ref_model.net.get_submodule(name)._forget_kernel()
    assert fuse_activations(model.net) == len(fusable)
    b = 2
    x = torch.randn(b, *model.sample_shape, generator=torch.Generator().manual_seed(1))
    t = torch.full((b,), 400)
    y = torch.arange(b)
    with torch.no_grad():
        fused, plain = model.eps(x, t, y), ref_model.eps(x, t, y)
    assert torch.allclose(fused, plain, rtol=1e-4, atol=1e-4)
