"""``nnUNetv2_ssl_cpu_plans``: the command line of the CPU plans variant (:mod:`nnunet_ssl.evaluation.cpu_plans`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from nnunet_ssl.errors import exit_code_of
from nnunet_ssl.evaluation.cpu_plans import DEFAULT_BATCH, DEFAULT_NAME, write_cpu_plans


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nnUNetv2_ssl_cpu_plans",
        description="Write a CPU-sized plans variant (smaller batch, narrower features, same data) of a planned "
        "dataset, e.g. batch 2 and features 16-32-64-128 for Hippocampus.")
    p.add_argument("-d", required=True, metavar="DATASET", help="dataset id or name")
    p.add_argument("-p", default="nnUNetPlans", metavar="PLANS", help="source plans identifier (default nnUNetPlans)")
    p.add_argument("--name", default=DEFAULT_NAME, help=f"identifier of the new plans (default {DEFAULT_NAME})")
    p.add_argument("-c", nargs="+", default=None, metavar="CONFIGURATION",
                   help="configurations to shrink (default: every non-cascade configuration)")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH, help=f"default {DEFAULT_BATCH}")
    p.add_argument("--base-features", type=int, default=16, help="features of the first stage (default 16)")
    p.add_argument("--max-features", type=int, default=128, help="cap on features per stage (default 128)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing plans file with other settings")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    return exit_code_of(lambda: write_cpu_plans(a.d, a.p, a.name, a.batch_size, a.base_features, a.max_features,
                                                a.c, a.overwrite))


if __name__ == "__main__":
    sys.exit(main())
