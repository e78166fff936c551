"""`pkg.module:factory` models: user code, imported only with --trust-code.

The factory contract: `factory()` is called with no arguments and returns one of
  - a `DiffusionModel` (used as is; its spec is set to the spec given on the command line), or
  - an `nn.Module`, or a tuple `(module, sample_shape)`; it is wrapped as kind "custom":
      * `module(x_t, t, y)` returns the predicted noise eps with x_t's shape (a 2C-channel output is
        read as eps + learned variance and cut to the first C channels), for x_t [B, C, H, W] float,
        t [B] long timesteps, y [B] long labels or None;
      * sample_shape (C, H, W) comes from the tuple, else from a `module.sample_shape` attribute;
      * optional attributes: `num_classes` (int; the null/CFG label is index num_classes; default
        None = unconditional) and `alphas_cumprod` (1-D tensor; default the linear 1000-step schedule).
With `weights`, a state dict (.safetensors, or .pt/.pth/.bin/.ckpt read with weights_only=True,
optionally wrapped in {"ema"/"state_dict"/"model": ...}) is loaded strictly into the network.
"""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path

import torch
from torch import nn

from diffpro_cli.errors import DiffproError, InputError, TrustError
from diffpro_cli.models.base import DiffusionModel, linear_alphas_cumprod


def custom_forward(net, x, t, y):
    return net(x, t, y)


def _wrap_module(spec: str, module: nn.Module, sample_shape) -> DiffusionModel:
    shape = sample_shape if sample_shape is not None else getattr(module, "sample_shape", None)
    if shape is None or len(tuple(shape)) != 3:
        raise InputError(f"{spec}: cannot tell the sample shape; give the module a sample_shape = (C, H, W) attribute or return (module, (C, H, W))")
    alphas = getattr(module, "alphas_cumprod", None)
    alphas = linear_alphas_cumprod() if alphas is None else torch.as_tensor(alphas, dtype=torch.float64)
    num_classes = getattr(module, "num_classes", None)
    return DiffusionModel(
        spec=spec, net=module, kind="custom", sample_shape=tuple(int(s) for s in shape),
        alphas_cumprod=alphas, forward_fn=custom_forward,
        num_classes=None if num_classes is None else int(num_classes),
    )


def _search_current_directory() -> None:
    """`diffpro ... mymod:make` run beside mymod.py: the `diffpro` console script, unlike `python -m`, does
    not put the current directory on sys.path, so the module was "not found". It is searched last, so a
    local file cannot shadow an installed package."""
    import os
    import sys

    here = os.getcwd()
    if "" not in sys.path and here not in sys.path:
        sys.path.append(here)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:160]}" if text else type(exc).__name__


def load_custom(spec: str, weights: str | Path | None = None, trust_code: bool = False) -> DiffusionModel:
    """Import `pkg.module`, call `factory()` and wrap the result (contract in the module docstring)."""
    from diffpro_cli.artifacts import sha256_file
    from diffpro_cli.models.diffusers_dir import extract_state_dict, load_into, read_weights

    module_name, _, factory_name = spec.partition(":")
    if not trust_code:
        raise TrustError(f"refusing to import {module_name}: pass --trust-code to run its code")
    _search_current_directory()
    try:
        mod = importlib.import_module(module_name)
    except ImportError as exc:
        missing = getattr(exc, "name", None)
        if missing and module_name != missing and not module_name.startswith(missing + "."):   # the module's own import
            raise InputError(f"{spec}: {module_name} imports {missing}, which is not installed ({exc}); install it") from None
        raise InputError(f"{spec}: cannot import {module_name} ({exc}); check the module name, and run from its folder "
                         f"or put that folder on PYTHONPATH") from None
    except (Exception, SystemExit) as exc:   # the user's module failed while importing: their bug, one line, not ours
        raise InputError(f"{spec}: importing {module_name} raised {_first_line(exc)}; fix the module "
                         f"(`python -c 'import {module_name}'` shows the traceback)") from None
    factory = getattr(mod, factory_name, None)
    if not callable(factory):
        raise InputError(f"{spec}: {module_name} has no callable {factory_name}; name the factory function after the colon")
    try:
        result = factory()
    except DiffproError:   # diffpro's own one-line errors (a factory that calls diffpro.load) keep their code
        raise
    except (Exception, SystemExit) as exc:
        raise InputError(f"{spec}: {factory_name}() raised {_first_line(exc)}; fix the factory "
                         f"(`python -c 'import {module_name}; {module_name}.{factory_name}()'` shows the traceback)") from None
    if isinstance(result, DiffusionModel):
        model = dataclasses.replace(result, spec=spec)
    elif isinstance(result, nn.Module):
        model = _wrap_module(spec, result, None)
    elif isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], nn.Module):
        model = _wrap_module(spec, result[0], result[1])
    else:
        raise InputError(f"{spec}: factory returned {type(result).__name__}; it must return a DiffusionModel, an nn.Module or (module, sample_shape)")
    source = {"module": module_name, "factory": factory_name, "module_file": getattr(mod, "__file__", None)}
    if weights is not None:
        weights = Path(weights)
        state, wrapper = extract_state_dict(read_weights(weights), weights)
        load_into(model.net, state, weights)
        model.sha256 = sha256_file(weights)
        model.untrained = False
        source |= {"weights": str(weights), "wrapper": wrapper}
    model.net.eval()
    model.config = dict(model.config) | {"custom": source}
    return model
