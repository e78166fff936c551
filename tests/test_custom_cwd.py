"""`diffpro ... mymod:factory --trust-code` run in the folder that holds mymod.py: the `diffpro` console
script (unlike `python -m diffpro_cli`) does not put the current directory on sys.path, so the user's
module was "not found" although it sat right there."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_loaders import FACTORY_SOURCE

SCRIPT = Path(sys.executable).parent / "diffpro"


def _run(args, cwd):
    env = {**os.environ, "CI": "true"}
    env.pop("PYTHONPATH", None)
    return subprocess.run([str(SCRIPT), *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.skipif(not SCRIPT.exists(), reason="the diffpro console script is not installed beside this python")
def test_the_console_script_imports_a_factory_module_from_the_current_directory(tmp_path):
    # catches: the current directory missing from sys.path (exit 3, "No module named ...")
    (tmp_path / "diffpro_cwd_factory_mod.py").write_text(FACTORY_SOURCE)
    proc = _run(["models", "diffpro_cwd_factory_mod:factory", "--trust-code", "--json"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert '"custom"' in proc.stdout


@pytest.mark.skipif(not SCRIPT.exists(), reason="the diffpro console script is not installed beside this python")
def test_a_local_file_does_not_shadow_an_installed_module(tmp_path):
    # catches: the current directory put first on sys.path, so a stray local tabnanny.py replaced the stdlib's
    # tabnanny for every later import (here: the factory is looked up in the real tabnanny, which has none)
    (tmp_path / "tabnanny.py").write_text(FACTORY_SOURCE)
    proc = _run(["models", "tabnanny:factory", "--trust-code"], tmp_path)
    assert proc.returncode == 3 and "tabnanny has no callable factory" in proc.stderr, proc.stderr
