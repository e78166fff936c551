"""Original facebookresearch/DiT checkpoints (e.g. DiT-XL-2-256x256.pt) mapped onto diffusers' DiT.

Accepted files: a plain state dict, or a training checkpoint {"model": ..., "ema": ..., "args": ...}
(the EMA weights are used), as .pt/.pth/.ckpt (torch.load weights_only=True) or .safetensors.

Key correspondence (original → diffusers DiTTransformer2DModel):
    x_embedder.proj                    → pos_embed.proj
    pos_embed (fixed sincos)           → pos_embed.pos_embed buffer (copied when present)
    t_embedder.mlp.0 / mlp.2           → transformer_blocks.N.norm1.emb.timestep_embedder.linear_1 / linear_2
    y_embedder.embedding_table         → transformer_blocks.N.norm1.emb.class_embedder.embedding_table
    blocks.N.adaLN_modulation.1        → transformer_blocks.N.norm1.linear
    blocks.N.attn.qkv (q;k;v rows)     → transformer_blocks.N.attn1.to_q / to_k / to_v
    blocks.N.attn.proj                 → transformer_blocks.N.attn1.to_out.0
    blocks.N.mlp.fc1 / fc2             → transformer_blocks.N.ff.net.0.proj / ff.net.2
    final_layer.adaLN_modulation.1     → proj_out_1
    final_layer.linear                 → proj_out_2
The original has one shared timestep/label embedder; diffusers keeps one per block (and uses block 0's
for the final layer), so it is copied into every block.

Exactness: diffusers' DiT differs from the original in two constants: its sinusoidal timestep
frequencies use exp(-ln(10^4) i / (half-1)) instead of / half (downscale_freq_shift 1 vs 0), and the
pre-MLP LayerNorm eps is 1e-5 instead of 1e-6. By default this loader reproduces the original network
exactly: norm_eps=1e-6 goes into the diffusers config; downscale_freq_shift=0 on every block's time
projection is not a config field, so it is set after construction through base.apply_net_patches and
recorded as config["net_patches"] (a quantized checkpoint stores and re-applies that record).
`diffusers_compat=True` keeps the diffusers constants instead, i.e. the network HF's converted
facebook/DiT-* pipelines run.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from diffpro_cli.errors import InputError
from diffpro_cli.models.base import DiffusionModel, apply_net_patches, linear_alphas_cumprod

# hidden size → heads for the published DiT sizes (S, B, L, XL)
HEADS_BY_HIDDEN = {384: 6, 768: 12, 1024: 16, 1152: 16}

REQUIRED_KEYS = (
    "x_embedder.proj.weight", "t_embedder.mlp.0.weight", "t_embedder.mlp.2.weight",
    "y_embedder.embedding_table.weight", "blocks.0.attn.qkv.weight", "blocks.0.adaLN_modulation.1.weight",
    "final_layer.linear.weight", "final_layer.adaLN_modulation.1.weight",
)

_BLOCK_PAIRS = (  # (original suffix, diffusers suffix) inside block N
    ("adaLN_modulation.1", "norm1.linear"),
    ("attn.proj", "attn1.to_out.0"),
    ("mlp.fc1", "ff.net.0.proj"),
    ("mlp.fc2", "ff.net.2"),
)
_TOP_PAIRS = (
    ("x_embedder.proj", "pos_embed.proj"),
    ("final_layer.adaLN_modulation.1", "proj_out_1"),
    ("final_layer.linear", "proj_out_2"),
)
_EMBED_PAIRS = (  # shared in the original, per block in diffusers
    ("t_embedder.mlp.0", "norm1.emb.timestep_embedder.linear_1"),
    ("t_embedder.mlp.2", "norm1.emb.timestep_embedder.linear_2"),
)
_LABEL_ORIG, _LABEL_DIFF = "y_embedder.embedding_table.weight", "norm1.emb.class_embedder.embedding_table.weight"


def _depth(keys, prefix: str) -> int:
    found = {int(m.group(1)) for k in keys if (m := re.match(rf"{re.escape(prefix)}(\d+)\.", k))}
    return max(found) + 1 if found else 0


def infer_dit_config(state: dict, heads: int | None = None, sample_size: int | None = None, source=None) -> dict:
    """DiTTransformer2DModel kwargs from the shapes in an original-layout state dict (`source`: the file, named
    in the errors)."""
    where = f"{source}: " if source else ""
    proj = state["x_embedder.proj.weight"]
    hidden, in_channels, patch = proj.shape[0], proj.shape[1], proj.shape[2]
    out_channels = state["final_layer.linear.weight"].shape[0] // (patch * patch)
    num_classes = state["y_embedder.embedding_table.weight"].shape[0] - 1  # last row: the CFG null label
    depth = _depth(state, "blocks.")
    if heads is None:
        heads = HEADS_BY_HIDDEN.get(hidden, hidden // 64 if hidden % 64 == 0 else None)
        if heads is None:
            raise InputError(f"{where}hidden size {hidden} is neither a published DiT size (384, 768, 1024, 1152) nor a "
                             "multiple of 64, so its head count is unknown; in Python pass load_original_dit(path, heads=N), "
                             "or save it as a diffusers DiTTransformer2DModel folder (its config names the heads)")
    if hidden % heads:
        raise InputError(f"{where}hidden size {hidden} is not divisible by heads={heads}; pass the right head count")
    fc1 = state.get("blocks.0.mlp.fc1.weight")
    if fc1 is not None and fc1.shape[0] != 4 * hidden:
        raise InputError(f"{where}MLP width {fc1.shape[0]} is not 4 x hidden ({hidden}); diffusers' DiT only supports mlp_ratio 4, "
                         "so this checkpoint cannot be loaded")
    if sample_size is None:
        pos = state.get("pos_embed")
        sample_size = int(round(pos.shape[1] ** 0.5)) * patch if pos is not None else 32
    return dict(
        num_attention_heads=heads, attention_head_dim=hidden // heads, in_channels=in_channels,
        out_channels=out_channels, num_layers=depth, sample_size=sample_size, patch_size=patch,
        num_embeds_ada_norm=num_classes, norm_type="ada_norm_zero", norm_elementwise_affine=False,
        activation_fn="gelu-approximate", attention_bias=True, dropout=0.0,
    )


def to_diffusers_layout(state: dict) -> dict:
    """Original DiT state dict → diffusers DiTTransformer2DModel state dict (pos_embed is left out)."""
    out = {}
    for orig, diff in _TOP_PAIRS:
        for p in ("weight", "bias"):
            out[f"{diff}.{p}"] = state[f"{orig}.{p}"]
    for n in range(_depth(state, "blocks.")):
        src, dst = f"blocks.{n}.", f"transformer_blocks.{n}."
        for orig, diff in _BLOCK_PAIRS:
            for p in ("weight", "bias"):
                out[f"{dst}{diff}.{p}"] = state[f"{src}{orig}.{p}"]
        for p in ("weight", "bias"):
            q, k, v = state[f"{src}attn.qkv.{p}"].chunk(3, dim=0)
            out[f"{dst}attn1.to_q.{p}"], out[f"{dst}attn1.to_k.{p}"], out[f"{dst}attn1.to_v.{p}"] = q.clone(), k.clone(), v.clone()
        for orig, diff in _EMBED_PAIRS:  # one private copy per block, so no two parameters share storage
            for p in ("weight", "bias"):
                out[f"{dst}{diff}.{p}"] = state[f"{orig}.{p}"].clone()
        out[dst + _LABEL_DIFF] = state[_LABEL_ORIG].clone()
    return out


def to_original_layout(state: dict, pos_embed: torch.Tensor | None = None) -> dict:
    """Diffusers DiTTransformer2DModel state dict → original facebookresearch/DiT layout.

    Block 0's timestep/label embedder becomes the shared one; an InputError if blocks hold different
    embedders (a diffusers-trained DiT), since the original layout cannot represent that. `pos_embed`
    (the diffusers buffer net.pos_embed.pos_embed, which is not in state_dict) is included when given.
    """
    out = {}
    for orig, diff in _TOP_PAIRS:
        for p in ("weight", "bias"):
            out[f"{orig}.{p}"] = state[f"{diff}.{p}"]
    depth = _depth(state, "transformer_blocks.")
    for n in range(depth):
        src, dst = f"transformer_blocks.{n}.", f"blocks.{n}."
        for orig, diff in _BLOCK_PAIRS:
            for p in ("weight", "bias"):
                out[f"{dst}{orig}.{p}"] = state[f"{src}{diff}.{p}"]
        for p in ("weight", "bias"):
            out[f"{dst}attn.qkv.{p}"] = torch.cat([state[f"{src}attn1.to_{x}.{p}"] for x in "qkv"], dim=0)
    shared = [f"{diff}.{p}" for _, diff in _EMBED_PAIRS for p in ("weight", "bias")] + [_LABEL_DIFF]
    for n in range(1, depth):
        for s in shared:
            if not torch.equal(state[f"transformer_blocks.{n}.{s}"], state[f"transformer_blocks.0.{s}"]):
                raise InputError(f"block {n} has its own {s.rsplit('.', 2)[0]}; the original DiT layout has one shared embedder, so this model cannot be converted")
    for orig, diff in _EMBED_PAIRS:
        for p in ("weight", "bias"):
            out[f"{orig}.{p}"] = state[f"transformer_blocks.0.{diff}.{p}"]
    out[_LABEL_ORIG] = state["transformer_blocks.0." + _LABEL_DIFF]
    if pos_embed is not None:
        out["pos_embed"] = pos_embed
    return out


def _check_layout(state: dict, path: Path) -> None:
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if not missing:
        return
    if any(k.startswith("transformer_blocks.") for k in state):
        raise InputError(f"{path}: this is a diffusers DiT state dict, not the original layout; pass its directory with config.json instead")
    raise InputError(f"{path}: not an original DiT checkpoint (missing {', '.join(missing[:3])}); expected facebookresearch/DiT "
                     "keys x_embedder, t_embedder, y_embedder, blocks.N, final_layer")


def load_original_dit(path: str | Path, *, heads: int | None = None, sample_size: int | None = None,
                      diffusers_compat: bool = False) -> DiffusionModel:
    """An original DiT checkpoint as a diffusers DiT (see module docstring).

    heads: override the head count (inferred from the hidden size: S 6, B 12, L/XL 16, else hidden/64).
    sample_size: latent side length; inferred from pos_embed, else from a "256x256"-style file name / 8,
    else 32.
    """
    from diffusers import DiTTransformer2DModel
    from diffusers.models.modeling_utils import no_init_weights

    from diffpro_cli.artifacts import sha256_file
    from diffpro_cli.models.diffusers_dir import extract_state_dict, load_into, read_weights
    from diffpro_cli.models.base import dit_forward

    path = Path(path)
    state, wrapper = extract_state_dict(read_weights(path), path)
    _check_layout(state, path)
    if sample_size is None and "pos_embed" not in state and (m := re.search(r"(\d+)x\1", path.name)):
        sample_size = int(m.group(1)) // 8
    config = infer_dit_config(state, heads=heads, sample_size=sample_size, source=path)
    if not diffusers_compat:
        config["norm_eps"] = 1e-6
    try:
        mapped = to_diffusers_layout(state)
    except KeyError as exc:
        raise InputError(f"{path}: incomplete original DiT checkpoint (missing {exc.args[0]}); re-download or re-save it") from None
    with no_init_weights():  # every parameter is overwritten below
        net = DiTTransformer2DModel(**config)
    load_into(net, mapped, path)
    pos = state.get("pos_embed")
    if pos is not None:
        if tuple(pos.shape) != tuple(net.pos_embed.pos_embed.shape):
            raise InputError(f"{path}: pos_embed has shape {tuple(pos.shape)}, expected {tuple(net.pos_embed.pos_embed.shape)}; the checkpoint is inconsistent")
        net.pos_embed.pos_embed.copy_(pos)
    shift = 1 if diffusers_compat else 0
    patches = apply_net_patches(net, {"timestep_freq_shift": shift})
    net.eval()
    return DiffusionModel(
        spec=str(path), net=net, kind="dit",
        sample_shape=(config["in_channels"], config["sample_size"], config["sample_size"]),
        alphas_cumprod=linear_alphas_cumprod(), forward_fn=dit_forward,
        num_classes=config["num_embeds_ada_norm"], sha256=sha256_file(path),
        config={"class": "DiTTransformer2DModel", "config": config, "source": "original-dit", "path": str(path),
                "wrapper": wrapper, "net_patches": patches, "timestep_freq_shift": shift, "latent_without_vae": True},
    )
