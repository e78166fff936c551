"""Training-loss curves of the shipped built-in models, read from their model cards (no model is loaded):
`python scripts/plot_training.py [--out docs/img/training-loss.png]`."""

import argparse
import json
from pathlib import Path

from diffpro_cli.plots import lines_on, new_figure, save_figure
from diffpro_cli.models.builtin import WEIGHTS_DIR


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("docs/img/training-loss.png"))
    a = ap.parse_args()
    fig, ax = new_figure(1, 1, width=7.0, height=4.0)
    series = []
    for card_path in sorted(WEIGHTS_DIR.glob("*.json")):
        card = json.loads(card_path.read_text())
        curve = card.get("loss_curve_per_100_steps") or []
        hours = card.get("train_seconds", 0) / 3600
        label = f"{card['name']} ({card['steps']} steps × {card['batch']}, {hours:.1f} h on {card.get('threads', '?')} threads)"
        series.append(([100 * (i + 1) for i in range(len(curve))], curve, label))
        for phase in card.get("phases", [])[1:]:
            ax.axvline(phase["start"], color="grey", linestyle=":", linewidth=0.8)
    lines_on(ax, series, title="training loss (plain epsilon MSE, mean per 100 steps); dotted: a new phase",
             xlabel="step", ylabel="loss", logy=True)
    print(save_figure(fig, a.out))


if __name__ == "__main__":
    main()
