"""kohya's own LoRA module names → the network's, through diffusers' key converters.

kohya sd-scripts trains SDXL (and other trainers SD 1.x/2.x) on the original LDM/SGM U-Net, so the files
CivitAI carries name its modules flattened: `lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`
(diffusers: down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q), `lora_unet_middle_block_1_...`,
`lora_unet_output_blocks_2_1_...`, `lora_unet_out_2` (conv_out). Its FLUX LoRAs name BFL's modules:
`lora_unet_double_blocks_0_img_attn_qkv` is to_q/to_k/to_v in one matrix. diffusers maps both
(loaders/lora_conversion_utils, private functions: their absence or failure is one error line). They are
called one kohya module at a time, so every converted name is known to come from one kohya name (its
alpha, and the name an error shows), and nothing is dropped silently: on a whole file, diffusers drops
the SGM keys of a file that also holds down_blocks keys, and only logs the FLUX keys it cannot map.
"""

from __future__ import annotations

import re
from types import SimpleNamespace

import torch
from torch import nn

from diffpro_cli.errors import InputError

__all__ = ["kohya_to_modules"]

TESTED_DIFFUSERS = "0.42.1"
_LDM = re.compile(r"^lora_unet_(input_blocks|middle_block|output_blocks|time_embed|label_emb|out)_\d")
_FLUX = re.compile(r"^lora_unet_(double_blocks|single_blocks|img_in|txt_in|time_in|vector_in|guidance_in|final_layer)(_|$)")
_PARTS = ("lora_down.weight", "lora_up.weight", "alpha")


def kohya_to_modules(tensors: dict, net: nn.Module, label: str) -> dict:
    """`tensors` with each kohya LDM/SGM U-Net or FLUX module (down, up and alpha keys) renamed to the
    network's `<module>.lora_down.weight` / `lora_up.weight` / `alpha`, a fused FLUX q/k/v split into its
    layers. Keys already naming this network's modules, other spellings, and kohya names that do not
    convert to modules of this network are left as they are (load_lora then names them in its error)."""
    modules = dict(net.named_modules())
    flat = {n.replace(".", "_") for n in modules if n}
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        name, _, part = key.partition(".")
        if part in _PARTS and (_LDM.match(name) or _FLUX.match(name)) and name[len("lora_unet_"):] not in flat:
            groups.setdefault(name, {})[part] = value
    if not groups:
        return tensors
    converted: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    done: set[str] = set()
    for name, parts in groups.items():
        if not {"lora_down.weight", "lora_up.weight"} <= parts.keys():
            continue        # load_lora reports the missing matrix under the file's own name
        alpha = parts.get("alpha")
        if alpha is not None and alpha.numel() != 1:
            continue        # ... and the damaged alpha
        if _LDM.match(name):
            config = getattr(net, "config", None)
            if getattr(config, "layers_per_block", None) is None:
                continue    # not a diffusers U-Net: these names are not its modules
            pairs = _convert_ldm(name, parts, net, config.layers_per_block, label)
        elif type(net).__name__ == "FluxTransformer2DModel":     # FLUX.1 (FLUX.2's kohya names map otherwise)
            pairs = _convert_flux(name, parts, label)
        else:
            continue
        if not pairs or any(mod not in modules for mod, *_ in pairs):
            continue
        for mod, down, up, mod_alpha in pairs:
            if mod in origin:
                raise InputError(f"{label}: {origin[mod]} and {name} both name layer {mod}; keep one")
            converted[f"{mod}.lora_down.weight"], converted[f"{mod}.lora_up.weight"] = down, up
            if mod_alpha is not None:
                converted[f"{mod}.alpha"] = mod_alpha
            origin[mod] = name
        done.add(name)
    rest = {k: v for k, v in tensors.items() if k.partition(".")[0] not in done or k.partition(".")[2] not in _PARTS}
    twice = sorted(set(rest) & set(converted))
    if twice:   # the same layer under its kohya and its diffusers name: one would replace the other
        mod = re.sub(r"\.(lora_down\.weight|lora_up\.weight|alpha)$", "", twice[0])
        raise InputError(f"{label}: names layer {mod} twice ({origin[mod]} and {twice[0]}); keep one spelling per layer")
    return rest | converted


def _converters(label: str, example: str):
    try:
        from diffusers.loaders import lora_conversion_utils as conv

        return conv._maybe_map_sgm_blocks_to_diffusers, conv._convert_non_diffusers_lora_to_diffusers, \
            conv._convert_kohya_flux_lora_to_diffusers
    except Exception as exc:  # noqa: BLE001  (diffusers missing, too old, or its private API renamed)
        raise InputError(f"{label}: its kohya module names ({example}, ...) are read through diffusers' key converter, which "
                         f"this environment lacks ({_short(exc)}; diffusers {_version()}); install diffusers=={TESTED_DIFFUSERS}, "
                         f"which reads kohya's SD/SDXL (LDM) and FLUX names") from None


def _version() -> str:
    try:
        import diffusers

        return diffusers.__version__
    except Exception:  # noqa: BLE001
        return "not installed"


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:100]}" if text else type(exc).__name__


def _failed(label: str, name: str, exc: BaseException) -> InputError:
    hint = ("; diffusers splits single_blocks linear1 for FLUX.1's widths (3·3072 + 12288) only"
            if "single_blocks" in name and name.endswith("linear1") else "")
    return InputError(f"{label}: diffusers {_version()} could not convert the kohya name {name} ({_short(exc)}){hint}; "
                      f"diffusers {TESTED_DIFFUSERS} reads kohya's SD/SDXL (LDM) and FLUX names, or convert the file to "
                      f"diffusers module names")


def _convert_ldm(name: str, parts: dict, net: nn.Module, layers_per_block, label: str) -> list[tuple]:
    """[(module, down, up, alpha)] of one kohya LDM/SGM U-Net name: diffusers' SGM block map (input_blocks.i.j
    → down_blocks.b.resnets/attentions.k) and its kohya key converter (in_layers_2 → conv1, emb_layers_1 →
    time_emb_proj, skip_connection → conv_shortcut, op → downsamplers.0.conv, out_2 → conv_out, ...)."""
    from diffpro_cli.lora import _weight_key

    map_sgm, convert, _ = _converters(label, name)
    if isinstance(layers_per_block, (list, tuple)):
        if len(set(layers_per_block)) != 1:
            raise InputError(f"{label}: kohya LDM names ({name}, ...) map onto U-Net blocks by a single layers_per_block, "
                             f"and this U-Net has {list(layers_per_block)}; convert the file to diffusers module names")
        layers_per_block = layers_per_block[0]
    source = _ldm_upsampler(name, net, int(layers_per_block))
    try:
        state = map_sgm({f"{source}.lora_down.weight": parts["lora_down.weight"],
                         f"{source}.lora_up.weight": parts["lora_up.weight"]},
                        SimpleNamespace(layers_per_block=int(layers_per_block)))
        state, _ = convert(state)
    except Exception as exc:  # noqa: BLE001  (a private function: any failure is the converter's)
        raise _failed(label, name, exc) from None
    downs = [k for k in state if k.endswith("down.weight")]
    if len(state) != 2 or len(downs) != 1:
        return []
    mod, part, _ = _weight_key(downs[0]) or (None, None, None)
    if mod is None or part != "down":
        return []
    up = next(v for k, v in state.items() if k != downs[0])
    return [(mod.removeprefix("unet."), state[downs[0]], up, parts.get("alpha"))]


def _ldm_upsampler(name: str, net: nn.Module, layers_per_block: int) -> str:
    """LDM puts an up block's Upsample after its last ResBlock, at index 1 when the block has no attention
    (SD 1.x's first up block): output_blocks_2_1_conv. diffusers' map takes index 1 for an attention
    (0.42.1: up_blocks.0.attentions.2.conv); index 2 is what it maps to upsamplers.0."""
    m = re.match(r"^lora_unet_output_blocks_(\d+)_1_conv$", name)
    if m is None:
        return name
    i = int(m[1])
    blocks = getattr(net, "up_blocks", None)
    b = i // (layers_per_block + 1)
    if blocks is None or b >= len(blocks) or i % (layers_per_block + 1) != layers_per_block:
        return name
    if getattr(blocks[b], "attentions", None) or getattr(blocks[b], "upsamplers", None) is None:
        return name
    return f"lora_unet_output_blocks_{i}_2_conv"


def _convert_flux(name: str, parts: dict, label: str) -> list[tuple]:
    """[(module, down, up, alpha)] of one kohya FLUX name, through diffusers' converter. It is given no alpha
    (it would fold alpha/r into the weights, and drops final_layer's): each split layer gets alpha scaled
    to its own rank instead, so load_lora's alpha/rank is the file's alpha/r."""
    _, _, convert = _converters(label, name)
    down, up = parts["lora_down.weight"], parts["lora_up.weight"]
    try:
        state = convert({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up})
    except Exception as exc:  # noqa: BLE001  (a private function; its shape checks are bare asserts)
        raise _failed(label, name, exc) from None
    alpha = parts.get("alpha")
    rank = int(down.shape[0]) if down.dim() >= 1 else 0
    pairs = []
    for key, a in state.items():
        if not key.endswith(".lora_A.weight"):
            continue
        mod = key[:-len(".lora_A.weight")]
        b = state.get(f"{mod}.lora_B.weight")
        if b is None:
            return []
        split_alpha = None
        if alpha is not None and rank:
            split_alpha = torch.tensor(float(alpha.reshape(-1)[0]) * int(a.shape[0]) / rank)
        pairs.append((mod.removeprefix("transformer."), a, b, split_alpha))
    if 2 * len(pairs) != len(state):
        return []
    return pairs
