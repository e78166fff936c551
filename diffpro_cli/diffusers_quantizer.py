"""diffusers' own `from_pretrained` for a `diffpro export --to diffusers` folder.

    import diffpro
    diffpro.register_diffusers_quantizer()                 # once per process
    net = DiTTransformer2DModel.from_pretrained("OUT")     # diffpro's integer layers, not float ones

Registration adds `quant_method: "diffpro"` to diffusers' quantizer tables (quantizers/auto.py:
AUTO_QUANTIZER_MAPPING / AUTO_QUANTIZATION_CONFIG_MAPPING). diffusers then drives the quantizer
below through its loading hooks:

1. `maybe_update_loaded_keys` is the first hook that sees the weights file: the export folder is its
   directory, and its diffpro.json (format, per-layer records, architecture patches) is read there.
2. `_process_model_before_weight_loading`: on the weightless (meta) skeleton, the planned
   Linear/Conv2d layers become empty QuantLinear/QuantConv2d, embedding tables become Int8Embedding
   and the architecture's recorded patches are applied: the structure `diffpro.load` rebuilds.
3. `maybe_update_state_dict` renames the int8 embedding tensors to the Int8Embedding names and takes
   out what diffusers has no place for (the noise schedule, non-persistent buffers); the parameter
   hooks put every integer layer's stored tensors (qweight / weight_scale / bias / static ranges) in
   place with their stored dtypes (a `torch_dtype` cast would change the integer grid's scales).
4. `_process_model_after_weight_loading` fuses q/k/v, packs each layer for its CPU kernel and drops
   the unpacked integers, as `diffpro.load` does, and installs the timestep pre-hook that static
   activation layers read (and that runs each call under autocast in the plan's compute_dtype).

The result computes what `diffpro.load(OUT, cache=False).net` computes (a plan's cache schedule needs
diffpro's own loader). It is inference-only: not serializable, not trainable, CPU only.
Importing this module is cheap; diffusers' quantizer package (~2 s to import) loads on registration.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from diffpro_cli.errors import InputError, UsageError

QUANT_METHOD = "diffpro"


def register_diffusers_quantizer() -> None:
    """Make diffusers' `from_pretrained` load folders whose config says `quant_method: "diffpro"`;
    idempotent."""
    from diffusers.quantizers import auto

    config_cls, quantizer_cls = _classes()
    auto.AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD] = config_cls
    auto.AUTO_QUANTIZER_MAPPING[QUANT_METHOD] = quantizer_cls


def _has_accelerate() -> bool:
    import importlib.util

    return importlib.util.find_spec("accelerate") is not None


def _meta_for(folder: Path) -> dict:
    """The export folder's diffpro.json, or one error saying what the folder lacks."""
    from diffpro_cli.checkpoint import META, read_meta

    if not (folder / META).is_file():
        raise InputError(f"{folder}: config.json says quant_method 'diffpro' but {META} is missing next to it; "
                         f"export the checkpoint again with `diffpro export QDIR --to diffusers {folder}`")
    return read_meta(folder)


@functools.lru_cache(maxsize=1)
def _classes():
    """(DiffproQuantizationConfig, DiffproDiffusersQuantizer), built on first use so that importing diffpro
    does not import diffusers' quantizer package."""
    from enum import Enum

    from diffusers.quantizers.base import DiffusersQuantizer
    from diffusers.quantizers.quantization_config import QuantizationConfigMixin
    from torch import nn

    from diffpro_cli.artifacts import sha256_file
    from diffpro_cli.checkpoint import (
        EMB_Q,
        EMB_S,
        META,
        SCHEDULE_KEY,
        _compute_dtype,
        _net_patches,
        set_submodule,
    )
    from diffpro_cli.models.base import COMPUTE_DTYPE_ATTR
    from diffpro_cli.quant.epilogue import fuse_activations
    from diffpro_cli.quant.groups import fuse_shared_inputs
    from diffpro_cli.quant.layers import Int8Embedding, _QuantBase, empty_from_record

    class Method(str, Enum):   # diffusers reads `quant_method.value`; as a str it is its own table key
        DIFFPRO = QUANT_METHOD

    class DiffproQuantizationConfig(QuantizationConfigMixin):
        """The export's `quantization_config`, kept as written (the integer layers' authoritative
        records are in diffpro.json, read at load)."""

        def __init__(self, quant_method=QUANT_METHOD, format=None, layers=None, patches=None, **extra):
            self.quant_method = Method(quant_method)
            self.format, self.layers, self.patches = format, layers or {}, patches or {}
            for key, value in extra.items():
                setattr(self, key, value)

        def to_dict(self) -> dict:
            return {**super().to_dict(), "quant_method": QUANT_METHOD}

        def to_diff_dict(self) -> dict:   # diffusers' to_json_string / repr call it; no defaults to drop
            return self.to_dict()

        def __repr__(self) -> str:   # diffusers logs the config: the per-layer table would be thousands of lines
            return f"DiffproQuantizationConfig(format={self.format!r}, layers={len(self.layers)})"

    class DiffproDiffusersQuantizer(DiffusersQuantizer):
        """Loads a diffpro export's stored integers into diffpro's integer layers (module docstring)."""

        requires_calibration = True   # pre-quantized only: there is nothing to quantize on the fly
        use_keep_in_fp32_modules = False

        def __init__(self, quantization_config, **kwargs):
            super().__init__(quantization_config, **kwargs)
            self.folder: Path | None = None
            self.meta: dict | None = None
            self._loaded_keys: list[str] = []
            self._stashed: dict[str, torch.Tensor] = {}   # non-persistent buffers, placed after loading
            self._nonpersistent: set[str] = set()

        def validate_environment(self, *args, torch_dtype=None, device_map=None, **kwargs):
            if not _has_accelerate():   # diffusers' quantized loading path builds the skeleton with accelerate
                raise UsageError("diffusers loads quantized models only with accelerate installed (pip install accelerate); "
                                 "without it, load the export with diffpro.load(OUT).net")
            if torch_dtype not in (None, torch.float32):
                raise UsageError(f"torch_dtype {torch_dtype}: diffpro's integer layers compute in float32; "
                                 f"load without torch_dtype (or torch.float32)")
            devices = set(device_map.values()) if isinstance(device_map, dict) else {device_map}
            if not devices <= {None, "cpu", torch.device("cpu")}:
                raise UsageError(f"device_map {device_map!r}: diffpro's export loads on the CPU in this release; "
                                 f"leave device_map out")

        def update_torch_dtype(self, torch_dtype):
            return torch.float32 if torch_dtype is None else torch_dtype

        @property
        def supports_parallel_loading(self) -> bool:   # the parameter hooks assign into shared modules
            return False

        def maybe_update_loaded_keys(self, loaded_keys, checkpoint_files):
            if len(checkpoint_files) != 1 or not isinstance(checkpoint_files[0], (str, Path)):
                raise InputError("a diffpro export has one weights file; this folder is sharded, re-export it")
            weights = Path(checkpoint_files[0])
            self.folder = weights.parent
            self.meta = _meta_for(self.folder)
            expected = self.meta["provenance"].get("tensors_sha256")
            if expected not in (None, sha256_file(weights)):
                raise InputError(f"{weights}: sha256 does not match {self.folder / 'diffpro.json'} (mixed-up or modified "
                                 f"export); export the checkpoint again")
            self._loaded_keys = [self._rename(k) for k in loaded_keys if k != SCHEDULE_KEY]
            return self._loaded_keys

        def _tables(self) -> list[str]:
            return list((self.meta.get("embeddings") or {}).get("tables") or [])

        def _rename(self, key: str) -> str:
            """An int8 table's stored name → its Int8Embedding buffer's name."""
            for suffix, leaf in ((f".weight{EMB_Q}", ".qweight"), (f".weight{EMB_S}", ".scale")):
                if key.endswith(suffix) and key[: -len(suffix)] in self._tables():
                    return key[: -len(suffix)] + leaf
            return key

        def _process_model_before_weight_loading(self, model, **kwargs):
            arch = self.meta["model"]["architecture"]
            if arch.get("builder") != "diffusers" or arch.get("class") != type(model).__name__:
                raise UsageError(f"{self.folder}: holds a {arch.get('class') or arch.get('builder')} network, not "
                                 f"{type(model).__name__}; load it with {arch.get('class')}.from_pretrained")
            source = self.meta["model"].get("source_config")
            from diffpro_cli.models.base import apply_net_patches

            apply_net_patches(model, _net_patches(arch, source if isinstance(source, dict) else {}))
            modules = dict(model.named_modules())
            for name, record in self.meta["layers"].items():
                if not isinstance(modules.get(name), (nn.Linear, nn.Conv2d)):
                    raise InputError(f"{self.folder}: layer {name} is not a Linear/Conv2d of {type(model).__name__}; "
                                     f"the export does not match its config")
                set_submodule(model, name, empty_from_record(record, device="meta"))
            for name in self._tables():
                rows, dim = modules[name].weight.shape
                set_submodule(model, name, Int8Embedding(torch.empty(rows, dim, dtype=torch.int8, device="meta"),
                                                         torch.empty(rows, 1, device="meta")))
            persistent = set(model.state_dict())
            self._nonpersistent = {n for n, _ in model.named_buffers() if n not in persistent}
            # diffusers lists stored keys it has no place for as unexpected: these are placed after loading
            self._loaded_keys[:] = [k for k in self._loaded_keys if k not in self._nonpersistent]
            return model

        def maybe_update_state_dict(self, state_dict):
            out = {}
            for key, value in state_dict.items():
                if key == SCHEDULE_KEY:
                    continue
                key = self._rename(key)
                if key in self._nonpersistent:
                    self._stashed[key] = value
                else:
                    out[key] = value
            return out

        def _owner(self, model, param_name: str):
            module_name, _, leaf = param_name.rpartition(".")
            return model.get_submodule(module_name), leaf

        def check_if_quantized_param(self, model, param_value, param_name, state_dict, **kwargs) -> bool:
            module, _ = self._owner(model, param_name)
            return isinstance(module, (_QuantBase, Int8Embedding))

        def check_quantized_param_shape(self, param_name, current_param, loaded_param):
            if current_param.numel() != loaded_param.numel():
                raise InputError(f"{self.folder}: tensor {param_name} has shape {list(loaded_param.shape)}, expected "
                                 f"{list(current_param.shape)}; the export does not match its diffpro.json")
            return True

        def create_quantized_param(self, model, param_value, param_name, target_device, *args, **kwargs):
            module, leaf = self._owner(model, param_name)
            empty = module._buffers[leaf]
            # the stored dtype (fp16 scales widen exactly to the float32 the kernels use), never torch_dtype
            module._buffers[leaf] = param_value.to(device=target_device, dtype=empty.dtype).reshape(empty.shape).clone()

        def _process_model_after_weight_loading(self, model, **kwargs):
            from diffpro_cli.api import install_timestep_hook

            for key, value in self._stashed.items():
                owner, leaf = self._owner(model, key)
                owner._buffers[leaf] = value   # as stored, like diffpro's loader: nothing rests on re-initialisation
            self._stashed = {}
            missing = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t is not None and t.is_meta]
            if missing:
                raise InputError(f"{self.folder}: {len(missing)} tensors are missing from the weights (e.g. {missing[0]}); "
                                 f"export the checkpoint again")
            model.eval()
            fuse_shared_inputs(model)   # before packing: a fused q/k/v group is packed once
            fuse_activations(model)     # MLP GELUs into their int8 GEMM's epilogue
            layers = [m for m in model.modules() if isinstance(m, _QuantBase)]
            for layer in layers:
                layer.prepare("cpu")
            for layer in layers:    # the kernels hold their own packed copies (inference-only, as diffpro.load)
                layer.release_integers()
            install_timestep_hook(model)
            # a plan made for bf16/fp16 float math: the hook runs each call under autocast in it, as
            # diffpro.load's network does (without this, the float layers computed in float32 here)
            dtype = _compute_dtype(self.meta.get("compute_dtype"), self.folder / META)
            if dtype is not None:
                model.__dict__[COMPUTE_DTYPE_ATTR] = dtype
            return model

        @property
        def is_serializable(self) -> bool:   # the unpacked integers are released; re-export from the checkpoint
            return False

        @property
        def is_trainable(self) -> bool:
            return False

    return DiffproQuantizationConfig, DiffproDiffusersQuantizer
