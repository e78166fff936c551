"""Audit of the analysis surfaces: `allocate --cost-table` given a damaged table or one timed for another model.

One random:dit-tiny workdir (profile, score, a cost table timed at batch 1, one round) is made once per
session (conftest.tiny_allocated).
"""

import json

import pytest

PLAN = ("--budget", "avg-bits=6", "-q")


@pytest.fixture
def work(allocated_work):   # conftest: a copy of the shared profiled, scored and allocated workdir
    return allocated_work


def _table(work, tmp_path, edit):
    doc = json.loads((work / "cost_table.json").read_text())
    first = next(iter(doc["layers"]))
    edit(doc, first)
    path = tmp_path / "target.json"
    path.write_text(json.dumps(doc))
    return path, first


@pytest.mark.parametrize("edit, needle", [
    # TypeError traceback ('int' object is not a mapping) before the fix
    (lambda d, n: d["layers"].update({n: 5}), "its row is not an object"),
    # planned silently on a NaN remainder / a negative or NaN layer time before the fix
    (lambda d, n: d.update(remainder_ms=float("nan")), "remainder_ms is nan"),
    (lambda d, n: d.update(remainder_ms=-3.0), "remainder_ms is -3.0"),
    (lambda d, n: d["layers"][n]["ms"].update(fp32=-1.0), "fp32 is -1.0 ms"),
    (lambda d, n: d["layers"][n]["ms"].update(fp32=float("nan")), "fp32 is nan ms"),
])
def test_damaged_cost_table_is_one_input_error(cli, work, tmp_path, edit, needle):
    path, _ = _table(work, tmp_path, edit)
    code, _, err = cli("allocate", "-w", work, *PLAN, "--cost-table", path)
    assert code == 3 and err.startswith("error:") and needle in err and len(err.strip().splitlines()) == 1, err
    assert not (work / "plan.json").exists()


def test_cost_table_of_another_model_does_not_say_delete_it(cli, work, tmp_path):
    """A --cost-table lacking a scored layer said 'it was measured for another model: delete it or pass
    --force': --force does nothing for an explicit table, and deleting it loses the target machine's timings."""
    path, first = _table(work, tmp_path, lambda d, n: (d["layers"].pop(n), d.update(model={"spec": "builtin:dit-mnist"})))
    code, _, err = cli("allocate", "-w", work, *PLAN, "--cost-table", path)
    assert code == 3 and first in err and "builtin:dit-mnist" in err and "--cost-table" in err
    assert "delete" not in err and "--force" not in err and path.exists()


def test_intact_cost_table_still_plans(cli, work, tmp_path):
    path, _ = _table(work, tmp_path, lambda d, n: None)
    code, _, err = cli("allocate", "-w", work, *PLAN, "--cost-table", path)
    assert code == 0 and (work / "plan.json").exists(), err


def test_a_changed_cost_table_is_not_up_to_date(cli, work, tmp_path):
    """The --cost-table file was recorded by path only: replacing it with a new measurement (same name)
    left allocate 'up to date' with the plan priced on the old timings."""
    path, first = _table(work, tmp_path, lambda d, n: None)
    assert cli("allocate", "-w", work, *PLAN, "--cost-table", path)[0] == 0
    code, out, err = cli("allocate", "-w", work, *PLAN[:-1], "--json", "--cost-table", path)
    assert code == 0 and json.loads(out)["status"] == "up to date", err
    doc = json.loads(path.read_text())
    doc["layers"][first]["ms"]["fp32"] *= 100           # the target machine, re-measured
    path.write_text(json.dumps(doc))
    code, out, err = cli("allocate", "-w", work, *PLAN[:-1], "--json", "--cost-table", path)
    assert code == 0 and json.loads(out)["status"] == "computed", err
