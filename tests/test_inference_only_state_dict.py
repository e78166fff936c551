"""An inference-only load (`diffpro.load(QDIR)`: the layers' integers released after packing) refuses
to give a state dict instead of silently giving empty integer weights; a load that keeps them gives
the stored integers."""

import pytest
import torch
from test_quant import _inputs

import diffpro
from diffpro_cli.checkpoint import load_quantized, save_quantized
from diffpro_cli.diffusers_quantizer import _has_accelerate
from diffpro_cli.errors import UsageError
from diffpro_cli.quant.layers import _QuantBase


@pytest.fixture(scope="module")
def qdir(tmp_path_factory):
    from diffpro_cli.loading import load_model
    from diffpro_cli.stages.quantize import uniform_plan

    root = tmp_path_factory.mktemp("released")
    model = load_model("random:dit-tiny")
    plan = uniform_plan(model, 4)
    first = next(iter(plan["layers"]))
    plan["layers"][first]["weight_bits"] = 8     # int8 and packed 4-bit qweights both
    save_quantized(model, plan, root / "q")
    return root / "q"


def test_state_dict_of_an_inference_only_load_is_refused_not_empty(qdir, tmp_path):
    """Bug caught: `torch.save(model.net.state_dict())` of `diffpro.load(QDIR)` wrote every quant
    layer's qweight as an empty tensor (a file that loads as a broken model), with no error."""
    lean = diffpro.load(qdir)
    assert any(m.integers_released for m in lean.net.modules() if isinstance(m, _QuantBase))
    with pytest.raises(UsageError) as err:
        torch.save(lean.net.state_dict(), tmp_path / "sd.pt")
    message = str(err.value)
    assert len(message.splitlines()) == 1 and "inference only" in message and "keep_integers=True" in message
    # refusing leaves the model as it was: it still runs, and equals a load that kept its integers
    full = load_quantized(qdir, keep_integers=True)
    x, t, y = _inputs(lean)
    with torch.no_grad():
        assert torch.equal(lean.eps(x, t, y), full.eps(x, t, y))


def test_a_load_that_keeps_the_integers_gives_the_stored_ones(qdir, tmp_path):
    """Bug caught: the refusal catching full loads too (the documented way to re-save), or their
    state dict holding anything but the checkpoint's integers."""
    from safetensors.torch import load_file

    full = load_quantized(qdir, keep_integers=True)
    torch.save(full.net.state_dict(), tmp_path / "sd.pt")
    state = torch.load(tmp_path / "sd.pt", weights_only=True)
    stored = load_file(str(qdir / "model.safetensors"))
    qkeys = [k for k in stored if k.endswith(".qweight")]
    assert qkeys and all(state[k].numel() > 0 and torch.equal(state[k], stored[k]) for k in qkeys)


@pytest.mark.skipif(not _has_accelerate(), reason="diffusers' quantized loading needs accelerate")
def test_diffusers_loaded_export_refuses_its_state_dict_too(qdir, tmp_path):
    """Bug caught: a `diffpro export --to diffusers` folder loaded by diffusers' own from_pretrained
    (integers released the same way) still handing out empty qweights to torch.save."""
    from diffusers import DiTTransformer2DModel

    from diffpro_cli.export import export_diffusers

    export_diffusers(qdir, tmp_path / "out")
    diffpro.register_diffusers_quantizer()
    net = DiTTransformer2DModel.from_pretrained(tmp_path / "out")
    with pytest.raises(UsageError, match="keep_integers=True"):
        net.state_dict()
    with pytest.raises(ValueError, match="not serializable"):   # diffusers' own refusal (is_serializable)
        net.save_pretrained(tmp_path / "again")


def test_the_public_load_can_keep_the_integers_the_refusal_asks_for(qdir):
    """The refusal told API users to call the private diffpro_cli.checkpoint.load_quantized; diffpro.load
    had no way to keep the integers. Bug caught: keep_integers not reaching the checkpoint load (the
    layers released anyway), or the message naming an API that is not public."""
    lean = diffpro.load(qdir)
    with pytest.raises(UsageError, match=r"diffpro\.load\(path, keep_integers=True\)"):
        lean.net.state_dict()
    kept = diffpro.load(qdir, keep_integers=True)
    layers = [m for m in kept.net.modules() if isinstance(m, _QuantBase)]
    assert layers and not any(m.integers_released for m in layers)
    stored = load_quantized(qdir, keep_integers=True).net.state_dict()
    got = kept.net.state_dict()
    assert set(got) == set(stored) and all(torch.equal(got[k], stored[k]) for k in stored)
    with pytest.raises(UsageError, match="keep_integers='yes'"):
        diffpro.load(qdir, keep_integers="yes")
