"""``nnUNetv2_ssl_preprocess_unlabeled``: the command line of the unlabeled preprocessing
(:mod:`nnunet_ssl.data.preprocess_unlabeled`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from nnunet_ssl.data.preprocess_unlabeled import preprocess_unlabeled
from nnunet_ssl.errors import exit_code_of


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nnUNetv2_ssl_preprocess_unlabeled",
        description="Preprocess nnUNet_raw/<Dataset>/imagesUnlabeled with the dataset's existing nnU-Net plans into "
        "nnUNet_preprocessed/<Dataset>/<data_identifier>_unlabeled/. Re-runs only process new or changed cases.",
    )
    p.add_argument("-d", required=True, metavar="DATASET", help="dataset id or name, e.g. 4 or Dataset004_Hippocampus")
    p.add_argument("-c", nargs="+", required=True, metavar="CONFIG",
                   help="configuration(s) to preprocess for, e.g. 3d_fullres 2d")
    p.add_argument("-p", default="nnUNetPlans", metavar="PLANS", help="plans identifier (default: nnUNetPlans)")
    p.add_argument("-np", type=int, default=None, dest="num_processes", metavar="N",
                   help="worker processes (default: nnU-Net's default_num_processes, at most one per case)")
    p.add_argument("--part-id", type=int, default=0, help="this part (as nnUNetv2_predict's -part_id; default 0)")
    p.add_argument("--num-parts", type=int, default=1,
                   help="split the cases into this many parts run separately (default 1); a later run without "
                   "parts merges their records")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return exit_code_of(
        lambda: preprocess_unlabeled(args.d, args.c, plans_identifier=args.p, num_processes=args.num_processes,
                                     part_id=args.part_id, num_parts=args.num_parts))


if __name__ == "__main__":
    sys.exit(main())
