"""Bad input to the library functions (`import diffpro`): one diffpro error naming the problem and the
fix, raised before anything is changed, never an AttributeError/TypeError from deep inside."""

import pytest
import torch

import diffpro
from diffpro_cli.errors import UsageError


def test_functions_taking_a_loaded_model_refuse_anything_else():
    # catches: diffpro.compile / set_compute_dtype given a spec string or a bare module failing with
    # "'str' object has no attribute 'net'", and install_timestep_hook / quantize_ with one about
    # 'register_forward_pre_hook' / 'named_modules'
    with pytest.raises(UsageError, match=r"diffpro\.compile: expected a DiffusionModel, got str; load it first"):
        diffpro.compile("random:dit-tiny")
    with pytest.raises(UsageError, match=r"diffpro\.set_compute_dtype: expected a DiffusionModel, got Linear"):
        diffpro.set_compute_dtype(torch.nn.Linear(2, 2), "bfloat16")
    with pytest.raises(UsageError, match=r"diffpro\.install_timestep_hook: expected a DiffusionModel or an nn\.Module, got str"):
        diffpro.install_timestep_hook("net")
    with pytest.raises(UsageError, match=r"diffpro\.quantize_: expected a DiffusionModel or an nn\.Module, got str"):
        diffpro.quantize_("random:dit-tiny", {"layers": {}})


def test_compile_checks_its_device_like_load_does():
    # catches: diffpro.compile(model, device="tpu") failing with torch's RuntimeError listing every
    # device type torch knows, instead of diffpro's one line
    model = diffpro.load("random:dit-tiny")
    with pytest.raises(UsageError, match="use cpu, cuda or cuda:N"):
        diffpro.compile(model, device="tpu")
    with pytest.raises(UsageError, match="diffpro runs on cpu or cuda"):
        diffpro.compile(model, device="meta")


def test_stage_functions_refuse_a_workdir_that_is_not_a_path():
    # catches: diffpro.profile(spec, 5) failing with pathlib's TypeError
    with pytest.raises(UsageError, match="workdir 5: pass a directory path"):
        diffpro.profile("random:dit-tiny", 5)
