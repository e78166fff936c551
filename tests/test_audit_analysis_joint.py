"""Audit of the analysis surfaces: the joint steps x bits plan's step source.

One random:dit-tiny workdir (profile, score, a cost table timed at batch 1, one round) is made once per
session (conftest.tiny_allocated); prune runs only in the test that needs its timesteps.json.
"""

import json

import pytest



@pytest.fixture
def work(allocated_work):   # conftest: a copy of the shared profiled, scored and allocated workdir
    return allocated_work


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


@pytest.fixture
def pruned(tiny_pruned):   # conftest's shared pruned workdir (the tests below write nothing into it)
    return tiny_pruned


@pytest.mark.parametrize("edit, needle", [
    # tracebacks before the fix (KeyError 'steps', TypeError, ValueError from int())
    (lambda d: d.update(sweep=[{}]), "sweep entry 0 has no list of timesteps"),
    (lambda d: d["sweep"][0].update(timesteps=5), "sweep entry 0 has no list of timesteps"),
    (lambda d: d["sweep"][0].update(steps="x"), "says 'x' steps"),
    (lambda d: d.update(sweep=5), "sweep is not a list"),
    # written into plan.json as is before the fix
    (lambda d: d["sweep"][0].update(timesteps=[9, 3]), "strictly increasing"),
    (lambda d: d["sweep"][0].update(timesteps=[3, 5000]), "must lie in"),
    (lambda d: d["sweep"][0].update(steps=7), "says 7 steps but lists 2"),
    (lambda d: d["sweep"][0].update(drift=float("nan")), "drift nan"),
    (lambda d: d["sweep"][0].update(drift=-1.0), "drift -1.0"),
])
def test_damaged_timesteps_sweep_is_one_input_error(cli, pruned, tmp_path, edit, needle):
    doc = json.loads((pruned / "timesteps.json").read_text())
    edit(doc)
    path = tmp_path / "ts.json"
    path.write_text(json.dumps(doc))
    code, _, err = cli("allocate", "-w", pruned, "--budget", "latency=0.5", "--timesteps", path, "--batch", "1", "-q")
    assert code == 3 and needle in err and str(path) in err and len(err.strip().splitlines()) == 1, err
    assert not (pruned / "plan.json").exists()


def test_a_size_plan_refuses_a_damaged_subset_it_would_carry(cli, pruned, tmp_path):
    """Without a latency budget the plan carries timesteps.json's subset as is: [9, 3] reached plan.json."""
    doc = json.loads((pruned / "timesteps.json").read_text())
    doc["timesteps"] = [9, 3]
    path = tmp_path / "ts.json"
    path.write_text(json.dumps(doc))
    code, _, err = cli("allocate", "-w", pruned, "--budget", "avg-bits=6", "--timesteps", path, "--batch", "1", "-q")
    assert code == 3 and "strictly increasing" in err and not (pruned / "plan.json").exists()
