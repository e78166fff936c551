import os

import pytest
import torch

os.environ.setdefault("CI", "true")  # no progress bars in tests
torch.set_num_threads(1)  # deterministic and fair on shared 2-core machines


@pytest.fixture
def cli(capsys):
    """Run the CLI in-process: returns (exit_code, stdout, stderr)."""
    from diffpro_cli.app import main

    def run(*args):
        code = main([str(a) for a in args])
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


@pytest.fixture(scope="session")
def tiny_dit():
    """Builds the seeded tiny random DiTTransformer2DModel the export tests save, quantize and compare."""
    def build():
        from diffusers import DiTTransformer2DModel

        torch.manual_seed(0)
        return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                     num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10).eval()

    return build


class TinyEps(torch.nn.Module):
    """A tiny conditional noise predictor: fast enough for 1000-step sampler tests."""

    def __init__(self, channels=1, classes=10):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(channels, channels, 3, padding=1)
        self.temb = torch.nn.Linear(1, channels)
        self.cemb = torch.nn.Embedding(classes + 1, channels)

    def forward(self, x, t, y):
        h = self.conv(x) + self.temb(t.float().view(-1, 1) / 1000).view(-1, x.shape[1], 1, 1)
        if y is not None:
            h = h + self.cemb(y).view(-1, x.shape[1], 1, 1)
        return torch.tanh(h)


@pytest.fixture
def tiny_model():
    from diffpro_cli.models.base import DiffusionModel, linear_alphas_cumprod

    return DiffusionModel(spec="test:tiny", net=TinyEps().eval(), kind="custom", sample_shape=(1, 8, 8),
                          alphas_cumprod=linear_alphas_cumprod(), num_classes=10,
                          forward_fn=lambda net, x, t, y: net(x, t, y))


@pytest.fixture
def stand_in_inception(monkeypatch):
    """A seeded 2048-d feature net in place of InceptionV3 (no weights download): FID code paths only."""
    import torch
    from torch import nn

    from diffpro_cli.metrics import fid

    torch.manual_seed(0)
    net = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(48, 2048), nn.ReLU()).eval()
    net.weights_source = "stand-in (tests)"   # fid-stats records where the Inception weights came from
    monkeypatch.setattr(fid, "load_inception", lambda weights=None, device="cpu": net)
    return net


@pytest.fixture(scope="session")
def tiny_allocated(tmp_path_factory):
    """A random:dit-tiny workdir through profile, score and allocate (avg-bits=6; a cost table timed at
    batch 1, one round), made once; copy it before changing anything (allocated_work)."""
    from diffpro_cli.app import main

    work = tmp_path_factory.mktemp("allocated")
    assert main(["profile", "random:dit-tiny", "-w", str(work), "--samples", "2", "--timesteps", "3", "-q"]) == 0
    assert main(["score", "-w", str(work), "-q"]) == 0
    assert main(["allocate", "-w", str(work), "--budget", "avg-bits=6", "--repeats", "1", "--batch", "1", "-q"]) == 0
    return work


@pytest.fixture(scope="session")
def tiny_pruned(tiny_allocated, tmp_path_factory):
    """tiny_allocated without its plan, pruned to 4 steps with a sweep of 2 and 6 (n 2, 20 reference
    steps), made once; copy it before writing into it."""
    import shutil

    from diffpro_cli.app import main

    work = tmp_path_factory.mktemp("pruned") / "w"
    shutil.copytree(tiny_allocated, work)
    (work / "plan.json").unlink()
    assert main(["prune", "random:dit-tiny", "-w", str(work), "--steps", "4", "--sweep", "2,6", "--n", "2",
                 "--reference-steps", "20", "-q"]) == 0
    return work


@pytest.fixture
def allocated_work(tiny_allocated, tmp_path):
    """A private copy of tiny_allocated without its plan.json (the next allocate computes)."""
    import shutil

    dst = tmp_path / "w"
    shutil.copytree(tiny_allocated, dst)
    (dst / "plan.json").unlink()
    return dst


def w8a8_dit_tiny(seed: int = 2):
    """random:dit-tiny loaded through diffpro.load with every Linear W8A8 (dynamic activations) in place
    (diffpro.quantize_): the smallest real integer network for API-level tests."""
    import diffpro

    model = diffpro.load("random:dit-tiny", seed=seed)
    plan = {"layers": {n: {"weight_bits": 8, "act_bits": 8, "act_mode": "dynamic"}
                       for n, (m, _) in model.quantizable_layers().items() if isinstance(m, torch.nn.Linear)}}
    return diffpro.quantize_(model, plan)
