"""diffpro as a library (`import diffpro`): the functions the `diffpro` CLI wraps. See docs/api.md."""

from diffpro_cli import __version__
from diffpro_cli.api import (DiffusionModel, allocate, bench, compile, install_timestep_hook, load, set_compute_dtype, load_lora, profile, prune,
                             quantize, quantize_, register_diffusers_quantizer, score, unload_lora)

__all__ = ["__version__", "DiffusionModel", "load", "compile", "set_compute_dtype", "quantize_", "profile", "score", "prune", "allocate", "quantize",
           "bench", "install_timestep_hook", "load_lora", "unload_lora", "register_diffusers_quantizer"]
