"""The derived raw dataset: the labeled cases with their own labels plus the kept pseudo-labeled cases, which nnU-Net
plans, preprocesses and trains like any dataset. The source dataset is only read.

It is written into a hidden folder beside its destination and renamed at the end, so an interruption never leaves
a half-written dataset under the new name. Its ``splits_final.json`` (also put into ``nnUNet_preprocessed``, where
nnU-Net reads it) keeps every validation case of the source split and adds the pseudo-labeled cases to training
only: a student is never validated on pseudo-labels.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

from nnunet_ssl.errors import SSLInputError

PROVENANCE = "pseudolabel.json"


def ignore_label_value(dataset_json: dict) -> int:
    """The dataset's ignore label, or the next integer after its labels (nnU-Net wants the highest value)."""
    labels = dataset_json["labels"]
    if "ignore" in labels:
        return int(labels["ignore"])
    values = [v if isinstance(v, int) else max(v) for v in labels.values()]
    return max(values) + 1


def check_target(raw_root: Path, preprocessed_root: Path | None, source_name: str, target_name: str,
                 overwrite: bool, provenance: str = PROVENANCE) -> None:
    """Refuses a target that is the source, or an id another dataset already uses, or (without ``overwrite``) an
    existing derived dataset."""
    if not target_name.startswith("Dataset") or len(target_name) < 12 or target_name[10] != "_" \
            or not target_name[7:10].isdigit():
        raise SSLInputError(f"target dataset name {target_name!r} is not DatasetXXX_Name")
    if target_name[7:10] == source_name[7:10]:
        raise SSLInputError(f"the target id {target_name[7:10]} is the source dataset's; choose a new id (-t)")
    for root in (raw_root, preprocessed_root):
        if root is None or not root.is_dir():
            continue
        for entry in root.iterdir():
            if entry.name.startswith(target_name[:11]) and entry.name != target_name:
                raise SSLInputError(f"dataset id {target_name[7:10]} is taken by {entry}; choose a new id (-t)")
    target = raw_root / target_name
    if target.exists():
        if not (target / provenance).is_file():
            raise SSLInputError(f"{target} exists and was not written by nnunet-ssl; choose a new id (-t)")
        if not overwrite:
            raise SSLInputError(f"{target} exists; pass --overwrite to replace it (its preprocessed data and trained "
                                "models are not touched)")


def _place(source: str, target: Path, link: bool) -> None:
    if link:
        target.symlink_to(os.path.abspath(source))
    else:
        shutil.copy2(source, target)


def write_derived_dataset(raw_root: Path, target_name: str, dataset_json: dict,
                          labeled: Mapping[str, tuple[Sequence[str], str]],
                          pseudo: Mapping[str, tuple[Sequence[str], str]], ignore_value: int | None,
                          splits: list[dict], provenance: dict, link_images: bool = False,
                          provenance_name: str = PROVENANCE, link_folders: tuple[str, ...] = (),
                          source_folder: Path | None = None) -> Path:
    """Writes ``raw_root/target_name``: ``imagesTr`` (images of ``labeled`` and ``pseudo``, each ``case -> (image
    files, label file)``), ``labelsTr``, ``dataset.json`` (``numTraining``, the ignore label when used),
    ``splits_final.json``, the provenance file and links to ``link_folders`` of ``source_folder`` that exist.
    Returns the folder."""
    ending = dataset_json["file_ending"]
    target = raw_root / target_name
    partial = raw_root / f".{target_name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    (partial / "imagesTr").mkdir(parents=True)
    (partial / "labelsTr").mkdir()
    overlap = set(labeled) & set(pseudo)
    if overlap:
        raise SSLInputError(f"case(s) {sorted(overlap)[:3]} are both labeled and in the unlabeled pool; remove "
                            "them from imagesUnlabeled")
    for case, (images, label) in {**labeled, **pseudo}.items():
        for k, image in enumerate(images):
            _place(image, partial / "imagesTr" / f"{case}_{k:04d}{ending}", link_images)
        shutil.copy2(label, partial / "labelsTr" / f"{case}{ending}")
    derived = json.loads(json.dumps(dataset_json))
    derived["numTraining"] = len(labeled) + len(pseudo)
    derived.pop("dataset", None)  # an explicit file list would point at the source's files
    if ignore_value is not None:
        derived["labels"] = {k: v for k, v in derived["labels"].items() if k != "ignore"}
        derived["labels"]["ignore"] = ignore_value
    derived["description"] = f"{dataset_json.get('description', '')} (derived by nnunet-ssl; see {provenance_name})"
    (partial / "dataset.json").write_text(json.dumps(derived, indent=1))
    (partial / "splits_final.json").write_text(json.dumps(splits, indent=1))
    (partial / provenance_name).write_text(json.dumps(provenance, indent=1))
    for name in link_folders:
        if source_folder is not None and (source_folder / name).is_dir():
            (partial / name).symlink_to((source_folder / name).resolve(), target_is_directory=True)
    if target.exists():
        shutil.rmtree(target)
    os.replace(partial, target)
    return target


def install_splits(preprocessed_root: Path, target_name: str, splits: list[dict]) -> Path:
    """Puts the derived dataset's splits where nnU-Net's trainer reads them (``nnUNet_preprocessed/<target>/``);
    nnU-Net's planning and preprocessing leave that file alone."""
    folder = preprocessed_root / target_name
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "splits_final.json"
    path.write_text(json.dumps(splits, indent=1))
    return path


def derived_splits(source_splits: Sequence[dict], pseudo_cases: Sequence[str]) -> list[dict]:
    """Each fold of the source splits with the pseudo-labeled cases added to ``train``; keys other than train/val
    (e.g. the budget's ``unlabeled``) are dropped, since those cases are now pseudo-labeled or left out."""
    out = []
    for fold in source_splits:
        train = sorted(set(fold["train"]) | set(pseudo_cases))
        overlap = set(pseudo_cases) & set(fold["val"])
        if overlap:
            raise SSLInputError(f"validation case(s) {sorted(overlap)[:3]} are in the unlabeled pool; a case cannot "
                                "be both")
        out.append({"train": train, "val": sorted(fold["val"])})
    return out


def install_plans(model_folder: Path, preprocessed_root: Path, target_name: str, raw_folder: Path,
                  source_preprocessed: Path) -> str:
    """The source models' plans as the derived dataset's plans (what ``nnUNetv2_move_plans_between_datasets`` does:
    the same plans under the new dataset name), and its ``dataset.json`` beside them, so ``nnUNetv2_preprocess``
    prepares it with the network and preprocessing the teacher used. The source's ``dataset_fingerprint.json``
    comes along: nnU-Net's trainer copies it into every model folder, and the plans (its intensity statistics
    included) were made from it. Returns the plans identifier."""
    plans = json.loads((model_folder / "plans.json").read_text())
    plans["dataset_name"] = target_name
    folder = preprocessed_root / target_name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{plans['plans_name']}.json").write_text(json.dumps(plans, indent=1))
    shutil.copy2(raw_folder / "dataset.json", folder / "dataset.json")
    fingerprint = source_preprocessed / "dataset_fingerprint.json"
    if fingerprint.is_file():
        shutil.copy2(fingerprint, folder / "dataset_fingerprint.json")
    else:
        fingerprint = model_folder / "dataset_fingerprint.json"  # nnU-Net keeps a copy in every model folder
        if fingerprint.is_file():
            shutil.copy2(fingerprint, folder / "dataset_fingerprint.json")
    return plans["plans_name"]
