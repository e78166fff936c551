"""Compiled execution path for quantized models on x86 CPUs (torch.compile / inductor with freezing).

The eager CPU kernels (kernels.py) run each layer as its own op: the activation's range search and
quantization, the int8 GEMM and the dequantization are separate passes over memory, or one opaque
fbgemm call that nothing around it can join. Here every integer layer is written in plain torch ops
around oneDNN's int8 GEMM (`onednn.qlinear_pointwise.tensor`, `onednn.qconv2d_pointwise.tensor`), so
inductor can
  * fuse the activation's range search and u8 quantization into the loops that produce the activation
    (LayerNorm + adaLN modulation, GELU, ...), one pass instead of three;
  * hand the dequantization (output scale, bias), an MLP's GELU and a bf16 model's output cast to
    oneDNN's epilogue (per-tensor layers), and fuse the per-token output scaling into the next
    elementwise op;
  * constant-fold the packed weights (`freezing`), so the graph calls the GEMMs with no Python between.

Still integer: the same stored weights (folded onto the per-channel int8 grid) run on oneDNN's
u8 × s8 → s32 GEMM and convolution. Activation schemes (reference.py names): "dynamic" = one symmetric
scale per tensor on the u8 grid with zero point 128 (scheme "tensor", the eager oneDNN kernel's), and
"dynamic-token" = one per row ("token"); convolutions one per sample ("sample"). "static" layers keep
their eager kernel inside the compiled graph (an opaque call: a graph break).

Weight-only layers (act_mode "none": w4a16, w8a16, the float-activation patch embedding and final
layer) compute in float on the CPU (kernels.DequantFloat). Here they are the same F.linear / conv2d on
the eager kernel's own dequantized weight tensor (shared, not copied), so a mixed plan traces with no
graph break and the eager numbers are unchanged.

    from diffpro_cli.quant import compiled
    if compiled.compiled_available():
        fast = compiled.compile_model(quantized_model)       # a DiffusionModel; first call compiles
    fn = compiled.compile_module(layer_or_net)             # any module (quantized or float), same options

Compiling costs time on the first call of every new input shape (about 20–60 s for the built-in DiT on
2 cores; reported by benchmarks/kernels.py). Where compile is not available (no C++ compiler, no
oneDNN, another CPU architecture), `compile_model`/`compile_module` print one notice line and return
the eager path.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import platform
import shutil
import sys
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from diffpro_cli.quant import kernels
from diffpro_cli.quant.epilogue import apply_post_op

COMPILE_OPTIONS = {"freezing": True}    # packed int8 weights must be graph constants for the oneDNN lowerings


@functools.cache
def unavailable_reason() -> str | None:
    """Why the compiled path cannot run here (None: it can)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"the compiled integer path targets x86 CPUs (this is {platform.machine()})"
    if not hasattr(torch, "compile"):
        return f"torch {torch.__version__} has no torch.compile"
    if not torch.backends.mkldnn.is_available():
        return "torch was built without oneDNN"
    for op in ("qlinear_pointwise", "qconv2d_pointwise", "qlinear_prepack", "qconv_prepack"):
        if not hasattr(torch.ops.onednn, op):
            return f"torch.ops.onednn.{op} is missing in torch {torch.__version__}"
    try:
        from torch._inductor import config as inductor_config
        cxx = inductor_config.cpp.cxx[0] if isinstance(inductor_config.cpp.cxx, tuple) else inductor_config.cpp.cxx
    except (ImportError, AttributeError, IndexError, TypeError) as exc:  # pragma: no cover - a broken inductor install
        return f"torch inductor is unusable ({str(exc).splitlines()[0][:80]})"
    if not any(shutil.which(c) for c in ([cxx] if cxx else []) + ["g++", "c++", "clang++"]):
        return "inductor needs a C++ compiler (g++ or clang++) on PATH"
    return None


def compiled_available() -> bool:
    """True where `compile_model` / `compile_module` compile (else they return the eager path)."""
    return unavailable_reason() is None


@contextlib.contextmanager
def released():
    """Compile inside the block; after it, let go of what was compiled there. With freezing, inductor
    bakes each graph's weights into the module it generates as constants (a second copy of the model's
    weights), and both its module cache and dynamo's code caches keep those modules for the life of the
    process: measuring DiT-XL/2's compiled cost table left ~9 GB behind, and the bench after it in one
    `diffpro run` was killed for memory. Leaving the block drops the generated modules loaded inside it
    and resets dynamo, so every torch.compile'd function in the process (not only these) compiles again
    on its next call. For work whose compiled graphs are not used afterwards (allocate's cost table)."""
    try:
        from torch._inductor.codecache import PyCodeCache
        mark = len(PyCodeCache.modules)
    except (ImportError, AttributeError):   # pragma: no cover - another torch layout: nothing to release
        PyCodeCache = None
    try:
        yield
    finally:
        if PyCodeCache is not None:
            new = PyCodeCache.modules[mark:]
            gone = {id(m) for m in new}
            for mod in new:
                sys.modules.pop(getattr(mod, "__name__", ""), None)
            del PyCodeCache.modules[mark:]
            for key in [k for k, m in PyCodeCache.modules_no_attr.items() if id(m) in gone]:
                del PyCodeCache.modules_no_attr[key]
        torch._dynamo.reset()
        gc.collect()


def _quiet_lowering_warning() -> None:
    """torch 2.14's oneDNN int8 lowering copy-constructs the weight zero point with torch.tensor(tensor), and
    torch warns about that while compiling each integer layer: a line per layer in a user's log, about
    torch's own code."""
    warnings.filterwarnings("ignore", message="To copy construct from a tensor", category=UserWarning,
                            module=r"torch\._inductor\.mkldnn_lowerings")


def _notice(msg: str) -> None:
    print(f"notice: {msg}; running the eager integer kernels", file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# Traceable integer layers
# ---------------------------------------------------------------------------------------------

NAME = "cpu-compiled-onednn-int8"
FLOAT_NAME = "cpu-compiled-dequant-float"
BUFFERS = ("_c_w", "_c_ws", "_c_wzp", "_c_b", "_c_zp", "_c_one")
ZP = 128   # u8 zero point of the ±127 activation grid; a layer's own is kernels.ACT_ZERO_POINT[qmax] (state "zp")


def _quantize_u8(x: torch.Tensor, scale: torch.Tensor, zp: int = ZP) -> torch.Tensor:
    # floor(x/s + zp + 1/2), as the eager kernels and reference.py round; |x/s| ≤ qmax by construction
    return torch.floor(x / scale + (zp + 0.5)).to(torch.uint8)


def _state(layer) -> dict:
    return layer.__dict__.setdefault("_compiled_state", {})


def attach(layer, members=None) -> bool:
    """Give one quant layer (or the lead of a fused q/k/v group, with all `members`) the compiled
    path's state: packed int8 weights as non-persistent buffers (graph constants under freezing; not
    in state_dict, so checkpoints are unchanged). Returns False for layers that keep their eager kernel."""
    members = members or [layer]
    if layer.act_mode == "none":
        return _attach_float(layer, members)
    # Convolutions keep their eager kernel (called opaquely from the graph): inductor's qconv lowering
    # in torch 2.14 rejects the activation zero point of the non-fused overload.
    if layer.kind != "linear" or layer.act_mode not in ("dynamic", "dynamic-token"):
        return False
    qmax = min(kernels.cpu_act_qmax(m.weight_bits, m.group_size, m.pair_bounded) for m in members)
    if layer.integers_released:   # an inference-only load: the eager kernel's packed copy is all there is
        recovered = _from_eager_kernel(layer)
        if recovered is None:
            return False
        packed, s8, bias = recovered
    else:
        q8, s8, bias = kernels._stacked_weights(members)   # the eager kernels' folding and stacking
        packed = torch.ops.onednn.qlinear_prepack(q8, None)
    layer.register_buffer("_c_w", packed, persistent=False)
    layer.register_buffer("_c_ws", s8, persistent=False)
    layer.register_buffer("_c_wzp", torch.zeros(s8.numel(), dtype=torch.long), persistent=False)
    layer.register_buffer("_c_b", bias, persistent=False)
    # the eager kernels' zero point for this grid: 64 on AVX2's ±63 grid keeps every u8 ≤ 127, so the u8·s8
    # pairs vpmaddubsw sums in int16 cannot saturate (128 gave values up to 191: errors of ~0.9 on AVX2)
    zp = kernels.ACT_ZERO_POINT[qmax]
    layer.register_buffer("_c_zp", torch.tensor(zp, dtype=torch.long), persistent=False)
    layer.register_buffer("_c_one", torch.ones((), dtype=torch.float32), persistent=False)
    _state(layer).update(qmax=qmax, zp=zp, sizes=[m.out_features for m in members],
                         label=f"{NAME}:w{layer.weight_bits}a{kernels.act_bits_of(qmax)}-{layer.act_mode}")
    return True


def _from_eager_kernel(layer):
    """(oneDNN-packed weight, per-channel scales, bias) of a Linear (or fused group) whose stored integers
    were released at load, taken from its CPU eager kernel: oneDNN's packed weight as it is, fbgemm's
    unpacked to the same folded int8 grid and packed for oneDNN. None for any other kernel."""
    kernel = layer._group.kernel if layer._group is not None else layer._kernel
    if isinstance(kernel, kernels.CpuOnednnLinear):
        return kernel.w, kernel.w_scale, kernel.bias
    if isinstance(kernel, kernels.CpuFbgemmLinear):
        qw, bias = torch.ops.quantized.linear_unpack(kernel.packed)
        return torch.ops.onednn.qlinear_prepack(qw.int_repr(), None), qw.q_per_channel_scales().float(), bias
    return None


def _attach_float(layer, members) -> bool:
    """A weight-only layer (or fused group) on the CPU: its prepared DequantFloat kernel's float weight
    and bias become the non-persistent buffers `_c_w` / `_c_b` (the same tensors: no second copy, and
    the traced F.linear multiplies exactly what the eager kernel multiplies)."""
    if layer.weight_scale.device.type != "cpu":   # CUDA weight-only kernels (tinygemm) stay as they are
        return False
    kernel = layer._group.kernel if layer._group is not None else layer._kernel
    prepared_for = layer._group.device if layer._group is not None else layer._kernel_device
    if kernel is None or prepared_for != torch.device("cpu"):
        if layer.integers_released:   # nothing left to dequantize: keep the eager kernel
            return False
        layer.prepare("cpu")
        kernel = layer._group.kernel if layer._group is not None else layer._kernel
    if not isinstance(kernel, kernels.DequantFloat):
        return False
    layer.register_buffer("_c_w", kernel.w, persistent=False)
    layer.register_buffer("_c_b", kernel.bias, persistent=False)
    _state(layer).update(float=True, sizes=[m.out_features for m in members] if layer.kind == "linear" else None,
                         label=f"{FLOAT_NAME}:w{layer.weight_bits}a16-none")
    return True


def float_forward(layer, x: torch.Tensor) -> torch.Tensor:
    """kernels.DequantFloat.__call__ in traceable form (the full output of a fused group's GEMM)."""
    w = layer._c_w.to(x.dtype)
    b = None if layer._c_b is None else layer._c_b.to(x.dtype)
    return layer.float_conv(x, w, b) if layer.kind == "conv2d" else F.linear(x, w, b)


def detach(layer) -> None:
    for name in BUFFERS:
        layer._buffers.pop(name, None)
    layer.__dict__.pop("_compiled_state", None)


def is_attached(layer) -> bool:
    return "_c_w" in layer._buffers


def act_scheme(layer) -> str:
    if layer._compiled_state.get("float"):
        return "float"
    return "sample" if layer.kind == "conv2d" else {"dynamic": "tensor", "dynamic-token": "token"}[layer.act_mode]


# activations oneDNN's int8 GEMM applies in its epilogue (post-op name, algorithm): the tanh-GELU of a DiT's
# MLP computed by inductor after the GEMM cost more than the GEMM itself (512×768, bf16 world: 368 µs a call
# with it separate, 189 µs fused with a bf16 output, against 238 µs for the bf16 float layer)
ONEDNN_POST_OPS = {"gelu": ("gelu", "none"), "gelu-tanh": ("gelu", "tanh")}


def linear_forward(layer, x: torch.Tensor, post_op: str | None = None) -> torch.Tensor:
    """Full output of the layer's (possibly fused) GEMM for input x [..., in], in x's dtype (bf16 written by
    oneDNN directly); `post_op` (a key of ONEDNN_POST_OPS) applied in the GEMM's epilogue, which only the
    per-tensor scheme allows (per-token outputs are scaled after the GEMM)."""
    st = layer._compiled_state
    qmax, zp = st["qmax"], st.get("zp", ZP)
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).float()
    if layer.act_mode == "dynamic-token":
        if post_op is not None:
            raise ValueError("a per-token layer's activation cannot run in the GEMM's epilogue")
        scale = x2.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / qmax
        acc = torch.ops.onednn.qlinear_pointwise.tensor(_quantize_u8(x2, scale, zp), torch.tensor(1.0), torch.tensor(zp),
                                                        layer._c_w, layer._c_ws, layer._c_wzp, None, 1.0, 0, torch.float32,
                                                        "none", [None], "")
        y = acc * scale if layer._c_b is None else torch.addcmul(layer._c_b, acc, scale)
    else:
        attr, algorithm = ONEDNN_POST_OPS[post_op] if post_op is not None else ("none", "")
        out_dtype = torch.bfloat16 if x.dtype == torch.bfloat16 else torch.float32
        scale = x2.abs().amax().clamp_min(1e-12) / qmax
        y = torch.ops.onednn.qlinear_pointwise.tensor(_quantize_u8(x2, scale, zp), scale, torch.tensor(zp), layer._c_w, layer._c_ws,
                                                      layer._c_wzp, layer._c_b, 1.0, 0, out_dtype, attr, [None], algorithm)
    return y.reshape(*shape[:-1], y.shape[-1]).to(x.dtype)


def forward(layer, x: torch.Tensor, post_op: str | None = None) -> torch.Tensor:
    """The compiled path's forward of one attached layer, with its activation `post_op` (epilogue.py)
    applied: inside the int8 GEMM where oneDNN can (a per-tensor Linear of its own), else after it, where
    inductor fuses it into the next loop. Members of a fused q/k/v group hold the same packed weight
    tensors as buffers and each take their slice of the fused GEMM; inductor's common-subexpression pass
    leaves one GEMM per group in the graph."""
    sizes = layer._compiled_state["sizes"]
    if layer._compiled_state.get("float"):
        y = float_forward(layer, x)
        if layer.kind == "conv2d":
            return apply_post_op(post_op, y)
    elif post_op in ONEDNN_POST_OPS and layer.act_mode == "dynamic" and len(sizes) == 1:
        return linear_forward(layer, x, post_op)
    else:   # integer convolutions stay eager (attach), so this is a Linear
        y = linear_forward(layer, x)
    if len(sizes) > 1:
        start = sum(sizes[:layer._compiled_index])
        y = y[..., start:start + sizes[layer._compiled_index]]
    return apply_post_op(post_op, y)


def enable(net: nn.Module) -> dict[str, int]:
    """Switch every eligible quant layer of `net` to the compiled path's forward (in place; `disable`
    undoes it). Fused q/k/v groups (groups.fuse_shared_inputs) keep one fused weight. Returns counts."""
    from diffpro_cli.quant.layers import _QuantBase

    counts = {"compiled": 0, "eager": 0}
    seen = set()   # fused groups left eager: counted once, not once per member
    for mod in net.modules():
        if not isinstance(mod, _QuantBase) or is_attached(mod) or getattr(mod, "_compiled_lead", None) is not None:
            continue
        group = mod._group.members if mod._group is not None else [mod]
        if id(group[0]) in seen:
            continue
        seen.add(id(group[0]))
        if attach(group[0], group):
            lead = group[0]
            for i, m in enumerate(group):   # plain attributes, not submodules (no cycle in modules())
                if m is not lead:
                    for name in BUFFERS:
                        if name in lead._buffers:   # weight-only layers have only _c_w and _c_b
                            m.register_buffer(name, lead._buffers[name], persistent=False)
                    m.__dict__["_compiled_state"] = lead._compiled_state
                m.__dict__["_compiled_lead"], m.__dict__["_compiled_index"] = lead, i
            counts["compiled"] += len(group)
        else:
            counts["eager"] += len(group)
    return counts


def disable(net: nn.Module) -> None:
    from diffpro_cli.quant.layers import _QuantBase

    for mod in net.modules():
        if isinstance(mod, _QuantBase):
            detach(mod)
            mod.__dict__["_compiled_lead"] = None


class _Frozen:
    """Calls a torch.compile'd module with inductor's freezing on (what the oneDNN int8 lowerings need:
    packed weights as graph constants); the option has to be set while a call compiles."""

    def __init__(self, compiled, module):
        self._compiled, self.module = compiled, module

    def __call__(self, *args, **kwargs):
        from torch._inductor import config as inductor_config

        with inductor_config.patch(COMPILE_OPTIONS):
            return self._compiled(*args, **kwargs)

    def __getattr__(self, name):   # net.config etc. (diffusers forward helpers read them)
        return getattr(self.module, name)


def compile_module(module: nn.Module, **compile_kwargs):
    """torch.compile(module) with freezing, after switching its quant layers to the compiled path
    (a float module is compiled as it is: the honest baseline). Call it under torch.no_grad() or
    inference_mode (freezing is inference-only); the first call with each new input shape compiles.
    Returns the module itself, with a one-line notice, where compile is unavailable."""
    if not _ready(module):
        return module
    return _Frozen(torch.compile(module, dynamic=compile_kwargs.pop("dynamic", False), **compile_kwargs), module)


def _ready(module: nn.Module) -> bool:
    """Switch `module`'s quant layers to the compiled path; False (after one notice line) where compile
    is unavailable here."""
    reason = unavailable_reason()
    if reason is not None:
        _notice(reason)
        return False
    enable(module)
    _quiet_lowering_warning()
    return True


def compile_in_place(module: nn.Module) -> bool:
    """compile_module, but the module itself runs compiled at every call (nn.Module.compile's mechanism:
    its `_compiled_call_impl`), so a diffusers pipeline holding it runs the compiled graph. Its type,
    attributes and state_dict stay; `module._compiled_call_impl = None` goes back to eager. False, after
    one notice line, where compile is unavailable."""
    if not _ready(module):
        return False
    module._compiled_call_impl = _Frozen(torch.compile(module._call_impl, dynamic=False), module)
    return True


def compile_model(model, **compile_kwargs):
    """A DiffusionModel whose network runs compiled (see compile_module); the model's `net` stays the
    eager module (its state_dict and checkpoint are unchanged), `forward_fn` calls the compiled one."""
    return with_compiled_net(model, compile_module(model.net, **compile_kwargs))


def with_compiled_net(model, compiled_net):
    """`model` with `forward_fn` calling `compiled_net` (the model itself where nothing was compiled)."""
    import dataclasses

    if compiled_net is model.net:
        return model
    base = model.forward_fn
    return dataclasses.replace(model, forward_fn=lambda net, x, t, y: base(compiled_net, x, t, y))


# ---------------------------------------------------------------------------------------------
# Regional compilation (cached rows: the cache runner's skip/compute decisions stay in Python)
# ---------------------------------------------------------------------------------------------

REGION_ATTR = "_diffpro_compiled_forward"   # instance attribute the cache runner calls (block_forward)


def _own_forward(module: nn.Module):
    """`type(module).forward` as a new function with its own code object, bound to `module`. Dynamo
    keeps compiled graphs per code object, and under freezing each graph is specialised to one module's
    weights (an id guard per parameter): N blocks of one class would be N recompiles of one code object,
    and past dynamo's recompile limit (8) the rest would silently run eager."""
    import types

    fn = type(module).forward
    if not isinstance(fn, types.FunctionType):
        return fn.__get__(module)
    own = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    own.__kwdefaults__, own.__qualname__ = fn.__kwdefaults__, fn.__qualname__
    return own.__get__(module)


def compile_regions(modules) -> int:
    """Regional compilation: each module of `modules` (a DiT's transformer blocks, a U-Net's deep blocks)
    gets its own compiled forward (inductor, freezing, its quant layers on the compiled path: the
    options of compile_module) stored as the instance attribute REGION_ATTR. The module's `forward` is
    left as it is: the cache runner calls the compiled one where it would call the block (its wrappers,
    which decide per step what runs, stay Python, and look the compiled forward up at every call, so a
    runner installed before, as loading a checkpoint with a cache schedule does, uses it too), and the
    rest of the network runs eager. Returns the number of modules compiled (0, after one notice line,
    where compile is unavailable)."""
    reason = unavailable_reason()
    if reason is not None:
        _notice(reason)
        return 0
    _quiet_lowering_warning()
    count = 0
    for m in modules:
        enable(m)   # the quant layers inside the region only: the eager rest keeps its eager kernels
        if REGION_ATTR not in vars(m):
            m.__dict__[REGION_ATTR] = _Frozen(torch.compile(_own_forward(m), dynamic=False), m)
            count += 1
    return count


def block_forward(module: nn.Module):
    """A unit module's compute, as a cache runner's wrapper calls it: the regionally compiled forward where
    compile_regions gave it one (bench --compile; it outlives the runner), else the class's. Looked up at
    every call, so a region compiled after the runner wrapped the block is used too."""
    def forward(*args, **kwargs):
        own = vars(module).get(REGION_ATTR)
        return (own if own is not None else type(module).forward.__get__(module))(*args, **kwargs)
    return forward


def remove_regions(modules) -> None:
    """Drop the compiled forwards; the quant layers stay on the compiled path's ops (`disable` undoes that)."""
    for m in modules:
        m.__dict__.pop(REGION_ATTR, None)
