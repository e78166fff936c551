"""Second audit of LoRA on a quantized base with the files users bring (PEFT/diffusers, older diffusers,
kohya; U-Net convs, fused q/k/v, float-kept layers, fp16 files, a bf16 plan, two adapters, the sampler).

The reference for every adapted layer is the FLOAT merged update: its output with the LoRA minus its base
output must equal x·(scale·alpha/r·B·A)ᵀ (a convolution by that merged kernel for a conv), computed in
float64 from the tensors written to the file."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

import diffpro
from diffpro_cli.errors import InputError
from diffpro_cli.quant.epilogue import fuse_activations, unfuse_activations
from diffpro_cli.quant.layers import QuantConv2d, QuantLinear
from diffpro_cli.sampling import sample
from diffpro_cli.stages.quantize import uniform_plan
from test_lora import lora_pair

DIT_TARGETS = ["pos_embed.proj",                                    # QuantConv2d 4×4 stride 4 (patch embedding)
               "transformer_blocks.0.attn1.to_k",                   # alone, inside the fused q/k/v GEMM
               "transformer_blocks.0.attn1.to_out.0",
               "transformer_blocks.0.ff.net.0.proj",                # GELU fused into its int8 GEMM
               "transformer_blocks.1.norm1.linear",
               "proj_out_2"]                                        # kept in float by the plan
UNET_TARGETS = ["down_blocks.0.resnets.0.conv1",                    # 3×3 conv kept in float by the plan
                "down_blocks.0.downsamplers.0.conv",                # 3×3 stride 2
                "down_blocks.1.resnets.0.conv_shortcut",            # 1×1 conv
                "down_blocks.1.attentions.0.to_k",                  # fused q/k/v member
                "mid_block.resnets.0.time_emb_proj",
                "conv_out"]


def _quantized_dir(root, spec, keep_float=()):
    model = diffpro.load(spec)
    plan = uniform_plan(model, 8)                   # W8A8 dynamic
    for name in keep_float:
        plan["layers"][name]["weight_bits"] = 16
    (root / "plan.json").write_text(json.dumps(plan))
    diffpro.quantize(model, root, plan_path=root / "plan.json", out_dir=root / "q")
    return root / "q"


@pytest.fixture(scope="module")
def dit_dir(tmp_path_factory):
    return _quantized_dir(tmp_path_factory.mktemp("a16-dit"), "builtin:dit-mnist", keep_float=["proj_out_2"])


@pytest.fixture(scope="module")
def unet_dir(tmp_path_factory):
    return _quantized_dir(tmp_path_factory.mktemp("a16-unet"), "builtin:unet-mnist", keep_float=[UNET_TARGETS[0]])


def _is_conv(layer):
    return isinstance(layer, (nn.Conv2d, QuantConv2d))


def make_lora(net, names, rank=3, seed=0, flat_1x1=False):
    """{layer: (A, B)} shaped as PEFT saves them (rank 3 divides none of the widths); `flat_1x1`: A of a
    1×1 conv as a 2-D [r, in] matrix, as some trainers save it."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for n in names:
        m = net.get_submodule(n)
        a, b = lora_pair(m, rank, g, 0.1)
        if flat_1x1 and _is_conv(m) and tuple(m.kernel_size) == (1, 1):
            a = a[:, :, 0, 0].contiguous()
        out[n] = (a, b)
    return out


def peft_keys(lora, prefix=""):
    sd = {}
    for n, (a, b) in lora.items():
        sd[f"{prefix}{n}.lora_A.weight"], sd[f"{prefix}{n}.lora_B.weight"] = a, b
    return sd


def kohya_keys(lora, alpha, dtype=torch.float16):
    sd = {}
    for n, (a, b) in lora.items():
        k = "lora_unet_" + n.replace(".", "_")
        sd[f"{k}.lora_down.weight"], sd[f"{k}.lora_up.weight"] = a.to(dtype), b.to(dtype)
        sd[f"{k}.alpha"] = torch.tensor(alpha, dtype=dtype)
    return sd


def old_diffusers_keys(lora, prefix=""):
    """diffusers 0.21–0.24 (LoRACompatibleLinear/Conv): <module>.lora.down.weight / lora.up.weight."""
    sd = {}
    for n, (a, b) in lora.items():
        sd[f"{prefix}{n}.lora.down.weight"], sd[f"{prefix}{n}.lora.up.weight"] = a, b
    return sd


def merged_delta(layer, x, a, b, scaling):
    """The float reference: the layer's input through the merged update scaling·B·A, in float64."""
    dw = scaling * (b.double().flatten(1) @ a.double().flatten(1))
    if _is_conv(layer):
        dw = dw.reshape(layer.out_channels, layer.in_channels, *layer.kernel_size)
        return F.conv2d(x.double(), dw, None, layer.stride, layer.padding, layer.dilation)
    return F.linear(x.double(), dw)


def base_output(layer, x):
    if isinstance(layer, (QuantLinear, QuantConv2d)):
        return layer._eager_forward(x)        # the integer kernel alone (no hook)
    if isinstance(layer, nn.Conv2d):
        return layer._conv_forward(x, layer.weight, layer.bias)
    return F.linear(x, layer.weight, layer.bias)


def inputs(model):
    torch.manual_seed(0)
    return torch.randn(2, *model.sample_shape), torch.tensor([700, 40]), torch.tensor([3, 8])


def layer_errors(model, lora, scalings):
    """Runs eps once with the LoRA loaded; per adapted layer, max |(out − base(x)) − float delta| relative
    to max |float delta| (the layer's own captured input)."""
    seen = {}
    handles = [model.net.get_submodule(n).register_forward_hook(
        lambda m, args, out, n=n: seen.__setitem__(n, (args[0].detach().clone(), out.detach().clone()))) for n in lora]
    with torch.no_grad():
        model.eps(*inputs(model))
        for h in handles:
            h.remove()
        errors = {}
        for n, (a, b) in lora.items():
            layer = model.net.get_submodule(n)
            x, out = seen[n]
            want = merged_delta(layer, x, a, b, scalings[n])
            got = out.double() - base_output(layer, x).double()
            assert float(want.abs().max()) > 1e-3 * float(out.abs().max()), n     # the delta is not negligible
            errors[n] = float((got - want).abs().max() / want.abs().max())
    return errors


def assert_float_delta(model, lora, scalings, tol=1e-5):
    errors = layer_errors(model, lora, scalings)
    assert max(errors.values()) <= tol, errors


# ---------------------------------------------------------------------------------------------
# What already held: the formats and layer kinds users bring, against the float reference
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["peft-unet-prefix", "peft-bare-2d-1x1", "kohya-fp16"])
def test_unet_conv_and_fused_lora_files_add_the_float_merged_delta(unet_dir, tmp_path, layout):
    """Catches a wrong conv geometry (3×3, stride 2, 1×1 given as a 2-D A), a delta landing on the whole
    fused q/k/v output instead of to_k's slice, a kohya alpha or fp16 file read wrongly."""
    model = diffpro.load(unet_dir)
    assert type(model.net.get_submodule(UNET_TARGETS[0])) is nn.Conv2d
    assert isinstance(model.net.get_submodule(UNET_TARGETS[1]), QuantConv2d)
    assert isinstance(model.net.get_submodule(UNET_TARGETS[3]), QuantLinear)
    assert model.net.get_submodule(UNET_TARGETS[3])._group is not None      # the fused path is what is tested
    lora = make_lora(model.net, UNET_TARGETS, flat_1x1=layout == "peft-bare-2d-1x1")
    if layout == "kohya-fp16":
        save_file(kohya_keys(lora, 1.5), str(tmp_path / "k.safetensors"))
        lora = {n: (a.half().float(), b.half().float()) for n, (a, b) in lora.items()}
        scalings = {n: 1.5 / 3 for n in lora}
        path = tmp_path / "k.safetensors"
    else:
        (tmp_path / "lora").mkdir()
        save_file(peft_keys(lora, "unet." if layout == "peft-unet-prefix" else ""),
                  str(tmp_path / "lora" / "pytorch_lora_weights.safetensors"))
        scalings = {n: 1.0 for n in lora}     # no alpha anywhere: alpha = r
        path = tmp_path / "lora"
    assert sorted(diffpro.load_lora(model, path)) == sorted(UNET_TARGETS)
    assert_float_delta(model, lora, scalings)


def test_dit_lora_with_per_layer_alpha_and_scale_adds_the_float_merged_delta(dit_dir, tmp_path):
    """Per-layer .alpha keys (each layer its own alpha/r), rank 3, scale 0.5, a float-kept layer, a GELU-fused
    projection and to_k alone in the fused group. Catches one alpha applied to all, scale ignored."""
    model = diffpro.load(dit_dir)
    assert type(model.net.get_submodule("proj_out_2")) is nn.Linear
    lora = make_lora(model.net, DIT_TARGETS)
    sd = peft_keys(lora, "transformer.")
    for i, n in enumerate(DIT_TARGETS):
        sd[f"transformer.{n}.alpha"] = torch.tensor(float(i + 1))
    save_file(sd, str(tmp_path / "a.safetensors"))
    diffpro.load_lora(model, tmp_path / "a.safetensors", scale=0.5)
    assert_float_delta(model, lora, {n: 0.5 * (i + 1) / 3 for i, n in enumerate(DIT_TARGETS)})


def test_two_loras_run_through_the_diffusers_signature_and_the_sampler_then_unload_bit_exact(dit_dir):
    """Two adapters (one with a negative scale) on the same layers add up; the diffusers call gives what eps
    gives; the sampler's trajectory equals the one with the same deltas added by test hooks; unloading gives
    the base back bit for bit. Catches a hook the sampler path bypasses, adapters overwriting each other,
    state left behind after unload."""
    model = diffpro.load(dit_dir)
    x, t, y = inputs(model)
    timesteps = [0, 300, 600, 900]
    with torch.no_grad():
        base, base_samples = model.eps(x, t, y), sample(model, 2, timesteps, seed=1)
    one, two = make_lora(model.net, DIT_TARGETS, seed=1), make_lora(model.net, DIT_TARGETS[:3], rank=5, seed=2)
    diffpro.load_lora(model, peft_keys(one), scale=0.7, adapter_name="one")
    diffpro.load_lora(model, peft_keys(two, "transformer."), scale=-0.4, adapter_name="two")
    with torch.no_grad():
        eps = model.eps(x, t, y)
        called = model.net(x, timestep=t, class_labels=y).sample[:, :x.shape[1]]
        samples = sample(model, 2, timesteps, seed=1)
    assert torch.equal(called, eps)
    assert float((eps - base).abs().max()) > 1e-2 * float(base.abs().max())

    diffpro.unload_lora(model)
    with torch.no_grad():
        assert torch.equal(model.eps(x, t, y), base) and torch.equal(sample(model, 2, timesteps, seed=1), base_samples)

    def by_hand(name):
        def hook(layer, args, out):
            xin = args[0]
            for lora, s in ((one, 0.7), (two, -0.4)):      # in loading order, as the adapters add
                if name in lora:
                    a, b = lora[name]
                    out = out + (F.conv2d(F.conv2d(xin, a, None, layer.stride, layer.padding, layer.dilation), b)
                                 if _is_conv(layer) else F.linear(F.linear(xin, a), b)) * s
            return out
        return hook

    mlp = model.net.get_submodule("transformer_blocks.0.ff.net.0")
    unfuse_activations(mlp)       # the delta goes before the GELU, as load_lora does
    handles = [model.net.get_submodule(n).register_forward_hook(by_hand(n)) for n in DIT_TARGETS]
    with torch.no_grad():
        want_eps, want_samples = model.eps(x, t, y), sample(model, 2, timesteps, seed=1)
    for h in handles:
        h.remove()
    fuse_activations(mlp)
    # the same float arithmetic in the same order gives the same bits: a tolerance would not do, since a
    # last-bit difference can flip a dynamic int8 activation's rounding downstream (0.5% of eps here)
    assert torch.equal(eps, want_eps) and torch.equal(samples, want_samples)


# ---------------------------------------------------------------------------------------------
# Defects found (each test failed before its fix)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prefixed", [True, False])
def test_alpha_in_the_diffusers_safetensors_metadata_is_applied(dit_dir, tmp_path, prefixed):
    """Bug caught: diffusers (>= 0.35) writes lora_alpha into the safetensors header
    (`lora_adapter_metadata`, "transformer.lora_alpha" from pipeline.save_lora_weights, bare "lora_alpha"
    from model.save_lora_adapter) and no .alpha keys; it was ignored, so alpha = r was used and a LoRA
    trained with lora_alpha=6, r=3 acted at half strength."""
    model = diffpro.load(dit_dir)
    lora = make_lora(model.net, DIT_TARGETS)
    config = {"r": 3, "lora_alpha": 6, "use_rslora": False, "alpha_pattern": {"proj_out_2": 1.5}, "peft_type": "LORA"}
    meta = {f"transformer.{k}": v for k, v in config.items()} if prefixed else config
    meta_text = json.dumps(meta | ({"text_encoder.lora_alpha": 100} if prefixed else {}))
    save_file(peft_keys(lora, "transformer." if prefixed else ""), str(tmp_path / "pytorch_lora_weights.safetensors"),
              metadata={"format": "pt", "lora_adapter_metadata": meta_text})
    diffpro.load_lora(model, tmp_path / "pytorch_lora_weights.safetensors")
    assert_float_delta(model, lora, {n: 0.5 if n == "proj_out_2" else 2.0 for n in DIT_TARGETS})


@pytest.mark.parametrize("meta, text", [("{not json", "not JSON"), ('["r", 4]', "not a JSON object"),
                                        ('{"lora_alpha": "eight"}', "not numbers"),
                                        ('{"alpha_pattern": ["0"]}', "not numbers")])
def test_unreadable_lora_metadata_fails_with_one_line(tmp_path, meta, text):
    """Bug caught (last two): a config's lora_alpha that is not a number ended in a ValueError traceback."""
    net = nn.Sequential(nn.Linear(8, 16))
    save_file({"0.lora_A.weight": torch.randn(2, 8), "0.lora_B.weight": torch.randn(16, 2)}, str(tmp_path / "l.safetensors"),
              metadata={"lora_adapter_metadata": meta})
    with pytest.raises(InputError, match=text) as err:
        diffpro.load_lora(net, tmp_path / "l.safetensors")
    assert "\n" not in err.value.message and not hasattr(net[0], "lora")


def test_an_alpha_key_spelled_with_another_prefix_than_its_weights_still_applies(dit_dir):
    """Bug caught: alpha keys were matched to weights by their raw spelling, so `x.alpha` next to
    `transformer.x.lora_A.weight` (or a kohya flattened alpha next to dotted weights) was silently dropped and
    alpha = r used instead."""
    model = diffpro.load(dit_dir)
    names = DIT_TARGETS[1:3]
    lora = make_lora(model.net, names)
    sd = peft_keys(lora, "transformer.")
    sd[f"{names[0]}.alpha"] = torch.tensor(6.0)
    sd["lora_unet_" + names[1].replace(".", "_") + ".alpha"] = torch.tensor(1.5)
    diffpro.load_lora(model, sd)
    assert_float_delta(model, lora, {names[0]: 2.0, names[1]: 0.5})


@pytest.mark.parametrize("extra, text", [
    # the same layer under two spellings: one pair silently replaced the other
    ({"transformer.transformer_blocks.0.attn1.to_k.lora_A.weight": torch.zeros(3, 192),
      "transformer.transformer_blocks.0.attn1.to_k.lora_B.weight": torch.zeros(192, 3)}, "more than once"),
    # an alpha for a layer the file has no matrices for: the file is cut short, it was ignored
    ({"transformer_blocks.2.attn1.to_q.alpha": torch.tensor(4.0)}, "without LoRA matrices"),
    # two spellings of one layer's alpha, disagreeing: whichever came last won
    ({"transformer_blocks.0.attn1.to_k.alpha": torch.tensor(4.0),
      "transformer.transformer_blocks.0.attn1.to_k.alpha": torch.tensor(2.0)}, "two different alphas"),
    # an alpha for a module the network does not have: ignored silently
    ({"transformer_blocks.9.attn1.to_q.alpha": torch.tensor(4.0)}, "does not have"),
    # an empty alpha tensor: an IndexError traceback
    ({"transformer_blocks.0.attn1.to_k.alpha": torch.zeros(0)}, "not one alpha"),
])
def test_lora_entries_that_would_be_dropped_silently_fail_with_one_line(dit_dir, extra, text):
    model = diffpro.load(dit_dir)
    lora = make_lora(model.net, ["transformer_blocks.0.attn1.to_k"])
    with pytest.raises(InputError, match=text) as err:
        diffpro.load_lora(model, peft_keys(lora) | extra)
    assert "\n" not in err.value.message and not any(hasattr(m, "lora") for m in model.net.modules())


def test_a_bf16_plan_leaves_the_adapter_in_float32(dit_dir):
    """Bug caught: a model run in bf16 (a bf16 plan, or load(dtype=torch.bfloat16)) computes under autocast,
    which silently ran the float32 adapter's two matmuls in bf16: the delta added to the integer layers'
    float32 outputs was off by 0.5% of itself."""
    model = diffpro.load(dit_dir, dtype=torch.bfloat16)
    names = ["transformer_blocks.0.attn1.to_k", "transformer_blocks.0.attn1.to_out.0", "transformer_blocks.1.norm1.linear"]
    lora = make_lora(model.net, names)
    dtypes = {}
    handles = [model.net.get_submodule(n).register_forward_hook(lambda m, a, out, n=n: dtypes.__setitem__(n, out.dtype))
               for n in names]
    diffpro.load_lora(model, peft_keys(lora))
    assert_float_delta(model, lora, {n: 1.0 for n in names})
    for h in handles:
        h.remove()
    assert set(dtypes.values()) == {torch.float32}     # the integer layers' own outputs stay float32


def test_older_diffusers_lora_spellings_load_like_peft(unet_dir, dit_dir):
    """Bug caught: the LoRA files diffusers wrote before PEFT (`<module>.lora.down.weight` / `lora.up.weight`
    of LoRACompatibleLinear/Conv, and the attention-processor files `<attn>.processor.to_q_lora.down.weight`,
    to_out_lora meaning to_out.0) were refused as unreadable."""
    model = diffpro.load(unet_dir)
    lora = make_lora(model.net, UNET_TARGETS, seed=3)
    assert sorted(diffpro.load_lora(model, old_diffusers_keys(lora, "unet."))) == sorted(UNET_TARGETS)
    assert_float_delta(model, lora, {n: 1.0 for n in lora})

    model = diffpro.load(dit_dir)
    attn = "transformer_blocks.1.attn1"
    names = [f"{attn}.to_q", f"{attn}.to_v", f"{attn}.to_out.0"]
    lora = make_lora(model.net, names, seed=4)
    sd = {}
    for n, (a, b) in lora.items():
        leaf = n[len(attn) + 1:].replace("to_out.0", "to_out")
        sd[f"{attn}.processor.{leaf}_lora.down.weight"], sd[f"{attn}.processor.{leaf}_lora.up.weight"] = a, b
    assert sorted(diffpro.load_lora(model, sd, scale=0.5)) == sorted(names)
    assert_float_delta(model, lora, {n: 0.5 for n in lora})


def test_one_matrix_under_two_spellings_fails_with_one_line():
    """A.k.a. a file mixing PEFT and older diffusers keys for one layer: one matrix would replace the other."""
    net = nn.Sequential(nn.Linear(8, 16))
    sd = {"0.lora_A.weight": torch.randn(2, 8), "0.lora_B.weight": torch.randn(16, 2), "0.lora.down.weight": torch.randn(2, 8)}
    with pytest.raises(InputError, match="twice") as err:
        diffpro.load_lora(net, sd)
    assert "\n" not in err.value.message and not hasattr(net[0], "lora")


@pytest.mark.parametrize("te_keys", [
    {"text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(3, 32),
     "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(32, 3)},
    {"lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(3, 32),
     "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(32, 3),
     "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.alpha": torch.tensor(3.0)},
])
def test_a_lora_that_also_adapts_the_text_encoder_says_so(unet_dir, te_keys):
    """Bug caught: an SD-style LoRA (U-Net + text-encoder keys, the common case) failed with "names module(s)
    this network does not have ... load a LoRA made for this model", wrong advice for a LoRA made for it."""
    model = diffpro.load(unet_dir)
    lora = make_lora(model.net, UNET_TARGETS[:2])
    with pytest.raises(InputError, match="text encoder") as err:
        diffpro.load_lora(model, peft_keys(lora, "unet.") | te_keys)
    assert "\n" not in err.value.message and "made for this model" not in err.value.message
    assert not any(hasattr(m, "lora") for m in model.net.modules())
    # the advised fix works: the denoiser's part alone loads
    assert sorted(diffpro.load_lora(model, peft_keys(lora, "unet."))) == sorted(UNET_TARGETS[:2])


def test_a_1x1_conv_shaped_lora_on_a_linear_layer_loads(dit_dir):
    """Bug caught: kohya saves the LoRA of SD's proj_in/proj_out as 1×1 convs ([r, in, 1, 1]) even where the
    model has Linear layers there (SD2/SDXL); the shapes were refused as not fitting, though they are the
    same matrices (the 2-D-on-1×1-conv direction already loaded)."""
    model = diffpro.load(dit_dir)
    names = ["transformer_blocks.0.attn1.to_out.0", "proj_out_2"]
    lora = make_lora(model.net, names)
    sd = {}
    for n, (a, b) in lora.items():
        k = "lora_unet_" + n.replace(".", "_")
        sd[f"{k}.lora_down.weight"], sd[f"{k}.lora_up.weight"] = a[:, :, None, None], b[:, :, None, None]
    assert sorted(diffpro.load_lora(model, sd)) == sorted(names)
    assert_float_delta(model, lora, {n: 1.0 for n in names})
