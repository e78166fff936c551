"""Audit 16, the model families end to end as a new user (docs/families/*.md followed literally on tiny
in-process pipelines): one regression test per defect found."""

import json
import re
from pathlib import Path

import pytest
import torch
import typer

from diffpro_cli.app import app

ROOT = Path(__file__).resolve().parents[1]


# --- the family recipes ------------------------------------------------------------------------------


def _recipe_commands(path: Path):
    """(line, command name, argument words) of every `diffpro ...` line in a family doc's bash blocks."""
    in_code = False
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip().startswith("```"):
            in_code = not in_code
            continue
        m = re.match(r"\s*diffpro\s+([a-z-]+)(.*)", line) if in_code else None
        if m:
            yield number, m.group(1), m.group(2).split("#")[0].split()


def test_family_recipes_pass_the_model_only_where_the_command_takes_one():
    """Catches: every family recipe ran `diffpro allocate "$PIPE" ...`, whose one argument is scores.json, so
    a new user's allocate stopped with '<pipeline>: no such file' and quantize/sample/export after it
    failed in turn (allocate reads the model from the workdir that profile made)."""
    commands = typer.main.get_command(app).commands
    wrong = []
    for doc in sorted((ROOT / "docs" / "families").glob("*.md")):
        for number, name, words in _recipe_commands(doc):
            args = [p.name for p in commands[name].params if p.param_type_name == "argument"]
            if '"$PIPE"' in words and args[:1] != ["model"]:
                wrong.append(f"{doc.name}:{number}: diffpro {name} takes {args}, not the pipeline")
    assert not wrong, "\n".join(wrong)


# --- diffusers' from_pretrained on an export planned for bf16 ----------------------------------------


@pytest.mark.skipif(__import__("importlib").util.find_spec("accelerate") is None, reason="needs accelerate")
def test_from_pretrained_of_a_bf16_planned_export_computes_as_diffpro_load(tmp_path, tiny_dit):
    """Catches: a plan whose compute_dtype is bfloat16 (allocate picks it where the float math is faster in
    bf16) exported to diffusers and loaded with from_pretrained ran its float math in float32, while
    diffpro.load(OUT).net runs it under bf16 autocast: the two 'same' networks differed (5.6 max abs on a
    tiny PixArt pipeline's latents)."""
    from diffusers import DiTTransformer2DModel

    import diffpro
    from diffpro_cli.checkpoint import save_quantized
    from diffpro_cli.export import export_diffusers
    from diffpro_cli.models.diffusers_dir import load_diffusers_dir
    from diffpro_cli.stages.quantize import uniform_plan

    tiny_dit().save_pretrained(tmp_path / "dit")
    model = load_diffusers_dir(tmp_path / "dit")
    save_quantized(model, uniform_plan(model, 8) | {"compute_dtype": "bfloat16"}, tmp_path / "q")
    export_diffusers(tmp_path / "q", tmp_path / "out")
    diffpro.register_diffusers_quantizer()
    ours, theirs = diffpro.load(str(tmp_path / "out"), cache=False).net, DiTTransformer2DModel.from_pretrained(tmp_path / "out")
    torch.manual_seed(1)
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        a = ours(x, timestep=torch.tensor([900, 30]), class_labels=torch.tensor([1, 2])).sample
        b = theirs(x, timestep=torch.tensor([900, 30]), class_labels=torch.tensor([1, 2])).sample
        theirs.__dict__.pop("_diffpro_compute_dtype", None)    # the float32 math the bug ran
        c = theirs(x, timestep=torch.tensor([900, 30]), class_labels=torch.tensor([1, 2])).sample
    assert torch.equal(a, b)
    assert not torch.equal(a, c)     # bf16 really changes the output, so the equality above means something


# --- conditioning files: a wrong shape is one error line, exit 3, nothing written -----------------------


def _error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    return lines[0]


def _sample_with(cli, model, tmp_path, name, tensors):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / f"{name}.safetensors"))
    out = tmp_path / name / "s.png"
    code, _, err = cli("sample", model, "--conditioning", tmp_path / f"{name}.safetensors", "--n", 2, "--steps", 1, "--batch", 2,
                       "--out", out, "--quiet")
    return code, err, out


def test_sdxl_added_condition_widths_are_checked_against_the_unet(tmp_path, cli):
    """Catches: an SDXL conditioning file whose pooled text_embeds width or time-id count does not fit the
    U-Net's add_embedding (projection_class_embeddings_input_dim = pooled + 6 × addition_time_embed_dim) got
    through the shape check (both fields were [None]) and stopped in the U-Net with a 'mat1 and mat2 shapes
    cannot be multiplied' traceback, exit 1; the right widths still sample."""
    from diffusers import EulerDiscreteScheduler
    from test_prompts import sd_unet
    from test_text_loaders import _pipeline

    unet = sd_unet(cross=16, addition_embed_type="text_time", addition_time_embed_dim=4, projection_class_embeddings_input_dim=4 + 6 * 4)
    xl = _pipeline(tmp_path / "xl", "unet", unet, EulerDiscreteScheduler(), cls="StableDiffusionXLPipeline")
    g = torch.Generator().manual_seed(0)
    pe, ids = torch.randn(2, 5, 16, generator=g), torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)
    code, err, out = _sample_with(cli, xl, tmp_path, "ok", {"prompt_embeds": pe, "added_cond_kwargs.text_embeds": torch.randn(2, 4, generator=g),
                                                           "added_cond_kwargs.time_ids": ids})
    assert code == 0 and out.is_file(), err
    for name, pooled, time_ids, words in (("wide", torch.randn(2, 5, generator=g), ids, "text_embeds has trailing shape [5]"),
                                          ("ids5", torch.randn(2, 4, generator=g), ids[:, :5], "six time ids")):
        code, err, out = _sample_with(cli, xl, tmp_path, name, {"prompt_embeds": pe, "added_cond_kwargs.text_embeds": pooled,
                                                                "added_cond_kwargs.time_ids": time_ids})
        assert code == 3 and words in _error_line(err), (name, err)
        assert not out.parent.exists(), name


def test_attention_masks_and_guidance_of_another_shape_are_one_error_line(tmp_path, cli):
    """Catches: a prompt_attention_mask whose length is not the embeddings' (PixArt, SANA) reached the
    attention as a 'size of tensor a (5) must match ... b (9)' traceback, and a FLUX guidance of shape [M, 1]
    as 'Timesteps should be a 1d-array' (exit 1 both); the loader now names the shapes (exit 3)."""
    from diffusers import DDIMScheduler
    from test_pipeline_parity import _flux_scheduler, _tiny_pixart
    from test_text_loaders import _embeds, _pipeline, _tiny_flux, flux_pipeline

    pixart = _pipeline(tmp_path / "pixart", "transformer", _tiny_pixart(), DDIMScheduler(), cls="PixArtSigmaPipeline")
    emb = _embeds(2, 5, 12)
    for name, mask in (("short", torch.ones(2, 4, dtype=torch.long)), ("3d", torch.ones(2, 5, 1, dtype=torch.long))):
        code, err, out = _sample_with(cli, pixart, tmp_path, name, emb | {"prompt_attention_mask": mask})
        assert code == 3 and "encoder_attention_mask has shape" in _error_line(err), (name, err)
        assert not out.parent.exists()
    code, err, out = _sample_with(cli, pixart, tmp_path, "negshort", emb | {
        "prompt_attention_mask": torch.ones(2, 5, dtype=torch.long), "negative_prompt_embeds": torch.zeros(1, 5, 12),
        "negative_prompt_attention_mask": torch.ones(1, 4, dtype=torch.long)})
    assert code == 3 and "negative_encoder_attention_mask" in _error_line(err), err
    flux = flux_pipeline(tmp_path / "flux", _tiny_flux(), _flux_scheduler())
    emb = _embeds(2, 5, 12, pooled=10)
    code, err, out = _sample_with(cli, flux, tmp_path, "g2d", emb | {"guidance": torch.full((2, 1), 3.5)})
    assert code == 3 and "guidance has shape (2, 1)" in _error_line(err), err
    code, err, out = _sample_with(cli, flux, tmp_path, "g1d", emb | {"guidance": torch.full((2,), 3.5)})
    assert code == 0 and out.is_file(), err


def test_pixart_alpha_size_conditions_are_a_documented_field_of_the_file(tmp_path, cli, capsys):
    """Catches: a PixArt-α 1024-style transformer (use_additional_conditions) given a conditioning file without
    added_cond_kwargs.resolution / aspect_ratio stopped inside adaln_single with "'NoneType' object has no
    attribute 'flatten'" (exit 1), and one with a flat resolution with a size-mismatch traceback; now one error
    line naming both fields and their shapes (exit 3). The file the doc describes, and --prompts (which fills
    them), still sample."""
    from diffusers import DDIMScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel
    from test_prompts import t5_encoder, t5_tokenizer, write_prompts

    torch.manual_seed(3)    # inner dim divisible by 3: adaln_single splits it among timestep, resolution and aspect ratio
    net = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=8, num_layers=1,
                                   cross_attention_dim=24, caption_channels=12, sample_size=8, patch_size=2,
                                   use_additional_conditions=True).eval()
    PixArtAlphaPipeline(tokenizer=t5_tokenizer(), text_encoder=t5_encoder(), vae=None, transformer=net,
                        scheduler=DDIMScheduler()).save_pretrained(tmp_path / "alpha")
    alpha = tmp_path / "alpha"
    capsys.readouterr()                 # the builders' own output is not the CLI's
    pe = torch.randn(2, 5, 12, generator=torch.Generator().manual_seed(0))
    sizes = {"added_cond_kwargs.resolution": torch.tensor([[64.0, 64.0]] * 2), "added_cond_kwargs.aspect_ratio": torch.tensor([[1.0]] * 2)}
    for name, extra, words in (("plain", {}, "needs added_cond_kwargs.resolution"),
                               ("flat", sizes | {"added_cond_kwargs.resolution": torch.tensor([64.0, 64.0])}, "resolution has trailing shape []")):
        code, err, out = _sample_with(cli, alpha, tmp_path, name, {"prompt_embeds": pe, **extra})
        line = _error_line(err)
        assert code == 3 and words in line and "aspect_ratio [M, 1]" in line, (name, err)
        assert not out.parent.exists()
    code, err, out = _sample_with(cli, alpha, tmp_path, "sized", {"prompt_embeds": pe, **sizes})
    assert code == 0 and out.is_file(), err
    code, _, err = cli("sample", alpha, "--prompts", write_prompts(tmp_path / "p.txt", ["a cat"]), "--n", 1, "--steps", 1,
                       "--out", tmp_path / "p" / "s.png", "--quiet")
    assert code == 0, err


# --- what `diffpro models` shows, as the recipes say ------------------------------------------------------

# a recipe comment's words → where `diffpro models --json` holds them (None: it does not)
_DESCRIBED = {"kind": "kind", "prediction type": "prediction_type", "sample shape": "sample_shape",
              "role": "layers", "class": None, "schedule": None, "conditioning fields": None}


def test_the_models_line_of_a_recipe_promises_only_what_the_command_prints(tmp_path, cli):
    """Catches: pixart.md's `diffpro models "$PIPE"  # class, schedule, conditioning fields, layer roles` while
    the command prints one line (kind, parameters, layer count, sample shape) and even --json has no schedule
    and no conditioning fields: the new user looked there for the file format and found nothing."""
    from diffusers import DDIMScheduler
    from test_pipeline_parity import _tiny_pixart
    from test_text_loaders import _pipeline

    pipe = _pipeline(tmp_path / "pixart", "transformer", _tiny_pixart(), DDIMScheduler(), cls="PixArtSigmaPipeline")
    code, out, err = cli("models", pipe, "--json")
    assert code == 0, err
    described = json.loads(out)
    assert described["layers"] and all(layer["role"] for layer in described["layers"])
    for doc in sorted((ROOT / "docs" / "families").glob("*.md")):
        for number, name, words in _recipe_commands(doc):
            line = doc.read_text().splitlines()[number - 1]
            comment = line.split("#", 1)[1].lower() if name == "models" and "#" in line else ""
            for term, key in _DESCRIBED.items():
                if re.search(rf"\b{term}\b", comment):
                    assert key is not None and key in described, f"{doc.name}:{number} promises {term!r}"
            if comment and "--json" not in words:
                assert "role" not in comment, f"{doc.name}:{number}: the roles are in --json only"


# --- U-Nets the loader cannot run are refused when loaded, not at the first step -------------------------


@pytest.mark.parametrize("extra", [{"addition_embed_type": "text"}, {"encoder_hid_dim": 10, "encoder_hid_dim_type": "text_proj"}],
                         ids=["addition-text", "encoder-hid-proj"])
def test_unet_variants_other_than_sd_and_sdxl_are_refused_with_one_line(tmp_path, cli, extra):
    """Catches: a UNet2DConditionModel of the IF / Kandinsky / UnCLIP kind (projected text, addition_embed_type
    'text') loaded as kind unet_cond, described by `diffpro models` (exit 0), and then every stage stopped at
    its first step with a shape traceback ('shape [2, -1, 64, 0] is invalid', 'mat1 and mat2 shapes cannot be
    multiplied'): docs/families/unet-sd.md covers SD 1.x/2.x and SDXL only."""
    from diffusers import DDIMScheduler
    from test_prompts import sd_unet
    from test_text_loaders import _pipeline

    pipe = _pipeline(tmp_path / "unet", "unet", sd_unet(cross=12, **extra), DDIMScheduler(), cls="StableDiffusionPipeline")
    code, _, err = cli("models", pipe)
    assert code == 3 and "is not supported" in _error_line(err) and "SDXL" in err, err


def test_guidance_without_negative_embeddings_names_the_cli_options(tmp_path, cli):
    """Catches: `--cfg 3` with a conditioning file that has no negative_* entries told the CLI user to 'use
    cfg_scale 1', an option no command has (the API's keyword); the line now names --cfg 1 and --prompts."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from test_text_loaders import _embeds, _pipeline, _tiny_sd3

    sd3 = _pipeline(tmp_path / "sd3", "transformer", _tiny_sd3(), FlowMatchEulerDiscreteScheduler(shift=3.0))
    from safetensors.torch import save_file

    save_file(_embeds(2, 5, 12, pooled=10), str(tmp_path / "e.safetensors"))
    code, _, err = cli("sample", sd3, "--conditioning", tmp_path / "e.safetensors", "--cfg", 3, "--n", 1, "--steps", 1,
                       "--out", tmp_path / "s.png", "--quiet")
    line = _error_line(err)
    assert code == 2 and "--cfg 1" in line and "--prompts" in line, line


def test_the_sdxl_refiner_is_refused_by_name(tmp_path, cli):
    """Catches: docs/families/unet-sd.md says the SDXL refiner is not supported, but its pipeline loaded as
    an SDXL U-Net: --prompts then blamed text_encoder_2 for the width (pooled + 6 time ids ≠ the U-Net's
    pooled + 5 aesthetic-score ids) and a file of the refiner's real 5 time ids was refused as a wrong
    count; the pipeline is now refused as the refiner (exit 3)."""
    from diffusers import EulerDiscreteScheduler
    from test_prompts import sd_unet
    from test_text_loaders import _pipeline

    unet = sd_unet(cross=16, addition_embed_type="text_time", addition_time_embed_dim=4, projection_class_embeddings_input_dim=4 + 5 * 4)
    refiner = _pipeline(tmp_path / "refiner", "unet", unet, EulerDiscreteScheduler(), cls="StableDiffusionXLImg2ImgPipeline")
    index = json.loads((refiner / "model_index.json").read_text())
    (refiner / "model_index.json").write_text(json.dumps(index | {"requires_aesthetics_score": True}))
    code, _, err = cli("models", refiner)
    assert code == 3 and "SDXL refiner" in _error_line(err), err


def test_prompts_on_a_checkpoint_whose_pipeline_moved_say_so(tmp_path, cli, capsys):
    """Catches: `sample QDIR --prompts` after the source pipeline was moved said the old path 'is not a diffusers
    pipeline directory (no model_index.json)', as if the user had quantized a bare model folder; the line now
    says the pipeline is no longer there and what to do (exit 3, nothing written)."""
    from test_prompts import sd_pipeline, write_prompts

    pipe = sd_pipeline(tmp_path / "sd")
    prompts = write_prompts(tmp_path / "p.txt", ["a cat"])
    capsys.readouterr()
    code, _, err = cli("quantize", pipe, "--bits", 8, "--prompts", prompts, "--workdir", tmp_path / "w", "--quiet")
    assert code == 0, err
    pipe.rename(tmp_path / "sd-moved")
    out = tmp_path / "o" / "s.png"
    code, _, err = cli("sample", tmp_path / "w" / "quantized", "--prompts", prompts, "--n", 1, "--steps", 1, "--out", out, "--quiet")
    line = _error_line(err)
    assert code == 3 and "no longer there" in line and "--conditioning FILE" in line, line
    assert not out.parent.exists()


def test_original_dit_shape_errors_name_the_file_and_a_fix_the_cli_user_can_use(tmp_path, cli):
    """Catches: an original-layout DiT checkpoint of an unpublished width stopped with 'hidden size 32 is not
    a published DiT size; pass heads= to load_original_dit': no file named, and a keyword no command takes;
    an MLP ratio other than 4 likewise named no file."""
    from test_loaders import random_original_state

    torch.save(random_original_state(hidden=32, depth=1, grid=4), tmp_path / "DiT-h32.pt")
    code, _, err = cli("models", tmp_path / "DiT-h32.pt")
    line = _error_line(err)
    assert code == 3 and str(tmp_path / "DiT-h32.pt") in line and "DiTTransformer2DModel folder" in line, line
    state = random_original_state(hidden=128, depth=1, grid=4)
    state |= {"blocks.0.mlp.fc1.weight": torch.zeros(256, 128), "blocks.0.mlp.fc1.bias": torch.zeros(256),
              "blocks.0.mlp.fc2.weight": torch.zeros(128, 256)}
    torch.save(state, tmp_path / "DiT-mlp2.pt")
    code, _, err = cli("models", tmp_path / "DiT-mlp2.pt")
    assert code == 3 and str(tmp_path / "DiT-mlp2.pt") in _error_line(err), err


def test_a_checkpoint_quantized_from_a_relative_pipeline_path_finds_its_encoders_from_elsewhere(tmp_path, cli, capsys,
                                                                                                 monkeypatch):
    """Catches: `diffpro quantize sd15 --prompts ...` (a relative pipeline path, as a new user types it) recorded
    source 'sd15', so `sample QDIR --prompts` run from any other directory could not find the text encoders
    (the VAE path was already absolute)."""
    from test_prompts import sd_pipeline, write_prompts

    sd_pipeline(tmp_path / "sd")
    prompts = write_prompts(tmp_path / "p.txt", ["a cat"])
    capsys.readouterr()
    monkeypatch.chdir(tmp_path)
    code, _, err = cli("quantize", "sd", "--bits", 8, "--prompts", prompts, "--workdir", "w", "--quiet")
    assert code == 0, err
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    code, _, err = cli("sample", tmp_path / "w" / "quantized", "--prompts", prompts, "--n", 1, "--steps", 1, "--out", "s.png",
                       "--quiet")
    assert code == 0, err


def test_inpainting_and_control_variants_are_refused_when_loaded(tmp_path, cli):
    """Catches: an SD inpainting U-Net (9 input channels: latents, mask, masked image; 4 out) and a FLUX Fill-style
    transformer (extra control channels) loaded as text-to-image models, so every stage sampled plain latents
    of the input width and died with 'The size of tensor a (9) must match the size of tensor b (4)' (exit 1)."""
    from diffusers import DDIMScheduler, FluxTransformer2DModel, UNet2DConditionModel
    from test_pipeline_parity import _flux_scheduler
    from test_text_loaders import _pipeline, flux_pipeline

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=9, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                cross_attention_dim=16, attention_head_dim=4, norm_num_groups=4).eval()
    fill = FluxTransformer2DModel(patch_size=1, in_channels=48, out_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
                                  num_attention_heads=2, joint_attention_dim=12, pooled_projection_dim=10, axes_dims_rope=(2, 2, 4)).eval()
    for pipe in (_pipeline(tmp_path / "inpaint", "unet", unet, DDIMScheduler(), cls="StableDiffusionInpaintPipeline"),
                 flux_pipeline(tmp_path / "fill", fill, _flux_scheduler())):
        code, _, err = cli("models", pipe)
        line = _error_line(err)
        assert code == 3 and "out_channels" in line and "not supported" in line, line


def test_sd35_second_self_attention_is_labelled_self_attention(tmp_path):
    """Catches: SD3.5-medium's attn2 (MMDiT-X dual attention: a second image self-attention) labelled
    cross_attn_* because every `.attn2.` was taken for cross-attention to the text (sd3.md listed it as a
    known mislabel in every report); PixArt's attn2 stays cross-attention."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from test_text_loaders import _pipeline

    from diffpro_cli.models.diffusers_dir import load_diffusers_dir

    torch.manual_seed(0)
    net = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
                                joint_attention_dim=12, caption_projection_dim=16, pooled_projection_dim=10, out_channels=4,
                                pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm").eval()
    model = load_diffusers_dir(_pipeline(tmp_path / "sd35", "transformer", net, FlowMatchEulerDiscreteScheduler(shift=3.0)))
    roles = {name: role for name, (_, role) in model.quantizable_layers().items()}
    assert roles["transformer_blocks.0.attn2.to_q"] == "attn_qkv" and roles["transformer_blocks.0.attn2.to_out.0"] == "attn_out"
    assert roles["transformer_blocks.0.attn.add_q_proj"] == "cross_attn_qkv"
    from diffpro_cli.models.roles import layer_role

    assert layer_role("pixart", "transformer_blocks.0.attn2.to_k", torch.nn.Linear(2, 2)) == "cross_attn_qkv"


def test_a_text_model_called_without_conditioning_names_both_ways_to_give_it():
    """The sampler's and eps()'s line named only --conditioning FILE (prompt embeddings), not --prompts,
    the way most users give prompts."""
    import dataclasses

    import torch

    from diffpro_cli.errors import UsageError
    from diffpro_cli.loading import load_model
    from diffpro_cli.sampling import default_labels

    m = load_model("builtin:flow-mnist")
    bare = dataclasses.replace(m, conditioning_set=None)   # a text model without its shipped prompt set
    for call in (lambda: default_labels(bare, 1), lambda: m.eps(torch.randn(1, *m.sample_shape), torch.tensor([500]))):
        with pytest.raises(UsageError) as err:
            call()
        assert "--prompts FILE" in err.value.message and "--conditioning FILE" in err.value.message


def test_bench_of_a_text_model_without_conditioning_fails_before_writing_baselines(tmp_path, cli, capsys):
    """Catches: the missing --prompts / --conditioning surfaced at the first model call, after bench had
    quantized and written the uniform baseline checkpoints into the workdir."""
    from test_prompts import sd_pipeline

    pipe = sd_pipeline(tmp_path / "sd")
    capsys.readouterr()
    work = tmp_path / "w"
    code, _, err = cli("bench", pipe, "-w", work, "--rows", "w8a8-uniform,fp32", "--repeats", 1, "--no-fid", "--quiet")
    line = _error_line(err)
    assert code == 2 and "--prompts FILE" in line and "--conditioning FILE" in line, err
    assert not (work / "bench" / "baselines").exists()
