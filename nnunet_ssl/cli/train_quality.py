"""``nnUNetv2_ssl_train_quality``: the command line of the quality predictor's training
(:mod:`nnunet_ssl.quality.train_quality`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from nnunet_ssl.errors import SSLInputError, exit_code_of
from nnunet_ssl.quality.predictor import DEFAULT_MAX_FEATURES
from nnunet_ssl.quality.train_quality import DEFAULT_WEAK_EPOCHS, train_quality


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nnUNetv2_ssl_train_quality",
        description="Train the quality predictor of quality-guided SSL (Phase 1) for one dataset, configuration and "
                    "fold: it predicts the Dice of a segmentation mask per foreground class. Trains on the fold's "
                    "labeled train cases, reports MAE and Pearson r on its val cases.",
    )
    p.add_argument("-d", required=True, help="dataset name or id")
    p.add_argument("-c", required=True, help="configuration, e.g. 3d_fullres or 2d")
    p.add_argument("-f", required=True, help="fold (0-4 or 'all')")
    p.add_argument("-p", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    p.add_argument("--iterations", type=int, default=1000, help="training iterations (default 1000)")
    p.add_argument("--batch-size", type=int, default=None, help="patches per iteration (default: the plans')")
    p.add_argument("--lr", type=float, default=3e-4, help="AdamW learning rate (default 3e-4)")
    p.add_argument("--weak-checkpoints", nargs="*", default=[], metavar="PATH",
                   help="nnU-Net checkpoints (checkpoint_*.pth) whose predictions serve as weak-model masks")
    p.add_argument("--weak-epochs", nargs="*", type=int, default=list(DEFAULT_WEAK_EPOCHS), metavar="E",
                   help="snapshot the internally trained weak model after these epochs (default 1 3 5 10); "
                        "give no value to train none")
    p.add_argument("--weak-iterations-per-epoch", type=int, default=10, help="weak-model iterations per epoch (10)")
    p.add_argument("--weak-max-features", type=int, default=32, help="width cap of the weak model (32)")
    p.add_argument("--max-features", type=int, default=DEFAULT_MAX_FEATURES,
                   help=f"width cap of the predictor's encoder ({DEFAULT_MAX_FEATURES})")
    p.add_argument("--val-samples", type=int, default=200, help="held-out masks in the report (200)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-device", choices=["cpu", "cuda"], default=None, help="default: cuda if available, else cpu")
    p.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint_quality.pth")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)

    def command() -> None:
        fold: int | str = args.f if args.f == "all" else _int_fold(args.f)
        train_quality(args.d, args.c, fold, plans=args.p, iterations=args.iterations, batch_size=args.batch_size,
                      lr=args.lr, weak_checkpoints=args.weak_checkpoints, weak_epochs=args.weak_epochs,
                      weak_iterations_per_epoch=args.weak_iterations_per_epoch,
                      weak_max_features=args.weak_max_features, max_features=args.max_features,
                      val_samples=args.val_samples, seed=args.seed, device=args.device, overwrite=args.overwrite)

    return exit_code_of(command)


def _int_fold(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise SSLInputError(f"-f {text}: the fold is a number (0-4) or 'all'") from None


if __name__ == "__main__":
    sys.exit(main())
