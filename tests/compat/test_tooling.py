"""``nnunet_ssl.compat.tooling`` against the installed nnU-Net: each fragile internal the tools use, with real
nnU-Net objects and values."""

from __future__ import annotations

import os

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from batchgenerators.utilities.file_and_folder_operations import load_json
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunet_ssl.compat.tooling import (
    add_trainer_folder,
    augmentation_parameters,
    predictor_data_iterator,
    strip_wrapper_prefixes,
    trainer_in_results_folder,
    write_float_map,
)


def _planned(synthetic_planned) -> tuple[dict, dict]:
    pp = synthetic_planned["root"] / "preprocessed" / synthetic_planned["dataset"]
    return load_json(str(pp / "nnUNetPlans.json")), load_json(str(pp / "dataset.json"))


def _use_folders(root, monkeypatch) -> None:
    for key, sub in (("nnUNet_raw", "raw"), ("nnUNet_preprocessed", "preprocessed"), ("nnUNet_results", "results")):
        monkeypatch.setenv(key, str(root / sub))


# ---------------------------------------------------------------------------------------------- predictor input
def _predictor(plans: dict, dataset_json: dict):
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    pm = PlansManager(plans)
    predictor = nnUNetPredictor(device=torch.device("cpu"), verbose=False, allow_tqdm=False)
    # no network: the iterator only preprocesses
    predictor.manual_initialization(None, pm, pm.get_configuration("3d_fullres"), None, dataset_json,
                                    "nnUNetTrainer", None)
    return predictor


def test_predictor_data_iterator_yields_each_case_preprocessed_as_nnunet_does(synthetic_planned, tmp_path):
    plans, dataset_json = _planned(synthetic_planned)
    predictor = _predictor(plans, dataset_json)
    images = synthetic_planned["root"] / "raw" / synthetic_planned["dataset"] / "imagesTs"
    out = tmp_path / "out"
    lists, iterator = predictor_data_iterator(predictor, str(images), str(out), 2)
    assert lists == [[str(images / "test_000_0000.nii.gz")], [str(images / "test_001_0000.nii.gz")]]
    items = list(iterator)
    assert [item["ofile"] for item in items] == [str(out / "test_000"), str(out / "test_001")]
    # the same data and properties as the configuration's preprocessor makes of each image
    pm = PlansManager(plans)
    cm = pm.get_configuration("3d_fullres")
    for files, item in zip(lists, items, strict=True):
        data, _, properties = cm.preprocessor_class(verbose=False).run_case(files, None, pm, cm, dataset_json)
        assert isinstance(item["data"], torch.Tensor) and item["data"].dtype == torch.float32
        assert np.array_equal(item["data"].numpy(), data.astype(np.float32))
        assert item["data_properties"]["shape_before_cropping"] == properties["shape_before_cropping"]
        assert item["data_properties"]["bbox_used_for_cropping"] == properties["bbox_used_for_cropping"]
    assert not out.exists()  # the caller decides when to write


def test_predictor_data_iterator_of_an_empty_folder_starts_nothing(synthetic_planned, tmp_path):
    predictor = _predictor(*_planned(synthetic_planned))
    (tmp_path / "in").mkdir()
    lists, iterator = predictor_data_iterator(predictor, str(tmp_path / "in"), str(tmp_path / "out"), 2)
    assert lists == [] and list(iterator) == []


# ---------------------------------------------------------------------------------------------- augmentation
@pytest.mark.parametrize("configuration, patch_size", [("3d_fullres", None), ("3d_fullres", [8, 64, 64]),
                                                       ("2d", None), ("2d", [32, 96])])
def test_augmentation_parameters_equal_those_of_a_real_trainer(configuration, patch_size, synthetic_planned,
                                                               monkeypatch, tmp_path):
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    plans, dataset_json = _planned(synthetic_planned)
    if patch_size is not None:  # anisotropic (dummy 2D augmentation) and elongated 2D patches
        plans["configurations"][configuration]["patch_size"] = patch_size
    _use_folders(synthetic_planned["root"], monkeypatch)
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    # nnUNetv2_train passes this key, and the trainer pops it from the dict
    trainer = nnUNetTrainer({**plans, "continue_training": False}, configuration, 0, dataset_json,
                            torch.device("cpu"))
    expected = trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
    got = augmentation_parameters(PlansManager(plans).get_configuration(configuration))
    assert got[0] == expected[0] and got[1] == expected[1] and got[3] == expected[3]
    assert np.array_equal(got[2], expected[2])
    patch = trainer.configuration_manager.patch_size
    if len(patch) == 3:
        assert got[3] == (0, 1, 2)
        # nnU-Net's dummy 2D augmentation for patches 3x longer in-plane than through-plane: full rotation,
        # through-plane size kept
        assert got[1] == (max(patch) / patch[0] > 3)
        assert got[0] == pytest.approx((-np.pi, np.pi) if got[1] else (-np.pi / 6, np.pi / 6))
        if got[1]:
            assert got[2][0] == patch[0]
    else:
        assert got[3] == (0, 1) and got[1] is False
        assert got[0] == pytest.approx((-np.pi / 12, np.pi / 12) if max(patch) / min(patch) > 1.5 else (-np.pi, np.pi))
    assert all(int(i) >= int(p) for i, p in zip(got[2], patch, strict=True))  # room for the rotation


# ---------------------------------------------------------------------------------------------- state dicts
def test_strip_wrapper_prefixes_loads_wrapped_weights_into_a_plain_network(synthetic_planned):
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    plans, _ = _planned(synthetic_planned)
    cm = PlansManager(plans).get_configuration("3d_fullres")

    def network() -> torch.nn.Module:
        return get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                      cm.network_arch_init_kwargs_req_import, 1, 3, deep_supervision=False)

    torch.manual_seed(0)
    net = network()
    # torch.compile's OptimizedModule inside DataParallel (as DDP names it): keys "module._orig_mod.<name>"
    wrapped = torch.nn.DataParallel(torch.compile(net))
    state = wrapped.state_dict()
    assert all(k.startswith("module._orig_mod.") for k in state)
    plain = network()
    plain.load_state_dict(strip_wrapper_prefixes(state))  # strict: every key matches
    for k, v in net.state_dict().items():
        assert torch.equal(plain.state_dict()[k], v)
    # plain keys stay as they are; a prefix repeated by nested wrappers goes entirely
    assert list(strip_wrapper_prefixes(net.state_dict())) == list(net.state_dict())
    assert strip_wrapper_prefixes({"module.module.encoder.w": 1, "module._orig_mod._orig_mod.b": 2}) == \
        {"encoder.w": 1, "b": 2}


# ---------------------------------------------------------------------------------------------- results folder
@pytest.mark.parametrize("user_folder_set", [True, False])
def test_trainer_in_results_folder_writes_there_and_restores_the_users_folder(user_folder_set, synthetic_planned,
                                                                              monkeypatch, tmp_path):
    from nnunetv2.paths import nnUNet_results
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    plans, dataset_json = _planned(synthetic_planned)
    _use_folders(synthetic_planned["root"], monkeypatch)
    user, scratch = tmp_path / "user_results", tmp_path / "scratch"
    if user_folder_set:
        monkeypatch.setenv("nnUNet_results", str(user))
    else:
        monkeypatch.delenv("nnUNet_results")
    def args() -> tuple:
        return {**plans, "continue_training": False}, "3d_fullres", 0, dataset_json, torch.device("cpu")

    trainer = trainer_in_results_folder(nnUNetTrainer, str(scratch), *args())
    model = scratch / synthetic_planned["dataset"] / "nnUNetTrainer__nnUNetPlans__3d_fullres" / "fold_0"
    assert trainer.output_folder == str(model)
    assert os.environ.get("nnUNet_results") == (str(user) if user_folder_set else None)
    assert nnUNet_results.get() == os.environ.get("nnUNet_results")  # nnU-Net reads the user's folder again
    if user_folder_set:
        assert trainer_in_results_folder(nnUNetTrainer, None, *args()).output_folder.startswith(str(user))


# ---------------------------------------------------------------------------------------------- trainer lookup
def test_add_trainer_folder_makes_nnunets_lookup_find_our_trainers(monkeypatch, tmp_path):
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    from nnunet_ssl import trainers
    from nnunet_ssl.cli.trainers import ext_trainer_path

    monkeypatch.setenv("nnUNet_extTrainer", str(tmp_path))  # a folder of the user's, kept first
    with pytest.raises(RuntimeError, match="Could not find requested nnunet trainer"):
        recursive_find_trainer_class_by_name("nnUNetTrainerMeanTeacher")
    add_trainer_folder(ext_trainer_path())
    add_trainer_folder(ext_trainer_path())  # once is enough
    assert os.environ["nnUNet_extTrainer"] == os.pathsep.join([str(tmp_path), ext_trainer_path()])
    found = recursive_find_trainer_class_by_name("nnUNetTrainerMeanTeacher")
    assert found is trainers.nnUNetTrainerMeanTeacher


# ---------------------------------------------------------------------------------------------- float maps
def _reference_image(path) -> None:
    image = sitk.GetImageFromArray(np.zeros((4, 5, 6), np.uint8))
    image.SetSpacing((0.7, 0.8, 1.5))
    image.SetOrigin((1.0, -2.0, 3.0))
    image.SetDirection((0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, -1.0))
    sitk.WriteImage(image, str(path))


@pytest.mark.parametrize("writer_name", ["SimpleITKIO", "SimpleITKIOWithReorient", "NibabelIO",
                                         "NibabelIOWithReorient"])
def test_write_float_map_keeps_float_values_and_the_segmentations_geometry(writer_name, tmp_path):
    from nnunetv2.imageio.reader_writer_registry import recursive_find_reader_writer_by_name

    writer = recursive_find_reader_writer_by_name(writer_name)()
    _reference_image(tmp_path / "ref.nii.gz")
    seg, properties = writer.read_seg(str(tmp_path / "ref.nii.gz"))
    values = np.random.default_rng(0).random(seg.shape[1:]).astype(np.float32)
    assert write_float_map(writer, values, str(tmp_path / "map.nii.gz"), properties)
    # read back as nnU-Net reads it: the same voxel grid as the segmentation, values not quantised
    back, back_properties = writer.read_images([str(tmp_path / "map.nii.gz")])
    assert back.dtype == np.float32 and np.array_equal(back[0], values)
    assert np.allclose(back_properties["spacing"], properties["spacing"])
    # the file itself holds float32 with the reference's geometry
    ref, out = sitk.ReadImage(str(tmp_path / "ref.nii.gz")), sitk.ReadImage(str(tmp_path / "map.nii.gz"))
    assert out.GetPixelID() == sitk.sitkFloat32
    assert np.allclose(out.GetSpacing(), ref.GetSpacing()) and np.allclose(out.GetOrigin(), ref.GetOrigin())
    assert np.allclose(out.GetDirection(), ref.GetDirection())
    # the same writer still writes integer segmentations as before
    writer.write_seg(seg[0].astype(np.uint8), str(tmp_path / "seg.nii.gz"), properties)
    assert sitk.ReadImage(str(tmp_path / "seg.nii.gz")).GetPixelID() == sitk.sitkUInt8


def test_write_float_map_refuses_writers_whose_format_holds_no_floats(tmp_path):
    from nnunetv2.imageio.natural_image_reader_writer import NaturalImage2DIO

    assert not write_float_map(NaturalImage2DIO(), np.zeros((1, 4, 4), np.float32), str(tmp_path / "m.png"), {})
    assert not (tmp_path / "m.png").exists()
