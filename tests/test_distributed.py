import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from diffpro_cli.distributed import backend_for, shard_range, sharded_map
from diffpro_cli.errors import UsageError


def _features(model, start, count):
    """Samples [start, start+count) of a seeded sampler, then a fixed random projection as 'features'."""
    from diffpro_cli.sampling import sample

    x = sample(model, count, [0, 400, 999], seed=7, batch_size=3, first_index=start)
    proj = torch.Generator().manual_seed(0)
    w = torch.randn(x[0].numel(), 16, generator=proj)
    return (x.flatten(1) @ w).double().numpy()


def _worker(rank, world, port, out_dir):
    import torch.distributed as dist

    from tests.conftest import TinyEps
    from diffpro_cli.models.base import DiffusionModel, linear_alphas_cumprod

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model = DiffusionModel(spec="t", net=TinyEps().eval(), kind="custom", sample_shape=(1, 8, 8),
                           alphas_cumprod=linear_alphas_cumprod(), num_classes=10,
                           forward_fn=lambda net, x, t, y: net(x, t, y))
    merged = sharded_map(7, lambda s, c: _features(model, s, c))
    np.save(os.path.join(out_dir, f"rank{rank}.npy"), merged)
    dist.destroy_process_group()


def _failing_worker(rank, world, port, out_dir):
    """Rank 1's share raises (a user's error); every rank records what sharded_map did."""
    from datetime import timedelta

    import torch.distributed as dist

    from diffpro_cli.errors import InputError

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=20))

    def work(start, count):
        if rank == 1:
            raise InputError("bench/fid-cache: no space left on device")
        return np.zeros((count, 2))

    try:
        sharded_map(5, work)
        outcome = "returned"
    except Exception as exc:  # noqa: BLE001 - recorded for the test
        outcome = f"{type(exc).__name__}|{getattr(exc, 'exit_code', None)}|{exc}"
    with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
        f.write(outcome)
    dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_shard_ranges_cover_everything_once():
    for n in (0, 1, 7, 10):
        for world in (1, 2, 3):
            got = [i for r in range(world) for i in range(*shard_range(n, r, world))]
            assert got == list(range(n))


def test_two_gloo_processes_equal_single_process(tmp_path, tiny_model):
    single = _features(tiny_model, 0, 7)
    mp.start_processes(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    for r in range(2):
        merged = np.load(tmp_path / f"rank{r}.npy")
        assert merged.shape == single.shape
        np.testing.assert_allclose(merged, single, rtol=1e-5, atol=1e-5)


def test_a_failing_shard_fails_every_rank_with_its_error_instead_of_a_hang(tmp_path):
    """Catches: a rank whose share raised skipping the all-gather, so the others died inside the
    collective with gloo's RuntimeError (peer gone, or the process group's timeout, 30 min by default
    if the failed rank lingers): a traceback, exit 1, not saying what went wrong. Now every rank raises
    at once, the others naming the failed rank, its error and its exit code (3 here, an input error)."""
    mp.start_processes(_failing_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    failed = (tmp_path / "rank1.txt").read_text()
    assert failed.startswith("InputError|3|") and "no space left" in failed
    name, code, message = (tmp_path / "rank0.txt").read_text().split("|", 2)
    assert (name, code) == ("DiffproError", "3")
    assert "rank 1 of 2 failed" in message and "no space left on device" in message


def test_backend_follows_the_run_device_not_gpu_presence(monkeypatch):
    """A CPU run gets gloo even on a machine with CUDA (nccl cannot gather CPU tensors); only cuda gets nccl."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("DIFFPRO_DEVICE", raising=False)
    assert backend_for() == "gloo"
    assert backend_for("cpu") == "gloo" and backend_for(torch.device("cpu")) == "gloo"
    assert backend_for("cuda") == "nccl" and backend_for("cuda:1") == "nccl"
    monkeypatch.setenv("DIFFPRO_DEVICE", "cuda")
    assert backend_for() == "nccl"
    monkeypatch.setenv("DIFFPRO_DEVICE", "cpu")
    assert backend_for() == "gloo"


def test_backend_refuses_cuda_without_cuda_and_unknown_devices(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UsageError, match="CUDA is not available"):
        backend_for("cuda")
    with pytest.raises(UsageError, match="not a torch device"):
        backend_for("gpu0")


def test_the_process_group_waits_longer_than_rank_0s_timing_and_memory_phase(monkeypatch):
    """Catches: init_process_group with torch's default timeout (gloo 30 min, nccl 10 min) while bench's
    other ranks wait in a barrier for rank 0 to time every row and measure each row's memory in a fresh
    process: a large model's sharded bench died of a collective timeout before FID sampling began."""
    import torch.distributed as dist

    from diffpro_cli import distributed as D

    seen = {}
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: seen.update(kw))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv(D.TIMEOUT_ENV, raising=False)
    D.init_from_env("cpu")
    assert seen["backend"] == "gloo" and seen["timeout"].total_seconds() >= 3 * 3600
    monkeypatch.setenv(D.TIMEOUT_ENV, "7200")
    D.init_from_env("cpu")
    assert seen["timeout"].total_seconds() == 7200
    monkeypatch.setenv(D.TIMEOUT_ENV, "soon")
    with pytest.raises(UsageError, match="DIFFPRO_DIST_TIMEOUT_S"):
        D.init_from_env("cpu")
