"""Every model spec, quantized checkpoints included, to a DiffusionModel.

Sits above `models` (float loaders) and `checkpoint` (quantized checkpoints, which rebuild networks
with the float loaders): `load_model` is the one entry point stages and metrics use.
"""

from __future__ import annotations

from pathlib import Path

from diffpro_cli.errors import UsageError
from diffpro_cli.models.base import DiffusionModel


def is_quantized_checkpoint(spec: str | Path) -> bool:
    path = Path(spec)
    return path.is_dir() and (path / "diffpro.json").exists()


def load_model(spec: str | Path, *, trust_code: bool = False, weights: str | Path | None = None, seed: int = 0,
               keep_integers: bool = False, device: str | None = None) -> DiffusionModel:
    """A diffpro quantized checkpoint (a directory with diffpro.json; its network's code behind
    `trust_code`), or any float model spec (models.load_float_model), on `device` (default the CPU; a
    checkpoint bound for a GPU keeps its stored integers, which its layers pack there on their first
    call). The first load in a process keeps freed memory in it from then on (allocator.steady_allocator:
    steady step latency on CPU)."""
    from diffpro_cli.allocator import steady_allocator
    from diffpro_cli.devices import place, resolve_device

    target = resolve_device(device)
    steady_allocator()
    if is_quantized_checkpoint(spec):
        if weights is not None:   # it would be ignored, as models.load_float_model refuses for built-in specs
            raise UsageError(f"--weights is for module:factory models; {spec} is a quantized checkpoint that holds its own weights: drop --weights")
        from diffpro_cli.checkpoint import load_quantized
        from diffpro_cli.models.builtin_text import attach_default

        # builtin:flow-mnist's checkpoints sample on its default prompts, as the float model does
        model = attach_default(load_quantized(Path(spec), trust_code=trust_code, keep_integers=keep_integers or target.type != "cpu"))
        return place(model, target)
    from diffpro_cli.models import load_float_model

    return place(load_float_model(str(spec), trust_code=trust_code, weights=weights, seed=seed), target)
