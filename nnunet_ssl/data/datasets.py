"""Shared look-ups of nnU-Net datasets, plans and splits, with one-line errors for bad input.

nnU-Net answers most of these mistakes with an assertion or a multi-line RuntimeError; our command lines turn
them into an ``SSLInputError`` that names the problem and the fix.
"""

from __future__ import annotations

import json
import os
from copy import deepcopy
from typing import TYPE_CHECKING, Any

from nnunet_ssl.errors import SSLInputError

if TYPE_CHECKING:  # nnU-Net imports torch; keep `import nnunet_ssl.data.datasets` light
    from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager

#: files in nnUNet_preprocessed/<Dataset>/ that are JSON but not plans
_NON_PLANS_JSON = {"dataset.json", "dataset_fingerprint.json", "splits_final.json"}
SPLITS_FILE = "splits_final.json"


def require_env(variable: str) -> str:
    """Returns the folder in environment variable ``variable`` (nnUNet_raw, nnUNet_preprocessed, ...)."""
    value = os.environ.get(variable)
    if not value:
        raise SSLInputError(
            f"environment variable {variable} is not set; export {variable}=/path/to/folder as for nnU-Net "
            "(see nnU-Net's documentation/setting_up_paths.md)"
        )
    if not os.path.isdir(value):
        raise SSLInputError(f"{variable}={value} is not a folder; point {variable} at an existing folder")
    return value


def available_datasets() -> list[str]:
    """Dataset folder names found in nnUNet_raw and nnUNet_preprocessed (those that are set)."""
    names: set[str] = set()
    for variable in ("nnUNet_raw", "nnUNet_preprocessed"):
        base = os.environ.get(variable)
        if base and os.path.isdir(base):
            names.update(
                n for n in os.listdir(base) if n.startswith("Dataset") and os.path.isdir(os.path.join(base, n))
            )
    return sorted(names)


def _dataset_exists(name: str) -> bool:
    for variable in ("nnUNet_raw", "nnUNet_preprocessed"):
        base = os.environ.get(variable)
        if base and os.path.isdir(os.path.join(base, name)):
            return True
    return False


def resolve_dataset_name(dataset: str | int) -> str:
    """``4``, ``'4'``, ``'004'`` or ``'Dataset004_Hippocampus'`` -> ``'Dataset004_Hippocampus'``.

    Uses nnU-Net's own conversion, but also requires the dataset to exist in nnUNet_raw or nnUNet_preprocessed
    (nnU-Net accepts any string starting with 'Dataset', and ids found only in nnUNet_results)."""
    if not os.environ.get("nnUNet_raw") and not os.environ.get("nnUNet_preprocessed"):
        require_env("nnUNet_preprocessed")
    from nnunetv2.utilities.dataset_name_id_conversion import find_candidate_datasets, maybe_convert_to_dataset_name

    text = str(dataset).strip()
    available = ", ".join(available_datasets()) or "none"
    try:
        name = str(maybe_convert_to_dataset_name(text))
    except (RuntimeError, ValueError, AssertionError):
        if text.isdigit():
            candidates = [str(c) for c in find_candidate_datasets(int(text))]
            if len(candidates) > 1:
                raise SSLInputError(
                    f"dataset id {text} is ambiguous: {', '.join(candidates)}; give the full name with -d or rename "
                    "one of them"
                ) from None
        raise SSLInputError(
            f"unknown dataset {text!r}; available in nnUNet_raw/nnUNet_preprocessed: {available}"
        ) from None
    if not _dataset_exists(name):
        raise SSLInputError(f"unknown dataset {text!r}; available in nnUNet_raw/nnUNet_preprocessed: {available}")
    return name


def raw_dataset_folder(dataset_name: str) -> str:
    folder = os.path.join(require_env("nnUNet_raw"), dataset_name)
    if not os.path.isdir(folder):
        raise SSLInputError(f"dataset {dataset_name} has no folder in nnUNet_raw ({folder}); put the raw dataset there")
    return folder


def preprocessed_dataset_folder(dataset_name: str) -> str:
    """nnUNet_preprocessed/<Dataset>; it exists only once the dataset was planned."""
    folder = os.path.join(require_env("nnUNet_preprocessed"), dataset_name)
    if not os.path.isdir(folder):
        raise SSLInputError(
            f"dataset {dataset_name} has not been planned ({folder} is missing); run "
            f"nnUNetv2_plan_and_preprocess -d {_dataset_id(dataset_name)} first"
        )
    return folder


def _dataset_id(dataset_name: str) -> str:
    digits = dataset_name[7:10]
    return str(int(digits)) if digits.isdigit() else dataset_name


def load_json_file(path: str) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise SSLInputError(f"{path} is not valid JSON ({e.msg}, line {e.lineno}); fix or remove the file") from None


def load_preprocessed_dataset_json(preprocessed_base: str) -> dict:
    """The copy of dataset.json that the planner put in nnUNet_preprocessed/<Dataset>/ (what the trainer reads)."""
    path = os.path.join(preprocessed_base, "dataset.json")
    if not os.path.isfile(path):
        name = os.path.basename(os.path.normpath(preprocessed_base))
        raise SSLInputError(
            f"{path} is missing, so dataset {name} has not been planned; run "
            f"nnUNetv2_plan_and_preprocess -d {_dataset_id(name)} first"
        )
    return load_json_file(path)


def available_plans(preprocessed_base: str) -> list[str]:
    """Plans identifiers (file names without .json) in nnUNet_preprocessed/<Dataset>/."""
    if not os.path.isdir(preprocessed_base):
        return []
    return sorted(
        f[:-5]
        for f in os.listdir(preprocessed_base)
        if f.endswith(".json") and f not in _NON_PLANS_JSON and not f.startswith("splits_final")
    )


def load_plans(preprocessed_base: str, plans_identifier: str = "nnUNetPlans") -> PlansManager:
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    path = os.path.join(preprocessed_base, plans_identifier + ".json")
    if not os.path.isfile(path):
        present = ", ".join(available_plans(preprocessed_base)) or "none"
        name = os.path.basename(os.path.normpath(preprocessed_base))
        raise SSLInputError(
            f"unknown plans {plans_identifier!r} for {name}: {path} does not exist (plans present: {present}); "
            f"pass one of them with -p or run nnUNetv2_plan_and_preprocess -d {_dataset_id(name)}"
        )
    plans = load_json_file(path)
    if not isinstance(plans, dict) or "configurations" not in plans:
        raise SSLInputError(f"{path} is not an nnU-Net plans file (no 'configurations'); pass another -p")
    return PlansManager(plans)


def load_configuration(plans_manager: PlansManager, configuration: str) -> ConfigurationManager:
    """The resolved configuration; cascaded stages (with a previous_stage) are refused."""
    names = plans_manager.available_configurations
    if configuration not in names:
        raise SSLInputError(
            f"unknown configuration {configuration!r} in plans {plans_manager.plans.get('plans_name', '?')}; "
            f"available configurations: {', '.join(names)}"
        )
    cm = plans_manager.get_configuration(configuration)
    if cm.previous_stage_name is not None:
        raise SSLInputError(
            f"configuration {configuration!r} is a cascade stage (previous_stage={cm.previous_stage_name!r}); "
            "semi-supervised training does not support the cascade, use 2d, 3d_fullres or 3d_lowres"
        )
    return cm


def labeled_case_ids(raw_folder: str, dataset_json: dict) -> list[str]:
    """Case ids nnU-Net trains on (imagesTr, or the 'dataset' key of dataset.json), sorted."""
    from nnunetv2.utilities.utils import (
        get_filenames_of_train_images_and_targets,
        get_identifiers_from_splitted_dataset_folder,
    )

    if "dataset" in dataset_json:
        # nnU-Net rewrites the paths inside dataset_json['dataset'] in place; hand it a copy
        return sorted(get_filenames_of_train_images_and_targets(raw_folder, deepcopy(dataset_json)).keys())
    images_tr = os.path.join(raw_folder, "imagesTr")
    if not os.path.isdir(images_tr):
        return []
    # same identifiers get_filenames_of_train_images_and_targets derives, without the 12-process Pool it starts
    # to list the image files (which we do not need here)
    return sorted(str(i) for i in get_identifiers_from_splitted_dataset_folder(images_tr, dataset_json["file_ending"]))


def test_case_ids(raw_folder: str, file_ending: str) -> list[str]:
    """Case ids in imagesTs (empty if the folder does not exist)."""
    from nnunetv2.utilities.utils import get_identifiers_from_splitted_dataset_folder

    images_ts = os.path.join(raw_folder, "imagesTs")
    if not os.path.isdir(images_ts):
        return []
    return sorted(str(i) for i in get_identifiers_from_splitted_dataset_folder(images_ts, file_ending))


test_case_ids.__test__ = False  # type: ignore[attr-defined]  # not a pytest test despite its name


def read_splits(preprocessed_base: str) -> list[dict] | None:
    """nnUNet_preprocessed/<Dataset>/splits_final.json, or None if there is none yet."""
    path = os.path.join(preprocessed_base, SPLITS_FILE)
    if not os.path.isfile(path):
        return None
    splits = load_json_file(path)
    if not isinstance(splits, list) or not all(
        isinstance(s, dict) and isinstance(s.get("train"), list) and isinstance(s.get("val"), list) for s in splits
    ):
        raise SSLInputError(
            f"{path} is not a list of {{'train': [...], 'val': [...]}} folds; fix it, or delete it so that nnU-Net "
            "recreates it"
        )
    return splits
