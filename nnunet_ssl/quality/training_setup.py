"""The quality predictor's training data: the fold's cases and nnU-Net's data loader with its training augmentation,
derived from -d/-c/-f/-p (``TrainingSetup``)."""

from __future__ import annotations

import json
import os
import random
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from nnunet_ssl.compat.tooling import augmentation_parameters
from nnunet_ssl.errors import SSLInputError
from nnunet_ssl.quality.predictor import check_supported_labels


def seed_everything(seed: int) -> None:
    """Seeds Python's, numpy's and torch's generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def fold_cases(pp_base: str, fold: int | str, dataset_name: str,
               available: Sequence[str]) -> tuple[list[str], list[str]]:
    """(train, val) case ids of the fold, like nnU-Net's do_split (budget splits: train = the labeled cases)."""
    from nnunet_ssl.data.datasets import read_splits

    if fold == "all":
        return sorted(available), sorted(available)
    splits = read_splits(pp_base)
    if splits is None:
        # nnU-Net would write the same 5-fold split on its first training; do it now so both agree
        from nnunetv2.utilities.crossval_split import generate_crossval_split

        splits = generate_crossval_split(sorted(available), seed=12345, n_splits=5)
        with open(os.path.join(pp_base, "splits_final.json"), "w") as f:
            json.dump(splits, f, indent=2)
        print(f"wrote nnU-Net's default 5-fold {os.path.join(pp_base, 'splits_final.json')}")
    if not 0 <= int(fold) < len(splits):
        raise SSLInputError(f"fold {fold} does not exist in splits_final.json of {dataset_name} ({len(splits)} "
                            f"folds); use -f 0..{len(splits) - 1} or -f all")
    train, val = list(splits[int(fold)]["train"]), list(splits[int(fold)]["val"])
    missing = sorted(set(train + val) - set(available))
    if missing:
        raise SSLInputError(f"{len(missing)} cases of fold {fold} are not preprocessed (e.g. {missing[0]}); run "
                            f"nnUNetv2_plan_and_preprocess -d {dataset_name} for this configuration")
    if not train or not val:
        raise SSLInputError(f"fold {fold} of {dataset_name} has an empty train or val list; fix splits_final.json")
    return train, val


class TrainingSetup:
    """Everything the command derives from -d/-c/-f/-p."""

    def __init__(self, dataset: str, configuration: str, fold: int | str, plans: str) -> None:
        from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

        from nnunet_ssl.data import datasets as ds

        self.dataset_name = ds.resolve_dataset_name(dataset)
        self.pp_base = ds.preprocessed_dataset_folder(self.dataset_name)
        self.plans_identifier = plans
        self.pm = ds.load_plans(self.pp_base, plans)
        self.configuration = configuration
        self.cm = ds.load_configuration(self.pm, configuration)
        self.dataset_json = ds.load_preprocessed_dataset_json(self.pp_base)
        self.lm = self.pm.get_label_manager(self.dataset_json)
        check_supported_labels(self.lm)
        self.num_classes = int(self.lm.num_segmentation_heads)
        channels = self.dataset_json.get("channel_names", self.dataset_json.get("modality", {}))
        self.num_input_channels = len(channels)
        self.data_folder = os.path.join(self.pp_base, self.cm.data_identifier)
        if not os.path.isdir(self.data_folder):
            raise SSLInputError(f"{self.data_folder} is missing; run nnUNetv2_plan_and_preprocess -d "
                                f"{self.dataset_name} -c {configuration}" + ("" if plans == "nnUNetPlans"
                                                                             else f" -p {plans}"))
        self.dataset_class = infer_dataset_class(self.data_folder)
        available = self.dataset_class(self.data_folder).identifiers
        self.fold = fold
        self.train_cases, self.val_cases = fold_cases(self.pp_base, fold, self.dataset_name, available)

    def loader(self, cases: Sequence[str], batch_size: int, train: bool) -> Any:
        """nnU-Net's data loader over ``cases``: training augmentation and foreground oversampling 0.5 for
        training, no augmentation for the held-out report. Yields {'data', 'target' (B,1,*patch), 'keys'}."""
        from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
        from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

        patch = tuple(self.cm.patch_size)
        common = dict(is_cascaded=False, foreground_labels=self.lm.foreground_labels, regions=None,
                      ignore_label=self.lm.ignore_label)
        if train:
            rot, dummy_2d, initial, mirror = augmentation_parameters(self.cm)
            tr = nnUNetTrainer.get_training_transforms(patch, rot, None, mirror, dummy_2d,
                                                       use_mask_for_norm=self.cm.use_mask_for_norm, **common)
        else:
            initial, tr = patch, nnUNetTrainer.get_validation_transforms(None, **common)
        data = self.dataset_class(self.data_folder, list(cases))
        return nnUNetDataLoader(data, batch_size, initial, patch, self.lm, oversample_foreground_percent=0.5,
                                transforms=tr)


def class_names(setup: TrainingSetup) -> list[str]:
    """Names of the foreground classes (dataset.json labels; ``class<i>`` where none is given)."""
    by_value = {}
    for name, value in setup.dataset_json["labels"].items():
        if isinstance(value, int) and value > 0 and value != setup.lm.ignore_label:
            by_value[value] = name
    return [by_value.get(c, f"class{c}") for c in range(1, setup.num_classes)]
