"""Predicting the unlabeled pool with every source model and scoring each case (one shard of the pool at a time).

A source is one (model folder, fold, checkpoint). Each case is preprocessed once, with nnU-Net's own iterator, and
predicted by each source with nnU-Net's ``nnUNetPredictor`` (sliding window, Gaussian weighting, mirroring); each
source's logits go back to the image's voxel grid with nnU-Net's
``convert_predicted_logits_to_segmentation_with_correct_shape``. The pseudo-label is the argmax of the sources' mean
probability (as ``nnUNetv2_ensemble`` averages probabilities). Per case the work folder gets

* ``pseudo_labels/<case><ending>``: the pseudo-label, uncertain voxels set to the ignore label;
* ``probabilities/<case>.npz``: the ensemble's probabilities (``probabilities``, as nnU-Net's ``.npz``), unless
  turned off;
* ``scores/<case>.json``: every score (:mod:`.scores`), the share of ignored voxels, the sources. Written last,
  it marks the case as done, so an interrupted or sharded prediction resumes where it stopped.

Memory holds one case (its sources' maps and probabilities) at a time, whatever the pool's size.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from nnunet_ssl.errors import SSLInputError
from nnunet_ssl.evaluation.benchmark_layout import write_json
from nnunet_ssl.pseudolabel import scores as S

SCORES = "scores"
LABELS = "pseudo_labels"
PROBABILITIES = "probabilities"


@dataclass(frozen=True)
class Source:
    model_folder: str
    fold: int | str
    checkpoint: str

    @property
    def model(self) -> str:
        return f"{self.model_folder}#fold_{self.fold}"

    @property
    def tag(self) -> str:
        return f"{Path(self.model_folder).name}/fold_{self.fold}/{self.checkpoint}"


@dataclass
class VoxelRule:
    #: voxels whose ensemble max-probability is below this get the ignore label (0: none)
    min_probability: float = 0.0
    #: voxels where the sources' label maps differ get the ignore label
    ignore_disagreement: bool = False

    @property
    def active(self) -> bool:
        return self.min_probability > 0 or self.ignore_disagreement

    def check(self) -> None:
        if not 0 <= self.min_probability <= 1:
            raise SSLInputError(f"--ignore-below must be a probability in [0, 1], got {self.min_probability}")


def resolve_sources(model_folders: Sequence[str], folds: Sequence[str] | None,
                    checkpoints: Sequence[str]) -> list[Source]:
    """Every (model folder, fold, checkpoint); folds default to those of each folder that have the first
    checkpoint. One clear error for a missing folder or file."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    sources = []
    for folder in model_folders:
        if not os.path.isfile(os.path.join(folder, "plans.json")):
            raise SSLInputError(f"{folder} is not a trained nnU-Net model folder (no plans.json); pass "
                                "nnUNet_results/<dataset>/<trainer>__<plans>__<configuration>")
        chosen = list(folds) if folds else nnUNetPredictor.auto_detect_available_folds(folder, checkpoints[0])
        if not chosen:
            raise SSLInputError(f"no fold of {folder} has {checkpoints[0]}; train it first or pass -f and -chk")
        for fold in chosen:
            fold = fold if fold == "all" else int(fold)
            for checkpoint in checkpoints:
                path = os.path.join(folder, f"fold_{fold}", checkpoint)
                if not os.path.isfile(path):
                    raise SSLInputError(f"checkpoint {path} not found; pick existing folds (-f) and checkpoints (-chk)")
                sources.append(Source(folder, fold, checkpoint))
    plans = {json.dumps(json.loads(Path(s.model_folder, "plans.json").read_text()), sort_keys=True)
             for s in sources}
    if len(plans) > 1:
        raise SSLInputError("the model folders have different plans; pseudo-label with models of one plans file "
                            "(ensemble differently planned models with nnUNetv2_ensemble instead)")
    return sources


def case_done(work: Path, case: str) -> bool:
    return (work / SCORES / f"{case}.json").is_file()


def shard(cases: Sequence[str], part_id: int, num_parts: int) -> list[str]:
    """The cases of part ``part_id`` of ``num_parts`` (nnUNetv2_predict's ``[part_id::num_parts]`` of the sorted
    cases)."""
    if num_parts < 1 or not 0 <= part_id < num_parts:
        raise SSLInputError(f"--part-id must be in 0..{num_parts - 1} for --num-parts {num_parts}, got {part_id}")
    return sorted(cases)[part_id::num_parts]


class PoolPredictor:
    """The source models, loaded once, and the per-case prediction, scoring and writing."""

    def __init__(self, sources: Sequence[Source], device: torch.device, step_size: float = 0.5,
                 use_mirroring: bool = True, quality_predictor: str | None = None) -> None:
        from nnunet_ssl.uncertainty.predict_uncertainty import (
            ensure_ext_trainers_visible,
            is_evidential,
            make_predictor,
        )

        ensure_ext_trainers_visible()
        self.sources = list(sources)
        self.predictors = [make_predictor(s.model_folder, (s.fold,), s.checkpoint, device, step_size, use_mirroring)
                           for s in self.sources]
        #: all sources give Dirichlet evidence: the uncertainty score is their mean K / S, not the softmax entropy
        self.evidential = all(is_evidential(p.trainer_name) for p in self.predictors)
        first = self.predictors[0]
        self.plans_manager, self.configuration_manager = first.plans_manager, first.configuration_manager
        self.dataset_json = first.dataset_json
        self.label_manager = first.label_manager
        if self.label_manager.has_regions:
            raise SSLInputError("region-based models (regions_class_order) are not supported: pseudo-labels and "
                                "their scores need one class per voxel")
        self.labels = [int(x) for x in self.label_manager.foreground_labels]
        self.ending = self.dataset_json["file_ending"]
        self.device = device
        self.quality = None
        if quality_predictor:
            from nnunet_ssl.quality.predictor import load_quality_predictor

            self.quality = load_quality_predictor(quality_predictor, map_location=device).eval()

    def iterator(self, lists: list[list[str]], outputs: list[str], num_processes: int):
        from nnunet_ssl.compat.tooling import predictor_iterator_from_lists

        return predictor_iterator_from_lists(self.predictors[0], lists, outputs, num_processes)

    def _quality(self, data: torch.Tensor, logits: torch.Tensor) -> float:
        probabilities = torch.softmax(logits.float(), 0)[None].to(self.device)
        with torch.no_grad():
            q = self.quality(data[None].float().to(self.device), probabilities)
        return float(q.mean())

    def process(self, item: dict, work: Path, ignore_value: int | None, voxels: VoxelRule,
                keep_probabilities: bool) -> dict:
        """Predicts, scores and writes one case (an item of ``iterator``); returns its score record."""
        from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape

        from nnunet_ssl.uncertainty.predict_uncertainty import (
            MEASURE_ENTROPY,
            MEASURE_EVIDENTIAL,
            to_original_geometry,
            uncertainty_from_logits,
        )

        data = item["data"]
        if isinstance(data, str):  # nnU-Net hands large cases over as a temporary .npy file
            path = data
            data = torch.from_numpy(np.load(path))
            os.remove(path)
        properties, case = item["data_properties"], os.path.basename(item["ofile"])
        maps: dict[tuple[str, str], np.ndarray] = {}
        mean_probabilities = None
        logits_sum = None
        dirichlet = None
        for source, predictor in zip(self.sources, self.predictors):
            logits = predictor.predict_logits_from_preprocessed_data(data).cpu().float()
            if self.quality is not None:
                logits_sum = logits if logits_sum is None else logits_sum + logits
            if self.evidential:
                u = to_original_geometry(uncertainty_from_logits(logits, True), properties, self.plans_manager,
                                         self.configuration_manager)
                dirichlet = u if dirichlet is None else dirichlet + u
            seg, probabilities = convert_predicted_logits_to_segmentation_with_correct_shape(
                logits, self.plans_manager, self.configuration_manager, self.label_manager, properties,
                return_probabilities=True)
            maps[(source.model, source.checkpoint)] = np.asarray(seg)
            probabilities = np.asarray(probabilities, dtype=np.float32)
            mean_probabilities = probabilities if mean_probabilities is None else mean_probabilities + probabilities
        mean_probabilities /= len(self.sources)
        label = np.asarray(self.label_manager.convert_probabilities_to_segmentation(mean_probabilities))
        label = label.astype(np.uint8 if max(self.labels + [ignore_value or 0]) < 255 else np.uint16)
        seg_list = list(maps.values())
        record = {"case": case,
                  "agreement": S.grouped_pairwise_dice(maps, self.labels, across=0),
                  "stability": S.grouped_pairwise_dice(maps, self.labels, across=1),
                  **S.confidence_scores(mean_probabilities, seg_list,
                                        None if dirichlet is None else dirichlet / len(self.sources)),
                  "quality": self._quality(data, logits_sum / len(self.sources)) if self.quality is not None
                  else float("nan"),
                  "uncertainty_measure": MEASURE_EVIDENTIAL if self.evidential else MEASURE_ENTROPY,
                  "ignored_fraction": 0.0, "ignored_fraction_of_foreground": 0.0,
                  "sources": [s.tag for s in self.sources]}
        if voxels.active:
            mask = S.ignore_mask(mean_probabilities, seg_list, voxels.min_probability, voxels.ignore_disagreement)
            region = S.foreground_union(seg_list)
            record["ignored_fraction"] = float(mask.mean())
            record["ignored_fraction_of_foreground"] = float(mask[region].mean()) if region.any() else 0.0
            label[mask] = ignore_value
        writer = self.plans_manager.image_reader_writer_class()
        for sub in (LABELS, PROBABILITIES, SCORES):
            (work / sub).mkdir(parents=True, exist_ok=True)
        writer.write_seg(label, str(work / LABELS / f"{case}{self.ending}"), properties)
        if keep_probabilities:
            np.savez_compressed(work / PROBABILITIES / f"{case}.npz", probabilities=mean_probabilities)
        write_json(work / SCORES / f"{case}.json", record)
        return record
