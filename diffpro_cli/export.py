"""Export a diffpro quantized checkpoint to where users serve: a diffusers model folder, or torchao.

* `diffusers`: OUT/config.json is the network's diffusers config (`_class_name`, every architecture
  field) plus a `quantization_config` (`quant_method: "diffpro"`, the per-layer plan, the format), next
  to diffpro's own integer files (diffpro.json, model.safetensors). `diffpro.load(OUT)` (or
  `diffpro_cli.loading.load_model(OUT)`) loads it with the integer kernels; in a diffusers pipeline:
  `pipe.transformer = diffpro.load(OUT).net`; after `diffpro.register_diffusers_quantizer()`, the
  class's own `from_pretrained(OUT)` too (diffusers_quantizer.py; diffusion_pytorch_model.safetensors
  is a hard link to model.safetensors). The integer tensors are the checkpoint's own: no float
  copy is written, so the folder stays as small as the checkpoint.
* `torchao`: OUT/model.safetensors holds float weights DEQUANTIZED from diffpro's integers (torchao
  starts from diffpro's rounding, GPTQ or nearest, with the same groups or per-channel scales, but
  re-rounds it: its symmetric scale is max/7.5 (int4) or max/127.5 (int8) where diffpro's is max/7 or
  max/127, so its weights differ from diffpro's by up to half a step: measured 1/15 (int4) and 1/255
  (int8) of a row's largest weight on a tiny DiT, torchao 0.18) and
  OUT/torchao_config.json maps every quantized module's fully qualified name to the torchao config
  that runs the same precision (W8A8 dynamic, per channel → Int8DynamicActivationInt8WeightConfig, weight-only int8
  → Int8WeightOnlyConfig, 4-bit or grouped weights with int8 activations → Int8DynamicActivationIntxWeightConfig,
  other weight-only widths → IntxWeightOnlyConfig). `torchao_config(OUT)` rebuilds it as an
  `FqnToConfig` for `torchao.quantization.quantize_`. Layers torchao has no config for (Conv2d, static
  activations) are listed under "skipped" and stay float there.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from diffpro_cli.artifacts import atomic_save_safetensors, atomic_write_json, cannot_write, ensure_dir, read_json
from diffpro_cli.errors import InputError, UsageError

TARGETS = ("diffusers", "torchao")
TORCHAO_SCHEMA = "diffpro.torchao/1"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"   # the file name diffusers' from_pretrained reads


def _meta(qdir: Path) -> dict:
    """The checkpoint's diffpro.json (schema, format version and its layer table checked), after a look at
    model.safetensors' header: a corrupt checkpoint stops here, before anything is written."""
    if not (qdir / "diffpro.json").is_file() or not (qdir / "model.safetensors").is_file():
        if (qdir / "quantized" / "diffpro.json").is_file():   # a workdir: its checkpoint is one level down
            raise InputError(f"{qdir}: is a diffpro workdir, not a checkpoint; export its checkpoint: {qdir / 'quantized'}")
        raise InputError(f"{qdir}: not a diffpro quantized checkpoint (diffpro.json + model.safetensors); run `diffpro quantize` first")
    from safetensors import safe_open

    from diffpro_cli.checkpoint import read_meta

    meta = read_meta(qdir)
    try:
        with safe_open(str(qdir / "model.safetensors"), framework="pt") as f:
            f.keys()
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for a damaged header
        raise InputError(f"{qdir / 'model.safetensors'}: unreadable ({str(exc).splitlines()[0][:80]}); re-run `diffpro quantize`") from None
    return meta


def _check_out(qdir: Path, out: Path) -> None:
    """Refuse an OUT whose replacement would delete what the user still needs: the checkpoint itself
    (OUT is QDIR or a folder above it) or the current directory (`diffpro export Q . --force` emptied it)."""
    q, o = qdir.resolve(), out.resolve()
    if o == q or o in q.parents:
        raise UsageError(f"{out}: holds the checkpoint {qdir}, which the export would delete; choose another folder for the export")
    if out.exists() and (o == Path.cwd().resolve() or o in Path.cwd().resolve().parents):
        raise UsageError(f"{out}: is (or holds) the current directory, which the export would replace; "
                         f"choose a new folder for the export, e.g. ./exported")


@contextmanager
def _staged_dir(out: Path, force: bool):
    """Yields an empty folder beside `out` to write the export into; renamed to `out` when the block ends
    cleanly (replacing an existing `out` only with --force), removed otherwise: a failed export (a corrupt
    checkpoint, a full disk) leaves nothing half-written at `out`. An old `out` is moved aside before the
    rename and deleted after it, so no moment leaves neither the old folder nor the new one."""
    out = Path(os.path.abspath(out))    # Path(".").name is "": the staging folder and the rename need a real name
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out}: is a file, not a folder; choose another folder for the export")
    if out.exists() and any(out.iterdir()) and not force:
        raise UsageError(f"{out}: exists and is not empty; choose another folder or pass --force to overwrite")
    parent = ensure_dir(out.parent)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=parent))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)   # mkdtemp's 0700 would otherwise become the export's mode
    except OSError as exc:
        raise cannot_write(parent, exc) from None
    try:
        yield tmp
        old = tmp.with_name(tmp.name[:-len(".tmp")] + ".old") if out.exists() else None
        try:
            if old is not None:
                out.rename(old)
            tmp.rename(out)
        except OSError as exc:
            if old is not None and old.exists() and not out.exists():
                old.rename(out)
            raise cannot_write(out, exc) from None
        if old is not None and old.is_symlink():   # OUT was a link to a folder: the link is what was replaced
            old.unlink()
        elif old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def export_diffusers(qdir: str | Path, out: str | Path, force: bool = False) -> dict:
    """Write the diffusers model folder (module docstring); returns its config.json."""
    qdir, out = Path(qdir), Path(out)
    meta = _meta(qdir)
    arch = (meta.get("model") or {}).get("architecture") or {}
    if arch.get("builder") != "diffusers":
        raise UsageError(f"{qdir}: its network is not a diffusers model ({arch.get('builder') or 'unknown'} builder); "
                         f"only diffusers networks export to a diffusers folder: use --to torchao")
    layers = {name: {k: rec.get(k) for k in ("type", "weight_bits", "act_bits", "act_mode", "group_size", "kernel")}
              for name, rec in (meta.get("layers") or {}).items()}
    config = {"_class_name": arch["class"], **arch["config"],
              "quantization_config": {"quant_method": "diffpro", "format": meta.get("schema"),
                                      "layers": layers, "patches": arch.get("patches") or {},
                                      "load_with": "diffpro.load(path)"}}
    if out.resolve() == qdir.resolve():   # in the checkpoint's own folder: add the diffusers files beside it
        _write_diffusers(qdir, meta, out, config)
        return config
    _check_out(qdir, out)
    with _staged_dir(out, force) as tmp:
        for name in ("diffpro.json", "model.safetensors"):
            _copy(qdir / name, tmp / name, out)
        _write_diffusers(qdir, meta, tmp, config)
    return config


def _write_diffusers(qdir: Path, meta: dict, out: Path, config: dict) -> None:
    _link_diffusers_weights(out)
    atomic_write_json(out / "config.json", config)
    export_schedule(qdir, meta, out)


def _link_diffusers_weights(out: Path) -> None:
    """diffusers' from_pretrained reads `diffusion_pytorch_model.safetensors`: a hard link to
    model.safetensors (the same bytes, no second copy; a copy where the filesystem has no hard links)."""
    tmp = out / f".{DIFFUSERS_WEIGHTS}.tmp"
    tmp.unlink(missing_ok=True)
    try:
        os.link(out / "model.safetensors", tmp)
    except OSError:
        _copy(out / "model.safetensors", tmp, out)
    tmp.replace(out / DIFFUSERS_WEIGHTS)


def _copy(src: Path, dst: Path, out: Path) -> None:
    """shutil.copyfile with cannot_write's one line (a full disk while copying the weights) for the traceback."""
    try:
        shutil.copyfile(src, dst)
    except OSError as exc:
        raise cannot_write(out, exc) from None


def export_schedule(qdir: Path, meta: dict, out: Path) -> dict | None:
    """The plan's timesteps for diffusers: `scheduler/scheduler_config.json` and `diffpro_schedule.json`
    (the kept timesteps, high to low, and the `set_timesteps` arguments that walk them).

    * epsilon / v-prediction models: EulerDiscreteScheduler with the model's own betas and prediction
      type. Euler in σ-space on these timesteps is DDIM (η = 0) on the same subset, which is diffpro's
      sampler without x0 clipping; diffusers' DDIMScheduler cannot take an arbitrary subset (it steps
      by a fixed stride).
    * flow models: FlowMatchEulerDiscreteScheduler with the model's shift (a flow model's ᾱ reaches 0
      at σ = 1, an infinite σ for EulerDiscreteScheduler). It shifts the sigmas it is given, so
      `set_timesteps` gets the unshifted (t + 1)/N and lands on diffpro's σ_t; its Euler step is
      diffpro's flow Euler step."""
    timesteps = meta.get("timesteps")
    if not timesteps:
        return None
    import torch

    from diffpro_cli.loading import load_model

    model = load_model(qdir)
    kept = sorted((int(t) for t in timesteps), reverse=True)
    n = int(model.num_train_timesteps)
    if model.is_flow:
        sched = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": n,
                 "shift": float(model.flow_shift), "use_dynamic_shifting": False}
        call = {"sigmas": [(t + 1) / n for t in kept]}
        same = "diffpro's flow Euler sampler on these timesteps"
    else:
        ac = model.alphas_cumprod.double()
        betas = 1.0 - ac / torch.cat([torch.ones(1, dtype=ac.dtype), ac[:-1]])
        sched = {"_class_name": "EulerDiscreteScheduler", "num_train_timesteps": int(ac.numel()),
                 "trained_betas": [float(b) for b in betas], "prediction_type": model.prediction_type}
        call = {"timesteps": kept}
        same = "diffpro's DDIM (eta 0) on these timesteps, without x0 clipping"
    (out / "scheduler").mkdir(exist_ok=True)
    atomic_write_json(out / "scheduler" / "scheduler_config.json", sched)
    arg = next(iter(call))
    doc = {"timesteps": kept, "set_timesteps": call,
           "usage": f"{sched['_class_name']}.from_pretrained(OUT, subfolder='scheduler').set_timesteps({arg}=set_timesteps['{arg}'])",
           "equivalent_to": same}
    atomic_write_json(out / "diffpro_schedule.json", doc)
    return doc


def diffusers_scheduler(path: str | Path):
    """The exported folder's scheduler (the class its scheduler_config.json names) with the plan's
    timesteps already set."""
    import diffusers

    path = Path(path)
    doc = read_json(path / "diffpro_schedule.json", missing="export with a checkpoint that has timesteps (diffpro prune, then quantize)")
    name = read_json(path / "scheduler" / "scheduler_config.json", missing="export the checkpoint again").get("_class_name", "EulerDiscreteScheduler")
    cls = getattr(diffusers, name, None)
    if cls is None:
        raise InputError(f"{path / 'scheduler'}: this diffusers has no {name}; upgrade diffusers or export again")
    sched = cls.from_pretrained(str(path), subfolder="scheduler")
    sched.set_timesteps(**(doc.get("set_timesteps") or {"timesteps": doc["timesteps"]}))
    return sched


def torchao_entry(rec: dict, kind: str) -> tuple[dict | None, str | None]:
    """The torchao config (type name + kwargs) that runs a diffpro layer's precision, or (None, why)."""
    w, a, mode, group = int(rec.get("weight_bits", 16)), int(rec.get("act_bits", 16)), rec.get("act_mode"), rec.get("group_size")
    if w >= 16:
        return None, "kept in full precision"
    if kind != "linear":
        return None, "torchao's configs quantize Linear layers; this Conv2d stays float there"
    if a < 16 and mode == "static":
        return None, "static (per-timestep calibrated) activations have no torchao config; stays float there"
    if a < 16:
        if w == 8 and not group:   # torchao's int8 x int8 config has per-row weights only: groups go below
            return {"type": "Int8DynamicActivationInt8WeightConfig", "kwargs": {}}, None
        return {"type": "Int8DynamicActivationIntxWeightConfig",
                "kwargs": {"weight_dtype": f"int{w}", "group_size": group}}, None
    if w == 8:
        return {"type": "Int8WeightOnlyConfig", "kwargs": {"group_size": group}}, None
    return {"type": "IntxWeightOnlyConfig", "kwargs": {"weight_dtype": f"int{w}", "group_size": group}}, None


def export_torchao(qdir: str | Path, out: str | Path, force: bool = False, trust_code: bool = False) -> dict:
    """Write OUT/model.safetensors (dequantized float weights) and OUT/torchao_config.json."""
    qdir, out = Path(qdir), Path(out)
    meta = _meta(qdir)
    _check_out(qdir, out)
    from diffpro_cli.checkpoint import load_quantized

    model = load_quantized(qdir, trust_code=trust_code, keep_integers=True)
    state = {}
    for name, tensor in float_state_dict(model.net).items():
        state[name] = tensor.contiguous()
    mapping, skipped = {}, {}
    for name, rec in (meta.get("layers") or {}).items():
        entry, why = torchao_entry(rec, str(rec.get("type", "linear")).lower())
        if entry is None:
            if int(rec.get("weight_bits", 16)) < 16:
                skipped[name] = why
            continue
        mapping[name] = entry
    doc = {"schema": TORCHAO_SCHEMA, "source": str(qdir), "architecture": (meta.get("model") or {}).get("architecture"),
           "fqn_to_config": mapping, "skipped": skipped,
           "weights": "float, dequantized from diffpro's stored integers (torchao re-quantizes them on load)"}
    with _staged_dir(out, force) as tmp:
        atomic_save_safetensors(tmp / "model.safetensors", state, {"diffpro_schema": TORCHAO_SCHEMA})
        atomic_write_json(tmp / "torchao_config.json", doc)
    return doc


def float_state_dict(net) -> dict:
    """The network's state dict with every diffpro quant layer replaced by its dequantized float
    weight and bias (the names a float network of the same architecture expects)."""
    out = {}
    quant = {n: m for n, m in net.named_modules() if getattr(m, "is_diffpro_quant", False)}
    for name, tensor in net.state_dict(keep_vars=False).items():
        owner = next((q for q in quant if name.startswith(q + ".")), None)
        if owner is None and tensor.is_floating_point():
            out[name] = tensor.detach().float().cpu()
    for name, layer in quant.items():
        out[f"{name}.weight"] = layer.dequantized_weight().detach().float().cpu().reshape(layer.weight_shape)
        if getattr(layer, "bias", None) is not None:
            out[f"{name}.bias"] = layer.bias.detach().float().cpu()
    embeds = {n: m for n, m in net.named_modules() if type(m).__name__ == "Int8Embedding"}
    for name, emb in embeds.items():
        out[f"{name}.weight"] = (emb.qweight.float() * emb.scale.float().reshape(-1, 1)).cpu()
        for key in [k for k in out if k.startswith(name + ".") and k != f"{name}.weight"]:
            del out[key]
    return out


# the keyword each config takes its weight granularity by: diffpro's groups, or one scale per output
# channel (torchao's own default for Int8DynamicActivationIntxWeightConfig is groups of 32, another grid,
# and refused for layers narrower than 32)
_GRANULARITY_ARG = {"Int8DynamicActivationIntxWeightConfig": "weight_granularity", "IntxWeightOnlyConfig": "granularity",
                    "Int8WeightOnlyConfig": "granularity"}


def _granularity(config: str, group_size):
    from torchao.quantization.granularity import PerAxis, PerGroup, PerRow

    if group_size:
        return PerGroup(int(group_size))
    return PerRow() if config == "Int8WeightOnlyConfig" else PerAxis(0)   # both: one scale per output row


def torchao_config(path: str | Path):
    """torchao's FqnToConfig from an exported folder's torchao_config.json (needs `pip install torchao`)."""
    try:
        import torch
        import torchao.quantization as tq
    except ImportError:
        raise UsageError("torchao is not installed; pip install torchao (or diffpro[torchao])") from None
    doc = read_json(Path(path) / "torchao_config.json", TORCHAO_SCHEMA)
    configs = {}
    for fqn, entry in doc["fqn_to_config"].items():
        cls = getattr(tq, entry["type"], None)
        if cls is None:
            raise UsageError(f"this torchao has no {entry['type']}; upgrade torchao")
        kwargs = {k: v for k, v in entry["kwargs"].items() if k != "group_size"}
        if "weight_dtype" in kwargs:
            kwargs["weight_dtype"] = getattr(torch, kwargs["weight_dtype"])
        if entry["type"] in _GRANULARITY_ARG:
            kwargs[_GRANULARITY_ARG[entry["type"]]] = _granularity(entry["type"], entry["kwargs"].get("group_size"))
        configs[fqn] = cls(**kwargs)
    return tq.FqnToConfig(fqn_to_config=configs)
