"""Figures drawn from degenerate but valid artifacts: nothing to plot must not print matplotlib's
"No artists with labels found to put in legend" on stderr (it did, under --quiet, for a prune that keeps
every reference step: every drift is 0 and a log axis draws no point)."""

import logging
import warnings

from diffpro_cli.plots import plot_drift, plot_pareto


def _quiet(caplog, draw):
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        path = draw()
    said = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    assert not [m for m in said if "legend" in m], said
    return path


def test_a_zero_drift_curve_draws_without_a_legend_warning(tmp_path, caplog):
    # catches: ax.legend() called on an axis with no labelled line (the all-zero drift curve)
    payload = {"drift_curve": {"selected": [[999, 0.0], [0, 0.0]], "uniform": [[999, 0.0], [0, 0.0]]},
               "timesteps": [999, 0], "drift": 0.0, "uniform_drift": 0.0, "protected": [0]}
    assert _quiet(caplog, lambda: plot_drift(payload, tmp_path / "drift.png")).stat().st_size > 0


def test_a_pareto_front_of_zero_error_plans_draws_without_a_legend_warning(tmp_path, caplog):
    # catches: the same on allocate's Pareto figure when every point predicts zero error
    pareto = {"x": "avg_bits", "points": [{"method": "milp", "avg_bits": 8.0, "error": 0.0}], "chosen": None}
    assert _quiet(caplog, lambda: plot_pareto(pareto, tmp_path / "pareto.png")).stat().st_size > 0


def test_a_drawn_curve_keeps_its_legend(tmp_path, caplog):
    # catches: the guard dropping the legend of a figure that has lines (no label for the reader)
    import matplotlib.pyplot as plt

    payload = {"drift_curve": {"selected": [[999, 0.0], [500, 0.2], [0, 0.1]], "uniform": [[999, 0.0], [0, 0.3]]},
               "timesteps": [999, 500, 0], "drift": 0.1, "uniform_drift": 0.3}
    seen = []
    real = plt.Axes.legend
    try:
        plt.Axes.legend = lambda self, *a, **k: seen.append(self) or real(self, *a, **k)
        _quiet(caplog, lambda: plot_drift(payload, tmp_path / "drift.png"))
    finally:
        plt.Axes.legend = real
    assert len(seen) == 1
