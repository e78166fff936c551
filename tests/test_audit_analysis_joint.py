"""Audit of the analysis surfaces: the joint steps x bits plan's step source.

One random:dit-tiny workdir (profile, score, a cost table timed at batch 1, one round) is made per module;
prune runs only in the test that needs its timesteps.json.
"""

import json
import shutil

import pytest

from diffpro_cli.app import main


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    work = tmp_path_factory.mktemp("joint")
    assert main(["profile", "random:dit-tiny", "-w", str(work), "--samples", "2", "--timesteps", "3", "-q"]) == 0
    assert main(["score", "-w", str(work), "-q"]) == 0
    assert main(["allocate", "-w", str(work), "--budget", "avg-bits=6", "--repeats", "1", "--batch", "1", "-q"]) == 0
    return work


@pytest.fixture
def work(scored, tmp_path):
    dst = tmp_path / "w"
    shutil.copytree(scored, dst)
    (dst / "plan.json").unlink()
    return dst


def test_latency_fraction_without_steps_names_the_option_given(cli, work):
    """`--budget latency=0.5` with no timesteps anywhere said '--latency-budget needs steps', an option the
    user never passed."""
    code, _, err = cli("allocate", "-w", work, "--budget", "latency=0.5", "--batch", "1", "-q")
    assert code == 2 and "--budget latency=F" in err and "diffpro prune" in err and "--steps K" in err


def test_latency_budget_alone_reads_the_workdir_timesteps_like_latency_fraction(cli, work):
    """`--latency-budget MS` ignored WORKDIR/timesteps.json (error: pass --timesteps) while `--budget
    latency=F` read it: both choose among its sweep now."""
    assert cli("prune", "random:dit-tiny", "-w", work, "--steps", "4", "--sweep", "2,6", "--n", "2",
               "--reference-steps", "20", "-q")[0] == 0
    code, _, err = cli("allocate", "-w", work, "--latency-budget", "1000", "--batch", "1", "-q")
    assert code == 0, err
    plan = json.loads((work / "plan.json").read_text())
    assert plan["joint"]["steps"] in (2, 4, 6) and sorted(c["steps"] for c in plan["joint"]["candidates"]) == [2, 4, 6]
    # --steps K with --latency-budget keeps its documented meaning
    code, _, err = cli("allocate", "-w", work, "--latency-budget", "1000", "--steps", "4", "--timesteps",
                       work / "timesteps.json", "--batch", "1", "-q")
    assert code == 0 and json.loads((work / "plan.json").read_text())["joint"]["steps"] == 4, err
