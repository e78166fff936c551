"""builtin:flow-mnist: the shipped text-conditioned rectified-flow MMDiT, its word encoder, its training
path, its W8 checkpoint and a tiny pipeline run on it (offline: the weights ship with the package)."""

import json
import random

import pytest
import torch

from diffpro_cli.models import builtin_text
from diffpro_cli.models.builtin_text import PAD, UNK, VOCAB, token_ids


@pytest.fixture(scope="module")
def flow_model():
    from diffpro_cli.loading import load_model

    return load_model("builtin:flow-mnist")


def test_builtin_loads_offline_as_a_trained_flow_model_with_its_recorded_shift(flow_model):
    """Catches: the loader recording another prediction type or shift than the one trained (the Euler sampler
    and prune would then walk the wrong sigmas), or the timestep patch missing (the net would see indices, not σ·1000)."""
    from diffpro_cli.models.base import flow_sigmas
    from diffpro_cli.models.builtin import BUILTIN_CONFIGS

    m = flow_model
    card = m.config["card"]
    assert not m.untrained and m.sha256 == card["sha256"]
    assert (m.kind, m.prediction_type, m.conditioning) == ("sd3", "flow", "embeddings")
    assert m.flow_shift == card["flow_shift"] == BUILTIN_CONFIGS["flow-mnist"]["flow_shift"]
    assert m.config["text_encoder"] == "builtin-words"
    assert m.config["net_patches"]["flow_timesteps"] == {"num_train_timesteps": 1000, "shift": m.flow_shift}
    seen = {}
    hook = m.net.register_forward_pre_hook(lambda mod, args, kw: seen.update(t=kw["timestep"]), with_kwargs=True)
    try:
        with torch.no_grad():
            m.velocity(torch.zeros(2, 1, 32, 32), torch.tensor([999, 9]), m.conditioning_set.take(0, 2))
    finally:
        hook.remove()
    assert torch.allclose(seen["t"].double(), flow_sigmas(1000, m.flow_shift)[[999, 9]] * 1000)
    # the default conditioning: sample i names digit i % 10, the empty prompt is its CFG counterpart
    cond = m.conditioning_set
    assert len(cond) == 20 and cond.uncond is not None
    assert tuple(cond.encoder_hidden_states.shape[1:]) == (builtin_text.MAX_TOKENS, builtin_text.DIM)
    ids = token_ids(builtin_text.calibration_prompts())
    assert [int(row[(row >= 2) & (row < 12)][0]) - 2 for row in ids] == [j % 10 for j in range(20)]


def test_word_encoder_maps_digit_words_and_numerals_to_one_class_token():
    """Catches: "a handwritten seven" and "7" meaning different digits to the network (the numeral and the word
    must share a token), unknown words silently taking a real token, and prompts overrunning MAX_TOKENS."""
    seven = VOCAB["seven"]
    assert VOCAB["7"] == seven
    assert token_ids(["a handwritten seven"])[0].tolist()[:3] == [VOCAB["a"], VOCAB["handwritten"], seven]
    assert token_ids(["7"])[0].tolist() == [seven] + [PAD] * (builtin_text.MAX_TOKENS - 1)
    assert torch.equal(token_ids(["A Handwritten SEVEN!"]), token_ids(["a handwritten 7"]))
    assert token_ids(["a purple seven"])[0].tolist()[:3] == [VOCAB["a"], UNK, seven]
    assert token_ids(["17"])[0, 0] == UNK   # not a digit of the vocabulary
    assert token_ids(["one " * 20]).shape == (1, builtin_text.MAX_TOKENS)
    assert token_ids([""]).eq(PAD).all()
    # pooled = mean over real tokens: padding does not dilute it, the empty prompt pools to zeros
    enc = builtin_text.WordEncoder()
    out = builtin_text.encode_prompts(["7", "seven", ""], encoder=enc)
    assert out["encoder_hidden_states"].shape == (3, builtin_text.MAX_TOKENS, builtin_text.DIM)
    assert torch.equal(out["pooled_projections"][0], out["pooled_projections"][1])
    expected = enc.token_embedding.weight[seven] + enc.position_embedding[0]
    assert torch.allclose(out["pooled_projections"][0], expected)
    assert out["pooled_projections"][2].abs().sum() == 0


def test_prompts_pick_the_digit_in_the_shipped_encoder(flow_model):
    """Catches: a shipped encoder whose tables were not trained or not loaded (every digit's prompt would then
    pool to the same, or random, vectors): the ten digits' pooled vectors differ and match their numerals."""
    words = builtin_text.encode_prompts([f"a handwritten {w}" for w in builtin_text.DIGIT_WORDS])
    nums = builtin_text.encode_prompts([f"a handwritten {d}" for d in range(10)])
    assert torch.equal(words["pooled_projections"], nums["pooled_projections"])
    pooled = words["pooled_projections"]
    dist = torch.cdist(pooled, pooled)
    assert dist[~torch.eye(10, dtype=torch.bool)].min() > 0


def test_w8_checkpoint_reloads_exactly_with_the_default_prompts(flow_model, tmp_path):
    """Catches: a reloaded checkpoint losing the flow settings or the timestep patch (velocity would differ), or
    losing its default prompts (bench and sample would demand a conditioning file for a built-in model)."""
    from diffpro_cli.checkpoint import save_quantized
    from diffpro_cli.loading import load_model
    from diffpro_cli.models.builtin import load_builtin
    from diffpro_cli.stages.quantize import apply_plan, uniform_plan

    plan = uniform_plan(flow_model, 8, 8, "dynamic")
    save_quantized(flow_model, plan, tmp_path / "q")
    again = load_model(tmp_path / "q")
    assert (again.kind, again.prediction_type, again.flow_shift, again.conditioning) == ("sd3", "flow", 1.0, "embeddings")
    assert again.conditioning_set is not None
    assert torch.equal(again.conditioning_set.encoder_hidden_states, flow_model.conditioning_set.encoder_hidden_states)
    inmem = apply_plan(load_builtin("flow-mnist"), plan)
    x, t = torch.randn(3, 1, 32, 32, generator=torch.Generator().manual_seed(0)), torch.tensor([999, 500, 20])
    cond = again.conditioning_set.take(0, 3)
    with torch.no_grad():
        assert torch.equal(again.velocity(x, t, cond), inmem.velocity(x, t, cond))


def test_training_resumes_exactly_where_it_stopped(tmp_path):
    """Catches: a resume that restarts the data/prompt/noise streams (the prompt RNG or the torch generator not
    restored): an interrupted-and-resumed run must end with the same weights as an uninterrupted one."""
    from diffpro_cli.train_flow import train_flow

    def quiet(*a):
        return None

    card = train_flow(tmp_path / "a", steps=24, batch=2, checkpoint_every=10, log=quiet)
    assert card["steps"] == 24 and card["planned_steps"] == 24 and card["flow_shift"] == 1.0

    def interrupt(msg):
        if msg.startswith("step 20/"):
            raise KeyboardInterrupt   # after step 20, before its checkpoint: the last one is at step 10

    with pytest.raises(KeyboardInterrupt):
        train_flow(tmp_path / "b", steps=24, batch=2, checkpoint_every=10, log=interrupt)
    assert torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)["step"] == 10
    train_flow(tmp_path / "b", steps=24, batch=2, checkpoint_every=10, log=quiet)
    a = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)
    assert a["losses"] == b["losses"]
    assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])
    assert any(k.startswith("text_encoder.") for k in a["ema"])    # the encoder is trained with the network
    with pytest.raises(ValueError, match="same settings"):
        train_flow(tmp_path / "b", steps=30, batch=2, log=quiet)


def test_calibration_prompts_are_seeded():
    """Catches: unseeded template choice (two runs would calibrate on different prompts)."""
    assert builtin_text.calibration_prompts(20, seed=3) == builtin_text.calibration_prompts(20, seed=3)
    assert builtin_text.calibration_prompts(20, seed=3) != builtin_text.calibration_prompts(20, seed=4)
    rng = random.Random(0)
    assert all(str(d) in p or builtin_text.DIGIT_WORDS[d] in p for d in range(10) for p in [builtin_text.prompt_for(d, rng)])


def test_tiny_pipeline_runs_on_the_builtin_without_a_prompt_file(tmp_path, cli):
    """Catches: any stage (or bench's fresh-process memory child) failing on the built-in flow model for want of a
    conditioning file, and the diffpro row not running prune's schedule."""
    config = f"""model = "builtin:flow-mnist"
workdir = "{tmp_path / 'work'}"
stages = ["profile", "score", "prune", "allocate", "quantize", "bench"]
[profile]
samples = 2
timesteps = "999:0:500"
batch = 2
[score]
figures = false
[prune]
steps = 3
reference_steps = 8
n = 2
batch = 2
[allocate]
budget = "avg-bits=8"
repeats = 1
batch = 2
check_n = 2
full_steps = 6
[bench]
rows = ["fp32", "w8a8-uniform", "ddim", "diffpro"]
method = "euler"
reference_steps = 6
repeats = 1
latency_batch = 2
grid_n = 2
"""
    (tmp_path / "run.toml").write_text(config)
    code, _, err = cli("run", tmp_path / "run.toml", "--json", "--quiet")
    assert code == 0, err
    report = json.loads((tmp_path / "work" / "bench" / "report.json").read_text())
    rows = {r["name"]: r for r in report["rows"]}
    assert list(rows) == ["fp32", "w8a8-uniform", "ddim-3", "diffpro"]
    prune = json.loads((tmp_path / "work" / "timesteps.json").read_text())
    assert rows["diffpro"]["steps"] == len(prune["timesteps"]) == 3
    assert all(r["peak_mem_bytes"] for r in report["rows"])
    # allocate's check sampled the flow model with its shipped prompts (against fp32 on 6 steps)
    check = json.loads((tmp_path / "work" / "plan.json").read_text())["step_cut_check"]
    assert check["n"] == 2 and check["plan"]["steps"] == 3 and "measured against fp32" in check["verdict"]


def test_bench_cli_takes_the_flow_euler_sampler_and_refuses_it_for_an_epsilon_model(tmp_path, cli):
    """Catches: `bench --method euler` refused on the CLI (the flow sampler was reachable only from a run
    config), or accepted for an epsilon model and failing late, after rows were built and timed."""
    code, _, err = cli("bench", "builtin:flow-mnist", "--workdir", tmp_path / "flow", "--rows", "fp32", "--method", "euler",
                       "--reference-steps", "2", "--repeats", "1", "--latency-batch", "1", "--no-fid", "--quiet", "--json")
    assert code == 0, err
    report = json.loads((tmp_path / "flow" / "bench" / "report.json").read_text())
    assert report["sampler"]["method"] == "euler"
    code, _, err = cli("bench", "random:dit-tiny", "--workdir", tmp_path / "eps", "--rows", "fp32", "--method", "euler",
                       "--reference-steps", "2", "--repeats", "1", "--no-fid", "--quiet")
    assert code == 2 and err.count("error:") == 1 and "use ddim or ddpm" in err
    assert not (tmp_path / "eps" / "bench").exists()
    code, _, err = cli("bench", "random:dit-tiny", "--workdir", tmp_path / "eps", "--method", "heun", "--quiet")
    assert code == 2 and "--method heun" in err
