"""bench's same-latency step cut (`--rows ddim-same-latency`): the float model on as many uniform DDIM steps
as cost diffpro's measured latency per image, so the report can say who has the better samples when a
user spends the same time either way.

diffpro is compared with ddim-K at its own K steps for speed; but a user who does not quantize would
rather cut float steps until the run is as fast as diffpro's, and on a model whose samples barely change
with fewer steps that cut can beat the plan on quality (docs/results.md, session 16: on the built-in DiT,
ddim-10 lands closer to fp32's samples than diffpro's 25 quantized steps). The step count is chosen after
the timing round, from the fastest float step-cut row's per-step time (ddim-K, or bf16-ddim-K where that
row ran and was faster: the strongest float a user could pick here; else fp32): K' = the most steps
whose latency is not above diffpro's. The row is that float model (fp32 or bf16) on K' uniform steps,
named ddim-K' or bf16-ddim-K'. Its latency is that per-step time × K' (the same float model and
sampler; said in the row's notes), not a second timing round.
"""

from __future__ import annotations

import math

from diffpro_cli.artifacts import sha256_json
from diffpro_cli.sampling import uniform_timesteps

TOKEN = "ddim-same-latency"


def _float_step_row(rows, timing: dict, name: str | None = None):
    """The row whose per-step time prices float steps: `name`, else the fastest per step of the timed
    ddim-K and bf16-ddim-K rows, else fp32 (reference schedule)."""
    if name is not None:
        return next(r for r in rows if r.name == name)
    cuts = [r for r in rows if r.name.startswith(("ddim-", "bf16-ddim-")) and r.timesteps is not None
            and r.cache is None and r.name in timing]
    if cuts:
        return min(cuts, key=lambda r: timing[r.name]["latency"]["median"] / r.steps)
    return next((r for r in rows if r.name == "fp32" and r.name in timing), None)


def same_latency_steps(rows, timing: dict) -> tuple[int | None, str | None]:
    """((K', the float row that prices it), None), or (None, why there is no such row)."""
    dp = next((r for r in rows if r.name == "diffpro"), None)
    base = _float_step_row(rows, timing)
    if dp is None or base is None:
        return None, f"{TOKEN} row skipped: it needs the diffpro row and a float step-cut row (ddim or fp32) in --rows"
    per_step = timing[base.name]["latency"]["median"] / base.steps
    k = math.floor(timing["diffpro"]["latency"]["median"] / per_step + 1e-9)
    if k >= dp.steps:
        return None, (f"{TOKEN} row skipped: diffpro ({dp.steps} steps) is not faster per image than {dp.steps} float "
                      f"steps here ({base.name}'s per-step time), so the float step cut at its latency is {dp.steps} steps itself")
    return (max(1, k), base.name), None


def add_same_latency_row(rows, timing: dict, k: int, row_cls, base_name: str) -> None:
    """Append ddim-K' or bf16-ddim-K' (built like bench's row `base_name`, on K' uniform steps) with its
    latency derived from that row's (`timing` is empty on the other ranks of a sharded run: they sample,
    rank 0 reports; `base_name` is rank 0's choice). A row of that name measured already (asked for with
    --steps) is marked instead."""
    from diffpro_cli.metrics.latency import scale

    base = _float_step_row(rows, timing, base_name)
    fp = base.model
    prefix = "bf16-ddim" if base.name.startswith("bf16-") else "ddim"
    name = f"{prefix}-{k}"
    row = next((r for r in rows if r.name == name), None)
    if row is None:
        row = row_cls(name, fp, uniform_timesteps(fp.num_train_timesteps, k), k, base.size_bytes, base.weight_bits_avg,
                      f"{prefix}{k}:{fp.sha256 or sha256_json(fp.spec)}", load_spec=base.load_spec,
                      notes=[n for n in base.notes if n.startswith(("size:", "peak memory:", "bf16"))])
        row.notes.append(f"float DDIM at diffpro's latency: {k} steps; latency = {base.name}'s per-step time × {k} "
                         f"(the fastest float step cut timed here; the same float model and sampler; not timed separately)")
        rows.append(row)
        if base.name in timing:
            energy = timing[base.name]["energy"]
            timing[name] = {"latency": scale(timing[base.name]["latency"], base.steps / k),
                            "energy": None if energy is None else energy * k / base.steps}
    else:
        row.notes.append("float DDIM at diffpro's latency (the same-latency step cut)")
    row.same_latency = True
