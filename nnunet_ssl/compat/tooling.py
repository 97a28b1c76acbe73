"""Every private or fragile part of nnU-Net (and of torch's wrappers) that the command-line tools rely on.

Pinned range: nnunetv2 >= 2.8.0, < 2.9 (``pyproject.toml``). Each function names the nnU-Net code it depends on;
``tests/compat/test_tooling.py`` checks each against the installed nnU-Net, so a release that changes one of them
fails there, by name, instead of silently in a tool. Heavy imports stay inside the functions: the tools import
this module from their command lines.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from types import SimpleNamespace
from typing import Any

import numpy as np

#: state-dict key prefixes of torch's wrappers: DistributedDataParallel / DataParallel (``module.``) and
#: torch.compile's OptimizedModule (``_orig_mod.``, a private attribute of torch)
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
#: nnU-Net writers that pass the segmentation through ``astype`` and otherwise only set the geometry, so they can
#: write a float image (see ``write_float_map``)
FLOAT_SEG_WRITERS = ("SimpleITKIO", "SimpleITKIOWithReorient", "NibabelIO", "NibabelIOWithReorient", "Tiff3DIO")


def predictor_data_iterator(predictor: Any, input_folder: str, output_folder: str,
                            num_processes: int) -> tuple[list[list[str]], Iterator[dict]]:
    """(image files per case, iterator of preprocessed cases) for every case of ``input_folder``, as
    ``nnUNetPredictor.predict_from_files`` makes them: each item is ``{"data": tensor, "data_properties": dict,
    "ofile": output_folder/<case>}``, preprocessed in ``num_processes`` background processes.

    Relies on ``nnUNetPredictor._manage_input_and_output_lists`` and
    ``nnUNetPredictor._internal_get_data_iterator_from_lists_of_filenames``, both private
    (nnunetv2/inference/predict_from_raw_data.py; the iterator is ``preprocessing_iterator_fromfiles`` of
    nnunetv2/inference/data_iterators.py). The iterator starts its processes only when first read."""
    # arguments: no previous stage, overwrite, part 0 of 1, no probabilities
    lists, truncated, _ = predictor._manage_input_and_output_lists(input_folder, output_folder, None, True, 0, 1,
                                                                   False)
    if not lists:
        return [], iter(())
    return lists, predictor_iterator_from_lists(predictor, lists, truncated, num_processes)


def predictor_iterator_from_lists(predictor: Any, lists: list[list[str]], output_truncated: list[str],
                                  num_processes: int) -> Iterator[dict]:
    """The iterator of ``predictor_data_iterator`` for given image files per case (``lists``) and output names
    (``output_truncated``, one per case, without file ending), e.g. cases from several folders.

    Relies on ``nnUNetPredictor._internal_get_data_iterator_from_lists_of_filenames`` (private,
    nnunetv2/inference/predict_from_raw_data.py)."""
    return predictor._internal_get_data_iterator_from_lists_of_filenames(lists, [None] * len(lists),
                                                                         output_truncated, max(1, num_processes))


def augmentation_parameters(configuration_manager: Any) -> tuple[tuple[float, float], bool, np.ndarray,
                                                                   tuple[int, ...]]:
    """(rotation range, dummy 2D augmentation, initial patch size before augmentation, mirror axes) that
    ``nnUNetTrainer`` uses for a configuration, without building a trainer (which creates output folders).

    Calls ``nnUNetTrainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size``
    (nnunetv2/training/nnUNetTrainer/nnUNetTrainer.py) with a stand-in ``self``: the method only reads
    ``self.configuration_manager``, calls ``self.print_to_log_file`` and sets ``inference_allowed_mirroring_axes``."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    stand_in = SimpleNamespace(configuration_manager=configuration_manager, print_to_log_file=lambda *a, **k: None)
    rotation, dummy_2d, initial_patch_size, mirror_axes = \
        nnUNetTrainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size(stand_in)
    return rotation, dummy_2d, initial_patch_size, mirror_axes


def strip_wrapper_prefixes(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """``state_dict`` with the key prefixes of torch's DDP/DataParallel (``module.``) and torch.compile
    (``_orig_mod.``) wrappers removed, so weights saved from a wrapped network load into a plain one. nnU-Net's
    ``nnUNetTrainer.save_checkpoint`` unwraps both before saving and ``load_checkpoint`` strips ``module.``
    (nnunetv2/training/nnUNetTrainer/nnUNetTrainer.py); checkpoints of other trainers may still hold either."""
    out = {}
    for key, value in state_dict.items():
        for prefix in WRAPPER_PREFIXES:
            while key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def trainer_in_results_folder(cls: type, results_folder: str | None, *args: Any) -> Any:
    """``cls(*args)`` (an nnU-Net trainer) whose output folder, log and debug files lie in ``results_folder``
    instead of the user's ``nnUNet_results``, which is restored afterwards, so artefacts read later (e.g. a trained
    quality predictor) still come from the user's folder. ``None`` builds it as usual.

    Relies on nnU-Net reading ``nnUNet_results`` from the environment when a trainer is constructed
    (``nnunetv2.paths.nnUNet_results`` is an ``_EnvPath`` read on use; ``nnUNetTrainer.__init__`` fixes
    ``output_folder_base`` from it)."""
    if results_folder is None:
        return cls(*args)
    user = os.environ.get("nnUNet_results")
    os.environ["nnUNet_results"] = results_folder
    try:
        return cls(*args)
    finally:
        if user is None:
            del os.environ["nnUNet_results"]
        else:
            os.environ["nnUNet_results"] = user


def add_trainer_folder(folder: str) -> None:
    """Makes nnU-Net's trainer lookup in this process also search ``folder``, appended to ``nnUNet_extTrainer``
    unless it is there already.

    Relies on ``recursive_find_trainer_class_by_name`` (nnunetv2/utilities/find_objects.py) reading
    ``nnunetv2.paths.nnUNet_extTrainer``, an ``_EnvPath``, on every call rather than once at import."""
    current = [p for p in os.environ.get("nnUNet_extTrainer", "").split(os.pathsep) if p]
    if folder not in current:
        os.environ["nnUNet_extTrainer"] = os.pathsep.join([*current, folder])


class _KeepFloat(np.ndarray):
    """An array whose ``astype`` keeps float32 (see ``write_float_map``)."""

    def astype(self, dtype, *args, **kwargs):
        return np.asarray(self).astype(np.float32)


def write_float_map(writer: Any, image: np.ndarray, path: str, properties: dict) -> bool:
    """Writes a float32 map with an nnU-Net segmentation writer, so it gets exactly the geometry handling (spacing,
    origin, direction, reorientation) of the segmentation; False (nothing written) for writers whose formats cannot
    hold floats.

    Relies on the ``write_seg`` of the writers in ``FLOAT_SEG_WRITERS`` (nnunetv2/imageio/simpleitk_reader_writer.py,
    nibabel_reader_writer.py, tif_reader_writer.py) casting the array only with ``astype(uint8/uint16)``: the
    array passed is a view whose ``astype`` returns float32."""
    if type(writer).__name__ not in FLOAT_SEG_WRITERS:
        return False
    writer.write_seg(np.asarray(image).astype(np.float32).view(_KeepFloat), path, properties)
    return True
