"""diffpro.compile: the library face of `bench --compile` (the model compiled for where it runs)."""

import pytest
import torch

import diffpro
from diffpro_cli.quant import compiled, compiled_cuda

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
