"""Activations fused into the integer GEMM that feeds them (the kernel's epilogue).

A transformer MLP runs Linear → GELU. On the CPU the GELU is its own pass over the MLP's widest
tensor, and a slow one: torch's tanh-GELU took 227 µs for a 512×768 float32 tensor on the session 10
machine (2-vCPU AMD EPYC), more than the int8 GEMM in front of it (~100 µs). oneDNN's int8 matmul can
apply GELU (erf or tanh form) in its epilogue, while the result is still in registers.

`fuse_activations(net)` finds every diffusers `GELU` module (`proj` Linear, then `gelu`) whose proj is
a diffpro quant layer, marks the layer (`post_op`) and makes the module's forward just call its proj.
The layer then applies the activation itself: fused where its kernel can (kernels.CpuOnednnLinear),
as a separate pass after any other kernel. State dicts and checkpoints do not change; loading a
checkpoint runs the same pass. `activation_after(net, name)` tells the cost table which layers carry
their activation, so it times Linear + GELU together on every path.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

POST_OPS = {"gelu": lambda y: F.gelu(y), "gelu-tanh": lambda y: F.gelu(y, approximate="tanh")}


def apply_post_op(name: str | None, y: torch.Tensor) -> torch.Tensor:
    return y if name is None else POST_OPS[name](y)


def _gelu_of(module: nn.Module) -> str | None:
    """The post-op a diffusers GELU module applies after its proj, or None (not such a module)."""
    if type(module).__name__ != "GELU" or not isinstance(getattr(module, "proj", None), nn.Module):
        return None
    return {"none": "gelu", "tanh": "gelu-tanh"}.get(getattr(module, "approximate", None))


def activation_after(net: nn.Module, layer_name: str) -> str | None:
    """The activation that always follows layer `layer_name` in `net` and can be fused into it."""
    parent_name, _, leaf = layer_name.rpartition(".")
    if leaf != "proj":
        return None
    try:
        parent = net.get_submodule(parent_name) if parent_name else net
    except AttributeError:
        return None
    return _gelu_of(parent)


def _through_proj(self, hidden_states, *args, **kwargs):
    return self.proj(hidden_states)


def fuse_activations(net: nn.Module) -> int:
    """Mark every quantized proj of a GELU module with its activation and route the module through the
    proj alone (module docstring). Returns the number fused; running it twice changes nothing."""
    made = 0
    for module in net.modules():
        post = _gelu_of(module)
        proj = getattr(module, "proj", None)
        if post is None or not getattr(proj, "is_diffpro_quant", False) or getattr(proj, "kind", "") != "linear":
            continue
        if getattr(proj, "post_op", None) == post and "forward" in module.__dict__:
            continue
        proj.post_op = post
        proj._forget_kernel()   # the kernel choice depends on the post-op
        module.forward = types.MethodType(_through_proj, module)
        made += 1
    return made


def unfuse_activations(net: nn.Module) -> None:
    """Undo fuse_activations: GELU modules apply their activation again, proj layers do not."""
    for module in net.modules():
        if _gelu_of(module) is not None and "forward" in module.__dict__:
            del module.__dict__["forward"]
            if getattr(module.proj, "is_diffpro_quant", False):
                module.proj.post_op = None
                module.proj._forget_kernel()
