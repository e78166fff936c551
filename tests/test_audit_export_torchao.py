"""torchao_config(OUT) builds configs torchao accepts for every precision diffpro maps to torchao, on
diffpro's own weight grid (its groups, or one scale per output channel)."""

import pytest
import torch

import diffpro
from diffpro_cli.export import export_torchao, torchao_config

pytest.importorskip("torchao")

# (quantize options, the torchao config every Linear maps to)
CASES = {
    "w4a8-per-channel": ({"bits": 4, "act_bits": 8}, "Int8DynamicActivationIntxWeightConfig"),
    "w4-groups": ({"bits": 4, "group_size": 8, "act_bits": 16}, "IntxWeightOnlyConfig"),
    "w8-groups": ({"bits": 8, "group_size": 8, "act_bits": 16}, "Int8WeightOnlyConfig"),
    "w8a8-groups": ({"bits": 8, "group_size": 8, "act_bits": 8}, "Int8DynamicActivationIntxWeightConfig"),
}


@pytest.fixture(scope="module")
def dit_dir(tmp_path_factory, tiny_dit):
    root = tmp_path_factory.mktemp("ao")
    tiny_dit().save_pretrained(root / "dit")   # 16-wide layers: narrower than torchao's default groups of 32
    return root


@pytest.mark.parametrize("case", list(CASES))
def test_torchao_quantize_accepts_the_config_on_diffpros_grid(dit_dir, tiny_dit, case):
    """Bugs caught: a grouped 4-bit weight-only export made IntxWeightOnlyConfig(weight_granularity=...)
    (TypeError: unexpected keyword); a per-channel W4A8 export left torchao's default groups of 32 (another
    grid than diffpro's, and an AssertionError on layers 16 wide); a grouped int8 weight-only export lost
    its groups (torchao per-row), and so did a grouped W8A8 one (Int8DynamicActivationInt8WeightConfig has
    per-row weights only; the int8 x intx config takes groups)."""
    from safetensors.torch import load_file
    from torchao.quantization import quantize_

    options, config = CASES[case]
    diffpro.quantize(str(dit_dir / "dit"), dit_dir / f"w-{case}", float_act=[], out_dir=dit_dir / case, **options)
    out = dit_dir / f"ao-{case}"
    doc = export_torchao(dit_dir / case, out)
    assert doc["fqn_to_config"] and {e["type"] for e in doc["fqn_to_config"].values()} == {config}
    net = tiny_dit()
    net.load_state_dict(load_file(str(out / "model.safetensors")))
    quantize_(net, torchao_config(out), filter_fn=None)
    group = options.get("group_size")
    for fqn in doc["fqn_to_config"]:
        weight = net.get_submodule(fqn).weight
        assert tuple(weight.block_size) == (1, group or weight.shape[1]), (fqn, weight.block_size)
    x = torch.randn(2, 4, 8, 8)
    t, y = torch.tensor([900, 30]), torch.tensor([1, 2])
    with torch.no_grad():
        got = net(x, timestep=t, class_labels=y).sample
        ref = diffpro.load(dit_dir / case).net(x, timestep=t, class_labels=y).sample
    rel = float((got - ref).norm() / ref.norm())
    assert rel < 0.2, rel    # torchao re-rounds diffpro's integers on its own grid: close, not equal
