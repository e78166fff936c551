"""--prompts FILE: prompts encoded with the pipeline's own text encoders into the record --conditioning gives.

Tiny random CLIP / T5 text encoders and tokenizers are built in process (a 54-token character vocabulary,
no downloads) and saved with tiny SD / SDXL / SD3 / PixArt pipelines (save_pretrained into a temp dir)."""

import json
import string
import sys

import pytest
import torch

pytest.importorskip("transformers")

CHARS = list(string.ascii_lowercase)


def clip_tokenizer(max_len=8):
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in CHARS:
        vocab[c], vocab[c + "</w>"] = len(vocab), len(vocab) + 1
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_len)


def clip_encoder(hidden=16, projection=None, seed=0):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=2 + 2 * len(CHARS), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=8, projection_dim=projection or hidden,
                         bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return (CLIPTextModelWithProjection(cfg) if projection else CLIPTextModel(cfg)).eval()


def t5_tokenizer():
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("▁" + c, -1.0) for c in CHARS] + [(c, -2.0) for c in CHARS]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def t5_encoder(d_model=12, seed=1):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    return T5EncoderModel(T5Config(vocab_size=3 + 2 * len(CHARS), d_model=d_model, d_kv=6, d_ff=24, num_layers=2,
                                   num_heads=2)).eval()


def gemma_tokenizer():
    from transformers import GemmaTokenizer

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4}
    for c in [*CHARS, " ", ".", ",", ":", "'", "-", "\n", "▁"]:
        vocab.setdefault(c, len(vocab))
    return GemmaTokenizer(vocab=vocab, merges=[])


def gemma_encoder(vocab_size, hidden=12):
    from transformers import Gemma2Config, Gemma2Model

    torch.manual_seed(8)
    return Gemma2Model(Gemma2Config(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                                    num_attention_heads=2, num_key_value_heads=1, head_dim=6, max_position_embeddings=1024)).eval()


def sd_unet(cross=16, **extra):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(2)
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=cross,
                                attention_head_dim=4, norm_num_groups=4, **extra).eval()


def sd_pipeline(path):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=None, text_encoder=clip_encoder(), tokenizer=clip_tokenizer(), unet=sd_unet(),
                                   scheduler=DDIMScheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(path)
    return path


def pixart_pipeline(path, caption_channels=12):
    from diffusers import DDPMScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    torch.manual_seed(3)
    net = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=1,
                                   cross_attention_dim=16, caption_channels=caption_channels, sample_size=8, patch_size=2).eval()
    PixArtSigmaPipeline(tokenizer=t5_tokenizer(), text_encoder=t5_encoder(), vae=None, transformer=net,
                        scheduler=DDPMScheduler()).save_pretrained(path)
    return path


def write_prompts(path, prompts):
    path.write_text("\n".join(prompts) + "\n")
    return path


def reference_pipeline(cls, path):
    """The pipeline loaded the ordinary diffusers way (components saved as null passed as None), to call its own
    encode_prompt."""
    index = json.loads((path / "model_index.json").read_text())
    absent = {k: None for k, v in index.items() if isinstance(v, list) and v[0] is None}
    pipe = getattr(__import__("diffusers"), cls).from_pretrained(path, **absent)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def error_line(err):
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    return lines[0]


# ---------------------------------------------------------------------------------------------


def test_prompt_files_one_a_line_or_a_json_list(tmp_path):
    """Catches: blank lines or CR/whitespace becoming prompts; a JSON list read as lines (or lines as JSON when
    they do not start with '['); non-string JSON entries or an empty file passing silently."""
    from diffpro_cli.errors import InputError
    from diffpro_cli.models.prompts import read_prompts

    (tmp_path / "a.txt").write_text("a red cat\n\n  two dogs  \r\n")
    assert read_prompts(tmp_path / "a.txt") == ["a red cat", "two dogs"]       # blank lines skipped, CRLF and spaces trimmed
    (tmp_path / "b.json").write_text(json.dumps(["x", "[not json] y"]))
    assert read_prompts(tmp_path / "b.json") == ["x", "[not json] y"]
    (tmp_path / "c.txt").write_text("[bracket] as a line\n")
    with pytest.raises(InputError, match="not valid JSON"):                    # a line starting with [ reads as JSON
        read_prompts(tmp_path / "c.txt")
    (tmp_path / "d.json").write_text(json.dumps(["x", 3]))
    with pytest.raises(InputError, match="list of strings"):
        read_prompts(tmp_path / "d.json")
    (tmp_path / "e.txt").write_text("\n \n")
    with pytest.raises(InputError, match="no prompts"):
        read_prompts(tmp_path / "e.txt")
    with pytest.raises(InputError, match="no such prompts file"):
        read_prompts(tmp_path / "missing.txt")


def test_sd_prompts_sample_exactly_like_the_pipelines_own_embeddings_and_cfg_uses_the_negative(tmp_path, cli):
    """`sample --prompts` == `sample --conditioning` of StableDiffusionPipeline.encode_prompt's tensors, bit for
    bit; a different negative prompt changes CFG samples (it is the unconditional half)."""
    from safetensors.torch import load_file, save_file

    pipe_dir = sd_pipeline(tmp_path / "sd")
    prompts = write_prompts(tmp_path / "p.txt", ["a red cat", "a dog"])
    ref = reference_pipeline("StableDiffusionPipeline", pipe_dir)
    with torch.no_grad():
        pe, npe = ref.encode_prompt(["a red cat", "a dog"], "cpu", 1, True, negative_prompt=["blurry"] * 2)
    save_file({"prompt_embeds": pe, "negative_prompt_embeds": npe}, str(tmp_path / "embeds.safetensors"))

    common = ["--n", 3, "--steps", 3, "--cfg", 3, "--batch", 2, "--quiet"]
    code, _, err = cli("sample", pipe_dir, "--conditioning", tmp_path / "embeds.safetensors", "--out", tmp_path / "c.png", *common)
    assert code == 0, err
    code, _, err = cli("sample", pipe_dir, "--prompts", prompts, "--negative-prompt", "blurry", "--out", tmp_path / "p.png", *common)
    assert code == 0, err
    by_file, by_prompts = load_file(tmp_path / "c.safetensors")["samples"], load_file(tmp_path / "p.safetensors")["samples"]
    assert torch.equal(by_file, by_prompts)
    code, _, err = cli("sample", pipe_dir, "--prompts", prompts, "--out", tmp_path / "n.png", *common)   # negative ""
    assert code == 0, err
    assert not torch.allclose(load_file(tmp_path / "n.safetensors")["samples"], by_prompts)
    # a quantized checkpoint encodes with the pipeline it was made from (its record keeps the source folder)
    code, _, err = cli("quantize", pipe_dir, "--bits", 8, "--prompts", prompts, "--workdir", tmp_path / "w", "--quiet")
    assert code == 0, err
    quantized = tmp_path / "w" / "quantized"
    code, _, err = cli("sample", quantized, "--conditioning", tmp_path / "embeds.safetensors", "--out", tmp_path / "qc.png", *common)
    assert code == 0, err
    code, _, err = cli("sample", quantized, "--prompts", prompts, "--negative-prompt", "blurry", "--out", tmp_path / "qp.png", *common)
    assert code == 0, err
    assert torch.equal(load_file(tmp_path / "qc.safetensors")["samples"], load_file(tmp_path / "qp.safetensors")["samples"])


def test_pixart_prompts_reach_a_stage_with_the_mask_and_their_hashes_join_the_lock(tmp_path, cli):
    """PixArt (T5 + attention mask): encode_prompts equals PixArtSigmaPipeline.encode_prompt exactly; `profile
    --prompts` records the prompts file's and the embeddings' sha256 in the lock; the API takes prompts too."""
    import diffpro
    from diffpro_cli.artifacts import sha256_file
    from diffpro_cli.models.conditioning import conditioning_sha256
    from diffpro_cli.models.diffusers_dir import load_diffusers_dir
    from diffpro_cli.models.prompts import encode_prompts

    pipe_dir = pixart_pipeline(tmp_path / "pixart")
    model = load_diffusers_dir(pipe_dir)
    cond = encode_prompts(model, ["a cat", "the sea"], "ugly")
    ref = reference_pipeline("PixArtSigmaPipeline", pipe_dir)
    with torch.no_grad():
        pe, mask, npe, nmask = ref.encode_prompt(["a cat", "the sea"], True, negative_prompt="ugly", device="cpu",
                                                 clean_caption=False, max_sequence_length=300)
    assert torch.equal(cond.encoder_hidden_states, pe) and torch.equal(cond.encoder_attention_mask, mask)
    assert torch.equal(cond.uncond.encoder_hidden_states, npe) and torch.equal(cond.uncond.encoder_attention_mask, nmask)
    assert 0 < int(mask.sum()) < mask.numel()          # the padding is masked, so the mask is really carried

    prompts = write_prompts(tmp_path / "p.txt", ["a cat", "the sea"])
    work = tmp_path / "work"
    code, _, err = cli("profile", pipe_dir, "--prompts", prompts, "--negative-prompt", "ugly", "--samples", 2, "--batch", 2,
                       "--timesteps", "999:0:500", "--workdir", work, "--quiet")
    assert code == 0, err
    rec = json.loads((work / "diffpro.lock.json").read_text())["stages"]["profile"]["inputs"]["model"]
    assert rec["prompts_sha256"] == sha256_file(prompts) and rec["embeddings_sha256"] == conditioning_sha256(cond)
    assert rec["negative_prompt"] == "ugly"
    # child processes (bench's memory rows) get the same embeddings as a file
    from diffpro_cli.models.conditioning import load_conditioning
    from diffpro_cli.stages.context import StageContext

    ctx = StageContext.create(str(pipe_dir), tmp_path / "w2", prompts=prompts, negative_prompt="ugly")
    assert conditioning_sha256(load_conditioning(ctx.conditioning_file())) == conditioning_sha256(cond)
    # the API: same names; other prompts are another input, so the stage recomputes
    write_prompts(prompts, ["a dog"])
    diffpro.profile(str(pipe_dir), work, prompts=prompts, samples=2, batch=2, timesteps="999:0:500")
    rec2 = json.loads((work / "diffpro.lock.json").read_text())["stages"]["profile"]["inputs"]["model"]
    assert rec2["embeddings_sha256"] != rec["embeddings_sha256"] and rec2["sha256"] != rec["sha256"]
    # the run config: same keys
    (tmp_path / "run.toml").write_text(f"""model = "{pipe_dir}"
workdir = "{tmp_path / 'run'}"
prompts = "{prompts}"
negative_prompt = "ugly"
stages = ["profile"]
[profile]
samples = 2
batch = 2
timesteps = "999:0:500"
""")
    code, _, err = cli("run", tmp_path / "run.toml", "--quiet")
    assert code == 0, err
    rec3 = json.loads((tmp_path / "run" / "diffpro.lock.json").read_text())["stages"]["profile"]["inputs"]["model"]
    assert (rec3["prompts_sha256"], rec3["negative_prompt"]) == (sha256_file(prompts), "ugly")


def test_sdxl_prompts_give_pooled_text_embeds_time_ids_and_a_zeroed_empty_negative(tmp_path):
    """Catches: SDXL encoded as SD (one CLIP, no pooled text_embeds); time ids at the wrong pixel size; an
    empty negative prompt encoded instead of zeroed as the pipeline's force_zeros_for_empty_prompt does (and a
    given negative prompt zeroed); added-condition shapes the U-Net cannot take."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    from diffpro_cli.models.diffusers_dir import load_diffusers_dir
    from diffpro_cli.models.prompts import encode_prompts

    unet = sd_unet(cross=16, addition_embed_type="text_time", addition_time_embed_dim=4,
                   projection_class_embeddings_input_dim=4 + 6 * 4)
    StableDiffusionXLPipeline(vae=None, text_encoder=clip_encoder(8), text_encoder_2=clip_encoder(8, projection=4, seed=5),
                              tokenizer=clip_tokenizer(), tokenizer_2=clip_tokenizer(), unet=unet,
                              scheduler=EulerDiscreteScheduler()).save_pretrained(tmp_path / "xl")
    model = load_diffusers_dir(tmp_path / "xl")
    cond = encode_prompts(model, ["a cat", "a dog"])
    ref = reference_pipeline("StableDiffusionXLPipeline", tmp_path / "xl")
    with torch.no_grad():
        pe, npe, pooled, _ = ref.encode_prompt(prompt=["a cat", "a dog"], device="cpu", do_classifier_free_guidance=True)
    assert torch.equal(cond.encoder_hidden_states, pe) and torch.equal(cond.added_cond_kwargs["text_embeds"], pooled)
    assert torch.equal(cond.uncond.encoder_hidden_states, npe) and not npe.any()   # force_zeros_for_empty_prompt
    assert cond.added_cond_kwargs["time_ids"].tolist() == [[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * 2   # 8 latents × 8
    x = torch.randn(2, *model.sample_shape)
    assert model.with_conditioning(cond).eps(x, torch.tensor([500, 500]), cond).shape == x.shape   # shapes fit the U-Net
    assert not torch.equal(encode_prompts(model, ["a cat"], "blurry").uncond.encoder_hidden_states, npe[:1])


def test_sd3_prompts_concatenate_clip_and_t5_and_pool_both_clips(tmp_path):
    """Catches: a max_sequence_length other than the pipeline's 256; pooled embeddings from one CLIP only; a
    pipeline without T5 failing (its zero padding is sized by the transformer the text-only load leaves out)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    from diffpro_cli.models.diffusers_dir import load_diffusers_dir
    from diffpro_cli.models.prompts import encode_prompts

    torch.manual_seed(4)
    net = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
                                num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                                pooled_projection_dim=8, out_channels=4, pos_embed_max_size=16).eval()
    StableDiffusion3Pipeline(transformer=net, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=None,
                             text_encoder=clip_encoder(8, projection=4), tokenizer=clip_tokenizer(),
                             text_encoder_2=clip_encoder(8, projection=4, seed=6), tokenizer_2=clip_tokenizer(),
                             text_encoder_3=t5_encoder(16), tokenizer_3=t5_tokenizer()).save_pretrained(tmp_path / "sd3")
    model = load_diffusers_dir(tmp_path / "sd3")
    cond = encode_prompts(model, ["a cat"], "noise")
    ref = reference_pipeline("StableDiffusion3Pipeline", tmp_path / "sd3")
    with torch.no_grad():
        pe, npe, pooled, npooled = ref.encode_prompt(prompt=["a cat"], prompt_2=None, prompt_3=None, device="cpu",
                                                     negative_prompt="noise", max_sequence_length=256)
    assert torch.equal(cond.encoder_hidden_states, pe) and torch.equal(cond.pooled_projections, pooled)
    assert torch.equal(cond.uncond.encoder_hidden_states, npe) and torch.equal(cond.uncond.pooled_projections, npooled)
    assert pe.shape == (1, 8 + 256, 16) and pooled.shape == (1, 8)
    x = torch.randn(1, *model.sample_shape)
    assert model.with_conditioning(cond).velocity(x, torch.tensor([700]), cond).shape == x.shape
    # without T5 (text_encoder_3 dropped, as SD3 allows) the pipeline pads with zeros sized by the transformer
    StableDiffusion3Pipeline(transformer=net, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=None,
                             text_encoder=clip_encoder(8, projection=4), tokenizer=clip_tokenizer(),
                             text_encoder_2=clip_encoder(8, projection=4, seed=6), tokenizer_2=clip_tokenizer(),
                             text_encoder_3=None, tokenizer_3=None).save_pretrained(tmp_path / "no-t5")
    cond = encode_prompts(load_diffusers_dir(tmp_path / "no-t5"), ["a cat"])
    with torch.no_grad():
        pe = reference_pipeline("StableDiffusion3Pipeline", tmp_path / "no-t5").encode_prompt(
            prompt=["a cat"], prompt_2=None, prompt_3=None, device="cpu", max_sequence_length=256)[0]
    assert torch.equal(cond.encoder_hidden_states, pe) and pe.shape == (1, 8 + 256, 16) and not pe[:, 8:].any()


def test_flux_prompts_give_t5_embeddings_and_the_clip_pooled_projection(tmp_path):
    """FLUX: CLIP's pooled output + T5's sequence, as FluxPipeline.encode_prompt gives them; the negative prompt
    is encoded the same way (true CFG); guidance stays the loader's default (the record carries none)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    from diffpro_cli.models.diffusers_dir import load_diffusers_dir
    from diffpro_cli.models.prompts import encode_prompts

    torch.manual_seed(7)
    net = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
                                 num_attention_heads=2, joint_attention_dim=12, pooled_projection_dim=16,
                                 guidance_embeds=True, axes_dims_rope=(2, 2, 4)).eval()
    FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=clip_encoder(16), tokenizer=clip_tokenizer(),
                 text_encoder_2=t5_encoder(12), tokenizer_2=t5_tokenizer(), transformer=net).save_pretrained(tmp_path / "flux")
    cfg = json.loads((tmp_path / "flux" / "transformer" / "config.json").read_text())     # FLUX configs carry no sample size
    (tmp_path / "flux" / "transformer" / "config.json").write_text(json.dumps(cfg | {"sample_size": 8}))
    model = load_diffusers_dir(tmp_path / "flux")
    cond = encode_prompts(model, ["a cat", "a dog"], "fog")
    ref = reference_pipeline("FluxPipeline", tmp_path / "flux")
    with torch.no_grad():
        pe, pooled, _ = ref.encode_prompt(prompt=["a cat", "a dog"], prompt_2=None, device="cpu", max_sequence_length=512)
        npe, npooled, _ = ref.encode_prompt(prompt=["fog", "fog"], prompt_2=None, device="cpu", max_sequence_length=512)
    assert torch.equal(cond.encoder_hidden_states, pe) and torch.equal(cond.pooled_projections, pooled)
    assert torch.equal(cond.uncond.encoder_hidden_states, npe) and torch.equal(cond.uncond.pooled_projections, npooled)
    assert cond.guidance is None and pe.shape == (2, 512, 12)
    x = torch.randn(2, *model.sample_shape)
    assert model.with_conditioning(cond).velocity(x, torch.tensor([700, 700]), cond).shape == x.shape


def test_sana_prompts_use_gemma_with_the_pipelines_complex_human_instruction(tmp_path):
    """SANA: Gemma-2 embeddings and mask as SanaPipeline.encode_prompt gives them with its __call__ default
    complex human instruction (a preamble whose tokens are cut off again: without it the embeddings differ)."""
    import inspect

    from diffusers import FlowMatchEulerDiscreteScheduler, SanaPipeline, SanaTransformer2DModel

    from diffpro_cli.models.diffusers_dir import load_diffusers_dir
    from diffpro_cli.models.prompts import encode_prompts

    tok = gemma_tokenizer()
    torch.manual_seed(9)
    net = SanaTransformer2DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
                                 num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16,
                                 caption_channels=12, sample_size=8, patch_size=1).eval()
    SanaPipeline(tokenizer=tok, text_encoder=gemma_encoder(len(tok)), vae=None, transformer=net,
                 scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0)).save_pretrained(tmp_path / "sana")
    model = load_diffusers_dir(tmp_path / "sana")
    cond = encode_prompts(model, ["a cat", "the sea"], "ugly")
    ref = reference_pipeline("SanaPipeline", tmp_path / "sana")
    chi = inspect.signature(SanaPipeline.__call__).parameters["complex_human_instruction"].default
    with torch.no_grad():
        pe, mask, npe, nmask = ref.encode_prompt(["a cat", "the sea"], True, negative_prompt="ugly", device="cpu",
                                                 clean_caption=False, max_sequence_length=300, complex_human_instruction=chi)
        plain = ref.encode_prompt(["a cat", "the sea"], True, negative_prompt="ugly", device="cpu", clean_caption=False,
                                  max_sequence_length=300, complex_human_instruction=None)[0]
    assert torch.equal(cond.encoder_hidden_states, pe) and torch.equal(cond.encoder_attention_mask, mask)
    assert torch.equal(cond.uncond.encoder_hidden_states, npe) and torch.equal(cond.uncond.encoder_attention_mask, nmask)
    assert not torch.equal(plain, pe)
    x = torch.randn(2, *model.sample_shape)
    assert model.with_conditioning(cond).velocity(x, torch.tensor([700, 700]), cond).shape == x.shape


# ---------------------------------------------------------------------------------------------
# Bad input: one error line, the documented exit code, nothing written
# ---------------------------------------------------------------------------------------------


def _profile(cli, model, work, *extra):
    return cli("profile", model, "--workdir", work, "--samples", 2, "--batch", 2, "--timesteps", "999:0:500", "--quiet", *extra)


def test_prompt_errors_are_one_line_with_their_exit_code_and_write_nothing(tmp_path, cli, monkeypatch, capsys):
    """Catches: a traceback or a second line instead of one `error:` line naming the fix; a wrong exit code
    (2 usage, 3 input); a workdir created before the error."""
    import shutil

    from safetensors.torch import save_file

    prompts = write_prompts(tmp_path / "p.txt", ["a cat"])
    pipe_dir = pixart_pipeline(tmp_path / "pixart")
    save_file({"prompt_embeds": torch.zeros(1, 3, 12)}, str(tmp_path / "e.safetensors"))
    wide = pixart_pipeline(tmp_path / "wide", caption_channels=10)
    capsys.readouterr()                 # the builders' own output is not the CLI's
    cases = []

    # --prompts with --conditioning: a usage error
    cases.append((2, "--conditioning", _profile(cli, pipe_dir, tmp_path / "w1", "--prompts", prompts, "--conditioning",
                                                 tmp_path / "e.safetensors")))
    # --negative-prompt without --prompts
    cases.append((2, "--prompts", _profile(cli, pipe_dir, tmp_path / "w2", "--conditioning", tmp_path / "e.safetensors",
                                            "--negative-prompt", "x")))
    # a model folder (config.json), not a pipeline: no text encoders to use
    cases.append((3, "--conditioning FILE", _profile(cli, pipe_dir / "transformer", tmp_path / "w3", "--prompts", prompts)))
    # a pipeline whose text encoder is gone
    bare = tmp_path / "bare"
    shutil.copytree(pipe_dir, bare)
    shutil.rmtree(bare / "text_encoder")
    cases.append((3, "--conditioning FILE", _profile(cli, bare, tmp_path / "w4", "--prompts", prompts)))
    # text encoder width != the network's caption_channels
    cases.append((3, "expects", _profile(cli, wide, tmp_path / "w5", "--prompts", prompts)))
    # a class-conditioned model takes no prompts
    cases.append((2, "--prompts", _profile(cli, "random:dit-tiny", tmp_path / "w6", "--prompts", prompts)))
    # an empty prompts file
    cases.append((3, "no prompts", _profile(cli, pipe_dir, tmp_path / "w7", "--prompts", write_prompts(tmp_path / "0.txt", []))))
    # transformers (the [text] extra) missing
    monkeypatch.setitem(sys.modules, "transformers", None)
    cases.append((3, "pip install 'diffpro[text]'", _profile(cli, pipe_dir, tmp_path / "w8", "--prompts", prompts)))
    cases.append((3, "diffpro[text]", cli("sample", pipe_dir, "--prompts", prompts, "--n", 1, "--steps", 1,
                                          "--out", tmp_path / "w9" / "s.png")))
    for i, (want, words, (code, out, err)) in enumerate(cases, 1):
        line = error_line(err)
        assert code == want and words in line, (i, code, line)
        assert not (tmp_path / f"w{i}").exists(), i
