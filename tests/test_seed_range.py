"""One seed rule for every way a run takes a seed: an integer from 0 to 2**63 - 1. A negative --seed ran the
whole prune teacher and then crashed in numpy's bootstrap (default_rng refuses negatives), and bench's
reference subset and bootstraps the same way; a seed of 2**64 or more crashed torch.manual_seed on random:
models. Both are now refused up front with one line."""

import pytest

import diffpro
from diffpro_cli.errors import UsageError

SEED_MAX = 2 ** 63 - 1


@pytest.mark.parametrize("seed", ["-1", str(2 ** 64)])
@pytest.mark.parametrize("command", ["profile", "prune", "sample"])
def test_the_cli_refuses_a_seed_outside_the_range_before_any_work(cli, tmp_path, command, seed):
    # catches: a command whose --seed is not the shared Seed option (no range), which would run and crash late
    where = ["--out", tmp_path / "g.png"] if command == "sample" else ["-w", tmp_path / "w"]
    code, _, err = cli(command, "random:dit-tiny", "--seed", seed, *where)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:") and "--seed" in lines[0], err
    assert not (tmp_path / "w").exists() and not (tmp_path / "g.png").exists()


def test_the_largest_seed_is_accepted(cli, tmp_path):
    # catches: an off-by-one bound (2**63 - 1 refused) or the sampler overflowing on seed × stride + index
    code, _, err = cli("sample", "random:dit-tiny", "--seed", str(SEED_MAX), "--n", "2", "--steps", "2",
                       "--out", tmp_path / "g.png", "-q")
    assert code == 0, err
    assert (tmp_path / "g.png").exists()


@pytest.mark.parametrize("seed", [-1, 2 ** 63, 1.5])
def test_the_api_refuses_the_same_seeds(tmp_path, seed):
    # catches: the library taking a seed the CLI refuses (the API's own, older check: integers only)
    with pytest.raises(UsageError, match="use an integer from 0 to"):
        diffpro.profile("random:dit-tiny", tmp_path / "w", seed=seed)
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("toml,where", [("seed = -3\n", "seed -3"), ("[prune]\nseed = -3\n", "[prune] seed -3")])
def test_a_run_config_seed_outside_the_range_is_named_before_any_stage(cli, tmp_path, toml, where):
    # catches: a config seed (top-level or a section's own) reaching the stages unchecked
    config = tmp_path / "c.toml"
    config.write_text(f'model = "random:dit-tiny"\nworkdir = "{tmp_path / "w"}"\n' + toml)
    code, _, err = cli("run", config)
    assert code == 2 and where in err and err.count("error:") == 1, err
    assert not (tmp_path / "w").exists()
