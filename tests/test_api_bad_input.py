"""Bad input to the library functions (`import diffpro`): one diffpro error naming the problem and the
fix, raised before anything is changed, never an AttributeError/TypeError from deep inside."""

import pytest
import torch

import diffpro
from diffpro_cli.errors import UsageError


def test_functions_taking_a_loaded_model_refuse_anything_else():
    # catches: diffpro.compile / set_compute_dtype given a spec string or a bare module failing with
    # "'str' object has no attribute 'net'", and install_timestep_hook / quantize_ with one about
    # 'register_forward_pre_hook' / 'named_modules'
    with pytest.raises(UsageError, match=r"diffpro\.compile: expected a DiffusionModel, got str; load it first"):
        diffpro.compile("random:dit-tiny")
    with pytest.raises(UsageError, match=r"diffpro\.set_compute_dtype: expected a DiffusionModel, got Linear"):
        diffpro.set_compute_dtype(torch.nn.Linear(2, 2), "bfloat16")
    with pytest.raises(UsageError, match=r"diffpro\.install_timestep_hook: expected a DiffusionModel or an nn\.Module, got str"):
        diffpro.install_timestep_hook("net")
    with pytest.raises(UsageError, match=r"diffpro\.quantize_: expected a DiffusionModel or an nn\.Module, got str"):
        diffpro.quantize_("random:dit-tiny", {"layers": {}})


def test_compile_checks_its_device_like_load_does():
    # catches: diffpro.compile(model, device="tpu") failing with torch's RuntimeError listing every
    # device type torch knows, instead of diffpro's one line
    model = diffpro.load("random:dit-tiny")
    with pytest.raises(UsageError, match="use cpu, cuda or cuda:N"):
        diffpro.compile(model, device="tpu")
    with pytest.raises(UsageError, match="diffpro runs on cpu or cuda"):
        diffpro.compile(model, device="meta")


def test_stage_functions_refuse_a_workdir_that_is_not_a_path():
    # catches: diffpro.profile(spec, 5) failing with pathlib's TypeError
    with pytest.raises(UsageError, match="workdir 5: pass a directory path"):
        diffpro.profile("random:dit-tiny", 5)


Q = "transformer_blocks.0.attn1.to_q"


@pytest.mark.parametrize("plan,problem", [
    (3, "plan has type int; pass plan.json's record"),
    ({"layers": [Q]}, r"plan\['layers'\] has type list"),
    ({"layers": {Q: 8}}, f"plan layer '{Q}': the entry 8 is not a dict"),
    ({"layers": {Q: {"weight_bits": "8"}}}, "weight_bits '8': use an integer"),
    ({"layers": {Q: {"weight_bits": 5}}}, "weight_bits 5: use one of 2, 3, 4, 6, 8, or 16"),
    ({"layers": {Q: {"weight_bits": 8, "act_bits": 4}}}, f"plan layer '{Q}': act_bits 4"),
    ({"layers": {Q: {"weight_bits": 8, "act_mode": "dynamik"}}}, f"plan layer '{Q}': act_mode 'dynamik'"),
    ({"layers": {Q: {"weight_bits": 4, "group_size": "8"}}}, "group_size '8': use an integer"),
    ({"layers": {Q: {"weight_bits": 4, "group_size": 7}}}, "group_size 7 does not divide its input size 32"),
    ({"layers": {"transformer_blocks.0.norm1": {"weight_bits": 8}}}, "is AdaLayerNormZero; only nn.Linear and nn.Conv2d"),
])
def test_quantize_in_place_refuses_bad_plan_entries_naming_the_layer(plan, problem):
    # catches: a hand-written plan dict failing deep inside with "'int' object has no attribute 'get'",
    # "'<=' not supported between 'str' and 'int'" or "'AdaLayerNormZero' has no attribute 'in_channels'"
    model = diffpro.load("random:dit-tiny")
    with pytest.raises(UsageError, match=problem):
        diffpro.quantize_(model, plan)


def test_a_bad_plan_entry_leaves_the_module_untouched():
    # catches: the layers before the bad entry already swapped for integer ones (a half-quantized network)
    model = diffpro.load("random:dit-tiny")
    plan = {"layers": {Q: {"weight_bits": 8}, "transformer_blocks.0.attn1.to_k": {"weight_bits": 8},
                       "transformer_blocks.0.attn1.to_v": {"weight_bits": 5}}}
    with pytest.raises(UsageError, match="weight.bits 5"):
        diffpro.quantize_(model, plan)
    assert not any(getattr(m, "is_diffpro_quant", False) for m in model.net.modules())


@pytest.mark.parametrize("call,problem", [
    (lambda: diffpro.profile("random:dit-tiny", "unused", samples="2"), r"option samples='2': expected int \(ProfileConfig\)"),
    (lambda: diffpro.profile("random:dit-tiny", "unused", cfg_scale="1.5"), "option cfg_scale='1.5': expected float"),
    (lambda: diffpro.profile("random:dit-tiny", "unused", classes=3), r"option classes=3: expected list\[int\] \| None"),
    (lambda: diffpro.allocate("random:dit-tiny", "unused", protect="attn"), r"option protect='attn': expected list\[str\]"),
    (lambda: diffpro.quantize("random:dit-tiny", "unused", bits=True), "option bits=True: expected int | None"),
    (lambda: diffpro.profile("random:dit-tiny", "unused", seed="a"), "seed 'a': use an integer"),
    (lambda: diffpro.load("random:dit-tiny", seed="a"), "seed 'a': use an integer"),
])
def test_stage_options_of_the_wrong_type_are_one_usage_error(call, problem):
    # catches: samples="2" failing as "'<' not supported between 'str' and 'int'" inside the profile stage,
    # protect="attn" read letter by letter as roles, seed="a" as int()'s ValueError in the model builder
    with pytest.raises(UsageError, match=problem):
        call()


def test_options_of_the_annotated_types_pass_the_check():
    # catches: the type check refusing what the stages take (ints for floats, tuples for lists, None)
    from diffpro_cli.api import _config
    from diffpro_cli.stages.allocate import AllocateConfig
    from diffpro_cli.stages.profile import ProfileConfig

    cfg = _config(ProfileConfig, {"samples": 2, "cfg_scale": 2, "classes": (1, 2)})
    assert cfg.cfg_scale == 2 and cfg.classes == (1, 2)
    assert _config(AllocateConfig, {"steps": "auto", "group_size": None, "bits": [4, 8]}).steps == "auto"
    assert _config(AllocateConfig, {"steps": 20}).steps == 20


def test_compute_dtype_errors_name_the_value_given():
    # catches: "compute dtype None: ..." for diffpro.load(spec, dtype="float8") (the name looked up on
    # torch, not what the user wrote), and "torch.bfloat16" (str() of the dtype) refused
    model = diffpro.load("random:dit-tiny")
    with pytest.raises(UsageError, match="compute dtype 'float8': use torch.bfloat16, torch.float16 or torch.float32"):
        diffpro.set_compute_dtype(model, "float8")
    with pytest.raises(UsageError, match="compute dtype torch.int8: use"):
        diffpro.load("random:dit-tiny", dtype=torch.int8)
    assert diffpro.set_compute_dtype(model, str(torch.bfloat16)).compute_dtype == torch.bfloat16


def test_weights_with_a_quantized_checkpoint_is_refused_not_ignored(tmp_path):
    # catches: diffpro.load(QDIR, weights=...) silently ignoring the weights (the checkpoint holds its own),
    # where a built-in spec refuses them
    from diffpro_cli.checkpoint import save_quantized
    from diffpro_cli.stages.quantize import uniform_plan

    m = diffpro.load("random:dit-tiny")
    save_quantized(m, uniform_plan(m, 8), tmp_path / "q")
    with pytest.raises(UsageError, match="is a quantized checkpoint that holds its own weights: drop --weights"):
        diffpro.load(tmp_path / "q", weights=tmp_path / "other.safetensors")
    assert diffpro.load(tmp_path / "q") is not None


@pytest.mark.parametrize("scale", ["0.8", None, float("nan"), True])
def test_lora_scale_that_is_not_a_number_is_one_usage_error(scale):
    # catches: scale="0.8" failing as float()'s ValueError after the LoRA was read and parsed (and NaN
    # accepted, turning every adapted layer's output into NaN)
    model = diffpro.load("random:dit-tiny")
    lora = {f"{Q}.lora_A.weight": torch.zeros(2, 32), f"{Q}.lora_B.weight": torch.zeros(32, 2)}
    with pytest.raises(UsageError, match="scale .*: use a finite number"):
        diffpro.load_lora(model, lora, scale=scale)
    assert diffpro.load_lora(model, lora, scale=1) == [Q]


def test_bench_checks_its_paths_and_takes_them_as_strings(tmp_path, monkeypatch):
    # catches: bench(quantized="work/quantized") crashing as "unsupported operand type(s) for /: 'str' and
    # 'str'" inside the stage, and a missing quantized dir / timesteps file as a FileNotFoundError
    # traceback from hashing it, where the CLI says one line
    from diffpro_cli.checkpoint import save_quantized
    from diffpro_cli.errors import InputError
    from diffpro_cli.stages import bench as bench_stage
    from diffpro_cli.stages.quantize import uniform_plan

    with pytest.raises(InputError, match="quantized='/nonexistent': no diffpro.json there"):
        diffpro.bench("random:dit-tiny", tmp_path / "w", quantized="/nonexistent", rows=["fp32"])
    with pytest.raises(InputError, match="timesteps_path='/nonexistent.json': no such file"):
        diffpro.bench("random:dit-tiny", tmp_path / "w", timesteps_path="/nonexistent.json", rows=["fp32"])
    with pytest.raises(UsageError, match="quantized=3: pass a path"):
        diffpro.bench("random:dit-tiny", tmp_path / "w", quantized=3, rows=["fp32"])
    m = diffpro.load("random:dit-tiny")
    save_quantized(m, uniform_plan(m, 8), tmp_path / "q")
    seen = {}
    monkeypatch.setattr(bench_stage, "run_bench", lambda ctx, cfg, quantized, timesteps_path: seen.update(q=quantized))
    monkeypatch.setattr("diffpro_cli.artifacts.read_json", lambda *a, **k: {})
    diffpro.bench("random:dit-tiny", tmp_path / "w", quantized=str(tmp_path / "q"), rows=["fp32"])
    assert seen["q"] == tmp_path / "q" and hasattr(seen["q"], "is_dir")


def test_profiling_a_quantized_checkpoint_says_what_it_is(tmp_path):
    # catches: "has no nn.Linear or nn.Conv2d layer to profile; pass a diffusion model" for a quantized
    # checkpoint (it is one; its layers are integer already), which sends the user looking for the wrong fix
    from diffpro_cli.checkpoint import save_quantized
    from diffpro_cli.errors import InputError
    from diffpro_cli.stages.quantize import uniform_plan

    m = diffpro.load("random:dit-tiny")
    save_quantized(m, uniform_plan(m, 8), tmp_path / "q")
    with pytest.raises(InputError, match="is a diffpro quantized checkpoint .*; profile the float model it was made from"):
        diffpro.profile(tmp_path / "q", tmp_path / "w", samples=2, batch=2, timesteps="999:0:500")


def test_lora_changes_after_compile_are_refused_not_silently_ignored(monkeypatch):
    # catches: load_lora after diffpro.compile returning normally while the compiled graph ignores the new
    # hook (measured: the compiled model's output bit-identical before and after, the eager one 8 % off)
    import dataclasses

    from diffpro_cli.quant import compiled_cuda

    monkeypatch.setattr(compiled_cuda, "compile_model_on", lambda m, device: dataclasses.replace(m))   # no real compile
    model = diffpro.load("random:dit-tiny")
    lora = {f"{Q}.lora_A.weight": torch.zeros(2, 32), f"{Q}.lora_B.weight": torch.zeros(32, 2)}
    assert diffpro.load_lora(model, lora) == [Q]      # before compile: fine
    fast = diffpro.compile(model)
    for call in (lambda: diffpro.load_lora(fast, lora, adapter_name="two"), lambda: diffpro.unload_lora(model.net)):
        with pytest.raises(UsageError, match="was compiled .* load the model again and (load|unload) the LoRA before diffpro.compile"):
            call()
    monkeypatch.setattr(compiled_cuda, "compile_model_on", lambda m, device: m)   # compile unavailable: nothing compiled
    other = diffpro.load("random:dit-tiny")
    assert diffpro.load_lora(diffpro.compile(other), lora) == [Q]
