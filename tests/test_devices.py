"""--device: checked once with one error line, recorded where it changes results, and (on a GPU machine,
`make cuda-check`) the whole CLI pipeline run there. The CPU tests here cover the plumbing; the CUDA
test is skipped without a GPU and named in the summary."""

import json

import pytest
import torch

from diffpro_cli.errors import UsageError


def _one_error_line(err):
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.mark.parametrize("command", [["sample", "--n", "1", "--steps", "1"], ["profile", "random:dit-tiny"]])
@pytest.mark.parametrize("device,needle", [("tpu", "use cpu, cuda or cuda:N"), ("meta", "diffpro runs on cpu or cuda")]
                         + ([("cuda", "no CUDA device here")] if not torch.cuda.is_available() else []))
def test_bad_device_is_one_usage_line_and_writes_nothing(cli, tmp_path, command, device, needle):
    # catches: a typo'd device reaching torch (a traceback deep in loading), or the stage starting and
    # leaving a half-made work directory before the device is checked
    rc, _, err = cli(*command, "--device", device, "--out" if command[0] == "sample" else "--workdir",
                     tmp_path / ("x.png" if command[0] == "sample" else "w"))
    assert rc == 2, err
    assert needle in _one_error_line(err)
    assert not any(tmp_path.iterdir())


def test_run_config_device_is_checked_before_any_stage(cli, tmp_path):
    # catches: the config's device key unknown to the run (refused as a typo), or accepted unchecked
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'model = "random:dit-tiny"\nworkdir = "{tmp_path / "w"}"\ndevice = "tpu"\n')
    rc, _, err = cli("run", cfg)
    assert rc == 2 and "--device 'tpu'" in _one_error_line(err)
    assert not (tmp_path / "w").exists()


def test_device_spelling_is_canonical_and_cpu_needs_nothing():
    from diffpro_cli.devices import device_text, resolve_device

    assert device_text(None) == device_text("") == "cpu"
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="no CUDA device here"):
            resolve_device("cuda:0")


def test_a_gpu_run_is_another_result_in_the_lock(tmp_path):
    """A stage run on a GPU records its device in the lock config: the CPU run's artifacts are not "up to
    date" for it (GPU numerics differ), while a CPU run keeps the configs it always had (old locks stay
    valid). The context is built directly so no GPU is needed."""
    from diffpro_cli.stages.context import StageContext

    calls = []

    def stage(ctx):
        out = tmp_path / "w" / "thing.json"

        def compute():
            calls.append(ctx.device)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text("{}")

        return ctx.run_stage("thing", {}, {"k": 1}, {"thing": out}, compute).outcome

    cpu = StageContext("random:dit-tiny", tmp_path / "w")
    gpu = StageContext("random:dit-tiny", tmp_path / "w", device="cuda")
    stage(cpu)
    stage(cpu)                 # up to date: not recomputed
    stage(gpu)                 # another device: recomputed
    assert calls == ["cpu", "cuda"]
    from diffpro_cli.artifacts import Lock

    assert Lock(tmp_path / "w").entry("thing")["config"] == {"k": 1, "device": "cuda"}
    stage(cpu)                 # and back: the CPU's config again, recomputed
    assert calls == ["cpu", "cuda", "cpu"] and Lock(tmp_path / "w").entry("thing")["config"] == {"k": 1}


def test_cost_tables_are_kept_per_device(tmp_path):
    # catches: a GPU run overwriting (or being refused by) the CPU's cost table in the same work directory
    from diffpro_cli.stages.allocate import cost_table_path
    from diffpro_cli.stages.context import StageContext

    assert cost_table_path(StageContext("m", tmp_path)).name == "cost_table.json"
    assert cost_table_path(StageContext("m", tmp_path, device="cuda:1")).name == "cost_table-cuda1.json"


def test_cpu_fingerprint_is_unchanged_by_the_gpu_branch():
    # catches: the CUDA fingerprint fields leaking into CPU tables (every CPU table would re-measure)
    from diffpro_cli.planning.fingerprint import machine_fingerprint

    fp = machine_fingerprint("cpu")
    assert fp["device"] == "cpu" and "gpu" not in fp and "isa_flags" in fp


def test_latency_on_cpu_times_the_call(monkeypatch):
    # catches: the device-aware span (CUDA events) taken on the CPU path, or the sample dropped
    from diffpro_cli.metrics import latency

    ticks = iter([0.0, 0.25, 1.0, 1.5])
    monkeypatch.setattr(latency.time, "perf_counter", lambda: next(ticks))
    out = latency.interleaved({"a": lambda: None}, repeats=2, warmup=0, device="cpu")
    assert out["a"]["min"] == 0.25 and out["a"]["max"] == 0.5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CLI on CUDA needs a GPU (make cuda-check)")
def test_cuda_cli_pipeline_runs_on_the_gpu(cli, tmp_path):
    """The whole pipeline with --device cuda on a tiny model: every stage runs there, the report names the
    GPU, memory comes from the CUDA allocator and the quantized rows run CUDA kernels."""
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'''model = "random:dit-tiny"
workdir = "{tmp_path / 'w'}"
device = "cuda"
[profile]
samples = 4
timesteps = "16"
[score]
measure = true
[prune]
steps = 8
n = 4
[allocate]
budget = "avg-bits=6"
[bench]
fid = false
repeats = 2
rows = "fp32,bf16,w8a8-uniform,ddim,diffpro"
''')
    rc, out, err = cli("run", cfg)
    assert rc == 0, err
    report = json.loads((tmp_path / "w" / "bench" / "report.json").read_text())
    assert report["device"]["kind"] == "cuda" and report["device"]["name"]
    rows = {r["name"]: r for r in report["rows"]}
    assert rows["fp32"]["peak_mem_bytes"] and rows["fp32"]["latency_s_per_image"]["median"] > 0
    assert any(k.startswith("cuda-") for k in rows["w8a8-uniform"]["kernels"]), rows["w8a8-uniform"]["kernels"]
    assert (tmp_path / "w" / "cost_table-cuda.json").exists()
    table = json.loads((tmp_path / "w" / "cost_table-cuda.json").read_text())
    assert table["fingerprint"]["device"] == "cuda" and table["fingerprint"]["gpu"]


def test_an_offloaded_network_runs_where_its_offload_hooks_execute():
    """accelerate's cpu_offload leaves the weights on the meta device and moves them in per call; eps()
    followed the first parameter and sent x to meta ("Cannot copy out of meta tensor"). The hook's
    execution device is where the inputs go (an int is a CUDA index)."""
    from types import SimpleNamespace

    from diffpro_cli.devices import net_device

    net = torch.nn.Sequential(torch.nn.Linear(2, 2, device="meta"))
    assert net_device(net) == torch.device("cpu")            # no hook names a device
    net[0]._hf_hook = SimpleNamespace(hooks=[SimpleNamespace(execution_device=0)])   # a SequentialHook
    assert net_device(net) == torch.device("cuda:0")
    net[0]._hf_hook = SimpleNamespace(execution_device="cpu")
    assert net_device(net) == torch.device("cpu")


def test_eps_of_a_quantized_network_under_accelerate_cpu_offload():
    pytest.importorskip("accelerate", reason="accelerate is not installed (optional)")
    from accelerate import cpu_offload

    from conftest import w8a8_dit_tiny

    m = w8a8_dit_tiny()
    x, t, y = torch.randn(2, *m.sample_shape), torch.tensor([500, 20]), torch.tensor([1, 2])
    with torch.no_grad():
        ref = m.eps(x, t, y)
        cpu_offload(m.net, execution_device=torch.device("cpu"))
        assert next(m.net.parameters()).device.type == "meta"
        out = m.eps(x, t, y)
    assert out.device == x.device and torch.equal(out, ref)
