"""bench's same-latency step cut (`--rows ddim-same-latency`): float DDIM on as many steps as cost diffpro's
measured latency, and the report line that says who is closer to fp32 when both take the same time."""

import json
from types import SimpleNamespace

import pytest

from diffpro_cli.stages.bench_same_latency import same_latency_steps
from diffpro_cli.stages.comparisons import versus_step_cut


def _row(name, steps, timesteps=(), cache=None):
    return SimpleNamespace(name=name, steps=steps, timesteps=list(timesteps), cache=cache)


def _timing(**medians):
    return {name.replace("_", "-"): {"latency": {"median": m}, "energy": None} for name, m in medians.items()}


@pytest.mark.parametrize("diffpro_s, want", [
    (0.44, 11),    # 0.04 s a float step: 11 steps cost 0.44 s (not 10: floor must not lose a step to rounding)
    (0.43, 10),    # the cut is never slower than diffpro
    (0.01, 1),     # at least one step
])
def test_the_step_count_is_the_most_float_steps_within_diffpros_latency(diffpro_s, want):
    rows = [_row("fp32", 50), _row("ddim-25", 25), _row("diffpro", 25)]
    k, why = same_latency_steps(rows, _timing(fp32=2.5, ddim_25=1.0, diffpro=diffpro_s))
    assert (k, why) == ((want, "ddim-25"), None)


def test_the_fastest_float_step_cut_prices_the_steps():
    """Where bf16-ddim-K ran faster per step than ddim-K, the user's float alternative is bf16: K' comes
    from its per-step time (more steps) and the row is built from it; catches the fp32 row always pricing."""
    rows = [_row("fp32", 50), _row("ddim-25", 25), _row("bf16-ddim-25", 25), _row("diffpro", 25)]
    assert same_latency_steps(rows, _timing(fp32=2.5, ddim_25=1.0, bf16_ddim_25=0.5, diffpro=0.44)) == ((22, "bf16-ddim-25"), None)
    assert same_latency_steps(rows, _timing(fp32=2.5, ddim_25=1.0, bf16_ddim_25=1.5, diffpro=0.44)) == ((11, "ddim-25"), None)


def test_without_a_float_step_row_or_when_diffpro_is_not_faster_it_says_why():
    k, why = same_latency_steps([_row("diffpro", 25)], _timing(diffpro=0.4))
    assert k is None and "needs the diffpro row and a float step-cut row" in why
    rows = [_row("fp32", 50), _row("diffpro", 25)]       # priced from fp32's per-step time when no ddim row
    assert same_latency_steps(rows, _timing(fp32=2.0, diffpro=0.4)) == ((10, "fp32"), None)
    k, why = same_latency_steps(rows, _timing(fp32=2.0, diffpro=1.2))   # slower per image than 25 float steps
    assert k is None and "is not faster per image" in why


def test_the_report_line_says_who_is_closer_to_fp32_at_the_same_latency():
    def row(name, steps, med, fid_vs_fp, **extra):
        return {"name": name, "steps": steps, "latency_s_per_image": {"median": med}, "fid_vs_fp": fid_vs_fp, **extra}

    rep = {"rows": [row("fp32", 50, 2.0, 0.0), row("ddim-25", 25, 1.0, 2.5), row("diffpro", 25, 0.45, 24.7),
                    row("ddim-11", 11, 0.44, 16.2, same_latency_as="diffpro")],
           "derived": {"diffpro": {"compression": 7.1}}}
    out = {v["row"]: v for v in versus_step_cut(rep)}
    assert set(out) == {"ddim-25", "ddim-11"} and "same_latency_verdict" not in out["ddim-25"]
    assert "FEWER FLOAT STEPS WIN" in out["ddim-11"]["line"] and "as fast as diffpro" in out["ddim-11"]["line"]
    rep["rows"][-1]["fid_vs_fp"] = 30.0
    assert versus_step_cut(rep)[-1]["same_latency_verdict"] == "diffpro is closer to fp32"


@pytest.mark.parametrize("bf16_s, want, want_s", [
    (None, "ddim-3", 0.3),           # floor(0.35 / 0.1) = 3
    (0.4, "bf16-ddim-7", 0.35),      # bf16-ddim-8 is faster per step: floor(0.35 / 0.05) = 7, in bf16
])
def test_bench_adds_the_row_after_timing_with_its_latency_from_the_float_steps(tmp_path, bf16_s, want, want_s):
    """Through measure_bench on a tiny checkpoint: the row is ddim-K' (bf16-ddim-K' where that row was
    faster) with K' < diffpro's steps, marked same_latency_as, its latency the pricing row's per step × K'
    (not a placeholder), and it is sampled like any row."""
    import diffpro
    from diffpro_cli.stages.bench import BenchConfig, measure_bench
    from diffpro_cli.stages.context import StageContext

    work = tmp_path / "w"
    diffpro.profile("random:dit-tiny", work, samples=2, timesteps="999:0:500", batch=2)
    diffpro.score("random:dit-tiny", work, figures=False)
    diffpro.prune("random:dit-tiny", work, steps=8, reference_steps=16, n=2, batch=2)
    diffpro.allocate("random:dit-tiny", work, budget="avg-bits=6", repeats=1, batch=2)
    diffpro.quantize("random:dit-tiny", work)
    cfg = BenchConfig(rows=["fp32", "ddim", "diffpro", "ddim-same-latency"] + (["bf16-ddim"] if bf16_s else []),
                      reference_steps=16, repeats=1, latency_batch=2, memory=False, fid=False)
    timings = {"ddim-8": 0.8, "diffpro": 0.35, "fp32": 1.6}   # injected: the rule, not this machine's speed
    if bf16_s:
        timings["bf16-ddim-8"] = bf16_s

    import diffpro_cli.stages.bench as bench_mod

    real = bench_mod.measure_latency

    def fake(rows, cfg, ui, device):
        out = real(rows, cfg, ui, device)
        for name, med in timings.items():
            out[name]["latency"] = {"median": med, "min": med, "max": med, "repeats": 1}
        return out

    mp = pytest.MonkeyPatch()
    mp.setattr(bench_mod, "measure_latency", fake)
    try:
        measure_bench(StageContext.create("random:dit-tiny", work), cfg, quantized=work / "quantized")
    finally:
        mp.undo()
    rep = json.loads((work / "bench" / "report.json").read_text())
    rows = {r["name"]: r for r in rep["rows"]}
    assert want in rows and rows[want]["same_latency_as"] == "diffpro"
    assert rows[want]["latency_s_per_image"]["median"] == pytest.approx(want_s)
    assert "same_latency_as" not in rows["ddim-8"]
    assert any(v["row"] == want for v in rep["versus_step_cut"])


def test_the_row_alone_is_one_line_naming_what_it_needs(cli, tmp_path):
    """Catches the bare 'name at least one row' for a --rows that did name one."""
    code, _, err = cli("bench", "random:dit-tiny", "-w", tmp_path / "w", "--rows", "ddim-same-latency", "--repeats", "1")
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "add diffpro and ddim" in lines[0], err


def test_checkpoint_identity_ignores_the_write_time_but_not_the_tensors():
    """bench's diffpro row cache key: a re-quantize to the same tensors (new `created`) keeps it, so cached
    FID features are reused; new tensors, plan or timesteps change it."""
    from diffpro_cli.stages.bench_options import checkpoint_identity

    base = {"provenance": {"tensors_sha256": "a", "plan_sha256": "p", "timesteps_sha256": "t", "created": "2026-12-07T10:00:00"}}
    again = {"provenance": {**base["provenance"], "created": "2026-12-07T11:00:00", "plan_check": "measured ..."}}
    assert checkpoint_identity(base) == checkpoint_identity(again)
    for key in ("tensors_sha256", "plan_sha256", "timesteps_sha256"):
        other = {"provenance": {**base["provenance"], key: "changed"}}
        assert checkpoint_identity(other) != checkpoint_identity(base)
