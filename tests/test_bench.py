import json

import pytest

from diffpro_cli.stages.bench import BenchConfig, measure_bench
from diffpro_cli.stages.comparisons import derived_ratios
from diffpro_cli.stages.context import StageContext

ROW_KEYS = {"name", "weight_bits_avg", "size_bytes", "steps", "latency_s_per_image", "peak_mem_bytes",
            "energy_j_per_image", "fid", "fid_vs_fp", "kernels"}


def test_report_json_and_md_hold_every_row_field_without_quantized_rows(tmp_path):
    cfg = BenchConfig(rows=["fp32", "ddim", "dpmsolver"], reference_steps=6, steps=3, repeats=1, latency_batch=2)
    rep = measure_bench(StageContext.create("builtin:dit-mnist", tmp_path), cfg)
    on_disk = json.loads((tmp_path / "bench" / "report.json").read_text())
    assert on_disk["schema"] == "diffpro.report/1" and on_disk["baseline"] == "fp32"
    assert [r["name"] for r in on_disk["rows"]] == ["fp32", "ddim-3", "dpmsolver-3"]
    for r in on_disk["rows"]:
        assert ROW_KEYS <= set(r)
        lat = r["latency_s_per_image"]
        assert 0 < lat["min"] <= lat["median"] <= lat["max"] and lat["repeats"] == 1  # measured, not a placeholder 0
        assert r["fid"] is None  # not measured → null, never invented
    fp = on_disk["rows"][0]
    n_params = sum(p.numel() for p in __import__("diffpro_cli.loading", fromlist=["x"]).load_model("builtin:dit-mnist").net.parameters())
    assert fp["size_bytes"] >= n_params * 4 and fp["weight_bits_avg"] == 32.0
    assert fp["kernels"] == {"fp32": sum(fp["kernels"].values())} and fp["kernels"]["fp32"] > 10
    assert rep["derived"]["fp32"]["speedup"] == 1.0
    assert on_disk["model"]["untrained"] is False  # the shipped trained weights, not the seeded random fallback
    assert any("FID not measured" in n for n in on_disk["notes"])
    md = (tmp_path / "bench" / "report.md").read_text()
    assert "| fp32 |" in md and (tmp_path / "bench" / "figures" / "latency.png").exists()


def test_derived_ratios_use_the_baseline_row():
    def row(name, med, size, fid):
        return {"name": name, "latency_s_per_image": {"median": med}, "size_bytes": size, "fid": fid}

    rep = {"baseline": "fp32", "rows": [row("fp32", 2.0, 800, 10.0), row("q", 0.5, 100, 12.5), row("x", 1.0, 400, None)]}
    d = derived_ratios(rep)
    assert d["q"] == {"speedup": 4.0, "compression": 8.0, "delta_fid": 2.5}
    assert d["x"]["delta_fid"] is None
    # with the fastest repeats recorded, their ratio too (not the median's, not inverted)
    rep["rows"][0]["latency_s_per_image"]["min"], rep["rows"][1]["latency_s_per_image"]["min"] = 1.5, 0.25
    d = derived_ratios(rep)
    assert d["q"]["speedup"] == 4.0 and d["q"]["speedup_min"] == 6.0 and "speedup_min" not in d["x"]


def test_bench_cli_rejects_unknown_rows_and_fid_of_random_weights(cli, tmp_path):
    rc, _, err = cli("bench", "--rows", "fp32,fp8", "-w", tmp_path / "a")
    assert rc == 2 and err.startswith("error:") and len(err.strip().splitlines()) == 1 and "unknown row" in err
    assert not (tmp_path / "a" / "bench").exists()
    rc, _, err = cli("bench", "random:dit-tiny", "--fid", "--rows", "fp32", "-w", tmp_path / "b")
    assert rc == 2 and err.startswith("error:") and len(err.strip().splitlines()) == 1 and "random weights" in err
    assert not (tmp_path / "b" / "bench" / "report.json").exists()


def test_versus_step_cut_compares_diffpro_with_float_rows_at_the_same_steps_only():
    from diffpro_cli.stages.comparisons import versus_step_cut

    def row(name, steps, med, fid_vs_fp):
        return {"name": name, "steps": steps, "latency_s_per_image": {"median": med}, "fid_vs_fp": fid_vs_fp}

    rep = {"rows": [row("fp32", 50, 2.0, 0.0), row("ddim-25", 25, 1.0, 2.5), row("ddim-10", 10, 0.4, 9.0),
                    row("fp32-subset-25", 25, 1.0, 2.0), row("diffpro", 25, 0.5, 6.0)],
           "derived": {"diffpro": {"compression": 7.1}}}
    out = {v["row"]: v for v in versus_step_cut(rep)}
    assert set(out) == {"ddim-25", "fp32-subset-25"}          # ddim-10 has another step count
    assert out["ddim-25"]["speedup"] == 2.0 and "2.00x faster" in out["ddim-25"]["line"]
    assert "FID vs fp32 6.00 vs 2.50" in out["ddim-25"]["line"]
    rep["rows"][-1]["latency_s_per_image"]["median"] = 1.25    # quantized compute slower than float here
    assert "SLOWER" in versus_step_cut(rep)[0]["line"]
    assert versus_step_cut({"rows": rep["rows"][:-1], "derived": {}}) == []


def test_versus_cache_compares_diffpro_with_every_cache_row_whatever_its_steps():
    """Catches: the joint plan's cache claim checked only against the float step cut (the cache rows
    left out of the comparison), or a non-cache row (w8a8-uniform, ddim-K) mixed into it."""
    from diffpro_cli.stages.comparisons import versus_cache

    def row(name, steps, med, fid_vs_fp):
        return {"name": name, "steps": steps, "latency_s_per_image": {"median": med}, "fid_vs_fp": fid_vs_fp}

    rep = {"rows": [row("fp32", 50, 2.0, 0.0), row("ddim-25", 25, 1.0, 2.5), row("w8a8-uniform", 50, 1.2, 3.0),
                    row("cache-only", 50, 1.3, 1.0), row("fbcache-0.08", 50, 1.0, 9.0), row("deepcache-2", 50, 1.1, 4.0),
                    row("diffpro-nocache", 25, 0.6, 6.0), row("diffpro", 25, 0.5, 6.1)],
           "derived": {"diffpro": {"compression": 7.1}}}
    out = {v["row"]: v for v in versus_cache(rep)}
    assert set(out) == {"cache-only", "fbcache-0.08", "deepcache-2", "diffpro-nocache"}
    assert out["diffpro-nocache"]["speedup"] == pytest.approx(1.2) and "without its cache" in out["diffpro-nocache"]["line"]
    assert out["diffpro-nocache"]["delta_fid_vs_fp"] == pytest.approx(0.1)
    rep["rows"][-1]["latency_s_per_image"]["median"] = 0.7
    assert "SLOWER" in {v["row"]: v for v in versus_cache(rep)}["diffpro-nocache"]["line"]


def test_compile_rows_keeps_every_row_eager_with_one_note_where_compile_is_unavailable(monkeypatch):
    from diffpro_cli.quant import compiled
    from diffpro_cli.stages.bench import Row
    from diffpro_cli.stages.bench_compile import compile_rows

    monkeypatch.setattr(compiled, "unavailable_reason", lambda: "no C++ compiler")
    model = object()
    rows = [Row("fp32", model, [0], 1, 1, 32.0, "a"), Row("ddim-1", model, [0], 1, 1, 32.0, "b")]
    note = compile_rows(rows)
    assert "unavailable (no C++ compiler)" in note and all(r.model is model for r in rows)


def test_compile_rows_compiles_each_distinct_model_once_float_rows_included(monkeypatch):
    from diffpro_cli.quant import compiled
    from diffpro_cli.stages.bench import Row
    from diffpro_cli.stages.bench_compile import compile_rows

    calls = []
    monkeypatch.setattr(compiled, "unavailable_reason", lambda: None)
    monkeypatch.setattr(compiled, "compile_model", lambda m: calls.append(m) or ("compiled", m))
    fp, q = object(), object()
    rows = [Row("fp32", fp, [0], 1, 1, 32.0, "a"), Row("ddim-1", fp, [0], 1, 1, 32.0, "b"), Row("diffpro", q, [0], 1, 1, 4.0, "c")]
    compile_rows(rows)
    assert calls == [fp, q]
    assert rows[0].model == ("compiled", fp) and rows[1].model is rows[0].model and rows[2].model == ("compiled", q)


@pytest.mark.parametrize("triton", [True, False])
def test_compile_rows_on_a_gpu_uses_the_cuda_compile_for_every_row(monkeypatch, triton):
    """bench --compile --device cuda said 'not available on cuda yet' and ran every row eager. Catches: a GPU
    run compiled with the CPU's oneDNN path (its packed weights are CPU-only), a cached row left eager or
    compiled whole, a missing triton not said, a note that did not say the memory rows ran eager (a fresh
    eager process, as on the CPU, whose note says so)."""
    from types import SimpleNamespace

    from diffpro_cli.quant import compiled, compiled_cuda
    from diffpro_cli.stages.bench import Row
    from diffpro_cli.stages.bench_compile import compile_rows

    calls = []
    monkeypatch.setattr(compiled_cuda, "unavailable_reason", lambda device_type="cuda": None if triton else "no triton")
    monkeypatch.setattr(compiled_cuda, "compile_model", lambda m, device: calls.append(("model", m, device)) or ("compiled", m))
    monkeypatch.setattr(compiled_cuda, "compile_regions", lambda blocks, device: calls.append(("regions", len(blocks), device)))
    monkeypatch.setattr(compiled, "compile_model", lambda m: pytest.fail("the CPU compile path ran for a GPU run"))
    monkeypatch.setattr("diffpro_cli.cache.unit_modules", lambda net: [[object()], [object()]])
    fp, q = SimpleNamespace(net=None), SimpleNamespace(net=None)
    rows = [Row("fp32", fp, [0], 1, 1, 32.0, "a"), Row("diffpro", q, [0], 1, 1, 4.0, "c"),
            Row("cache-only", fp, [0], 1, 1, 32.0, "d", cache=object())]
    note = compile_rows(rows, "cuda")
    if not triton:
        assert note == "compile requested but unavailable (no triton): every row ran eager" and not calls
        return
    assert calls == [("model", fp, "cuda"), ("model", q, "cuda"), ("regions", 2, "cuda")]
    assert rows[0].model == ("compiled", fp) and rows[2].model is fp
    assert "on cuda" in note and "UNVERIFIED" in note and "cache-only" in note
    assert "memory rows ran eager" in note   # peak memory comes from a fresh eager process on a GPU too


def test_steps_note_states_the_paired_difference_and_its_significance():
    from diffpro_cli.stages.comparisons import steps_note

    p = {"n": 16, "mean_uniform_minus_selected": 1.5e-4, "ci95": [2e-5, 3e-4], "wins": 12, "losses": 4,
         "sign_test_p": 0.077, "significant": True}
    line = steps_note(p)
    assert "16 calibration samples" in line and "12 wins / 4 losses" in line and "(significant)" in line
    assert "not significant" in steps_note({**p, "ci95": [-1e-5, 3e-4], "significant": False})


def test_report_device_says_which_isa_the_kernels_ran_on(monkeypatch):
    """A report must say whether its integer rows ran VNNI or AVX2 code (and under which cap), or its speed-ups
    cannot be placed. Catches: the ISA left out of report.json / the Device line; a cap (the AVX2 emulation
    variables) not recorded, so an emulated run reads as a real VNNI one."""
    from diffpro_cli.quant import kernels
    from diffpro_cli.report import isa_text
    from diffpro_cli.stages.bench import device_info

    monkeypatch.delenv("FBGEMM_ENABLE_INSTRUCTIONS", raising=False)
    for name in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY"):
        monkeypatch.delenv(name, raising=False)
    kernels.cpu_has_vnni.cache_clear()
    plain = device_info("cpu")
    assert plain["isa_cap"] is None and plain["integer_kernels"] == ("VNNI" if kernels.cpu_has_vnni() else "pre-VNNI (AVX2 vpmaddubsw)")
    monkeypatch.setenv("FBGEMM_ENABLE_INSTRUCTIONS", "AVX2")
    kernels.cpu_has_vnni.cache_clear()
    try:
        capped = device_info("cpu")
    finally:
        kernels.cpu_has_vnni.cache_clear()
    assert capped["isa_cap"] == "FBGEMM_ENABLE_INSTRUCTIONS=AVX2" and capped["integer_kernels"].startswith("pre-VNNI")
    assert capped["isa_flags"] == plain["isa_flags"]          # the CPU's flags, whatever the cap
    line = isa_text(capped)
    assert "integer kernels pre-VNNI" in line and "capped by FBGEMM_ENABLE_INSTRUCTIONS=AVX2" in line
    assert isa_text({"kind": "cuda", "name": "GPU"}) == ""    # GPU reports and old reports: nothing to say


def test_bench_refuses_a_quantized_checkpoint_given_as_the_float_model(cli, tmp_path):
    """Catches `diffpro bench QDIR` ending in the state_dict refusal's Python-API advice (exit 2), or
    before that in a bogus 32-bit "fp32" row of integer layers."""
    import torch

    import diffpro
    from diffpro_cli.checkpoint import save_quantized

    model = diffpro.load("random:dit-tiny", seed=1)
    name = next(n for n, (m, _) in model.quantizable_layers().items() if isinstance(m, torch.nn.Linear))
    save_quantized(model, {"layers": {name: {"weight_bits": 8, "act_bits": 8, "act_mode": "dynamic"}}}, tmp_path / "q", None)
    rc, _, err = cli("bench", tmp_path / "q", "--rows", "fp32", "-w", tmp_path / "w")
    lines = [l for l in err.splitlines() if l.startswith("error:")]
    assert rc == 3 and len(lines) == 1 and "quantized checkpoint" in lines[0] and "--quantized" in lines[0]
    assert not (tmp_path / "w" / "bench" / "report.json").exists()
