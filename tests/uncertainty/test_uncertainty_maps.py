"""Uncertainty maps: nnU-Net's export geometry, float files, the ranking CSV and the command's error line."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
from helpers import planned_plans, read_image
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager


def test_uncertainty_map_follows_nnunets_own_export_geometry(synthetic_planned):
    """Crop, resampling and transpose of the map match what nnU-Net does to the logits of a segmentation: with
    logits ``20 m - 10`` for class 1, nnU-Net's exported segmentation is exactly ``map > 0.5``."""
    from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape

    from nnunet_ssl.uncertainty.predict_uncertainty import to_original_geometry

    plans = planned_plans(synthetic_planned)
    plans["transpose_forward"], plans["transpose_backward"] = [2, 0, 1], [1, 2, 0]
    pm = PlansManager(plans)
    cm = pm.get_configuration("3d_fullres")
    lm = pm.get_label_manager(json.loads((synthetic_planned["root"] / "preprocessed" / synthetic_planned["dataset"]
                                          / "dataset.json").read_text()))
    # (transposed order, as nnU-Net's preprocessing records them; spacing in the image's own order)
    properties = {"spacing": [1.0, 2.0, 0.8], "shape_before_cropping": (12, 14, 10),
                  "bbox_used_for_cropping": [[1, 11], [2, 14], [0, 10]],
                  "shape_after_cropping_and_before_resampling": (10, 12, 10)}
    rng = np.random.default_rng(0)
    m = (rng.random((5, 12, 20)) > 0.5).astype(np.float32)  # preprocessed crop at the plans' spacing
    logits = np.stack([np.zeros_like(m), 20 * m - 10, np.full_like(m, -30)])
    seg = convert_predicted_logits_to_segmentation_with_correct_shape(logits, pm, cm, lm, properties)
    mapped = to_original_geometry(m, properties, pm, cm)
    assert mapped.shape == seg.shape == (14, 10, 12) and mapped.dtype == np.float32
    assert np.array_equal(mapped > 0.5, seg == 1)
    outside = np.ones((12, 14, 10), bool)
    outside[1:11, 2:14, 0:10] = False
    assert np.all(mapped[outside.transpose(1, 2, 0)] == 0)  # outside nnU-Net's crop: background, no doubt
    assert 0 < mapped.mean() < 1


def test_uncertainty_files_csv_and_errors(synthetic_planned, tmp_path, monkeypatch, capsys):
    from nnunet_ssl.cli.predict_uncertainty import main
    from nnunet_ssl.uncertainty.predict_uncertainty import summarise, write_csv, write_uncertainty

    plans = planned_plans(synthetic_planned)
    props = {"sitk_stuff": {"spacing": (0.7, 0.8, 1.5), "origin": (1.0, -2.0, 3.0),
                            "direction": (0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, -1.0)}}
    u = np.random.default_rng(1).random((4, 5, 6)).astype(np.float32)
    path = write_uncertainty(u, props, str(tmp_path / "case"), PlansManager(plans), ".nii.gz")
    assert path.endswith("case_uncertainty.nii.gz")
    back, img = read_image(path)
    assert back.dtype == np.float32 and np.array_equal(back, u)  # not quantised by the label writer
    assert np.allclose(img.GetSpacing(), props["sitk_stuff"]["spacing"])
    assert np.allclose(img.GetOrigin(), props["sitk_stuff"]["origin"])
    assert np.allclose(img.GetDirection(), props["sitk_stuff"]["direction"])
    natural = {**plans, "image_reader_writer": "NaturalImage2DIO"}  # PNG cannot hold floats: .npz instead
    path = write_uncertainty(u[:1], {}, str(tmp_path / "img"), PlansManager(natural), ".png")
    assert path.endswith("img_uncertainty.npz") and np.array_equal(np.load(path)["uncertainty"], u[:1])

    seg = np.zeros((4, 5, 6), np.uint8)
    seg[1:3, 1:3, 1:3] = 2
    rows = [summarise("a", u, seg, "m"), summarise("b", u + 0.5, np.zeros_like(seg), "m")]
    assert rows[0]["mean_foreground"] == pytest.approx(float(u[1:3, 1:3, 1:3].mean()))
    assert rows[0]["foreground_voxels"] == 8 and math.isnan(rows[1]["mean_foreground"])
    write_csv(rows, str(tmp_path / "u.csv"))
    assert [r["case"] for r in csv.DictReader((tmp_path / "u.csv").open())] == ["b", "a"]  # most uncertain first

    # no trained model: one line, exit status 2, nothing written
    root = synthetic_planned["root"]
    for key, sub in (("nnUNet_raw", "raw"), ("nnUNet_preprocessed", "preprocessed"), ("nnUNet_results", "nope")):
        monkeypatch.setenv(key, str(root / sub))
    code = main(["-i", str(root / "raw" / synthetic_planned["dataset"] / "imagesTs"), "-o", str(tmp_path / "out"),
                 "-d", "990", "-c", "3d_fullres", "-tr", "nnUNetTrainerMEDL", "-device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("nnunet-ssl: error: no trained model in")
    assert not (tmp_path / "out").exists()
