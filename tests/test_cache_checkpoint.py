"""A plan's cache schedule travels plan → quantized checkpoint → `diffpro sample` / `diffpro.load`
(docs/caching.md), executed for real, on the built-in DiT (shipped weights, no download)."""

from __future__ import annotations

import json

import pytest
import torch

from diffpro_cli.cache import CacheSchedule, cached
from diffpro_cli.checkpoint import load_quantized
from diffpro_cli.loading import load_model
from diffpro_cli.sampling import SamplerConfig, sample
from diffpro_cli.stages.quantize import quantize_to_dir, uniform_plan

TS = [0, 140, 290, 430, 570, 710, 850, 999]
N = 3


def _sample(model):
    return sample(model, N, TS, SamplerConfig(), seed=0, batch_size=16)


def _partial(n_units: int) -> CacheSchedule:
    every = frozenset(range(n_units))
    return CacheSchedule(TS, n_units, [every, {0, 5}, {0, 5}, every, {0, 2, 5}, {0, 5}, every, every])


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("cachectl")
    model = load_model("builtin:dit-mnist")
    out = {}
    for name, sched in (("partial", _partial(6)), ("full", CacheSchedule.full(TS, 6))):
        plan = uniform_plan(model, 8)
        plan["cache"] = {"enabled": True, "schedule": sched.as_dict(), "base_timesteps": TS[::2]}
        quantize_to_dir(model, plan, root / name, timesteps=TS)
        out[name] = (root / name, sched)
    return out


def test_checkpoint_records_the_schedule_and_load_executes_it(checkpoints):
    import diffpro

    path, sched = checkpoints["partial"]
    meta = json.loads((path / "diffpro.json").read_text())
    assert [s["computed"] for s in meta["cache"]["schedule"]["steps"]] == [sorted(s) for s in sched.computed]
    plain = load_quantized(path)                       # no cache: the in-memory reference runs it by hand
    with cached(plain, sched) as run:
        ref = _sample(plain)
    assert run.compute_fraction == sched.compute_fraction() < 1
    loaded = diffpro.load(path)
    out = _sample(loaded)
    assert torch.equal(out, ref)                       # the loaded net runs the schedule by itself
    assert loaded.net._diffpro_cache.evaluations == run.evaluations   # and skips the same block evaluations
    uncached = _sample(diffpro.load(path, cache=False))
    assert not torch.equal(uncached, ref)              # the schedule really changed the computation


def test_cli_sample_runs_the_checkpoint_schedule(checkpoints, cli, tmp_path):
    from safetensors.torch import load_file

    path, sched = checkpoints["partial"]
    plain = load_quantized(path)
    with cached(plain, sched):
        ref = _sample(plain)
    code, out, err = cli("sample", path, "--n", N, "--out", tmp_path / "s.png", "--json")
    assert code == 0, err
    assert json.loads(out)["compute_fraction"] == pytest.approx(sched.compute_fraction())
    assert torch.equal(load_file(tmp_path / "s.safetensors")["samples"], ref.float())
    # steps that are not the schedule's: one error line, nothing written
    code, _, err = cli("sample", path, "--n", N, "--steps", 5, "--out", tmp_path / "bad.png")
    assert code == 2 and err.strip().startswith("error:") and "--no-cache" in err and not (tmp_path / "bad.png").exists()
    code, _, err = cli("sample", path, "--n", N, "--steps", 5, "--no-cache", "--out", tmp_path / "nc.png")
    assert code == 0, err


def test_all_computed_schedule_is_bit_identical_to_uncached(checkpoints):
    import diffpro

    path, _ = checkpoints["full"]
    assert torch.equal(_sample(diffpro.load(path)), _sample(load_quantized(path)))


def test_bench_diffpro_row_runs_the_checkpoint_schedule_unless_no_cache(checkpoints, tmp_path):
    from diffpro_cli.stages.bench import BenchConfig, measure_bench
    from diffpro_cli.stages.context import StageContext

    path, sched = checkpoints["partial"]
    ctx = StageContext.create("builtin:dit-mnist", tmp_path)
    for use_cache in (True, False):
        cfg = BenchConfig(rows=["diffpro", "diffpro-nocache"], reference_steps=8, repeats=1, latency_batch=2,
                          memory=False, cache=use_cache)
        rows = {r["name"]: r for r in measure_bench(ctx, cfg, quantized=path)["rows"]}
        # cached: the schedule's 8 steps at its compute fraction; --no-cache: the plan's own 4 steps in full
        assert (rows["diffpro"]["steps"], rows["diffpro"]["compute_fraction"]) == \
            ((8, pytest.approx(sched.compute_fraction())) if use_cache else (4, 1.0))
        assert (rows["diffpro-nocache"]["steps"], rows["diffpro-nocache"]["compute_fraction"]) == (4, 1.0)


def test_nocache_row_is_skipped_when_the_plan_kept_no_cache():
    """Catches: a `diffpro-nocache` row measured beside a diffpro row that already runs without a cache
    (the same checkpoint timed twice, its timing noise read as a cache speed-up)."""
    from diffpro_cli.stages.bench_cache import diffpro_nocache_row

    notes = []
    qinfo = {"meta": {"cache": {"enabled": False, "verdict": "no cache: none faster at no more drift"}}}
    assert diffpro_nocache_row(None, qinfo, "q", [0, 500], notes) == []
    assert notes and "kept no cache" in notes[0] and "none faster" in notes[0]
