"""Assign a role to each quantizable layer from its qualified name (diffusers naming)."""

from __future__ import annotations

from torch import nn


def layer_role(kind: str, name: str, module: nn.Module) -> str:
    n = name.lower()
    if "pos_embed" in n or "patch_embed" in n or n.startswith("conv_in"):
        return "patch_embed"
    if "timestep_embedder" in n or "time_embedding" in n or "time_proj" in n or n.endswith("time_emb_proj"):
        return "time_embed"
    if "class_embedder" in n or "class_embedding" in n:
        return "class_embed"
    if "proj_out" in n or n.startswith("conv_out") or "final" in n:
        return "final"
    if "norm1.linear" in n or "adaln" in n or n.endswith("norm.linear") or "emb.linear" in n:
        return "adaln"
    if n.endswith(("to_q", "to_k", "to_v", ".qkv")):
        return "attn_qkv"
    if n.endswith(("to_out.0", "attn.proj")):
        return "attn_out"
    if ".ff." in n or "mlp" in n:
        return "mlp"
    if isinstance(module, nn.Conv2d) or kind == "unet":
        return "conv" if isinstance(module, nn.Conv2d) else "other"
    return "other"
