"""The command-line pipeline a user runs, on the synthetic dataset: preprocess unlabeled images and simulate a
label budget, train Mean Teacher, resume with --c, predict with the student and the teacher."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import nnunet_env, run_cli
from helpers import HOST_TRAINERS, assert_trained_resumed_predicted, train_resume_predict

pytestmark = pytest.mark.slow



@pytest.fixture(scope="module")
def prepared(synthetic_planned, tmp_path_factory) -> dict:
    """A private copy with preprocessed unlabeled images and a 3-label budget, shared by the trainer runs."""
    root = tmp_path_factory.mktemp("e2e")
    for sub in ("raw", "preprocessed"):
        shutil.copytree(synthetic_planned["root"] / sub, root / sub)
    ds = synthetic_planned["dataset"]
    env = nnunet_env(root, training=False)
    run_cli(["nnUNetv2_ssl_preprocess_unlabeled", "-d", "990", "-c", "3d_fullres", "-np", "2"], env=env)
    unlabeled = root / "preprocessed" / ds / "nnUNetPlans_3d_fullres_unlabeled"
    before = {p.name: p.read_bytes() for p in unlabeled.iterdir() if p.is_file()}
    assert len([n for n in before if n.endswith(".b2nd") and not n.endswith("_seg.b2nd")]) == 4
    # nnU-Net's own preprocessing wipes its configuration folder when it re-runs, but not ours beside it
    run_cli(["nnUNetv2_preprocess", "-d", "990", "-c", "3d_fullres", "-np", "2"], env=env)
    assert {p.name: p.read_bytes() for p in unlabeled.iterdir() if p.is_file()} == before
    run_cli(["nnUNetv2_ssl_make_splits", "-d", "990", "--num-labeled", "3", "--seed", "0"], env=env)
    return {"root": root, "dataset": ds}


@pytest.mark.parametrize("trainer", HOST_TRAINERS)
def test_trainer_pipeline_from_the_command_line(trainer, prepared):
    root, ds = prepared["root"], prepared["dataset"]
    result = train_resume_predict(root, 990, ds, trainer, root / "raw" / ds / "imagesTs")
    assert_trained_resumed_predicted(result, root / "raw" / ds / "imagesTs", trainer)
    # both sources feed the pool: 4 preprocessed unlabeled images + the budget-unlabeled cases of fold 0
    log = result["first"].stdout
    pool_size = int(log.split("unlabeled pool:")[1].split()[0])
    assert pool_size > 4


def test_ssl_trainer_without_unlabeled_data_fails_with_one_line(copy_planned):
    env = nnunet_env(copy_planned["root"], training=True)
    proc = run_cli(["nnUNetv2_train", "990", "3d_fullres", "0", "-tr", "nnUNetTrainerMeanTeacher", "-device", "cpu"],
                   env=env, check=False)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("nnunet-ssl: error: no unlabeled data for Dataset990_SSLSynthetic")
    assert "nnUNetv2_ssl_preprocess_unlabeled" in last and "nnUNetv2_ssl_make_splits" in last


def test_trainer_listing_and_ext_path():
    proc = run_cli(["nnUNetv2_ssl_trainers"])
    lines = [line for line in proc.stdout.splitlines() if line.startswith("nnUNetTrainer")]
    names = [line.split()[0] for line in lines]
    assert {"nnUNetTrainerMeanTeacher", "nnUNetTrainerSupervised", "nnUNetTrainerFixMatch", "nnUNetTrainerCPS"} <= \
        set(names)
    assert all(len(line.split(None, 1)) == 2 for line in lines)  # a name and a one-line description
    path = run_cli(["nnUNetv2_ssl_trainers", "--path"]).stdout.strip()
    assert (Path(path) / "nnunet_ssl_trainers.py").is_file()
