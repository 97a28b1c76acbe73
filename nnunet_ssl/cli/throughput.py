"""``nnUNetv2_ssl_throughput``: the command line of the training-throughput measurement
(:mod:`nnunet_ssl.evaluation.throughput`)."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Sequence

from nnunet_ssl.errors import exit_code_of
from nnunet_ssl.evaluation.throughput import TIMING_ENV
from nnunet_ssl.evaluation.throughput_table import REFERENCE_TRAINER


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nnUNetv2_ssl_throughput",
        description="Seconds per training iteration of SSL trainers against the supervised nnUNetTrainer on the "
        "same dataset, plans, configuration and fold, each trainer in a fresh process; also the share of each step "
        "spent waiting for data, peak memory, the analytic compute (forward = 1, backward = 2 units) and the FLOPs of "
        "one step counted by torch's FlopCounterMode. Prints a "
        "markdown table; -o also writes it with the command and machine details.",
    )
    p.add_argument("-d", required=True, metavar="DATASET", help="dataset id or name")
    p.add_argument("-c", required=True, metavar="CONFIGURATION", help="configuration, e.g. 3d_fullres")
    p.add_argument("-p", default="nnUNetPlans", metavar="PLANS", help="plans identifier (default nnUNetPlans)")
    p.add_argument("-f", default="0", metavar="FOLD", help="fold (default 0)")
    p.add_argument("-tr", nargs="+", default=None, metavar="TRAINER",
                   help=f"trainers to time (default: {REFERENCE_TRAINER} and every SSL trainer of the package); "
                   f"{REFERENCE_TRAINER} is always added as the reference")
    p.add_argument("--iterations", type=int, default=10, help="measured iterations per trainer (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="warm-up iterations per trainer, not measured (default 3)")
    p.add_argument("--rounds", type=int, default=1,
                   help="run the list of trainers this many times, interleaved (A B C A B C), and pool the measured "
                   "iterations, so that a change of the machine's load hits every trainer alike (default 1)")
    p.add_argument("--at", type=float, default=0.5, metavar="FRACTION",
                   help="time the steps at this point of the run: each trainer is put at the start of epoch "
                   "round(FRACTION x epochs) as a resumed run would be (default 0.5; 0 times the first epoch, where "
                   "staged trainers such as BCP and MLB-Seg still run their cheaper first stage)")
    p.add_argument("-device", choices=("cpu", "cuda"), default=None,
                   help="default: cuda if available, else cpu")
    p.add_argument("-o", default=None, metavar="FILE.md", help="also write the table, command and machine to FILE")
    p.add_argument("--note", default=None, help="a sentence added under the table in -o (e.g. the machine's load)")
    return p


def command_line(argv: Sequence[str]) -> str:
    """The command as the document shows it: the timing-relevant environment variables that are set, then the
    command with its arguments."""
    env = [f"{k}={shlex.quote(os.environ[k])}" for k in TIMING_ENV if os.environ.get(k) is not None]
    return " ".join([*env, "nnUNetv2_ssl_throughput", shlex.join(argv)])


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    shown = command_line(list(sys.argv[1:] if argv is None else argv))

    def command() -> None:
        from nnunet_ssl.evaluation.throughput import run_throughput

        try:
            report = run_throughput(args.d, args.c, args.p, args.f, args.tr, args.iterations, args.warmup,
                                    args.rounds, args.device, args.o, args.note, shown, args.at)
            print(report.table)
            if args.o:
                print(f"written to {args.o}")
            if report.failed:
                raise RuntimeError(f"trainers failed: {', '.join(report.failed)} (see the log tails above)")
        except RuntimeError as e:
            sys.stdout.flush()
            print(f"nnunet-ssl: {e}", file=sys.stderr)
            raise SystemExit(1) from None

    return exit_code_of(command)


if __name__ == "__main__":
    sys.exit(main())
