"""`import diffpro`: the library face runs the same stages as the CLI and returns the artifacts' records."""

import json

import pytest
import torch

import diffpro
from diffpro_cli.errors import UsageError
from diffpro_cli.quant.layers import QuantLinear
from conftest import w8a8_dit_tiny


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """profile → score → prune → allocate → quantize through the API on a tiny random DiT."""
    work = tmp_path_factory.mktemp("api")
    spec = "random:dit-tiny"
    prof = diffpro.profile(spec, work, seed=2, samples=2, timesteps="999:0:500", batch=2)
    scores = diffpro.score(spec, work, figures=False)
    ts = diffpro.prune(spec, work, seed=2, steps=4, reference_steps=12, n=2, batch=2)
    plan = diffpro.allocate(spec, work, budget="avg-bits=6", repeats=1, batch=2)
    meta = diffpro.quantize(spec, work, seed=2)
    return work, prof, scores, ts, plan, meta


def test_api_stages_return_the_records_written_to_the_workdir(pipeline):
    work, prof, scores, ts, plan, meta = pipeline
    assert prof["schema"] == "diffpro.profile/1" and prof == json.loads((work / "profile" / "profile.json").read_text())
    assert scores == json.loads((work / "scores.json").read_text())
    assert ts["timesteps"] == json.loads((work / "timesteps.json").read_text())["timesteps"] and len(ts["timesteps"]) == 4
    assert plan == json.loads((work / "plan.json").read_text()) and plan["totals"]["avg_bits"] <= 6
    assert plan["cost_table"]["fingerprint"]["threads"] >= 1          # priced with the measured table
    assert meta["timesteps"] == ts["timesteps"]
    lock = json.loads((work / "diffpro.lock.json").read_text())
    assert set(lock["stages"]) == {"profile", "score", "prune", "allocate", "quantize"}


def test_loaded_checkpoint_keeps_the_diffusers_forward_signature(pipeline):
    work = pipeline[0]
    model = diffpro.load(work / "quantized")
    assert any(isinstance(m, QuantLinear) for m in model.net.modules())
    torch.manual_seed(0)
    x = torch.randn(2, *model.sample_shape)
    t = torch.tensor([999, 10])
    y = torch.tensor([1, 2])
    with torch.no_grad():
        direct = model.net(x, timestep=t, class_labels=y, return_dict=False)[0][:, :x.shape[1]]
        assert torch.equal(direct, model.eps(x, t, y))


def test_quantize_in_place_from_a_plan_swaps_exactly_the_planned_layers(pipeline):
    work, plan = pipeline[0], pipeline[4]
    model = diffpro.load("random:dit-tiny", seed=2)
    x, t, y = torch.randn(2, *model.sample_shape), torch.tensor([500, 500]), torch.tensor([0, 3])
    with torch.no_grad():
        ref = model.eps(x, t, y)
    out = diffpro.quantize_(model, work / "plan.json")
    assert out is model
    quantized = {n for n, m in model.net.named_modules() if getattr(m, "is_diffpro_quant", False)}
    planned = {n for n, e in plan["layers"].items() if e["weight_bits"] < 16}
    assert quantized == planned
    with torch.no_grad():
        got = model.eps(x, t, y)
    rel = float((got - ref).norm() / ref.norm())
    assert 0 < rel < 0.5          # really quantized, still the same network


def test_a_call_outside_no_grad_runs_without_warnings_and_gives_the_same_output():
    """A user calling the network without torch.no_grad(): the per-tensor kernels' scale came from a tensor
    that required grad, and torch warned on every integer layer's call."""
    import warnings

    model = w8a8_dit_tiny()
    x, t, y = torch.randn(2, *model.sample_shape), torch.tensor([500, 20]), torch.tensor([0, 3])
    with torch.no_grad():
        ref = model.eps(x, t, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = model.eps(x, t, y)
    assert torch.equal(out.detach(), ref)


def test_a_bf16_plan_hands_a_pipeline_its_prediction_in_the_latents_dtype():
    """The hook runs a bf16 model's float math under autocast; its output came back bf16, so a pipeline
    kept its latents in bf16 and FluxPipeline's fp32 VAE failed ('Input type (BFloat16) and bias type
    (float)'). Catches the output left in the compute dtype, for the tuple and the dataclass output."""
    model = diffpro.load("random:dit-tiny", seed=2)
    diffpro.set_compute_dtype(model, torch.bfloat16)
    x, t, y = torch.randn(2, *model.sample_shape), torch.tensor([500, 20]), torch.tensor([0, 3])
    with torch.no_grad():
        as_tuple = model.net(x, timestep=t, class_labels=y, return_dict=False)[0]
        as_output = model.net(x, timestep=t, class_labels=y).sample
        half = model.net(x.bfloat16(), timestep=t, class_labels=y, return_dict=False)[0]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            want = model.net.forward(x, timestep=t, class_labels=y, return_dict=False)[0]   # no hooks
    assert as_tuple.dtype == as_output.dtype == torch.float32 and half.dtype == torch.bfloat16
    assert torch.equal(as_tuple, want.float()) and torch.equal(as_output, as_tuple)


def test_quantize_in_place_refuses_a_plan_for_another_network(pipeline):
    plan = dict(pipeline[4])
    plan["layers"] = {"no.such.layer": {"weight_bits": 8, "act_bits": 8, "act_mode": "dynamic"}}
    with pytest.raises(UsageError, match="does not have"):
        diffpro.quantize_(torch.nn.Sequential(torch.nn.Linear(4, 4)), plan)


def test_api_rejects_unknown_options_and_devices():
    # catches: a typo'd option or device accepted silently, or "cuda" on a machine without one failing
    # deep inside torch instead of with one line naming the fix
    with pytest.raises(UsageError, match="unknown option"):
        diffpro.profile("random:dit-tiny", "unused", sampels=3)
    with pytest.raises(UsageError, match="use cpu, cuda or cuda:N"):
        diffpro.load("random:dit-tiny", device="tpu")
    with pytest.raises(UsageError, match="diffpro runs on"):
        diffpro.load("random:dit-tiny", device="meta")
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="no CUDA device here"):
            diffpro.load("random:dit-tiny", device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA end to end needs a GPU")
def test_cuda_load_and_sample_match_the_cpu(pipeline):
    """A quantized checkpoint loaded onto the GPU samples from the same seeded noise as on the CPU; the
    integer kernels differ (torch._int_mm vs fbgemm/oneDNN) so the images agree closely, not exactly."""
    from diffpro_cli.sampling import SamplerConfig, model_device, sample

    qdir = pipeline[0] / "quantized"
    cpu, gpu = diffpro.load(qdir), diffpro.load(qdir, device="cuda")
    assert model_device(gpu).type == "cuda"
    ts = [999, 666, 333, 0]
    a = sample(cpu, 4, ts, SamplerConfig(), seed=3)
    b = sample(gpu, 4, ts, SamplerConfig(), seed=3)
    assert b.device.type == "cpu" and b.shape == a.shape
    assert float((a - b).abs().max()) < 0.1
    kernels = {m.kernel_name.split(":")[0] for m in gpu.net.modules() if getattr(m, "is_diffpro_quant", False)}
    assert any(k.startswith("cuda-") for k in kernels)


def test_static_activation_checkpoint_needs_no_timestep_context(pipeline, tmp_path):
    """The forward pre-hook hands `timestep` to static-activation layers: calling .net directly at two
    timesteps gives exactly what eps() (which sets the context itself) gives."""
    work = pipeline[0]
    diffpro.quantize("random:dit-tiny", work, seed=2, bits=8, act_mode="static", calib_samples=1,
                     timesteps_path=work / "timesteps.json", out_dir=tmp_path / "static")
    model = diffpro.load(tmp_path / "static")
    x, y = torch.randn(2, *model.sample_shape), torch.tensor([1, 2])
    outs = []
    for step in (999, 0):
        t = torch.full((2,), step)
        with torch.no_grad():
            direct = model.net(x, timestep=t, class_labels=y, return_dict=False)[0][:, :x.shape[1]]
            assert torch.equal(direct, model.eps(x, t, y))
        outs.append(direct)
    assert not torch.equal(outs[0], outs[1])


def test_quantized_transformer_drops_into_a_diffusers_pipeline(tmp_path):
    """The docs/api.md example: a DiTPipeline runs with its transformer swapped for diffpro's W8A8 one."""
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(0)
    dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=1000).eval()   # DiTPipeline's null class is 1000
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8, latent_channels=4,
                        sample_size=16).eval()
    pipe = DiTPipeline(transformer=dit, vae=vae, scheduler=DDIMScheduler())
    pipe.save_pretrained(tmp_path / "pipe")
    diffpro.quantize(str(tmp_path / "pipe"), tmp_path / "work", bits=8, out_dir=tmp_path / "q")
    q = diffpro.load(tmp_path / "q")
    float_images = pipe(class_labels=[1, 2], num_inference_steps=2, generator=torch.manual_seed(0), output_type="np").images
    pipe.transformer = q.net
    q_images = pipe(class_labels=[1, 2], num_inference_steps=2, generator=torch.manual_seed(0), output_type="np").images
    assert q_images.shape == float_images.shape
    assert any(isinstance(m, QuantLinear) for m in pipe.transformer.modules())
    diff = float(abs(q_images - float_images).mean())
    assert 0 < diff < 0.05


def test_bench_takes_rows_as_the_command_line_writes_them(tmp_path):
    # catches: a comma string iterated character by character ("unknown row 'f'") from the Python face
    report = diffpro.bench("random:dit-tiny", tmp_path / "w", rows="fp32, w8a8-uniform", reference_steps=4,
                           repeats=1, latency_batch=2)
    assert [r["name"] for r in report["rows"]] == ["fp32", "w8a8-uniform"]


def test_the_api_module_exports_every_name_import_diffpro_does():
    # catches: set_compute_dtype / install_timestep_hook re-exported by diffpro but missing from api.__all__
    from diffpro_cli import api

    assert set(diffpro.__all__) - {"__version__"} <= set(api.__all__)
    assert all(callable(getattr(api, name)) for name in api.__all__)
