"""The report's speed verdicts when diffpro and a float row tie: the words must not contradict the number."""

from diffpro_cli.stages.comparisons import strongest_float_baseline, versus_cache, versus_step_cut


def _row(name, steps, median, minimum=None):
    lat = {"median": median, **({"min": minimum} if minimum is not None else {})}
    return {"name": name, "steps": steps, "latency_s_per_image": lat, "fid_vs_fp": None, "size_bytes": 100}


def test_a_ratio_that_prints_as_1_00x_is_a_tie_not_slower_or_faster():
    """Catches: diffpro at 0.997 of ddim-25's speed reported "1.00x SLOWER: quantized compute does not
    pay on this machine" (and at exactly 1.0 "1.00x faster"), as results.md's bf16-ddim-50 run did."""
    rows = [_row("ddim-25", 25, 1.000), _row("bf16-ddim-25", 25, 1.004), _row("deepcache-2", 50, 1.001),
            _row("diffpro", 25, 1.003)]
    rep = {"rows": rows, "derived": {}}
    lines = {v["row"]: v["line"] for v in versus_step_cut(rep) + versus_cache(rep)}
    for name, line in lines.items():
        assert "1.00x, a tie" in line and "SLOWER" not in line and "faster" not in line, (name, line)
    best = strongest_float_baseline(rep)
    assert best["row"] == "ddim-25" and "diffpro 1.00x, a tie" in best["line"] and "SLOWER" not in best["line"]
    # a real difference keeps its word
    rows[-1]["latency_s_per_image"]["median"] = 1.2
    assert "1.20x SLOWER" in versus_step_cut(rep)[0]["line"]   # diffpro's latency over the row's, not 0.83x
    rows[-1]["latency_s_per_image"]["median"] = 0.8
    assert "1.25x faster" in versus_step_cut(rep)[0]["line"]


def test_size_words_say_larger_when_diffpro_holds_more_bytes_than_the_row():
    """Catches: a plan keeping most layers float (more than 16 average bits) against bf16-ddim-K read
    "0.80x smaller", diffpro-nocache (the same checkpoint) "1.00x smaller", and a row without sizes
    "0.00x smaller"."""
    def row(name, size):
        return {**_row(name, 25, 1.0), "size_bytes": size}

    rep = {"rows": [row("bf16-ddim-25", 800), row("diffpro-nocache", 1000), row("diffpro", 1000)], "derived": {}}
    lines = {v["row"]: v["line"] for v in versus_step_cut(rep) + versus_cache(rep)}
    assert lines["bf16-ddim-25"].endswith("1.25x LARGER") and "smaller" not in lines["bf16-ddim-25"]
    assert lines["diffpro-nocache"].endswith("the same size")
    rep["rows"][0]["size_bytes"] = None
    assert versus_step_cut(rep)[0]["line"].endswith("size n/a")
