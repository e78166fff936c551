"""LoRA adapters on a (quantized) network, kept in float: y = base(x) + scale·(alpha/r)·B(A(x)).

The base layer is untouched: a QuantLinear / QuantConv2d keeps its integer weights and kernel (nothing
is dequantized), a layer the plan kept in float stays an nn.Linear / nn.Conv2d. Each adapted layer gets
a `lora` ModuleDict (one `LoRAAdapter` per adapter name, float32 parameters on the layer's device) and
one forward hook that adds every adapter's delta to the layer's output. An MLP projection whose GELU
diffpro fused into its int8 GEMM (quant/epilogue.py) hands the GELU back to its module while adapted,
so the delta goes before the activation. `unload_lora` removes all of it (re-fusing the GELU), so the
network computes exactly what it computed before.

State-dict layouts read (module names as in `net.named_modules()`; a leading `transformer.`, `unet.`,
`base_model.model.` or `model.` is stripped):
  PEFT / diffusers   <module>.lora_A.weight, <module>.lora_B.weight   (optional <module>.alpha; else
                     `lora_alpha` / `alpha_pattern` / `use_rslora` from the config diffusers writes into
                     the safetensors header (`lora_adapter_metadata`, the denoiser's entries), else from
                     an adapter_config.json next to the file; else alpha = r)
  kohya              <module>.lora_down.weight, <module>.lora_up.weight, <module>.alpha
                     (also kohya's flattened names, lora_unet_<module with dots as _>, and its LDM/SGM
                     U-Net and FLUX names, lora_unet_input_blocks_4_1_..., via lora_names.py)
  older diffusers    <module>.lora.down.weight / lora.up.weight (also lora_linear_layer.down/up), and
                     attention-processor files: <attn>.processor.to_q_lora.down.weight (to_out_lora: to_out.0)
from a dict of tensors, a .safetensors file, a directory holding one (adapter_model.safetensors,
pytorch_lora_weights.safetensors), or a .bin/.pt file read with torch.load(weights_only=True).
"""

from __future__ import annotations

import json
import math
import numbers
import re
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from diffpro_cli.errors import InputError, UsageError
from diffpro_cli.lora_names import kohya_to_modules

__all__ = ["LoRAAdapter", "load_lora", "unload_lora"]

_PREFIXES = ("base_model.model.", "transformer.", "unet.", "model.", "diffusion_model.")
_TEXT_ENCODER_PREFIXES = ("text_encoder", "te_", "te1_", "te2_", "te3_", "lora_te_", "lora_te1_", "lora_te2_", "lora_te3_")
_FLAT_PREFIXES = ("lora_unet_", "lora_transformer_", "lora_")
_WEIGHT = re.compile(r"^(?P<mod>.+)\.(?P<part>lora_A|lora_B|lora_down|lora_up)(?:\.(?P<adapter>[^.]+))?\.weight$")
_ALPHA = re.compile(r"^(?P<mod>.+)\.alpha$")
# diffusers before PEFT: LoRACompatibleLinear/Conv (`lora`), text encoders (`lora_linear_layer`), and the
# attention-processor files (`<attn>.processor.to_q_lora.down.weight`; to_out_lora is to_out.0)
_OLD_WEIGHT = re.compile(r"^(?P<mod>.+)\.(?:lora|lora_linear_layer)\.(?P<part>down|up)\.weight$")
_PROCESSOR_WEIGHT = re.compile(r"^(?P<attn>.+)\.processor\.(?P<leaf>\w+?)_lora\.(?P<part>down|up)\.weight$")
_DIR_FILES = ("adapter_model.safetensors", "pytorch_lora_weights.safetensors", "adapter_model.bin", "pytorch_lora_weights.bin")


class LoRAAdapter(nn.Module):
    """One low-rank float update for one layer: delta(x) = scaling · B(A(x)), with A (`down`) shaped like
    the base layer's input side ([r, in] or a conv [r, in, kh, kw] with the base's geometry) and B
    (`up`) [out, r] (or a 1×1 conv). `scaling` = scale · alpha / r (alpha / √r with rsLoRA)."""

    def __init__(self, down: torch.Tensor, up: torch.Tensor, scaling: float, conv: dict | None = None):
        super().__init__()
        self.down = nn.Parameter(down, requires_grad=False)
        self.up = nn.Parameter(up, requires_grad=False)
        self.scaling = float(scaling)
        self.conv = conv     # stride/padding/dilation/padding_mode of the base conv, None for a linear layer

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # a model run in bf16/fp16 computes under autocast (set_compute_dtype), which would run these float32
        # matmuls in half precision; the adapter stays float32 like the integer layers' outputs it adds to
        if x.device.type not in ("cpu", "cuda"):    # no autocast to leave (meta tensors tracing shapes)
            return self._delta(x.to(self.down.dtype))
        with torch.autocast(x.device.type, enabled=False):
            return self._delta(x.to(self.down.dtype))

    def _delta(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv is None:
            return F.linear(F.linear(x, self.down), self.up) * self.scaling
        c = self.conv
        if c["padding_mode"] != "zeros":
            ph, pw = c["padding"]
            x = F.pad(x, [pw, pw, ph, ph], mode=c["padding_mode"])
            h = F.conv2d(x, self.down, None, c["stride"], 0, c["dilation"])
        else:
            h = F.conv2d(x, self.down, None, c["stride"], c["padding"], c["dilation"])
        return F.conv2d(h, self.up) * self.scaling

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scaling={self.scaling:g}" + (", conv" if self.conv is not None else "")


def _lora_hook(module: nn.Module, args, output):
    x = args[0]
    for adapter in module.lora.values():
        output = output + adapter(x).to(output.dtype)   # out of place: fused q/k/v slices stay intact
    return output


# ---------------------------------------------------------------------------------------------
# Reading a LoRA
# ---------------------------------------------------------------------------------------------


def _read_source(lora) -> tuple[dict, dict, str]:
    """(tensors, adapter_config, label) from a dict or a path."""
    if isinstance(lora, Mapping):
        bad = [k for k, v in lora.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise UsageError(f"the LoRA dict holds non-tensor values ({', '.join(map(str, bad[:3]))}); pass a state dict of tensors")
        return dict(lora), {}, "the LoRA"
    if not isinstance(lora, (str, Path)):
        raise UsageError(f"lora: expected a state dict or a path to a .safetensors file, got {type(lora).__name__}")
    path = Path(lora)
    if path.is_dir():
        found = next((path / n for n in _DIR_FILES if (path / n).is_file()), None)
        if found is None:
            candidates = sorted(path.glob("*.safetensors"))
            if len(candidates) != 1:
                raise InputError(f"{path}: no LoRA weights file found ({', '.join(_DIR_FILES[:2])} or exactly one "
                                 f"*.safetensors); pass the file itself")
            found = candidates[0]
        path = found
    if not path.exists():
        raise InputError(f"{path}: no such file; check the LoRA path")
    header: dict = {}
    if path.suffix == ".safetensors":
        from diffpro_cli.artifacts import load_safetensors

        tensors, header = load_safetensors(path)
    elif path.suffix in (".bin", ".pt", ".pth"):
        try:
            tensors = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001  (pickled code or a corrupt file: weights_only refuses both)
            raise InputError(f"{path}: not loadable as plain tensors ({str(exc).splitlines()[0][:80]}); "
                             f"convert it to .safetensors") from None
        if not isinstance(tensors, Mapping) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
            raise InputError(f"{path}: not a state dict of tensors; pass a LoRA state dict")
    else:
        raise UsageError(f"{path}: unsupported LoRA file type {path.suffix or '(none)'}; use .safetensors (or .bin/.pt state dicts)")
    config = {}
    cfg_path = path.parent / "adapter_config.json"
    if header.get(_META_KEY):
        config = _metadata_config(header[_META_KEY], path)
    elif cfg_path.is_file():
        try:
            config = json.loads(cfg_path.read_text())
        except (OSError, ValueError) as exc:
            raise InputError(f"{cfg_path}: not readable JSON ({str(exc)[:80]}); fix or remove it") from None
        if not isinstance(config, dict):
            raise InputError(f"{cfg_path}: expected a JSON object (PEFT's adapter_config.json); fix or remove it")
    return dict(tensors), config, str(path)


_META_KEY = "lora_adapter_metadata"      # diffusers >= 0.35: the adapter's PEFT config in the safetensors header
_COMPONENTS = ("transformer.", "unet.", "prior.")    # the denoiser's prefixes in a pipeline's metadata


def _metadata_config(text: str, path: Path) -> dict:
    """The PEFT config diffusers writes into the file's header: bare keys (model.save_lora_adapter) or one
    set per pipeline component ("transformer.lora_alpha", "text_encoder.lora_alpha", ...: save_lora_weights),
    of which the denoiser's is the one that applies here."""
    try:
        meta = json.loads(text)
    except ValueError as exc:
        raise InputError(f"{path}: the header's {_META_KEY} is not JSON ({str(exc)[:60]}); re-save the LoRA") from None
    if not isinstance(meta, dict):
        raise InputError(f"{path}: the header's {_META_KEY} is not a JSON object; re-save the LoRA")
    for prefix in _COMPONENTS:
        own = {k[len(prefix):]: v for k, v in meta.items() if k.startswith(prefix)}
        if own:
            return own
    return meta


def _resolve(name: str, modules: dict[str, nn.Module], flat: dict[str, str]) -> str | None:
    if name in modules:
        return name
    for prefix in _PREFIXES:
        if name.startswith(prefix) and name[len(prefix):] in modules:
            return name[len(prefix):]
    if "." not in name:   # kohya's flattened names
        for prefix in _FLAT_PREFIXES:
            if name.startswith(prefix) and name[len(prefix):] in flat:
                return flat[name[len(prefix):]]
    return None


def _config_alpha(module_name: str, config: dict, label: str) -> float | None:
    patterns = config.get("alpha_pattern") or {}
    alpha = config.get("lora_alpha")
    if not isinstance(patterns, dict) or not all(_is_number(v) for v in (*patterns.values(), alpha) if v is not None):
        raise InputError(f"{label}: the adapter config's lora_alpha/alpha_pattern are not numbers; fix the config")
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module_name):
            return float(value)
    return None if alpha is None else float(alpha)


def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _geometry(name: str, layer: nn.Module) -> tuple[str, int, int, dict | None]:
    """(kind, in, out, conv geometry) of a layer a LoRA can attach to."""
    from diffpro_cli.quant.layers import QuantConv2d, QuantLinear

    if isinstance(layer, (nn.Linear, QuantLinear)):
        return "linear", layer.in_features, layer.out_features, None
    if isinstance(layer, (nn.Conv2d, QuantConv2d)):
        padding = layer.padding
        return "conv", layer.in_channels, layer.out_channels, {
            "kernel_size": tuple(layer.kernel_size), "stride": tuple(layer.stride), "dilation": tuple(layer.dilation),
            "padding": padding if isinstance(padding, str) else tuple(padding), "padding_mode": layer.padding_mode,
            "groups": layer.groups}
    raise UsageError(f"{name}: is a {type(layer).__name__}; LoRA attaches to Linear/Conv2d layers (float or diffpro-quantized) "
                     f"only: load a LoRA made for this model")


def _device_of(layer: nn.Module) -> torch.device:
    for t in (*layer.parameters(recurse=False), *layer.buffers(recurse=False)):
        return t.device
    return torch.device("cpu")


def _build(name: str, layer: nn.Module, down: torch.Tensor, up: torch.Tensor, alpha: float | None, scale: float,
           rslora: bool) -> LoRAAdapter:
    kind, n_in, n_out, conv = _geometry(name, layer)
    down, up = down.detach().float(), up.detach().float()
    r = int(down.shape[0]) if down.dim() >= 2 else 0
    if kind == "conv" and conv["groups"] != 1:
        raise UsageError(f"{name}: LoRA on a grouped convolution (groups={conv['groups']}) is not supported")
    if kind == "conv" and down.dim() == 2 and conv["kernel_size"] == (1, 1):   # linear-shaped LoRA on a 1×1 conv
        down = down[:, :, None, None]
    if kind == "conv" and up.dim() == 2:
        up = up[:, :, None, None]
    if kind == "linear":     # a 1×1-conv-shaped LoRA on a Linear (kohya: SD's proj_in/proj_out, conv in SD1, linear in SDXL)
        down, up = (t[:, :, 0, 0] if t.dim() == 4 and t.shape[2:] == (1, 1) else t for t in (down, up))
    want_down = (r, n_in) if kind == "linear" else (r, n_in, *conv["kernel_size"])
    want_up = (n_out, r) if kind == "linear" else (n_out, r, 1, 1)
    if r == 0 or tuple(down.shape) != want_down or tuple(up.shape) != want_up:
        raise InputError(f"{name}: LoRA shapes A {list(down.shape)} / B {list(up.shape)} do not fit this "
                         f"{type(layer).__name__} (expected A {list(want_down)}, B {list(want_up)}); "
                         f"load a LoRA made for this model")
    a = float(r) if alpha is None else float(alpha)
    if not (math.isfinite(a) and torch.isfinite(down).all() and torch.isfinite(up).all()):
        raise InputError(f"{name}: the LoRA's weights or alpha hold NaN or inf (every output would too); "
                         f"the file is damaged, re-create it")
    scaling = scale * (a / math.sqrt(r) if rslora else a / r)
    device = _device_of(layer)
    return LoRAAdapter(down.to(device), up.to(device), scaling, None if conv is None else {
        k: conv[k] for k in ("stride", "padding", "dilation", "padding_mode")})


def _weight_key(key: str) -> tuple[str, str, str] | None:
    """(module, "down" or "up", PEFT adapter name or "") of a LoRA matrix's key, in any spelling read."""
    m = _WEIGHT.match(key)
    if m is not None:
        return m["mod"], "down" if m["part"] in ("lora_A", "lora_down") else "up", m["adapter"] or ""
    m = _OLD_WEIGHT.match(key)
    if m is not None:
        return m["mod"], m["part"], ""
    m = _PROCESSOR_WEIGHT.match(key)
    if m is not None:
        leaf = "to_out.0" if m["leaf"] == "to_out" else m["leaf"]
        return f"{m['attn']}.{leaf}", m["part"], ""
    return None


def _parse(tensors: dict, config: dict, modules: dict[str, nn.Module], label: str) -> dict[str, dict]:
    """{network module name: {"down", "up", "alpha"}} from a LoRA state dict."""
    flat = {n.replace(".", "_"): n for n in modules if n}
    found: dict[str, dict] = {}
    unknown: list[str] = []
    unrecognised: list[str] = []
    alphas: dict[str, float] = {}
    named: set[str] = set()     # PEFT adapter names inside the keys (<module>.lora_A.<adapter>.weight)
    spellings: set[tuple[str, str, str]] = set()
    for key, value in tensors.items():
        w = _weight_key(key)
        if w is None:
            a = _ALPHA.match(key)
            if a is None:
                unrecognised.append(key)
            elif value.numel() != 1:
                raise InputError(f"{label}: {key} holds {value.numel()} values, not one alpha; the file is damaged, re-create it")
            else:
                alphas[a["mod"]] = float(value.reshape(-1)[0])
            continue
        mod, part, adapter = w
        if (mod, part, adapter) in spellings:    # two spellings of one matrix (a.lora_A.weight and a.lora.down.weight)
            raise InputError(f"{label}: holds the LoRA {'A' if part == 'down' else 'B'} matrix of {mod} twice (under two "
                             f"spellings, e.g. {key}); keep one")
        spellings.add((mod, part, adapter))
        found.setdefault(mod, {})[part] = value
        named.add(adapter)
    if len(named) > 1:   # one module's A/B pairs would overwrite each other: the adapters mixed silently
        raise InputError(f"{label}: holds {len(named)} adapters ({', '.join(sorted(n or '(unnamed)' for n in named))}); "
                         f"save each adapter to its own file (PEFT: save_pretrained(..., selected_adapters=[name]))")
    if unrecognised:
        raise InputError(f"{label}: {len(unrecognised)} key(s) are not LoRA weights this loader reads "
                         f"({', '.join(unrecognised[:3])}); expected <module>.lora_A/lora_B.weight, lora_down/lora_up.weight "
                         f"or lora.down/lora.up.weight (+ .alpha); DoRA and LoRA biases are not supported")
    if not found:
        raise InputError(f"{label}: no LoRA weights found (expected <module>.lora_A.weight / lora_B.weight or "
                         f"lora_down.weight / lora_up.weight); pass a LoRA state dict")
    incomplete = [k for k, v in found.items() if set(v) != {"down", "up"}]
    if incomplete:
        raise InputError(f"{label}: {len(incomplete)} module(s) have only one of the two LoRA matrices "
                         f"({', '.join(incomplete[:3])}); the file is incomplete, re-export it")
    # keys and alphas meet on the layer they resolve to, not on their spelling: `x.alpha` belongs to
    # `transformer.x.lora_A.weight`; two spellings of one layer would silently replace each other
    out: dict[str, dict] = {}
    spelled: dict[str, str] = {}
    twice: list[str] = []
    for key, pair in found.items():
        target = _resolve(key, modules, flat)
        if target is None:
            unknown.append(key)
        elif target in spelled:
            twice.append(f"{spelled[target]} and {key}")
        else:
            spelled[target] = key
            out[target] = {"down": pair["down"], "up": pair["up"], "alpha": None}
    if twice:
        raise InputError(f"{label}: names {len(twice)} layer(s) more than once ({'; '.join(twice[:2])}); "
                         f"keep one spelling per layer")
    alpha_of: dict[str, float] = {}
    lone: list[str] = []
    for key, value in alphas.items():
        target = _resolve(key, modules, flat)
        if target is None:
            if key not in found:
                unknown.append(key)
        elif target not in out:
            lone.append(key)
        elif alpha_of.setdefault(target, value) != value:
            twice.append(key)
    if lone:
        raise InputError(f"{label}: {len(lone)} alpha(s) name layers without LoRA matrices ({', '.join(lone[:3])}); "
                         f"the file is incomplete, re-export it")
    if twice:
        raise InputError(f"{label}: {len(twice)} layer(s) have two different alphas ({', '.join(twice[:3])}); keep one")
    for target, entry in out.items():
        entry["alpha"] = alpha_of.get(target)
        if entry["alpha"] is None:
            entry["alpha"] = _config_alpha(target, config, label)
    text = [k for k in unknown if k.startswith(_TEXT_ENCODER_PREFIXES)]
    if text:    # an SD-style LoRA adapting the text encoder too: the advice is to drop that part, not the file
        raise InputError(f"{label}: {len(text)} of its layers adapt a text encoder ({text[0]}, ...), which load_lora "
                         f"does not adapt (it adapts the denoiser network only); pass ignore_text_encoder=True to load "
                         f"the rest"
                         + (f" ({len(unknown) - len(text)} other module(s) are not in this network either: "
                            f"{next(k for k in unknown if k not in text)})" if len(unknown) > len(text) else ""))
    if unknown:
        example = next((n for n, m in modules.items() if isinstance(m, (nn.Linear, nn.Conv2d)) or
                        getattr(m, "is_diffpro_quant", False)), "")
        raise InputError(f"{label}: names {len(unknown)} module(s) this network does not have "
                         f"({', '.join(unknown[:3])}{', ...' if len(unknown) > 3 else ''}); load a LoRA made for this "
                         f"model (module names as in net.named_modules(), e.g. {example})")
    return out


# ---------------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------------


COMPILED_MARK = "_diffpro_compiled"   # set on a network by diffpro.compile (api.compile)


def _net_of(model_or_net, verb: str) -> nn.Module:
    """The network to adapt; refused once diffpro.compile compiled it: the compiled graph neither calls a
    hook added later nor drops one traced into it, so the adapter change would be silently ignored."""
    from diffpro_cli.models.base import DiffusionModel

    net = model_or_net.net if isinstance(model_or_net, DiffusionModel) else model_or_net
    if not isinstance(net, nn.Module):
        raise UsageError(f"expected a DiffusionModel or an nn.Module, got {type(model_or_net).__name__}")
    if vars(net).get(COMPILED_MARK):
        raise UsageError(f"this network was compiled (diffpro.compile), and its compiled graph would ignore the LoRA {verb}; "
                         f"load the model again and {verb} the LoRA before diffpro.compile")
    return net


def load_lora(model_or_net, lora, scale: float = 1.0, adapter_name: str = "default",
              ignore_text_encoder: bool = False) -> list[str]:
    """Attach a float LoRA adapter to the layers `lora` names (a state dict, a .safetensors file or a
    PEFT/diffusers LoRA directory), on a `DiffusionModel` (its `.net`) or any module. Each adapted layer
    computes base(x) + scale·(alpha/r)·B(A(x)); the base layer keeps its integer weights and kernel.
    Several adapters (distinct `adapter_name`s) add up. Returns the adapted layers' names. Nothing is
    attached when any entry fails to validate. A file's text-encoder layers are refused, or left out
    with `ignore_text_encoder=True`."""
    net = _net_of(model_or_net, "load")
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
        raise UsageError(f"adapter_name {adapter_name!r}: use a non-empty name without dots")
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise UsageError(f"scale {scale!r}: use a finite number (the adapter's weight, e.g. 0.8)")
    if not isinstance(ignore_text_encoder, bool):
        raise UsageError(f"ignore_text_encoder {ignore_text_encoder!r}: use True or False")
    tensors, config, label = _read_source(lora)
    if ignore_text_encoder:
        tensors = {k: v for k, v in tensors.items() if not k.startswith(_TEXT_ENCODER_PREFIXES)}
        if not tensors:
            raise InputError(f"{label}: adapts only a text encoder; load_lora adapts the denoiser network only")
    tensors = kohya_to_modules(tensors, net, label)
    modules = dict(net.named_modules())
    entries = _parse(tensors, config, modules, label)
    rslora = bool(config.get("use_rslora", False))
    adapters = {name: _build(name, modules[name], e["down"], e["up"], e["alpha"], float(scale), rslora)
                for name, e in entries.items()}
    taken = [n for n in adapters if isinstance(getattr(modules[n], "lora", None), nn.ModuleDict)
             and adapter_name in modules[n].lora]
    if taken:
        raise UsageError(f"adapter {adapter_name!r} is already loaded on {len(taken)} layer(s) ({', '.join(taken[:3])}); "
                         f"unload_lora(..., adapter_name={adapter_name!r}) first or pick another adapter_name")
    order = [n for n in modules if n in adapters]
    for name in order:
        layer = modules[name]
        if "lora" not in layer._modules and hasattr(layer, "lora"):
            raise UsageError(f"{name}: the layer already has an attribute 'lora'; LoRA cannot attach here")
        if getattr(layer, "post_op", None) is not None and _fused_parent(net, name) is None:
            raise UsageError(f"{name}: this layer applies a fused activation ({layer.post_op}) that LoRA cannot go before; "
                             f"leave it out of the LoRA")
    for name in order:
        layer = modules[name]
        if "lora" not in layer._modules:
            if getattr(layer, "post_op", None) is not None:
                _unfuse(net, name, layer)
            layer.lora = nn.ModuleDict()
            layer.__dict__["_diffpro_lora_hook"] = layer.register_forward_hook(_lora_hook)
        layer.lora[adapter_name] = adapters[name]
    return order


def _parent(net: nn.Module, name: str) -> nn.Module:
    parent_name = name.rpartition(".")[0]
    return net.get_submodule(parent_name) if parent_name else net


def _fused_parent(net: nn.Module, name: str) -> nn.Module | None:
    """The GELU module whose activation epilogue.fuse_activations moved into layer `name`, or None."""
    from diffpro_cli.quant.epilogue import activation_after

    if activation_after(net, name) is None:
        return None
    parent = _parent(net, name)
    return parent if "forward" in parent.__dict__ else None


def _unfuse(net: nn.Module, name: str, layer: nn.Module) -> None:
    """A LoRA delta belongs before the MLP's GELU (GELU(Wx + ΔWx)), but a layer with the GELU fused into
    its epilogue returns GELU(Wx) and the hook could only add ΔWx after it. While adapted, the GELU
    module applies its activation itself again; unload_lora fuses it back (_fuse_back)."""
    from diffpro_cli.quant.epilogue import unfuse_activations

    unfuse_activations(_fused_parent(net, name))
    layer.__dict__["_diffpro_lora_unfused"] = True


def _fuse_back(net: nn.Module, name: str, layer: nn.Module) -> None:
    from diffpro_cli.quant.epilogue import fuse_activations

    if layer.__dict__.pop("_diffpro_lora_unfused", False):
        fuse_activations(_parent(net, name))


def unload_lora(model_or_net, adapter_name: str | None = None) -> list[str]:
    """Remove the adapter `adapter_name` (None: every adapter) from every layer that has it; a layer
    left with no adapter loses its hook, so it computes exactly what it did before `load_lora`.
    Returns the names of the layers it was removed from."""
    net = _net_of(model_or_net, "unload")
    removed = []
    loaded: set[str] = set()
    for name, layer in list(net.named_modules()):
        adapters = layer._modules.get("lora")
        if not isinstance(adapters, nn.ModuleDict) or "_diffpro_lora_hook" not in layer.__dict__:
            continue
        loaded.update(adapters.keys())
        names = list(adapters.keys()) if adapter_name is None else [adapter_name] if adapter_name in adapters else []
        for n in names:
            del adapters[n]
        if names:
            removed.append(name)
        if len(adapters) == 0:
            layer.__dict__.pop("_diffpro_lora_hook").remove()
            del layer.lora
            _fuse_back(net, name, layer)
    if adapter_name is not None and not removed:
        raise UsageError(f"no LoRA adapter named {adapter_name!r} is loaded"
                         + (f" (loaded: {', '.join(sorted(loaded))})" if loaded else " (none is)"))
    return removed
