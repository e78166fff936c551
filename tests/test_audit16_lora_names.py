"""LoRA files in kohya's own module names (audit 16): the original LDM/SGM U-Net names of SD 1.x / SDXL
files (`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`) and BFL's FLUX names
(`lora_unet_double_blocks_0_img_attn_qkv`), loaded onto U-Nets / a FLUX transformer quantized W8A8 in process.

The kohya names are written the way kohya derives them from the LDM model (the reverse of diffusers'
converter): LDM's input_blocks.i is diffusers' down_blocks.(i-1)//(L+1), layer (i-1)%(L+1) with L =
layers_per_block, [0] its ResBlock and [1] its SpatialTransformer (a lone [0].op: the Downsample);
output_blocks.i is up_blocks.i//(L+1), layer i%(L+1), its Upsample last ([1].conv without attention,
[2].conv with); middle_block.0/1/2 = mid_block resnets.0 / attentions.0 / resnets.1; inside a ResBlock
in_layers.2 = conv1, out_layers.3 = conv2, emb_layers.1 = time_emb_proj, skip_connection = conv_shortcut;
input_blocks.0.0 = conv_in, out.2 = conv_out, time_embed.0 = time_embedding.linear_1, label_emb.0.0 =
add_embedding.linear_1. The tables below are that correspondence for the tiny configs; the reference for
each layer is the float merged update (test_audit16_lora.merged_delta) of the tensors written to the file."""

import builtins

import pytest
import torch
from safetensors.torch import save_file
from test_audit16_lora import base_output, merged_delta
from test_lora import lora_pair
from torch import nn

import diffpro
from diffpro_cli.errors import InputError
from diffpro_cli.quant.layers import QuantConv2d, QuantLinear

# kohya LDM name (after lora_unet_) → diffusers module, SD-1.5-like U-Net: layers_per_block 2, blocks
# (CrossAttnDown, Down) / (Up, CrossAttnUp), 1×1-conv proj_in/proj_out
SD15 = {"input_blocks_1_1_transformer_blocks_0_attn1_to_q": "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
        "input_blocks_2_1_proj_in": "down_blocks.0.attentions.1.proj_in",                     # 1×1 conv
        "input_blocks_2_0_emb_layers_1": "down_blocks.0.resnets.1.time_emb_proj",
        "input_blocks_3_0_op": "down_blocks.0.downsamplers.0.conv",                          # 3×3 stride 2
        "input_blocks_4_0_skip_connection": "down_blocks.1.resnets.0.conv_shortcut",
        "input_blocks_5_0_in_layers_2": "down_blocks.1.resnets.1.conv1",                     # kept in float
        "middle_block_1_transformer_blocks_0_attn2_to_k": "mid_block.attentions.0.transformer_blocks.0.attn2.to_k",
        "middle_block_1_transformer_blocks_0_ff_net_0_proj": "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj",
        "middle_block_2_out_layers_3": "mid_block.resnets.1.conv2",
        "output_blocks_2_1_conv": "up_blocks.0.upsamplers.0.conv",                           # Upsample at [1]
        "output_blocks_3_1_transformer_blocks_0_attn1_to_out_0": "up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0",
        "output_blocks_5_1_proj_out": "up_blocks.1.attentions.2.proj_out",
        "out_2": "conv_out",
        "time_embed_0": "time_embedding.linear_1"}
SD15_FLOAT = "down_blocks.1.resnets.1.conv1"
# SDXL-like: (Down, CrossAttnDown) / (CrossAttnUp, Up), 2 transformer blocks per attention, Linear proj_in,
# text_time added conditioning (label_emb)
SDXL = {"input_blocks_0_0": "conv_in",
        "input_blocks_1_0_in_layers_2": "down_blocks.0.resnets.0.conv1",
        "input_blocks_3_0_op": "down_blocks.0.downsamplers.0.conv",
        "input_blocks_4_1_transformer_blocks_1_attn1_to_v": "down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_v",
        "input_blocks_5_1_proj_in": "down_blocks.1.attentions.1.proj_in",                     # Linear, 1×1-conv pair
        "middle_block_0_emb_layers_1": "mid_block.resnets.0.time_emb_proj",
        "middle_block_1_transformer_blocks_1_attn2_to_q": "mid_block.attentions.0.transformer_blocks.1.attn2.to_q",
        "output_blocks_1_1_transformer_blocks_0_ff_net_2": "up_blocks.0.attentions.1.transformer_blocks.0.ff.net.2",
        "output_blocks_2_2_conv": "up_blocks.0.upsamplers.0.conv",                           # Upsample at [2]
        "output_blocks_3_0_skip_connection": "up_blocks.1.resnets.0.conv_shortcut",
        "output_blocks_5_0_out_layers_3": "up_blocks.1.resnets.2.conv2",
        "label_emb_0_0": "add_embedding.linear_1",
        "out_2": "conv_out"}


def _tiny_unet(xl: bool):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    common = {"sample_size": 8, "in_channels": 4, "out_channels": 4, "layers_per_block": 2, "block_out_channels": (32, 64),
              "cross_attention_dim": 32, "attention_head_dim": 8, "norm_num_groups": 8}
    if xl:
        return UNet2DConditionModel(**common, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=2,
                                    use_linear_projection=True, addition_embed_type="text_time",
                                    addition_time_embed_dim=8, projection_class_embeddings_input_dim=16 + 6 * 8).eval()
    return UNet2DConditionModel(**common, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")).eval()


def _w8a8(net, keep_float=()):
    """Every Linear/Conv2d W8A8 dynamic (integer kernels), `keep_float` left as float layers."""
    plan = {"layers": {n: {"weight_bits": 16 if n in keep_float else 8, "act_bits": 8, "act_mode": "dynamic"}
                       for n, m in net.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}}
    diffpro.quantize_(net, plan)
    return net


@pytest.fixture(scope="module")
def sd15():
    return _w8a8(_tiny_unet(False), keep_float=[SD15_FLOAT])


@pytest.fixture(scope="module")
def sdxl():
    return _w8a8(_tiny_unet(True))


def _run_unet(net):
    torch.manual_seed(1)
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([700, 40]), torch.randn(2, 5, 32)
    extra = {}
    if net.config.addition_embed_type == "text_time":
        extra = {"added_cond_kwargs": {"text_embeds": torch.randn(2, 16), "time_ids": torch.randn(2, 6)}}
    return net(x, t, encoder_hidden_states=ctx, **extra).sample


def _kohya_file(net, table, rank=3, alpha=1.5, seed=0, conv_shaped=()):
    """{kohya key: fp16 tensor} for `table`, and {module: (A, B)} as float read back from fp16. kohya saves
    conv LoRAs as [r, in, kh, kw] / [out, r, 1, 1]; `conv_shaped` Linear layers get 1×1-conv pairs (as kohya
    saves proj_in/proj_out)."""
    g = torch.Generator().manual_seed(seed)
    sd, lora = {}, {}
    for kohya, module in table.items():
        a, b = lora_pair(net.get_submodule(module), rank, g, 0.1)
        a, b = a.half(), b.half()
        lora[module] = (a.float(), b.float())
        if module in conv_shaped:
            a, b = a[:, :, None, None], b[:, :, None, None]
        key = f"lora_unet_{kohya}"
        sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"] = a, b
        sd[f"{key}.alpha"] = torch.tensor(alpha, dtype=torch.float16)
    return sd, lora


def _layer_errors(net, run, lora, scaling):
    """One forward with the LoRA loaded; per adapted layer, max |(out − base(x)) − float merged delta| relative
    to max |float delta|, on the layer's own captured input."""
    seen = {}
    handles = [net.get_submodule(n).register_forward_hook(
        lambda m, args, out, n=n: seen.__setitem__(n, (args[0].detach().clone(), out.detach().clone()))) for n in lora]
    try:
        with torch.no_grad():
            run(net)
    finally:
        for h in handles:
            h.remove()
    errors = {}
    with torch.no_grad():
        for n, (a, b) in lora.items():
            layer = net.get_submodule(n)
            x, out = seen[n]
            want = merged_delta(layer, x, a, b, scaling[n] if isinstance(scaling, dict) else scaling)
            got = out.double() - base_output(layer, x).double()
            assert float(want.abs().max()) > 1e-3 * float(out.abs().max()), n      # the delta is not negligible
            errors[n] = float((got - want).abs().max() / want.abs().max())
    return errors


def _no_adapters(net):
    return not any(hasattr(m, "lora") for m in net.modules())


# ---------------------------------------------------------------------------------------------
# Defects found: each test failed before lora_names.py ("names N module(s) this network does not have")
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("xl", [False, True], ids=["sd15", "sdxl"])
def test_kohya_ldm_named_lora_lands_on_the_right_layers_with_the_float_merged_delta(sd15, sdxl, tmp_path, xl):
    """Bug caught: kohya's LDM/SGM-named U-Net LoRAs (most SD 1.5 / SDXL community files) were refused. Also
    catches a name mapped to the wrong layer (the returned names are the table's), the SD-1.x Upsample at
    output_blocks.i.1 (diffusers' map reads [1] as an attention), alpha/r or scale lost, a conv geometry or
    a 1×1-conv pair on a Linear proj_in read wrongly."""
    net, table = (sdxl, SDXL) if xl else (sd15, SD15)
    assert isinstance(net.get_submodule(table["input_blocks_3_0_op"]), QuantConv2d)
    assert xl or type(net.get_submodule(SD15_FLOAT)) is nn.Conv2d
    conv_shaped = [SDXL["input_blocks_5_1_proj_in"]] if xl else []
    assert not xl or isinstance(net.get_submodule(conv_shaped[0]), QuantLinear)
    sd, lora = _kohya_file(net, table, conv_shaped=conv_shaped)
    save_file(sd, str(tmp_path / "kohya.safetensors"))
    try:
        names = diffpro.load_lora(net, tmp_path / "kohya.safetensors", scale=0.8)
        assert sorted(names) == sorted(table.values())
        errors = _layer_errors(net, _run_unet, lora, 0.8 * 1.5 / 3)
        assert max(errors.values()) <= 1e-5, errors
    finally:
        diffpro.unload_lora(net)


def test_ldm_and_diffusers_flattened_names_in_one_file_both_load(sd15):
    """Bug caught (in diffusers' whole-file map, avoided here): a file holding both input_blocks_* and
    down_blocks_* names had its LDM keys dropped silently. The same layer under both names is refused."""
    ldm = dict(list(SD15.items())[:3])
    flat = {m.replace(".", "_"): m for m in list(SD15.values())[3:6]}
    sd, lora = _kohya_file(sd15, ldm | flat, alpha=3.0)
    try:
        assert sorted(diffpro.load_lora(sd15, sd)) == sorted(lora)
        errors = _layer_errors(sd15, _run_unet, lora, 1.0)
        assert max(errors.values()) <= 1e-5, errors
    finally:
        diffpro.unload_lora(sd15)
    module = SD15["input_blocks_1_1_transformer_blocks_0_attn1_to_q"]
    twice, _ = _kohya_file(sd15, {"input_blocks_1_1_transformer_blocks_0_attn1_to_q": module,
                                  module.replace(".", "_"): module})
    with pytest.raises(InputError, match="more than once|twice") as err:
        diffpro.load_lora(sd15, twice)
    assert "\n" not in err.value.message and _no_adapters(sd15)


_RESNET_LDM = {"conv1": "in_layers_2", "conv2": "out_layers_3", "time_emb_proj": "emb_layers_1", "conv_shortcut": "skip_connection"}
_TOP_LDM = {"conv_in": "input_blocks_0_0", "conv_out": "out_2", "time_embedding.linear_1": "time_embed_0",
            "time_embedding.linear_2": "time_embed_2", "add_embedding.linear_1": "label_emb_0_0",
            "add_embedding.linear_2": "label_emb_0_2"}


def ldm_name(module: str, net, per_block: int = 2) -> str:
    """The kohya LDM name (after lora_unet_) of a diffusers U-Net module: the module docstring's correspondence."""
    if module in _TOP_LDM:
        return _TOP_LDM[module]
    p = module.split(".")
    if p[0] == "mid_block":
        index = {("resnets", "0"): 0, ("attentions", "0"): 1, ("resnets", "1"): 2}[(p[1], p[2])]
        return f"middle_block_{index}_" + (_RESNET_LDM[p[3]] if p[1] == "resnets" else "_".join(p[3:]))
    b, kind = int(p[1]), p[2]
    if kind == "downsamplers":
        return f"input_blocks_{b * (per_block + 1) + per_block + 1}_0_op"
    if kind == "upsamplers":
        return f"output_blocks_{b * (per_block + 1) + per_block}_{2 if hasattr(net.up_blocks[b], 'attentions') else 1}_conv"
    i = b * (per_block + 1) + int(p[3]) + (1 if p[0] == "down_blocks" else 0)
    inner = f"0_{_RESNET_LDM[p[4]]}" if kind == "resnets" else "1_" + "_".join(p[4:])
    return f"{'input' if p[0] == 'down_blocks' else 'output'}_blocks_{i}_{inner}"


@pytest.mark.parametrize("xl", [False, True], ids=["sd15", "sdxl"])
def test_every_layer_of_the_unet_loads_under_its_ldm_name(sd15, sdxl, xl):
    """All Linear/Conv2d layers of the tiny U-Nets (121 / 183), each under its LDM name: catches any layer kind
    the tables above leave out (attn2 k/v/out, ff.net.2, proj_out, time_embed_2, label_emb_0_2,
    every resnet part in every block) mapped to another layer or refused."""
    net = sdxl if xl else sd15
    layers = [n for n, m in net.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d, QuantLinear, QuantConv2d))]
    sd, lora = _kohya_file(net, {ldm_name(n, net): n for n in layers}, seed=7)
    try:
        assert sorted(diffpro.load_lora(net, sd)) == sorted(layers)
        errors = _layer_errors(net, _run_unet, lora, 1.5 / 3)
        assert max(errors.values()) <= 1e-5, max(errors.items(), key=lambda kv: kv[1])
    finally:
        diffpro.unload_lora(net)


TE_KEYS = {"lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(3, 32, dtype=torch.float16),
           "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(32, 3, dtype=torch.float16),
           "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.alpha": torch.tensor(3.0),
           "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(3, 32, dtype=torch.float16),
           "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(64, 3, dtype=torch.float16)}


def test_a_kohya_file_with_text_encoder_parts_is_refused_or_loads_its_unet_part_when_asked(sdxl, tmp_path):
    """The common SDXL file: U-Net keys in LDM names plus lora_te1_/lora_te2_ keys. By default one error line
    saying load_lora adapts the denoiser only and naming the option (nothing attached); with
    ignore_text_encoder=True the U-Net part loads exactly as the U-Net-only file does. Catches the LDM
    names reported as unknown next to the text-encoder ones, and text-encoder keys silently dropped."""
    sd, lora = _kohya_file(sdxl, dict(list(SDXL.items())[2:6]))
    save_file(sd | TE_KEYS, str(tmp_path / "mixed.safetensors"))
    with pytest.raises(InputError, match="text encoder") as err:
        diffpro.load_lora(sdxl, tmp_path / "mixed.safetensors")
    message = err.value.message
    assert "\n" not in message and "ignore_text_encoder=True" in message and "other module" not in message
    assert _no_adapters(sdxl)
    try:
        assert sorted(diffpro.load_lora(sdxl, tmp_path / "mixed.safetensors", ignore_text_encoder=True)) == sorted(lora)
        errors = _layer_errors(sdxl, _run_unet, lora, 1.5 / 3)
        assert max(errors.values()) <= 1e-5, errors
    finally:
        diffpro.unload_lora(sdxl)
    with pytest.raises(InputError, match="only a text encoder"):
        diffpro.load_lora(sdxl, TE_KEYS, ignore_text_encoder=True)


def test_ldm_names_without_a_usable_converter_or_layer_fail_with_one_line(sd15, monkeypatch):
    """A kohya LDM name that maps to no layer of this U-Net is named as the file spells it; without diffusers'
    converter (missing, or a version without these private functions) the error names the version that reads
    the format. Nothing is attached either way."""
    sd, _ = _kohya_file(sd15, {"input_blocks_1_1_transformer_blocks_0_attn1_to_q": SD15["input_blocks_1_1_transformer_blocks_0_attn1_to_q"]})
    extra, _ = _kohya_file(sd15, {"input_blocks_1_1_transformer_blocks_0_attn1_to_q": SD15["input_blocks_1_1_transformer_blocks_0_attn1_to_q"]})
    wrong = {k.replace("input_blocks_1_1_transformer_blocks_0", "input_blocks_8_1_transformer_blocks_0"): v for k, v in extra.items()}
    with pytest.raises(InputError, match="does not have") as err:
        diffpro.load_lora(sd15, sd | wrong)
    assert "lora_unet_input_blocks_8_1_transformer_blocks_0_attn1_to_q" in err.value.message and _no_adapters(sd15)

    real_import = builtins.__import__

    def no_converter(name, *args, **kwargs):
        if name.startswith("diffusers.loaders"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_converter)
    with pytest.raises(InputError, match="diffusers==0.42.1") as err:
        diffpro.load_lora(sd15, sd)
    assert "\n" not in err.value.message and "lora_unet_input_blocks_1_1" in err.value.message and _no_adapters(sd15)


# ---------------------------------------------------------------------------------------------
# FLUX: kohya's BFL names (double_blocks / single_blocks), fused q/k/v split onto the diffusers layers
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def flux():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    net = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
                                 num_attention_heads=2, joint_attention_dim=12, pooled_projection_dim=10,
                                 guidance_embeds=False, axes_dims_rope=(2, 2, 4)).eval()
    return _w8a8(net)


def _run_flux(net):
    torch.manual_seed(2)
    img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1).reshape(-1, 3)
    return net(hidden_states=torch.randn(2, 16, 16), encoder_hidden_states=torch.randn(2, 5, 12),
               pooled_projections=torch.randn(2, 10), timestep=torch.tensor([0.7, 0.1]), img_ids=img_ids,
               txt_ids=torch.zeros(5, 3)).sample


def test_kohya_flux_lora_splits_fused_qkv_onto_the_diffusers_layers_with_its_alpha(flux):
    """Bug caught: kohya FLUX LoRAs (lora_unet_double_blocks_0_img_attn_qkv, ...) were refused. img_attn_qkv is
    one [3·16, r] up matrix over to_q/to_k/to_v (rows split, A shared); txt_attn_qkv is written block-diagonal
    (rank 6 = 3 × 2, as kohya's split-qkv option does; diffusers then splits A too). Catches rows assigned to
    the wrong projection, alpha/r applied to the split rank, and final_layer's alpha dropped (diffusers'
    converter ignores it)."""
    g = torch.Generator().manual_seed(5)
    r, alpha = 6, 2.0
    sd, want = {}, {}

    def add(kohya, down, up, targets, a=alpha):
        """targets: [(module, first row of up, rows)]: each module's delta is a/r · up[rows] @ down."""
        sd[f"lora_unet_{kohya}.lora_down.weight"], sd[f"lora_unet_{kohya}.lora_up.weight"] = down, up
        sd[f"lora_unet_{kohya}.alpha"] = torch.tensor(a)
        for module, start, rows in targets:
            want[module] = (down, up[start:start + rows], a / r)

    def rnd(*shape):
        return torch.randn(*shape, generator=g) * 0.1

    add("double_blocks_0_img_attn_qkv", rnd(r, 16), rnd(48, r),
        [(f"transformer_blocks.0.attn.to_{p}", 16 * i, 16) for i, p in enumerate("qkv")])
    sparse = torch.zeros(48, r)
    for i in range(3):
        sparse[16 * i:16 * (i + 1), 2 * i:2 * (i + 1)] = rnd(16, 2)
    add("double_blocks_0_txt_attn_qkv", rnd(r, 16), sparse,
        [(f"transformer_blocks.0.attn.add_{p}_proj", 16 * i, 16) for i, p in enumerate("qkv")])
    add("double_blocks_0_img_attn_proj", rnd(r, 16), rnd(16, r), [("transformer_blocks.0.attn.to_out.0", 0, 16)])
    add("double_blocks_0_img_mlp_0", rnd(r, 16), rnd(64, r), [("transformer_blocks.0.ff.net.0.proj", 0, 64)])
    add("single_blocks_0_linear2", rnd(r, 80), rnd(16, r), [("single_transformer_blocks.0.proj_out", 0, 16)])
    add("final_layer_linear", rnd(r, 16), rnd(16, r), [("proj_out", 0, 16)], a=3.0)
    try:
        assert sorted(diffpro.load_lora(flux, sd, scale=0.5)) == sorted(want)
        lora = {m: (a, b) for m, (a, b, _) in want.items()}
        errors = _layer_errors(flux, _run_flux, lora, {m: 0.5 * s for m, (_, _, s) in want.items()})
        assert max(errors.values()) <= 1e-5, errors
    finally:
        diffpro.unload_lora(flux)


def test_a_kohya_flux_name_diffusers_cannot_convert_fails_with_one_line(flux):
    """diffusers splits single_blocks linear1 (q, k, v, mlp) at FLUX.1's widths only: on another width its bare
    assert raised AssertionError with no message; here one line naming the key and the cause."""
    sd = {"lora_unet_single_blocks_0_linear1.lora_down.weight": torch.zeros(4, 16),
          "lora_unet_single_blocks_0_linear1.lora_up.weight": torch.zeros(112, 4)}
    with pytest.raises(InputError, match="single_blocks_0_linear1.*FLUX.1") as err:
        diffpro.load_lora(flux, sd)
    assert "\n" not in err.value.message and _no_adapters(flux)
