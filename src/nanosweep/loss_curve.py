"""One run's loss curve as a PNG: what a trial process draws at its run's end, with matplotlib alone.

The study's figures (analysis/plots.py) need the analysis stack (pandas tables, scipy and statsmodels intervals); a
trial process must not load it, so the one figure it draws lives here.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on training machines and CI
import matplotlib.pyplot as plt  # noqa: E402

Points = list[tuple[int, float]]


def save_loss_curve(run_name: str, iter_loss: Points, train_loss: Points, val_loss: Points, path: Path) -> None:
    """One run's losses against iterations: per-iteration loss faintly, evaluations boldly."""
    fig, ax = plt.subplots(figsize=(8, 5))
    if iter_loss:
        ax.plot(*zip(*iter_loss), color="0.7", linewidth=1, label="iteration loss (one batch)")
    if train_loss:
        ax.plot(*zip(*train_loss), "o-", color="tab:blue", label="train loss (evaluation)")
    if val_loss:
        ax.plot(*zip(*val_loss), "s-", color="tab:orange", label="validation loss (evaluation)")
    ax.set_title(f"{run_name}: loss")
    ax.set_xlabel("iteration")
    ax.set_ylabel("cross-entropy loss (nats per character)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
