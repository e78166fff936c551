"""The quantized checkpoint: `model.safetensors` + `diffpro.json` in one directory.

model.safetensors holds, by the network's own qualified names,
  * every quantized layer's buffers: `<layer>.qweight` (int8, or packed uint8 for < 8 bits),
    `<layer>.weight_scale` (fp16 [out, groups], float32 in memory), `<layer>.bias`, and for static activations
    `<layer>.act_timesteps` / `<layer>.act_absmax`;
  * every other parameter and buffer of the network unchanged (full-precision layers as they are),
    non-persistent buffers included, so nothing depends on the architecture's initialisation —
    except nn.Embedding lookup tables (class labels), stored int8 per row as `<table>.weight.__int8__`
    + `.__scale__` (diffusers' DiT-XL/2 has 28 of them, 129 MB in fp32; `int8_embeddings=False` keeps
    them float), kept int8 at load (layers.Int8Embedding), dequantized to float with keep_integers;
  * `__diffpro__.alphas_cumprod` (float64): the noise schedule.
diffpro.json holds the format version, the architecture (class + config, so the network is rebuilt
with `Class.from_config` on the meta device: no float weights are ever materialised for quantized
layers, plus `patches`, the loader's settings outside the config, re-applied through
models.base.apply_net_patches; or the module:factory spec, re-run with --trust-code), the decoder
record (models.diffusers_dir.build_decoder), per-layer bits / layout / kernel / activation mode, the
timestep subset and provenance hashes.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn

from diffpro_cli import __version__
from diffpro_cli.allocator import release_freed_memory
from diffpro_cli.artifacts import atomic_save_safetensors, atomic_write_json, read_json, sha256_file, sha256_json
from diffpro_cli.errors import InputError, TrustError
from diffpro_cli.models.base import EMBEDDING_FORWARDS, DiffusionModel, apply_net_patches, dit_forward, unet_forward
from diffpro_cli.quant.formats import dequantize_weight, fp16_exact, quantize_weight
from diffpro_cli.quant.epilogue import fuse_activations
from diffpro_cli.quant.groups import fuse_shared_inputs
from diffpro_cli.quant.layers import Int8Embedding, QuantConv2d, QuantLinear, _QuantBase, empty_from_record, normalise_act, timestep_context

SCHEMA = "diffpro.quantized/1"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
META = "diffpro.json"
SCHEDULE_KEY = "__diffpro__.alphas_cumprod"
EMB_Q, EMB_S = ".__int8__", ".__scale__"   # suffixes of an int8-stored embedding table
FORWARDS = {"dit": dit_forward, "unet": unet_forward, **EMBEDDING_FORWARDS}   # text-conditioned kinds too


def quant_layers(net: nn.Module) -> dict[str, _QuantBase]:
    return {name: mod for name, mod in net.named_modules() if isinstance(mod, _QuantBase)}


def set_submodule(net: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(net.get_submodule(parent) if parent else net, child, new)


def plan_layer(module: nn.Module, entry: dict | None, static_range: tuple | None = None,
               hessian: torch.Tensor | None = None) -> _QuantBase | None:
    """The quant layer a plan entry asks for (None: the layer stays in full precision). `hessian`
    (Linear layers only): GPTQ rounding instead of round-to-nearest."""
    if isinstance(module, _QuantBase):
        return module
    if entry is None or int(entry.get("weight_bits", 16)) >= 16:
        return None
    mode = normalise_act(int(entry.get("act_bits", 8)), entry.get("act_mode", "dynamic"))
    bound = bool(entry.get("pair_bound"))   # GPTQ runs once: bounded below, or plain where the bound does not apply
    if isinstance(module, nn.Linear):
        layer = QuantLinear.from_float(module, int(entry["weight_bits"]), mode, entry.get("group_size"), None if bound else hessian)
    else:
        layer = QuantConv2d.from_float(module, int(entry["weight_bits"]), mode, entry.get("group_size"))
    if mode == "static":
        if static_range is None:
            raise InputError("static activations need calibrated ranges; run quantize with --act-mode static through the stage")
        layer.set_static_ranges(*static_range)
    layer.prefer = entry.get("kernel")   # the kernel allocate measured fastest for it (None: the registry's rule)
    if bound:
        layer.bound_pairs(module.weight, hessian)
    if bound and not layer.pair_bounded and hessian is not None:   # not covered (e.g. group-wise): plain GPTQ
        layer.set_weight(module.weight, module.bias, hessian)
    return layer


def embedding_tables(net: nn.Module) -> list[str]:
    return [name for name, mod in net.named_modules() if isinstance(mod, nn.Embedding)]


def _half_if_exact(scale: torch.Tensor) -> torch.Tensor:
    """Scales as fp16 on disk when that loses nothing (formats.fp16_scale made them so); older in-memory
    layers with other float32 scales keep them."""
    return scale.half() if fp16_exact(scale) else scale


def _scales_to_float(state: dict) -> None:
    """fp16 scales read from disk become the float32 the layers compute with (exactly)."""
    for key, value in state.items():
        if value.dtype == torch.float16 and (key.endswith(".weight_scale") or key.endswith(EMB_S)):
            state[key] = value.float()


def non_layer_bytes(model: DiffusionModel, layer_names: list[str]) -> int:
    """Bytes a checkpoint of `model` holds besides the named layers' weights and biases (which the plan
    prices per option): other parameters and buffers as stored, int8 embedding tables, the schedule, and
    the safetensors header (estimated: one JSON entry per tensor, ~66 bytes + its name; 3 per layer)."""
    # counted from shapes and dtypes, the same rules as checkpoint_tensors, without copying any tensor
    # (a model on a GPU would otherwise be copied to host memory whole)
    prefixes = tuple(f"{n}." for n in layer_names)
    state = model.net.state_dict()
    for name, buf in model.net.named_buffers():      # non-persistent buffers too
        state.setdefault(name, buf)
    tables = {f"{name}.weight": model.net.get_submodule(name).weight for name in embedding_tables(model.net)}
    sizes = {}
    for key, value in state.items():
        if value is None or key in tables or (key.startswith(prefixes) and key.rpartition(".")[2] in ("weight", "bias")):
            continue
        sizes[key] = value.numel() * value.element_size()
    for key, w in tables.items():                     # int8 rows + one fp16 scale per row
        sizes[key + EMB_Q], sizes[key + EMB_S] = w.numel(), 2 * w.shape[0]
    sizes[SCHEDULE_KEY] = 8 * model.alphas_cumprod.numel()
    names = list(sizes) + [f"{n}.{leaf}" for n in layer_names for leaf in ("qweight", "weight_scale", "bias")]
    return sum(sizes.values()) + 8 + 64 + sum(len(n) + 66 for n in names)


def checkpoint_tensors(model: DiffusionModel, qlayers: dict[str, _QuantBase], int8_embeddings: bool = True) -> dict[str, torch.Tensor]:
    """Everything the checkpoint stores, by name (see module docstring)."""
    tensors = {}
    if int8_embeddings:   # lookup tables: int8 per row on disk, dequantized to float at load
        for name in embedding_tables(model.net):
            q, scale = quantize_weight(model.net.get_submodule(name).weight.detach().cpu(), 8)
            tensors[f"{name}.weight{EMB_Q}"], tensors[f"{name}.weight{EMB_S}"] = q, _half_if_exact(scale)
    for name, layer in qlayers.items():
        if layer.integers_released:
            raise InputError(f"{model.spec}: loaded for inference only (integer weights released after packing); "
                             "quantize the float model instead, or load the checkpoint with keep_integers=True")
        for key, value in layer.state_dict().items():
            value = value.detach().cpu()
            tensors[f"{name}.{key}"] = _half_if_exact(value) if key == "weight_scale" else value
    prefixes = tuple(f"{name}." for name in qlayers)
    skip = {f"{name}.weight" for name in embedding_tables(model.net)} if int8_embeddings else set()
    state = model.net.state_dict()
    for name, buf in model.net.named_buffers():      # non-persistent buffers too
        state.setdefault(name, buf)
    for key, value in state.items():
        if value is not None and not key.startswith(prefixes) and key not in skip:
            tensors[key] = value.detach().cpu()
    tensors[SCHEDULE_KEY] = model.alphas_cumprod.detach().double().cpu()
    return tensors


def _architecture(model: DiffusionModel) -> dict:
    """How to rebuild the network without its weights: the class and its config, plus the loader's
    post-construction settings (config["net_patches"]), or the factory that builds it."""
    cfg = model.config or {}
    if "architecture" in cfg:     # a reloaded checkpoint, saved again: rebuilt exactly as it was
        return _jsonable(cfg["architecture"])
    if model.kind == "custom" or "custom" in cfg:   # the factory's own model: forward and decode included
        return {"builder": "factory", "spec": model.spec}
    cls = cfg.get("class") or type(model.net).__name__
    config = cfg.get("config")
    if config is None and hasattr(model.net, "config"):
        config = {k: v for k, v in dict(model.net.config).items() if not k.startswith("_")}
    if config is None:
        raise InputError(f"{model.spec}: the loader recorded no architecture config; this model cannot be saved as a diffpro checkpoint")
    return {"builder": "diffusers", "class": cls, "config": config, "patches": _jsonable(cfg.get("net_patches") or {})}


def _net_patches(arch: dict, source_config: dict) -> dict:
    """The architecture's recorded settings; checkpoints written before they were recorded only have
    the original-DiT loader's `timestep_freq_shift` in their source config."""
    if "patches" in arch or arch.get("builder") != "diffusers":
        return arch.get("patches") or {}
    if isinstance(source_config, dict) and source_config.get("timestep_freq_shift") is not None:
        return {"timestep_freq_shift": source_config["timestep_freq_shift"]}
    return {}


def _decode_record(m: dict) -> dict | None:
    """The model's decoder record; for older checkpoints, rebuilt from the pipeline's folder and VAE scale."""
    if "decode" in m:
        return m["decode"]
    src = m.get("source_config") or {}
    if src.get("vae") and src.get("source"):
        return {"type": "vae", "path": str(Path(src["source"]).resolve() / "vae"), "scaling_factor": float(src["vae"]["scaling_factor"])}
    return None


def _avg_bits(model: DiffusionModel, qlayers: dict[str, _QuantBase]) -> float:
    """Average weight bits over every quantizable layer's weights (float layers count 32)."""
    total_bits = total = 0
    for name, (mod, _) in model.quantizable_layers().items():
        q = qlayers.get(name)
        numel = q.weight_shape[0] * q.in_flat if q is not None else mod.weight.numel()
        total_bits += numel * (q.weight_bits if q is not None else 32)
        total += numel
    return total_bits / total if total else 32.0


def save_quantized(model: DiffusionModel, plan: dict | None, out_dir: str | Path, timesteps: list[int] | None = None,
                   static_ranges: dict[str, tuple] | None = None, provenance: dict | None = None,
                   int8_embeddings: bool = True, hessians: dict[str, torch.Tensor] | None = None,
                   cache: dict | None = None, advance=lambda n=1: None) -> dict:
    """Quantize `model` layer by layer as `plan` says and write the checkpoint; returns diffpro.json.

    The float model is not modified (each quant layer lives only until its integers are collected), so
    a caller can keep using it. Layers that are already quant layers are stored as they are.
    static_ranges: layer name → (timesteps, max |x| per timestep), for act_mode "static" entries.
    hessians: layer name → E[x xᵀ] of its inputs, for GPTQ rounding of those (Linear) layers.
    cache: the plan's `cache` section (docs/caching.md), recorded as is; `diffpro.load` and `diffpro
    sample` execute its schedule. `advance(1)` after each layer (GPTQ on a large model takes minutes).
    """
    out_dir = Path(out_dir)
    entries = (plan or {}).get("layers", {})
    static_ranges, hessians = static_ranges or {}, hessians or {}
    qlayers = {}
    for name, (mod, _) in model.quantizable_layers().items():
        layer = plan_layer(mod, entries.get(name), static_ranges.get(name), hessians.get(name))
        if layer is not None:
            qlayers[name] = layer
        advance(1)
    tensors = checkpoint_tensors(model, qlayers, int8_embeddings)
    float_bytes = sum(t.numel() * 4 for t in model.net.state_dict().values() if t.is_floating_point())
    layers = {name: layer.describe() | {"rounding": "gptq" if name in hessians and layer.kind == "linear" else "nearest"}
              for name, layer in qlayers.items()}
    static_ts = sorted({int(t) for layer in qlayers.values() if layer.act_mode == "static" for t in layer.act_timesteps.tolist()})
    meta = {
        "schema": SCHEMA,
        "format_version": FORMAT_VERSION,
        "model": {"spec": model.spec, "sha256": model.sha256, "kind": model.kind, "sample_shape": list(model.sample_shape),
                  "num_classes": model.num_classes, "num_train_timesteps": model.num_train_timesteps,
                  "random_weights": model.random_weights, "untrained": model.untrained,
                  "architecture": _architecture(model), "decode": _jsonable((model.config or {}).get("decode")),
                  "source_config": _jsonable(model.config)},
        "layers": layers,
        "activation": {"modes": sorted({rec["act_mode"] for rec in layers.values()}), "bits": 8, "symmetric_weights": True,
                       "dynamic": "int8, one asymmetric range per input tensor (Linear) / symmetric per sample (Conv2d), found at every call",
                       "dynamic-token": "int8, symmetric, one scale per token (Linear) / per sample (Conv2d), found at every call",
                       "static": "int8, symmetric, one calibrated scale per timestep and tensor (<layer>.act_absmax)",
                       "static_timesteps": static_ts},
        "embeddings": {"storage": "int8-per-row" if int8_embeddings else "float",
                       "tables": embedding_tables(model.net) if int8_embeddings else []},
        "timesteps": None if timesteps is None else [int(t) for t in timesteps],
        "cache": _jsonable(cache) if cache else None,
        "compute_dtype": (plan or {}).get("compute_dtype") or "float32",   # the float math's dtype (allocate_dtype.py)
        "planned_for": (plan or {}).get("world"),   # the cost-table world the plan was priced in, e.g. "compiled-bfloat16"
        "totals": {"avg_bits": round(_avg_bits(model, qlayers), 4), "quantized_layers": len(qlayers),
                   "float_layers": len(model.quantizable_layers()) - len(qlayers), "fp32_bytes": float_bytes},
        "provenance": {"model_sha256": model.sha256, "plan_sha256": None if plan is None else sha256_json(plan),
                       "diffpro_version": __version__, "torch": torch.__version__,
                       "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **(provenance or {})},
    }
    weights = atomic_save_safetensors(out_dir / WEIGHTS, tensors, metadata={"diffpro_schema": SCHEMA, "format_version": str(FORMAT_VERSION)})
    meta["provenance"]["tensors_sha256"] = sha256_file(weights)
    meta["totals"]["bytes"] = weights.stat().st_size
    atomic_write_json(out_dir / META, meta)
    return meta


def _jsonable(obj):
    import json

    return json.loads(json.dumps(obj, default=str))


def _build_empty(arch: dict, trust_code: bool) -> tuple[nn.Module, DiffusionModel | None]:
    """(the architecture with no weights allocated (meta device) where possible and the loader's
    network settings applied, the factory's own model for factory-built networks else None)."""
    if arch["builder"] == "factory":
        if not trust_code:
            raise TrustError(f"this checkpoint's network comes from {arch['spec']}; pass --trust-code to import and run its code")
        from diffpro_cli.models.custom import load_custom

        built = load_custom(arch["spec"], trust_code=True)
        return built.net, built
    import diffusers

    cls = getattr(diffusers, arch["class"], None)
    if cls is None:
        raise InputError(f"checkpoint architecture {arch['class']} is not a diffusers model class; re-quantize from the original model")
    with torch.device("meta"):
        net = cls.from_config(arch["config"])
    apply_net_patches(net, arch.get("patches"))
    return net.eval(), None


def _decoder(record: dict | None):
    """The loader's decoder, rebuilt from its record; a VAE that is no longer on disk fails when used,
    not at load (latency and memory runs never decode)."""
    from diffpro_cli.models.diffusers_dir import build_decoder

    try:
        return build_decoder(record)
    except InputError as exc:
        message = f"decoding needs the VAE at {record.get('path')}, which cannot be loaded ({str(exc)[:120]}); " \
                  "put the pipeline back there or quantize it again from where it is now"

        def decode(x):
            raise InputError(message)

        return decode


def read_meta(path: str | Path) -> dict:
    path = Path(path)
    meta = read_json(path / META, SCHEMA)
    if meta.get("format_version") != FORMAT_VERSION:
        raise InputError(f"{path / META}: format version {meta.get('format_version')} is not readable by diffpro {__version__}; re-run `diffpro quantize`")
    return meta


def load_quantized(path: str | Path, *, trust_code: bool = False, verify: bool = True, fuse: bool = True,
                   keep_integers: bool = False) -> DiffusionModel:
    """Rebuild a quantized model from a checkpoint directory, without the original float weights.

    Layers are read from the file and packed for their kernel one at a time (or one fused q/k/v group
    at a time); unless `keep_integers`, each layer's stored integers are then dropped, since the kernel
    holds its own packed copy (inference-only: the model runs, but cannot be re-saved or moved to
    another device). So the load peak is about the packed weights plus one layer, not twice the model.
    """
    path = Path(path)
    meta = read_meta(path)
    weights = path / WEIGHTS
    if not weights.exists():
        raise InputError(f"{weights}: missing; re-run `diffpro quantize` to write the checkpoint again")
    if verify and meta["provenance"].get("tensors_sha256") not in (None, sha256_file(weights)):
        raise InputError(f"{weights}: sha256 does not match {META} (mixed-up or modified checkpoint); re-run `diffpro quantize`")
    m = meta["model"]
    source = m.get("source_config") if isinstance(m.get("source_config"), dict) else {}
    arch = dict(m["architecture"])
    if arch.get("builder") == "diffusers":
        arch["patches"] = _net_patches(arch, source)
    net, built = _build_empty(arch, trust_code)
    for name, record in meta["layers"].items():
        try:
            net.get_submodule(name)
        except AttributeError:
            raise InputError(f"{path / META}: layer {name} does not exist in {arch.get('class')}; the checkpoint does not match its config") from None
        set_submodule(net, name, empty_from_record(record, device="meta", source=f"{path / META}: layer {name}"))
    with TensorFile(weights) as reader:
        packed_keys = {f"{name}.qweight" for name in meta["layers"]}
        state = {k: reader.get(k) for k in reader.keys() if k not in packed_keys}   # everything small first
        _scales_to_float(state)
        alphas = state.pop(SCHEDULE_KEY, None)
        for name in meta.get("embeddings", {}).get("tables", []):
            q, scale = state.pop(f"{name}.weight{EMB_Q}", None), state.pop(f"{name}.weight{EMB_S}", None)
            if q is None or scale is None:
                raise InputError(f"{weights}: embedding table {name} is missing; re-run `diffpro quantize`")
            if keep_integers:   # a float table, so the model can be saved again as it was
                state[f"{name}.weight"] = dequantize_weight(q, scale)
            else:
                set_submodule(net, name, Int8Embedding(q, scale))
        _assign(net, state, weights)
        del state
        net.eval()
        if fuse:   # before packing, so fused q/k/v weights are packed once, not per layer and then again
            fuse_shared_inputs(net)
            fuse_activations(net)
        qlayers = quant_layers(net)
        names = {id(mod): name for name, mod in qlayers.items()}
        for mod in qlayers.values():
            if not mod.qweight.is_meta:   # already read as a member of a fused group
                continue
            members = mod._group.members if mod._group is not None else [mod]
            for member in members:
                member.qweight = reader.get(f"{names[id(member)]}.qweight", like=member.qweight)
            mod.prepare("cpu")
            if not keep_integers:
                for member in members:
                    member.release_integers()
            release_freed_memory()   # per layer: otherwise unpacking temporaries pile up
    _check_nothing_meta(net, weights)
    kind = m["kind"]
    decode_record = _decode_record(m)
    if built is not None:      # the factory's own call convention and decoder
        base_forward, decode = built.forward_fn, built.decode
    else:
        base_forward, decode = FORWARDS.get(kind), _decoder(decode_record)
        if base_forward is None:
            from diffpro_cli.models.custom import custom_forward as base_forward
    return DiffusionModel(
        spec=str(path), net=net, kind=kind, sample_shape=tuple(m["sample_shape"]),
        alphas_cumprod=alphas if alphas is not None else torch.empty(0), forward_fn=_timestep_aware(base_forward),
        num_classes=m["num_classes"], decode=decode, random_weights=m["random_weights"], untrained=m["untrained"],
        sha256=meta["provenance"].get("tensors_sha256"),
        # the source model's record too, so saving this model again keeps its settings
        config=source | {"quantized_from": m["spec"], "model_sha256": m["sha256"], "architecture": arch,
                         "decode": decode_record, "timesteps": meta.get("timesteps"), "totals": meta.get("totals"),
                         "cache": meta.get("cache")},
        compute_dtype=_compute_dtype(meta.get("compute_dtype"), path),
    )


def _compute_dtype(name: str | None, path) -> torch.dtype | None:
    """The recorded float dtype as torch's (None for float32 and checkpoints from before it was recorded)."""
    if name in (None, "float32"):
        return None
    if name not in ("bfloat16", "float16"):
        raise InputError(f"{path}: compute_dtype {name!r} is not one diffpro runs (float32, bfloat16, float16); re-run `diffpro quantize`")
    return getattr(torch, name)


class TensorFile:
    """Reads one tensor at a time from a safetensors file with plain reads.

    Not through a memory map (safetensors' own safe_open): every page of a mapping that is touched
    counts towards the process's resident memory until the mapping closes, so reading a checkpoint
    layer by layer through one still peaks at the size of the file."""

    DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}

    def __init__(self, path: Path):
        import json
        import struct

        self.path = Path(path)
        self._file = open(self.path, "rb")
        try:
            (size,) = struct.unpack("<Q", self._file.read(8))
            if size > 100_000_000:
                raise ValueError("header too large")
            header = json.loads(self._file.read(size))
            header.pop("__metadata__", None)
            for entry in header.values():
                if entry["dtype"] not in self.DTYPES:
                    raise ValueError(f"dtype {entry['dtype']}")
        except (ValueError, KeyError, TypeError, struct.error) as exc:
            self._file.close()
            raise self._unreadable(exc) from None
        self._base = 8 + size
        self._entries = header

    def _unreadable(self, exc) -> InputError:
        return InputError(f"{self.path}: not a readable safetensors file ({str(exc).splitlines()[0][:80] if str(exc) else type(exc).__name__}); "
                          "re-run `diffpro quantize`")

    def keys(self) -> list[str]:
        return list(self._entries)

    def get(self, name: str, like: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor `name`; with `like`, it must have that tensor's shape and dtype."""
        entry = self._entries.get(name)
        if entry is None:
            raise InputError(f"{self.path}: tensor {name} is missing; re-run `diffpro quantize`")
        tensor = torch.empty(entry["shape"], dtype=self.DTYPES[entry["dtype"]])
        if like is not None and (tensor.shape != like.shape or tensor.dtype != like.dtype):
            raise InputError(f"{self.path}: tensor {name} is {entry['dtype']} {entry['shape']}, expected {like.dtype} {list(like.shape)}; "
                             "the checkpoint does not match its config")
        start, end = entry["data_offsets"]
        nbytes = tensor.numel() * tensor.element_size()
        if end - start != nbytes:
            raise self._unreadable(ValueError(f"tensor {name} has {end - start} bytes, expected {nbytes}"))
        if nbytes:
            view = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
            self._file.seek(self._base + start)
            done = 0
            while done < nbytes:
                got = self._file.readinto(view[done:])
                if not got:
                    raise self._unreadable(EOFError(f"file ends inside tensor {name}"))
                done += got
        return tensor

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "TensorFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _assign(net: nn.Module, state: dict, source: Path) -> None:
    """Put every stored tensor in place (params, persistent and non-persistent buffers)."""
    for name, tensor in state.items():
        module_name, _, leaf = name.rpartition(".")
        try:
            owner = net.get_submodule(module_name) if module_name else net
        except AttributeError:
            raise InputError(f"{source}: tensor {name} has no place in the rebuilt network; the checkpoint does not match its config") from None
        if leaf in owner._parameters:
            owner._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
        elif leaf in owner._buffers:
            owner._buffers[leaf] = tensor
        else:
            raise InputError(f"{source}: tensor {name} has no place in the rebuilt network; the checkpoint does not match its config")


def _check_nothing_meta(net: nn.Module, source: Path) -> None:
    missing = [n for n, t in list(net.named_parameters()) + list(net.named_buffers()) if t is not None and t.is_meta]
    if missing:
        raise InputError(f"{source}: {len(missing)} tensors are missing (e.g. {missing[0]}); re-run `diffpro quantize`")


def _timestep_aware(forward_fn):
    """The model's forward inside a timestep context, so static-activation layers find their scales."""
    def forward(net, x, t, y):
        with timestep_context(t):
            return forward_fn(net, x, t, y)
    return forward
