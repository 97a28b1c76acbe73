"""Where a trainer's unlabeled data comes from, the rules that keep it apart from labeled and test cases, and
its loader of aligned views."""

from __future__ import annotations

import os

import numpy as np
from batchgenerators.utilities.file_and_folder_operations import isdir, isfile, join, load_json
from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA
from torch import distributed as dist

from nnunet_ssl.data.layout import RAW_UNLABELED_SUBFOLDER, SPLITS_UNLABELED_KEY, unlabeled_preprocessed_folder
from nnunet_ssl.data.preprocess_unlabeled import recorded_cases
from nnunet_ssl.data.unlabeled_loader import (
    UnlabeledMultiViewLoader,
    UnlabeledPool,
    make_augmenter,
    split_transforms,
)
from nnunet_ssl.errors import SSLInputError
from nnunet_ssl.trainers.environment import env_int

#: 0 keeps partially labeled training cases out of the unlabeled pool (default 1: they join it)
ENV_PARTIAL = "nnUNet_ssl_partially_labeled"


def partially_labeled_cases(folder: str, identifiers: list[str], ignore_label: int) -> list[str]:
    """The cases of a preprocessed folder whose segmentation holds ``ignore_label`` (sparse or voxel-selected
    annotations), read with nnU-Net's own dataset class."""
    dataset = nnUNetDatasetBlosc2(folder, identifiers)
    return [i for i in identifiers if bool(np.any(np.asarray(dataset.load_case(i)[1][:]) == ignore_label))]


class UnlabeledData:
    """Mixin of the SSL trainer: the unlabeled pool of this fold and its multi-view loader.

    Reads the trainer's ``unlabeled_batch_size`` (global, split over DDP ranks like nnU-Net's batch; None = the
    labeled batch size) and ``view_intensity``; sets ``unlabeled_batch_size_per_rank``.

    Partially labeled cases: when ``dataset.json`` has an ``ignore`` label, the fold's training cases whose labels
    hold it (a few annotated slices, or pseudo-labels with ignored voxels) also join the unlabeled pool, so the
    unsupervised loss reaches their ignored voxels while nnU-Net's supervised loss keeps training on their annotated
    ones (and gives the ignored ones no gradient). In the pool they are images only: the unsupervised loss covers
    every voxel of their patches, annotated ones included, which lets every host (the teacher's view, FixMatch's
    strong view and CutMix, the second network) and every plug-in use them unchanged; on annotated voxels it only
    asks the network to agree with a reference that the supervised loss already pulls to the label. Validation cases
    never join. ``nnUNet_ssl_partially_labeled=0`` keeps them out."""

    def unlabeled_sources(self) -> list[tuple[str, list[str]]]:
        """(folder, case ids) of the unlabeled pool: preprocessed imagesUnlabeled, the 'unlabeled' list of this
        fold in splits_final.json and, with an ignore label, the fold's partially labeled training cases. Refuses
        an empty pool and ids that collide with training or validation cases."""
        tr_keys, val_keys = self.do_split()
        labeled = set(tr_keys) | set(val_keys)
        sources = []
        real_folder = unlabeled_preprocessed_folder(self.preprocessed_dataset_folder_base,
                                                    self.configuration_manager.data_identifier)
        if isdir(real_folder):
            real_ids = sorted(nnUNetDatasetBlosc2.get_identifiers(real_folder))
            recorded = recorded_cases(real_folder)
            if recorded is not None and set(real_ids) - recorded:
                # a case whose (re)processing failed or never finished: its files may be stale
                stale = sorted(set(real_ids) - recorded)
                self.print_to_log_file(f"unlabeled cases {stale[:5]} ({len(stale)} in all) are in {real_folder} "
                                       "but not in its manifest; left out (rerun nnUNetv2_ssl_preprocess_unlabeled)",
                                       also_print_to_console=True)
                real_ids = [i for i in real_ids if i in recorded]
            clash = sorted(set(real_ids) & labeled)
            if clash:
                raise SSLInputError(
                    f"unlabeled case ids {clash[:5]} are also training/validation cases of fold {self.fold}; rename "
                    f"those images in {RAW_UNLABELED_SUBFOLDER} and rerun nnUNetv2_ssl_preprocess_unlabeled"
                )
            test_ids = self._raw_test_ids()
            clash = sorted(set(real_ids) & test_ids)
            if clash:
                raise SSLInputError(
                    f"unlabeled case ids {clash[:5]} are also test cases in imagesTs; remove them from "
                    f"{RAW_UNLABELED_SUBFOLDER} (never train on test images) and rerun "
                    "nnUNetv2_ssl_preprocess_unlabeled"
                )
            if real_ids:
                sources.append((real_folder, real_ids))
        splits_file = join(self.preprocessed_dataset_folder_base, "splits_final.json")
        if self.fold != "all" and isfile(splits_file):
            splits = load_json(splits_file)
            if self.fold < len(splits):
                budget_ids = sorted(splits[self.fold].get(SPLITS_UNLABELED_KEY, []))
                clash = sorted(set(budget_ids) & labeled)
                if clash:
                    raise SSLInputError(
                        f"splits_final.json lists {clash[:5]} as both unlabeled and labeled in fold {self.fold}; "
                        "rewrite the splits with nnUNetv2_ssl_make_splits"
                    )
                missing = [i for i in budget_ids if not isfile(join(self.preprocessed_dataset_folder, i + ".b2nd"))]
                if missing:
                    raise SSLInputError(
                        f"unlabeled cases {missing[:5]} of splits_final.json are not in "
                        f"{self.preprocessed_dataset_folder}; rerun nnUNetv2_preprocess for this configuration"
                    )
                if budget_ids:
                    sources.append((self.preprocessed_dataset_folder, budget_ids))
        self.partially_labeled_ids = self._partially_labeled_training_cases(tr_keys)
        if self.partially_labeled_ids:
            sources.append((self.preprocessed_dataset_folder, self.partially_labeled_ids))
        if not sources:
            name = self.plans_manager.dataset_name
            raise SSLInputError(
                f"no unlabeled data for {name} ({self.configuration_name}, fold {self.fold}): put images in "
                f"nnUNet_raw/{name}/{RAW_UNLABELED_SUBFOLDER} and run nnUNetv2_ssl_preprocess_unlabeled -d {name} "
                f"-c {self.configuration_name}, or simulate a label budget with nnUNetv2_ssl_make_splits -d {name} "
                "--num-labeled N"
            )
        return sources

    def _partially_labeled_training_cases(self, tr_keys) -> list[str]:
        ignore = self.label_manager.ignore_label
        if ignore is None or env_int(ENV_PARTIAL, 0) == 0:
            return []
        return partially_labeled_cases(self.preprocessed_dataset_folder, sorted(tr_keys), ignore)

    def _raw_test_ids(self) -> set[str]:
        raw = os.environ.get("nnUNet_raw")
        if not raw:
            return set()
        folder = join(raw, self.plans_manager.dataset_name, "imagesTs")
        if not isdir(folder):
            return set()
        ending = self.dataset_json["file_ending"]
        return {f[: -len(ending) - 5] for f in os.listdir(folder) if f.endswith(ending)}

    def _unlabeled_batch_size_for_this_rank(self) -> int:
        if self.unlabeled_batch_size is None:
            return self.batch_size
        if not self.is_ddp:
            return int(self.unlabeled_batch_size)
        world, rank = dist.get_world_size(), dist.get_rank()
        per_rank = [self.unlabeled_batch_size // world + (1 if r < self.unlabeled_batch_size % world else 0)
                    for r in range(world)]
        if min(per_rank) < 1:
            raise SSLInputError(f"unlabeled_batch_size={self.unlabeled_batch_size} is smaller than the number of "
                                f"GPUs ({world}); raise it to at least {world}")
        return per_rank[rank]

    def get_unlabeled_dataloader(self):
        pool = UnlabeledPool(self.unlabeled_sources())
        rotation, dummy_2d, initial_patch_size, mirror_axes = \
            self.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        pipeline = self.get_training_transforms(
            self.configuration_manager.patch_size, rotation, None, mirror_axes, dummy_2d,
            use_mask_for_norm=self.configuration_manager.use_mask_for_norm, is_cascaded=False,
            foreground_labels=self.label_manager.foreground_labels,
            regions=self.label_manager.foreground_regions if self.label_manager.has_regions else None,
            ignore_label=self.label_manager.ignore_label)
        geometric, intensity = split_transforms(pipeline)
        self.unlabeled_batch_size_per_rank = self._unlabeled_batch_size_for_this_rank()
        loader = UnlabeledMultiViewLoader(pool, self.unlabeled_batch_size_per_rank, initial_patch_size,
                                          self.configuration_manager.patch_size, self.label_manager, geometric,
                                          intensity, self.view_intensity)
        partial = len(self.partially_labeled_ids)
        among = f" ({partial} of them partially labeled training cases)" if partial else ""
        self.print_to_log_file(f"unlabeled pool: {len(pool)} cases{among}, {self.unlabeled_batch_size_per_rank} per "
                               "step and rank", also_print_to_console=True)
        n_proc = get_allowed_n_proc_DA()
        return make_augmenter(loader, max(1, n_proc // 2) if n_proc > 0 else 0, self.device.type == "cuda")

    def get_dataloaders(self):
        # unlabeled first: a missing pool fails before nnU-Net starts its background workers
        self.dataloader_unlabeled = self.get_unlabeled_dataloader()
        return super().get_dataloaders()
