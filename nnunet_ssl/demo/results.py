"""The demo's results: nnU-Net's validation Dice of each trainer, side by side."""

from __future__ import annotations

import json
from pathlib import Path

from nnunet_ssl.demo.settings import CONFIGURATION, FOLD, PLANS


def trainer_folder(workdir: Path, dataset_name: str, trainer: str) -> Path:
    return workdir / "nnUNet_results" / dataset_name / f"{trainer}__{PLANS}__{CONFIGURATION}" / f"fold_{FOLD}"


def load_dice(summary_file: Path) -> dict[str, float]:
    """{'foreground mean': Dice, '<class key>': Dice, ...} from nnU-Net's validation summary.json."""
    summary = json.loads(summary_file.read_text())
    out = {"foreground mean": float(summary["foreground_mean"]["Dice"])}
    for key, metrics in summary["mean"].items():
        out[str(key)] = float(metrics["Dice"])
    return out


def label_names(dataset_json: dict) -> dict[str, str]:
    """Class key as written in summary.json -> label name (regions keep their key)."""
    names = {}
    for name, value in dataset_json.get("labels", {}).items():
        if isinstance(value, int) and value != 0:
            names[str(value)] = name
    return names


def format_table(results: dict[str, dict[str, float]], names: dict[str, str]) -> str:
    """Side-by-side Dice of the trainers in ``results`` (trainer -> row -> Dice), plus the difference of the last
    trainer to the first."""
    trainers = list(results)
    rows: list[str] = []
    for table in results.values():
        rows += [r for r in table if r not in rows]
    headers = [t.removeprefix("nnUNetTrainer") for t in trainers]
    width = max(len(f"{r} {names.get(r, '')}") for r in rows) + 2
    lines = ["".ljust(width) + "".join(h.rjust(14) for h in headers) + ("difference".rjust(13) if len(trainers) > 1
                                                                         else "")]
    for row in rows:
        label = f"{row} {names[row]}" if row in names else row
        values = [results[t].get(row) for t in trainers]
        cells = "".join(("-" if v is None else f"{v:.4f}").rjust(14) for v in values)
        if len(trainers) > 1 and values[0] is not None and values[-1] is not None:
            cells += f"{values[-1] - values[0]:+.4f}".rjust(13)
        lines.append(label.ljust(width) + cells)
    return "\n".join(lines)
