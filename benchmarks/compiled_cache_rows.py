"""Cached rows eager vs regionally compiled (what `bench --compile` does to them), in one process.

    python benchmarks/compiled_cache_rows.py diffpro-work/cache-dit     # after `diffpro run sample_configs/cache-dit.toml`

Rows, as bench builds them: `fbcache-0.08` (the float model, first-block threshold 0.08 on the 50-step
reference schedule) and the workdir's checkpoint on its own cache schedule (the `diffpro` row), each
timed eager and with every block compiled on its own (quant.compiled.compile_regions: inductor, freezing,
integer layers on the compiled oneDNN path; the rest of the network eager). Two separate bench runs
(eager, then --compile) drift apart on a shared machine by more than the difference measured here, so
the four variants are timed round-robin in one process after one warm-up each (which compiles).
Ratios are of medians (and of minima); the load average is printed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

# `python benchmarks/...` puts this folder first on sys.path, where benchmarks/kernels.py would shadow the
# `kernels` package that transformers imports (through diffusers)
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

import diffpro  # noqa: E402
from diffpro_cli.cache import (
    FirstBlockCache,
    cached,
    model_cache_record,
    record_policy,
    remove_cache,
    unit_modules,
)
from diffpro_cli.quant import compiled
from diffpro_cli.sampling import SamplerConfig, sample, uniform_timesteps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workdir", type=Path, help="a workdir whose quantized/ checkpoint carries a cache schedule")
    ap.add_argument("--model", default="builtin:dit-mnist")
    ap.add_argument("--repeats", type=int, default=11)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if not compiled.compiled_available():
        raise SystemExit(f"error: the compiled path is unavailable here ({compiled.unavailable_reason()})")
    torch.set_num_threads(args.threads)
    q_eager, q_comp = (diffpro.load(str(args.workdir / "quantized")) for _ in range(2))
    policy = record_policy(model_cache_record(q_eager))
    if policy is None:
        raise SystemExit(f"error: {args.workdir / 'quantized'} has no cache schedule; run allocate with cache = true")
    for m in (q_eager, q_comp):
        remove_cache(m)   # loading installs the schedule; the rows enter their runner per call, as bench does
    f_eager, f_comp = (diffpro.load(args.model) for _ in range(2))
    ref = uniform_timesteps(1000, 50)
    fb = FirstBlockCache(ref, len(unit_modules(f_eager.net)), 0.08, max(1, round(0.1 * len(ref))))
    for m in (q_comp, f_comp):
        compiled.compile_regions([b for unit in unit_modules(m.net) for b in unit])

    def row(model, policy_, ts):
        def run():
            with torch.no_grad(), cached(model, policy_):
                sample(model, args.batch, ts, SamplerConfig(), seed=0, batch_size=args.batch)
        return run

    fns = {("fbcache-0.08", "eager"): row(f_eager, fb, ref), ("fbcache-0.08", "regional"): row(f_comp, fb, ref),
           ("diffpro", "eager"): row(q_eager, policy, policy.timesteps),
           ("diffpro", "regional"): row(q_comp, policy, policy.timesteps)}
    for fn in fns.values():   # warm-up: compiles each block once for this shape
        fn()
    times = {k: [] for k in fns}
    for _ in range(args.repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append((time.perf_counter() - t0) / args.batch)
    print(f"{args.repeats} interleaved repeats, batch {args.batch}, {args.threads} threads, load average "
          f"{os.getloadavg()[0]:.2f}")
    for name in ("fbcache-0.08", "diffpro"):
        e, c = times[(name, "eager")], times[(name, "regional")]
        print(f"{name:13s} eager {statistics.median(e) * 1e3:7.2f} ms/img, regionally compiled "
              f"{statistics.median(c) * 1e3:7.2f} ms/img: {statistics.median(e) / statistics.median(c):.2f}x "
              f"({min(e) / min(c):.2f}x by minima)")


if __name__ == "__main__":
    from diffpro_cli.errors import DiffproError

    try:
        main()
    except DiffproError as exc:   # a bad workdir or checkpoint: diffpro's one line, not a traceback
        print(f"error: {exc.message}", file=sys.stderr)
        sys.exit(exc.exit_code)
