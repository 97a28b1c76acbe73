"""``nnUNetv2_ssl_predict_uncertainty``: the command line of prediction with voxel-wise uncertainty maps
(:mod:`nnunet_ssl.uncertainty.predict_uncertainty`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from nnunet_ssl.errors import exit_code_of


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nnUNetv2_ssl_predict_uncertainty",
        description="Predicts a folder like nnUNetv2_predict and writes <case>_uncertainty<ending> (Dirichlet total "
        "uncertainty K/S for evidential trainers such as nnUNetTrainerMEDL, normalised softmax entropy otherwise, "
        "in [0, 1], on the image's voxel grid) beside each segmentation, plus uncertainty.csv with each case's "
        "mean uncertainty, most uncertain first.")
    parser.add_argument("-i", required=True, help="input folder (nnU-Net raw layout: <case>_0000<ending>)")
    parser.add_argument("-o", required=True, help="output folder")
    parser.add_argument("-d", required=True, help="dataset name or id")
    parser.add_argument("-c", required=True, help="configuration, e.g. 3d_fullres")
    parser.add_argument("-tr", default="nnUNetTrainer", help="trainer (default nnUNetTrainer)")
    parser.add_argument("-p", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    parser.add_argument("-f", nargs="+", default=None, help="folds (default: all folds with the checkpoint)")
    parser.add_argument("-chk", nargs="+", default=["checkpoint_final.pth"],
                        help="checkpoint file(s); several are averaged, e.g. checkpoint_final.pth "
                        "checkpoint_final_net2.pth for MEDL's two networks")
    parser.add_argument("-step_size", type=float, default=0.5, help="sliding-window step (default 0.5)")
    parser.add_argument("--disable_tta", action="store_true", help="no mirroring at test time")
    parser.add_argument("-device", default="cuda", choices=["cuda", "cpu", "mps"], help="default cuda")
    parser.add_argument("-npp", type=int, default=2, help="preprocessing processes (default 2)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)

    def command() -> None:
        # torch and nnU-Net load here, so that --help answers at once
        from nnunet_ssl.uncertainty.predict_uncertainty import (
            CSV_NAME,
            model_folder_of,
            predict_with_uncertainty,
            select_device,
        )

        device = select_device(args.device)
        model_folder = model_folder_of(args.d, args.tr, args.p, args.c)
        rows = predict_with_uncertainty(model_folder, args.i, args.o, args.f, args.chk, device, args.step_size,
                                        not args.disable_tta, args.npp)
        print(f"{len(rows)} cases; uncertainty maps and {CSV_NAME} in {args.o}")

    return exit_code_of(command)


if __name__ == "__main__":
    sys.exit(main())
