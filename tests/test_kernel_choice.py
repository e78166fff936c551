"""Per-layer kernel choice: the cost table times every integer kernel that can run a cell, the plan
names the fastest per layer, and quantize, the checkpoint and diffpro.load run exactly that kernel."""

import json

import pytest
import torch

import diffpro
from diffpro_cli.planning import costs
from diffpro_cli.quant import kernels

FBGEMM, ONEDNN = "cpu-fbgemm-int8", "cpu-onednn-int8"
BOTH = all(kernels.KERNELS[k].usable(type("L", (), {"act_mode": "dynamic", "weight_bits": 8, "group_size": None})(), torch.device("cpu"))
           for k in (FBGEMM, ONEDNN))
pytestmark = pytest.mark.skipif(not BOTH, reason="needs both x86 int8 kernels (fbgemm and oneDNN)")


def _rigged(fast_onednn):
    """interleaved_min_ms stand-in: oneDNN 1 ms and fbgemm 3 ms for layers `fast_onednn` picks, the
    other way round elsewhere; everything else 2 ms."""
    def timing(fns, rounds, advance=lambda n=1: None, device="cpu"):
        out = {}
        for key in fns:
            name, _, kernel = key
            if kernel is None:
                out[key] = 2.0
            else:
                onednn_wins = fast_onednn(name)
                out[key] = 1.0 if (kernel == ONEDNN) == onednn_wins else 3.0
        return out
    return timing


def test_cost_table_keeps_the_faster_kernel_per_cell(monkeypatch):
    # catches: only the registry's default kernel timed, the slower kernel's time kept, or the winner
    # not recorded beside the cell
    model = diffpro.load("random:dit-tiny")
    monkeypatch.setattr(costs, "interleaved_min_ms", _rigged(lambda name: "attn1" in name))
    opts = [costs.Option(8, 8, "dynamic", None)]
    doc = costs.measure_cost_table(model, opts, batch=2, repeats=1, bf16=False)
    rows = doc["layers"]
    attn = [n for n in rows if "attn1.to_q" in n]
    mlp = [n for n in rows if n.endswith("ff.net.2")]
    assert attn and mlp
    for n in attn:
        assert rows[n]["kernel"]["w8a8d"] == ONEDNN and rows[n]["ms"]["w8a8d"] == pytest.approx(1.0 / 2)
    for n in mlp:
        assert rows[n]["kernel"]["w8a8d"] == FBGEMM and rows[n]["ms"]["w8a8d"] == pytest.approx(1.0 / 2)
    assert all("kernel" not in r or "fp32" not in r["kernel"] for r in rows.values())


def test_the_measured_kernel_reaches_the_plan_the_checkpoint_and_the_loaded_model(tmp_path, monkeypatch):
    # catches: the plan's kernel dropped by quantize, not stored in diffpro.json, ignored at load, or a
    # fused q/k/v group splitting because its members were measured with different kernels
    w = tmp_path / "w"
    diffpro.profile("random:dit-tiny", w, samples=2, timesteps="999:0:500", batch=2)
    diffpro.score("random:dit-tiny", w)
    fast = lambda name: "attn1.to_q" in name or "attn1.to_k" in name or "ff.net.2" in name
    monkeypatch.setattr(costs, "interleaved_min_ms", _rigged(fast))
    monkeypatch.setattr(costs, "cell_key", lambda name, *rest: name)   # every layer its own timing (q, k, v differ)
    plan = diffpro.allocate("random:dit-tiny", w, budget="avg-bits=9", bits=[8, 16], act_bits=[8], repeats=1, batch=2)
    integer = {n: e for n, e in plan["layers"].items() if e["weight_bits"] < 16 and e["act_bits"] < 16}
    convs = {n for n in integer if n == "pos_embed.proj"}   # one integer conv kernel: nothing to choose
    assert convs and all("kernel" not in integer[n] for n in convs)
    integer = {n: e for n, e in integer.items() if n not in convs}
    assert integer and all(e.get("kernel") == (ONEDNN if fast(n) else FBGEMM) for n, e in integer.items())
    diffpro.quantize("random:dit-tiny", w)
    records = json.loads((w / "quantized" / "diffpro.json").read_text())["layers"]
    model = diffpro.load(w / "quantized")
    layers = dict(model.net.named_modules())
    for name, entry in integer.items():
        kernel = layers[name].kernel_name.split(":")[0]
        if name.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v"):   # q and k were measured faster on oneDNN, v on fbgemm: the group runs oneDNN
            assert kernel == ONEDNN and layers[name].kernel_name.endswith("+fused3")
        else:
            assert kernel == entry["kernel"], name
            assert records[name]["prefer"] == entry["kernel"]


def test_attach_kernels_skips_float_entries_and_unknown_cells():
    # catches: a float layer or a weight-only one handed an integer kernel name
    view = {"layers": {"a": {"kernel": {"w8a8d": ONEDNN}}, "b": {"kernel": {"w8a8d": ONEDNN}}, "c": {}}}
    entries = {"a": {"weight_bits": 8, "act_bits": 8, "act_mode": "dynamic", "group_size": None},
               "b": {"weight_bits": 8, "act_bits": 16, "act_mode": "dynamic", "group_size": None},
               "c": {"weight_bits": 8, "act_bits": 8, "act_mode": "dynamic", "group_size": None}}
    assert costs.attach_kernels(entries, view) == 1
    assert entries["a"]["kernel"] == ONEDNN and "kernel" not in entries["b"] and "kernel" not in entries["c"]


def test_layers_of_one_shape_share_one_measurement(monkeypatch):
    """A DiT's blocks repeat the same shapes: each distinct (kind, weight, input, activation) cell is built
    and timed once and its rows copied to the other layers (`same_as`), which made a DiT-XL/2's table 28x
    cheaper. Catches: sharing across different shapes (a wrong key), shared rows left without cells, or
    every layer still built and timed."""
    model = diffpro.load("random:dit-tiny")
    timed_names = set()

    def timing(fns, rounds, advance=lambda n=1: None, device="cpu"):
        timed_names.update(k[0] for k in fns)
        return {k: (1.0 if "blocks.0." in k[0] else 5.0) for k in fns}

    monkeypatch.setattr(costs, "interleaved_min_ms", timing)
    doc = costs.measure_cost_table(model, [costs.Option(8, 8, "dynamic", None)], batch=2, repeats=1, bf16=False)
    rows = doc["layers"]
    q0, q1 = "transformer_blocks.0.attn1.to_q", "transformer_blocks.1.attn1.to_q"
    assert rows[q1]["same_as"] == q0 and q1 not in timed_names and q0 in timed_names
    assert rows[q1]["ms"] == rows[q0]["ms"] and rows[q1]["kernel"] == rows[q0]["kernel"]
    shapes = {}
    for name, row in rows.items():
        lead = row.get("same_as", name)
        assert row["input_shape"] == rows[lead]["input_shape"] and set(row["ms"]) == set(rows[lead]["ms"])
        shapes.setdefault(lead, set()).add(name)
    assert "same_as" not in rows["pos_embed.proj"]          # the only conv: its own cell
    assert len(timed_names - {"__forward__"}) == len(shapes) < len(rows)


@pytest.mark.parametrize("amx", [True, False])
def test_default_linear_kernel_follows_amx(monkeypatch, amx):
    """Without a measured choice, an AMX CPU runs large W8A8 Linear layers on oneDNN (its AMX int8 tiles:
    1.4-2.3x fbgemm on DiT-XL/2 shapes, docs/results.md session 17), small ones and other CPUs keep
    fbgemm; a named kernel still wins.
    Catches the registry's fbgemm-first order ignoring AMX (uniform baselines and quantize --bits ran
    the slower kernel there)."""
    from diffpro_cli.quant.layers import QuantLinear

    monkeypatch.setattr(kernels, "cpu_has_amx_int8", lambda: amx)
    lin = torch.nn.Linear(1024, 1024)   # at AMX_MIN_WEIGHTS: large enough for oneDNN's tiles to pay
    q = QuantLinear.from_float(lin, 8, "dynamic").prepare("cpu")
    assert q.kernel_name.startswith(ONEDNN if amx else FBGEMM)
    small = QuantLinear.from_float(torch.nn.Linear(192, 768), 8, "dynamic").prepare("cpu")   # the built-in's widths
    assert small.kernel_name.startswith(FBGEMM)
    lin = torch.nn.Linear(64, 32)
    named = QuantLinear.from_float(lin, 8, "dynamic")
    named.prefer = FBGEMM
    assert named.prepare("cpu").kernel_name.startswith(FBGEMM)


def test_amx_is_off_under_a_onednn_isa_cap(monkeypatch):
    """ONEDNN_MAX_CPU_ISA below AMX (e.g. the AVX2 emulation env) keeps fbgemm first even on an AMX CPU."""
    kernels.cpu_has_amx_int8.cache_clear()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_VNNI")
    try:
        assert kernels.cpu_has_amx_int8() is False
    finally:
        kernels.cpu_has_amx_int8.cache_clear()


@pytest.mark.parametrize("kernel", [FBGEMM, ONEDNN])
def test_both_linear_kernels_take_an_empty_input(kernel):
    """Zero tokens in, zero tokens out on either kernel: oneDNN's per-tensor scale called amax on the empty
    input and raised (only fbgemm's path had been exercised, until AMX CPUs made oneDNN the default)."""
    from diffpro_cli.quant.layers import QuantLinear

    q = QuantLinear.from_float(torch.nn.Linear(16, 8), 8, "dynamic")
    q.prefer = kernel
    q.prepare("cpu")
    assert q.kernel_name.startswith(kernel)
    assert q(torch.randn(0, 16)).shape == (0, 8) and q(torch.randn(2, 0, 16)).shape == (2, 0, 8)
