"""torch.compile of the quantized built-in DiT (issue #20 item 4): the compiled path's traceable integer
layers (`compiled.enable`, as compile_module does) trace with no graph break inside a transformer block,
so each block is one graph for inductor; the only breaks are outside the blocks. Weight-only layers
(w4a16 / w8a16, dequant-float: every layer, or the float-activation ends of the default W8A8 plan)
trace too, so those networks are one graph end to end. Dynamo tracing (torch._dynamo.explain), plus
one inductor compile of the w4a16 network (test_weight_only_plan_compiled_matches_eager)."""

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


# Weight-only (act_bits 16, kernel dequant-float) layers: a plan with every layer w4a16, and the default
# W8A8 plan, whose float-activation roles (planning.options.FLOAT_ACT_ROLES: the patch embedding and the
# final layer) are w8a16. compiled.enable traces them as F.linear / conv2d on the eager kernel's weight.
WEIGHT_ONLY_PLANS = {
    "w4a16": lambda model: uniform_plan(model, 4, act_bits=16),
    "w8a8-float-ends": lambda model: uniform_plan(model, 8),
}


@pytest.fixture(scope="module", params=list(WEIGHT_ONLY_PLANS))
def weight_only(request):
    """(plan name, model, enable() counts, inputs, the eager kernels' output and each weight-only layer's
    (input, output) from that eager call, recorded before enable)."""
    model = diffpro.load("builtin:dit-mnist")
    diffpro.quantize_(model, WEIGHT_ONLY_PLANS[request.param](model))
    torch.manual_seed(0)
    x, t, y = torch.randn(2, *model.sample_shape), torch.tensor([700, 40]), torch.tensor([3, 8])
    seen = {}

    def record(m, args, out):   # returns None: the output is left as it is
        seen.setdefault(m, (args[0], out))

    hooks = [m.register_forward_hook(record)
             for m in model.net.modules() if getattr(m, "act_mode", None) == "none"]
    with torch.no_grad():
        ref = model.net(x, timestep=t, class_labels=y, return_dict=False)[0]
    for h in hooks:
        h.remove()
    counts = compiled.enable(model.net)
    return request.param, model, counts, (x, t, y), ref, seen


def test_weight_only_layers_trace_without_graph_breaks(weight_only):
    """Catches: weight-only layers left on their eager kernel behind torch.compiler.disable (before the
    fix: 9 breaks in every block of the w4a16 plan, one per GEMM, and 3 in the whole net of the W8A8
    plan, around the float patch embedding and final layer); a fused weight-only q/k/v group attached
    per member or counted once per member (enable reported 93 eager layers for 57); a traced weight-only
    GEMM dropped from the block (the F.linear count)."""
    name, model, counts, (x, t, y), _, seen = weight_only
    assert counts == {"compiled": 57, "eager": 0}, counts
    assert len(seen) == (57 if name == "w4a16" else 3)
    for i, (args, kwargs) in block_calls(model, x, t, y).items():
        ex, reasons = explain(model.net.transformer_blocks[i], *args, **kwargs)
        assert (ex.graph_count, ex.graph_break_count) == (1, 0), (name, i, reasons)
        nodes = ex.graphs[0].graph.nodes
        float_gemms = sum(1 for n in nodes if n.op == "call_function" and n.target is torch.nn.functional.linear)
        assert float_gemms + gemms(ex.graphs[0]) == 9, (name, i)
        assert float_gemms == (9 if name == "w4a16" else 0), (name, i)
    ex, reasons = explain(model.net, x, timestep=t, class_labels=y, return_dict=False)
    summary = f"{name}: {ex.graph_count} graphs, {ex.graph_break_count} breaks: " + " | ".join(r.splitlines()[0] for r in reasons)
    # the float patch-embedding conv and final layer trace too: the whole network is one graph
    assert (ex.graph_count, ex.graph_break_count) == (1, 0), summary
    assert all(any(k in r for k in OUTSIDE_BLOCKS) for r in reasons), summary


def test_weight_only_layers_keep_their_eager_numbers(weight_only):
    """Catches: the traceable form multiplying another weight than the eager kernel (a re-dequantized
    or re-rounded copy, a fused group's slice taken at the wrong offset, the bias of another member),
    i.e. eager results that change once compiled.enable ran. Bit-identical, layer by layer."""
    name, model, _, _, ref, seen = weight_only
    with torch.no_grad():
        for layer, (inp, out) in seen.items():
            assert compiled.is_attached(layer) and layer.kernel_name.startswith(compiled.FLOAT_NAME)
            assert torch.equal(layer(inp), out), (name, layer)


def test_weight_only_plan_compiled_matches_eager(weight_only):
    """Catches: a graph that computes something else than the eager layers (guards on the wrong buffer,
    the q/k/v slices merged wrongly by the common-subexpression pass, inductor's freezing folding a
    stale weight). Whole network, against the eager kernels' output recorded before enable:
    the W8A8 plan through dynamo + AOT autograd (its integer ops run as the same ops: bit-identical,
    and no C++ compile); the w4a16 plan through inductor with freezing (compile_module; float GEMMs, so
    within float rounding; ~30 s of C++ compile on 2 cores)."""
    name, model, _, (x, t, y), ref, _ = weight_only
    torch._dynamo.reset()
    with torch.no_grad():
        if name == "w4a16":
            out = compiled.compile_module(model.net)(x, timestep=t, class_labels=y, return_dict=False)[0]
            assert torch.allclose(out, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max())), float((out - ref).abs().max())
        else:
            enabled = model.net(x, timestep=t, class_labels=y, return_dict=False)[0]   # the traceable ops, eagerly
            out = torch.compile(model.net, backend="aot_eager")(x, timestep=t, class_labels=y, return_dict=False)[0]
            assert torch.equal(out, enabled)
    torch._dynamo.reset()
