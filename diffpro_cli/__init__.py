"""diffpro: joint timestep and per-layer precision optimisation for diffusion models."""

__version__ = "0.1.0"

from diffpro_cli.console import quiet_import_noise as _quiet_import_noise

_quiet_import_noise()   # before anything imports diffusers: torchao's import warnings (console.py) are no one's to act on
