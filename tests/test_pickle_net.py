"""`torch.save(model.net)` (pickling the whole network, not its state dict) of a network `diffpro.load`
returned: the timestep hook install_timestep_hook adds must pickle, and work after torch.load."""

import torch

import diffpro
from diffpro_cli.quant import layers


def test_loaded_float_net_pickles_and_computes_the_same(tmp_path):
    """Bugs caught: torch.save(model.net) failing with "Can't pickle local object
    'install_timestep_hook.<locals>.after'" (the hooks were closures); an unpickled network that lost
    the hooks (its static-activation layers would no longer see the call's timestep)."""
    model = diffpro.load("builtin:dit-mnist")
    torch.save(model.net, tmp_path / "net.pt")
    net = torch.load(tmp_path / "net.pt", weights_only=False)
    assert net is not model.net and net._diffpro_timestep_hook

    seen = []
    first = next(m for m in net.modules() if isinstance(m, torch.nn.Linear))
    first.register_forward_hook(lambda mod, args, out: seen.append(layers._TIMESTEPS.get()))
    torch.manual_seed(0)
    x = torch.randn(2, *model.sample_shape)
    t, y = torch.tensor([700, 40]), torch.tensor([3, 8])
    with torch.no_grad():
        expected = model.net(x, timestep=t, class_labels=y).sample
        got = net(x, timestep=t, class_labels=y).sample
    assert torch.equal(got, expected)
    # the unpickled pre-hook handed this call's timestep to the layers, and the post-hook restored it
    assert seen and torch.equal(seen[0], t) and layers._TIMESTEPS.get() is None
