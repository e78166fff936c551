"""prune: local drift matrix, exact DP (vs brute force), protected tail, sampler compatibility, drift vs uniform."""

import dataclasses
import itertools
import json

import numpy as np
import pytest
import torch

from diffpro_cli.sampling import SamplerConfig, default_labels, sample, step, uniform_timesteps
from diffpro_cli.stages.prune import (PruneConfig, allowed_edges, candidate_grid, local_drift_matrix, path_cost, run_teacher,
                                      select_dp, select_greedy, select_timesteps, snap)


@pytest.fixture
def one_thread():
    """Model-running tests use one thread: on a busy 2-core machine two threads mostly wait for each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def random_cost(C, seed):
    rng = np.random.default_rng(seed)
    cost = rng.uniform(0.1, 1.0, size=(C, C + 1))
    return np.where(np.triu(np.ones((C, C + 1), dtype=bool), k=1), cost, np.inf)


def brute_force(cost, K, T):
    """Every subset with node 0, the last T nodes and K nodes in all; the least summed hop cost."""
    C = cost.shape[0]
    tail = list(range(C - T, C))
    free = [i for i in range(1, C - T)]
    best = np.inf
    for middle in itertools.combinations(free, K - T - 1):
        best = min(best, path_cost(cost, [0, *middle, *tail]))
    return best


def independent_final_drift(model, subset, cfg):
    """MSE between the final samples of DDIM on `subset` and of the teacher's reference schedule, computed
    here with the sampler alone (not prune's teacher/student code), with prune's seed, labels and clipping."""
    ddim = SamplerConfig(method="ddim", eta=0.0, cfg_scale=cfg.cfg_scale, clip_x0=cfg.clip_x0)
    reference = uniform_timesteps(model.num_train_timesteps, cfg.reference_steps or model.num_train_timesteps)

    def run(timesteps):
        return sample(model, cfg.n, timesteps, ddim, labels=default_labels(model, cfg.n), seed=cfg.seed,
                      batch_size=cfg.batch, decode=False)

    return float(((run(subset) - run(reference)) ** 2).mean())


@pytest.mark.parametrize("C,K,T", [(9, 4, 0), (9, 4, 1), (10, 5, 2), (8, 7, 3), (7, 2, 1)])
def test_dp_finds_the_brute_force_optimum_keeps_start_and_tail_and_greedy_is_no_better(C, K, T):
    for seed in range(3):
        cost = random_cost(C, seed)
        path, value = select_dp(cost, K, T)
        assert len(path) == K and path[0] == 0 and path == sorted(set(path))
        assert set(range(C - T, C)) <= set(path)
        assert value == pytest.approx(brute_force(cost, K, T))
        assert value == pytest.approx(path_cost(cost, path))
        greedy, g_value = select_greedy(cost, K, T)
        assert len(greedy) == K and greedy[0] == 0 and set(range(C - T, C)) <= set(greedy)
        assert g_value >= value - 1e-12


def test_allowed_edges_never_skip_a_tail_node():
    ok = allowed_edges(6, 2)              # nodes 0..5, tail = {4, 5}, end = 6
    assert ok[0, 4] and not ok[0, 5] and not ok[3, 5] and ok[4, 5]
    assert ok[5, 6] and not ok[4, 6]
    assert allowed_edges(6, 0)[2, 6]      # no tail: any node may finish


@pytest.mark.parametrize("clip", [False, True])
def test_local_drift_matrix_equals_explicit_ddim_steps(tiny_model, clip):
    ref = uniform_timesteps(1000, 40)
    cands = candidate_grid(ref, 12)
    cfg = PruneConfig(n=3, batch=3, clip_x0=clip)
    teacher = run_teacher(tiny_model, ref, set(cands), cfg, default_labels(tiny_model, 3))
    desc = cands[::-1]
    cost = local_drift_matrix(teacher, desc, tiny_model.alphas_cumprod, clip_x0=clip)
    acp = tiny_model.alphas_cumprod
    ddim = SamplerConfig(method="ddim", eta=0.0, clip_x0=clip)
    for i, j in [(0, 1), (0, 11), (3, 7), (10, 11)]:
        a, b = desc[i], desc[j]
        x_hat = step(teacher.x[a], teacher.eps[a], float(acp[a]), float(acp[b]), ddim, None)
        assert cost[i, j] == pytest.approx(float(((x_hat - teacher.x[b]) ** 2).mean()), rel=1e-4, abs=1e-9)
    last = desc[-1]
    x_end = step(teacher.x[last], teacher.eps[last], float(acp[last]), 1.0, ddim, None)
    assert cost[11, 12] == pytest.approx(float(((x_end - teacher.final) ** 2).mean()), abs=1e-9)
    assert np.isinf(cost[5, 5]) and np.isinf(cost[6, 2])


def test_selected_subset_keeps_uniform_tail_reports_its_own_drift_and_runs_in_both_samplers(tiny_model, one_thread):
    cfg = PruneConfig(steps=8, protect_tail=3, reference_steps=100, candidates=30, n=2, batch=2, sweep=[5])
    payload = select_timesteps(tiny_model, cfg)
    ts = payload["timesteps"]
    assert len(ts) == 8 and ts == sorted(set(ts)) and ts[-1] == 999
    assert len(payload["protected"]) == 3 and set(payload["protected"]) <= set(ts)
    assert payload["protected"] == ts[:3]                      # the last kept steps ...
    reference = uniform_timesteps(1000, 100)
    assert payload["protected"] == snap(uniform_timesteps(1000, 8), reference)[:3]   # ... = uniform's last three
    # the reported drift is the drift of the reported timesteps (measured here independently) ...
    assert payload["drift"] == pytest.approx(independent_final_drift(tiny_model, ts, cfg), rel=1e-5, abs=1e-12)
    # ... and no worse than the uniform subset's, also measured independently
    assert payload["drift"] <= independent_final_drift(tiny_model, uniform_timesteps(1000, 8), cfg) + 1e-12
    for method in ("ddim", "ddpm"):
        out = sample(tiny_model, 2, ts, SamplerConfig(method=method), seed=0)
        assert torch.isfinite(out).all()
    assert [s["steps"] for s in payload["sweep"]] == [5, 8]
    for s in payload["sweep"]:
        assert len(s["timesteps"]) == s["steps"]


def test_uniform_drift_is_the_uniform_schedules_measured_drift_and_bounds_the_selection(tiny_model, one_thread):
    cfg = PruneConfig(steps=10, n=2, batch=2)
    payload = select_timesteps(tiny_model, cfg)
    uniform = independent_final_drift(tiny_model, uniform_timesteps(1000, 10), cfg)
    assert payload["uniform_drift"] == pytest.approx(uniform, rel=1e-5, abs=1e-12)
    by_name = {a["name"]: a["drift"] for a in payload["alternatives"]}
    assert by_name["uniform"] == pytest.approx(uniform, rel=1e-5, abs=1e-12)   # full reference: exactly uniform
    assert payload["drift"] <= uniform + 1e-12
    assert payload["protected"] == uniform_timesteps(1000, 10)[:1]


def test_search_beats_uniform_on_builtin_model_and_the_stage_writes_then_skips(tmp_path, one_thread):
    from diffpro_cli.loading import load_model
    from diffpro_cli.stages.context import StageContext
    from diffpro_cli.stages.prune import run_prune

    torch.manual_seed(0)
    model = load_model("builtin:dit-mnist")
    cfg = PruneConfig(steps=8, reference_steps=60, candidates=30, n=3, batch=3)
    ctx = StageContext.create("builtin:dit-mnist", tmp_path).use_model(model)
    outcome, payload = run_prune(ctx, cfg)
    assert outcome.status == "computed"
    uniform = independent_final_drift(model, uniform_timesteps(1000, 8), cfg)
    assert payload["uniform_drift"] == pytest.approx(uniform, rel=1e-5, abs=1e-12)
    assert payload["drift"] == pytest.approx(independent_final_drift(model, payload["timesteps"], cfg), rel=1e-5, abs=1e-12)
    # a trained model: the searched subset (dp or greedy) is strictly better than uniform, not a fallback to it
    assert payload["selected_by"] in ("dp", "greedy") and payload["drift"] < uniform
    assert payload["uniform_timesteps"] == uniform_timesteps(1000, 8)
    paired = payload["paired_vs_uniform"]     # same seeds, sample by sample: its mean is the drift difference
    assert paired["n"] == 3 and paired["wins"] + paired["losses"] + paired["ties"] == 3
    assert paired["mean_uniform_minus_selected"] == pytest.approx(uniform - payload["drift"], rel=1e-5)
    written = json.loads((tmp_path / "timesteps.json").read_text())
    assert written["schema"] == "diffpro.timesteps/1" and written["timesteps"] == payload["timesteps"]
    assert written["num_train_timesteps"] == 1000 and written["budget"]["steps"] == 8
    assert (tmp_path / "figures" / "drift.png").stat().st_size > 1000
    again, _ = run_prune(ctx, cfg)
    assert again.status == "up to date"
    # --batch only groups the per-sample-seeded calibration samples: recomputing the teacher for it was waste
    regrouped, _ = run_prune(ctx, dataclasses.replace(cfg, batch=2))
    assert regrouped.status == "up to date"


@pytest.mark.parametrize("args,needle", [
    (["--steps", "0"], "--steps"),
    (["--steps", "10", "--fraction", "0.5"], "only one"),
    (["--steps", "10", "--protect-tail", "10"], "--protect-tail"),
    (["--steps", "10", "--metric", "fid"], "--metric"),
    (["--steps", "10", "--candidates", "5"], "--candidates"),
    (["--steps", "10", "--sweep", "a,b"], "--sweep"),
    # the budget as given: these named a --steps 1 / a --candidates 20 the user never passed
    (["--fraction", "0.001"], "--fraction 0.001: keeps 1 of the 1000"),
    (["--steps", "25", "--reference-steps", "20"], "--steps 25: more than the 20 steps"),
    (["--reference-steps", "250"], "the default --fraction 0.5 (500 steps)"),
    # ran the teacher, then blamed the grid: "no subset of 10 steps fits the candidate grid with this tail"
    (["--steps", "10", "--cfg", "nan"], "--cfg nan"),
])
def test_cli_bad_options_exit_2_with_one_error_line_and_write_nothing(cli, tmp_path, args, needle):
    code, out, err = cli("prune", "builtin:dit-mnist", "-w", tmp_path / "w", *args)
    assert code == 2
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], err
    assert not (tmp_path / "w" / "timesteps.json").exists()


def test_paired_comparison_of_selected_and_uniform_drift():
    from diffpro_cli.stages.prune import paired_comparison

    uniform = [2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0]
    selected = [u - 1.0 for u in uniform]                     # better on every sample
    out = paired_comparison(selected, uniform, seed=0)
    assert out["mean_uniform_minus_selected"] == pytest.approx(1.0)
    assert (out["wins"], out["losses"], out["ties"]) == (10, 0, 0)
    assert out["sign_test_p"] == pytest.approx(2 / 1024)        # two-sided binomial, 10 of 10
    assert out["ci95"] == [pytest.approx(1.0), pytest.approx(1.0)] and out["significant"]
    mixed = paired_comparison([1, 2, 3, 4], [2, 1, 4, 3], seed=0)  # two wins, two losses
    assert mixed["mean_uniform_minus_selected"] == 0 and mixed["sign_test_p"] == 1.0 and not mixed["significant"]
    assert mixed["ci95"][0] < 0 < mixed["ci95"][1]


def test_keeping_every_reference_step_reports_zero_drift_without_a_nan_ratio(cli, tmp_path):
    """K = --reference-steps (the full teacher schedule): the only subset is the teacher's, drift 0 against
    uniform 0, and the summary line printed '(nanx, dp)'."""
    code, out, err = cli("prune", "random:dit-tiny", "-w", tmp_path / "w", "--steps", "6", "--reference-steps", "6",
                         "--n", "1", "--batch", "1")
    assert code == 0, err
    assert "nan" not in out and "the teacher's own schedule" in out
    doc = json.loads((tmp_path / "w" / "timesteps.json").read_text())
    assert doc["timesteps"] == uniform_timesteps(1000, 6) and doc["drift"] == 0 == doc["uniform_drift"]


def test_a_model_with_non_finite_output_is_named_not_the_candidate_grid(tiny_model):
    """A network that outputs NaN made every drift NaN, and prune said 'no subset of K steps fits the candidate
    grid with this tail; raise --candidates or lower --protect-tail' (exit 2): advice that cannot help."""
    from diffpro_cli.errors import InputError

    tiny_model.forward_fn = lambda net, x, t, y: torch.full_like(x, float("nan"))
    cfg = PruneConfig(steps=4, reference_steps=20, n=1, batch=1)
    with pytest.raises(InputError, match="not finite"):
        select_timesteps(tiny_model, cfg)
