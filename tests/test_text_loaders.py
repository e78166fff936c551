"""Diffusers directories of text-conditioned networks (SD3 flow, PixArt, UNet2DConditionModel v-prediction),
built tiny in process (save_pretrained into a temp dir, no downloads)."""

import json

import pytest
import torch

from diffpro_cli.models.conditioning import conditioning_from_tensors
from diffpro_cli.models.diffusers_dir import load_diffusers_dir
from diffpro_cli.sampling import SamplerConfig, sample, sample_generators, uniform_timesteps


def _pipeline(tmp_path, sub, net, scheduler, cls="TestPipeline"):
    net.save_pretrained(tmp_path / sub)
    scheduler.save_pretrained(tmp_path / "scheduler")
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": cls, sub: ["diffusers", type(net).__name__],
                                                          "scheduler": ["diffusers", type(scheduler).__name__]}))
    return tmp_path


def _tiny_sd3():
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                 num_attention_heads=2, joint_attention_dim=12, caption_projection_dim=16,
                                 pooled_projection_dim=10, out_channels=4, pos_embed_max_size=16).eval()


def _embeds(m, seq, dim, pooled=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {"prompt_embeds": torch.randn(m, seq, dim, generator=g)}
    if pooled:
        out["pooled_prompt_embeds"] = torch.randn(m, pooled, generator=g)
    return out


def test_sd3_pipeline_dir_is_a_flow_model_that_samples_like_flow_match_euler(tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler

    net = _tiny_sd3()
    path = _pipeline(tmp_path, "transformer", net, FlowMatchEulerDiscreteScheduler(shift=3.0))
    model = load_diffusers_dir(path)
    assert (model.prediction_type, model.flow_shift, model.kind, model.conditioning) == ("flow", 3.0, "sd3", "embeddings")
    assert model.sample_shape == (4, 8, 8)
    roles = {r for _, r in model.quantizable_layers().values()}
    assert {"attn_qkv", "cross_attn_qkv", "cross_attn_out", "context_embed", "time_embed", "adaln", "mlp", "final"} <= roles
    model.with_conditioning(conditioning_from_tensors(_embeds(2, 5, 12, pooled=10)))
    subset = uniform_timesteps(1000, 6)
    ours = sample(model, 2, subset, SamplerConfig(method="euler", clip_x0=False), seed=3, batch_size=2)
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(sigmas=[(i + 1) / 1000 for i in subset[::-1]])
    c = model.conditioning_set
    x = torch.stack([torch.randn(model.sample_shape, generator=g) for g in sample_generators(3, [0, 1])])
    with torch.no_grad():
        for t in sched.timesteps:   # diffusers' own call: float timestep σ·1000
            v = net(hidden_states=x, encoder_hidden_states=c.encoder_hidden_states, pooled_projections=c.pooled_projections,
                    timestep=t.expand(2), return_dict=False)[0]
            x = sched.step(v, t, x).prev_sample
    rel = ((ours - x).norm() / x.norm()).item()
    assert rel < 1e-5, rel
    bad = conditioning_from_tensors(_embeds(2, 5, 11, pooled=10))
    with pytest.raises(Exception, match="expects"):
        model.with_conditioning(bad)


def test_sd3_without_its_flow_scheduler_is_refused_and_dynamic_shifting_resolved_for_its_size(tmp_path):
    """Catches: an SD3 net loaded with a DDPM schedule (wrong model entirely); a dynamic-shift SD3.5-style scheduler
    sampled with shift 1 instead of the pipeline's exp(mu) for its patch count."""
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

    from diffpro_cli.errors import InputError

    net = _tiny_sd3()
    with pytest.raises(InputError, match="FlowMatchEulerDiscreteScheduler"):
        load_diffusers_dir(_pipeline(tmp_path / "a", "transformer", net, DDIMScheduler()))
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_image_seq_len=4, max_image_seq_len=64)
    model = load_diffusers_dir(_pipeline(tmp_path / "b", "transformer", net, sched))
    c = sched.config   # StableDiffusion3Pipeline's call for (8/2)² patches
    mu = calculate_shift(16, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096), c.get("base_shift", 0.5),
                         c.get("max_shift", 1.16))
    sched.set_timesteps(sigmas=[1.0, 0.75, 0.5, 0.25], mu=mu)
    assert model.config["dynamic_shift"]["image_seq_len"] == 16
    assert torch.allclose(model.sigmas()[[999, 749, 499, 249]].float(), sched.sigmas[:-1], atol=1e-6)


def _tiny_flux(guidance=True):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
                                  num_attention_heads=2, joint_attention_dim=12, pooled_projection_dim=10,
                                  guidance_embeds=guidance, axes_dims_rope=(2, 2, 4)).eval()


def flux_pipeline(tmp_path, net, scheduler, sample_size=8):
    """A FLUX pipeline directory; FLUX configs carry no sample size, so tests write one (latent pixels) into it."""
    path = _pipeline(tmp_path, "transformer", net, scheduler, cls="FluxPipeline")
    if sample_size is not None:
        cfg = json.loads((path / "transformer" / "config.json").read_text())
        (path / "transformer" / "config.json").write_text(json.dumps(cfg | {"sample_size": sample_size}))
    return path


def test_flux_dir_resolves_the_dynamic_shift_packs_latents_and_records_guidance(tmp_path):
    """Catches: mu computed from the wrong token count (unpacked pixels instead of 2×2 patches) or scheduler keys;
    timesteps passed as σ·1000 instead of σ (FLUX multiplies by 1000 itself); a wrong pack/unpack order; the
    guidance default lost, or a conditioning's own guidance ignored."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from diffpro_cli.errors import InputError
    from diffpro_cli.models.base import flux_image_ids, flux_pack, flux_unpack

    net = _tiny_flux()
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_image_seq_len=4, max_image_seq_len=64,
                                            base_shift=0.5, max_shift=1.15)
    model = load_diffusers_dir(flux_pipeline(tmp_path / "a", net, sched))
    assert (model.kind, model.prediction_type, model.sample_shape) == ("flux", "flow", (4, 8, 8))
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    mu = calculate_shift(16, 4, 64, 0.5, 1.15)    # FluxPipeline's call for (8/2)² packed tokens
    assert model.config["dynamic_shift"] == {"mu": pytest.approx(mu), "image_seq_len": 16, "time_shift_type": "exponential"}
    sched.set_timesteps(sigmas=[1.0, 0.75, 0.5, 0.25], mu=mu)   # FluxPipeline's call
    assert torch.allclose(model.sigmas()[[999, 749, 499, 249]].float(), sched.sigmas[:-1], atol=1e-6)
    roles = {name: r for name, (_, r) in model.quantizable_layers().items()}
    assert roles["x_embedder"] == "patch_embed" and roles["time_text_embed.guidance_embedder.linear_1"] == "time_embed"
    assert roles["single_transformer_blocks.0.proj_out"] == "attn_out" and roles["single_transformer_blocks.0.norm.linear"] == "adaln"
    x = torch.randn(2, 4, 8, 8)
    assert torch.equal(flux_unpack(flux_pack(x), 8, 8), x)
    emb = _embeds(2, 5, 12, pooled=10)
    t = torch.tensor([999, 249])
    with torch.no_grad():
        def ref(guidance):
            return flux_unpack(net(hidden_states=flux_pack(x), encoder_hidden_states=emb["prompt_embeds"],
                                   pooled_projections=emb["pooled_prompt_embeds"], timestep=model.sigmas()[t].float(),
                                   img_ids=flux_image_ids(8, 8), txt_ids=torch.zeros(5, 3), guidance=torch.full((2,), guidance),
                                   return_dict=False)[0], 8, 8)
        assert torch.allclose(model.velocity(x, t, conditioning_from_tensors(emb)), ref(3.5), atol=1e-6)
        with_g = conditioning_from_tensors(emb | {"guidance": torch.tensor([5.0, 5.0])})
        assert torch.allclose(model.velocity(x, t, with_g), ref(5.0), atol=1e-6)
    with pytest.raises(InputError, match="even"):
        load_diffusers_dir(flux_pipeline(tmp_path / "b", net, sched, sample_size=7))
    default = load_diffusers_dir(flux_pipeline(tmp_path / "c", _tiny_flux(False), sched, sample_size=None))
    assert default.sample_shape == (4, 128, 128) and "default_guidance" not in default.config["net_patches"]


def _tiny_sana():
    from diffusers import SanaTransformer2DModel

    torch.manual_seed(0)
    return SanaTransformer2DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
                                  num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16,
                                  caption_channels=12, sample_size=8, patch_size=1).eval()


def test_sana_dir_with_its_dpm_solver_flow_config_is_a_flow_model(tmp_path):
    """Catches: SANA's shipped DPMSolverMultistepScheduler(flow_prediction, use_flow_sigmas, flow_shift) read as a
    DDPM beta schedule (epsilon model, wrong sigmas) or its flow_shift ignored; the attention mask dropped."""
    from diffusers import DPMSolverMultistepScheduler

    net = _tiny_sana()
    sched = DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    model = load_diffusers_dir(_pipeline(tmp_path, "transformer", net, sched, cls="SanaPipeline"))
    assert (model.kind, model.prediction_type, model.flow_shift, model.sample_shape) == ("sana", "flow", 3.0, (4, 8, 8))
    roles = {name: r for name, (_, r) in model.quantizable_layers().items()}
    assert roles["time_embed.linear"] == "adaln" and roles["transformer_blocks.0.ff.conv_depth"] == "mlp"
    assert roles["transformer_blocks.0.attn2.to_q"] == "cross_attn_qkv" and roles["caption_projection.linear_1"] == "context_embed"
    emb = _embeds(2, 5, 12) | {"prompt_attention_mask": torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])}
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([999, 100])
    with torch.no_grad():
        ref = net(x, encoder_hidden_states=emb["prompt_embeds"], encoder_attention_mask=emb["prompt_attention_mask"],
                  timestep=model.sigmas()[t].float() * 1000, return_dict=False)[0]
        assert torch.allclose(model.velocity(x, t, conditioning_from_tensors(emb)), ref, atol=1e-6)


def test_pixart_dir_loads_with_bit_identical_eps_and_learned_sigma_dropped(tmp_path):
    from diffusers import DDPMScheduler, PixArtTransformer2DModel

    torch.manual_seed(0)
    net = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=1,
                                   cross_attention_dim=16, caption_channels=12, sample_size=8, patch_size=2).eval()
    model = load_diffusers_dir(_pipeline(tmp_path, "transformer", net, DDPMScheduler(beta_schedule="scaled_linear",
                                                                                        beta_start=0.0001, beta_end=0.02)))
    assert (model.kind, model.prediction_type, model.conditioning) == ("pixart", "epsilon", "embeddings")
    roles = {r for _, r in model.quantizable_layers().values()}
    assert {"cross_attn_qkv", "cross_attn_out", "context_embed", "time_embed", "adaln"} <= roles
    c = conditioning_from_tensors(_embeds(2, 5, 12))
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 700])
    with torch.no_grad():
        ref = net(x, encoder_hidden_states=c.encoder_hidden_states, timestep=t,
                  added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0][:, :4]
        assert torch.equal(model.eps(x, t, c), ref)
    # PixArt-α/Σ uploads name the class Transformer2DModel (norm_type ada_norm_single): loaded as PixArt
    cfg_path = tmp_path / "transformer" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "_class_name": "Transformer2DModel"}))
    legacy = load_diffusers_dir(tmp_path)
    assert legacy.kind == "pixart"
    with torch.no_grad():
        assert torch.equal(legacy.eps(x, t, c), ref)


def test_unet2dcondition_v_prediction_from_the_scheduler_config(tmp_path):
    from diffusers import DDIMScheduler, UNet2DConditionModel

    torch.manual_seed(0)
    net = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
                               down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                               cross_attention_dim=12, attention_head_dim=4, norm_num_groups=4).eval()
    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="v_prediction")
    model = load_diffusers_dir(_pipeline(tmp_path, "unet", net, sched))
    assert (model.kind, model.prediction_type) == ("unet_cond", "v_prediction")
    assert torch.allclose(model.alphas_cumprod.float(), sched.alphas_cumprod, atol=1e-6)
    roles = {r for _, r in model.quantizable_layers().values()}
    assert {"attn_qkv", "cross_attn_qkv", "cross_attn_out", "time_embed", "conv", "mlp"} <= roles
    c = conditioning_from_tensors(_embeds(2, 5, 12))
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 700])
    with torch.no_grad():
        v = net(x, t, encoder_hidden_states=c.encoder_hidden_states, return_dict=False)[0]
        a = model.alphas_cumprod[t].float().view(-1, 1, 1, 1)
        assert torch.allclose(model.eps(x, t, c), a.sqrt() * v + (1 - a).sqrt() * x, atol=1e-6)


def test_quantized_sd3_checkpoint_reloads_as_the_same_flow_model(tmp_path):
    """The reload keeps the kind's forward (text conditioning), the prediction type, the shift and the
    flow timestep patch: the reloaded W8 model's velocity equals the in-memory quantized one."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from diffpro_cli.checkpoint import save_quantized
    from diffpro_cli.loading import load_model
    from diffpro_cli.stages.quantize import apply_plan, uniform_plan

    net = _tiny_sd3()
    path = _pipeline(tmp_path, "transformer", net, FlowMatchEulerDiscreteScheduler(shift=3.0))
    model = load_diffusers_dir(path)
    plan = uniform_plan(model, 8, 8, "dynamic")
    save_quantized(model, plan, tmp_path / "q")
    again = load_model(tmp_path / "q")
    assert (again.kind, again.prediction_type, again.flow_shift, again.conditioning) == ("sd3", "flow", 3.0, "embeddings")
    inmem = apply_plan(load_diffusers_dir(path), plan)
    cond = conditioning_from_tensors(_embeds(2, 5, 12, pooled=10))
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([900, 40])
    with torch.no_grad():
        assert torch.equal(again.velocity(x, t, cond), inmem.velocity(x, t, cond))


def test_text_conditioned_model_runs_the_pipeline_from_the_cli_with_a_conditioning_file(tmp_path, cli):
    """--conditioning FILE (here: `conditioning` in the run config) reaches every stage's load; its hash
    is part of the model's lock record; without it the run stops with one error line."""
    from diffusers import DDPMScheduler, PixArtTransformer2DModel
    from safetensors.torch import save_file

    torch.manual_seed(0)
    net = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=1,
                                   cross_attention_dim=16, caption_channels=12, sample_size=8, patch_size=2).eval()
    pipe = _pipeline(tmp_path / "pixart", "transformer", net, DDPMScheduler())
    save_file(_embeds(3, 5, 12), str(tmp_path / "prompts.safetensors"))
    config = f"""model = "{pipe}"
workdir = "{tmp_path / 'work'}"
conditioning = "{tmp_path / 'prompts.safetensors'}"
stages = ["profile", "score", "prune", "allocate", "quantize", "bench"]
[profile]
samples = 3
timesteps = "999:0:500"
batch = 3
[score]
figures = false
[prune]
steps = 4
reference_steps = 12
n = 3
batch = 3
clip_x0 = false
[allocate]
budget = "avg-bits=8"
repeats = 1
batch = 2
[bench]
rows = ["fp32", "ddim", "diffpro"]
reference_steps = 8
repeats = 1
latency_batch = 2
grid_n = 2
"""
    (tmp_path / "run.toml").write_text(config)
    code, out, err = cli("run", tmp_path / "run.toml", "--json", "--quiet")
    assert code == 0, err
    lock = json.loads((tmp_path / "work" / "diffpro.lock.json").read_text())
    assert lock["stages"]["profile"]["inputs"]["model"]["conditioning"] == str(tmp_path / "prompts.safetensors")
    report = json.loads((tmp_path / "work" / "bench" / "report.json").read_text())
    assert [r["name"] for r in report["rows"]] == ["fp32", "ddim-4", "diffpro"]
    assert all(r["load_mem_bytes"] and r["peak_mem_bytes"] for r in report["rows"])   # the child sampled too
    (tmp_path / "run.toml").write_text(config.replace(f'conditioning = "{tmp_path / "prompts.safetensors"}"\n', "")
                                       .replace(str(tmp_path / "work"), str(tmp_path / "work2")))
    code, out, err = cli("run", tmp_path / "run.toml", "--quiet")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "--conditioning" in lines[0], err


def test_bad_conditioning_widths_and_unsupported_classes_stop_with_one_line_and_write_nothing(tmp_path, cli):
    """Catches: a prompt-embeds file encoded for another model reaching the network (a shape error deep in
    attention, a traceback, or a half-written workdir/checkpoint); an unknown diffusers class loaded as something
    else. Each stage command and `sample` say it in one `error:` line, exit 3, and write nothing."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from safetensors.torch import save_file

    pipe = _pipeline(tmp_path / "sd3", "transformer", _tiny_sd3(), FlowMatchEulerDiscreteScheduler(shift=3.0))
    files = {"wide": {"prompt_embeds": torch.zeros(2, 5, 11), "pooled_prompt_embeds": torch.zeros(2, 10)},
             "pooled": {"prompt_embeds": torch.zeros(2, 5, 12), "pooled_prompt_embeds": torch.zeros(2, 9)},
             "nopooled": {"prompt_embeds": torch.zeros(2, 5, 12)}}
    for name, tensors in files.items():
        save_file(tensors, str(tmp_path / f"{name}.safetensors"))
    other = tmp_path / "other"
    _pipeline(other, "transformer", _tiny_sd3(), FlowMatchEulerDiscreteScheduler())
    cfg = json.loads((other / "transformer" / "config.json").read_text())
    (other / "transformer" / "config.json").write_text(json.dumps(cfg | {"_class_name": "HunyuanDiT2DModel"}))
    runs = []
    for name, words in (("wide", "encoder_hidden_states has trailing shape [5, 11] but the model expects [None, 12]"),
                        ("pooled", "pooled_projections has trailing shape [9]"), ("nopooled", "needs pooled_projections")):
        cond = tmp_path / f"{name}.safetensors"
        runs.append((words, tmp_path / f"w-{name}", cli("profile", pipe, "--conditioning", cond, "-w", tmp_path / f"w-{name}",
                                                         "--samples", 2, "--batch", 2, "--timesteps", "999:0:500", "--quiet")))
        runs.append((words, tmp_path / f"q-{name}", cli("quantize", pipe, "--bits", 8, "--conditioning", cond, "--out",
                                                         tmp_path / f"q-{name}", "-w", tmp_path / f"wq-{name}", "--quiet")))
        runs.append((words, tmp_path / f"s-{name}", cli("sample", pipe, "--conditioning", cond, "--n", 1, "--steps", 1,
                                                         "--out", tmp_path / f"s-{name}" / "s.png")))
    runs.append(("'HunyuanDiT2DModel' is not supported; pass a directory of one of the classes diffpro loads",
                 tmp_path / "w-other", cli("profile", other, "--conditioning", tmp_path / "wide.safetensors", "-w", tmp_path / "w-other")))
    for words, written, (code, out, err) in runs:
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 3 and len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], (code, err)
        assert not written.exists(), written
    assert all(name in lines[0] for name in ("FluxTransformer2DModel", "SanaTransformer2DModel", "PixArtTransformer2DModel"))
    assert not any((tmp_path / f"wq-{name}").exists() for name in files)


def test_latent_decoders_apply_the_vae_shift_factor_and_sana_dc_ae_and_reload_the_same(tmp_path):
    """Catches: FLUX/SD3 latents decoded without the VAE's shift_factor (FluxPipeline decodes z / scaling + shift:
    every image off by a constant in latent space), SANA's AutoencoderDC refused, and a quantized checkpoint that
    decodes differently from the float model it came from."""
    from diffusers import AutoencoderDC, AutoencoderKL, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

    from diffpro_cli.checkpoint import load_quantized, save_quantized
    from diffpro_cli.stages.quantize import uniform_plan

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                        norm_num_groups=8, latent_channels=4, scaling_factor=0.3, shift_factor=0.1).eval()
    path = flux_pipeline(tmp_path / "flux", _tiny_flux(), FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True))
    vae.save_pretrained(path / "vae")
    dc = AutoencoderDC(in_channels=3, latent_channels=4, attention_head_dim=4, encoder_block_types=("ResBlock",),
                       decoder_block_types=("ResBlock",), encoder_block_out_channels=(8,), decoder_block_out_channels=(8,),
                       encoder_layers_per_block=(1,), decoder_layers_per_block=(1,), encoder_qkv_multiscales=((),),
                       decoder_qkv_multiscales=((),), decoder_norm_types="rms_norm", scaling_factor=0.4).eval()
    sana = _pipeline(tmp_path / "sana", "transformer", _tiny_sana(),
                     DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0))
    dc.save_pretrained(sana / "vae")
    z = torch.randn(1, 4, 8, 8)
    for folder, ae, ref_in in ((path, vae, z / 0.3 + 0.1), (sana, dc, z / 0.4)):
        model = load_diffusers_dir(folder)
        save_quantized(model, uniform_plan(model, 8), folder.parent / f"q-{folder.name}")
        again = load_quantized(folder.parent / f"q-{folder.name}")
        with torch.no_grad():
            ref = ae.decode(ref_in).sample
            assert torch.equal(model.decode(z), ref) and torch.equal(again.decode(z), ref), folder.name
    assert load_diffusers_dir(path).config["decode"]["shift_factor"] == 0.1


def test_flow_schedule_variants_match_the_scheduler_or_are_refused(tmp_path):
    """Catches: the linear time shift (mu/(mu + 1/σ − 1)) read as exponential; DPM-Solver flow configs without
    flow sigmas, or with karras-style sigma spacing, silently sampled on plain shifted sigmas."""
    from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

    from diffpro_cli.errors import InputError
    from diffpro_cli.models.base import flow_sigmas
    from diffpro_cli.models.text_families import flow_schedule

    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="linear")
    got = flow_schedule(dict(sched.config), tmp_path, image_seq_len=1024)
    sched.set_timesteps(sigmas=[1.0, 0.5, 0.25], mu=got["dynamic"]["mu"])
    assert torch.allclose(flow_sigmas(1000, got["shift"])[[999, 499, 249]].float(), sched.sigmas[:-1], atol=1e-6)
    for bad in (DPMSolverMultistepScheduler(prediction_type="flow_prediction"),
                FlowMatchEulerDiscreteScheduler(use_karras_sigmas=True)):
        with pytest.raises(InputError, match="use_flow_sigmas|use_karras_sigmas"):
            flow_schedule(dict(bad.config), tmp_path)
    with pytest.raises(InputError, match="FLUX and SD3"):
        flow_schedule(dict(FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True).config), tmp_path)
