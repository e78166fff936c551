"""`copy.deepcopy` of quantized models: loaded (inference-only or with integers kept), quantized in
place and already run, and fused q/k/v groups. The copy must compute what the original computes."""

import copy

import pytest
import torch

import diffpro
from diffpro_cli.checkpoint import load_quantized, save_quantized
from diffpro_cli.loading import load_model
from diffpro_cli.quant.layers import _QuantBase
from diffpro_cli.stages.quantize import uniform_plan


def _kernel(layer):
    return layer._group.kernel if layer._group is not None else layer._kernel


def _quant_layers(net):
    return [m for m in net.modules() if isinstance(m, _QuantBase)]


def _inputs(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, *model.sample_shape, generator=g), torch.tensor([900, 30]), torch.tensor([1, 4])


@pytest.fixture(scope="module", params=[("random:dit-tiny", "dynamic"), ("random:dit-tiny", "dynamic-token"),
                                        ("random:unet-tiny", "dynamic")])
def checkpoint(request, tmp_path_factory):
    spec, mode = request.param
    m = load_model(spec)
    out = tmp_path_factory.mktemp("q")
    save_quantized(m, uniform_plan(m, 8, act_mode=mode), out / "q")
    return out / "q"


def test_deepcopy_of_an_inference_only_load_shares_the_packed_kernels(checkpoint):
    # catches: copy.deepcopy(diffpro.load(QDIR)) raising "Cannot access storage of OpaqueTensorImpl" (the
    # oneDNN-packed weight in the prepared kernel), or a copy that re-packs from integers it no longer has
    model = diffpro.load(checkpoint)
    x, t, y = _inputs(model)
    with torch.no_grad():
        ref = model.eps(x, t, y)
        twin = copy.deepcopy(model)
        got = twin.eps(x, t, y)
    assert torch.equal(got, ref)
    pairs = list(zip(_quant_layers(model.net), _quant_layers(twin.net)))
    assert pairs and all(a is not b and a.integers_released and b.integers_released for a, b in pairs)
    assert all(_kernel(b) is not None and _kernel(b) is _kernel(a) for a, b in pairs)   # shared, not copied
    # a fused group's copy groups the copied members, not the original's
    for b in _quant_layers(twin.net):
        if b._group is not None:
            assert all(any(mm is m for m in _quant_layers(twin.net)) for mm in b._group.members)


def test_deepcopy_keeps_integers_drops_kernels_and_computes_the_same(checkpoint):
    # catches: a copy of a model with its integers kept sharing (or failing to copy) the packed kernel,
    # instead of packing its own from its own integers on its first call
    model = load_quantized(checkpoint, keep_integers=True)
    x, t, y = _inputs(model)
    with torch.no_grad():
        ref = model.eps(x, t, y)
        twin = copy.deepcopy(model)
        assert all(_kernel(m) is None for m in _quant_layers(twin.net))
        got = twin.eps(x, t, y)
    assert torch.equal(got, ref)
    pairs = list(zip(_quant_layers(model.net), _quant_layers(twin.net)))
    assert all(_kernel(b) is not _kernel(a) and b.qweight.data_ptr() != a.qweight.data_ptr() for a, b in pairs)


def test_deepcopy_then_bf16_compute_equals_the_original_in_bf16(checkpoint):
    # catches: set_compute_dtype on a copy changing the original, or a copy's kernels not running bf16
    model = diffpro.load(checkpoint)
    twin = copy.deepcopy(model)
    diffpro.set_compute_dtype(twin, "bfloat16")
    assert model.compute_dtype is None
    x, t, y = _inputs(model)
    with torch.no_grad():
        got = twin.eps(x, t, y)
        diffpro.set_compute_dtype(model, torch.bfloat16)
        ref = model.eps(x, t, y)
    assert torch.equal(got, ref)


def test_deepcopy_of_a_model_quantized_in_place_after_a_forward():
    # catches: quantize_ + one forward (kernels prepared, fbgemm/oneDNN packed) making the model uncopyable
    model = diffpro.load("random:dit-tiny", seed=1)
    plan = uniform_plan(model, 8)
    plan["layers"] = {n: {**e, "act_mode": "dynamic-token" if i % 2 else "dynamic"} for i, (n, e) in enumerate(plan["layers"].items())}
    diffpro.quantize_(model, plan)
    x, t, y = _inputs(model, seed=3)
    with torch.no_grad():
        ref = model.eps(x, t, y)
        twin = copy.deepcopy(model)
        assert torch.equal(twin.eps(x, t, y), ref)
        assert torch.equal(model.eps(x, t, y), ref)   # the original still runs its own kernels


@pytest.mark.parametrize("spec", ["random:dit-tiny", "random:unet-tiny"])
def test_deepcopy_of_a_model_running_a_cache_schedule_runs_its_own_blocks(spec):
    # catches: the cache runner's block wrappers (closures) shared by a deep copy, so that the copy ran
    # the ORIGINAL's blocks and counted in the original's runner (a checkpoint with a cache plan loads so)
    from diffpro_cli.cache import (
        CacheSchedule,
        cache_units,
        install_cache,
        remove_cache,
    )

    model = diffpro.load(spec)
    n = 1 if spec.endswith("unet-tiny") else len(cache_units(model.net))
    install_cache(model, CacheSchedule(timesteps=[400, 500], num_units=n, computed=[frozenset(range(n)), frozenset()]))
    x, _, y = _inputs(model)
    y = y if model.num_classes else None

    def trajectory(m):   # step 0 computes every unit, step 1 reuses them all
        return [m.eps(x, torch.tensor([t, t]), y) for t in (500, 400)]

    with torch.no_grad():
        twin = copy.deepcopy(model)
        ref, got = trajectory(model), trajectory(twin)
        assert all(torch.equal(a, b) for a, b in zip(ref, got))
        assert twin.net._diffpro_cache is not model.net._diffpro_cache
        for m in (model, twin):               # each runner counts its own calls and the units it ran
            assert m.net._diffpro_cache.calls == 2 and m.net._diffpro_cache.unit_evaluations == [1] * n
        for p in model.net.parameters():
            p.add_(0.5)                       # the original changes; the copy must not see it
        assert all(torch.equal(a, b) for a, b in zip(trajectory(twin), got))
        twin_runner = twin.net._diffpro_cache
        remove_cache(twin)                    # and removing the copy's runner leaves the original's installed
        assert model.net._diffpro_cache.calls == 2 and twin_runner.calls == 4
        trajectory(model)
        assert model.net._diffpro_cache.calls == 4 and model.net._diffpro_cache.unit_evaluations == [2] * n
