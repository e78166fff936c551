"""LoRA on an MLP input projection whose GELU diffpro fused into the int8 GEMM's epilogue (the common
`ff.net.0.proj` LoRA target): the delta goes before the activation, GELU(Wx + ΔWx)."""

import pytest
import torch
import torch.nn.functional as F

import diffpro
from diffpro_cli.errors import InputError, UsageError
from diffpro_cli.quant import layers as qlayers

PROJ = "transformer_blocks.0.ff.net.0.proj"
MLP = "transformer_blocks.0.ff.net.0"      # diffusers' GELU module: proj, then the activation


@pytest.fixture(scope="module")
def qdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-gelu")
    diffpro.quantize("random:dit-tiny", root / "work", bits=8, float_act=[], out_dir=root / "q")   # W8A8 dynamic
    return root / "q"


def _lora(layer, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(4, layer.in_features, generator=g) * 0.2
    b = torch.randn(layer.out_features, 4, generator=g) * 0.2
    return {f"{PROJ}.lora_A.weight": a, f"{PROJ}.lora_B.weight": b}, a, b


def test_lora_on_a_gelu_fused_projection_goes_before_the_gelu_and_unloads_exactly(qdir):
    """Bug caught: the hook added ΔWx to the fused layer's output GELU(Wx), giving GELU(Wx) + ΔWx instead of
    GELU(Wx + ΔWx) (0.57 max error on outputs of 1.3 here); the model's output was silently wrong."""
    model = diffpro.load(qdir)
    net = model.net
    proj, mlp = net.get_submodule(PROJ), net.get_submodule(MLP)
    assert proj.post_op == "gelu-tanh" and "forward" in mlp.__dict__    # the fused path is what is tested
    torch.manual_seed(0)
    h = torch.randn(2, 5, proj.in_features)
    x, t, y = torch.randn(2, *model.sample_shape), torch.tensor([900, 30]), torch.tensor([1, 2])
    with torch.no_grad():
        base_eps = model.eps(x, t, y)
        proj.post_op = None              # the same kernel without its epilogue: the pre-activation Wx
        pre = proj(h)
        proj.post_op = "gelu-tanh"
        sd, a, b = _lora(proj, 0)
        diffpro.load_lora(model, sd)
        got = mlp(h)
        want = F.gelu(pre + F.linear(F.linear(h, a), b), approximate="tanh")
        assert torch.allclose(got, want, atol=1e-5), float((got - want).abs().max())
        sd2, a2, b2 = _lora(proj, 1)
        diffpro.load_lora(model, sd2, adapter_name="two")
        want2 = F.gelu(pre + F.linear(F.linear(h, a), b) + F.linear(F.linear(h, a2), b2), approximate="tanh")
        assert torch.allclose(mlp(h), want2, atol=1e-5)
        diffpro.unload_lora(model, "two")
        assert torch.allclose(mlp(h), want, atol=1e-5)      # still unfused while an adapter is left
        diffpro.unload_lora(model)
        # the fused kernel is back, bit for bit
        assert proj.post_op == "gelu-tanh" and "forward" in mlp.__dict__ and proj.kernel_name.endswith("+gelu-tanh")
        assert torch.equal(model.eps(x, t, y), base_eps)


def test_a_fused_activation_without_its_gelu_module_is_refused():
    """Bug caught: a layer carrying a post-op outside a diffusers GELU module (nothing to restore the
    activation) would get its delta after the activation silently."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(qlayers.quantize_module(torch.nn.Linear(8, 16), 8))
    net[0].post_op = "gelu"
    with pytest.raises(UsageError, match="fused activation") as err:
        diffpro.load_lora(net, {"0.lora_A.weight": torch.randn(2, 8), "0.lora_B.weight": torch.randn(16, 2)})
    assert "\n" not in err.value.message and not hasattr(net[0], "lora")


def _tiny():
    torch.manual_seed(0)
    return torch.nn.Sequential(qlayers.quantize_module(torch.nn.Linear(8, 16), 8))


@pytest.mark.parametrize("sd, text", [
    # a PEFT model's state_dict with two adapters: the second pair overwrote the first, module by module
    ({"0.lora_A.one.weight": torch.randn(2, 8), "0.lora_B.one.weight": torch.randn(16, 2),
      "0.lora_A.two.weight": torch.randn(3, 8), "0.lora_B.two.weight": torch.randn(16, 3)}, "holds 2 adapters"),
    ({"0.lora_A.weight": torch.full((2, 8), float("nan")), "0.lora_B.weight": torch.randn(16, 2)}, "NaN or inf"),
    ({"0.lora_down.weight": torch.randn(2, 8), "0.lora_up.weight": torch.randn(16, 2), "0.alpha": torch.tensor(float("inf"))},
     "NaN or inf"),
])
def test_damaged_or_mixed_adapter_files_fail_with_one_line(sd, text):
    """Bugs caught: a file holding two PEFT adapters loaded as one (whichever pair came last per module);
    NaN/inf weights or alpha loaded silently, turning every sample into NaN."""
    net = _tiny()
    with pytest.raises(InputError, match=text) as err:
        diffpro.load_lora(net, sd)
    assert "\n" not in err.value.message and not hasattr(net[0], "lora")
    # one named adapter (PEFT's `default`) still loads
    assert diffpro.load_lora(net, {"0.lora_A.default.weight": torch.randn(2, 8), "0.lora_B.default.weight": torch.randn(16, 2)}) == ["0"]


def test_a_lora_on_a_layer_that_is_not_linear_or_conv_names_that_layer(qdir):
    """Bug caught: the error named only the class ("LayerNorm: LoRA attaches to Linear/Conv2d layers"), not
    which of the file's modules it was, so the user could not tell what to drop."""
    model = diffpro.load(qdir)
    name = "transformer_blocks.1.norm3"
    assert type(model.net.get_submodule(name)).__name__ == "LayerNorm"
    with pytest.raises(UsageError, match="Linear/Conv2d") as err:
        diffpro.load_lora(model, {f"{name}.lora_A.weight": torch.randn(2, 16), f"{name}.lora_B.weight": torch.randn(16, 2)})
    assert name in err.value.message and "\n" not in err.value.message
