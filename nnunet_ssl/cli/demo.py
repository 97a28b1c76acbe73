"""``nnUNetv2_ssl_demo``: the command line of the end-to-end CPU demo (:mod:`nnunet_ssl.demo.run_demo`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from nnunet_ssl.demo.run_demo import run_demo
from nnunet_ssl.demo.settings import (
    DEFAULT_EPOCHS,
    DEFAULT_ITERATIONS,
    DEFAULT_NUM_LABELED,
    DEFAULT_WORKDIR,
    FOLD,
    SYNTHETIC_ID,
)
from nnunet_ssl.demo.workdir import DemoError
from nnunet_ssl.evaluation.stages import CommandNotFound, StageFailed


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nnUNetv2_ssl_demo",
        description="Runs the nnunet-ssl workflow end to end on the CPU: plan and preprocess, preprocess unlabeled "
        "images, simulate a label budget, train the supervised baseline and Mean Teacher on fold 0, and compare "
        f"their validation Dice. By default on a synthetic 3D dataset (Dataset{SYNTHETIC_ID}), in about 4 minutes "
        "on 2 CPU cores. A short demo, not a benchmark.",
    )
    p.add_argument("--raw", type=Path, default=None, metavar="FOLDER",
                   help="a raw nnU-Net dataset folder (DatasetXXX_Name with dataset.json, imagesTr, labelsTr and "
                   "optionally imagesUnlabeled) to use instead of the synthetic one; it is copied, never modified. "
                   "Real datasets take much longer than the synthetic one")
    p.add_argument("--workdir", type=Path, default=Path(DEFAULT_WORKDIR), metavar="DIR",
                   help=f"folder for nnUNet_raw, nnUNet_preprocessed, nnUNet_results and logs (default ./"
                   f"{DEFAULT_WORKDIR}); must be new, empty, or made by an earlier demo")
    p.add_argument("--num-labeled", type=int, default=DEFAULT_NUM_LABELED, metavar="N",
                   help=f"labeled training cases kept in fold {FOLD}; the others become unlabeled "
                   f"(default {DEFAULT_NUM_LABELED})")
    p.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS, metavar="E",
                   help=f"epochs per training (default {DEFAULT_EPOCHS})")
    p.add_argument("--iterations", type=int, default=DEFAULT_ITERATIONS, metavar="I",
                   help=f"training iterations per epoch (default {DEFAULT_ITERATIONS})")
    p.add_argument("--seed", type=int, default=0, metavar="S",
                   help="seed of the synthetic data, the choice of labeled cases and the training (default 0)")
    p.add_argument("--keep", action="store_true",
                   help="reuse the dataset, the preprocessing and the finished trainings of an earlier demo in "
                   "--workdir (a training is redone if it has no validation result or ran with other settings); by "
                   "default the demo's folders in --workdir are rebuilt from scratch")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return run_demo(args.raw, args.workdir, args.num_labeled, args.epochs, args.iterations, args.seed, args.keep)
    except (DemoError, CommandNotFound) as e:
        print(f"nnUNetv2_ssl_demo: error: {e}", file=sys.stderr)
        return 2
    except StageFailed as e:
        print(f"\nnnUNetv2_ssl_demo: {e} (log: {e.log})\nlast lines of the log:", file=sys.stderr)
        for line in e.tail:
            print(f"  | {line}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nnnUNetv2_ssl_demo: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
