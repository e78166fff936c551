"""LoRA on a quantized base (issue #20 item 5): diffpro.load_lora keeps the adapter in float and the
base layers integer; the output is base + scale·(alpha/r)·B(A(x)) computed in float."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

import diffpro
from diffpro_cli.errors import InputError, UsageError
from diffpro_cli.quant import layers as qlayers
from diffpro_cli.quant.epilogue import fuse_activations, unfuse_activations
from diffpro_cli.quant.layers import QuantConv2d, QuantLinear
from diffpro_cli.stages.quantize import uniform_plan

RANK = 4
ALPHA = 8.0
SCALE = 0.75
SCALING = SCALE * ALPHA / RANK    # 1.5: alpha ignored gives 0.75, scale ignored gives 2.0
TARGETS = [
    "pos_embed.proj",                                      # QuantConv2d (patch embedding, stride 2)
    "transformer_blocks.0.attn1.to_q", "transformer_blocks.0.attn1.to_k", "transformer_blocks.0.attn1.to_v",
    "transformer_blocks.0.attn1.to_out.0",                 # fused q/k/v group + its output projection
    "transformer_blocks.1.norm1.linear",                   # adaLN modulation
    "transformer_blocks.3.ff.net.0.proj", "transformer_blocks.3.ff.net.2",
    "proj_out_2",                                          # kept in float by the plan: an nn.Linear
]


@pytest.fixture(scope="module")
def qdir(tmp_path_factory):
    """A real W8A8 (dynamic) checkpoint of the built-in DiT, proj_out_2 kept in float."""
    work = tmp_path_factory.mktemp("lora")
    model = diffpro.load("builtin:dit-mnist")
    plan = uniform_plan(model, 8)
    plan["layers"]["proj_out_2"]["weight_bits"] = 16
    (work / "plan.json").write_text(json.dumps(plan))
    diffpro.quantize(model, work, plan_path=work / "plan.json", out_dir=work / "q")
    return work / "q"


def lora_pair(layer, rank: int, generator: torch.Generator, scale: float):
    """Random (A, B) for one Linear/Conv2d (float or quantized), shaped as PEFT saves them: a conv's A is
    [r, in, kh, kw] and its B [out, r, 1, 1]. B is non-zero, unlike a freshly initialised adapter's."""
    if isinstance(layer, (nn.Conv2d, QuantConv2d)):
        a = torch.randn(rank, layer.in_channels, *layer.kernel_size, generator=generator) * scale
        b = torch.randn(layer.out_channels, rank, 1, 1, generator=generator) * scale
    else:
        a = torch.randn(rank, layer.in_features, generator=generator) * scale
        b = torch.randn(layer.out_features, rank, generator=generator) * scale
    return a, b


def random_lora(net, names=TARGETS, seed=0):
    """{name: (A, B)} with random A and B."""
    g = torch.Generator().manual_seed(seed)
    return {n: lora_pair(net.get_submodule(n), RANK, g, 0.05) for n in names}


def write_peft(dirpath, lora):
    """A PEFT/diffusers adapter folder: `transformer.`-prefixed lora_A/lora_B keys, alpha in adapter_config.json."""
    dirpath.mkdir(exist_ok=True)
    sd = {}
    for n, (a, b) in lora.items():
        sd[f"transformer.{n}.lora_A.weight"] = a.contiguous()
        sd[f"transformer.{n}.lora_B.weight"] = b.contiguous()
    save_file(sd, str(dirpath / "adapter_model.safetensors"))
    (dirpath / "adapter_config.json").write_text(json.dumps({"r": RANK, "lora_alpha": ALPHA, "peft_type": "LORA"}))
    return dirpath


def float_delta(layer, x, a, b):
    """The LoRA delta computed independently in float64."""
    x, a, b = x.double(), a.double(), b.double()
    if isinstance(layer, (nn.Conv2d, QuantConv2d)):
        h = F.conv2d(x, a, None, layer.stride, layer.padding, layer.dilation)
        return SCALING * F.conv2d(h, b)
    return SCALING * ((x @ a.T) @ b.T)


def inputs(model):
    torch.manual_seed(0)
    return torch.randn(2, *model.sample_shape), torch.tensor([700, 40]), torch.tensor([3, 8])


def _tensor_names(net):
    return {n for n, _ in net.named_parameters()} | {n for n, _ in net.named_buffers()}


def test_lora_on_quantized_dit_adds_the_float_delta_and_unloads_exactly(qdir, tmp_path, monkeypatch):
    model = diffpro.load(qdir)
    net = model.net
    modules = dict(net.named_modules())
    assert isinstance(modules["transformer_blocks.0.attn1.to_q"], QuantLinear) and modules["transformer_blocks.0.attn1.to_q"]._group
    assert isinstance(modules["pos_embed.proj"], QuantConv2d) and type(modules["proj_out_2"]) is nn.Linear
    keys_before = _tensor_names(net)   # not state_dict(): an inference-only load refuses that (integers released)
    x, t, y = inputs(model)
    with torch.no_grad():
        base = model.eps(x, t, y)

    lora = random_lora(net)
    attached = diffpro.load_lora(model, write_peft(tmp_path / "adapter", lora), scale=SCALE)
    assert sorted(attached) == sorted(TARGETS)
    # the base stays integer: same layer objects, int8 weights (catches a dequantize-and-merge implementation)
    assert all(modules[n] is m for n, m in net.named_modules() if n in modules)
    assert modules["transformer_blocks.0.attn1.to_q"].qweight.dtype == torch.int8

    seen = {}

    def capture(name):
        def hook(mod, args, out):
            seen[name] = (args[0].detach().clone(), out.detach().clone())
        return hook

    handles = [modules[n].register_forward_hook(capture(n)) for n in TARGETS]   # after the LoRA hook: sees base + delta

    def no_dequantize(*a, **k):
        raise AssertionError("the LoRA path dequantized a base weight")

    with monkeypatch.context() as mp, torch.no_grad():
        mp.setattr(qlayers._QuantBase, "dequantized_weight", no_dequantize)
        mp.setattr(qlayers, "dequantize_weight", no_dequantize)
        with_lora = model.eps(x, t, y)
    for h in handles:
        h.remove()
    assert set(seen) == set(TARGETS)
    rel_change = float((with_lora - base).norm() / base.norm())
    assert rel_change > 1e-2             # the adapter really acts (catches a hook that never fires)

    # end to end: the same deltas added by hand (test hooks, float32) give the same eps
    removed = diffpro.unload_lora(model)
    assert sorted(removed) == sorted(TARGETS)

    def add_by_hand(name):
        a, b = lora[name]

        def hook(mod, args, out):
            xin = args[0]
            if isinstance(mod, (nn.Conv2d, QuantConv2d)):
                d = F.conv2d(F.conv2d(xin, a, None, mod.stride, mod.padding, mod.dilation), b)
            else:
                d = F.linear(F.linear(xin, a), b)
            return out + d * SCALING
        return hook

    # a LoRA on an MLP proj acts before its GELU (which diffpro fuses into the proj's int8 GEMM): the
    # by-hand reference and the per-layer check run with that GELU applied by its own module again
    mlp = modules["transformer_blocks.3.ff.net.0"]
    assert modules["transformer_blocks.3.ff.net.0.proj"].post_op is not None
    unfuse_activations(mlp)
    handles = [modules[n].register_forward_hook(add_by_hand(n)) for n in TARGETS]
    with torch.no_grad():
        by_hand = model.eps(x, t, y)
    for h in handles:
        h.remove()
    end_to_end = float((with_lora - by_hand).abs().max())
    assert end_to_end <= 1e-6 * float(by_hand.abs().max()), end_to_end

    # per layer: output with the LoRA == base(x) + delta computed in float64 (same captured input)
    with torch.no_grad():
        for n in TARGETS:
            xin, out = seen[n]
            base_out = modules[n](xin)
            delta = float_delta(modules[n], xin, *lora[n])
            err = float((out.double() - (base_out.double() + delta)).abs().max())
            assert err <= 2e-6 * float(out.abs().max()) + 1e-6, (n, err)   # catches a wrong scaling, A/B or conv geometry
            assert float(delta.abs().max()) > 1e-3 * float(base_out.abs().max()), n
    fuse_activations(mlp)

    # unloading restores the base exactly: no hook, no adapter state left
    with torch.no_grad():
        after = model.eps(x, t, y)
    assert torch.equal(after, base)
    assert _tensor_names(net) == keys_before
    assert not any(m._forward_hooks for n, m in net.named_modules() if n in TARGETS)


def test_kohya_layouts_give_the_same_result_as_peft(qdir, tmp_path):
    """kohya's lora_down/lora_up/alpha (dotted and lora_unet_ flattened names) read like PEFT's lora_A/B."""
    model = diffpro.load(qdir)
    x, t, y = inputs(model)
    lora = random_lora(model.net, seed=1)
    diffpro.load_lora(model, write_peft(tmp_path / "peft", lora), scale=SCALE)
    with torch.no_grad():
        peft = model.eps(x, t, y)
    diffpro.unload_lora(model)
    kohya = {}
    for i, (n, (a, b)) in enumerate(lora.items()):
        key = n if i % 2 else "lora_unet_" + n.replace(".", "_")
        kohya[f"{key}.lora_down.weight"], kohya[f"{key}.lora_up.weight"] = a, b
        kohya[f"{key}.alpha"] = torch.tensor(ALPHA)
    save_file(kohya, str(tmp_path / "kohya.safetensors"))
    assert sorted(diffpro.load_lora(model.net, tmp_path / "kohya.safetensors", scale=SCALE)) == sorted(TARGETS)
    with torch.no_grad():
        got = model.eps(x, t, y)
    assert torch.equal(got, peft)    # catches a per-module alpha read wrongly or flattened names mapped to other layers


def test_lora_naming_a_missing_module_fails_with_one_line_and_attaches_nothing(qdir):
    model = diffpro.load(qdir)
    lora = random_lora(model.net, TARGETS[1:3])
    sd = {f"{n}.lora_A.weight": a for n, (a, _) in lora.items()} | {f"{n}.lora_B.weight": b for n, (_, b) in lora.items()}
    sd["transformer_blocks.9.attn1.to_q.lora_A.weight"] = torch.zeros(RANK, 64)
    sd["transformer_blocks.9.attn1.to_q.lora_B.weight"] = torch.zeros(64, RANK)
    with pytest.raises(InputError) as err:
        diffpro.load_lora(model, sd)
    msg = err.value.message
    assert "\n" not in msg and "1 module(s)" in msg and "transformer_blocks.9.attn1.to_q" in msg
    assert not any(hasattr(m, "lora") for m in model.net.modules())    # validated before anything is attached


def tiny():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
    net[0] = qlayers.quantize_module(net[0], 8)
    return net


def test_adapters_stack_and_unload_by_name():
    net = tiny()
    x = torch.randn(5, 8)
    a1, b1, a2, b2 = torch.randn(2, 8), torch.randn(16, 2), torch.randn(3, 8), torch.randn(16, 3)
    with torch.no_grad():
        base = net(x)
        diffpro.load_lora(net, {"0.lora_A.weight": a1, "0.lora_B.weight": b1}, adapter_name="one")
        one = net(x)
        diffpro.load_lora(net, {"0.lora_down.weight": a2, "0.lora_up.weight": b2, "0.alpha": torch.tensor(6.0)},
                          scale=0.5, adapter_name="two")
        both = net(x)
        h0 = net[0](x)
        assert torch.allclose(h0, net[0]._eager_forward(x) + F.linear(F.linear(x, a1), b1) + 0.5 * 2 * F.linear(F.linear(x, a2), b2),
                              atol=1e-5)    # two adapters add up, each with its own alpha/r (2/2 = 1, 6/3 = 2)
        assert diffpro.unload_lora(net, "two") == ["0"]
        assert torch.equal(net(x), one)
        with pytest.raises(UsageError, match="already loaded"):
            diffpro.load_lora(net, {"0.lora_A.weight": a1, "0.lora_B.weight": b1}, adapter_name="one")
        with pytest.raises(UsageError, match="no LoRA adapter named 'two'.*loaded: one"):
            diffpro.unload_lora(net, "two")
        diffpro.unload_lora(net)
        assert torch.equal(net(x), base) and not net[0]._forward_hooks
    assert not torch.equal(one, both) and not torch.equal(one, base)


@pytest.mark.parametrize("sd, cls, text", [
    ({"0.lora_A.weight": torch.randn(2, 9), "0.lora_B.weight": torch.randn(16, 2)}, InputError, "do not fit"),
    ({"0.lora_A.weight": torch.randn(2, 8)}, InputError, "only one of the two"),
    ({"0.lora_A.weight": torch.randn(2, 8), "0.lora_B.weight": torch.randn(16, 2), "0.lora_magnitude_vector": torch.ones(16)},
     InputError, "DoRA"),
    ({"1.lora_A.weight": torch.randn(2, 8), "1.lora_B.weight": torch.randn(16, 2)}, UsageError, "Linear/Conv2d"),
    ({}, InputError, "no LoRA weights"),
])
def test_bad_loras_fail_with_one_line(sd, cls, text):
    net = tiny()
    with pytest.raises(cls, match=text) as err:
        diffpro.load_lora(net, sd)
    assert "\n" not in err.value.message and not any(hasattr(m, "lora") for m in net.modules())


def test_lora_files_load_safely(tmp_path):
    """.pt state dicts go through torch.load(weights_only=True): plain tensors load, pickled objects are refused."""
    net = tiny()
    sd = {"0.lora_A.weight": torch.randn(2, 8), "0.lora_B.weight": torch.randn(16, 2)}
    torch.save(sd, tmp_path / "ok.pt")
    assert diffpro.load_lora(net, tmp_path / "ok.pt") == ["0"]
    torch.save({"0.lora_A.weight": nn.Linear(2, 2)}, tmp_path / "code.pt")
    with pytest.raises(InputError, match="not loadable as plain tensors"):
        diffpro.load_lora(net, tmp_path / "code.pt", adapter_name="other")
    with pytest.raises(InputError, match="no such file"):
        diffpro.load_lora(net, tmp_path / "missing.safetensors")
