"""Peak memory of loading (and running) a model, measured in a fresh process. Linux only (/proc).

In-process RSS growth is meaningless after the first model: the allocator reuses the heap that an
earlier model freed, so a later load "costs" 0 bytes. And getrusage's ru_maxrss is carried over
fork + exec, so a child must read its own VmHWM.
"""

from __future__ import annotations

import torch


def vm_hwm_bytes() -> int | None:
    """This process's own peak resident set size (Linux /proc/self/status VmHWM)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def subprocess_peak(spec: str, batch: int, steps: int = 2, trust_code: bool = False, weights: str | None = None,
                    timeout: float = 900, ui=None, conditioning: str | None = None, device: str = "cpu") -> dict:
    """{"load_bytes", "run_bytes", "method"}: growth of a fresh process's peak RSS while loading `spec`
    (every tensor touched) and then while sampling one batch of `batch` over `steps` steps (steps 0:
    load only, run_bytes = load_bytes). Growth is counted from after the libraries are imported.
    On a CUDA `device`: the peak bytes torch's CUDA allocator handed out (torch.cuda.max_memory_allocated)
    after the load and over the run instead. Values are None where it failed. With `ui` (a console.UI),
    a heartbeat line while the child runs."""
    import json
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "diffpro_cli.metrics.memory", spec, str(batch), str(steps)]
    if trust_code:
        cmd.append("--trust-code")
    if weights:
        cmd += ["--weights", str(weights)]
    if conditioning:      # a text-conditioned model samples on its prompt embeddings
        cmd += ["--conditioning", str(conditioning)]
    gpu = str(device).startswith("cuda")
    if gpu:
        cmd += ["--device", str(device)]
    method = ("fresh process: CUDA allocator peak (torch.cuda.max_memory_allocated; load, then + one sampling batch)" if gpu else
              "fresh process: VmHWM growth after imports (load: every tensor touched; run: + one sampling batch)")
    from contextlib import nullcontext

    try:
        with ui.heartbeat(f"memory: measuring {spec} in a fresh process") if ui is not None else nullcontext():
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=True)
        result = json.loads(out.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError, OSError) as exc:
        return {"load_bytes": None, "run_bytes": None, "method": f"failed: {type(exc).__name__}"}
    return {**result, "method": method}


def _child(argv: list[str]) -> None:
    import json

    spec, batch, steps = argv[0], int(argv[1]), int(argv[2])
    kwargs = {"trust_code": "--trust-code" in argv}
    if "--weights" in argv:
        kwargs["weights"] = argv[argv.index("--weights") + 1]
    import diffusers  # noqa: F401  (library code, not weights)
    from diffusers import DiTTransformer2DModel, UNet2DModel  # noqa: F401
    from diffpro_cli.loading import load_model
    from diffpro_cli.sampling import SamplerConfig, sample, uniform_timesteps

    device = argv[argv.index("--device") + 1] if "--device" in argv else "cpu"
    if device.startswith("cuda"):
        _child_cuda(spec, batch, steps, device, kwargs, argv)
        return
    base = vm_hwm_bytes()
    model = load_model(spec, **kwargs)
    if "--conditioning" in argv:
        model.with_conditioning(argv[argv.index("--conditioning") + 1])
    with torch.no_grad():
        for t in list(model.net.parameters()) + list(model.net.buffers()):   # fault in mapped weights
            float(t.float().sum()) if t.is_floating_point() else int(t.sum())
    loaded = vm_hwm_bytes()
    if steps > 0:
        sample(model, batch, uniform_timesteps(model.num_train_timesteps, steps), SamplerConfig(), seed=0, batch_size=batch)
    ran = vm_hwm_bytes()
    print(json.dumps({"load_bytes": loaded - base, "run_bytes": ran - base}))


def _child_cuda(spec: str, batch: int, steps: int, device: str, kwargs: dict, argv: list[str]) -> None:
    """The CUDA variant of _child: allocator peaks on the GPU (the host's RSS says nothing about it)."""
    import json

    from diffpro_cli.devices import peak_memory_bytes, reset_peak_memory
    from diffpro_cli.loading import load_model
    from diffpro_cli.sampling import SamplerConfig, sample, uniform_timesteps

    torch.cuda.init()
    reset_peak_memory(device)
    model = load_model(spec, device=device, **kwargs)
    if "--conditioning" in argv:
        model.with_conditioning(argv[argv.index("--conditioning") + 1])
    loaded = peak_memory_bytes(device)
    if steps > 0:
        sample(model, batch, uniform_timesteps(model.num_train_timesteps, steps), SamplerConfig(), seed=0, batch_size=batch)
    ran = peak_memory_bytes(device)
    print(json.dumps({"load_bytes": loaded, "run_bytes": ran}))


if __name__ == "__main__":
    import sys

    _child(sys.argv[1:])
