"""Plot helpers shared by the benchmark scripts."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def plot_rsum_curves(results: dict[str, list[dict]], path: Path, title: str,
                     ylabel: str = "validation rsum", boundary: int | None = None) -> None:
    """Validation rsum per epoch for each arm: the mean over seeds, with the min-max band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, runs in results.items():
        curves = np.array([r["val_rsum"] for r in runs])
        x = np.arange(1, curves.shape[1] + 1)
        ax.plot(x, curves.mean(0), marker="o", ms=3, label=name)
        ax.fill_between(x, curves.min(0), curves.max(0), alpha=0.15)
    if boundary is not None:
        ax.axvline(boundary + 0.5, color="grey", ls="--", lw=1)
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
