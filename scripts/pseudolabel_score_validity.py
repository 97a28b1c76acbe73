"""Do the pseudo-labelling scores predict how good a pseudo-label is? (for choosing selection rules without the
test set)

    python scripts/pseudolabel_score_validity.py WORK LABELS [--fractions 0.25 0.5 0.75]

WORK is an ``nnUNetv2_ssl_pseudolabel`` work folder (``scores/``, ``pseudo_labels/``), LABELS a folder with the
true labels of the pool's cases, which exist when the pool is a label budget's unlabeled training cases. Never
point it at test cases. Prints, per score, its Spearman correlation with the true Dice of the pseudo-label (mean
over foreground classes; ignored voxels left out) and the mean true Dice of the cases each rule would keep.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy.stats import spearmanr

from nnunet_ssl.pseudolabel.scores import class_dice
from nnunet_ssl.pseudolabel.selection import HIGHER_IS_BETTER


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work", type=Path)
    parser.add_argument("labels", type=Path)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    a = parser.parse_args()
    settings = json.loads((a.work / "settings.json").read_text())
    ignore = settings.get("ignore_label")
    rows = []
    for f in sorted((a.work / "scores").glob("*.json")):
        record = json.loads(f.read_text())
        case = record["case"]
        pseudo_file = next((a.work / "pseudo_labels").glob(f"{case}.*"))
        ending = pseudo_file.name[len(case):]
        pseudo = sitk.GetArrayFromImage(sitk.ReadImage(str(pseudo_file)))
        truth = sitk.GetArrayFromImage(sitk.ReadImage(str(a.labels / f"{case}{ending}")))
        keep = pseudo != ignore if ignore is not None else np.ones(pseudo.shape, bool)
        labels = sorted(int(x) for x in np.unique(truth) if x > 0)
        record["true_dice"] = float(np.mean(class_dice(pseudo[keep], truth[keep], labels))) if labels else 1.0
        rows.append(record)
    print(f"{len(rows)} cases; mean true Dice of all pseudo-labels {np.mean([r['true_dice'] for r in rows]):.4f}\n")
    header = "| score | Spearman ρ with true Dice | " + " | ".join(f"true Dice of best {f:.0%}" for f in a.fractions)
    print(header + " |")
    print("|---" * (2 + len(a.fractions)) + "|")
    for name, higher in HIGHER_IS_BETTER.items():
        values = [r.get(name) for r in rows]
        if not all(v is not None and not math.isnan(v) for v in values):
            continue
        rho = spearmanr(values, [r["true_dice"] for r in rows]).statistic
        order = sorted(rows, key=lambda r: -r[name] if higher else r[name])
        kept = [np.mean([r["true_dice"] for r in order[: max(1, math.ceil(f * len(rows)))]]) for f in a.fractions]
        print(f"| {name} | {rho:+.3f} | " + " | ".join(f"{k:.4f}" for k in kept) + " |")


if __name__ == "__main__":
    main()
