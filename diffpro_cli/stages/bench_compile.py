"""bench --compile: every row's network torch.compile'd, float rows included, so a compiled plan is
compared with compiled float. On the CPU integer layers run the compiled oneDNN int8 path
(quant/compiled.py, inductor with freezing); on a GPU the CUDA kernels are traced as they are
(quant/compiled_cuda.py). Cached rows are compiled by region: each cache unit's block on its own, which
the cache runner calls in place of the block's forward (a whole-network graph would be recompiled at
every step, as the runner swaps block forwards per step); the skip/compute decisions stay Python."""

from __future__ import annotations

REGIONAL_NOTE = "regionally compiled: each block compiled, the rest eager"


def compile_rows(rows: list, device: str = "cpu") -> str:
    """Compile every row's network (each distinct model once) for `device`; where compile is unavailable
    every row stays eager (one note). Returns the note."""
    from diffpro_cli.quant import compiled_cuda

    gpu = compiled_cuda.on_gpu(device)
    reason = compiled_cuda.unavailable_reason("cuda" if gpu else "cpu")
    if reason is not None:
        return f"compile requested but unavailable ({reason}): every row ran eager"
    done: dict[int, object] = {}
    for row in rows:
        if row.cache is None:
            key = id(row.model)
            if key not in done:
                done[key] = compiled_cuda.compile_model_on(row.model, device)
            row.model = done[key]
    regional = compile_cached_rows(rows, device)
    if gpu:
        note = (f"every row torch.compile'd on {device} (inductor): float rows as compiled float, the integer layers' "
                "CUDA kernels traced into the graph (UNVERIFIED on a GPU until a GPU session records it); "
                "the first call of each shape compiled during warm-up; memory rows ran eager")
    else:
        note = ("every row torch.compile'd (inductor, freezing): float rows as compiled float, integer layers on "
                "the compiled oneDNN int8 path; the first call of each shape compiled during warm-up; memory rows ran eager")
    if regional:
        note += (f"; the cached rows ({', '.join(regional)}) regionally compiled: each block compiled on its own, "
                 "the rest eager (the cache runner's per-step skip decisions stay Python)")
    return note


def compile_cached_rows(rows: list, device: str = "cpu") -> list[str]:
    """The cached rows: each cache unit's modules (cache.unit_modules: a DiT's blocks, a U-Net's deep
    blocks) compiled on its own, each block's graph once per input shape. Returns the rows' names."""
    from diffpro_cli.cache import unit_modules
    from diffpro_cli.quant import compiled_cuda

    gpu = compiled_cuda.on_gpu(device)
    names = []
    for row in rows:
        if row.cache is not None:
            compiled_cuda.compile_regions_on([m for unit in unit_modules(row.model.net) for m in unit], device)
            row.notes.append(f"{REGIONAL_NOTE} (torch.compile per block, inductor{'' if gpu else ', freezing'})")
            names.append(row.name)
    return names
