"""Compiled worlds of the cost table (`allocate --compile`): every path timed as torch.compile runs it.

Compiled, the float baselines change more than the plan does: inductor fuses a float model's norms,
activations and attention glue, and bf16 float compiled can be as fast as an eager plan. A plan meant
to be served compiled (`bench --compile`, `diffpro.compile`) is therefore priced in its own worlds,
"compiled-float32" and (where bf16 is native) "compiled-bfloat16", with the same columns as the eager
table:
  * each layer cell is the module `quantize` emits (or the float layer, followed by its activation),
    compiled on its own the way bench compiles it (quant/compiled.py: the integer layers on oneDNN's
    int8 GEMM in plain torch ops, freezing; weight-only layers as float GEMMs on their dequantized
    weight; on a GPU quant/compiled_cuda.py), each with its own code object so dynamo's recompile
    limit never turns a cell eager;
  * the remainder is the compiled float forward minus the compiled float layers.
A layer compiled alone cannot fuse its activation quantization into the op before it, as it does inside
the whole graph, so integer cells are priced slightly high: the plan errs toward float, never toward
a kernel that loses. Compiling costs a second or two per distinct cell (layers of one shape share one)
plus one whole-model compile per world, which is why these worlds are opt-in.
"""

from __future__ import annotations

import copy

from diffpro_cli.console import UI

PREFIX = "compiled-"


def world_name(dtype) -> str:
    return PREFIX + str(dtype).replace("torch.", "")


def is_compiled(world: str | None) -> bool:
    return bool(world) and world.startswith(PREFIX)


def world_dtype(world: str) -> str:
    """The float math's dtype of a world ("compiled-bfloat16" → "bfloat16")."""
    return world[len(PREFIX):] if is_compiled(world) else world


def unavailable_reason(device: str) -> str | None:
    from diffpro_cli.quant import compiled_cuda

    return compiled_cuda.unavailable_reason("cuda" if compiled_cuda.on_gpu(device) else "cpu")


def _cell(layer, post: str | None):
    """One layer as a compiled graph runs it: the layer, then the activation the deployed model applies
    after it (`post`; a quant layer applies its own, fused into its epilogue). torch is imported here, not
    at module level: allocate imports this module for the world names."""
    from torch import nn

    from diffpro_cli.quant.epilogue import apply_post_op

    class Cell(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = layer

        def forward(self, x):
            return apply_post_op(post, self.layer(x))

    return Cell().eval()


def _compiled_cell(layer, post: str | None, inp, device: str):
    """The compiled forward of one cell, called once here (the compile happens now, not while timing)."""
    from diffpro_cli.quant import compiled, compiled_cuda

    cell = _cell(layer, post)
    if compiled_cuda.compile_regions_on([cell], device) != 1:
        raise RuntimeError("torch.compile is unavailable here")
    fn = vars(cell)[compiled.REGION_ATTR]
    fn(inp)
    # timed without compiled._Frozen's config patch (needed only while compiling): a whole model pays it
    # once per forward, a cell alone would pay it per layer (~20 µs a call here, more than a small GEMM)
    raw = getattr(fn, "_compiled", fn)
    return lambda: raw(inp)


def measure_compiled_world(model, modules: dict, captured: dict, columns: dict, xty: tuple, batch: int, repeats: int,
                           ui: UI, quantize_module, dtype, posts: dict, same: dict[str, str]) -> dict:
    """One compiled world (module docstring): same shape, units and reduction as costs.measure_world."""
    import torch

    from diffpro_cli.planning.costs import _path_module, fold_timings, interleaved_min_ms, world_rows
    from diffpro_cli.quant import compiled_cuda

    x, t, y = xty
    device = str(x.device)
    world = world_name(dtype)
    fns, table = {}, {}
    timed_here = sum(1 for n in modules if n in captured and n not in same)
    with torch.no_grad(), ui.progress(f"allocate: compiling layer cells in {world} (cost table)",
                                      total=timed_here * len(columns)) as compiled_one:
        for name, mod, inp in world_rows(modules, captured, same, table, dtype):
            post = posts.get(name)
            for label, opt in columns.items():
                compiled_one(1)
                try:
                    if opt.full_precision:
                        fn = _compiled_cell(copy.deepcopy(mod).to(dtype), post, inp, device)
                    else:
                        fn = _compiled_cell(_path_module(quantize_module, mod, opt, inp, post), None, inp, device)
                except Exception as exc:   # not runnable compiled here: never chosen in this world
                    if opt.full_precision:
                        raise
                    table[name]["ms"][label] = None
                    table[name].setdefault("unsupported", {})[label] = str(exc).splitlines()[0][:120]
                    continue
                fns[(name, label, None)] = fn
    with torch.no_grad():
        with ui.heartbeat(f"allocate: compiling the float forward in {world} (cost table remainder)"):
            whole = compiled_cuda.compile_model_on(copy.deepcopy(model).set_compute_dtype(dtype), device)
            whole.eps(x, t, y)
        fns[("__forward__", "fp32", None)] = lambda: whole.eps(x, t, y)
        with ui.progress(f"allocate: timing layers in {world} (cost table)", total=max(1, repeats)) as advance:
            timed = interleaved_min_ms(fns, max(1, repeats), advance=advance, device=device)
    forward, remainder = fold_timings(timed, table, same, batch)
    return {"layers": table, "forward_ms": forward, "remainder_ms": remainder,
            "note": ("every cell torch.compile'd on its own, the forward compiled whole; fp32 column = the float layer "
                     "computing in this dtype; integer cells cannot fuse their activation quantization into the op "
                     "before them as they do in the whole graph (priced slightly high)")}


def add_compiled_worlds(worlds: dict, model, modules: dict, captured: dict, columns: dict, xty: tuple,
                        batch: int, repeats: int, ui: UI, quantize_module, posts: dict, same: dict[str, str],
                        bf16: bool) -> str | None:
    """Measure the compiled worlds `worlds` lacks into it (the caller drops stale ones first). Returns why
    none could be measured (compile unavailable here, or it failed on a float layer), else None."""
    import torch

    from diffpro_cli.quant import compiled

    device = str(xty[0].device)
    reason = unavailable_reason(device)
    if reason is not None:
        return reason
    for dtype in [torch.float32] + ([torch.bfloat16] if bf16 else []):
        name = world_name(dtype)
        if name not in worlds:
            try:
                with compiled.released():   # the cells' and the forward's frozen weight copies: not kept after timing
                    worlds[name] = measure_compiled_world(model, modules, captured, columns, xty, batch, repeats, ui,
                                                          quantize_module, dtype, posts, same)
            except Exception as exc:   # inductor failing on plain float code: this machine cannot compile the model
                for stale in [w for w in worlds if is_compiled(w)]:
                    worlds.pop(stale)
                return f"torch.compile failed on the float model in {name} ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})"
    return None
