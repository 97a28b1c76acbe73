"""``nnUNetv2_ssl_benchmark``: the command line of the label-budget benchmark (:mod:`nnunet_ssl.evaluation.benchmark`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from nnunet_ssl.errors import exit_code_of
from nnunet_ssl.evaluation.benchmark_layout import BASELINE, OFFLINE, RESEEDED, BenchmarkSettings


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nnUNetv2_ssl_benchmark",
        description="Train trainers x label budgets x seeds on one fold, predict the held-out test set with the final "
        "checkpoint, evaluate in mm and write a report with paired tests against the supervised baseline. "
        "Rerun the same command to resume.")
    p.add_argument("-d", metavar="DATASET", help="dataset id or name")
    p.add_argument("-c", default="3d_fullres", metavar="CONFIGURATION", help="default 3d_fullres")
    p.add_argument("-f", type=int, default=0, metavar="FOLD", help="fold (default 0)")
    p.add_argument("-p", default="nnUNetPlans", metavar="PLANS", help="plans identifier, e.g. nnUNetPlans_CPU")
    p.add_argument("-o", required=True, metavar="OUT", help="benchmark folder (resumed if it exists)")
    p.add_argument("-tr", nargs="*", default=[], metavar="TRAINER",
                   help=f"SSL trainers to compare with {BASELINE} (which always runs); add {RESEEDED} for the "
                   f"training-noise control and {OFFLINE} for offline pseudo-labelling (the baseline as teacher)")
    p.add_argument("--budgets", nargs="+", type=int, metavar="N", help="labeled cases, e.g. 3 10")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="default 0 1")
    p.add_argument("--full", action="store_true", help=f"also train {BASELINE} on all training cases of the fold")
    p.add_argument("--epochs", type=int)
    p.add_argument("--iterations-per-epoch", type=int)
    p.add_argument("--val-iterations", type=int, default=10, help="validation iterations per epoch (default 10)")
    p.add_argument("--test-images", type=Path, default=None, help="default nnUNet_raw/<dataset>/imagesTs")
    p.add_argument("--test-labels", type=Path, default=None, help="default nnUNet_raw/<dataset>/labelsTs")
    p.add_argument("--test-cases", nargs="+", default=None, metavar="ID", help="only these test cases")
    p.add_argument("--nsd-tolerance", type=float, default=1.0, help="NSD tolerance in mm (default 1)")
    p.add_argument("--groups", default="", metavar="JSON",
                   help="case id -> group (e.g. PSFHS's frame_runs.json): the fold's train/val and each budget's "
                   "labeled/unlabeled cases keep every group on one side")
    p.add_argument("-device", default="cuda", choices=("cuda", "cpu", "mps"))
    p.add_argument("--no-file-check", action="store_true",
                   help="skip the byte-identical image check between test and training files")
    p.add_argument("--records", type=Path, default=None, metavar="DIR",
                   help="keep a small copy of every finished run (per-case metrics, training log, provenance) and a "
                   "report in DIR; runs found there count as finished, so the benchmark resumes from DIR in a new "
                   "work folder")
    p.add_argument("--offline-rounds", type=int, default=1,
                   help=f"rounds of the offline pseudo-labelling row (-tr {OFFLINE}; default 1)")
    p.add_argument("--dry-run", action="store_true", help="print the runs and their state, run nothing")
    p.add_argument("--report-only", action="store_true",
                   help="rewrite the report of -o (a work or records folder) from its finished runs; needs no "
                   "other option")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    a = parser.parse_args(argv)
    if not a.report_only:
        missing = [flag for flag, value in (("-d", a.d), ("--budgets", a.budgets), ("--epochs", a.epochs),
                                            ("--iterations-per-epoch", a.iterations_per_epoch)) if value is None]
        if missing:
            parser.error(f"the following arguments are required: {', '.join(missing)}")

    def command() -> None:
        from nnunet_ssl.evaluation.benchmark import check_schedule, rewrite_report, run_benchmark

        out = Path(a.o).resolve()
        if a.report_only:
            print(f"report: {rewrite_report(out)}")
            return
        check_schedule(a.epochs, a.iterations_per_epoch, a.val_iterations, a.budgets)
        s = BenchmarkSettings(dataset=a.d, configuration=a.c, fold=a.f, plans=a.p, trainers=list(a.tr),
                              budgets=sorted(set(a.budgets)), seeds=list(dict.fromkeys(a.seeds)), full=a.full,
                              epochs=a.epochs, iterations_per_epoch=a.iterations_per_epoch,
                              val_iterations=a.val_iterations, test_cases=list(a.test_cases or []),
                              nsd_tolerance_mm=a.nsd_tolerance, offline_rounds=a.offline_rounds, groups=a.groups)
        records = a.records.resolve() if a.records is not None else None
        run_benchmark(s, out, a.device, a.test_images, a.test_labels, a.dry_run, not a.no_file_check, records)

    return exit_code_of(command)


if __name__ == "__main__":
    sys.exit(main())
