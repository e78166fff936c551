"""torch.compile of the quantized built-in DiT (issue #20 item 4): the compiled path's traceable integer
layers (`compiled.enable`, as compile_module does) trace with no graph break inside a transformer block,
so each block is one graph for inductor; the only breaks are outside the blocks. Dynamo tracing only
(torch._dynamo.explain): no C++ compile, a few seconds."""

import pytest
import torch

import diffpro
from diffpro_cli.quant import compiled
from diffpro_cli.stages.quantize import uniform_plan

pytestmark = pytest.mark.skipif(not compiled.compiled_available(),
                                reason=f"compiled path unavailable: {compiled.unavailable_reason()}")

# Breaks the whole net may have, all outside the transformer blocks: the patch-embedding QuantConv2d
# runs its eager kernel behind torch.compiler.disable (compiled.attach leaves convolutions eager), and
# the timestep pre-hook (api.install_timestep_hook) sets a ContextVar, which dynamo runs eagerly.
OUTSIDE_BLOCKS = ("torch.compiler.disable", "ContextVar", "generator")


@pytest.fixture(scope="module")
def w8a8():
    model = diffpro.load("builtin:dit-mnist")
    diffpro.quantize_(model, uniform_plan(model, 8, act_mode="dynamic", float_act=()))   # every layer integer
    counts = compiled.enable(model.net)
    torch.manual_seed(0)
    x, t, y = torch.randn(2, *model.sample_shape), torch.tensor([700, 40]), torch.tensor([3, 8])
    return model, counts, (x, t, y)


def explain(fn, *args, **kwargs):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad():
        ex = torch._dynamo.explain(fn)(*args, **kwargs)
    reasons = [r.reason for r in ex.break_reasons] or list(counters["graph_break"])
    return ex, reasons


def gemms(graph) -> int:
    return sum(1 for n in graph.graph.nodes if "qlinear_pointwise" in str(n.target))


def block_calls(model, x, t, y):
    """Each transformer block's (args, kwargs) from one eager call of the network."""
    calls = {}
    hooks = [b.register_forward_pre_hook(lambda m, a, k, i=i: calls.setdefault(i, (a, k)), with_kwargs=True)
             for i, b in enumerate(model.net.transformer_blocks)]
    with torch.no_grad():
        model.eps(x, t, y)
    for h in hooks:
        h.remove()
    return calls


def test_whole_net_breaks_only_outside_the_blocks(w8a8):
    model, counts, (x, t, y) = w8a8
    assert counts["compiled"] == 56 and counts["eager"] == 1      # every Linear traceable; the patch conv eager
    calls = []   # integer GEMM calls of one eager forward: 58 (DiT reuses block 0's timestep embedder for proj_out)
    hooks = [m.register_forward_hook(lambda *a: calls.append(1)) for m in model.net.modules() if compiled.is_attached(m)]
    with torch.no_grad():
        model.eps(x, t, y)
    for h in hooks:
        h.remove()
    ex, reasons = explain(model.net, x, timestep=t, class_labels=y, return_dict=False)
    summary = f"{ex.graph_count} graphs, {ex.graph_break_count} breaks: " + " | ".join(r.splitlines()[0] for r in reasons)
    print("whole net:", summary)
    # one graph holds every integer GEMM of the network, i.e. all six blocks end to end: a break inside a
    # block (an opaque kernel call, a .item(), a Python-side cache like SharedInputGroup) would split them
    assert max(gemms(g) for g in ex.graphs) == len(calls) == 58, summary
    assert all(any(k in r for k in OUTSIDE_BLOCKS) for r in reasons), summary
    assert ex.graph_break_count <= 1, summary     # the eager patch-embedding conv


def test_each_transformer_block_is_one_graph(w8a8):
    model, _, (x, t, y) = w8a8
    calls = block_calls(model, x, t, y)
    assert len(calls) == len(model.net.transformer_blocks) == 6
    for i, (args, kwargs) in calls.items():
        ex, reasons = explain(model.net.transformer_blocks[i], *args, **kwargs)
        assert (ex.graph_count, ex.graph_break_count) == (1, 0), (i, reasons)
        assert gemms(ex.graphs[0]) == 9, i     # adaLN emb 2 + modulation 1 + q/k/v 3 + out 1 + ff 2, all traced


def test_a_lora_adapter_keeps_the_block_one_graph(w8a8):
    """load_lora's forward hooks are traced into the block's graph (no break for the float adapter)."""
    model, _, (x, t, y) = w8a8
    block = model.net.transformer_blocks[0]
    names = ["transformer_blocks.0.attn1.to_q", "transformer_blocks.0.ff.net.2"]
    mods = dict(model.net.named_modules())
    sd = {}
    for n in names:
        m = mods[n]
        sd[f"{n}.lora_A.weight"], sd[f"{n}.lora_B.weight"] = torch.randn(4, m.in_features), torch.randn(m.out_features, 4)
    args, kwargs = block_calls(model, x, t, y)[0]
    diffpro.load_lora(model, sd)
    try:
        ex, reasons = explain(block, *args, **kwargs)
        assert (ex.graph_count, ex.graph_break_count) == (1, 0), reasons
        float_gemms = [n for n in ex.graphs[0].graph.nodes if n.op == "call_function" and n.target is torch.nn.functional.linear]
        assert len(float_gemms) == 4 and gemms(ex.graphs[0]) == 9     # A and B of both adapters, in the same graph
    finally:
        diffpro.unload_lora(model)
