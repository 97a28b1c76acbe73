"""``nnUNetv2_ssl_sweep``: settings of one SSL trainer chosen on the fold's validation cases only
(:mod:`nnunet_ssl.evaluation.sweep`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from nnunet_ssl.errors import exit_code_of


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nnUNetv2_ssl_sweep",
        description="Train one SSL trainer at every point of a settings grid on one label budget and seed of a "
        "benchmark (its labeled cases, unlabeled pool, schedule and seed), score each by nnU-Net's final "
        "validation Dice on the fold's validation cases, next to the benchmark's supervised baseline, and write "
        "sweep.json and sweep.md. The test cases are never predicted. Rerun the same command to resume.")
    p.add_argument("-b", required=True, type=Path, metavar="BENCHMARK",
                   help="the -o folder of nnUNetv2_ssl_benchmark whose baseline ran at this budget and seed")
    p.add_argument("--budget", required=True, type=int, metavar="N", help="labeled cases (a budget of the benchmark)")
    p.add_argument("--seed", type=int, default=0, help="default 0")
    p.add_argument("-tr", required=True, metavar="TRAINER", help="one SSL trainer (nnUNetv2_ssl_trainers)")
    p.add_argument("--grid", nargs="*", default=[], metavar="NAME=V1,V2",
                   help="settings (class attributes, set through nnUNet_ssl_settings) and their values, e.g. "
                   "unsupervised_share=0.1,0.2,0.5 rampup_fraction=0.2,0.4; preset=default,paper picks the preset; "
                   "the points are the cartesian product (none: the defaults)")
    p.add_argument("-o", required=True, type=Path, metavar="OUT", help="sweep folder (one budget and seed)")
    p.add_argument("-device", default="cuda", choices=("cuda", "cpu", "mps"))
    return p


def main(argv: Sequence[str] | None = None) -> int:
    a = _parser().parse_args(argv)

    def command() -> None:
        from nnunet_ssl.evaluation.sweep import SweepSpec, chosen, parse_grid, run_sweep

        spec = SweepSpec(benchmark=a.b.resolve(), budget=a.budget, seed=a.seed, trainer=a.tr,
                         points=parse_grid(a.grid), out=a.o.resolve(), device=a.device)
        sweep = run_sweep(spec)
        best = chosen(sweep).get(a.tr)
        if best is not None:
            verdict = "chosen on validation" if best["delta"] > 0 else \
                "no point beats the baseline on validation; the best"
            print(f"{verdict}: {a.tr} {best['tag']} (Dice {best['validation']['mean']:.4f}, "
                  f"{best['delta']:+.4f} vs the baseline); report: {spec.out / 'sweep.md'}")

    return exit_code_of(command)


if __name__ == "__main__":
    sys.exit(main())
