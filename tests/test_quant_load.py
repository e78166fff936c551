"""Loading quantized checkpoints lean: plain-read tensors, packed layers with their integers released,
int8 embedding tables, chunked unpacking."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffpro_cli.errors import InputError, UsageError
from diffpro_cli.quant import formats
from diffpro_cli.quant.checkpoint import TensorFile, load_quantized, save_quantized
from diffpro_cli.quant.layers import Int8Embedding, _QuantBase
from test_quant import _inputs


def test_tensor_file_reads_what_safetensors_wrote(tmp_path):
    tensors = {"f32": torch.randn(3, 5), "f64": torch.randn(4, dtype=torch.float64), "i8": torch.randint(-128, 127, (7, 3), dtype=torch.int8),
               "u8": torch.randint(0, 255, (9,), dtype=torch.uint8), "i64": torch.arange(5), "f16": torch.randn(2, 2).half(),
               "bf16": torch.randn(3).bfloat16(), "b": torch.tensor([True, False, True]), "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4)}
    save_file(tensors, str(tmp_path / "t.safetensors"), metadata={"k": "v"})
    expected = load_file(str(tmp_path / "t.safetensors"))
    with TensorFile(tmp_path / "t.safetensors") as f:
        assert sorted(f.keys()) == sorted(tensors)
        for name, value in expected.items():
            got = f.get(name)
            assert got.dtype == value.dtype and got.shape == value.shape and torch.equal(got, value), name
        with pytest.raises(InputError, match="expected"):
            f.get("f32", like=torch.zeros(5, 3))
        with pytest.raises(InputError, match="missing"):
            f.get("nope")


def test_tensor_file_refuses_truncated_and_garbage_files(tmp_path):
    save_file({"w": torch.randn(64, 64)}, str(tmp_path / "t.safetensors"))
    data = (tmp_path / "t.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-100])
    with TensorFile(tmp_path / "cut.safetensors") as f, pytest.raises(InputError, match="ends inside"):
        f.get("w")
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(InputError, match="not a readable safetensors"):
        TensorFile(tmp_path / "junk.safetensors")


@pytest.mark.parametrize("bits", formats.STORAGE_BITS)
def test_chunked_unpack_equals_one_pass(bits):
    qmax = formats.qmax_for(bits)
    q = torch.randint(-qmax - 1, qmax + 1, (12345,), dtype=torch.int8)
    packed = formats.pack_bits(q, bits)
    assert torch.equal(formats.unpack_bits(packed, bits, q.numel(), chunk_groups=7), q)
    assert torch.equal(formats.unpack_bits(packed, bits, q.numel()), q)


def test_int8_embedding_equals_dequantized_table():
    table = torch.randn(11, 24)
    q, scale = formats.quantize_weight(table, 8)
    emb = Int8Embedding(q, scale)
    idx = torch.tensor([0, 10, 3, 3])
    assert torch.equal(emb(idx), formats.dequantize_weight(q, scale)[idx])


@pytest.mark.parametrize("spec", ["random:dit-tiny", "random:unet-tiny"])
def test_inference_only_load_releases_integers_and_runs_the_same(spec, tmp_path):
    from diffpro_cli.models import load_model
    from diffpro_cli.stages.quantize import uniform_plan

    m = load_model(spec)
    plan = uniform_plan(m, 4)
    save_quantized(m, plan, tmp_path / "q")
    lean = load_quantized(tmp_path / "q")
    full = load_quantized(tmp_path / "q", keep_integers=True)
    lean_layers = [mod for mod in lean.net.modules() if isinstance(mod, _QuantBase)]
    full_layers = [mod for mod in full.net.modules() if isinstance(mod, _QuantBase)]
    assert lean_layers and all(mod.integers_released and mod.qweight.numel() == 0 for mod in lean_layers)
    assert not any(mod.integers_released for mod in full_layers)
    assert [a.storage_bytes() for a in lean_layers] == [b.storage_bytes() for b in full_layers]
    if m.num_classes and spec.startswith("random:dit"):
        assert any(isinstance(mod, Int8Embedding) for mod in lean.net.modules())
        assert not any(isinstance(mod, Int8Embedding) for mod in full.net.modules())
    x, t, y = _inputs(lean)
    with torch.no_grad():
        assert torch.equal(lean.eps(x, t, y), full.eps(x, t, y))
        lean.net.to("cpu")                 # a no-op move keeps the packed kernels
        assert torch.equal(lean.eps(x, t, y), full.eps(x, t, y))
    with pytest.raises(UsageError, match="inference only"):
        lean_layers[0].int_weight()
    with pytest.raises(InputError, match="inference only"):
        save_quantized(lean, None, tmp_path / "again")
    assert not (tmp_path / "again").exists()
    save_quantized(full, None, tmp_path / "again")      # a full load can be saved again
    again = load_quantized(tmp_path / "again")
    with torch.no_grad():
        assert torch.equal(again.eps(x, t, y), full.eps(x, t, y))


def test_checkpoint_missing_a_layer_tensor_is_refused(tmp_path):
    from diffpro_cli.models import load_model
    from diffpro_cli.stages.quantize import uniform_plan

    m = load_model("random:dit-tiny")
    save_quantized(m, uniform_plan(m, 8), tmp_path / "q")
    path = tmp_path / "q" / "model.safetensors"
    tensors = load_file(str(path))
    dropped = next(k for k in tensors if k.endswith(".qweight"))
    del tensors[dropped]
    save_file(tensors, str(path))
    with pytest.raises(InputError, match="missing"):
        load_quantized(tmp_path / "q", verify=False)


# -- GPTQ rounding ---------------------------------------------------------------------------------

def _correlated_inputs(n=512, d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d ** 0.5 + torch.eye(d)
    return torch.randn(n, d, generator=g) @ mix * torch.linspace(0.2, 3.0, d)


@pytest.mark.parametrize("bits,group", [(4, None), (3, None), (4, 8), (8, None)])
def test_gptq_lowers_output_error_on_the_same_grid(bits, group):
    x = _correlated_inputs()
    w = torch.randn(24, 32, generator=torch.Generator().manual_seed(1))
    hessian = (x.double().T @ x.double()) / x.shape[0]
    q_rtn, s_rtn = formats.quantize_weight(w, bits, group)
    q_gptq, s_gptq = formats.gptq_quantize(w, bits, hessian, group)
    assert torch.equal(s_gptq, s_rtn)                        # same scales: same format and kernels
    qmax = formats.qmax_for(bits)
    assert q_gptq.dtype == torch.int8 and int(q_gptq.min()) >= -qmax - 1 and int(q_gptq.max()) <= qmax
    err = lambda q, s: float((x @ (w - formats.dequantize_weight(q, s)).T).pow(2).mean())
    assert err(q_gptq, s_gptq) < 0.9 * err(q_rtn, s_rtn)
    assert not torch.equal(q_gptq, q_rtn)


def test_gptq_with_identity_hessian_is_nearly_round_to_nearest():
    w = torch.randn(16, 32, generator=torch.Generator().manual_seed(2))
    q_rtn, _ = formats.quantize_weight(w, 4)
    q, _ = formats.gptq_quantize(w, 4, torch.eye(32), damp=0.0)
    assert torch.equal(q, q_rtn)        # no correlation: nothing to compensate


def test_gptq_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="hessian"):
        formats.gptq_quantize(torch.randn(4, 8), 4, torch.eye(7))


def test_cli_quantize_gptq_records_rounding_and_lowers_error(tmp_path, cli):
    import json

    from diffpro_cli.models import load_model

    for rounding in ("nearest", "gptq"):
        code, out, err = cli("quantize", "random:dit-tiny", "--bits", "4", "--rounding", rounding, "--calib-samples", "2",
                             "--out", tmp_path / rounding, "--workdir", tmp_path / f"w{rounding}", "--json")
        assert code == 0, err
    meta = json.loads((tmp_path / "gptq" / "diffpro.json").read_text())
    kinds = {rec["rounding"] for rec in meta["layers"].values() if rec["type"] == "linear"}
    assert kinds == {"gptq"}
    code, _, err = cli("quantize", "random:dit-tiny", "--bits", "4", "--rounding", "best", "--out", tmp_path / "bad")
    assert code == 2 and err.strip().startswith("error:") and "--rounding" in err and not (tmp_path / "bad").exists()
    m = load_model("random:dit-tiny")
    x, t, y = _inputs(m, batch=2)
    with torch.no_grad():
        ref = m.eps(x, t, y)
        errs = {r: float((load_quantized(tmp_path / r).eps(x, t, y) - ref).pow(2).mean()) for r in ("nearest", "gptq")}
    assert errs["gptq"] < errs["nearest"]


def test_static_and_gptq_calibrate_in_one_sampling_pass(monkeypatch):
    """Static ranges and GPTQ Hessians come from the same trajectories: one sampling run, and the
    same numbers each calibration gives on its own."""
    import diffpro_cli.sampling as sampling
    from diffpro_cli.models import load_model
    from diffpro_cli.stages import quantize as qstage

    model = load_model("random:dit-tiny")
    names = list(model.quantizable_layers())
    linear = [n for n, (mod, _) in model.quantizable_layers().items() if isinstance(mod, torch.nn.Linear)]
    ts = [0, 400, 999]
    static_alone = qstage.calibrate_static(model, names[:3], ts, n_samples=2, seed=1)
    hessians_alone = qstage.collect_hessians(model, linear[:2], ts, n_samples=2, seed=1)
    calls, real_sample = [], sampling.sample
    monkeypatch.setattr(sampling, "sample", lambda *a, **k: calls.append(1) or real_sample(*a, **k))
    ranges, hessians = qstage.calibrate(model, names[:3], linear[:2], ts, n_samples=2, seed=1)
    assert len(calls) == 1
    assert set(ranges) == set(names[:3]) and set(hessians) == set(linear[:2])
    for name in names[:3]:
        assert ranges[name][0] == ts and torch.equal(ranges[name][1], static_alone[name][1])
        assert float(ranges[name][1].min()) > 0
    for name in linear[:2]:
        assert torch.allclose(hessians[name], hessians_alone[name])
    calls.clear()
    assert qstage.calibrate(model, [], [], ts) == ({}, {}) and not calls   # nothing asked: no sampling
