"""``nnUNetv2_ssl_evaluate REF_FOLDER PRED_FOLDER -o OUT_FOLDER``: Dice, IoU, HD95, ASD and NSD in millimetres.

Reference folder first, as in nnU-Net's ``nnUNetv2_evaluate_folder``. Writes ``per_case.csv`` (one row per case and
class) and ``summary.json`` (per-class and foreground-mean statistics plus the settings) to OUT_FOLDER. The engine is
``nnunet_ssl/evaluation/metrics_folders.py``; definitions, units and the empty-mask convention:
``nnunet_ssl/evaluation/metrics.py``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from nnunet_ssl.errors import exit_code_of


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nnUNetv2_ssl_evaluate",
        description="Per-case and per-class Dice, IoU, HD95, ASD and NSD of predicted label images against reference "
        "label images (matched by file name), with distances in mm from the image spacing. Writes per_case.csv and "
        "summary.json to the output folder.",
    )
    p.add_argument("reference_folder", metavar="REF_FOLDER", help="reference (ground-truth) label images")
    p.add_argument("prediction_folder", metavar="PRED_FOLDER", help="predicted label images, same file names")
    p.add_argument("-o", "--output-folder", required=True, metavar="OUT_FOLDER",
                   help="where per_case.csv and summary.json are written (created if needed)")
    p.add_argument("-dj", "--dataset-json", default=None, metavar="DATASET_JSON",
                   help="the dataset's dataset.json: class names, file ending and reader. Default: classes are the "
                   "labels found in the references, named label_<i>; the file ending is inferred")
    p.add_argument("--nsd-tolerance", type=float, default=1.0, metavar="TAU",
                   help="NSD tolerance in mm (in voxels with --voxel-units); default 1.0")
    p.add_argument("--voxel-units", action="store_true",
                   help="compute distances with spacing 1 (voxel units) instead of the image spacing in mm")
    p.add_argument("--case-ids", nargs="+", default=None, metavar="CASE",
                   help="evaluate only these cases (file names without the ending)")
    p.add_argument("-np", "--num-processes", type=int, default=1, metavar="N",
                   help="worker processes (default 1)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)

    def command() -> None:
        from nnunet_ssl.evaluation.metrics_files import PER_CASE_FILE, SUMMARY_FILE
        from nnunet_ssl.evaluation.metrics_folders import evaluate_folders

        result = evaluate_folders(
            args.reference_folder,
            args.prediction_folder,
            args.output_folder,
            dataset_json=args.dataset_json,
            nsd_tolerance_mm=args.nsd_tolerance,
            voxel_units=args.voxel_units,
            case_ids=args.case_ids,
            num_processes=args.num_processes,
        )
        print_summary(result.summary)
        print(f"wrote {args.output_folder}/{PER_CASE_FILE} and {args.output_folder}/{SUMMARY_FILE}")

    return exit_code_of(command)


def _fmt(stats: dict) -> str:
    mean = stats["mean"]
    text = "-" if mean is None else f"{mean:.4g}"
    return text + (f" ({stats['n_nan']} NaN)" if stats["n_nan"] else "")


def print_summary(summary: dict) -> None:
    """Means per class and over foreground classes, NaN counts in brackets."""
    columns = summary["settings"]["metric_columns"]
    print(f"{summary['num_cases']} cases; mean over cases (NaN excluded, count in brackets)")
    print("class".ljust(20) + "".join(c.rjust(18) for c in columns))
    for cid, entry in summary["per_class"].items():
        print(f"{cid} {entry['name']}"[:19].ljust(20) + "".join(_fmt(entry[c]).rjust(18) for c in columns))
    fg = summary["foreground_mean"]
    print("foreground mean".ljust(20) + "".join(_fmt(fg[c]).rjust(18) for c in columns))


if __name__ == "__main__":
    sys.exit(main())
