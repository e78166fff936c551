"""The timestep hook `diffpro.load` installs (api.install_timestep_hook) with threads calling one network
at once, as a server does: each call's static-activation layers see that call's timestep."""

import threading

import torch
from torch import nn

import diffpro
from diffpro_cli.quant.layers import quantize_module


class _StaticNet(nn.Module):
    """One static-activation layer whose calibrated range differs by timestep (t=0: tiny, t=999: wide)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = quantize_module(nn.Linear(16, 16), 8, act_mode="static", static_absmax=1.0)
        self.lin.set_static_ranges([0, 999], [0.05, 4.0])
        self.lin.prepare("cpu")

    def forward(self, x, timestep):
        return self.lin(x)


def test_threads_calling_one_network_each_get_their_own_timestep():
    # catches: the hook's shared stack of timestep contexts, from which concurrent calls popped (and
    # exited) each other's: "ValueError: <Token ...> was created in a different Context" in the threads,
    # or a static layer quantizing with another call's timestep range
    net = diffpro.install_timestep_hook(_StaticNet())
    x = torch.randn(4, 16)
    with torch.no_grad():
        expected = {t: net(x, torch.tensor([t] * 4)) for t in (0, 999)}
    assert not torch.equal(expected[0], expected[999])    # the timestep really changes the output
    errors, wrong = [], []

    def work(t):
        try:
            with torch.no_grad():
                for _ in range(200):
                    if not torch.equal(net(x, torch.tensor([t] * 4)), expected[t]):
                        wrong.append(t)
        except Exception as e:   # noqa: BLE001 - reported below, with the thread's error
            errors.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=work, args=(t,)) for t in (0, 999, 0, 999)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == [] and wrong == []


def test_an_inner_network_whose_pre_hook_failed_leaves_the_outer_calls_timestep():
    """Catches the exit hook popping a context its own pre-hook never entered (an earlier pre-hook, e.g.
    a cache runner's, raised first): it left the outer network's context, so the outer call's static
    layers went on with no timestep (their widest range) and torch printed a silenced-exception warning."""
    from diffpro_cli.quant import layers

    inner = diffpro.install_timestep_hook(_StaticNet())

    def refuse(module, args, kwargs):
        raise RuntimeError("refused before the timestep hook")
    inner.register_forward_pre_hook(refuse, with_kwargs=True, prepend=True)
    seen = []

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = inner

        def forward(self, x, timestep):
            try:
                self.inner(x, timestep)
            except RuntimeError:
                pass
            seen.append(layers._TIMESTEPS.get())
            return x

    outer = diffpro.install_timestep_hook(Outer())
    with torch.no_grad():
        outer(torch.randn(2, 16), torch.tensor([999, 999]))
    assert seen[0] is not None and seen[0].tolist() == [999, 999]


def test_a_strided_timestep_tensor_reaches_the_layers_contiguous():
    """DiTPipeline passes the timestep as a strided view (t.expand / a slice); the static layers' searchsorted
    then printed torch's non-contiguous-input UserWarning once per process. The context stores it contiguous."""
    import warnings

    from diffpro_cli.quant.layers import _TIMESTEPS, _nearest, timestep_context

    strided = torch.arange(10)[::2]
    assert not strided.is_contiguous()
    with timestep_context(strided), warnings.catch_warnings():
        warnings.simplefilter("error")
        ts = _TIMESTEPS.get()
        assert ts.is_contiguous() and ts.tolist() == [0, 2, 4, 6, 8]
        assert _nearest(torch.tensor([0.0, 4.0, 8.0]), ts).tolist() == [0, 1, 1, 2, 2]   # ties go up
