"""bench's energy column: a counter window holding exactly the timed repeats, energy scaled like
latency under --latency-steps, and the NVML meter letting an error in the timed code through."""

import sys
import types
from contextlib import contextmanager

import pytest

from diffpro_cli.metrics import energy as E
from diffpro_cli.stages import bench as B


@pytest.fixture
def step_counter(monkeypatch):
    """A fake energy counter: 1 J per image-step sampled inside its window (the sampler is counted)."""
    done = {"image_steps": 0}
    real_sample = B.sample

    def counted(model, n, timesteps, *args, **kwargs):
        done["image_steps"] += n * len(timesteps)
        return real_sample(model, n, timesteps, *args, **kwargs)

    @contextmanager
    def meter(device="cpu"):
        result = {"joules": None, "source": "fake", "note": None}
        start = done["image_steps"]
        yield result
        result["joules"] = float(done["image_steps"] - start)

    monkeypatch.setattr(B, "sample", counted)
    monkeypatch.setattr(E, "energy_meter", meter)
    return done


@pytest.mark.parametrize("repeats, latency_steps", [(1, None), (2, 2)])
def test_energy_per_image_is_the_timed_repeats_energy_over_the_rows_full_steps(tiny_model, step_counter,
                                                                               repeats, latency_steps):
    """Catches: the warm-up sampled inside the counter's window but divided over the timed images only
    (x2 at --repeats 1), and --latency-steps scaling latency to the row's steps but not its energy
    (x K/latency_steps too low). At 1 J per image-step, a 4-step row must cost 4 J per image."""
    ts = [249, 499, 749, 999]
    row = B.Row("fp32", tiny_model, ts, len(ts), 1, 32.0, "fp32:test")
    cfg = B.BenchConfig(rows=["fp32"], repeats=repeats, latency_batch=2, latency_steps=latency_steps)
    out = B.measure_latency([row], cfg)
    assert out["fp32"]["energy"] == pytest.approx(4.0)


def test_nvml_meter_lets_an_error_in_the_timed_code_through_and_reads_the_counter(monkeypatch):
    """Catches: the body's exception thrown into the generator inside its try, caught by `except
    Exception`, which then yielded again: contextlib raised "generator didn't stop after throw()"
    and hid the real error (a CUDA out-of-memory while timing)."""
    readings = iter([1000, 3500])   # mJ
    fake = types.SimpleNamespace(nvmlInit=lambda: None, nvmlDeviceGetHandleByIndex=lambda i: "gpu0",
                                 nvmlDeviceGetTotalEnergyConsumption=lambda h: next(readings))
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    with E.energy_meter("cuda") as result:
        pass
    assert result["joules"] == pytest.approx(2.5) and result["source"] == "nvml total energy"
    readings = iter([1000, 3500])
    with pytest.raises(RuntimeError, match="CUDA out of memory"):
        with E.energy_meter("cuda:0"):
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
