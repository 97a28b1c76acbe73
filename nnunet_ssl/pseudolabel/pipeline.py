"""One round of offline pseudo-labelling: predict the pool (sharded, resumable), score, select, write the derived
dataset (``nnUNetv2_ssl_pseudolabel``, whose command line is :mod:`nnunet_ssl.cli.pseudolabel`).

The pool is ``imagesUnlabeled`` of the source raw dataset and/or, with ``split_fold``, the budget-unlabeled cases
(``unlabeled``) of that fold of ``splits_final.json`` (``nnUNetv2_ssl_make_splits``). The labeled cases are, with
``split_fold``, that fold's ``train`` and ``val`` (validation keeps its real labels and stays validation);
otherwise every case of ``imagesTr``, with the source's splits (or nnU-Net's default 5-fold split of them) and the
pseudo-labeled cases added to each fold's training set.
"""

from __future__ import annotations

import csv
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from nnunet_ssl.data import datasets
from nnunet_ssl.data.layout import SPLITS_UNLABELED_KEY
from nnunet_ssl.errors import SSLInputError
from nnunet_ssl.pseudolabel import derived
from nnunet_ssl.pseudolabel.predict import (
    SCORES,
    PoolPredictor,
    VoxelRule,
    case_done,
    resolve_sources,
    shard,
)
from nnunet_ssl.pseudolabel.selection import SelectionRule, ranking_score, select_cases

SETTINGS = "settings.json"
SCORES_CSV = "scores.csv"
SCORE_COLUMNS = ("agreement", "stability", "confidence", "uncertainty", "quality", "foreground_voxels",
                 "ignored_fraction", "ignored_fraction_of_foreground")


@dataclass
class PseudoLabelSettings:
    dataset: str
    model_folders: list[str]
    work: str
    target_id: int
    target_name: str | None = None
    folds: list[str] | None = None
    checkpoints: list[str] = field(default_factory=lambda: ["checkpoint_final.pth"])
    split_fold: int | None = None
    unlabeled_folder: str | None = None
    use_images_unlabeled: bool = True
    selection: SelectionRule = field(default_factory=SelectionRule)
    voxels: VoxelRule = field(default_factory=VoxelRule)
    quality_predictor: str | None = None
    keep_probabilities: bool = True
    link_images: bool = False
    overwrite: bool = False
    step_size: float = 0.5
    use_mirroring: bool = True
    num_processes: int = 2


@dataclass
class Pool:
    labeled: dict[str, tuple[list[str], str]]
    pool: dict[str, list[str]]
    splits: list[dict]


def _case_files(raw: Path, case: str, ending: str, n_channels: int) -> list[str]:
    files = [str(raw / "imagesTr" / f"{case}_{k:04d}{ending}") for k in range(n_channels)]
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise SSLInputError(f"image {missing[0]} of case {case} is missing from the source dataset")
    return files


def gather_pool(raw: Path, preprocessed: Path | None, dataset_json: dict, split_fold: int | None,
                unlabeled_folder: str | None, use_images_unlabeled: bool) -> Pool:
    """The labeled cases (images, label), the pool (images) and the source splits the derived ones start from."""
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    from nnunet_ssl.data.preprocess_unlabeled import num_channels, scan_unlabeled_folder
    from nnunet_ssl.data.splits import written_by_us

    ending = dataset_json["file_ending"]
    n_channels = num_channels(dataset_json)
    splits = datasets.read_splits(str(preprocessed)) if preprocessed is not None else None
    pool: dict[str, list[str]] = {}
    if split_fold is not None:
        if not splits:
            raise SSLInputError("--split-fold needs a splits_final.json in nnUNet_preprocessed; make one with "
                                "nnUNetv2_ssl_make_splits")
        if not 0 <= split_fold < len(splits):
            raise SSLInputError(f"--split-fold {split_fold} does not exist; the splits have folds 0-{len(splits) - 1}")
        fold = splits[split_fold]
        labeled_ids = sorted(set(fold["train"]) | set(fold["val"]))
        pool.update({c: _case_files(raw, c, ending, n_channels) for c in fold.get(SPLITS_UNLABELED_KEY, [])})
        source_splits = [{"train": sorted(fold["train"]), "val": sorted(fold["val"])}]
    else:
        if splits and (written_by_us(splits) or any(SPLITS_UNLABELED_KEY in f for f in splits)):
            raise SSLInputError("splits_final.json holds a label budget (nnUNetv2_ssl_make_splits); pass --split-fold "
                                "so the budget's unlabeled cases are not used with their labels")
        labeled_ids = datasets.labeled_case_ids(str(raw), dataset_json)
        source_splits = splits or generate_crossval_split(labeled_ids, seed=12345, n_splits=5)
    folder = Path(unlabeled_folder) if unlabeled_folder else raw / "imagesUnlabeled"
    if unlabeled_folder and not folder.is_dir():
        raise SSLInputError(f"unlabeled folder {folder} does not exist")
    if use_images_unlabeled and folder.is_dir():
        found = scan_unlabeled_folder(str(folder), ending, n_channels)
        clash = sorted(set(found) & (set(labeled_ids) | set(pool)))
        if clash:
            raise SSLInputError(f"unlabeled case(s) {clash[:3]} have the id of a labeled case; rename them in {folder}")
        pool.update(found)
    if not pool:
        raise SSLInputError(f"the unlabeled pool is empty: put images into {folder} or pass --split-fold with a "
                            "label-budget split")
    labeled = {c: (_case_files(raw, c, ending, n_channels), str(raw / "labelsTr" / f"{c}{ending}"))
               for c in labeled_ids}
    return Pool(labeled, pool, source_splits)


def target_dataset_name(target_id: int, target_name: str | None, source_name: str) -> str:
    if not 1 <= target_id <= 999:
        raise SSLInputError(f"-t must be a dataset id in 1..999, got {target_id}")
    return f"Dataset{target_id:03d}_{target_name or source_name[11:] + 'PseudoLabeled'}"


def _check_settings(work: Path, record: dict, overwrite: bool) -> None:
    path = work / SETTINGS
    if path.is_file():
        old = json.loads(path.read_text())
        changed = [k for k in record if old.get(k) != record[k]]
        if changed and not overwrite:
            raise SSLInputError(f"work folder {work} was made with other {', '.join(changed)}; use another -o, or "
                                "--overwrite to predict again")
        if changed:
            for f in (work / SCORES).glob("*.json"):
                f.unlink()
    work.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1))


def predict_pool(s: PseudoLabelSettings, device: torch.device, part_id: int = 0, num_parts: int = 1) -> dict:
    """Predicts and scores the pool's cases of one part that are not done yet; returns what was found."""
    name = datasets.resolve_dataset_name(s.dataset)
    raw = Path(datasets.raw_dataset_folder(name))
    pp = Path(datasets.preprocessed_dataset_folder(name))
    dataset_json = json.loads((raw / "dataset.json").read_text())
    s.selection.check()
    s.voxels.check()
    pool = gather_pool(raw, pp if pp.is_dir() else None, dataset_json, s.split_fold, s.unlabeled_folder,
                       s.use_images_unlabeled)
    sources = resolve_sources(s.model_folders, s.folds, s.checkpoints)
    work = Path(s.work)
    ignore = derived.ignore_label_value(dataset_json) if s.voxels.active or "ignore" in dataset_json["labels"] \
        else None
    _check_settings(work, {"sources": [asdict(x) for x in sources], "voxels": asdict(s.voxels),
                           "ignore_label": ignore, "quality_predictor": s.quality_predictor,
                           "step_size": s.step_size, "use_mirroring": s.use_mirroring}, s.overwrite)
    cases = shard(list(pool.pool), part_id, num_parts)
    todo = [c for c in cases if not case_done(work, c)]
    print(f"pseudo-labelling {name}: {len(pool.pool)} unlabeled cases ({len(cases)} in part {part_id} of "
          f"{num_parts}, {len(todo)} to predict), {len(pool.labeled)} labeled; {len(sources)} source model(s): "
          + ", ".join(x.tag for x in sources), flush=True)
    if todo:
        predictor = PoolPredictor(sources, device, s.step_size, s.use_mirroring, s.quality_predictor)
        (work / "cases").mkdir(parents=True, exist_ok=True)
        iterator = predictor.iterator([pool.pool[c] for c in todo], [str(work / "cases" / c) for c in todo],
                                      s.num_processes)
        started = time.monotonic()
        for item in tqdm(iterator, total=len(todo), desc="predicting the pool", unit="case"):
            predictor.process(item, work, ignore, s.voxels, s.keep_probabilities)
        print(f"predicted {len(todo)} cases in {time.monotonic() - started:.0f} s", flush=True)
    return {"dataset": name, "raw": raw, "preprocessed": pp, "dataset_json": dataset_json, "pool": pool,
            "sources": sources, "ignore": ignore}


def _write_scores_csv(path: Path, scores: dict[str, dict], decisions: dict[str, str]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["case", *SCORE_COLUMNS, "decision"])
        for case in sorted(scores):
            row = [scores[case].get(k) for k in SCORE_COLUMNS]
            writer.writerow([case, *[f"{x:.6g}" if isinstance(x, float) else x for x in row], decisions[case]])


def pseudolabel(s: PseudoLabelSettings, device: torch.device, part_id: int = 0, num_parts: int = 1) -> Path | None:
    """Predicts the missing cases of the given part. Unsharded (``num_parts`` 1, the merge of a sharded run), then
    selects and writes the derived dataset and returns its raw folder; a part returns None."""
    found = predict_pool(s, device, part_id, num_parts)
    name, pool, work = found["dataset"], found["pool"], Path(s.work)
    missing = [c for c in pool.pool if not case_done(work, c)]
    if num_parts > 1:
        # only the merge writes the dataset, so parts finishing at the same time never race for it
        print(f"part {part_id} of {num_parts} done; {len(missing)} case(s) of other parts still to predict. When "
              "every part is done, run this command without --part-id/--num-parts to write the dataset", flush=True)
        return None
    if missing:
        raise SSLInputError(f"{len(missing)} case(s) are not predicted (e.g. {missing[0]})")
    target = target_dataset_name(s.target_id, s.target_name, name)
    raw_root = found["raw"].parent
    pp_root = found["preprocessed"].parent
    derived.check_target(raw_root, pp_root, name, target, s.overwrite)
    scores = {c: json.loads((work / SCORES / f"{c}.json").read_text()) for c in sorted(pool.pool)}
    decisions = select_cases(scores, s.selection)
    kept = sorted(c for c, d in decisions.items() if d == "kept")
    _write_scores_csv(work / SCORES_CSV, scores, decisions)
    ending = found["dataset_json"]["file_ending"]
    pseudo = {c: (pool.pool[c], str(work / "pseudo_labels" / f"{c}{ending}")) for c in kept}
    splits = derived.derived_splits(pool.splits, kept)
    provenance = {
        "source_dataset": name, "work_folder": str(work.resolve()), "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "sources": [asdict(x) for x in found["sources"]],
        "selection": asdict(s.selection), "ranked_by": ranking_score(scores, s.selection),
        "voxels": asdict(s.voxels), "ignore_label": found["ignore"], "split_fold": s.split_fold,
        "labeled_cases": sorted(pool.labeled), "pseudo_labeled_cases": kept,
        "cases": {c: {**scores[c], "decision": decisions[c]} for c in scores}}
    folder = derived.write_derived_dataset(raw_root, target, found["dataset_json"], pool.labeled, pseudo,
                                           found["ignore"], splits, provenance, s.link_images)
    derived.install_splits(pp_root, target, splits)
    plans_name = derived.install_plans(Path(s.model_folders[0]), pp_root, target, folder, found["preprocessed"])
    ignored = [scores[c]["ignored_fraction"] for c in kept]
    print(f"kept {len(kept)} of {len(scores)} pseudo-labeled cases"
          + (f" (mean share of ignored voxels {np.mean(ignored):.3f})" if s.voxels.active and kept else "")
          + f"; scores: {work / SCORES_CSV}", flush=True)
    if not kept:
        print("WARNING: no case passed the selection; the derived dataset holds the labeled cases only", flush=True)
    configuration = configuration_of(s.model_folders[0]) or "CONFIGURATION"
    print(f"wrote {folder} ({len(pool.labeled)} labeled + {len(kept)} pseudo-labeled cases); next:\n"
          f"  nnUNetv2_preprocess -d {s.target_id} -plans_name {plans_name} -c {configuration}\n"
          f"  nnUNetv2_train {s.target_id} {configuration} FOLD -p {plans_name}"
          + (" (fold 0: the source split's fold)" if s.split_fold is not None else ""), flush=True)
    return folder


def configuration_of(model_folder: str) -> str | None:
    """The configuration of a model folder named ``<trainer>__<plans>__<configuration>`` (None if it is not)."""
    folder = Path(model_folder)
    parts = folder.name.split("__")
    plans = json.loads((folder / "plans.json").read_text())
    return parts[-1] if len(parts) == 3 and parts[-1] in plans["configurations"] else None

