"""Partially labeled training cases (an ignore label in dataset.json) join the unlabeled pool of every SSL trainer."""

from __future__ import annotations

import json

import blosc2
import numpy as np
import pytest
from conftest import nnunet_env, run_cli
from helpers import case_ids, make_trainer, write_budget_splits

from nnunet_ssl.errors import SSLInputError
from nnunet_ssl.trainers import nnUNetTrainerCPS, nnUNetTrainerFixMatch, nnUNetTrainerMeanTeacher

IGNORE = 3  # the synthetic dataset's labels are 0, 1, 2


def _with_ignore_label(ds: dict, partial: list[str]):
    """Adds the ignore label to the preprocessed dataset.json and marks half of each ``partial`` case ignored."""
    pp = ds["root"] / "preprocessed" / ds["dataset"]
    dataset_json = json.loads((pp / "dataset.json").read_text())
    dataset_json["labels"]["ignore"] = IGNORE
    (pp / "dataset.json").write_text(json.dumps(dataset_json))
    for case in partial:
        path = pp / "nnUNetPlans_3d_fullres" / f"{case}_seg.b2nd"
        seg = np.asarray(blosc2.open(urlpath=str(path), mode="r")[:])
        seg[:, : seg.shape[1] // 2] = IGNORE
        path.unlink()
        blosc2.asarray(np.ascontiguousarray(seg), urlpath=str(path), mode="w")
    return pp


def test_partially_labeled_training_cases_join_the_pool(copy_planned, monkeypatch):
    pp = copy_planned["root"] / "preprocessed" / copy_planned["dataset"]
    ids = case_ids(pp)
    labeled, val, unlabeled = ids[:4], ids[4:6], ids[6:]
    write_budget_splits(pp, labeled, val, unlabeled)
    # two training cases and one validation case carry ignored voxels; the other training cases are complete
    _with_ignore_label(copy_planned, [labeled[0], labeled[2], val[0]])
    trainer = make_trainer(nnUNetTrainerMeanTeacher, copy_planned["root"], copy_planned["dataset"], monkeypatch)
    trainer.initialize()
    sources = trainer.unlabeled_sources()
    folder = str(pp / "nnUNetPlans_3d_fullres")
    assert trainer.partially_labeled_ids == [labeled[0], labeled[2]]
    assert sources == [(folder, unlabeled), (folder, [labeled[0], labeled[2]])]

    monkeypatch.setenv("nnUNet_ssl_partially_labeled", "0")
    trainer = make_trainer(nnUNetTrainerMeanTeacher, copy_planned["root"], copy_planned["dataset"], monkeypatch)
    trainer.initialize()
    assert [i for _, c in trainer.unlabeled_sources() for i in c] == unlabeled


def test_without_an_ignore_label_no_training_case_joins(copy_planned, monkeypatch):
    pp = copy_planned["root"] / "preprocessed" / copy_planned["dataset"]
    ids = case_ids(pp)
    write_budget_splits(pp, ids[:4], ids[4:6], ids[6:])
    trainer = make_trainer(nnUNetTrainerMeanTeacher, copy_planned["root"], copy_planned["dataset"], monkeypatch)
    trainer.initialize()
    assert [i for _, c in trainer.unlabeled_sources() for i in c] == ids[6:]
    assert trainer.partially_labeled_ids == []


def test_sparse_labels_alone_are_enough_to_train(copy_planned, monkeypatch):
    """Every training case sparse (make_splits --sparse-slices, then nnU-Net's own planning and preprocessing), no
    unlabeled case: the pool is the sparse training cases, and a step trains on them."""
    from nnunet_ssl.data.sparse import make_sparse_dataset

    root = copy_planned["root"]
    for name in ("raw", "preprocessed", "results"):
        monkeypatch.setenv(f"nnUNet_{name}", str(root / name))
    target = make_sparse_dataset(copy_planned["id"], 991, 3).name
    run_cli(["nnUNetv2_plan_and_preprocess", "-d", "991", "-c", "3d_fullres", "-np", "1", "-npfp", "1"],
            env=nnunet_env(root, training=False))
    pp = root / "preprocessed" / target
    ids = case_ids(pp)
    write_budget_splits(pp, ids[:6], ids[6:], [])
    for cls in (nnUNetTrainerFixMatch, nnUNetTrainerCPS):
        monkeypatch.delenv("nnUNet_ssl_partially_labeled", raising=False)
        trainer = make_trainer(cls, root, target, monkeypatch)
        trainer.on_train_start()
        try:
            assert trainer.partially_labeled_ids == ids[:6]
            batch = next(trainer.dataloader_unlabeled)
            assert set(batch["keys"]) <= set(ids[:6])
            trainer.on_train_epoch_start()
            out = trainer.train_step(next(trainer.dataloader_train))
            assert np.isfinite(out["loss"])
            assert trainer._epoch_stats[-1]["ssl_unsup_loss"] > 0
        finally:
            trainer.on_train_end()

        monkeypatch.setenv("nnUNet_ssl_partially_labeled", "0")
        trainer = make_trainer(cls, root, target, monkeypatch)
        trainer.initialize()
        with pytest.raises(SSLInputError, match="no unlabeled data"):
            trainer.get_unlabeled_dataloader()
