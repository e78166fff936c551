"""Assign a role to each quantizable layer from its qualified name (diffusers naming).

Roles (models.base.ROLES): attention projections of the image stream (attn_qkv, attn_out; also SD3.5's `attn2`,
a second image self-attention), cross-attention to the text (cross_attn_qkv, cross_attn_out:
PixArt/UNet2DConditionModel/SANA `attn2`, and the context stream of SD3's joint attention `add_{q,k,v}_proj` /
`to_add_out`), mlp (also SD3's `ff_context`), adaln (modulation),
time_embed, class_embed, context_embed (text/caption projections: SD3 `context_embedder` and
`time_text_embed.text_embedder`, PixArt `caption_projection`, SDXL `add_embedding`), patch_embed, final, conv.

FLUX: `x_embedder` (the packed-latent projection) is patch_embed, `time_text_embed.guidance_embedder` (the
guidance-distilled models' guidance MLP) time_embed; a single-stream block's `proj_mlp` is mlp and its
`proj_out` (attention and MLP outputs concatenated, projected back) attn_out; `norm.linear` of a single block
is adaln. SANA: `time_embed.linear` (AdaLayerNormSingle's modulation) is adaln, the GLUMBConv feed-forward
(`ff.conv_inverted/conv_depth/conv_point`, 1×1 and depthwise convolutions) mlp, `attn1` (linear attention)
attn_qkv/attn_out, `attn2` cross-attention.
"""

from __future__ import annotations

from torch import nn


def layer_role(kind: str, name: str, module: nn.Module) -> str:
    n = name.lower()
    if "pos_embed" in n or "patch_embed" in n or n.startswith(("conv_in", "x_embedder")):
        return "patch_embed"
    if "context_embedder" in n or "text_embedder" in n or "caption_projection" in n or n.startswith("add_embedding"):
        return "context_embed"
    if n == "time_embed.linear":   # SANA's AdaLayerNormSingle modulation (its timestep MLP is time_embed.emb.*)
        return "adaln"
    if "timestep_embedder" in n or "guidance_embedder" in n or "time_embedding" in n or "time_proj" in n or n.endswith("time_emb_proj"):
        return "time_embed"
    if "class_embedder" in n or "class_embedding" in n:
        return "class_embed"
    if n.startswith(("proj_out", "conv_out")) or "final" in n:   # top level only (U-Net transformer blocks have proj_out too)
        return "final"
    if ("norm1.linear" in n or "norm1_context.linear" in n or "adaln" in n or n.endswith("norm.linear")
            or n.endswith("norm_out.linear") or "emb.linear" in n):
        return "adaln"
    if ".attn2." in n and kind != "sd3":   # SD3.5's (MMDiT-X) attn2 is a second image self-attention
        return "cross_attn_out" if n.endswith("to_out.0") else "cross_attn_qkv"
    if n.endswith(("add_q_proj", "add_k_proj", "add_v_proj")):
        return "cross_attn_qkv"
    if n.endswith("to_add_out"):
        return "cross_attn_out"
    if n.endswith(("to_q", "to_k", "to_v", ".qkv")):
        return "attn_qkv"
    if n.endswith(("to_out.0", "attn.proj")) or (n.startswith("single_transformer_blocks.") and n.endswith(".proj_out")):
        return "attn_out"
    if ".ff." in n or ".ff_context." in n or "mlp" in n:
        return "mlp"
    if isinstance(module, nn.Conv2d) or kind.startswith("unet"):
        return "conv" if isinstance(module, nn.Conv2d) else "other"
    return "other"
