"""The benchmark report's plots: test Dice against the label budget, and each run's training curves."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from nnunet_ssl.evaluation.benchmark_layout import (
    BASELINE,
    FULL,
    TRAINING_LOG,
    BenchmarkSettings,
    Paths,
    Run,
    checkpoint_logging,
)


def training_log(paths: Paths) -> dict | None:
    """nnU-Net's per-epoch logging of a run: the copy kept with its evaluation, else its newest checkpoint's."""
    kept = paths.evaluation / TRAINING_LOG
    if kept.is_file():
        return json.loads(kept.read_text())
    return checkpoint_logging(paths.model)


def trainer_colors(trainers: Sequence[str]) -> dict[str, tuple[float, float, float, float]]:
    """One distinct colour per trainer, the same in every plot (matplotlib's C0-C9 repeat after ten trainers)."""
    import matplotlib

    n = len(trainers)
    if n <= 10:
        values = [matplotlib.colormaps["tab10"](i) for i in range(n)]
    elif n <= 20:
        # tab20's ten strong colours first, then their light twins: neighbours in the list get unrelated hues
        values = [matplotlib.colormaps["tab20"](i) for i in [*range(0, 20, 2), *range(1, 20, 2)][:n]]
    else:
        values = [matplotlib.colormaps["nipy_spectral"](i / n) for i in range(n)]
    return dict(zip(trainers, values))


#: line style of each seed in the training curves, in the order of the settings' seeds
SEED_STYLES = ("-", "--", ":", "-.")


def plots(out: Path, s: BenchmarkSettings, per_run: dict[tuple[str, str, int], dict[str, float]], budgets: list[str],
          trainers: list[str]) -> list[Path]:
    """dice_vs_budget.png and training_curves.png in ``out``; ``per_run`` maps (trainer, budget, seed) to the run's
    mean test metrics."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    made = []
    colors = trainer_colors(trainers)
    numeric = [b for b in budgets if b != FULL]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for t in trainers:
        xs, ys, es = [], [], []
        for b in numeric:
            values = [per_run[k]["dice"] for k in per_run if k[0] == t and k[1] == b]
            if values:
                xs.append(int(b))
                ys.append(np.mean(values))
                es.append(np.std(values, ddof=1) if len(values) > 1 else 0.0)
        if xs:
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, color=colors[t], label=t)
    full = [per_run[k]["dice"] for k in per_run if k[1] == FULL]
    if full:
        ax.axhline(float(np.mean(full)), color="k", ls="--", lw=1, label=f"{BASELINE}, all labels")
    if numeric:
        ax.set_xscale("log")
        ax.set_xticks([int(b) for b in numeric], [str(b) for b in numeric])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("labeled training cases")
    ax.set_ylabel("mean test Dice (final checkpoint)")
    ax.set_title(f"{s.dataset} {s.configuration}, {s.epochs}×{s.iterations_per_epoch} iterations")
    ax.grid(alpha=0.3)
    # outside the axes: with a dozen trainers a legend inside covers the points
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    made.append(out / "dice_vs_budget.png")
    fig.savefig(made[-1], dpi=120, bbox_inches="tight")
    plt.close(fig)

    fig, axes = plt.subplots(len(budgets), 2, figsize=(11, 3.2 * len(budgets)), squeeze=False)
    plotted: dict[str, None] = {}
    for row, b in enumerate(budgets):
        for i, seed in enumerate(s.seeds):
            for t in trainers:
                log = training_log(Paths(out, Run(t, b, seed), s))
                if not log:
                    continue
                style = SEED_STYLES[i % len(SEED_STYLES)]
                nan = float("nan")  # JSON keeps non-finite values as null
                losses = [nan if v is None else v for v in log.get("train_losses", [])]
                dice = [nan if v is None else v for v in log.get("mean_fg_dice", [])]
                axes[row, 0].plot(losses, style, color=colors[t], lw=1)
                axes[row, 1].plot(dice, style, color=colors[t], lw=1)
                plotted[t] = None
        tag = "all labels" if b == FULL else f"{b} labeled"
        axes[row, 0].set_title(f"{tag}: training loss")
        axes[row, 1].set_title(f"{tag}: pseudo-Dice per epoch, fold {s.fold} validation cases")
        for ax in axes[row]:
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3)
    fig.tight_layout()
    if plotted:
        # one legend for the figure: colour = trainer, line style = seed
        handles = [Line2D([], [], color=colors[t], lw=1.5) for t in plotted]
        handles += [Line2D([], [], color="k", ls=SEED_STYLES[i % len(SEED_STYLES)], lw=1)
                    for i in range(len(s.seeds))]
        labels = [*plotted, *(f"seed {seed}" for seed in s.seeds)]
        fig.legend(handles, labels, fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    made.append(out / "training_curves.png")
    fig.savefig(made[-1], dpi=100, bbox_inches="tight")
    plt.close(fig)
    return made
