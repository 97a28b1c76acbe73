"""Prediction with uncertainty: predict a folder with nnU-Net and write a voxel-wise uncertainty map beside each
segmentation, plus ``uncertainty.csv`` ranking the cases for review (``nnUNetv2_ssl_predict_uncertainty``, whose
command line is :mod:`nnunet_ssl.cli.predict_uncertainty`).

The segmentation is made exactly as ``nnUNetv2_predict`` makes it: nnU-Net's ``nnUNetPredictor`` (preprocessing,
sliding window with Gaussian weighting, mirroring, fold averaging) and its ``export_prediction_from_logits``. From
the same logits, in the preprocessed crop, the uncertainty is

* the Dirichlet total uncertainty ``u = K / S`` (``alpha = softplus(z) + 1``) for checkpoints of evidential
  trainers (class attribute ``evidential_output``, e.g. ``nnUNetTrainerMEDL``);
* otherwise the predictive entropy of the softmax, divided by ``log K`` (for region-based trainers: the mean binary
  entropy of the sigmoids, divided by ``log 2``).

Both lie in ``[0, 1]``. The map is brought back to the image's geometry with nnU-Net's own steps (as in
``convert_predicted_logits_to_segmentation_with_correct_shape``): ``resampling_fn_probabilities`` to the cropped
shape, insertion into the uncropped image (0 outside the crop, where nnU-Net predicts background with probability
1) and the inverse transpose; it is written with the plans' image writer as ``<case>_uncertainty<ending>`` in
float32 (for 2D natural-image datasets, whose formats cannot hold floats, as ``<case>_uncertainty.npz``).

Notes: nnU-Net averages logits over mirrorings and folds, so ``u`` is that of the averaged logits. With several
``-chk`` files (e.g. MEDL's ``checkpoint_final.pth checkpoint_final_net2.pth``, the paper's two-network
inference) each is predicted by its own predictor and their logits are averaged; the segmentation then is the
argmax of that average, which ``nnUNetv2_predict`` cannot make.
"""

from __future__ import annotations

import csv
import multiprocessing
import os
from collections.abc import Sequence

import numpy as np
import torch
from acvl_utils.cropping_and_padding.bounding_boxes import insert_crop_into_image
from batchgenerators.utilities.file_and_folder_operations import isdir, isfile, join, maybe_mkdir_p, save_json
from tqdm import tqdm

from nnunet_ssl.compat.tooling import add_trainer_folder, predictor_data_iterator, write_float_map
from nnunet_ssl.errors import SSLInputError
from nnunet_ssl.losses.evidential import predictive_entropy, total_uncertainty

CSV_NAME = "uncertainty.csv"
SUFFIX = "_uncertainty"
MEASURE_EVIDENTIAL = "dirichlet_total_uncertainty"
MEASURE_ENTROPY = "normalised_softmax_entropy"


def ensure_ext_trainers_visible() -> None:
    """Adds this package's trainer folder to ``nnUNet_extTrainer`` (nnU-Net reads it lazily) so the predictor
    finds our trainers without the user exporting it."""
    from nnunet_ssl import ext_trainer_path

    add_trainer_folder(ext_trainer_path())


def is_evidential(trainer_name: str) -> bool:
    """Whether checkpoints of this trainer give Dirichlet evidence (``evidential_output = True``)."""
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    ensure_ext_trainers_visible()
    return bool(getattr(recursive_find_trainer_class_by_name(trainer_name), "evidential_output", False))


def uncertainty_from_logits(logits: torch.Tensor | np.ndarray, evidential: bool, regions: bool = False) -> np.ndarray:
    """Voxel-wise uncertainty in ``[0, 1]`` from nnU-Net's ``(K, *spatial)`` logits, float32 ``(*spatial)``."""
    z = torch.as_tensor(logits).float()[None]
    u = total_uncertainty(z) if evidential else predictive_entropy(z, regions=regions)
    return u[0].cpu().numpy().astype(np.float32)


def to_original_geometry(uncertainty: np.ndarray, properties: dict, plans_manager, configuration_manager) -> np.ndarray:
    """Preprocessed-crop map -> the image's voxel grid, with nnU-Net's resampling, crop insertion (0 outside the
    crop) and inverse transpose, the steps nnU-Net applies to the logits before writing a segmentation."""
    spacing_transposed = [properties["spacing"][i] for i in plans_manager.transpose_forward]
    shape = properties["shape_after_cropping_and_before_resampling"]
    current_spacing = configuration_manager.spacing if len(configuration_manager.spacing) == len(shape) else \
        [spacing_transposed[0], *configuration_manager.spacing]
    resampled = configuration_manager.resampling_fn_probabilities(uncertainty[None], shape, current_spacing,
                                                                  spacing_transposed)
    if isinstance(resampled, torch.Tensor):
        resampled = resampled.cpu().numpy()
    full = np.zeros(properties["shape_before_cropping"], dtype=np.float32)
    full = insert_crop_into_image(full, np.asarray(resampled[0], dtype=np.float32),
                                  properties["bbox_used_for_cropping"])
    return np.ascontiguousarray(np.clip(full, 0.0, 1.0).transpose(plans_manager.transpose_backward))


def write_uncertainty(uncertainty: np.ndarray, properties: dict, output_file_truncated: str, plans_manager,
                      file_ending: str) -> str:
    """Writes the map beside the segmentation; returns the file name."""
    writer = plans_manager.image_reader_writer_class()
    path = output_file_truncated + SUFFIX + file_ending
    if not write_float_map(writer, uncertainty, path, properties):
        # formats of 2D natural images cannot hold floats
        path = output_file_truncated + SUFFIX + ".npz"
        np.savez_compressed(path, uncertainty=uncertainty.astype(np.float32))
    return path


def summarise(case: str, uncertainty: np.ndarray, segmentation: np.ndarray, measure: str) -> dict:
    """One CSV row: mean and max over the image, mean over the predicted foreground (NaN without foreground)."""
    foreground = segmentation > 0
    return {"case": case, "measure": measure, "mean": float(uncertainty.mean()), "max": float(uncertainty.max()),
            "mean_foreground": float(uncertainty[foreground].mean()) if foreground.any() else float("nan"),
            "foreground_voxels": int(foreground.sum())}


def write_csv(rows: list[dict], path: str) -> None:
    """``uncertainty.csv``, most uncertain case (highest mean) first."""
    rows = sorted(rows, key=lambda r: r["mean"], reverse=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["case", "measure", "mean", "max", "mean_foreground",
                                               "foreground_voxels"])
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


def make_predictor(model_folder: str, folds, checkpoint: str, device: torch.device, step_size: float,
                   use_mirroring: bool):
    """nnU-Net's predictor for ``checkpoint`` of ``folds`` of a model folder, quiet, as nnUNetv2_predict sets it up."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(tile_step_size=step_size, use_gaussian=True, use_mirroring=use_mirroring,
                                perform_everything_on_device=device.type == "cuda", device=device, verbose=False,
                                verbose_preprocessing=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(model_folder, folds, checkpoint_name=checkpoint)
    return predictor


def predict_with_uncertainty(model_folder: str, input_folder: str, output_folder: str,
                             folds: Sequence[int | str] | None = None,
                             checkpoints: Sequence[str] = ("checkpoint_final.pth",),
                             device: torch.device = torch.device("cuda"), step_size: float = 0.5,
                             use_mirroring: bool = True, num_processes_preprocessing: int = 2) -> list[dict]:
    """Predicts every case of ``input_folder`` (nnU-Net raw layout, ``<case>_0000<ending>``) into
    ``output_folder``: segmentations as nnUNetv2_predict writes them, ``<case>_uncertainty<ending>`` and
    ``uncertainty.csv``. Returns the CSV rows (most uncertain first)."""
    from nnunetv2.inference.export_prediction import export_prediction_from_logits
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    ensure_ext_trainers_visible()
    if not isdir(model_folder):
        raise SSLInputError(f"no trained model in {model_folder}; check -d, -tr, -p and -c (and nnUNet_results)")
    if not isdir(input_folder):
        raise SSLInputError(f"input folder {input_folder} does not exist; pass a folder of <case>_0000<ending> images")
    if folds is None:
        folds = nnUNetPredictor.auto_detect_available_folds(model_folder, checkpoints[0])
    folds = [f if f == "all" else int(f) for f in folds]
    missing = [join(model_folder, f"fold_{f}", c) for f in folds for c in checkpoints
               if not isfile(join(model_folder, f"fold_{f}", c))]
    if not folds or missing:
        raise SSLInputError(f"checkpoint {missing[0] if missing else checkpoints[0]} not found; train the model "
                            f"first or pick existing folds (-f) and checkpoints (-chk)")
    predictors = [make_predictor(model_folder, folds, c, device, step_size, use_mirroring) for c in checkpoints]
    first = predictors[0]
    evidential = all(is_evidential(p.trainer_name) for p in predictors)
    measure = MEASURE_EVIDENTIAL if evidential else MEASURE_ENTROPY
    regions = first.label_manager.has_regions
    dataset_json, plans_manager, configuration_manager = first.dataset_json, first.plans_manager, \
        first.configuration_manager
    ending = dataset_json["file_ending"]

    lists, iterator = predictor_data_iterator(first, input_folder, output_folder, num_processes_preprocessing)
    if not lists:
        raise SSLInputError(f"no images ending in _0000{ending} in {input_folder}; use nnU-Net's raw layout")
    maybe_mkdir_p(output_folder)
    # as nnUNetv2_predict: the files nnU-Net's postprocessing and ensembling need beside the predictions
    save_json(dataset_json, join(output_folder, "dataset.json"), sort_keys=False)
    save_json(plans_manager.plans, join(output_folder, "plans.json"), sort_keys=False)
    rows = []
    writer = plans_manager.image_reader_writer_class()
    for item in tqdm(iterator, total=len(lists), desc="predicting with uncertainty", unit="case"):
        data = item["data"]
        if isinstance(data, str):  # nnU-Net hands large cases over as a temporary .npy file
            path = data
            data = torch.from_numpy(np.load(path))
            os.remove(path)
        logits = None
        for predictor in predictors:
            out = predictor.predict_logits_from_preprocessed_data(data).cpu().float()
            logits = out if logits is None else logits + out
        logits = (logits / len(predictors)).numpy()
        properties, ofile = item["data_properties"], item["ofile"]
        # the segmentation exactly as nnUNetv2_predict's export workers write it
        export_prediction_from_logits(logits, properties, configuration_manager, plans_manager, dataset_json, ofile,
                                      False)
        uncertainty = to_original_geometry(uncertainty_from_logits(logits, evidential, regions), properties,
                                           plans_manager, configuration_manager)
        write_uncertainty(uncertainty, properties, ofile, plans_manager, ending)
        segmentation = writer.read_seg(ofile + ending)[0][0]
        rows.append(summarise(os.path.basename(ofile), uncertainty, segmentation, measure))
    write_csv(rows, join(output_folder, CSV_NAME))
    return sorted(rows, key=lambda r: r["mean"], reverse=True)


def select_device(name: str) -> torch.device:
    """The torch device for ``-device``; on the CPU torch may use every core, as in nnUNetv2_predict."""
    if name == "cuda" and not torch.cuda.is_available():
        raise SSLInputError("-device cuda but no CUDA device is available; pass -device cpu")
    if name == "cpu":
        torch.set_num_threads(multiprocessing.cpu_count())
    return torch.device(name)


def model_folder_of(dataset: str, trainer: str, plans: str, configuration: str) -> str:
    """nnU-Net's results folder of a trained model (``nnUNet_results/<dataset>/<trainer>__<plans>__<config>``)."""
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    from nnunetv2.utilities.file_path_utilities import get_output_folder

    try:
        name = maybe_convert_to_dataset_name(dataset)
    except RuntimeError as e:
        raise SSLInputError(f"dataset {dataset} not found ({e}); check -d and nnUNet_raw, "
                            "nnUNet_preprocessed") from None
    return get_output_folder(name, trainer, plans, configuration)
