"""A flow network loaded with diffpro.load carries two pre-hooks: the timestep hook that tells static-
activation layers the call's timestep (api.install_timestep_hook) and the flow hook that maps diffpro's
integer index to σ·N (models/base.py). They once shared one marker attribute, so loading a flow model
skipped the timestep hook: static layers called by a pipeline fell back to their widest range."""

import io

import torch

import diffpro
from diffpro_cli.quant import layers
from diffpro_cli.sampling import default_labels


def _probe(net):
    seen = []
    first = next(m for m in net.modules() if isinstance(m, torch.nn.Linear))
    first.register_forward_pre_hook(lambda mod, a: seen.append(layers._TIMESTEPS.get()))
    return seen


def test_flow_net_layers_see_the_index_whether_called_with_it_or_with_sigma_n():
    model = diffpro.load("builtin:flow-mnist")
    seen = _probe(model.net)
    x, y = torch.randn(2, *model.sample_shape), default_labels(model, 2)
    with torch.no_grad():
        model.eps(x, torch.tensor([10, 900]), y)
        by_index = seen[-1]
        sigma_n = model.net._diffpro_flow_table[[10, 900]]   # what a diffusers pipeline passes
        model.forward_fn(model.net, x, sigma_n, y)
    assert by_index is not None and by_index.tolist() == [10, 900]   # catches the hook skipped (None: widest range)
    assert seen[-1].tolist() == [10, 900]   # catches σ·N taken as an index (the flow hook ran first)


def test_a_loaded_flow_net_pickles_and_computes_the_same():
    model = diffpro.load("builtin:flow-mnist")
    x, t, y = torch.randn(2, *model.sample_shape), torch.tensor([10, 900]), default_labels(model, 2)
    buf = io.BytesIO()
    torch.save(model.net, buf)     # catches the flow hook as a closure ("Can't pickle local object")
    buf.seek(0)
    net = torch.load(buf, weights_only=False)
    with torch.no_grad():
        assert torch.equal(model.forward_fn(net, x, t, y), model.forward_fn(model.net, x, t, y))


def test_a_cached_flow_net_called_with_sigma_n_finds_its_steps():
    """Catches the cache runner keying the step on round(σ·N) for a flow network called by a pipeline:
    "the sampler ran timestep 980, the cache policy was made for other timesteps"."""
    from diffpro_cli.cache import CacheSchedule, cached
    from diffpro_cli.sampling import uniform_timesteps

    model = diffpro.load("builtin:flow-mnist", cache=False)
    ts = uniform_timesteps(1000, 4)
    x, y = torch.randn(2, *model.sample_shape), default_labels(model, 2)
    computed = [{0, 1, 2, 3}, {0, 3}, {0, 1, 2, 3}, {0, 1, 2, 3}]
    outs = {}
    for how in ("index", "sigma_n"):
        with torch.no_grad(), cached(model, CacheSchedule(ts, 4, computed)) as run:
            outs[how] = []
            for t in sorted(ts, reverse=True):   # sampling order, as a pipeline's scheduler steps
                tt = torch.tensor([t, t])
                if how == "sigma_n":
                    tt = model.net._diffpro_flow_table[tt]
                outs[how].append(model.forward_fn(model.net, x, tt, y))
            assert run.compute_fraction == 14 / 16   # step 1 ran units 0 and 3 only
    assert all(torch.equal(a, b) for a, b in zip(outs["index"], outs["sigma_n"]))
