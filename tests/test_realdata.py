"""The same pipeline on a handful of real MRI cases of the MSD Hippocampus copy in ../shared (training cases
only: the held-out test cases are never used here)."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import HIPPOCAMPUS, nnunet_env, run_cli
from helpers import assert_trained_resumed_predicted, train_resume_predict

pytestmark = [pytest.mark.slow, pytest.mark.realdata,
              pytest.mark.skipif(not HIPPOCAMPUS.is_dir(), reason="../shared/data/Dataset004_Hippocampus not found")]


def test_mean_teacher_pipeline_on_hippocampus(tmp_path):
    source = sorted(p.name[: -len("_0000.nii.gz")] for p in (HIPPOCAMPUS / "imagesTr").glob("*_0000.nii.gz"))
    labeled, unlabeled = source[:8], source[8:11]
    ds = "Dataset004_Hippocampus"
    raw = tmp_path / "raw" / ds
    for sub in ("imagesTr", "labelsTr", "imagesUnlabeled"):
        (raw / sub).mkdir(parents=True)
    for case in labeled:
        shutil.copy(HIPPOCAMPUS / "imagesTr" / f"{case}_0000.nii.gz", raw / "imagesTr")
        shutil.copy(HIPPOCAMPUS / "labelsTr" / f"{case}.nii.gz", raw / "labelsTr")
    for case in unlabeled:  # images only: their labels are never copied
        shutil.copy(HIPPOCAMPUS / "imagesTr" / f"{case}_0000.nii.gz", raw / "imagesUnlabeled")
    meta = json.loads((HIPPOCAMPUS / "dataset.json").read_text())
    meta["numTraining"] = len(labeled)
    (raw / "dataset.json").write_text(json.dumps(meta))

    env = nnunet_env(tmp_path, training=False)
    run_cli(["nnUNetv2_plan_and_preprocess", "-d", "4", "-c", "3d_fullres", "-np", "2", "-npfp", "2"], env=env)
    run_cli(["nnUNetv2_ssl_preprocess_unlabeled", "-d", "4", "-c", "3d_fullres", "-np", "2"], env=env)
    run_cli(["nnUNetv2_ssl_make_splits", "-d", "4", "--num-labeled", "3"], env=env)
    splits = json.loads((tmp_path / "preprocessed" / ds / "splits_final.json").read_text())
    assert len(splits[0]["train"]) == 3 and len(splits[0]["unlabeled"]) >= 2
    result = train_resume_predict(tmp_path, 4, ds, "nnUNetTrainerMeanTeacher", raw / "imagesUnlabeled")
    assert_trained_resumed_predicted(result, raw / "imagesUnlabeled")
