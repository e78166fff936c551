"""Built-in models trained on MNIST, shipped with the package: a class-conditional DiT and U-Net (epsilon
prediction) and flow-mnist, a text-conditioned rectified-flow MMDiT (SD3Transformer2DModel) whose tiny word
encoder (models/builtin_text.py) is stored in the same weights file under `text_encoder.`."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from diffpro_cli.errors import InputError
from diffpro_cli.models.base import DiffusionModel, dit_forward, linear_alphas_cumprod, unet_forward

WEIGHTS_DIR = Path(__file__).parent / "weights"

BUILTIN_CONFIGS = {
    "dit-mnist": {
        "class": "DiTTransformer2DModel",
        "config": dict(
            sample_size=32, in_channels=1, out_channels=1, patch_size=4,
            num_attention_heads=6, attention_head_dim=32, num_layers=6,
            num_embeds_ada_norm=10, norm_type="ada_norm_zero", norm_elementwise_affine=False,
            dropout=0.0,
        ),
        "sample_shape": (1, 32, 32),
        "num_classes": 10,
    },
    "unet-mnist": {
        "class": "UNet2DModel",
        "config": dict(
            sample_size=32, in_channels=1, out_channels=1, layers_per_block=1,
            block_out_channels=(32, 64, 96),
            down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
            num_class_embeds=11, norm_num_groups=8, attention_head_dim=32,
        ),
        "sample_shape": (1, 32, 32),
        "num_classes": 10,
    },
    # text-conditioned rectified flow (SD3-style MMDiT) with the word encoder of models/builtin_text.py
    "flow-mnist": {
        "class": "SD3Transformer2DModel",
        "config": dict(
            sample_size=32, in_channels=1, out_channels=1, patch_size=4, num_layers=4,
            num_attention_heads=4, attention_head_dim=32, joint_attention_dim=64, caption_projection_dim=128,
            pooled_projection_dim=64, pos_embed_max_size=8,
        ),
        "sample_shape": (1, 32, 32),
        "num_classes": None,
        "flow_shift": 1.0,
    },
}


def build_net(name: str, seed: int = 0):
    """The architecture with fixed seeded random weights (deterministic for a given seed)."""
    from diffusers import DiTTransformer2DModel, SD3Transformer2DModel, UNet2DModel

    spec = BUILTIN_CONFIGS[name]
    cls = {"DiTTransformer2DModel": DiTTransformer2DModel, "UNet2DModel": UNet2DModel,
           "SD3Transformer2DModel": SD3Transformer2DModel}[spec["class"]]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = cls(**spec["config"])
    return net


def weights_path(name: str) -> Path:
    return WEIGHTS_DIR / f"{name}.safetensors"


def load_builtin(name: str, *, allow_untrained: bool = True) -> DiffusionModel:
    from diffpro_cli.artifacts import sha256_file
    from safetensors.torch import load_file

    if name not in BUILTIN_CONFIGS:
        raise InputError(f"builtin:{name}: unknown built-in model; choose one of {', '.join('builtin:' + k for k in BUILTIN_CONFIGS)}")
    spec = BUILTIN_CONFIGS[name]
    net = build_net(name)
    path = weights_path(name)
    untrained = True
    sha = None
    card = {}
    if path.exists():
        state = {k: v.float() for k, v in load_file(str(path)).items() if not k.startswith("text_encoder.")}
        missing, unexpected = net.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise InputError(f"{path}: weights do not match builtin:{name} ({len(missing)} missing, {len(unexpected)} unexpected keys); reinstall diffpro")
        untrained = False
        sha = sha256_file(path)
        card_path = path.with_suffix(".json")
        if card_path.exists():
            card = json.loads(card_path.read_text())
    elif not allow_untrained:
        raise InputError(f"builtin:{name}: trained weights are not installed; train them with `diffpro train {name}`")
    net.eval()
    if spec["class"] == "SD3Transformer2DModel":
        return _flow_model(name, net, untrained, sha, card)
    kind = "dit" if spec["class"] == "DiTTransformer2DModel" else "unet"
    return DiffusionModel(
        spec=f"builtin:{name}", net=net, kind=kind, sample_shape=spec["sample_shape"],
        alphas_cumprod=linear_alphas_cumprod(), num_classes=spec["num_classes"],
        forward_fn=dit_forward if kind == "dit" else unet_forward,
        untrained=untrained, sha256=sha,
        config={"class": spec["class"], "config": spec["config"], "card": card},
    )


def _flow_model(name: str, net, untrained: bool, sha: str | None, card: dict) -> DiffusionModel:
    """flow-mnist as the SD3 loader records a flow model (prediction type, shift, the `flow_timesteps` patch), with
    its word encoder's default prompts (digit i % 10 for sample i; empty prompt for CFG) as the conditioning set.
    `config["text_encoder"]` names the encoder, so prompt files and reloaded checkpoints find it."""
    from diffpro_cli.models import builtin_text
    from diffpro_cli.models.base import apply_net_patches, flow_alphas_cumprod, flow_sigmas, sd3_forward

    spec = BUILTIN_CONFIGS[name]
    n, shift = 1000, float(spec["flow_shift"])
    patches = apply_net_patches(net, {"flow_timesteps": {"num_train_timesteps": n, "shift": shift}})
    cfg = spec["config"]
    model = DiffusionModel(
        spec=f"builtin:{name}", net=net, kind="sd3", sample_shape=spec["sample_shape"],
        alphas_cumprod=flow_alphas_cumprod(flow_sigmas(n, shift)), forward_fn=sd3_forward, num_classes=None,
        untrained=untrained, sha256=sha,
        config={"class": spec["class"], "config": cfg, "card": card, "prediction_type": "flow", "flow_shift": shift,
                "net_patches": patches, "conditioning": "embeddings", "text_encoder": builtin_text.NAME,
                "conditioning_fields": {"encoder_hidden_states": [None, cfg["joint_attention_dim"]],
                                        "pooled_projections": [cfg["pooled_projection_dim"]]}},
    )
    encoder = None
    if untrained:   # no shipped encoder either: seeded random tables, so the untrained network still runs
        with torch.random.fork_rng():
            torch.manual_seed(0)
            encoder = builtin_text.WordEncoder().eval()
    model.conditioning_set = builtin_text.default_conditioning(encoder=encoder)
    return model
