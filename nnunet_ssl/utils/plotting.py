"""progress_ssl.png, drawn beside nnU-Net's progress.png every epoch."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_ssl_progress(log: dict[str, list], panels: list[tuple[str, dict[str, str]]], filename: str) -> None:
    """One panel per (title, {label: log key}); keys that are missing or empty are skipped. Values may be
    scalars or per-class lists (drawn as one line per class)."""
    # nnU-Net's own plot calls seaborn.set(font_scale=2.5) globally; draw with matplotlib's defaults instead
    with plt.style.context("default"):
        _draw(log, panels, filename)


def log_axis_scale(values: np.ndarray) -> tuple[str, dict[str, float]]:
    """Scale of a "(log)" panel: log while every finite value is positive, else symlog, linear below the smallest
    nonzero magnitude, so that zero or negative losses (an evidential term, a negative Dice) stay visible."""
    finite = values[np.isfinite(values)]
    if finite.size == 0 or (finite > 0).all():
        return "log", {}
    nonzero = np.abs(finite[finite != 0])
    return "symlog", {"linthresh": float(nonzero.min()) if nonzero.size else 1e-3}


def _draw(log: dict[str, list], panels: list[tuple[str, dict[str, str]]], filename: str) -> None:
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 2.8 * len(panels)), squeeze=False)
    for ax, (title, series) in zip(axes[:, 0], panels):
        drawn: list[np.ndarray] = []
        for label, key in series.items():
            values = log.get(key) or []
            if not values:
                continue
            arr = np.array([np.asarray(v, dtype=float) for v in values], dtype=float)
            drawn.append(arr.ravel())
            x = np.arange(len(arr))
            if arr.ndim == 1:
                ax.plot(x, arr, label=label, marker="o" if len(arr) < 30 else None)
            else:
                for c in range(arr.shape[1]):
                    ax.plot(x, arr[:, c], label=f"{label} {c + 1}")
        ax.set_title(title)
        if title.endswith("(log)"):
            scale, kwargs = log_axis_scale(np.concatenate(drawn) if drawn else np.array([]))
            ax.set_yscale(scale, **kwargs)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_xlabel("epoch")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="best", fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(filename, dpi=80)
    plt.close(fig)
