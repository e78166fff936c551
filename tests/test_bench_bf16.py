"""bench's bf16 rows (issue #19, stages/bench_float.py): the float model computing in bf16 on the full and the
reduced schedule, in the default rows only where the device runs bf16 natively, compared with diffpro."""

import json

import pytest
import torch

from diffpro_cli.stages import bench_float
from diffpro_cli.stages.bench import BenchConfig, build_rows, default_rows, measure_bench, uniform_checkpoint
from diffpro_cli.stages.comparisons import strongest_float_baseline, versus_step_cut
from diffpro_cli.stages.context import StageContext

SPEC = "random:dit-tiny"


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_bf16_rows_run_their_own_bf16_copy_and_leave_the_shared_fp32_model_alone(tmp_path):
    ctx = StageContext.create(SPEC, tmp_path)
    cfg = BenchConfig(rows=["fp32", "bf16", "ddim", "bf16-ddim"], reference_steps=6, steps=3, memory=False)
    rows, _ = build_rows(ctx, cfg, None, None)
    by = {r.name: r for r in rows}
    assert list(by) == ["fp32", "bf16", "ddim-3", "bf16-ddim-3"]
    fp, bf = by["fp32"], by["bf16"]
    assert bf.model is not fp.model and by["bf16-ddim-3"].model is bf.model       # one bf16 copy for both rows
    assert next(bf.model.net.parameters()).dtype == torch.bfloat16 and bf.model.compute_dtype == torch.bfloat16
    assert next(ctx.model().net.parameters()).dtype == torch.float32 and ctx.model().compute_dtype is None
    assert bf.timesteps == fp.timesteps and by["bf16-ddim-3"].timesteps == by["ddim-3"].timesteps
    assert bf.size_bytes * 2 == fp.size_bytes and bf.weight_bits_avg == 16.0
    # FID feature caches are keyed by identity: a bf16 row must never reuse fp32's (or ddim's) samples
    assert len({r.identity for r in rows}) == 4

    x = {name: r.sampler(cfg, 4, 4) for name, r in by.items()}
    for f, b in (("fp32", "bf16"), ("ddim-3", "bf16-ddim-3")):
        assert x[b].dtype == torch.float32
        # not identical (a row silently computing in fp32) and close (not garbage): bf16 has an 8-bit mantissa
        assert 1e-4 < _rel(x[b], x[f]) < 0.1, (b, _rel(x[b], x[f]))
    # the shared fp32 row still samples exactly what a freshly loaded fp32 model does
    from diffpro_cli.loading import load_model
    from diffpro_cli.stages.bench import Row

    fresh = Row("fp32", load_model(SPEC), fp.timesteps, fp.steps, 0, 32.0, "")
    assert torch.equal(fresh.sampler(cfg, 4, 4), x["fp32"])


@pytest.mark.parametrize("native", [True, False])
def test_default_rows_hold_bf16_only_where_the_device_runs_it_natively(monkeypatch, native):
    monkeypatch.setattr(bench_float, "native_bf16", lambda device="cpu": (native, "test"))
    rows = default_rows()
    assert ("bf16" in rows) is native and ("bf16-ddim" in rows) is native
    assert {"fp32", "ddim", "diffpro"} <= set(rows) and BenchConfig().rows == rows
    assert rows.index("fp32") == 0      # the baseline row stays first


def test_native_bf16_reads_the_cpu_flags_and_honours_onednn_isa_caps(monkeypatch):
    from diffpro_cli.planning import fingerprint

    for name in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(fingerprint, "_cpu_name_and_flags", lambda: ("cpu", {"avx2", "avx512f", "avx512_bf16"}))
    assert bench_float.native_bf16("cpu")[0] is True
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx512_core_amx")          # a cap above bf16 keeps it native
    assert bench_float.native_bf16("cpu")[0] is True
    for cap in ("AVX2", "AVX512_CORE", "avx512_core_vnni"):              # oneDNN then emulates bf16
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
        native, why = bench_float.native_bf16("cpu")
        assert native is False and f"ONEDNN_MAX_CPU_ISA={cap}" in why
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    monkeypatch.setenv("DNNL_MAX_CPU_ISA", "AVX2")
    assert bench_float.native_bf16("cpu")[0] is False
    monkeypatch.delenv("DNNL_MAX_CPU_ISA")
    monkeypatch.setattr(fingerprint, "_cpu_name_and_flags", lambda: ("cpu", {"avx2", "amx_bf16"}))
    assert bench_float.native_bf16("cpu")[0] is True
    monkeypatch.setattr(fingerprint, "_cpu_name_and_flags", lambda: ("cpu", {"avx2", "avx512f", "avx512_vnni"}))
    assert bench_float.native_bf16("cpu")[0] is False
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench_float.native_bf16("cuda")[0] is False


def _row(name, steps, med, fid_vs_fp, size):
    return {"name": name, "steps": steps, "latency_s_per_image": {"median": med}, "fid_vs_fp": fid_vs_fp,
            "size_bytes": size}


class _Reps:
    def paired_ci(self, a, b, metric):
        return [-0.5, 1.5] if metric == "fid_vs_fp" else [0.1, 0.2]


def test_diffpro_is_compared_with_bf16_ddim_at_the_same_steps_and_called_slower_when_it_loses():
    rep = {"rows": [_row("fp32", 50, 2.0, 0.0, 800), _row("bf16", 50, 1.2, 0.5, 400),
                    _row("ddim-25", 25, 1.0, 2.5, 800), _row("bf16-ddim-25", 25, 0.6, 2.7, 400),
                    _row("bf16-ddim-10", 10, 0.2, 9.0, 400), _row("diffpro", 25, 0.5, 3.0, 100)],
           "derived": {"diffpro": {"compression": 8.0}}}
    out = {v["row"]: v for v in versus_step_cut(rep, _Reps())}
    assert set(out) == {"ddim-25", "bf16-ddim-25"}          # bf16 at 50 and bf16-ddim-10: other step counts
    line = out["bf16-ddim-25"]["line"]
    assert "1.20x faster" in line and "bf16" in line and "FID vs fp32 3.00 vs 2.70" in line
    assert "paired Δ +0.30 [-0.50, +1.50], not significant" in line
    assert "4.00x smaller" in line and "8.00x smaller" in out["ddim-25"]["line"]   # against the row's own bytes
    assert strongest_float_baseline(rep)["row"] == "bf16-ddim-25"

    rep["rows"][-1]["latency_s_per_image"]["median"] = 0.8      # bf16 at the same steps beats the plan
    out = {v["row"]: v for v in versus_step_cut(rep)}
    assert "1.33x SLOWER" in out["bf16-ddim-25"]["line"] and "1.25x faster" in out["ddim-25"]["line"]
    best = strongest_float_baseline(rep)
    assert best["row"] == "bf16-ddim-25" and "SLOWER" in best["line"] and best["diffpro_speedup"] == 0.75

    rep["rows"][3]["latency_s_per_image"]["min"], rep["rows"][-1]["latency_s_per_image"]["min"] = 0.5, 0.4
    best = strongest_float_baseline(rep)     # the fastest repeats disagree with the medians: both are shown
    assert best["diffpro_speedup_min"] == 1.25 and "1.33x SLOWER (fastest repeats: 1.25x faster)" in best["line"]
    rep["rows"][3]["latency_s_per_image"]["median"] = 1.5       # emulated bf16: ddim-K is the one to beat
    assert strongest_float_baseline(rep)["row"] == "ddim-25"
    assert strongest_float_baseline({"rows": rep["rows"][:-1]}) is None


def test_bench_reports_the_bf16_rows_beside_diffpro_and_names_the_strongest_float_baseline(tmp_path, monkeypatch):
    # asked with --rows they run even where bf16 is only emulated (and say so)
    monkeypatch.setattr(bench_float, "native_bf16", lambda device="cpu": (False, "no flag (test)"))
    ctx = StageContext.create(SPEC, tmp_path)
    qdir = uniform_checkpoint(ctx.model(), 8, tmp_path / "q")
    cfg = BenchConfig(rows=["fp32", "bf16", "ddim", "bf16-ddim", "diffpro"], reference_steps=6, steps=3,
                      repeats=1, latency_batch=2, memory=False)
    measure_bench(ctx, cfg, quantized=qdir, timesteps=[100, 500, 999])
    rep = json.loads((tmp_path / "bench" / "report.json").read_text())
    rows = {r["name"]: r for r in rep["rows"]}
    assert list(rows) == ["fp32", "bf16", "ddim-3", "bf16-ddim-3", "diffpro"]
    assert set(rows["bf16"]["kernels"]) == {"bf16"} and set(rows["fp32"]["kernels"]) == {"fp32"}
    assert rep["derived"]["bf16"]["compression"] == 2.0 and rows["bf16-ddim-3"]["weight_bits_avg"] == 16.0
    assert any("EMULATED" in n for n in rows["bf16"]["notes"])
    assert [v["row"] for v in rep["versus_step_cut"]] == ["ddim-3", "bf16-ddim-3"]
    best = rep["strongest_float_baseline"]
    faster = min(("ddim-3", "bf16-ddim-3"), key=lambda n: rows[n]["latency_s_per_image"]["median"])
    assert best["row"] == faster and best["steps"] == 3
    md = (tmp_path / "bench" / "report.md").read_text()
    assert f"**Summary:** strongest float baseline at diffpro's 3 steps: {faster}" in md
    assert "diffpro vs bf16-ddim-3 (same 3 steps, float weights computing in bf16)" in md


def test_bench_cli_takes_the_bf16_rows_and_still_rejects_unknown_ones(cli, tmp_path):
    rc, _, err = cli("bench", SPEC, "--rows", "fp32,bf16,bf17", "-w", tmp_path / "a")
    assert rc == 2 and err.startswith("error:") and len(err.strip().splitlines()) == 1 and "bf17" in err
    assert not (tmp_path / "a" / "bench").exists()
    rc, _, err = cli("bench", SPEC, "--rows", "fp32,bf16", "--reference-steps", "2", "--repeats", "1",
                     "--latency-batch", "1", "-w", tmp_path / "b")
    assert rc == 0, err
    rep = json.loads((tmp_path / "b" / "bench" / "report.json").read_text())
    fp, bf = rep["rows"]
    assert bf["name"] == "bf16" and bf["size_bytes"] * 2 == fp["size_bytes"]
    # the fresh-process memory measurement loads the float spec: the bf16 row carries fp32's number, and says so
    assert bf["peak_mem_bytes"] == fp["peak_mem_bytes"] and any("peak memory" in n for n in bf["notes"])
