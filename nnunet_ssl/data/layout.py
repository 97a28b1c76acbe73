"""Where nnunet-ssl keeps unlabeled data, next to nnU-Net's own folders."""

from __future__ import annotations

import os

#: raw images without labels, same channel suffixes and file ending as imagesTr
RAW_UNLABELED_SUBFOLDER = "imagesUnlabeled"
#: preprocessed unlabeled cases live in a sibling of the configuration's folder, because nnU-Net's
#: preprocessing deletes ``<data_identifier>/`` when it re-runs and fold 'all' would pick extra cases up
UNLABELED_FOLDER_SUFFIX = "_unlabeled"
#: key of each fold entry in splits_final.json listing training cases whose labels must not be used
SPLITS_UNLABELED_KEY = "unlabeled"


def unlabeled_preprocessed_folder(preprocessed_dataset_folder_base: str, data_identifier: str) -> str:
    return os.path.join(preprocessed_dataset_folder_base, data_identifier + UNLABELED_FOLDER_SUFFIX)
