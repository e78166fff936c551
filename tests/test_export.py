"""diffpro export: a diffusers folder that loads back identically, and torchao's format."""

import json

import pytest
import torch

import diffpro
from diffpro_cli.export import export_diffusers, export_torchao, torchao_entry


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_dit):
    root = tmp_path_factory.mktemp("export")
    tiny_dit().save_pretrained(root / "dit")
    diffpro.quantize(str(root / "dit"), root / "work", bits=8, float_act=[], out_dir=root / "q")   # all-integer W8A8
    return root


def _eps(model):
    torch.manual_seed(1)
    x = torch.randn(2, *model.sample_shape)
    with torch.no_grad():
        return model.eps(x, torch.tensor([900, 30]), torch.tensor([1, 2]))


def test_diffusers_export_carries_config_and_quantization_config_and_loads_back_identically(checkpoint, cli):
    out = checkpoint / "exported"
    code, stdout, err = cli("export", checkpoint / "q", out, "--to", "diffusers", "--json")
    assert code == 0, err
    config = json.loads((out / "config.json").read_text())
    assert config["_class_name"] == "DiTTransformer2DModel" and config["num_layers"] == 2
    q = config["quantization_config"]
    assert q["quant_method"] == "diffpro" and q["format"] == "diffpro.quantized/1"
    assert q["layers"] and all(e["weight_bits"] == 8 for e in q["layers"].values())
    assert torch.equal(_eps(diffpro.load(out)), _eps(diffpro.load(checkpoint / "q")))
    # the integer file is the checkpoint's own (no float copy): same size
    assert (out / "model.safetensors").stat().st_size == (checkpoint / "q" / "model.safetensors").stat().st_size
    code, _, err = cli("export", checkpoint / "q", out, "--to", "diffusers")
    assert code == 2 and err.startswith("error:") and "--force" in err and len(err.strip().splitlines()) == 1


def test_export_refuses_a_folder_that_is_not_a_checkpoint(tmp_path, cli):
    code, _, err = cli("export", tmp_path, tmp_path / "out", "--to", "diffusers")
    assert code == 3 and "diffpro quantize" in err and not (tmp_path / "out").exists()
    code, _, err = cli("export", tmp_path, tmp_path / "out", "--to", "onnx")
    assert code == 2 and "diffusers or torchao" in err


def test_a_failed_export_leaves_nothing_at_out_and_a_file_as_out_is_one_line(checkpoint, cli, tmp_path):
    """Catches: a corrupt checkpoint copied into OUT before it was checked (a half-written export left
    behind); an existing OUT replaced by a failed --force export; OUT that is a file ending in a traceback."""
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(checkpoint / "q", bad)
    (bad / "model.safetensors").write_bytes((checkpoint / "q" / "model.safetensors").read_bytes()[:100])
    for target in ("diffusers", "torchao"):
        code, _, err = cli("export", bad, tmp_path / f"out-{target}", "--to", target)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert code == 3 and len(lines) == 1 and lines[0].startswith("error:") and "model.safetensors" in lines[0], err
        assert not (tmp_path / f"out-{target}").exists()
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "mine.txt").write_text("x")
    code, _, err = cli("export", bad, kept, "--to", "diffusers", "--force")
    assert code == 3 and (kept / "mine.txt").read_text() == "x"            # a failed --force keeps the old folder
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []   # no staging folder left over
    (tmp_path / "afile").write_text("x")
    code, _, err = cli("export", checkpoint / "q", tmp_path / "afile", "--to", "torchao")
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and "is a file" in lines[0], err
    code, _, err = cli("export", checkpoint / "q", kept, "--to", "torchao", "--force")   # a good --force replaces it
    assert code == 0, err
    assert sorted(p.name for p in kept.iterdir()) == ["model.safetensors", "torchao_config.json"]


def test_torchao_mapping_follows_each_layers_precision():
    assert torchao_entry({"weight_bits": 8, "act_bits": 8, "act_mode": "dynamic"}, "linear")[0]["type"] == "Int8DynamicActivationInt8WeightConfig"
    assert torchao_entry({"weight_bits": 8, "act_bits": 16}, "linear")[0]["type"] == "Int8WeightOnlyConfig"
    four = torchao_entry({"weight_bits": 4, "act_bits": 8, "act_mode": "dynamic", "group_size": 32}, "linear")[0]
    assert four == {"type": "Int8DynamicActivationIntxWeightConfig", "kwargs": {"weight_dtype": "int4", "group_size": 32}}
    assert torchao_entry({"weight_bits": 4, "act_bits": 16}, "linear")[0]["type"] == "IntxWeightOnlyConfig"
    assert torchao_entry({"weight_bits": 8, "act_bits": 8}, "conv2d")[0] is None
    assert torchao_entry({"weight_bits": 8, "act_bits": 8, "act_mode": "static"}, "linear")[0] is None
    assert torchao_entry({"weight_bits": 16, "act_bits": 16}, "linear")[0] is None


def test_torchao_export_float_weights_are_diffpros_dequantized_integers(checkpoint, tiny_dit):
    from safetensors.torch import load_file

    out = checkpoint / "ao"
    doc = export_torchao(checkpoint / "q", out)
    assert doc["fqn_to_config"] and all(v["type"] == "Int8DynamicActivationInt8WeightConfig" for v in doc["fqn_to_config"].values())
    assert all("Conv2d" in why for why in doc["skipped"].values())    # the patch embedding
    net = tiny_dit()
    missing, unexpected = net.load_state_dict(load_file(str(out / "model.safetensors")), strict=False)
    assert not unexpected and not missing
    from diffpro_cli.checkpoint import load_quantized

    q = load_quantized(checkpoint / "q", keep_integers=True)
    for name in doc["fqn_to_config"]:
        w = net.get_submodule(name).weight
        assert torch.equal(w, q.net.get_submodule(name).dequantized_weight().reshape(w.shape)), name
    scale = (w.abs().amax(dim=1, keepdim=True) / 127)
    assert torch.allclose(w / scale, (w / scale).round(), atol=1e-3)    # on the int8 grid


def test_torchao_quantize_runs_the_exported_mapping(checkpoint, tiny_dit):
    pytest.importorskip("torchao")
    from safetensors.torch import load_file
    from torchao.quantization import quantize_

    from diffpro_cli.export import torchao_config

    out = checkpoint / "ao2"
    export_torchao(checkpoint / "q", out)
    net = tiny_dit()
    net.load_state_dict(load_file(str(out / "model.safetensors")))
    x = torch.randn(2, 4, 8, 8)
    t, y = torch.tensor([900, 30]), torch.tensor([1, 2])
    with torch.no_grad():
        ref = net(x, timestep=t, class_labels=y).sample
        quantize_(net, torchao_config(out), filter_fn=None)
        got = net(x, timestep=t, class_labels=y).sample
    assert type(net.get_submodule(next(iter(json.loads((out / "torchao_config.json").read_text())["fqn_to_config"])))).__name__ == "Linear"
    rel = float((got - ref).norm() / ref.norm())
    assert 0 < rel < 0.2


def test_exported_schedule_drives_diffusers_euler_to_diffpros_ddim_samples(tmp_path):
    """The plan's (non-uniform) timesteps reach diffusers: EulerDiscreteScheduler on them is DDIM (eta 0)
    on the same subset. Measured 3e-5 relative on the built-in DiT over 25 steps: diffusers' Euler works
    in sigma space in float32 (x + (sigma' - sigma) * eps with sigma_max ~ 157), which is its own floor."""
    from diffpro_cli.export import diffusers_scheduler
    from diffpro_cli.sampling import SamplerConfig, sample, sample_generators

    ts = [0, 20, 41, 81, 163, 245, 327, 409, 491, 573, 654, 736, 818, 900, 999]   # not uniformly spaced
    (tmp_path / "timesteps.json").write_text(json.dumps({"schema": "diffpro.timesteps/1", "timesteps": ts}))
    # weight-only: int8 activation rounding would turn float32 differences of 1e-7 into 1e-2 (the
    # scheduler is under test here, not the kernels)
    diffpro.quantize("builtin:dit-mnist", tmp_path / "work", bits=8, act_bits=16, timesteps_path=tmp_path / "timesteps.json",
                     out_dir=tmp_path / "q")
    export_diffusers(tmp_path / "q", tmp_path / "out")
    schedule = json.loads((tmp_path / "out" / "diffpro_schedule.json").read_text())
    assert schedule["timesteps"] == sorted(ts, reverse=True)
    model = diffpro.load(tmp_path / "out")
    ours = sample(model, 2, ts, SamplerConfig(method="ddim", clip_x0=False), seed=3, batch_size=2, decode=False)
    sched = diffusers_scheduler(tmp_path / "out")
    assert [int(t) for t in sched.timesteps] == sorted(ts, reverse=True)
    x = torch.stack([torch.randn(model.sample_shape, generator=g) for g in sample_generators(3, [0, 1])])
    x = x * sched.init_noise_sigma
    with torch.no_grad():
        for t in sched.timesteps:
            eps = model.eps(sched.scale_model_input(x, t), t.long().expand(2), torch.tensor([0, 1]))
            x = sched.step(eps, t, x).prev_sample
    rel = float((x - ours).norm() / ours.norm())
    assert rel < 1e-4, rel
