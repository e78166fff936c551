"""Model loaders: every spec resolves to one `DiffusionModel`.

Specs: `builtin:NAME`, `random:ARCH`, a diffusers directory, an original DiT checkpoint (.pt /
.safetensors), a diffpro quantized directory (has diffpro.json), `pkg.module:factory` (needs
--trust-code and usually --weights).
"""

from __future__ import annotations

import re
from pathlib import Path

from diffpro_cli.errors import InputError, UsageError
from diffpro_cli.models.base import DiffusionModel

DEFAULT_MODEL = "builtin:dit-mnist"
_FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def load_float_model(spec: str, *, trust_code: bool = False, weights: str | Path | None = None, seed: int = 0) -> DiffusionModel:
    """Resolve a float model spec (see module docstring) to a DiffusionModel in eval mode on CPU.
    Quantized checkpoints are loaded one level up (diffpro_cli.loading), so models never imports the
    checkpoint code that builds on it."""
    if weights is not None and not _FACTORY.match(spec):   # it would be ignored: the model has its own weights
        raise UsageError(f"--weights is for module:factory models; {spec} brings its own weights: drop --weights")
    if spec.startswith("builtin:"):
        from diffpro_cli.models.builtin import load_builtin

        return load_builtin(spec.split(":", 1)[1])
    if spec.startswith("random:"):
        from diffpro_cli.models.random_arch import load_random

        return load_random(spec.split(":", 1)[1], seed=seed)
    path = Path(spec)
    if path.exists():
        if path.is_dir():
            if (path / "diffpro.json").exists():
                raise InputError(f"{spec}: is a diffpro quantized checkpoint; load it with diffpro_cli.loading.load_model")
            from diffpro_cli.models.diffusers_dir import load_diffusers_dir

            return load_diffusers_dir(path)
        if path.suffix in (".pt", ".pth", ".bin", ".ckpt", ".safetensors"):
            from diffpro_cli.models.original_dit import load_original_dit

            return load_original_dit(path)
        raise InputError(f"{spec}: unrecognised model file type {path.suffix!r}; pass a .pt/.safetensors DiT checkpoint, a diffusers directory, or builtin:NAME")
    if _FACTORY.match(spec):
        from diffpro_cli.models.custom import load_custom

        return load_custom(spec, weights=weights, trust_code=trust_code)
    raise InputError(f"{spec}: no such model file or directory; pass a path, builtin:dit-mnist, builtin:unet-mnist, builtin:flow-mnist, random:dit-xl-2 (`diffpro models` lists them), or module:factory")
