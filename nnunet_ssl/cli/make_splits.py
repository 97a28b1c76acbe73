"""``nnUNetv2_ssl_make_splits``: the command line of the label-budget splits (:mod:`nnunet_ssl.data.splits`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from nnunet_ssl.data.splits import make_label_budget_splits, restore_original_splits
from nnunet_ssl.errors import SSLInputError, exit_code_of


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nnUNetv2_ssl_make_splits",
        description="Keep N labeled training cases per fold of splits_final.json and mark the rest 'unlabeled', to "
        "simulate a label budget. The original splits are backed up to splits_final.original.json.",
    )
    p.add_argument("-d", required=True, metavar="DATASET", help="dataset id or name, e.g. 4 or Dataset004_Hippocampus")
    p.add_argument("--num-labeled", type=int, default=None, metavar="N", help="labeled training cases per fold")
    p.add_argument("--fraction", type=float, default=None, metavar="F",
                   help="fraction of each fold's training cases kept labeled, in (0, 1]")
    p.add_argument("--seed", type=int, default=0, help="seed of the random choice of labeled cases (default 0)")
    p.add_argument("--groups", default=None, metavar="JSON",
                   help="case id -> group (e.g. frames of one ultrasound sweep): folds and the labeled/unlabeled "
                   "choice keep each group on one side; the group the budget cuts leaves its other cases out")
    p.add_argument("--restore", action="store_true", help="write the original splits back and exit")
    sparse = p.add_argument_group("simulated sparse annotation (a new dataset; the source is only read)")
    sparse.add_argument("--sparse-slices", type=int, default=None, metavar="K",
                        help="write a copy of the dataset whose training labels keep K slices per case, spread over "
                        "the foreground, the rest nnU-Net's ignore label")
    sparse.add_argument("-t", type=int, default=None, metavar="ID", help="id of that copy (with --sparse-slices)")
    sparse.add_argument("--sparse-axis", type=int, default=None,
                        help="slice axis in the label array (default: the axis of the largest spacing)")
    sparse.add_argument("--overwrite", action="store_true", help="replace an earlier sparse copy with this id")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)

    def command() -> None:
        if args.sparse_slices is not None:
            if args.t is None or args.restore or args.num_labeled is not None or args.fraction is not None:
                raise SSLInputError("--sparse-slices writes a new dataset: give its id with -t, and no budget or "
                                    "--restore (apply a budget to the new dataset afterwards)")
            from nnunet_ssl.data.sparse import make_sparse_dataset

            make_sparse_dataset(args.d, args.t, args.sparse_slices, args.sparse_axis, overwrite=args.overwrite)
            return
        if args.restore:
            if args.num_labeled is not None or args.fraction is not None:
                raise SSLInputError("--restore takes no budget; drop --num-labeled/--fraction")
            restore_original_splits(args.d)
        else:
            make_label_budget_splits(args.d, num_labeled=args.num_labeled, fraction=args.fraction, seed=args.seed,
                                     groups_file=args.groups)

    return exit_code_of(command)


if __name__ == "__main__":
    sys.exit(main())
