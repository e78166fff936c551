"""Model loaders: random archs, diffusers dirs/pipelines, original DiT checkpoints, module:factory.

Every model here is tiny and built in-process; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import math
import textwrap

import pytest
import torch
import torch.nn.functional as F

from diffpro_cli.app import main
from diffpro_cli.errors import InputError, TrustError
from diffpro_cli.loading import load_model
from diffpro_cli.models.diffusers_dir import load_diffusers_dir
from diffpro_cli.models.original_dit import infer_dit_config, load_original_dit, to_original_layout
from diffpro_cli.models.random_arch import load_random

torch.set_num_threads(1)

TINY_DIT = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2,
                sample_size=8, patch_size=2, num_embeds_ada_norm=10)
TINY_UNET = dict(sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(16, 32),
                 down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                 norm_num_groups=8, attention_head_dim=8)


def tiny_dit(seed=0):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    return DiTTransformer2DModel(**TINY_DIT).eval()


def tiny_unet(seed=0, **extra):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(**(TINY_UNET | extra)).eval()


def inputs(c=4, size=8, batch=2, classes=10):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, c, size, size, generator=g)
    t = torch.tensor([3, 917][:batch])
    y = torch.tensor([1, 7][:batch]) if classes else None
    return x, t, y


def run_cli(args, capsys):
    code = main(args)
    err = capsys.readouterr().err
    return code, err


def assert_one_error_line(err):
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


# ---------------------------------------------------------------------------------------------
# random:ARCH
# ---------------------------------------------------------------------------------------------


def test_random_tiny_dit_is_seeded_and_runs():
    m = load_random("dit-tiny", seed=3)
    assert m.kind == "dit" and m.random_weights and m.num_classes == 10 and m.sample_shape == (4, 8, 8)
    x, t, y = inputs()
    with torch.no_grad():
        eps = m.eps(x, t, y)
        eps_null = m.eps(x, t, None)  # None → the null label
    assert eps.shape == x.shape and torch.isfinite(eps).all() and not torch.equal(eps, eps_null)
    again = load_random("dit-tiny", seed=3)
    other = load_random("dit-tiny", seed=4)
    assert all(torch.equal(a, b) for a, b in zip(m.net.parameters(), again.net.parameters()))
    assert m.sha256 == again.sha256 != other.sha256
    assert load_model("random:dit-tiny", seed=3).sha256 == m.sha256


def test_random_tiny_unet_runs_unconditional():
    m = load_random("unet-tiny")
    assert m.kind == "unet" and m.num_classes is None and m.sample_shape == (3, 16, 16)
    x, t, _ = inputs(c=3, size=16)
    with torch.no_grad():
        assert m.eps(x, t, None).shape == x.shape


def test_random_public_configs_match_the_published_models():
    s = load_random("dit-s-2")  # DiT-S/2: 12 x 384, 6 heads
    cfg = s.net.config
    assert (cfg.num_layers, cfg.num_attention_heads * cfg.attention_head_dim, cfg.patch_size, cfg.out_channels) == (12, 384, 2, 8)
    assert s.sample_shape == (4, 32, 32) and s.num_classes == 1000
    u = load_random("unet-ddpm-32")  # google/ddpm-cifar10-32 has 35.7M parameters
    assert abs(sum(p.numel() for p in u.net.parameters()) / 1e6 - 35.7) < 0.1


def test_random_unknown_arch_lists_valid_ones():
    with pytest.raises(InputError, match="random:dit-xl-2.*random:unet-ddpm-32"):
        load_random("dit-huge")


# ---------------------------------------------------------------------------------------------
# diffusers directories and pipelines
# ---------------------------------------------------------------------------------------------


def test_diffusers_dit_dir_matches_in_memory_model(tmp_path):
    net = tiny_dit()
    net.save_pretrained(tmp_path / "dit")
    m = load_model(str(tmp_path / "dit"))
    assert m.kind == "dit" and m.num_classes == 10 and m.sample_shape == (4, 8, 8) and not m.random_weights
    assert len(m.sha256) == 64 and m.alphas_cumprod.dtype == torch.float64
    x, t, y = inputs()
    with torch.no_grad():
        ref = net(x, timestep=t, class_labels=y).sample[:, :4]
        assert torch.equal(m.eps(x, t, y), ref)
    # facebook/DiT-* configs use the legacy class name
    cfg_file = tmp_path / "dit" / "config.json"
    cfg_file.write_text(cfg_file.read_text().replace('"DiTTransformer2DModel"', '"Transformer2DModel"'))
    with torch.no_grad():
        assert torch.equal(load_diffusers_dir(tmp_path / "dit").eps(x, t, y), ref)


def test_diffusers_unet_dir_bin_weights_with_classes(tmp_path):
    net = tiny_unet(num_class_embeds=11)
    net.save_pretrained(tmp_path / "unet", safe_serialization=False)  # .bin: read with weights_only=True
    m = load_diffusers_dir(tmp_path / "unet")
    assert m.kind == "unet" and m.num_classes == 10 and m.sample_shape == (3, 16, 16)
    x, t, y = inputs(c=3, size=16)
    with torch.no_grad():
        assert torch.equal(m.eps(x, t, y), net(x, t, class_labels=y).sample)
        null = torch.full((2,), 10)
        assert torch.equal(m.eps(x, t, None), net(x, t, class_labels=null).sample)


def test_ddpm_pipeline_dir_uses_scheduler_config(tmp_path):
    from diffusers import DDPMPipeline, DDPMScheduler

    net = tiny_unet()
    sched = DDPMScheduler(num_train_timesteps=500, beta_schedule="squaredcos_cap_v2")
    DDPMPipeline(unet=net, scheduler=sched).save_pretrained(tmp_path / "pipe")
    m = load_model(str(tmp_path / "pipe"))
    assert m.kind == "unet" and m.num_classes is None and m.num_train_timesteps == 500
    assert torch.allclose(m.alphas_cumprod.float(), sched.alphas_cumprod, atol=1e-6)
    x, t, _ = inputs(c=3, size=16)
    with torch.no_grad():
        assert torch.equal(m.eps(x, t), net(x, t).sample)


def test_dit_pipeline_dir_with_vae_decodes(tmp_path):
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8, latent_channels=4,
                        sample_size=16).eval()
    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    DiTPipeline(transformer=tiny_dit(), vae=vae, scheduler=sched).save_pretrained(tmp_path / "pipe")
    # old VAE checkpoints (e.g. sd-vae-ft-ema) name the attention layers query/key/value/proj_attn
    vae_file = tmp_path / "pipe" / "vae" / "diffusion_pytorch_model.safetensors"
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    state = {}
    for k, v in load_file(str(vae_file)).items():
        for new_name, old_name in old.items():
            k = k.replace(f".{new_name}.", f".{old_name}.")
        state[k] = v
    assert any(".query." in k for k in state)
    save_file(state, str(vae_file))
    m = load_diffusers_dir(tmp_path / "pipe")
    assert m.kind == "dit" and m.config["vae"] == {"scaling_factor": 0.18215}
    assert torch.allclose(m.alphas_cumprod.float(), sched.alphas_cumprod, atol=1e-6)
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        assert torch.equal(m.decode(z), vae.decode(z / 0.18215).sample)


def test_diffusers_dir_errors(tmp_path):
    tiny_dit().save_pretrained(tmp_path / "dit")
    (tmp_path / "dit" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(InputError, match="no weights file"):
        load_diffusers_dir(tmp_path / "dit")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        load_diffusers_dir(tmp_path / "bad")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no config.json or model_index.json"):
        load_diffusers_dir(tmp_path / "empty")


# ---------------------------------------------------------------------------------------------
# Original DiT checkpoints
# ---------------------------------------------------------------------------------------------


def reference_dit(sd, x, t, y, heads):
    """The original facebookresearch/DiT forward pass, written from the paper's equations on the
    original state-dict layout (independent of diffusers): sincos timestep features cat[cos, sin] with
    frequencies exp(-ln(1e4) i / half), adaLN-Zero blocks x + gate * f(LN(x) * (1 + scale) + shift)."""
    def lin(v, name):
        return F.linear(v, sd[name + ".weight"], sd[name + ".bias"])

    def modulate(v, shift, scale):
        return v * (1 + scale[:, None]) + shift[:, None]

    patch = sd["x_embedder.proj.weight"].shape[-1]
    h = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=patch)
    h = h.flatten(2).transpose(1, 2) + sd["pos_embed"]
    B, N, D = h.shape
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    temb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    c = lin(F.silu(lin(temb, "t_embedder.mlp.0")), "t_embedder.mlp.2") + sd["y_embedder.embedding_table.weight"][y]
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    for i in range(depth):
        p = f"blocks.{i}."
        shift1, scale1, gate1, shift2, scale2, gate2 = lin(F.silu(c), p + "adaLN_modulation.1").chunk(6, dim=1)
        a = modulate(F.layer_norm(h, (D,), eps=1e-6), shift1, scale1)
        q, k, v = lin(a, p + "attn.qkv").reshape(B, N, 3, heads, D // heads).permute(2, 0, 3, 1, 4)
        att = ((q @ k.transpose(-2, -1)) * (D // heads) ** -0.5).softmax(dim=-1)
        h = h + gate1[:, None] * lin((att @ v).transpose(1, 2).reshape(B, N, D), p + "attn.proj")
        m = modulate(F.layer_norm(h, (D,), eps=1e-6), shift2, scale2)
        h = h + gate2[:, None] * lin(F.gelu(lin(m, p + "mlp.fc1"), approximate="tanh"), p + "mlp.fc2")
    shift, scale = lin(F.silu(c), "final_layer.adaLN_modulation.1").chunk(2, dim=1)
    h = lin(modulate(F.layer_norm(h, (D,), eps=1e-6), shift, scale), "final_layer.linear")
    g = int(N ** 0.5)
    cout = h.shape[-1] // patch ** 2
    return h.reshape(B, g, g, patch, patch, cout).permute(0, 5, 1, 3, 2, 4).reshape(B, cout, g * patch, g * patch)


def random_original_state(hidden=32, depth=2, patch=2, cin=4, classes=10, grid=4, seed=0):
    """A random checkpoint in the original layout (the shapes DiT's own model.py creates)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.2

    sd = {"x_embedder.proj.weight": r(hidden, cin, patch, patch), "x_embedder.proj.bias": r(hidden),
          "pos_embed": r(1, grid * grid, hidden),
          "t_embedder.mlp.0.weight": r(hidden, 256), "t_embedder.mlp.0.bias": r(hidden),
          "t_embedder.mlp.2.weight": r(hidden, hidden), "t_embedder.mlp.2.bias": r(hidden),
          "y_embedder.embedding_table.weight": r(classes + 1, hidden),
          "final_layer.linear.weight": r(patch * patch * 2 * cin, hidden), "final_layer.linear.bias": r(patch * patch * 2 * cin),
          "final_layer.adaLN_modulation.1.weight": r(2 * hidden, hidden), "final_layer.adaLN_modulation.1.bias": r(2 * hidden)}
    for i in range(depth):
        p = f"blocks.{i}."
        sd |= {p + "attn.qkv.weight": r(3 * hidden, hidden), p + "attn.qkv.bias": r(3 * hidden),
               p + "attn.proj.weight": r(hidden, hidden), p + "attn.proj.bias": r(hidden),
               p + "mlp.fc1.weight": r(4 * hidden, hidden), p + "mlp.fc1.bias": r(4 * hidden),
               p + "mlp.fc2.weight": r(hidden, 4 * hidden), p + "mlp.fc2.bias": r(hidden),
               p + "adaLN_modulation.1.weight": r(6 * hidden, hidden), p + "adaLN_modulation.1.bias": r(6 * hidden)}
    return sd


def test_original_dit_matches_reference_forward(tmp_path):
    sd = random_original_state()
    torch.save(sd, tmp_path / "DiT-tiny.pt")
    m = load_original_dit(tmp_path / "DiT-tiny.pt", heads=2)
    assert m.kind == "dit" and m.num_classes == 10 and m.sample_shape == (4, 8, 8)
    assert m.net.config.num_layers == 2 and m.net.config.out_channels == 8
    x, t, y = inputs()
    with torch.no_grad():
        out = m.forward_fn(m.net, x, t, y)
        ref = reference_dit(sd, x, t, y, heads=2)
    assert (out - ref).abs().max() < 1e-5 * ref.abs().max()


def test_original_dit_training_checkpoint_and_safetensors(tmp_path):
    from safetensors.torch import save_file

    sd = random_original_state(seed=1)
    ema = {k: v + 1 for k, v in sd.items()}
    torch.save({"model": sd, "ema": ema, "args": argparse.Namespace(model="DiT-tiny")}, tmp_path / "ckpt.pt")
    m = load_original_dit(tmp_path / "ckpt.pt", heads=2)
    assert m.config["wrapper"] == "ema"
    save_file(ema, str(tmp_path / "ema.safetensors"))
    s = load_original_dit(tmp_path / "ema.safetensors", heads=2)
    assert all(torch.equal(a, b) for a, b in zip(m.net.state_dict().values(), s.net.state_dict().values()))


def test_original_layout_round_trip(tmp_path):
    net = tiny_dit(seed=5)
    # the original layout shares one embedder: make every block use block 0's, as a converted model does
    for blk in net.transformer_blocks[1:]:
        blk.norm1.emb.load_state_dict(net.transformer_blocks[0].norm1.emb.state_dict())
    orig = to_original_layout(net.state_dict(), pos_embed=net.pos_embed.pos_embed)
    torch.save(orig, tmp_path / "rt.pt")
    m = load_original_dit(tmp_path / "rt.pt", heads=2, diffusers_compat=True)
    assert all(torch.equal(v, m.net.state_dict()[k]) for k, v in net.state_dict().items())
    x, t, y = inputs()
    with torch.no_grad():
        assert torch.equal(m.forward_fn(m.net, x, t, y), net(x, timestep=t, class_labels=y).sample)
    back = to_original_layout(m.net.state_dict(), pos_embed=m.net.pos_embed.pos_embed)
    assert back.keys() == orig.keys() and all(torch.equal(back[k], orig[k]) for k in orig)
    with pytest.raises(InputError, match="shared embedder"):
        to_original_layout(tiny_dit().state_dict())  # independent per-block embedders


def test_original_dit_infers_heads_from_hidden_size():
    shapes = random_original_state(hidden=384, depth=1, grid=16)
    cfg = infer_dit_config(shapes)
    assert (cfg["num_attention_heads"], cfg["attention_head_dim"], cfg["sample_size"]) == (6, 64, 32)
    assert infer_dit_config(shapes, heads=12)["attention_head_dim"] == 32


def test_original_dit_rejects_other_layouts(tmp_path):
    torch.save(tiny_dit().state_dict(), tmp_path / "diffusers.pt")
    with pytest.raises(InputError, match="diffusers DiT state dict"):
        load_original_dit(tmp_path / "diffusers.pt")
    torch.save({"encoder.weight": torch.ones(2)}, tmp_path / "other.pt")
    with pytest.raises(InputError, match="missing x_embedder.proj.weight"):
        load_original_dit(tmp_path / "other.pt")


# ---------------------------------------------------------------------------------------------
# module:factory and CLI error handling
# ---------------------------------------------------------------------------------------------

FACTORY_SOURCE = textwrap.dedent('''
    import torch
    from torch import nn

    class TinyEps(nn.Module):
        sample_shape = (1, 4, 4)

        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.conv = nn.Conv2d(1, 1, 3, padding=1)
            self.temb = nn.Linear(1, 1)

        def forward(self, x, t, y):
            return self.conv(x) + self.temb(t.float()[:, None] / 1000)[:, :, None, None]

    def factory():
        return TinyEps()

    class NoShape(TinyEps):
        sample_shape = None

    def factory_tuple():
        return NoShape(), (1, 4, 4)
''')


@pytest.fixture
def factory_module(tmp_path, monkeypatch):
    (tmp_path / "diffpro_test_factory_mod.py").write_text(FACTORY_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "diffpro_test_factory_mod"
    import sys

    sys.modules.pop("diffpro_test_factory_mod", None)


def test_custom_needs_trust_code(factory_module, capsys):
    code, err = run_cli(["models", f"{factory_module}:factory"], capsys)
    assert code == TrustError.exit_code
    assert_one_error_line(err)
    assert "--trust-code" in err


@pytest.mark.parametrize("source,needle", [
    ("def factory():\n    raise RuntimeError('no GPU here\\nsecond line')\n", "factory() raised RuntimeError: no GPU here"),
    ("raise ValueError('bad config at import')\n", "raised ValueError: bad config at import"),
    ("import sys\nsys.exit(2)\n", "raised SystemExit: 2"),                 # a script's argparse at import
    ("import diffpro_no_such_dependency\n", "imports diffpro_no_such_dependency, which is not installed"),
    ("import diffpro\ndef factory():\n    return diffpro.load('no/such/model')\n", "error: no/such/model: no such model"),   # diffpro's own error, not re-wrapped
])
def test_custom_factory_or_module_that_raises_is_one_error_line(tmp_path, monkeypatch, capsys, source, needle):
    """A factory (or its module's import) that raised printed the whole traceback with exit 1, as if
    diffpro had a bug; the user's code failed, so: one line with the exception and how to see its traceback."""
    import sys

    (tmp_path / "diffpro_test_raising_mod.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        code, err = run_cli(["models", "diffpro_test_raising_mod:factory", "--trust-code"], capsys)
    finally:
        sys.modules.pop("diffpro_test_raising_mod", None)
    assert code == InputError.exit_code and needle in assert_one_error_line(err) and "second line" not in err


def test_custom_with_trust_code_and_weights(factory_module, tmp_path, capsys):
    from safetensors.torch import save_file

    assert main(["models", f"{factory_module}:factory", "--trust-code"]) == 0
    m = load_model(f"{factory_module}:factory", trust_code=True)
    assert m.kind == "custom" and m.sample_shape == (1, 4, 4) and m.num_classes is None and m.sha256 is None
    state = {k: v + 0.5 for k, v in m.net.state_dict().items()}
    save_file(state, str(tmp_path / "w.safetensors"))
    w = load_model(f"{factory_module}:factory", trust_code=True, weights=tmp_path / "w.safetensors")
    assert torch.equal(w.net.conv.weight, state["conv.weight"]) and len(w.sha256) == 64
    x = torch.randn(2, 1, 4, 4)
    with torch.no_grad():
        assert w.eps(x, torch.tensor([1, 2])).shape == x.shape
    t = load_model(f"{factory_module}:factory_tuple", trust_code=True)
    assert t.sample_shape == (1, 4, 4)


class NotWeights:
    """Pickled by a test: loading it needs this class, so weights_only refuses it."""


def test_cli_bad_files_give_one_error_line(tmp_path, capsys):
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00garbage!")
    torch.save({"thing": NotWeights()}, tmp_path / "code.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    (tmp_path / "trunc.pt").write_bytes(b"PK\x03\x04 truncated")
    cases = {"missing.pt": InputError, "corrupt.safetensors": InputError, "code.pt": TrustError,
             "list.pt": InputError, "trunc.pt": InputError}
    for name, error in cases.items():
        code, err = run_cli(["models", str(tmp_path / name)], capsys)
        assert code == error.exit_code, (name, err)
        assert_one_error_line(err)
