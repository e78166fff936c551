"""diffpro: joint timestep and per-layer precision optimisation for diffusion models."""

__version__ = "0.1.0"
