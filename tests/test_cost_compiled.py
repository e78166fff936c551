"""allocate --compile: the cost table's compiled worlds (planning/costs_compiled.py), the plan solved in
them only, and the checkpoint that records what it was planned for."""

import json

import pytest

import diffpro
from diffpro_cli.planning import costs_compiled
from diffpro_cli.planning.costs import measure_cost_table
from diffpro_cli.planning.options import Option
from diffpro_cli.quant import compiled
from diffpro_cli.stages.allocate import AllocateConfig, plan_worlds
from diffpro_cli.stages.allocate_dtype import plan_per_world

needs_compile = pytest.mark.skipif(not compiled.compiled_available(), reason=f"torch.compile unavailable: {compiled.unavailable_reason()}")


class _UI:
    def __init__(self):
        self.lines, self.warnings = [], []

    def info(self, m):
        self.lines.append(m)

    def warn(self, m):
        self.warnings.append(m)


def _doc(*worlds, unavailable=None):
    return {"worlds": {w: {} for w in worlds}, "compiled_unavailable": unavailable}


def test_plan_worlds_are_the_compiled_ones_with_compile_and_the_eager_ones_without():
    doc = _doc("bfloat16", "compiled-float32", "compiled-bfloat16")
    ui = _UI()
    assert plan_worlds(doc, AllocateConfig(compile=True), ui) == ["compiled-float32", "compiled-bfloat16"]
    # catches: compiled timings leaking into an eager plan (a plan priced for a graph that will not run)
    assert plan_worlds(doc, AllocateConfig(), ui) == ["float32", "bfloat16"]
    assert not ui.warnings
    assert plan_worlds(doc, AllocateConfig(compile=True, latency_source="analytic"), ui) == ["float32"]
    assert len(ui.warnings) == 1 and "analytic" in ui.warnings.pop()   # catches --compile dropped without a word
    # a table without compiled worlds (compile unavailable here): eager plan, and the reason said once
    assert plan_worlds(_doc("bfloat16", unavailable="inductor needs a C++ compiler"), AllocateConfig(compile=True), ui) == ["float32", "bfloat16"]
    assert len(ui.warnings) == 1 and "C++ compiler" in ui.warnings[0] and "eager" in ui.warnings[0]


def _plan(step_ms, float_ms):
    return {"totals": {"latency_ms": step_ms, "error": 0.01}, "execution": {"integer_layers": 3},
            "baseline_check": {"fp32_step_ms": float_ms, "plan_step_ms": step_ms, "verdict": "predicted"}}


def test_a_compiled_world_plan_records_its_dtype_and_world_and_is_checked_against_compiled_float():
    plans = {"compiled-float32": _plan(0.9, 2.2), "compiled-bfloat16": _plan(0.8, 0.95)}
    plan, _ = plan_per_world(lambda w: (dict(plans[w]), None), list(plans), False, _UI())
    # catches: "compiled-bfloat16" written as the compute dtype (the checkpoint loader refuses it)
    assert plan["compute_dtype"] == "bfloat16" and plan["world"] == "compiled-bfloat16"
    assert plan["baseline_check"]["fastest_float_step_ms"] == 0.95
    from diffpro_cli.errors import BudgetError

    def none(w):
        raise BudgetError(f"{w} cannot")
    # catches: the error kept only for a world named float32, so an all-infeasible compiled solve raised None
    with pytest.raises(BudgetError, match="compiled-float32 cannot"):
        plan_per_world(none, list(plans), False, _UI())


def test_compile_unavailable_leaves_the_eager_table_and_says_why(tiny_model, monkeypatch):
    monkeypatch.setattr(costs_compiled, "unavailable_reason", lambda device: "no C++ compiler here")
    doc = measure_cost_table(tiny_model, [Option(8, 8, "dynamic", None)], batch=2, repeats=1, bf16=False, compiled=True)
    assert doc["compiled_unavailable"] == "no C++ compiler here"
    assert not any(costs_compiled.is_compiled(w) for w in doc["worlds"])


@needs_compile
def test_allocate_compile_prices_compiled_cells_plans_in_a_compiled_world_and_the_checkpoint_says_so(tmp_path, monkeypatch):
    import torch._dynamo

    w = tmp_path / "w"
    diffpro.profile("random:dit-tiny", w, samples=2, timesteps="999:0:500", batch=2)
    diffpro.score("random:dit-tiny", w)
    import gc
    import weakref

    from torch._inductor import codecache

    loaded, load = [], codecache.PyCodeCache.load_by_key_path.__func__

    def spy(cls, *args, **kwargs):   # every module inductor generates (frozen weights are its constants)
        mod = load(cls, *args, **kwargs)
        loaded.append(weakref.ref(mod))
        return mod
    monkeypatch.setattr(codecache.PyCodeCache, "load_by_key_path", classmethod(spy))
    torch._dynamo.reset()
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    plan = diffpro.allocate("random:dit-tiny", w, budget="avg-bits=9", bits=[8, 16], act_bits=[8], repeats=1, batch=2, compile=True)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"] - before
    # catches the generated modules, and with them the frozen weight copies of every compiled cell and
    # forward, kept for the life of the process (DiT-XL/2: ~9 GB; the bench after it in one `diffpro run`
    # was killed for memory): both inductor's module cache and dynamo's code caches must let go
    gc.collect()
    assert loaded and not [r for r in loaded if r() is not None]
    doc = json.loads((w / "cost_table.json").read_text())
    cworlds = [k for k in doc["worlds"] if costs_compiled.is_compiled(k)]
    assert "compiled-float32" in cworlds and plan["world"] in cworlds
    assert plan["compute_dtype"] == costs_compiled.world_dtype(plan["world"])
    for name in cworlds:
        world = doc["worlds"][name]
        assert set(world["layers"]) == set(doc["layers"])
        timed = [n for n, r in world["layers"].items() if "same_as" not in r]
        for n in timed:   # catches a column left out of the compiled world, or a cell never timed
            assert set(world["layers"][n]["ms"]) == set(doc["layers"][n]["ms"])
            assert world["layers"][n]["ms"]["fp32"] > 0
        assert world["forward_ms"] > 0 and world["remainder_ms"] >= 0
    # every timed cell (and each world's forward) compiled to a graph of its own: catches cells sharing
    # one code object, which past dynamo's recompile limit silently run eager and price eager kernels.
    # (An integer Conv2d keeps its eager kernel in a compiled model too: its cell has no graph.)
    timed = [n for n, r in doc["layers"].items() if "same_as" not in r]
    per_world = len(timed) + sum(doc["layers"][n]["kind"] == "Linear" for n in timed) + 1
    assert len(timed) >= 5 and graphs >= per_world * len(cworlds)
    # measured once: a second plan on the same table compiles nothing again
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    diffpro.allocate("random:dit-tiny", w, budget="avg-bits=10", bits=[8, 16], act_bits=[8], repeats=1, batch=2, compile=True)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == before
    diffpro.quantize("random:dit-tiny", w)
    meta = json.loads(next(w.glob("**/diffpro.json")).read_text())
    assert meta["planned_for"] == plan["world"]   # catches a compiled plan whose checkpoint forgets it (bench's note)


def test_a_previous_tables_compiled_worlds_are_dropped_when_new_columns_are_timed_without_compile(tiny_model):
    opts = [Option(8, 8, "dynamic", None)]
    doc = measure_cost_table(tiny_model, opts, batch=2, repeats=1, bf16=False)
    doc["worlds"]["compiled-float32"] = {"layers": {}, "forward_ms": 1.0, "remainder_ms": 0.0}
    same = measure_cost_table(tiny_model, opts, batch=2, repeats=1, bf16=False, previous=doc)
    assert "compiled-float32" in same["worlds"]      # nothing retimed: still valid, kept
    more = measure_cost_table(tiny_model, opts + [Option(4, 8, "dynamic", None)], batch=2, repeats=1, bf16=False, previous=doc)
    # catches: a stale compiled world without the new w4a8d column, which a later --compile plan would
    # read as "cost table has no column" instead of timing it again
    assert "compiled-float32" not in more["worlds"]


@pytest.mark.parametrize("compile_rows", [False, True])
def test_bench_notes_a_compiled_plan_benched_eager(tmp_path, compile_rows):
    import torch

    from diffpro_cli.checkpoint import save_quantized
    from diffpro_cli.stages.bench import BenchConfig, build_rows
    from diffpro_cli.stages.context import StageContext

    model = diffpro.load("random:dit-tiny", seed=1)
    name = next(n for n, (m, _) in model.quantizable_layers().items() if isinstance(m, torch.nn.Linear))
    plan = {"layers": {name: {"weight_bits": 8, "act_bits": 8, "act_mode": "dynamic"}},
            "compute_dtype": "float32", "world": "compiled-float32"}
    save_quantized(model, plan, tmp_path / "q", None)
    ctx = StageContext.create("random:dit-tiny", tmp_path / "w", seed=1)
    _, notes = build_rows(ctx, BenchConfig(rows=["diffpro"], compile=compile_rows, steps=2), tmp_path / "q", None)
    # catches a compiled plan's eager bench read as its deployed speed without a word
    assert any("planned for compiled execution" in n for n in notes) is (not compile_rows)
    assert not any("planned for eager execution" in n for n in notes)
    plan["world"] = "float32"
    save_quantized(model, plan, tmp_path / "q", None)
    _, notes = build_rows(ctx, BenchConfig(rows=["diffpro"], compile=compile_rows, steps=2), tmp_path / "q", None)
    assert any("planned for eager execution" in n for n in notes) is compile_rows   # and the other way round


def test_the_cache_section_prices_a_compiled_plan_in_its_compiled_world(tmp_path, monkeypatch):
    """Catches the cache section reading the cost table's world from `compute_dtype` ("float32") for a
    plan priced in "compiled-float32": eager float times and remainder against the plan's compiled step."""
    from diffpro_cli.planning import costs
    from diffpro_cli.stages.allocate_cache import joint_cache_section
    from diffpro_cli.stages.context import StageContext

    asked = []

    class Stop(Exception):
        pass

    def record(doc, world):
        asked.append(world)
        raise Stop
    monkeypatch.setattr(costs, "world_table", record)
    ctx = StageContext.create("random:dit-tiny", tmp_path, seed=1)
    plan = {"layers": {}, "timesteps": [0, 500, 999], "compute_dtype": "float32", "world": "compiled-float32",
            "totals": {"latency_ms": 1.0}}
    with pytest.raises(Stop):
        joint_cache_section(ctx, AllocateConfig(cache=True, compile=True), plan, {"worlds": {}}, None)
    assert asked == ["compiled-float32"]


def test_a_compile_failure_on_the_float_model_plans_eager_with_the_reason(tiny_model, monkeypatch):
    """Catches an inductor/C++ failure on a float cell surfacing as a traceback (not one warning), and a
    previous table's compiled worlds kept after new columns were timed where compile no longer runs."""
    def broken(*a, **k):
        raise RuntimeError("C++ compile failed: cc1plus killed")
    monkeypatch.setattr(costs_compiled, "_compiled_cell", broken)
    monkeypatch.setattr(costs_compiled, "unavailable_reason", lambda device: None)
    opts = [Option(8, 8, "dynamic", None)]
    doc = measure_cost_table(tiny_model, opts, batch=2, repeats=1, bf16=False)
    doc["worlds"]["compiled-float32"] = {"layers": {}, "forward_ms": 1.0, "remainder_ms": 0.0}
    more = measure_cost_table(tiny_model, opts + [Option(4, 8, "dynamic", None)], batch=2, repeats=1, bf16=False,
                              previous=doc, compiled=True)
    assert "cc1plus" in more["compiled_unavailable"] and not any(costs_compiled.is_compiled(w) for w in more["worlds"])
    ui = _UI()
    assert plan_worlds(more, AllocateConfig(compile=True), ui) == ["float32"] and "cc1plus" in ui.warnings[0]


def test_api_options_take_a_path_where_the_config_holds_a_str(tmp_path):
    """Catches the option type check refusing cost_table=Path(...), which the stages always accepted."""
    from pathlib import Path

    from diffpro_cli.api import _config

    cfg = _config(AllocateConfig, {"cost_table": Path(tmp_path) / "t.json", "budget": "avg-bits=5"})
    assert cfg.cost_table == str(Path(tmp_path) / "t.json")
    from diffpro_cli.errors import UsageError

    with pytest.raises(UsageError, match="budget"):
        _config(AllocateConfig, {"budget": 4.4})   # still refused: a number where a str belongs
