"""``nnUNetv2_ssl_trainers``: list the SSL trainers, or print the folder to export as ``nnUNet_extTrainer``."""

from __future__ import annotations

import argparse
import os

from nnunet_ssl import ext_trainer_path


def available_trainers() -> dict[str, str]:
    """Trainer name -> first line of its docstring, for every trainer the package exports."""
    from nnunet_ssl import trainers

    out = {}
    for name in trainers.__all__:
        doc = (getattr(trainers, name).__doc__ or "").strip().splitlines()
        out[name] = doc[0] if doc else ""
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="nnUNetv2_ssl_trainers",
        description="Lists the semi-supervised trainers of nnunet-ssl. Use them with nnUNetv2_train -tr NAME after "
        'export nnUNet_extTrainer="$(nnUNetv2_ssl_trainers --path)".',
    )
    parser.add_argument("--path", action="store_true", help="print the folder to export as nnUNet_extTrainer")
    args = parser.parse_args(argv)
    if args.path:
        print(ext_trainer_path())
        return
    trainers = available_trainers()
    width = max(len(n) for n in trainers)
    for name, line in trainers.items():
        print(f"{name:<{width}}  {line}")
    if not os.environ.get("nnUNet_extTrainer"):
        print(f'\nexport nnUNet_extTrainer="{ext_trainer_path()}"  # needed by nnUNetv2_train and nnUNetv2_predict')


if __name__ == "__main__":
    main()
