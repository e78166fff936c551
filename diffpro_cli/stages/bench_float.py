"""bench's bf16 rows (issue #19): the plan must beat the strongest float baseline a user could pick on
their own hardware, and where the device computes bf16 natively (AVX512_BF16 / AMX-BF16 CPUs, CUDA
GPUs with bf16) that is plain bf16, not fp32 (this AMD EPYC: bf16 runs the built-ins 1.5-2x faster).

- `bf16`: the float model computing in bf16 on the reference schedule (beside `fp32`);
- `bf16-ddim` (named `bf16-ddim-K`): the same on the K uniform steps of the `ddim-K` row (flow models:
  the same Euler step cut).

Both run one bf16 copy of the float model: the run's shared fp32 model is never cast. They join the
default rows only where bf16 is native (`native_bf16`); asked with `--rows` they run anywhere.
"""

from __future__ import annotations

import copy

import torch

from diffpro_cli.planning.fingerprint import bf16_support

FLOAT_ROWS = ("bf16", "bf16-ddim")


def native_bf16(device: str = "cpu") -> tuple[bool, str]:
    """(whether `device` computes bf16 natively, why): the planner's check (planning.fingerprint.bf16_support:
    CUDA with bf16; a CPU with avx512_bf16 / amx_bf16 and no oneDNN ISA cap below them)."""
    return bf16_support(device)


def bf16_copy(fp):
    """A copy of the float model computing in bf16 (weights cast once); `fp` itself stays fp32."""
    return copy.deepcopy(fp).set_compute_dtype(torch.bfloat16)


def bf16_row(name: str, fp, ref_ts: list[int], k: int, fp_id: str, shared: dict, device: str = "cpu") -> list:
    """The `bf16` or `bf16-ddim-K` row; both share one bf16 copy (kept in `shared`)."""
    from diffpro_cli.sampling import uniform_timesteps
    from diffpro_cli.stages.bench import Row, float_size_bytes

    if "model" not in shared:
        shared["model"] = bf16_copy(fp)
    native, why = native_bf16(device)
    notes = ["size: the float checkpoint stored in bf16 (half of fp32's bytes; not written to disk)",
             "peak memory: the fp32 row's (the fresh process loads the float checkpoint in fp32)",
             f"bf16 {'native' if native else 'EMULATED (expect it slower than fp32)'} here: {why}"]
    size = float_size_bytes(fp, 2)   # the float checkpoint stored in bf16
    if name == "bf16":
        return [Row("bf16", shared["model"], list(ref_ts), len(ref_ts), size, 16.0, f"bf16:{fp_id}", notes=notes)]
    ts = uniform_timesteps(fp.num_train_timesteps, k)
    return [Row(f"bf16-ddim-{k}", shared["model"], ts, k, size, 16.0, f"bf16-ddim{k}:{fp_id}", notes=notes)]
