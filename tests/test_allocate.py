"""allocate: exact MILP (checked against brute force), budgets, protection, CDF rule, joint plan, CLI errors.

Every test uses a synthetic scores.json and an injected latency function: no model, no kernels.
"""

import dataclasses
import itertools

import numpy as np
import pytest

from diffpro_cli.errors import BudgetError, InputError, UsageError
from diffpro_cli.planning.error_model import error_model
from diffpro_cli.planning.options import Layer, Option, load_layers, make_options, option_bits, parse_budget
from diffpro_cli.planning.solvers import Constraint, build_table, chosen_total, solve_milp
from diffpro_cli.stages.allocate import AllocateConfig, allocate_plan

ROLES = ["patch_embed", "time_embed", "adaln", "attn_qkv", "attn_out", "mlp", "mlp", "final"]


def make_scores(n=len(ROLES), measured=False, seed=0):
    rng = np.random.default_rng(seed)
    layers = {}
    for i in range(n):
        role = ROLES[i % len(ROLES)]
        fi, fo = 32 * int(rng.integers(1, 5)), 32 * int(rng.integers(1, 5))
        tokens = 1 if role in ("time_embed", "adaln") else 16
        d = dict(role=role, kind="Linear", in_features=fi, out_features=fo, params=fi * fo + fo, macs=fi * fo * tokens,
                 combined_score=float(rng.uniform(0.5, 3.0)), cdf=(i + 1) / n, rank=n - i)
        if measured:
            d["measured_error"] = {"4": float(rng.uniform(1e-3, 1e-2)), "8": float(rng.uniform(1e-6, 1e-5))}
        layers[f"blocks.{i}.{role}"] = d
    return {"schema": "diffpro.scores/1", "model": {"spec": "test:synthetic", "sha256": None}, "layers": layers}


def fake_latency(layer: Layer, opt: Option) -> float:
    """Deterministic stand-in for the measured table: fp32 costs 1 unit per weight; int8 GEMMs are faster."""
    base = layer.tokens(1) * layer.weight_numel * 1e-6
    if opt.full_precision:
        return base
    return base * (0.3 if opt.act_bits == 8 else 0.8) * (0.9 if opt.weight_bits <= 4 else 1.0)


def brute_force(table, constraints, allowed):
    """The least error over every combination of allowed options (vectorised enumeration)."""
    per_layer = [np.flatnonzero(allowed[i]) for i in range(len(table.layers))]
    combos = np.array(list(itertools.product(*per_layer)))
    rows = np.arange(len(table.layers))
    ok = np.ones(len(combos), dtype=bool)
    for k in constraints:
        ok &= k.cost[rows, combos].astype(np.float64).sum(axis=1) <= k.limit
    errors = table.error[rows, combos].sum(axis=1)
    return float(errors[ok].min()) if ok.any() else None


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_milp_equals_brute_force(seed):
    scores = make_scores(n=6, measured=seed == 1, seed=seed)
    cfg = AllocateConfig(bits=[2, 4, 8, 16], act_bits=[8, 16], protect=[])
    layers = load_layers(scores)
    table = build_table(layers, make_options(cfg.bits, cfg.act_bits, "dynamic", None), cfg, fake_latency)
    lo_bits = sum(table.bits[i].min() for i in range(len(layers)))
    hi_bits = sum(table.bits[i].max() for i in range(len(layers)))
    lo_lat = sum(np.nanmin(np.where(table.valid[i], table.latency[i], np.nan)) for i in range(len(layers)))
    for frac in (0.1, 0.35, 0.7):
        cons = [Constraint("avg-bits", table.bits, int(lo_bits + frac * (hi_bits - lo_bits))),
                Constraint("latency-ms", table.latency, lo_lat * (1.2 + frac))]
        for rows in (cons[:1], cons[1:], cons):
            sol = solve_milp(table.error, rows, table.valid)
            expected = brute_force(table, rows, table.valid)
            assert sol is not None and sol.status == "optimal"
            assert chosen_total(table.error, sol.choice) == pytest.approx(expected, rel=1e-9, abs=1e-15)
            assert all(chosen_total(k.cost, sol.choice) <= k.limit for k in rows)


@pytest.mark.parametrize("kind", ["avg-bits", "size-mb", "latency-ms"])
def test_budgets_respected_exactly(kind):
    scores = make_scores(n=12, seed=3)
    layers = load_layers(scores)
    cfg = AllocateConfig(float_act=[], protect=[])
    table = build_table(layers, make_options(cfg.bits, cfg.act_bits, "dynamic", None), cfg, fake_latency)
    cost = table.latency if kind == "latency-ms" else table.bits
    lo, hi = (sum(f(cost[i]) for i in range(len(layers))) for f in (np.min, np.max))
    scale = {"avg-bits": 1 / table.params, "size-mb": 1 / 8e6, "latency-ms": 1.0}[kind]
    for frac in (0.0, 0.05, 0.2, 0.5, 0.9):
        v = float(f"{(lo + frac * (hi - lo)) * scale:.6g}") * (1 + 1e-6)
        plan, _ = allocate_plan(scores, AllocateConfig(float_act=[], budget=f"{kind}={v}", protect=[]), latency_fn=fake_latency)
        t = plan["totals"]
        got = {"avg-bits": t["avg_bits"], "size-mb": (t["bytes"] + t["other_bytes"]) / 1e6, "latency-ms": t["latency_ms"]}[kind]
        assert got <= v
        # totals are recomputed from the layer entries, not copied from the solver
        assert t["bytes"] == sum(l["bytes"] for l in plan["layers"].values())
        assert plan["solver"]["method"] == "milp" and plan["solver"]["status"] == "optimal"


def test_size_conventions():
    layer = Layer("l", "mlp", "Linear", in_features=256, out_features=64, params=256 * 64 + 64, macs=0,
                  score=1.0, cdf=0.5, measured={})
    assert option_bits(layer, Option(16, 16, "dynamic", None)) == 32 * layer.params          # fp kept as fp32
    # packed weights + fp16 scales (one per channel or group) + fp32 bias
    assert option_bits(layer, Option(4, 8, "dynamic", None)) == 256 * 64 * 4 + 16 * 64 + 32 * 64
    assert option_bits(layer, Option(4, 8, "dynamic", 128)) == 256 * 64 * 4 + 16 * 64 * 2 + 32 * 64
    plan, _ = allocate_plan({"schema": "diffpro.scores/1", "model": {"spec": "x"}, "layers": {"l": {
        "role": "mlp", "in_features": 256, "out_features": 64, "params": layer.params, "combined_score": 1.0, "cdf": 1.0}}},
        AllocateConfig(budget="avg-bits=40", bits=[16], act_bits=[16]))
    assert plan["totals"]["avg_bits"] == 32.0


def test_error_model_extrapolates_measured_by_four_per_bit():
    layer = Layer("l", "mlp", "Linear", 8, 8, 72, 0, score=-1.0, cdf=0.5, measured={4: 1e-2, 8: 1e-5})
    name, e = error_model([layer])
    assert "measured" in name
    assert e(layer, 4) == 1e-2 and e(layer, 8) == 1e-5
    assert e(layer, 3) == pytest.approx(4e-2) and e(layer, 10) == pytest.approx(1e-5 / 16)
    assert e(layer, 6) == pytest.approx((1e-2 * 1e-5) ** 0.5)        # log-linear between measured widths
    assert e(layer, 16) == 0.0
    no_measure = Layer("m", "mlp", "Linear", 8, 8, 72, 0, score=-1.0, cdf=0.25, measured={})
    name, e = error_model([no_measure])                  # a negative (z-scored) score falls back to the CDF
    assert name.startswith("cdf") and e(no_measure, 4) == pytest.approx(0.25 / 256)
    with pytest.raises(InputError):
        error_model([no_measure], "measured")


def test_protection_kept_when_affordable_and_relaxed_when_forced():
    scores = make_scores(n=8, seed=4)
    protected = {"patch_embed", "time_embed", "class_embed", "adaln", "final"}
    plan, _ = allocate_plan(scores, AllocateConfig(budget="avg-bits=7.5"), latency_fn=fake_latency)
    for entry in plan["layers"].values():
        if entry["role"] in protected:
            assert entry["weight_bits"] >= 8 and entry["protected"]
    assert plan["solver"]["protected_relaxed"] == 0
    assert any(e["weight_bits"] == 4 for e in plan["layers"].values())
    # the smallest feasible budget puts every layer at 4 bits, protected ones too
    with pytest.raises(BudgetError) as exc:
        allocate_plan(scores, AllocateConfig(budget="avg-bits=1"), latency_fn=fake_latency)
    need = float(str(exc.value).split("avg-bits=")[2].split(" ")[0])
    plan, _ = allocate_plan(scores, AllocateConfig(budget=f"avg-bits={need}"), latency_fn=fake_latency)
    assert plan["solver"]["protected_relaxed"] > 0 and plan["totals"]["avg_bits"] <= need


def test_cdf_rule_within_budget_and_never_better_than_milp():
    scores = make_scores(n=10, seed=5)
    for v in (5.5, 6.5, 9.0):
        milp, _ = allocate_plan(scores, AllocateConfig(budget=f"avg-bits={v}", protect=[]), latency_fn=fake_latency)
        cdf, _ = allocate_plan(scores, AllocateConfig(budget=f"avg-bits={v}", protect=[], method="cdf"), latency_fn=fake_latency)
        assert cdf["solver"]["method"] == "cdf" and cdf["totals"]["avg_bits"] <= v
        assert milp["totals"]["error"] <= cdf["totals"]["error"] + 1e-15
        assert milp["comparison"]["cdf"]["error"] == pytest.approx(cdf["totals"]["error"])


def test_joint_plan_picks_steps_and_bits_under_total_latency():
    scores = make_scores(n=8, seed=6)
    ts = {"schema": "diffpro.timesteps/1", "timesteps": list(range(0, 1000, 100)), "drift": 0.05,
          "sweep": [{"steps": k, "timesteps": list(range(0, 1000, 1000 // k)), "drift": 0.5 / k} for k in (5, 10, 20, 40)]}
    per_step_fp = sum(fake_latency(l, Option(16, 16, "dynamic", None)) for l in load_layers(scores))
    budget = 20 * per_step_fp * 0.5        # 20 full-precision steps do not fit; quantized ones may
    cfg = AllocateConfig(latency_budget=budget, steps="auto", quant_weight=1.0, protect=[])
    plan, _ = allocate_plan(scores, cfg, latency_fn=fake_latency, timesteps=ts, remainder_ms=0.001)
    joint = plan["joint"]
    assert joint["total_latency_ms"] <= budget
    assert plan["timesteps"] == next(s["timesteps"] for s in ts["sweep"] if s["steps"] == joint["steps"])
    feasible = [c for c in joint["candidates"] if c["feasible"]]
    assert joint["combined_error"] == min(c["combined_error"] for c in feasible)
    assert any(not c["feasible"] for c in joint["candidates"])      # 40 steps cannot fit
    with pytest.raises(BudgetError, match="smallest feasible"):
        allocate_plan(scores, AllocateConfig(latency_budget=budget / 1000, steps="auto"), latency_fn=fake_latency, timesteps=ts)
    with pytest.raises(UsageError):
        allocate_plan(scores, AllocateConfig(latency_budget=budget), latency_fn=fake_latency)   # no steps source


def test_bad_budget_strings():
    # "avg-bits=6_0" catches Python's float reading the underscore typo as a ten times larger budget (60)
    for text in ("avg-bits", "bits=4", "avg-bits=-1", "latency-ms=abc", "avg-bits=6_0"):
        with pytest.raises(UsageError):
            parse_budget(text)


# ---------------------------------------------------------------------------------------------
# CLI and stage: one error line, nothing written, lock skip, Pareto output
# ---------------------------------------------------------------------------------------------


def test_float_execution_wins_where_the_integer_kernel_is_slower():
    """No latency budget: each stored width runs its faster path. Layers 0-3 have an integer kernel slower
    than float (as small GEMMs and convs on AVX2), the others a faster one."""
    scores = make_scores(measured=True)
    slow_int = {name for i, name in enumerate(scores["layers"]) if i < 4}

    def latency(layer, opt):
        base = layer.weight_numel * 1e-6
        if opt.full_precision or opt.act_bits == 16:
            return base
        return base * (1.3 if layer.name in slow_int else 0.4)

    plan, _ = allocate_plan(scores, AllocateConfig(float_act=[], budget="avg-bits=6", protect=[]), latency_fn=latency)
    for name, entry in plan["layers"].items():
        if entry["weight_bits"] < 16:
            assert entry["act_bits"] == (16 if name in slow_int else 8), (name, entry)
    assert plan["execution"]["integer_layers"] + plan["execution"]["float_from_int_layers"] + plan["execution"]["fp32_layers"] == len(ROLES)
    assert plan["baseline_check"]["speedup_vs_float_same_steps"] >= 1.0

    # nothing pays: every quantized layer computes in float and the plan says so
    plan, _ = allocate_plan(scores, AllocateConfig(float_act=[], budget="avg-bits=6", protect=[]),
                            latency_fn=lambda layer, opt: 1.0 if opt.act_bits == 16 else 1.5)
    assert plan["execution"]["integer_layers"] == 0
    assert "no integer kernel beats float" in plan["baseline_check"]["verdict"]


def test_latency_fraction_budget_chooses_steps_and_names_the_cheapest_feasible():
    scores = make_scores(measured=True)
    sweep = [{"steps": k, "timesteps": list(range(0, 1000, 1000 // k)), "drift": 1.0 / k} for k in (10, 20, 25)]
    ts = {"timesteps": sweep[-1]["timesteps"], "sweep": sweep}
    fp_step = sum(fake_latency(l, Option(16, 16, "dynamic", None)) for l in load_layers(scores))
    plan, _ = allocate_plan(scores, AllocateConfig(budget="avg-bits=8,latency=0.4", full_steps=50, protect=[]),
                            latency_fn=fake_latency, timesteps=ts)
    assert plan["joint"]["total_latency_ms"] <= 0.4 * 50 * fp_step + 1e-12
    assert plan["totals"]["avg_bits"] <= 8 + 1e-9
    # 25 steps of fp32 = 0.5 of the 50-step schedule; quantized steps make 25 fit under 0.4
    assert plan["joint"]["steps"] == 25
    with pytest.raises(BudgetError, match=r"latency=0.01 .* smallest feasible is latency=") as err:
        allocate_plan(scores, AllocateConfig(budget="latency=0.01", full_steps=50, protect=[]),
                      latency_fn=fake_latency, timesteps=ts)
    need = float(err.value.message.split("smallest feasible is latency=")[1].split()[0])
    plan, _ = allocate_plan(scores, AllocateConfig(budget=f"latency={need}", full_steps=50, protect=[]),
                            latency_fn=fake_latency, timesteps=ts)      # the named budget is itself feasible
    assert plan["joint"]["steps"] == 10


def test_group_size_that_does_not_divide_a_layer_falls_back_to_per_channel_there():
    scores = make_scores(n=3, measured=True)
    widths = [16, 64, 128]
    for (name, d), w in zip(scores["layers"].items(), widths):
        d.update(in_features=w, params=w * d["out_features"] + d["out_features"])
    layers = load_layers(scores)
    cfg = AllocateConfig(bits=[4, 8], act_bits=[8], group_size=64, protect=[])
    table = build_table(layers, make_options(cfg.bits, cfg.act_bits, "dynamic", cfg.group_size), cfg, None)
    assert table.valid.all()
    j4 = next(j for j, o in enumerate(table.options) if o.weight_bits == 4)
    per_channel = Option(4, 8, "dynamic", None)
    grouped = Option(4, 8, "dynamic", 64)
    assert table.bits[0, j4] == option_bits(layers[0], per_channel)          # 16 % 64 != 0: per channel
    assert table.bits[2, j4] == option_bits(layers[2], grouped) > option_bits(layers[2], per_channel)   # 2 groups
    plan, _ = allocate_plan(scores, AllocateConfig(budget="avg-bits=8", bits=[4, 8], act_bits=[8], group_size=64, protect=[]),
                            latency_fn=None)
    assert plan["layers"][layers[0].name]["group_size"] is None
    assert plan["layers"][layers[2].name]["group_size"] == 64


def test_activation_error_follows_the_cpu_kernels_input_grid(monkeypatch):
    """Without VNNI, 8-bit-weight layers run on a 7-bit input grid: their 8-bit activations cost the "7"
    measurement (or 4x the "8" one when only that was measured); 4-bit-weight layers keep "8"."""
    import diffpro_cli.quant.kernels as kernels
    from diffpro_cli.planning.error_model import activation_error_model

    layer = Layer("l", "mlp", "Linear", 8, 8, 72, 0, score=1.0, cdf=0.5, measured={4: 1e-2, 8: 1e-5},
                  measured_act={7: 5e-3, 8: 1e-3})
    only8 = Layer("m", "mlp", "Linear", 8, 8, 72, 0, score=1.0, cdf=0.5, measured={4: 1e-2, 8: 1e-5}, measured_act={8: 1e-3})
    name, bit_error = error_model([layer, only8])
    for vnni, w8_grid in ((True, 127), (False, 63)):
        monkeypatch.setattr(kernels, "cpu_act_qmax", lambda w, g=None, p=False, v=vnni: 127 if (w <= 6 and not g) or v else 63)
        _, act = activation_error_model([layer, only8], name, bit_error)
        assert act(layer, 8, 4) == 1e-3 and act(only8, 8, 4) == 1e-3 and act(layer, 16, 8) == 0.0
        assert act(layer, 8, 8) == (1e-3 if vnni else 5e-3)
        assert act(only8, 8, 8) == pytest.approx(1e-3 if vnni else 4e-3)


def test_pair_bounded_layers_are_priced_as_quantize_runs_them_without_vnni(monkeypatch):
    """Without VNNI, where score assumed quantize's pair bound (measured_error_pair_bounded), an 8-bit
    per-channel integer option costs the bounded weights' error + the "8" input measurement; where it did
    not (pair bound off), the plain error + the "7" one. Group-wise 8-bit and float activations are not
    bounded: plain error, and the 7-bit grid for the group-wise integer option."""
    import diffpro_cli.quant.kernels as kernels
    from diffpro_cli.planning.error_model import activation_error_model, option_error

    monkeypatch.setattr(kernels, "cpu_has_vnni", lambda: False)
    common = dict(role="mlp", kind="Linear", in_features=128, out_features=8, params=1032, macs=0, score=1.0, cdf=0.5,
                  measured={4: 1e-2, 8: 1e-5}, measured_act={7: 5e-3, 8: 1e-3})
    bounded = Layer("b", **common, measured_pair_bounded={8: 3e-5})
    plain = Layer("p", **common)
    name, bit_error = error_model([bounded, plain])
    act_name, act = activation_error_model([bounded, plain], name, bit_error)
    assert "pair-bounded" in act_name
    err = lambda layer, w, a, g=None: option_error(bit_error, act, layer, Option(w, a, "dynamic", g))  # noqa: E731
    assert err(bounded, 8, 8) == pytest.approx(3e-5 + 1e-3)       # bounded weights, 8-bit grid
    assert err(plain, 8, 8) == pytest.approx(1e-5 + 5e-3)         # pair bound off: 7-bit grid, plain weights
    assert err(bounded, 8, 16) == pytest.approx(1e-5)             # float activations: nothing bounded
    assert err(bounded, 8, 8, 64) == pytest.approx(1e-5 + 5e-3)   # group-wise: not bounded, 7-bit grid
    assert err(bounded, 4, 8) == pytest.approx(1e-2 + 1e-3)       # 4-bit per-channel: 8-bit grid anyway
    monkeypatch.setattr(kernels, "cpu_has_vnni", lambda: True)    # VNNI: one grid, weights as measured
    assert option_error(bit_error, act, plain, Option(8, 8, "dynamic", None)) == pytest.approx(1e-5 + 1e-3)


def test_plan_records_the_pair_bound_assumption_of_its_scores(monkeypatch):
    """plan.json carries scores.json's pair-bound record and how many chosen layers were priced bounded;
    scores without a record (a VNNI CPU that does not bound) give a plan without one, as before."""
    import diffpro_cli.quant.kernels as kernels

    monkeypatch.setattr(kernels, "cpu_has_vnni", lambda: False)
    scores = make_scores(n=6, measured=True, seed=3)
    cfg = AllocateConfig(float_act=[], budget="avg-bits=9", bits=[8, 16], act_bits=[8], protect=[])
    plan, _ = allocate_plan(scores, cfg, latency_fn=fake_latency)
    assert "pair_bound" not in plan
    record = {"setting": "auto", "assumed": True, "cpu_vnni": False, "rule": "r"}
    scores["pair_bound"] = record
    for d in scores["layers"].values():
        d["measured_act_error"] = {"7": 1e-2, "8": 1e-4}
        d["measured_error_pair_bounded"] = {"8": d["measured_error"]["8"] * 2}
    first = next(iter(scores["layers"]))
    del scores["layers"][first]["measured_error_pair_bounded"]     # a layer the bound does not cover
    plan, _ = allocate_plan(scores, cfg, latency_fn=fake_latency)
    eights = [n for n, e in plan["layers"].items() if e["weight_bits"] == 8 and e["act_bits"] == 8]
    assert first in eights and len(eights) > 1
    assert plan["pair_bound"] == {**record, "source": "scores.json", "priced_bounded_layers": len(eights) - 1}


def test_measured_activation_error_keeps_hard_inputs_float(monkeypatch):
    """A layer whose inputs are costly to quantize (measured_act_error) gets float activations from the
    MILP when --act-bits 8,16 allows it, while --min-speedup keeps the costly GEMMs integer; without the
    measurement the weight curve stands in and it gets 8-bit activations like the rest."""
    import diffpro_cli.quant.kernels as kernels

    monkeypatch.setattr(kernels, "cpu_act_qmax", lambda w, g=None, p=False: 127)   # a VNNI CPU: the "8" measurement applies as is
    scores = make_scores(n=6, measured=True, seed=3)
    hard = "blocks.4.attn_out"
    for name, d in scores["layers"].items():
        d["measured_act_error"] = {"8": 1e-1 if name == hard else 1e-7}
    cfg = AllocateConfig(float_act=[], budget="avg-bits=6", bits=[4, 8, 16], act_bits=[8, 16], protect=[], min_speedup=2.0)
    plan, _ = allocate_plan(scores, cfg, latency_fn=fake_latency)
    assert plan["layers"][hard]["act_bits"] == 16
    assert any(e["act_bits"] == 8 for e in plan["layers"].values())     # the speed floor binds elsewhere
    assert "measured_act_error" in plan["error_model"] and plan["min_speedup"] == 2.0
    assert plan["totals"]["predicted_speedup"] >= 2.0
    table = build_table(load_layers(scores), make_options([4], [8], "dynamic", None), cfg, None)
    row = [l.name for l in table.layers].index(hard)
    assert table.error[row, 0] == pytest.approx(scores["layers"][hard]["measured_error"]["4"] + 1e-1)
    no_floor, _ = allocate_plan(scores, AllocateConfig(**{**cfg.as_dict(), "min_speedup": None}), latency_fn=fake_latency)
    # no latency budget: every quantized layer runs its faster path (here the integer kernel, 0.3 vs 0.8)
    assert all(e["act_bits"] == 8 for e in no_floor["layers"].values() if e["weight_bits"] < 16)
    assert no_floor["execution"]["rule"].startswith("fastest measured path")
    for d in scores["layers"].values():
        del d["measured_act_error"]
    plan, _ = allocate_plan(scores, cfg, latency_fn=fake_latency)
    assert plan["layers"][hard]["act_bits"] == 8
    assert "as the weights'" in plan["error_model"]


def test_min_speedup_infeasible_and_bad_values():
    scores = make_scores(n=6, measured=True, seed=3)
    with pytest.raises(BudgetError, match="fastest plan .* is 3.7x"):
        allocate_plan(scores, AllocateConfig(float_act=[], budget="avg-bits=6", min_speedup=5.0, protect=[]), latency_fn=fake_latency)
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(UsageError, match="--min-speedup"):
            allocate_plan(scores, AllocateConfig(float_act=[], budget="avg-bits=6", min_speedup=bad), latency_fn=fake_latency)
    with pytest.raises(UsageError, match="cost table"):
        allocate_plan(scores, AllocateConfig(float_act=[], budget="avg-bits=6", min_speedup=1.5), latency_fn=None)


def test_float_act_roles_compute_on_float_activations_only_where_float_compute_is_offered():
    """Default --float-act: the patch embedding and final layer may not take an 8-bit-activation option
    when float compute from the same stored width is an option (catches the rule being dropped, hitting
    other roles, or making a plan infeasible when 16 is not among --act-bits)."""
    scores = make_scores(measured=True)
    plan, _ = allocate_plan(scores, AllocateConfig(budget="avg-bits=6", protect=[]), latency_fn=fake_latency)
    for name, entry in plan["layers"].items():
        if entry["weight_bits"] < 16:
            expect = 16 if entry["role"] in ("patch_embed", "final") else 8   # fake_latency: integer is faster
            assert entry["act_bits"] == expect, (name, entry)
    only_int, _ = allocate_plan(scores, AllocateConfig(budget="avg-bits=6", protect=[], act_bits=[8]), latency_fn=fake_latency)
    assert all(e["act_bits"] == 8 for e in only_int["layers"].values() if e["weight_bits"] < 16)
    with pytest.raises(UsageError, match="--float-act nope"):
        allocate_plan(scores, AllocateConfig(budget="avg-bits=6", float_act=["nope"]), latency_fn=fake_latency)


def test_size_budget_counts_the_rest_of_the_checkpoint(tmp_path):
    """Catches: a size-mb budget that prices only the planned layers, so the written checkpoint (buffers,
    schedule, header on top) is larger than the budget the user asked for."""
    import diffpro
    from diffpro_cli.stages.bench import checkpoint_info

    w = tmp_path / "w"
    prof = diffpro.profile("random:dit-tiny", w, samples=2, timesteps="999:0:500", batch=2)
    assert prof["checkpoint_other_bytes"] > 0
    diffpro.score("random:dit-tiny", w)
    sizes = {}
    for bits in (4, 8):
        diffpro.quantize("random:dit-tiny", w, bits=bits, out_dir=tmp_path / f"u{bits}", float_act=[])
        sizes[bits] = checkpoint_info(tmp_path / f"u{bits}")["size_bytes"]
    budget = sizes[4] + 0.3 * (sizes[8] - sizes[4])
    plan = diffpro.allocate("random:dit-tiny", w, budget=f"size-mb={budget / 1e6:.6f}", bits=[4, 8], act_bits=[8],
                            latency_source="analytic", remainder_ms=0.0, repeats=1, batch=2)
    assert plan["totals"]["bytes"] + plan["totals"]["other_bytes"] <= budget
    diffpro.quantize("random:dit-tiny", w)
    written = checkpoint_info(w / "quantized")["size_bytes"]
    assert written <= budget
    # the header is estimated, everything else is exact: prediction and file agree closely
    assert abs(plan["totals"]["bytes"] + plan["totals"]["other_bytes"] - written) < 0.01 * written


def test_solver_noise_on_the_native_stdout_never_reaches_stdout(monkeypatch, capfd):
    """Catches: HiGHS's stray debug lines (written by C code to fd 1 during some MILP solves, e.g.
    "HighsMipSolverData::transformNewIntegerFeasibleSolution") landing in stdout, where they corrupt
    `diffpro allocate --json` for scripts. The fake solver writes to fd 1 as the C library does."""
    import os

    import scipy.optimize

    from diffpro_cli.planning.solvers import Constraint, solve_milp

    real = scipy.optimize.milp

    def noisy(*args, **kwargs):
        os.write(1, b"HighsMipSolverData::transformNewIntegerFeasibleSolution tmpSolver.run();\n")
        return real(*args, **kwargs)

    monkeypatch.setattr(scipy.optimize, "milp", noisy)
    error = np.array([[1.0, 0.0], [2.0, 0.0]])
    sol = solve_milp(error, [Constraint("bits", np.array([[4, 8], [4, 8]]), 12)], np.ones((2, 2), dtype=bool))
    print("after")
    out = capfd.readouterr().out
    assert sol is not None and sorted(sol.choice) == [0, 1]      # one layer may take the 8-bit option
    assert "Highs" not in out and out == "after\n"              # stdout itself still works afterwards


def test_min_speedup_is_against_the_fastest_float_when_given_one():
    """With a bf16 world, --min-speedup must hold against the fastest float this machine runs, not the plan's
    own float32 float (a '1.1x' plan was 2.6x slower than bf16 float alone). Catches: the reference ignored;
    an infeasible floor whose message names the wrong baseline."""
    scores = make_scores(n=6, measured=True, seed=3)
    cfg = AllocateConfig(float_act=[], budget="avg-bits=6", bits=[4, 8, 16], act_bits=[8, 16], protect=[], min_speedup=1.5)
    own, _ = allocate_plan(scores, cfg, latency_fn=fake_latency)
    fp_step = own["baseline_check"]["fp32_step_ms"]
    same, _ = allocate_plan(scores, cfg, latency_fn=fake_latency, reference_float_ms=fp_step)
    assert same["layers"] == own["layers"]                      # the same reference: the same plan
    faster = fp_step / 2                                        # a float twice as fast elsewhere (bf16)
    plan, _ = allocate_plan(scores, cfg, latency_fn=fake_latency, reference_float_ms=faster)
    assert plan["totals"]["latency_ms"] <= faster / 1.5 + 1e-9 < own["totals"]["latency_ms"]
    with pytest.raises(BudgetError, match=rf"1.85x the fastest float step \({faster:.3g} ms\)"):
        allocate_plan(scores, dataclasses.replace(cfg, min_speedup=2.0), latency_fn=fake_latency, reference_float_ms=faster)
