"""An inference-only load cast with net.to(dtype) (what a diffusers pipeline's .to(torch.bfloat16) does)
computes in that dtype, as the same checkpoint loaded with its integers kept does."""

import torch

import diffpro
from diffpro_cli.checkpoint import load_quantized, save_quantized
from diffpro_cli.quant import formats
from diffpro_cli.quant.layers import Int8Embedding
from diffpro_cli.stages.quantize import uniform_plan


def test_int8_embedding_follows_the_network_dtype():
    # catches: the int8 class-embedding table returning float32 after .to(bf16) (a float table returns bf16)
    q, scale = formats.quantize_weight(torch.randn(11, 24), 8)
    emb, idx = Int8Embedding(q, scale), torch.tensor([0, 10, 3])
    table = formats.dequantize_weight(q, scale)
    assert emb(idx).dtype == torch.float32 and torch.equal(emb(idx), table[idx])
    emb.to(torch.bfloat16)
    assert emb(idx).dtype == torch.bfloat16
    torch.testing.assert_close(emb(idx), table[idx].bfloat16(), rtol=2 ** -7, atol=0)


def test_lean_and_kept_loads_cast_to_bf16_return_the_same_dtype(tmp_path):
    # catches: the lean load (int8 embedding tables) running the network after the class embedding in
    # float32 and returning float32 where the load with integers kept returns bf16
    m = diffpro.load("random:dit-tiny")
    save_quantized(m, uniform_plan(m, 8), tmp_path / "q")
    lean, kept = diffpro.load(tmp_path / "q"), load_quantized(tmp_path / "q", keep_integers=True)
    assert any(isinstance(mod, Int8Embedding) for mod in lean.net.modules())
    x, t, y = torch.randn(2, *m.sample_shape), torch.tensor([900, 30]), torch.tensor([1, 4])
    outs = []
    with torch.no_grad():
        for model in (lean, kept):
            model.net.to(torch.bfloat16)
            outs.append(model.net(x.bfloat16(), timestep=t, class_labels=y).sample)
    assert outs[0].dtype == outs[1].dtype == torch.bfloat16
