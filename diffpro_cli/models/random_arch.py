"""`random:ARCH`: standard architectures with seeded random weights, for speed and memory benchmarks only.

Random models are never trained, so reports mark them `random_weights` and never compute FID on them.
The latent DiTs load no VAE: `decode` is the identity and samples stay in latent space.

Public archs: dit-xl-2, dit-l-2, dit-b-2, dit-s-2 (DiT/2 at 256 px, latent 4x32x32, learned sigma,
1000 classes; the diffusers layout has a timestep+label embedder per block, so DiT-XL/2 has 750M
parameters here against 675M in the original layout) and unet-ddpm-32 (the google/ddpm-cifar10-32
U-Net, unconditional 3x32x32). Test-only archs, small enough for unit tests: dit-tiny, unet-tiny.

Weights use the architecture's own (diffusers) initialisation under a fixed seed. Measured on a busy
2-core CPU, skipping it and filling with a seeded uniform_ saved only 10-15% of the 13-15 s DiT-XL/2
build (touching 3 GB of fresh memory dominates), so the default init is kept.
"""

from __future__ import annotations

import torch

from diffpro_cli.errors import InputError
from diffpro_cli.models.base import DiffusionModel, dit_forward, linear_alphas_cumprod, unet_forward


def _dit(layers: int, heads: int, head_dim: int, sample_size: int = 32, classes: int = 1000) -> dict:
    return dict(
        num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4, out_channels=8,
        num_layers=layers, sample_size=sample_size, patch_size=2, num_embeds_ada_norm=classes,
        norm_type="ada_norm_zero", norm_elementwise_affine=False, activation_fn="gelu-approximate",
        attention_bias=True, dropout=0.0,
    )


# google/ddpm-cifar10-32 (diffusers UNet2DModel config of the original DDPM CIFAR-10 model)
_DDPM_CIFAR10 = dict(
    sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
    block_out_channels=(128, 256, 256, 256),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=None, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1,
    norm_eps=1e-6, norm_num_groups=32, act_fn="silu", time_embedding_type="positional",
)

RANDOM_ARCHS = {
    "dit-xl-2": ("DiTTransformer2DModel", _dit(28, 16, 72)),
    "dit-l-2": ("DiTTransformer2DModel", _dit(24, 16, 64)),
    "dit-b-2": ("DiTTransformer2DModel", _dit(12, 12, 64)),
    "dit-s-2": ("DiTTransformer2DModel", _dit(12, 6, 64)),
    "unet-ddpm-32": ("UNet2DModel", _DDPM_CIFAR10),
}

# Test-only sizes: same code paths, built in milliseconds. Not listed in help or error messages.
TEST_ARCHS = {
    "dit-tiny": ("DiTTransformer2DModel", _dit(2, 2, 16, sample_size=8, classes=10)),
    "unet-tiny": ("UNet2DModel", dict(
        sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=None, norm_num_groups=8,
    )),
}


def build_random_net(class_name: str, config: dict, seed: int):
    """The diffusers network with its default initialisation under `seed` (global RNG left untouched)."""
    from diffusers import DiTTransformer2DModel, UNet2DModel

    cls = {"DiTTransformer2DModel": DiTTransformer2DModel, "UNet2DModel": UNet2DModel}[class_name]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = cls(**config)
    return net.eval()


def load_random(arch: str, seed: int = 0) -> DiffusionModel:
    """A `random:ARCH` model (see module docstring for the archs)."""
    from diffpro_cli.artifacts import sha256_json

    if arch in RANDOM_ARCHS:
        class_name, config = RANDOM_ARCHS[arch]
    elif arch in TEST_ARCHS:
        class_name, config = TEST_ARCHS[arch]
    else:
        raise InputError(f"random:{arch}: unknown architecture; choose one of {', '.join('random:' + a for a in RANDOM_ARCHS)}")
    net = build_random_net(class_name, config, seed)
    spec = f"random:{arch}"
    is_dit = class_name == "DiTTransformer2DModel"
    size = config["sample_size"]
    description = {"class": class_name, "config": config, "arch": arch, "seed": seed}
    return DiffusionModel(
        spec=spec, net=net, kind="dit" if is_dit else "unet",
        sample_shape=(config["in_channels"], size, size),
        alphas_cumprod=linear_alphas_cumprod(),
        forward_fn=dit_forward if is_dit else unet_forward,
        num_classes=config["num_embeds_ada_norm"] if is_dit else None,
        random_weights=True,
        sha256=sha256_json({"spec": spec, "seed": seed, "class": class_name, "config": config}),
        config=description | {"latent_without_vae": is_dit},
    )
