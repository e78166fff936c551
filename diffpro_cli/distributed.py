"""Sharding sample generation and feature extraction over `torchrun` processes.

Under `torchrun --nproc-per-node N -m diffpro_cli bench ...` every rank takes a contiguous slice of
the sample indices (samples are seeded per index, so a slice is exactly the same images a single
process would make), computes what it must for its slice, and the slices are gathered in rank
order. Rank 0 writes the artifacts; the others only compute. The backend follows the device the run
computes on (gloo for cpu, nccl only for cuda), not whether a GPU happens to exist: nccl cannot
all-gather the CPU tensors and objects a CPU run exchanges.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from diffpro_cli.errors import UsageError

DEVICE_ENV = "DIFFPRO_DEVICE"   # the device a run computes on, if the runner sets it (default cpu)
TIMEOUT_ENV = "DIFFPRO_DIST_TIMEOUT_S"   # how long a rank may wait in a collective (default DEFAULT_TIMEOUT_S)
# bench's other ranks wait in a barrier while rank 0 times every row and measures each row's memory in a
# fresh process: tens of minutes for a large model, past torch's defaults (gloo 30 min, nccl 10 min)
DEFAULT_TIMEOUT_S = 6 * 3600


def backend_for(device: str | torch.device | None = None) -> str:
    """The process-group backend for a run on `device` (default: $DIFFPRO_DEVICE, else cpu)."""
    if device is None:
        device = os.environ.get(DEVICE_ENV) or "cpu"
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError):
        raise UsageError(f"device {device!r}: not a torch device; use cpu or cuda") from None
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"device {device}: CUDA is not available here; run on cpu or on a machine with a GPU")
        return "nccl"
    if kind == "cpu":
        return "gloo"
    raise UsageError(f"device {device}: distributed runs support cpu (gloo) and cuda (nccl)")


def init_from_env(device: str | torch.device | None = None) -> tuple[int, int]:
    """Join the process group torchrun describes (if any) with the backend for `device` (see backend_for);
    returns (rank, world size)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = backend_for(device)
        if backend == "nccl":   # one GPU per rank
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=collective_timeout_s()))
    return rank_world()


def collective_timeout_s() -> float:
    """Seconds a collective may wait: $DIFFPRO_DIST_TIMEOUT_S, else DEFAULT_TIMEOUT_S."""
    raw = os.environ.get(TIMEOUT_ENV)
    if raw is None:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise UsageError(f"{TIMEOUT_ENV}={raw}: not a positive number of seconds; unset it or give e.g. 21600")
    return value


def rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return rank_world()[0] == 0


def shard_range(n: int, rank: int, world: int) -> tuple[int, int]:
    """[start, stop) of rank's contiguous share of n items (the first n % world ranks take one more)."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def sharded_map(n: int, fn: Callable[[int, int], np.ndarray]) -> np.ndarray:
    """fn(start, count) → rows for items [start, start+count); returns all n rows on every rank.

    A rank whose share raises still joins the gather (with its error instead of rows), so every rank
    raises instead of the others waiting in the collective until the process group times out: the
    failing rank its own exception, the others `shard_failure`'s."""
    rank, world = rank_world()
    start, stop = shard_range(n, rank, world)
    if world == 1:
        return fn(start, stop - start) if stop > start else None
    failure = None
    try:
        local = fn(start, stop - start) if stop > start else None
    except Exception as exc:  # noqa: BLE001 - re-raised below, after the other ranks have heard of it
        local, failure = None, exc
    parts = [None] * world
    dist.all_gather_object(parts, ("ok", local) if failure is None else
                           ("failed", f"{type(failure).__name__}: {failure}", getattr(failure, "exit_code", None)))
    failed = [(r, p) for r, p in enumerate(parts) if p[0] == "failed"]
    if failure is not None:
        raise failure
    if failed:
        raise shard_failure(*failed[0], world)
    return np.concatenate([p[1] for p in parts if p[1] is not None and len(p[1])])


def shard_failure(rank: int, part: tuple, world: int) -> Exception:
    """The error the other ranks raise for a rank's failed share: a DiffproError with the failing rank's
    exit code where it failed with one (a user's error), else a RuntimeError (a bug: traceback)."""
    from diffpro_cli.errors import DiffproError

    _, text, code = part
    message = f"rank {rank} of {world} failed on its share of the samples ({text}); see that rank's output"
    if code is None:
        return RuntimeError(message)
    err = DiffproError(message)
    err.exit_code = code
    return err


def broadcast_from_main(value):
    """Rank 0's `value` on every rank (the others pass anything); the value itself without torchrun."""
    if rank_world()[1] == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if rank_world()[1] > 1:
        dist.barrier()
