"""diffpro.compile: the library face of `bench --compile` (the model compiled for where it runs)."""

import pytest
import torch

import diffpro
from diffpro_cli.quant import compiled, compiled_cuda
from conftest import w8a8_dit_tiny

needs_compile = pytest.mark.skipif(not compiled.compiled_available(),
                                   reason=f"compiled path unavailable: {compiled.unavailable_reason()}")


@needs_compile
def test_compiled_model_matches_eager_and_keeps_its_network():
    """Catches: a compiled model computing something else, or a compile that replaced `.net` (its
    state_dict and checkpoint must stay the eager module's)."""
    model = diffpro.load("random:dit-tiny")
    torch.manual_seed(0)
    x, t, y = torch.randn(2, *model.sample_shape), torch.tensor([900, 30]), torch.tensor([1, 2])
    with torch.no_grad():
        ref = model.eps(x, t, y)
        torch._dynamo.reset()
        fast = diffpro.compile(model)
        out = fast.eps(x, t, y)
    assert fast is not model and fast.net is model.net
    assert float((out - ref).norm() / ref.norm()) < 1e-5


@needs_compile
def test_a_model_running_a_cache_schedule_is_compiled_block_by_block():
    """A checkpoint loaded with its cache schedule has a runner installed: compiling the whole network
    would recompile at every step (the runner swaps block forwards), so each block is compiled instead.
    Catches: a whole-network compile of a cached model, or blocks left eager."""
    from torch._dynamo.utils import counters

    from diffpro_cli.cache import CacheSchedule, install_cache, remove_cache

    model = diffpro.load("random:dit-tiny")
    blocks = list(model.net.transformer_blocks)
    install_cache(model, CacheSchedule.full([0, 500, 999], len(blocks)))
    try:
        torch._dynamo.reset()
        counters.clear()
        assert diffpro.compile(model) is model
        assert all(compiled.REGION_ATTR in vars(b) for b in blocks)
        with torch.no_grad():
            model.eps(torch.randn(1, *model.sample_shape), torch.tensor([999]), torch.tensor([3]))
        assert counters["frames"]["ok"] == len(blocks)
    finally:
        remove_cache(model)
        compiled.remove_regions(blocks)
        torch._dynamo.reset()


def test_a_model_on_a_gpu_takes_the_cuda_compile(monkeypatch):
    """Catches: a GPU model sent to the CPU's oneDNN path (its packed weights are CPU-only)."""
    calls = []
    monkeypatch.setattr(compiled_cuda, "compile_model", lambda m, device: calls.append(device) or m)
    monkeypatch.setattr(compiled, "compile_model", lambda m: pytest.fail("the CPU compile ran for a GPU model"))
    model = diffpro.load("random:dit-tiny")
    diffpro.compile(model, device="cuda")
    assert calls == ["cuda"]


@needs_compile
def test_in_place_compile_runs_the_network_itself_compiled_for_a_pipeline():
    """`diffpro.compile(q, in_place=True)`: a diffusers pipeline holding `q.net` calls the compiled graph.
    Catches: `.net` left eager (the default returns a new model whose `eps` alone is compiled, so a
    pipeline got none of the speed), a compile that changed the module's type or state_dict keys (what a
    pipeline and a checkpoint see), or an in-place graph computing something other than the default's."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([900, 30]), torch.tensor([1, 2])
    try:
        with torch.no_grad():
            torch._dynamo.reset()
            want = diffpro.compile(w8a8_dit_tiny()).eps(x, t, y)
            model = w8a8_dit_tiny()
            cls, keys = type(model.net), list(model.net.state_dict())
            assert diffpro.compile(model, in_place=True) is model
            counters.clear()
            got = model.net(x, timestep=t, class_labels=y, return_dict=False)[0][:, :4]   # the pipeline's call
            assert counters["frames"]["ok"] > 0
            assert type(model.net) is cls and list(model.net.state_dict()) == keys
            assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
            model.net._compiled_call_impl = None          # back to eager, as after nn.Module.compile
            counters.clear()
            model.net(x, timestep=t, class_labels=y)
            assert counters["frames"]["ok"] == 0
    finally:
        torch._dynamo.reset()


def test_in_place_compile_of_a_gpu_model_prepares_its_cuda_kernels(monkeypatch):
    """Catches: in_place sending a GPU model to the CPU's oneDNN path, or compiling before its quant
    layers are packed for the GPU (a layer first prepared inside a trace stays an opaque call)."""
    prepared = []
    monkeypatch.setattr(compiled_cuda, "unavailable_reason", lambda device_type="cuda": None)
    monkeypatch.setattr(compiled_cuda, "prepare_kernels", lambda module, device: prepared.append(str(device)))
    monkeypatch.setattr(compiled, "compile_in_place", lambda m: pytest.fail("the CPU compile ran for a GPU model"))
    model = diffpro.load("random:dit-tiny")
    assert diffpro.compile(model, device="cuda", in_place=True) is model
    assert prepared == ["cuda"] and model.net._compiled_call_impl is not None
