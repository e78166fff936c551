"""The process-wide malloc setting (allocator.py): applied once, refused settings reported, opt-out honoured."""

import os
import subprocess
import sys

import pytest

from diffpro_cli import allocator

GLIBC = allocator._libc() is not None


def _fresh(code: str, **env) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, **env})
    return out.stdout.strip()


@pytest.mark.skipif(not GLIBC, reason="glibc only")
def test_glibc_accepts_every_setting_in_a_fresh_process():
    # catches: a value glibc refuses (e.g. an mmap threshold above its 32 MiB maximum) silently leaving
    # the default allocator in force while the fingerprint claims otherwise
    code = "from diffpro_cli import allocator as a; print(a.allocator_label()); print(a.steady_allocator()); print(a.steady_allocator())"
    before, first, again = _fresh(code).splitlines()
    assert before == "default" and first == allocator.STEADY and again == first


def test_opt_out_leaves_the_default_and_says_why():
    # catches: DIFFPRO_MALLOC=default being ignored (users who measure with their own allocator)
    code = "from diffpro_cli import allocator as a; print(a.steady_allocator())"
    assert _fresh(code, DIFFPRO_MALLOC="default") == "default (DIFFPRO_MALLOC=default)"


@pytest.mark.skipif(not GLIBC, reason="glibc only")
def test_loading_a_model_applies_it_and_the_cost_fingerprint_records_it():
    # catches: a stage measuring its cost table under one allocator and the deployed process running
    # under another without the fingerprint telling them apart
    code = ("from diffpro_cli.loading import load_model; from diffpro_cli.planning.fingerprint import machine_fingerprint;"
            "load_model('random:dit-tiny'); print(machine_fingerprint()['allocator'])")
    assert _fresh(code) == allocator.STEADY
    assert _fresh(code, DIFFPRO_MALLOC="default").startswith("default")
