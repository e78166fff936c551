"""torch.compile of a network on the CUDA kernel classes (quant/compiled_cuda.py, `bench --compile` on a
GPU), checked on the CPU: torch._int_mm runs there too, so the CUDA classes are built for the CPU as in
test_kernels_cuda_math.py. What only a GPU can check (triton's code, the speed) stays in
`make cuda-check`."""

import pytest
import torch

from diffpro_cli.quant import compiled, compiled_cuda
from test_kernels_cuda_math import _force_cuda_classes, _w8a8


@pytest.fixture
def w8a8_cuda_classes(monkeypatch):
    model, inputs, quant = _w8a8("random:dit-tiny")
    _force_cuda_classes(monkeypatch, quant.values())
    assert compiled_cuda.prepare_kernels(model.net, "cpu") == len(quant)
    return model, inputs, quant


def test_the_whole_network_traces_as_one_graph(w8a8_cuda_classes):
    """Catches: a CUDA kernel (or the fused q/k/v group, or the float-activation layers) that is a graph
    break under torch.compile — an opaque call, Python state written in the trace, a lazy prepare; and a
    fused q/k/v group whose members each computed the whole fused GEMM in the graph (three GEMMs of three
    times the width per attention: inductor merges them only under freezing, which the GPU path lacks)."""
    model, (x, t, y), quant = w8a8_cuda_classes
    integer = [m for m in quant.values() if m.act_mode != "none"]
    assert any("fused3" in m.kernel_name for m in integer) and len(integer) < len(quant)   # groups and float layers present
    calls = []   # integer layer calls of one eager forward (DiT reuses block 0's timestep embedder at the end)
    shared = []  # calls of a fused group's later members: the group's GEMM already computed their slice
    hooks = [m.register_forward_hook(lambda *a: calls.append(1)) for m in integer]
    hooks += [m.register_forward_hook(lambda *a: shared.append(1)) for m in integer
              if m._group is not None and m is not m._group.members[0]]
    with torch.no_grad():
        model.eps(x, t, y)
    for h in hooks:
        h.remove()
    torch._dynamo.reset()
    with torch.no_grad():
        ex = torch._dynamo.explain(model.net)(x, timestep=t, class_labels=y, return_dict=False)
    reasons = [r.reason.splitlines()[0] for r in ex.break_reasons]
    assert (ex.graph_count, ex.graph_break_count) == (1, 0), reasons
    int_mm = sum(1 for n in ex.graphs[0].graph.nodes if "_int_mm" in str(n.target))
    assert shared and int_mm == len(calls) - len(shared) > len(integer) // 2   # every GEMM in the graph, a group's once


@pytest.mark.skipif(not compiled.compiled_available(), reason=f"inductor unavailable: {compiled.unavailable_reason()}")
def test_compiled_network_matches_eager(w8a8_cuda_classes):
    """Catches: a fused q/k/v member traced with another member's slice, a post-op (GELU) applied twice or
    lost, float-activation layers computed in the wrong dtype: the compiled network's output is the eager one."""
    model, (x, t, y), _ = w8a8_cuda_classes
    with torch.no_grad():
        ref = model.eps(x, t, y)
    torch._dynamo.reset()
    fast = compiled_cuda.compile_model(model, "cpu")
    assert fast is not model and fast.net is model.net   # the eager module (and its checkpoint) unchanged
    with torch.no_grad():
        out = fast.eps(x, t, y)
    assert float((out - ref).norm() / ref.norm()) < 1e-5


def test_compile_unavailable_returns_the_eager_network_with_a_notice(monkeypatch, capsys):
    model, _, _ = _w8a8("random:dit-tiny")
    monkeypatch.setattr(compiled_cuda, "unavailable_reason", lambda device_type="cuda": "triton is not installed")
    assert compiled_cuda.compile_model(model, "cuda") is model
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "notice: triton is not installed; running eager" in err


@pytest.mark.skipif(not compiled.compiled_available(), reason=f"inductor unavailable: {compiled.unavailable_reason()}")
def test_cached_run_with_regionally_compiled_blocks_matches_eager(monkeypatch):
    """bench --compile's cached rows on a GPU: each block compiled on its own with its CUDA-class layers
    prepared first. Catches: the cache runner not calling the compiled block, a block compiled with
    unprepared (opaque) layers, a reused block's output differing from the eager runner's."""
    from diffpro_cli.cache import unit_modules
    from diffpro_cli.stages.quantize import apply_plan, uniform_plan
    from test_compile_regions import run, skipping, tiny_dit

    n = 4   # random:dit-tiny's 2 blocks are both ends of the schedule: none would be reused
    model = tiny_dit(n)
    apply_plan(model, uniform_plan(model, 8, act_mode="dynamic-token"))
    quant = {k: m for k, m in model.net.named_modules() if getattr(m, "is_diffpro_quant", False)}
    _force_cuda_classes(monkeypatch, quant.values())
    eager, _ = run(model, skipping(n))
    for m in quant.values():
        m._forget_kernel()   # compile_regions must prepare them itself
    blocks = [m for unit in unit_modules(model.net) for m in unit]
    assert compiled_cuda.compile_regions(blocks, "cpu") == len(blocks) == n
    from test_compile_regions import fresh_dynamo, frames_ok

    fresh_dynamo()
    out, runner = run(model, skipping(n))
    assert runner.summary()["compute_fraction"] < 1   # blocks were reused
    assert frames_ok() >= n   # each block ran its compiled forward (dynamo compiled its frame)
    assert float((out - eager).norm() / eager.norm()) < 1e-4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_compiled_network_on_the_gpu_matches_eager():
    """On a GPU (make cuda-check): the W8A8 DiT compiled with its CUDA kernels traced gives the eager output,
    and the layers really run the CUDA kernels. Catches what the CPU stand-in cannot: triton's code for the
    fused activation quantization, cuBLASLt layouts under compile."""
    model, (x, t, y), quant = _w8a8("random:dit-tiny")
    model.net.to("cuda")
    x, t, y = x.cuda(), t.cuda(), y.cuda()
    with torch.no_grad():
        ref = model.eps(x, t, y)
    torch._dynamo.reset()
    fast = compiled_cuda.compile_model(model, "cuda")
    with torch.no_grad():
        out = fast.eps(x, t, y)
    assert any(m.kernel_name.startswith("cuda-") for m in quant.values())
    assert float((out - ref).norm() / ref.norm()) < 1e-3
