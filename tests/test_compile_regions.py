"""Regional compilation of cached rows (issue #20 item 4, `bench --compile`): each cache unit's module
compiled on its own (quant.compiled.compile_regions), called by the cache runner in place of the block,
whose per-step skip/compute decisions stay Python. Tiny DiTs built in-process; inductor compiles each
block once (~1-2 s a block on 2 cores once the C++ kernels are cached)."""

from __future__ import annotations

import pytest
import torch

import diffpro
from diffpro_cli.cache import CacheSchedule, FirstBlockCache, cached
from diffpro_cli.models.base import DiffusionModel, dit_forward, linear_alphas_cumprod
from diffpro_cli.quant import compiled
from diffpro_cli.sampling import SamplerConfig, sample

needs_compile = pytest.mark.skipif(not compiled.compiled_available(),
                                   reason=f"compiled path unavailable: {compiled.unavailable_reason()}")

TS = [0, 100, 250, 400, 550, 700, 850, 999]   # 8 steps; sampling order is 999 → 0


def tiny_dit(num_layers: int) -> DiffusionModel:
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    net = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                num_layers=num_layers, sample_size=8, patch_size=2, num_embeds_ada_norm=10).eval()
    with torch.no_grad():   # diffusers zero-initialises the adaLN-Zero gates (identity blocks): give them weights
        for p in net.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.05)
    return DiffusionModel(spec="tiny", net=net, kind="dit", sample_shape=(4, 8, 8),
                          alphas_cumprod=linear_alphas_cumprod(), forward_fn=dit_forward, num_classes=10)


def skipping(n: int) -> CacheSchedule:
    """Every unit at step 0 and the last step; the inner units reused at every other step in between."""
    every, ends = frozenset(range(n)), frozenset({0, n - 1})
    return CacheSchedule(TS, n, [every] + [ends, every] * 3 + [every])


def run(model, policy, batch=2):
    with torch.no_grad(), cached(model, policy) as r:
        out = sample(model, batch, TS, SamplerConfig(cfg_scale=1.0), seed=5, batch_size=batch, decode=False)
    return out, r


def frames_ok() -> int:
    """Frames dynamo compiled since the last fresh_dynamo()."""
    from torch._dynamo.utils import counters

    return counters["frames"]["ok"]


def fresh_dynamo() -> None:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()


@pytest.fixture(scope="module")
def float_regions():
    """A 9-block float DiT (more blocks than dynamo's recompile limit of 8 per code object), its eager
    cached output, then its blocks regionally compiled; the dynamo frames compiled at each network call
    of the first compiled run."""
    model = tiny_dit(9)
    policy = skipping(9)
    eager, eager_run = run(model, policy)
    fresh_dynamo()
    blocks = list(model.net.transformer_blocks)
    assert compiled.compile_regions(blocks) == 9
    per_call = []
    hook = model.net.register_forward_pre_hook(lambda m, a: per_call.append(frames_ok()))
    try:
        out, r = run(model, policy)
    finally:
        hook.remove()
    yield model, policy, eager, eager_run, out, r, per_call
    compiled.remove_regions(blocks)
    torch._dynamo.reset()


@needs_compile
def test_compiled_cached_run_matches_the_eager_cached_run(float_regions):
    """Catches: a compiled block computing something else (freezing folding another block's weights:
    a graph reused across blocks of one class), or the runner's skip decisions changed by compiling
    (a different number of block evaluations, another unit reused)."""
    _, _, eager, eager_run, out, r, _ = float_regions
    assert torch.allclose(out, eager, rtol=1e-4, atol=1e-4 * float(eager.abs().max())), float((out - eager).abs().max())
    assert r.evaluations == eager_run.evaluations == 8 * 9 - 3 * 7 and r.log == eager_run.log


@needs_compile
def test_blocks_compile_once_not_per_step(float_regions):
    """Catches: the runner calling the class's eager forward instead of the compiled one (no frame
    compiled), a whole-network graph recompiled at every step as the wrappers change, and blocks
    sharing one code object (dynamo's recompile limit: the 9th block silently eager, 8 frames)."""
    model, policy, _, _, _, _, per_call = float_regions
    assert per_call[0] == 0                           # nothing compiled before the first network call
    assert per_call[1:] == [9] * (len(TS) - 1), per_call   # every block compiled in step 0, none after
    assert frames_ok() == 9
    run(model, policy)                                 # a second trajectory, same shapes: no compile
    run(model, FirstBlockCache(TS, 9, threshold=0.1))   # another runner on the same compiled blocks
    assert frames_ok() == 9
    run(model, policy, batch=3)                        # a new shape: one more graph per block, once
    assert frames_ok() == 18


@needs_compile
def test_runner_exit_restores_the_blocks_and_keeps_the_compiled_forwards(float_regions):
    """Catches: the runner leaving its wrapper (or the compiled callable) as the block's forward: a
    second runner refuses ("already wrapped"), and the eager network stops being the class's forward."""
    model, policy, eager, *_ = float_regions
    for b in model.net.transformer_blocks:
        assert "forward" not in vars(b) and compiled.REGION_ATTR in vars(b)
    out, _ = run(model, policy)                       # enters again without "already wrapped"
    assert torch.allclose(out, eager, rtol=1e-4, atol=1e-4 * float(eager.abs().max()))


@needs_compile
def test_quantized_blocks_run_the_compiled_int8_path():
    """Catches: a quantized block compiled with its quant layers left on the eager kernels (a graph
    break around every GEMM: several frames per block), or the compiled graph computing other integers
    than the compiled path's ops run eagerly (the same oneDNN u8 × s8 GEMMs, `compiled.enable` without
    compile). Not compared with the eager fbgemm kernels: they round activations on another grid (1 % on
    one call of this random 16-wide net, tens of % after 8 steps), which is no compile difference."""
    from diffpro_cli.stages.quantize import uniform_plan

    model = tiny_dit(3)
    diffpro.quantize_(model, uniform_plan(model, 8, act_mode="dynamic", float_act=()))
    policy = skipping(3)
    blocks = list(model.net.transformer_blocks)
    try:
        assert compiled.compile_regions(blocks) == 3
        layers = [m for b in blocks for m in b.modules() if hasattr(m, "act_mode")]
        assert layers and all(m.kernel_name.startswith(compiled.NAME) for m in layers)   # switched by compile_regions
        compiled.remove_regions(blocks)
        eager, eager_run = run(model, policy)          # the same integer ops, eager
        fresh_dynamo()
        assert compiled.compile_regions(blocks) == 3
        out, r = run(model, policy)
        assert frames_ok() == 3 and r.log == eager_run.log
        assert torch.allclose(out, eager, rtol=1e-4, atol=1e-4 * float(eager.abs().max())), float((out - eager).abs().max())
    finally:
        compiled.remove_regions(blocks)
        compiled.disable(model.net)
        torch._dynamo.reset()


def test_compile_rows_compiles_cached_rows_by_region(monkeypatch):
    """Catches: a cached row handed the whole compiled network (its wrappers change per step: dynamo
    recompiles per step until its limit, and those compiles land in the timings) or left eager; the
    float row beside it losing its whole-model compile. torch.compile is lazy: nothing compiles here."""
    from diffpro_cli.stages.bench import Row
    from diffpro_cli.stages.bench_compile import REGIONAL_NOTE, compile_rows

    monkeypatch.setattr(compiled, "unavailable_reason", lambda: None)
    model = tiny_dit(2)
    rows = [Row("fp32", model, TS, 8, 1, 32.0, "a"), Row("cache-only", model, TS, 8, 1, 32.0, "b", cache=skipping(2))]
    try:
        note = compile_rows(rows)
        assert rows[0].model is not model and rows[0].model.net is model.net     # compile_model: a new forward_fn
        assert rows[1].model is model and any(REGIONAL_NOTE in n for n in rows[1].notes), rows[1].notes
        assert not any("eager under --compile" in n for n in rows[1].notes)
        assert "cache-only" in note and "regionally compiled" in note
        assert all(compiled.REGION_ATTR in vars(b) and "forward" not in vars(b) for b in model.net.transformer_blocks)
    finally:
        compiled.remove_regions(model.net.transformer_blocks)


def test_compile_rows_without_compile_leaves_every_row_eager(monkeypatch):
    """Catches: regions attached (or a second notice per row) where compile is unavailable."""
    from diffpro_cli.stages.bench import Row
    from diffpro_cli.stages.bench_compile import compile_rows

    monkeypatch.setattr(compiled, "unavailable_reason", lambda: "no C++ compiler")
    model = tiny_dit(2)
    rows = [Row("fp32", model, TS, 8, 1, 32.0, "a"), Row("cache-only", model, TS, 8, 1, 32.0, "b", cache=skipping(2))]
    note = compile_rows(rows)
    assert note == "compile requested but unavailable (no C++ compiler): every row ran eager"
    assert all(r.model is model and not r.notes for r in rows)
    assert not any(compiled.REGION_ATTR in vars(b) for b in model.net.transformer_blocks)


@needs_compile
def test_regions_compiled_after_the_runner_wrapped_the_blocks_are_used():
    """A runner took the block's forward when it wrapped it, so regions compiled afterwards (a library
    user compiling a loaded checkpoint whose cache schedule installs its runner at load) ran eager."""
    model = tiny_dit(3)
    policy = skipping(3)
    blocks = list(model.net.transformer_blocks)
    fresh_dynamo()
    try:
        with torch.no_grad(), cached(model, policy) as r:
            assert compiled.compile_regions(blocks) == 3    # after the runner wrapped the blocks
            sample(model, 2, TS, SamplerConfig(cfg_scale=1.0), seed=5, batch_size=2, decode=False)
        assert frames_ok() == 3 and r.evaluations < 8 * 3
    finally:
        compiled.remove_regions(blocks)
        torch._dynamo.reset()


@needs_compile
def test_compiling_integer_layers_prints_no_torch_lowering_warning():
    """torch's oneDNN int8 lowering warned 'To copy construct from a tensor...' for every integer layer it
    compiled: two lines per layer in `bench --compile`'s log, about torch's own code."""
    import warnings

    from diffpro_cli.stages.quantize import uniform_plan

    model = tiny_dit(1)
    diffpro.quantize_(model, uniform_plan(model, 8, act_mode="dynamic", float_act=()))
    x, t, y = torch.randn(2, *model.sample_shape), torch.tensor([900, 30]), torch.tensor([1, 2])
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fresh_dynamo()
            fast = compiled.compile_model(model)
            with torch.no_grad():
                fast.eps(x, t, y)
    finally:
        compiled.disable(model.net)
        torch._dynamo.reset()
    assert frames_ok() >= 1
    assert not [w for w in caught if "To copy construct" in str(w.message)], [str(w.message)[:60] for w in caught]
