"""The latency cost table: every candidate execution path of every layer, timed on THIS machine.

`measure_cost_table` runs the real model once at the bench's batch size with hooks that capture each
quantizable layer's real input (so token counts, image sizes and conv geometry are the model's own),
then times every layer under every option with the module `quantize` will emit: the float module
itself (fp32), the integer kernel with dynamic int8 activations (`quantize_module(..., act_bits=8)`),
and float compute from stored low-bit weights (`act_bits=16`). A Conv2d is timed as a Conv2d. The
remainder (attention, norms, embeddings: everything that is not a quantizable layer) is the whole fp32
forward minus the sum of the fp32 layer times. Every figure is milliseconds per image per denoising
step at `batch` images per call.

The table is an artifact (WORKDIR/cost_table.json) stamped with the machine's fingerprint (CPU model
and ISA flags as the kernels see them, torch version, threads). A table whose fingerprint differs is
refused unless the user passes it explicitly (`allocate --cost-table`), which plans for that machine.
"""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path
from typing import Callable

from diffpro_cli.console import QUIET_UI, UI
from diffpro_cli.errors import InputError, UsageError
from diffpro_cli.planning.fingerprint import machine_fingerprint, native_bf16
from diffpro_cli.planning.options import Layer, Option

COST_SCHEMA = "diffpro.cost_table/2"


def _inner_calls(fn, sync=lambda: None) -> int:
    """Calls per timed sample so that one sample lasts ≥ 2 ms (after a warm-up call)."""
    fn()
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    once = max(time.perf_counter() - t0, 1e-6)
    return max(1, min(1000, int(0.002 / once)))


def interleaved_min_ms(fns: dict, repeats: int, advance=lambda n=1: None, device: str = "cpu") -> dict:
    """ms per call of every fn, timed round-robin (each round one sample of every fn, so the samples of
    one cell are spread over the whole measurement) and reduced by the minimum over rounds: on a shared
    CPU the least-disturbed sample estimates the kernel's own cost (a median keeps the ~1 ms stalls a
    busy second core causes, which swamp sub-0.1 ms layers). On a CUDA `device` each sample is
    synchronised on both ends, so it covers the queued kernels, not just their launches."""
    from diffpro_cli.devices import synchronize

    sync = (lambda: synchronize(device)) if str(device).startswith("cuda") else (lambda: None)
    inner = {k: _inner_calls(f, sync) for k, f in fns.items()}
    best = {k: float("inf") for k in fns}
    for _ in range(max(1, repeats)):
        for k, f in fns.items():
            n = inner[k]
            sync()
            t0 = time.perf_counter()
            for _ in range(n):
                f()
            sync()
            best[k] = min(best[k], (time.perf_counter() - t0) / n * 1000.0)
        advance(1)
    return best


def _kernels():
    try:
        from diffpro_cli.quant.layers import quantize_module
    except ImportError:
        return None
    return quantize_module


def path_label(opt: Option) -> str:
    """Cost-table column: what RUNS. Float compute from stored low-bit weights costs the same whatever
    the stored width, so every a16 option shares one column per group size."""
    if opt.full_precision:
        return "fp32"
    if opt.act_bits >= 16:
        return f"float-from-int{'' if not opt.group_size else f'-g{opt.group_size}'}"
    return opt.label()


def capture_inputs(model, modules: dict, batch: int, seed: int = 0) -> tuple[dict, tuple]:
    """One fp32 forward at `batch` images (seeded noise, mid timestep, the model's own default labels or
    conditioning) with pre-hooks on `modules`: ({name: (args, kwargs) of its first call, tensors
    cloned}, the forward's (x, t, y)). The cost table times layers and the cache planner blocks on these."""
    import torch

    from diffpro_cli.sampling import default_labels

    def keep(v):
        return v.detach().clone() if isinstance(v, torch.Tensor) else v

    captured, hooks = {}, []
    for name, mod in modules.items():
        hooks.append(mod.register_forward_pre_hook(
            lambda m, args, kwargs, n=name: captured.setdefault(n, (tuple(keep(a) for a in args),
                                                                    {k: keep(v) for k, v in kwargs.items()})),
            with_kwargs=True))
    from diffpro_cli.devices import net_device
    from diffpro_cli.sampling import to_device

    device = net_device(model.net)       # drawn on the CPU (same inputs everywhere), timed where the net is
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *model.sample_shape, generator=gen).to(device)
    t = torch.full((batch,), model.num_train_timesteps // 2, dtype=torch.long).to(device)
    y = to_device(default_labels(model, batch), device)   # class i % C, or entry i % M of a text model's conditioning set
    try:
        with torch.no_grad():
            model.eps(x, t, y)
    finally:
        for h in hooks:
            h.remove()
    return captured, (x, t, y)


def _path_module(quantize_module, mod, opt: Option, inp, post_op: str | None = None, prefer: str | None = None):
    """The module `quantize` emits for `mod` under a quantized option (a copy; static activations get
    the captured input's range; `post_op`: the activation the deployed layer applies, fused where its
    kernel can, quant/epilogue.py; `prefer`: the kernel to run), ready to be timed on `inp`."""
    static = float(inp.abs().max()) if opt.act_bits < 16 and opt.act_mode == "static" else None
    q = quantize_module(copy.deepcopy(mod), opt.weight_bits, act_bits=opt.act_bits, act_mode=opt.act_mode,
                        group_size=opt.group_size, static_absmax=static).eval()
    if (post_op is not None or prefer is not None) and getattr(q, "is_diffpro_quant", False):
        q.post_op, q.prefer = post_op, prefer
        q._forget_kernel()
    return q


def _cells(quantize_module, mod, opt: Option, inp, post_op: str | None, float_mod=None) -> dict:
    """{kernel name or None: timed fn} for one cell of one layer, each run once here: the float layer
    (`float_mod`, default `mod`) followed by its activation for a full-precision option; for a quantized
    one, every kernel that can run it when the integer path has a choice (fbgemm's fused op and oneDNN's
    matmul on x86: which is faster depends on the shape and the CPU, e.g. oneDNN 20-25 % faster at
    DiT-XL/2's widths and fbgemm at the built-ins' on the same VNNI CPU), else {None: the registry's one}.
    Raises when the option cannot run here."""
    from diffpro_cli.quant import kernels

    if opt.full_precision:
        fn = _float_fn(mod if float_mod is None else float_mod, inp, post_op)
        fn()
        return {None: fn}
    q = _path_module(quantize_module, mod, opt, inp, post_op)
    q(inp)
    names = [] if opt.act_bits >= 16 else [
        n for n in kernels.candidates(q.kind, inp.device.type, q.weight_bits, q.act_mode)
        if n not in kernels.OPT_IN and n != "dequant-float" and kernels.KERNELS[n].usable(q, inp.device)]
    if len(names) < 2:
        return {None: lambda f=q, i=inp: f(i)}
    chosen = q.kernel_name.split(":")[0]   # the registry's pick: the same module as preferring it by name
    cells = {chosen: lambda f=q, i=inp: f(i)} if chosen in names else {}
    for name in names:
        if name not in cells:
            alt = _path_module(quantize_module, mod, opt, inp, post_op, prefer=name)
            alt(inp)
            cells[name] = lambda f=alt, i=inp: f(i)
    return cells


def cell_key(name: str, mod, inp, post_op: str | None) -> tuple:
    """What a layer's cost depends on: its kind, weight shape, bias, convolution geometry, input shape and
    dtype, and the activation it runs with. Layers with one key (a DiT's 28 blocks) share one timing.
    `name` is not part of the key; it is there so a test can key cells by layer."""
    geometry = tuple(str(getattr(mod, a, None)) for a in ("stride", "padding", "dilation", "groups", "padding_mode"))
    weight = getattr(mod, "weight", None)
    return (type(mod).__name__, None if weight is None else tuple(weight.shape), getattr(mod, "bias", None) is not None,
            geometry, tuple(inp.shape), str(inp.dtype), post_op)


def _shared_cells(names, key_of) -> dict[str, str]:
    """{layer: the first layer with its cell_key} for every layer after the first of its key."""
    first: dict[tuple, str] = {}
    same = {}
    for n in names:
        lead = first.setdefault(key_of(n), n)
        if lead != n:
            same[n] = lead
    return same


def _copy_shared(table: dict, same: dict[str, str]) -> None:
    """Give every layer that shares a measurement its representative's cells (the ones it lacks)."""
    for name, lead in same.items():
        row, src = table[name], table[lead]
        row["same_as"] = lead
        for label, ms in src["ms"].items():
            row["ms"].setdefault(label, ms)
        for field in ("kernel", "unsupported"):
            if src.get(field):
                row[field] = {**src[field], **row.get(field, {})}


def _keep_fastest(timed: dict, table: dict, batch: int) -> float | None:
    """Fold {(layer, column, kernel): ms per call} into table rows: each cell the fastest kernel's time
    per image, the kernel recorded in row["kernel"][column] where there was a choice. Returns the
    forward's ms per image if it was timed."""
    forward = None
    for (name, label, kernel), ms in timed.items():
        if name == "__forward__":
            forward = ms / batch
            continue
        row = table[name]
        if row["ms"].get(label) is None or ms / batch < row["ms"][label]:
            row["ms"][label] = ms / batch
            if kernel is not None:
                row.setdefault("kernel", {})[label] = kernel
    return forward


def fold_timings(timed: dict, table: dict, same: dict[str, str], batch: int, forward: float | None = None) -> tuple[float, float]:
    """The end of every world's measurement: fold the timings into `table` (_keep_fastest), fill the rows
    that share a cell (_copy_shared), and return (forward, remainder) in ms per image, the remainder
    being the forward less every layer's float cell. `forward`: a previous table's, when not re-timed."""
    forward = _keep_fastest(timed, table, batch) or forward
    _copy_shared(table, same)
    gemm = sum(r["ms"].get("fp32") or 0.0 for r in table.values())
    return forward, max(0.0, forward - gemm)


def world_rows(modules: dict, captured: dict, same: dict[str, str], table: dict, dtype):
    """(name, module, its captured input in `dtype`) for every layer a world times itself; each captured
    layer gets its row in `table` here (a layer sharing a cell is filled by fold_timings)."""
    for name, mod in modules.items():
        if name not in captured:
            continue
        table[name] = {"ms": {}}
        if name not in same:
            yield name, mod, captured[name][0][0].to(dtype)


def _float_fn(mod, inp, post_op: str | None):
    """The float layer as it runs in the model: followed by its activation where quantize would fuse one."""
    from diffpro_cli.quant.epilogue import apply_post_op

    return lambda: apply_post_op(post_op, mod(inp))


def measure_cost_table(model, options: list[Option], batch: int, repeats: int, ui: UI = QUIET_UI,
                       previous: dict | None = None, bf16: bool | None = None, compiled: bool = False) -> dict:
    """The cost table document (module docstring). `previous`: a table of the same machine, model and
    batch whose cells are reused (only missing columns are timed). `bf16` (default: native_bf16()): also
    the "bfloat16" world, every path timed with the model's float math in bf16 (doc["worlds"]).
    `compiled`: also the compiled worlds (costs_compiled.py); where compile is unavailable here,
    doc["compiled_unavailable"] says why."""
    import torch

    quantize_module = _kernels()
    if quantize_module is None:
        raise InputError("latency: the integer kernels (diffpro_cli.quant.layers) are unavailable; "
                         "pass --latency-source analytic for a labelled estimate")
    from diffpro_cli.quant.epilogue import activation_after

    from diffpro_cli.devices import net_device

    device = str(net_device(model.net))
    modules = {name: mod for name, (mod, _) in model.quantizable_layers().items()}
    posts = {name: activation_after(model.net, name) for name in modules}
    captured, (x, t, y) = capture_inputs(model, modules, batch)
    old = (previous or {}).get("layers", {})
    table: dict[str, dict] = {}
    columns = {}
    for opt in [Option(16, 16, options[0].act_mode if options else "dynamic", None), *options]:
        columns.setdefault(path_label(opt), opt)
    fns: dict[tuple[str, str], Callable[[], object]] = {}
    same = _shared_cells([n for n in modules if n in captured],
                         lambda n: cell_key(n, modules[n], captured[n][0][0], posts[n]))
    # building every cell (quantize + pack per option and kernel) takes minutes on a DiT-XL/2: its own progress
    with torch.no_grad(), ui.progress("allocate: preparing layer kernels (cost table)", total=len(modules)) as prepared:
        for name, mod in modules.items():
            prepared(1)
            if name not in captured:
                continue
            inp = captured[name][0][0]
            kept = old.get(name, {})
            row = {"kind": type(mod).__name__, "input_shape": list(inp.shape), "ms": dict(kept.get("ms", {}))}
            if kept.get("kernel"):
                row["kernel"] = dict(kept["kernel"])
            table[name] = row
            if name in same:   # timed once, on the first layer of its shape (_copy_shared)
                continue
            for label, opt in columns.items():
                if label in row["ms"]:
                    continue
                try:
                    cells = _cells(quantize_module, mod, opt, inp, posts[name])
                except Exception as exc:   # an option this layer's kernels cannot run: not a choice here
                    if opt.full_precision:
                        raise
                    row["ms"][label] = None
                    row.setdefault("unsupported", {})[label] = str(exc).splitlines()[0][:120]
                    continue
                fns.update({(name, label, kernel): fn for kernel, fn in cells.items()})
    with torch.no_grad():
        forward = (previous or {}).get("forward_ms")
        if forward is None or fns:      # the forward shares the rounds, so the remainder is consistent
            fns[("__forward__", "fp32", None)] = lambda: model.eps(x, t, y)
        rounds = max(1, repeats)
        with ui.progress("allocate: timing layers (cost table)", total=rounds) as advance:
            timed = interleaved_min_ms(fns, rounds, advance=advance, device=device)
    forward, remainder = fold_timings(timed, table, same, batch, forward)
    worlds = dict((previous or {}).get("worlds") or {})
    retimed = any(key[0] != "__forward__" for key in fns)   # new columns: the other worlds need them too
    use_bf16 = native_bf16(device) if bf16 is None else bf16
    if use_bf16 and ("bfloat16" not in worlds or retimed):
        worlds["bfloat16"] = measure_world(model, modules, captured, columns, (x, t, y), batch, repeats, ui,
                                           quantize_module, torch.bfloat16, posts, same)
    from diffpro_cli.planning.costs_compiled import add_compiled_worlds, is_compiled

    if retimed:   # a previous table's compiled worlds lack the new columns: measured again when asked for
        worlds = {w: v for w, v in worlds.items() if not is_compiled(w)}
    no_compile = None
    if compiled:
        no_compile = add_compiled_worlds(worlds, model, modules, captured, columns, (x, t, y), batch, repeats,
                                         ui, quantize_module, posts, same, use_bf16)
    return {"schema": COST_SCHEMA, "fingerprint": machine_fingerprint(device), "batch": batch, "repeats": repeats,
            "model": {"spec": model.spec, "sha256": model.sha256}, "units": "ms per image per denoising step",
            "layers": table, "forward_ms": forward, "remainder_ms": remainder, "worlds": worlds,
            "compiled_unavailable": no_compile,
            "notes": ["layers timed one at a time on their real inputs (fused q/k/v of the deployed model share one "
                      "activation quantization, so those rows slightly overstate the integer path)",
                      f"layers of the same shape, input and activation share one measurement (`same_as`): "
                      f"{len(table) - len(same)} timed for {len(table)} layers",
                      "an MLP's first Linear is timed with its GELU on every path (the integer kernel fuses it): "
                      + (", ".join(sorted(n for n, p in posts.items() if p)) or "none in this model")]}


def measure_world(model, modules: dict, captured: dict, columns: dict, xty: tuple, batch: int, repeats: int,
                  ui: UI, quantize_module, dtype, posts: dict, same: dict[str, str]) -> dict:
    """Every column again with the float math in `dtype` (the model's compute_dtype at run time): float
    layers as `dtype` copies on `dtype` inputs, integer kernels on `dtype` inputs (their float32 casts
    included), weight-only layers on their `dtype` weight copy, and the whole forward in `dtype` for the
    remainder. Same units and reduction as the float32 table; `same`: the float32 table's shared cells
    (_shared_cells), timed once here too."""
    import torch

    fns, table = {}, {}
    world = str(dtype).replace("torch.", "")
    timed_here = sum(1 for n in modules if n in captured and n not in same)
    with torch.no_grad(), ui.progress(f"allocate: preparing layer kernels in {world} (cost table)", total=timed_here) as prepared:
        for name, mod, inp in world_rows(modules, captured, same, table, dtype):
            prepared(1)
            post = posts.get(name)
            low_mod = copy.deepcopy(mod).to(dtype)
            for label, opt in columns.items():
                try:
                    cells = _cells(quantize_module, mod, opt, inp, post, float_mod=low_mod)
                except Exception:   # not runnable in this dtype here: never chosen in this world
                    table[name]["ms"][label] = None
                    continue
                fns.update({(name, label, kernel): fn for kernel, fn in cells.items()})
    with torch.no_grad():
        low = copy.deepcopy(model).set_compute_dtype(dtype)
        x, t, y = xty
        fns[("__forward__", "fp32", None)] = lambda: low.eps(x, t, y)
        with ui.progress(f"allocate: timing layers in {world} (cost table)", total=max(1, repeats)) as advance:
            timed = interleaved_min_ms(fns, max(1, repeats), advance=advance, device=str(x.device))
    forward, remainder = fold_timings(timed, table, same, batch)
    return {"layers": table, "forward_ms": forward, "remainder_ms": remainder,
            "note": "fp32 column = the float layer computing in this dtype"}


def world_table(doc: dict, world: str) -> dict:
    """The cost table as seen from one compute dtype ("float32" or a key of doc["worlds"]): same shape as
    the float32 document, so table_latency_fn and the remainder read it unchanged."""
    if world == "float32":
        return doc
    w = (doc.get("worlds") or {}).get(world)
    if w is None:
        raise InputError(f"cost table has no {world} timings; delete it (or pass --force) to re-measure")
    layers = {name: {**row, "ms": w["layers"].get(name, {}).get("ms", {}), "kernel": w["layers"].get(name, {}).get("kernel", {})}
              for name, row in doc["layers"].items()}
    return {**doc, "layers": layers, "forward_ms": w["forward_ms"], "remainder_ms": w["remainder_ms"], "world": world}


def read_cost_table(path: Path) -> dict:
    from diffpro_cli.artifacts import read_json

    doc = read_json(path, COST_SCHEMA)
    if not isinstance(doc.get("layers"), dict) or "remainder_ms" not in doc:
        raise InputError(f"{path}: not a complete cost table; delete it to re-measure")
    problem = _table_problem(doc)
    if problem:
        raise InputError(f"{path}: {problem}, so it is damaged or hand-edited; delete it to re-measure")
    return doc


def _time_ok(v, allow_none: bool) -> bool:
    return (v is None and allow_none) or (not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v) and v >= 0)


def _table_problem(doc: dict) -> str | None:
    """What in a read cost table would be a traceback (a row that is not an object) or a silently wrong plan
    (a NaN or negative time); None: nothing. A null cell is a path the kernel cannot run, as measured."""
    for label, table in [("", doc), *((f"world {k}: ", w) for k, w in (doc.get("worlds") or {}).items())]:
        if not isinstance(table, dict) or not isinstance(table.get("layers", {}), dict):
            return f"{label}not an object of layers"
        for key in ("remainder_ms", "forward_ms"):
            if key in table and not _time_ok(table[key], allow_none=key == "forward_ms"):
                return f"{label}{key} is {table[key]!r}, not a time of at least 0 ms"
        for name, row in table.get("layers", {}).items():
            if not isinstance(row, dict) or not isinstance(row.get("ms", {}), dict):
                return f"{label}layer {name}: its row is not an object with an 'ms' map"
            bad = [(k, v) for k, v in row.get("ms", {}).items() if not _time_ok(v, allow_none=True)]
            if bad:
                return f"{label}layer {name}: {bad[0][0]} is {bad[0][1]!r} ms, not a time of at least 0 ms"
    return None


def table_latency_fn(doc: dict, analytic: bool = False) -> Callable[[Layer, Option], float]:
    """latency(layer, option) → ms per image per step from the table; nan where the kernel cannot run
    the option (the solver then never picks it). `analytic`: quantized options estimated as the measured
    fp32 time × max(weight bits, act bits) / 32 (a labelled estimate, not a kernel measurement)."""
    rows = doc["layers"]

    def latency(layer: Layer, opt: Option) -> float:
        row = rows.get(layer.name)
        if row is None:
            raise InputError(f"cost table has no layer {layer.name}; it was measured for another model: delete it or pass --force")
        if analytic and not opt.full_precision:
            return row["ms"]["fp32"] * max(opt.weight_bits, opt.act_bits) / 32.0
        value = row["ms"].get(path_label(opt))
        if value is None and path_label(opt) not in row["ms"]:
            raise UsageError(f"cost table has no column {path_label(opt)} for {layer.name}; pass --force to re-measure")
        return float("nan") if value is None else float(value)

    return latency


def attach_kernels(entries: dict, view: dict) -> int:
    """Give every integer plan entry the kernel its cost-table cell was fastest with (`entry["kernel"]`,
    which quantize passes on as the layer's preferred kernel); `view` is the table as seen from the
    plan's compute dtype (world_table). Returns the number of entries given one."""
    made = 0
    for name, entry in entries.items():
        if int(entry.get("weight_bits", 16)) >= 16 or int(entry.get("act_bits", 16)) >= 16:
            continue
        opt = Option(int(entry["weight_bits"]), int(entry["act_bits"]), entry.get("act_mode", "dynamic"), entry.get("group_size"))
        kernel = ((view["layers"].get(name) or {}).get("kernel") or {}).get(path_label(opt))
        if kernel:
            entry["kernel"] = kernel
            made += 1
    return made
