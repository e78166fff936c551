"""diffusers' own from_pretrained on a `diffpro export --to diffusers` folder, after
`diffpro.register_diffusers_quantizer()`: the same integer network `diffpro.load` rebuilds."""

import json
import shutil

import pytest
import torch

import diffpro
from diffpro_cli.diffusers_quantizer import _has_accelerate
from diffpro_cli.errors import InputError, UsageError
from diffpro_cli.export import export_diffusers
from diffpro_cli.quant.layers import Int8Embedding, QuantConv2d, QuantLinear

needs_accelerate = pytest.mark.skipif(not _has_accelerate(), reason="diffusers' quantized loading needs accelerate")


@pytest.fixture(scope="module")
def exports(tmp_path_factory, tiny_dit):
    """Two exports of one tiny DiT: all-integer W8A8, and packed 4-bit weights (groups of 8) with
    per-timestep calibrated (static) int8 activations."""
    root = tmp_path_factory.mktemp("dq")
    tiny_dit().save_pretrained(root / "dit")
    diffpro.quantize(str(root / "dit"), root / "w8", bits=8, float_act=[], out_dir=root / "q8")
    diffpro.quantize(str(root / "dit"), root / "w4", bits=4, group_size=8, act_mode="static", float_act=[],
                     calib_samples=2, calib_steps=4, out_dir=root / "q4")
    for name in ("q8", "q4"):
        export_diffusers(root / name, root / f"out-{name}")
    diffpro.register_diffusers_quantizer()
    return root


def _forward(net):
    torch.manual_seed(1)
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        return net(x, timestep=torch.tensor([900, 30]), class_labels=torch.tensor([1, 2])).sample


@needs_accelerate
@pytest.mark.parametrize("name", ["q8", "q4"])
def test_from_pretrained_is_diffpros_integer_network(exports, name):
    """Bugs caught: a float network returned (layers not swapped, or weights dequantized); integers
    placed under the wrong layer or cast through torch_dtype (forward differs from diffpro.load);
    packed 4-bit or static-range buffers mis-read; q/k/v fusion or int8 embeddings skipped (a
    different module tree than diffpro.load's); the static layers' timestep hook missing (forward
    differs at mixed timesteps)."""
    from diffusers import DiTTransformer2DModel

    out = exports / f"out-{name}"
    net = DiTTransformer2DModel.from_pretrained(out)
    ref = diffpro.load(out).net
    assert torch.equal(_forward(net), _forward(ref))
    records = json.loads((out / "diffpro.json").read_text())["layers"]
    assert records and all(isinstance(net.get_submodule(n), (QuantLinear, QuantConv2d)) for n in records)
    assert not any(type(m) in (torch.nn.Linear, torch.nn.Conv2d) for m in net.modules())   # all planned here
    for layer_name, record in records.items():
        layer, twin = net.get_submodule(layer_name), ref.get_submodule(layer_name)
        assert (layer.weight_bits, layer.act_mode, layer.group_size) == (record["weight_bits"], record["act_mode"], record["group_size"])
        assert layer.kernel_name == twin.kernel_name, layer_name       # same kernel, same fused group
    assert {type(m).__name__ for m in net.modules()} == {type(m).__name__ for m in ref.modules()}
    assert any(isinstance(m, Int8Embedding) for m in net.modules())
    assert net.config.quantization_config.quant_method == "diffpro" and not net.hf_quantizer.is_serializable


@needs_accelerate
def test_missing_diffpro_json_is_one_clear_error(exports, tmp_path):
    """Bug caught: a folder that says quant_method 'diffpro' but lacks diffpro.json loading as a
    half-initialised or float network, or failing deep inside diffusers with a KeyError."""
    from diffusers import DiTTransformer2DModel

    broken = tmp_path / "broken"
    shutil.copytree(exports / "out-q8", broken)
    (broken / "diffpro.json").unlink()
    with pytest.raises(InputError) as err:
        DiTTransformer2DModel.from_pretrained(broken)
    message = str(err.value)
    assert "diffpro.json" in message and "diffpro export" in message and len(message.splitlines()) == 1


@needs_accelerate
def test_a_float_torch_dtype_is_refused(exports):
    """Bug caught: torch_dtype=float16 silently casting the stored scales (a different integer grid)."""
    from diffusers import DiTTransformer2DModel

    with pytest.raises(UsageError, match="float32"):
        DiTTransformer2DModel.from_pretrained(exports / "out-q8", torch_dtype=torch.float16)


@pytest.mark.skipif(_has_accelerate(), reason="accelerate is installed here")
def test_without_accelerate_the_error_says_what_to_do(exports):
    """Bug caught: diffusers' own 'low_cpu_mem_usage cannot be False' message, which names neither
    accelerate nor the diffpro.load alternative."""
    from diffusers import DiTTransformer2DModel

    with pytest.raises(UsageError, match="pip install accelerate.*diffpro.load"):
        DiTTransformer2DModel.from_pretrained(exports / "out-q8")


def test_export_links_the_weights_under_diffusers_name(exports, tmp_path):
    """Bug caught: diffusers finds no diffusion_pytorch_model.safetensors (it never reads
    model.safetensors), or a re-export leaves a stale copy of old weights under that name."""
    out = tmp_path / "out"
    export_diffusers(exports / "q8", out)
    linked, own = out / "diffusion_pytorch_model.safetensors", out / "model.safetensors"
    assert linked.read_bytes() == own.read_bytes()
    export_diffusers(exports / "q4", out, force=True)
    assert linked.read_bytes() == own.read_bytes() == (exports / "q4" / "model.safetensors").read_bytes()
