"""torch.compile for a run on a GPU (`bench --compile --device cuda`, issue #20 item 4).

On the CPU the compiled path (compiled.py) rewrites integer layers around oneDNN's int8 GEMM, because
the eager CPU kernels are opaque fbgemm/oneDNN calls. The CUDA kernel classes (kernels_cuda.py) are
plain torch ops already (`torch._int_mm`, `_weight_int4pack_mm`, `_scaled_mm`, unfold), so here a
network is compiled as it is: every quant layer's kernel is selected and packed for the device first
(a layer first prepared inside a trace would stay an opaque call), after which
`_QuantBase.forward` traces it into the graph and inductor fuses the activation quantization and the
dequantization around the integer GEMM. Static-activation layers (a per-timestep scale looked up from
Python state) and kernels that are not traceable stay opaque calls. Float rows are compiled the same
way: the baseline is compiled float.

UNVERIFIED on a GPU (none lent to this project yet): the tracing and the numerics are checked on the
CPU with the CUDA kernel classes built for the CPU (tests/test_compiled_cuda.py).
"""

from __future__ import annotations

import functools
import sys

import torch
from torch import nn


def unavailable_reason(device_type: str = "cuda") -> str | None:
    """Why torch.compile cannot run a network on `device_type` here (None: it can); the CPU's answer is
    compiled.unavailable_reason's."""
    if device_type == "cuda":
        return _gpu_unavailable_reason()
    from diffpro_cli.quant import compiled

    return compiled.unavailable_reason()


@functools.cache
def _gpu_unavailable_reason() -> str | None:
    if not hasattr(torch, "compile"):
        return f"torch {torch.__version__} has no torch.compile"
    try:
        from torch.utils._triton import has_triton
    except ImportError:  # pragma: no cover - a torch without the helper
        return "cannot tell whether triton (inductor's GPU code generator) is installed"
    return None if has_triton() else "triton (inductor's GPU code generator) is not installed"


def _notice(reason: str) -> None:
    print(f"notice: {reason}; running eager", file=sys.stderr)


def prepare_kernels(module: nn.Module, device: torch.device | str) -> int:
    """Select and pack every quant layer's kernel for `device` now; returns how many were prepared."""
    from diffpro_cli.quant.layers import _QuantBase

    device = torch.device(device)
    if device.type == "cuda" and device.index is None:   # what x.device will say: "cuda" would repack at the first call
        device = torch.device("cuda", torch.cuda.current_device())
    layers = [m for m in module.modules() if isinstance(m, _QuantBase)]
    for layer in layers:
        layer.prepare(device)
    return len(layers)


def compile_module(module: nn.Module, device: torch.device | str = "cuda", **compile_kwargs):
    """torch.compile(module) for `device` with its quant layers prepared there; the module itself, with a
    one-line notice, where compile is unavailable. The first call with each new input shape compiles."""
    device = torch.device(device)
    reason = unavailable_reason(device.type)
    if reason is not None:
        _notice(reason)
        return module
    prepare_kernels(module, device)
    return torch.compile(module, dynamic=compile_kwargs.pop("dynamic", False), **compile_kwargs)


def compile_model(model, device: torch.device | str = "cuda", **compile_kwargs):
    """A DiffusionModel whose network runs compiled on `device`; `net` stays the eager module (its
    state_dict and checkpoint are unchanged), `forward_fn` calls the compiled one."""
    from diffpro_cli.quant.compiled import with_compiled_net

    return with_compiled_net(model, compile_module(model.net, device, **compile_kwargs))


def compile_regions(modules, device: torch.device | str = "cuda") -> int:
    """compiled.compile_regions for `device`: each module (a cache unit's block) gets its own compiled
    forward as the instance attribute the cache runner calls, with its quant layers prepared there first.
    Returns the number compiled (0, after one notice line, where compile is unavailable)."""
    from diffpro_cli.quant.compiled import REGION_ATTR, _own_forward

    device = torch.device(device)
    reason = unavailable_reason(device.type)
    if reason is not None:
        _notice(reason)
        return 0
    count = 0
    for m in modules:
        if REGION_ATTR not in vars(m):
            prepare_kernels(m, device)
            m.__dict__[REGION_ATTR] = torch.compile(_own_forward(m), dynamic=False)
            count += 1
    return count


# Where the run is: the CPU's compiled path (compiled.py) or this module's. bench --compile and diffpro.compile.

def on_gpu(device) -> bool:
    return torch.device(device).type == "cuda"


def compile_model_on(model, device):
    """compile_model for where `device` is: compiled.compile_model on the CPU, this module's on a GPU."""
    from diffpro_cli.quant import compiled

    return compile_model(model, device) if on_gpu(device) else compiled.compile_model(model)


def compile_in_place_on(module: nn.Module, device) -> bool:
    """compiled.compile_in_place for where `device` is (on a GPU: its kernels prepared there, then
    nn.Module.compile). False, after one notice line, where compile is unavailable."""
    from diffpro_cli.quant import compiled

    if not on_gpu(device):
        return compiled.compile_in_place(module)
    reason = unavailable_reason("cuda")
    if reason is not None:
        _notice(reason)
        return False
    prepare_kernels(module, device)
    module.compile(dynamic=False)
    return True


def compile_regions_on(modules, device) -> int:
    """compile_regions for where `device` is: compiled.compile_regions on the CPU, this module's on a GPU."""
    from diffpro_cli.quant import compiled

    return compile_regions(modules, device) if on_gpu(device) else compiled.compile_regions(modules)
