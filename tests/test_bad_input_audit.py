"""Bad input a new user hits, one case per defect the audit found: each exits with its documented code and
ONE `error:` line (no traceback), and writes nothing it should not."""

import json
import os

import pytest

TINY = "random:dit-tiny"


def _one_error_line(err):
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def _profile(cli, work):
    code, _, err = cli("profile", TINY, "-w", work, "-q", "--samples", "1", "--batch", "1", "--timesteps", "999,499")
    assert code == 0, err


def _quantize(cli, tmp_path, name="q"):
    code, _, err = cli("quantize", TINY, "--bits", "8", "--out", tmp_path / name, "-w", tmp_path / f"w{name}", "-q",
                       "--calib-samples", "1")
    assert code == 0, err
    return tmp_path / name


# ---- output locations -------------------------------------------------------------------------------

def test_workdir_that_is_a_file_is_a_usage_error_not_a_traceback(cli, tmp_path):
    blocker = tmp_path / "work"
    blocker.write_text("not a directory")
    code, _, err = cli("profile", TINY, "-w", blocker, "-q", "--samples", "1", "--batch", "1", "--timesteps", "999")
    assert code == 2 and "is a file, not a directory" in _one_error_line(err) and str(blocker) in err
    assert blocker.read_text() == "not a directory"


def test_output_blocked_by_a_directory_leaves_no_temp_file(cli, tmp_path):
    """sample --out naming a directory: os.replace raised IsADirectoryError (exit 1, traceback)."""
    (tmp_path / "grid.png").mkdir()
    code, _, err = cli("sample", TINY, "--steps", "1", "--n", "1", "--out", tmp_path / "grid.png", "-q")
    assert code == 2 and "cannot write" in _one_error_line(err)
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into mode-555 directories")
def test_read_only_workdir_is_a_usage_error(cli, tmp_path):
    work = tmp_path / "ro"
    work.mkdir()
    work.chmod(0o555)
    try:
        code, _, err = cli("profile", TINY, "-w", work, "-q", "--samples", "1", "--batch", "1", "--timesteps", "999")
    finally:
        work.chmod(0o755)
    assert code == 2 and "cannot write" in _one_error_line(err)


def test_atomic_write_into_a_file_path_raises_usage_error(tmp_path):
    from diffpro_cli.artifacts import atomic_write_json
    from diffpro_cli.errors import UsageError

    (tmp_path / "f").write_text("x")
    with pytest.raises(UsageError, match="is a file, not a directory"):
        atomic_write_json(tmp_path / "f" / "out.json", {"a": 1})


# ---- artifacts with the right schema but missing keys --------------------------------------------------

def test_lock_file_without_stages_table_is_bad_input(cli, tmp_path):
    work = tmp_path / "w"
    work.mkdir()
    (work / "diffpro.lock.json").write_text('{"schema": "diffpro.lock/1"}')
    code, _, err = cli("profile", TINY, "-w", work, "-q", "--samples", "1", "--batch", "1", "--timesteps", "999")
    assert code == 3 and "'stages'" in _one_error_line(err)


@pytest.mark.parametrize("key,value", [("layers", None), ("model", None), ("layers", "x")])
def test_profile_json_missing_or_mistyped_key_is_bad_input(cli, tmp_path, key, value):
    work = tmp_path / "w"
    _profile(cli, work)
    path = work / "profile" / "profile.json"
    doc = json.loads(path.read_text())
    if value is None:
        del doc[key]
    else:
        doc[key] = value
    path.write_text(json.dumps(doc))
    code, _, err = cli("score", "-w", work, "-q", "--no-figures")
    assert code == 3 and f"'{key}'" in _one_error_line(err)
    assert not (work / "scores.json").exists()


def test_profile_stats_that_is_a_directory_is_bad_input(cli, tmp_path):
    work = tmp_path / "w"
    _profile(cli, work)
    stats = work / "profile" / "stats.safetensors"
    stats.unlink()
    stats.mkdir()
    code, _, err = cli("score", "-w", work, "-q", "--no-figures")
    assert code == 3 and "stats.safetensors" in _one_error_line(err)


# ---- model files --------------------------------------------------------------------------------------

class NotAStateDict:
    """A class a weights-only unpickler refuses (loading it would run code)."""


def test_garbage_pt_is_corrupt_input_not_untrusted_code(cli, tmp_path):
    import torch

    (tmp_path / "m.pt").write_text("garbage")
    code, _, err = cli("models", tmp_path / "m.pt")
    assert code == 3 and "not a readable PyTorch checkpoint" in _one_error_line(err)

    torch.save({"x": NotAStateDict()}, tmp_path / "code.pt")       # a pickle that needs code: still refused
    code, _, err = cli("models", tmp_path / "code.pt")
    assert code == 5 and "does not unpickle code" in _one_error_line(err)


def test_garbage_inception_weights_are_bad_input(tmp_path):
    from diffpro_cli.errors import InputError
    from diffpro_cli.metrics.inception import _read_state_dict_file

    (tmp_path / "i.pth").write_text("junk")
    with pytest.raises(InputError, match="i.pth"):
        _read_state_dict_file(tmp_path / "i.pth")


# ---- timesteps ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,needle", [("999:0:0", "STEP must not be 0"), ("5000,10", "5000 is outside"),
                                         ("-5,10", "-5 is outside")])
def test_profile_timesteps_step_zero_or_out_of_range_is_refused(cli, tmp_path, text, needle):
    code, _, err = cli("profile", TINY, "-w", tmp_path / "w", "-q", "--samples", "1", "--timesteps", text)
    assert code == 2 and needle in _one_error_line(err)
    assert not (tmp_path / "w" / "profile").exists()


def test_timesteps_range_ending_at_the_schedule_length_still_works():
    from diffpro_cli.sampling import parse_timesteps

    assert parse_timesteps("1000:0:500", 1000) == [0, 500, 999]   # the default 1000:0:50 relies on it


@pytest.mark.parametrize("timesteps,needle", [("abc", "not a JSON list"), (["a"], "integer timesteps"),
                                              ([5, 5000], "must lie in"), (None, "'timesteps'")])
def test_sample_timesteps_file_with_bad_contents_is_bad_input(cli, tmp_path, timesteps, needle):
    doc = {"schema": "diffpro.timesteps/1"} | ({} if timesteps is None else {"timesteps": timesteps})
    (tmp_path / "t.json").write_text(json.dumps(doc))
    code, _, err = cli("sample", TINY, "--n", "1", "--timesteps", tmp_path / "t.json", "--out", tmp_path / "g.png", "-q")
    line = _one_error_line(err)
    assert code == 3 and needle in line and "t.json" in line
    assert not (tmp_path / "g.png").exists()


def test_quantize_timesteps_file_with_strings_is_bad_input(cli, tmp_path):
    (tmp_path / "t.json").write_text(json.dumps({"schema": "diffpro.timesteps/1", "timesteps": ["a"]}))
    code, _, err = cli("quantize", TINY, "--bits", "8", "--timesteps", tmp_path / "t.json", "--out", tmp_path / "q",
                       "-w", tmp_path / "w", "-q")
    assert code == 3 and "t.json" in _one_error_line(err)
    assert not (tmp_path / "q").exists()


def test_quantize_refuses_a_quantized_checkpoint_as_model(cli, tmp_path):
    q = _quantize(cli, tmp_path)
    code, _, err = cli("quantize", q, "--bits", "8", "--out", tmp_path / "q2", "-w", tmp_path / "w2", "-q")
    assert code == 3 and "already a diffpro quantized checkpoint" in _one_error_line(err)
    assert not (tmp_path / "q2").exists()


def test_quantize_refuses_a_plan_with_no_layers(cli, tmp_path):
    plan = {"schema": "diffpro.plan/1", "model": {"spec": TINY, "sha256": None}, "layers": {}}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    code, _, err = cli("quantize", TINY, "--plan", tmp_path / "plan.json", "--out", tmp_path / "q", "-w", tmp_path / "w", "-q")
    assert code == 3 and "empty" in _one_error_line(err)
    assert not (tmp_path / "q").exists()


def _uniform_plan_file(tmp_path, edit=None):
    import diffpro
    from diffpro_cli.stages.quantize import uniform_plan

    plan = uniform_plan(diffpro.load(TINY), 8)
    if edit:
        edit(plan)
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    return tmp_path / "plan.json"


@pytest.mark.parametrize("args,needle", [(["--act-mode", "static"], "allocate --act-mode static"),
                                         (["--act-bits", "16"], "applies to --bits only"),
                                         (["--group-size", "16"], "applies to --bits only")])
def test_quantize_plan_refuses_options_it_would_ignore(cli, tmp_path, args, needle):
    """--act-mode/--act-bits/--group-size with --plan were silently ignored: the user asked for static
    activations and got the plan's dynamic ones."""
    plan = _uniform_plan_file(tmp_path)
    code, _, err = cli("quantize", TINY, "--plan", plan, *args, "--out", tmp_path / "q", "-w", tmp_path / "w", "-q")
    assert code == 2 and needle in _one_error_line(err)
    assert not (tmp_path / "q").exists()


def test_quantize_plan_accepts_its_own_act_mode_restated(cli, tmp_path):
    """sample_configs restate act_mode = "dynamic" beside a dynamic plan: refusing it would break `make demo`."""
    plan = _uniform_plan_file(tmp_path)
    code, _, err = cli("quantize", TINY, "--plan", plan, "--act-mode", "dynamic", "--out", tmp_path / "q",
                       "-w", tmp_path / "w", "-q")
    assert code == 0, err
    meta = json.loads((tmp_path / "q" / "diffpro.json").read_text())
    assert {r["act_mode"] for r in meta["layers"].values()} >= {"dynamic"}


@pytest.mark.parametrize("field,value", [("act_bits", 4), ("act_mode", "sometimes")])   # weight_bits: test_quant
def test_quantize_plan_with_an_unsupported_layer_value_is_bad_input(cli, tmp_path, field, value):
    """A plan whose layer says act_bits 4 exited 2 (a bad option) though no option was wrong: the file is."""
    def edit(plan):
        next(iter(plan["layers"].values()))[field] = value
    plan = _uniform_plan_file(tmp_path, edit)
    code, _, err = cli("quantize", TINY, "--plan", plan, "--out", tmp_path / "q", "-w", tmp_path / "w", "-q")
    line = _one_error_line(err)
    assert code == 3 and f"{field} " in line and "re-run `diffpro allocate`" in line
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("value,needle", [(8, "the entry 8 is not a dict"),
                                          ({"weight_bits": 4, "group_size": True}, "group_size True: use an integer")])
def test_quantize_plan_with_a_malformed_layer_entry_is_bad_input(cli, tmp_path, value, needle):
    """A plan entry that is not a dict crashed the stage with AttributeError ('int' object has no attribute
    'get'), and group_size true passed as groups of 1 (the stage had its own checker, the API another)."""
    def edit(plan):
        plan["layers"][next(iter(plan["layers"]))] = value
    plan = _uniform_plan_file(tmp_path, edit)
    code, _, err = cli("quantize", TINY, "--plan", plan, "--out", tmp_path / "q", "-w", tmp_path / "w", "-q")
    line = _one_error_line(err)
    assert code == 3 and needle in line and "re-run `diffpro allocate`" in line
    assert not (tmp_path / "q").exists()


# ---- allocate / bench option and artifact checks, the allocator ---------------------------------

@pytest.mark.parametrize("field,value,option", [("quant_weight", -1.0, "--quant-weight"),
                                                ("remainder_ms", -5.0, "--remainder-ms")])
def test_allocate_refuses_negative_weights_and_times(field, value, option):
    from diffpro_cli.errors import UsageError
    from diffpro_cli.stages.allocate import AllocateConfig, validate_config

    with pytest.raises(UsageError, match=option):
        validate_config(AllocateConfig(budget="avg-bits=6", **{field: value}))


def test_stage_context_keeps_freed_memory_before_any_cost_table_is_checked(tmp_path):
    """A separate `diffpro allocate` checked the cost table's fingerprint before loading a model, so its
    allocator read 'default' while the table said 'kept': every re-plan failed with exit 3 and a message
    naming two identical machines."""
    import subprocess
    import sys

    from diffpro_cli.allocator import STEADY, _libc

    if _libc() is None or os.environ.get("DIFFPRO_MALLOC", "").lower() == "default":
        pytest.skip("glibc mallopt not in force here")
    code = ("from diffpro_cli.stages.context import StageContext; from diffpro_cli.planning.fingerprint import machine_fingerprint; "
            f"StageContext.create('', {str(tmp_path)!r}); print(machine_fingerprint()['allocator'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == STEADY


def test_bench_refuses_a_checkpoint_of_another_model(cli, tmp_path):
    q = _quantize(cli, tmp_path)
    code, _, err = cli("bench", "random:unet-tiny", "--quantized", q, "--rows", "diffpro", "--reference-steps", "2",
                       "--repeats", "1", "--latency-batch", "1", "-w", tmp_path / "wb", "-q")
    line = _one_error_line(err)
    assert code == 3 and "made for" in line and str(q) in line
    assert not (tmp_path / "wb" / "bench" / "report.json").exists()


def test_bench_refuses_timesteps_pruned_for_another_model(cli, tmp_path):
    """Catches: bench taking a timesteps.json of another model as the diffpro/ddim-K schedule (quantize
    already refused it)."""
    import json

    ts = tmp_path / "timesteps.json"
    ts.write_text(json.dumps({"schema": "diffpro.timesteps/1", "timesteps": [0, 500, 999],
                              "model": {"spec": "random:unet-tiny", "sha256": "0" * 64}}))
    code, _, err = cli("bench", "random:dit-tiny", "--timesteps", ts, "--rows", "fp32", "--reference-steps", "2",
                       "--repeats", "1", "--latency-batch", "1", "-w", tmp_path / "wb", "-q")
    assert code == 3 and "made for another model" in _one_error_line(err)
    assert not (tmp_path / "wb" / "bench" / "report.json").exists()


@pytest.mark.parametrize("args,code_expected,needle", [
    (["--threads", "-1"], 2, "--threads"),
    (["--steps", "0"], 2, "--steps"),
    (["--latency-steps", "0"], 2, "--latency-steps"),
    (["--quantized", "nope"], 3, "no diffpro.json"),
])
def test_bench_bad_counts_and_missing_checkpoint(cli, tmp_path, args, code_expected, needle):
    code, _, err = cli("bench", TINY, "-w", tmp_path / "w", "-q", *args)
    assert code == code_expected and needle in _one_error_line(err)
    assert not (tmp_path / "w" / "bench").exists()



# ---- run: the TOML config ------------------------------------------------------------------------------

@pytest.mark.parametrize("edit,needle", [
    (lambda t: t.replace("samples = 1", 'samples = "one"'), "samples = 'one' has the wrong type"),
    (lambda t: t.replace("seed = 3", 'seed = "x"'), "seed = 'x' has the wrong type"),
    (lambda t: t.replace("figures = false", 'figures = "no"'), "figures = 'no' has the wrong type"),
    (lambda t: t.replace('budget = "avg-bits=6"', "budget = 6"), "budget = 6 has the wrong type"),
    (lambda t: "profile = 3\n" + t.split("[profile]")[0] + "[score]" + t.split("[score]")[1], "must be a [profile] table"),
])
def test_run_config_with_wrongly_typed_values_is_one_usage_error(cli, tmp_path, edit, needle):
    """A string where a number belongs crashed inside a stage (exit 1); figures = "no" was taken as true."""
    text = ('model = "random:dit-tiny"\nseed = 3\n\n[profile]\nsamples = 1\n\n[score]\nfigures = false\n\n'
            '[allocate]\nbudget = "avg-bits=6"\n')
    (tmp_path / "c.toml").write_text(edit(text))
    code, _, err = cli("run", tmp_path / "c.toml", "-w", tmp_path / "w", "-q")
    assert code == 2 and needle in _one_error_line(err)
    assert not (tmp_path / "w").exists()


def test_run_config_that_is_a_directory_is_bad_input(cli, tmp_path):
    code, _, err = cli("run", tmp_path, "-q")
    assert code == 3 and "no such config file" in _one_error_line(err)


def test_bench_with_a_blocked_report_fails_before_measuring(cli, tmp_path):
    """Catches: bench measuring every row for minutes and only then failing to write report.json (a
    directory stands where it goes)."""
    (tmp_path / "wb" / "bench" / "report.json").mkdir(parents=True)
    code, _, err = cli("bench", "random:dit-tiny", "--rows", "fp32,w8a8-uniform", "--reference-steps", "2", "--repeats", "1",
                       "--latency-batch", "1", "-w", tmp_path / "wb", "-q")
    assert code == 2 and "report.json" in _one_error_line(err)
    assert not (tmp_path / "wb" / "bench" / "baselines").exists()   # nothing was quantized or measured


def test_quantize_plan_act_mode_check_ignores_weight_only_layers_written_as_mode_none(cli, tmp_path):
    """A plan whose weight-only layers say act_mode "none" (act_bits 8; what `uniform_plan(..., act_mode="none")`
    and checkpoint records write) refused `--act-mode dynamic` as if its integer layers ran "dynamic/none"
    activations: check_plan_options counted the weight-only layers as integer-activation ones."""
    def edit(plan):
        next(iter(plan["layers"].values())).update(act_bits=8, act_mode="none")
    plan = _uniform_plan_file(tmp_path, edit)
    code, _, err = cli("quantize", TINY, "--plan", plan, "--act-mode", "dynamic", "--out", tmp_path / "q",
                       "-w", tmp_path / "w", "-q")
    assert code == 0, err
    code, _, err = cli("quantize", TINY, "--plan", plan, "--act-mode", "static", "--out", tmp_path / "q2",
                       "-w", tmp_path / "w2", "-q")
    assert code == 2 and "with dynamic activations" in _one_error_line(err)   # "none" not named as a mode


@pytest.mark.parametrize("record", ['"random:dit-tiny"', '["random:dit-tiny"]'])
def test_quantize_timesteps_whose_model_record_is_not_an_object_is_bad_input(cli, tmp_path, record):
    """A hand-edited timesteps.json whose "model" is a string or list: quantize --timesteps (and bench,
    through the same check_same_model) ended in AttributeError ('str' object has no attribute 'get')."""
    ts = tmp_path / "timesteps.json"
    ts.write_text('{"schema": "diffpro.timesteps/1", "timesteps": [999, 500, 0], "model": ' + record + '}')
    code, _, err = cli("quantize", TINY, "--bits", "8", "--timesteps", ts, "--out", tmp_path / "q", "-w", tmp_path / "w", "-q")
    line = _one_error_line(err)
    assert code == 3 and "'model' record is not a JSON object" in line
    assert not (tmp_path / "q").exists()
