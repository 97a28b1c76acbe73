"""Simulated sparse annotation: which slices are kept (by hand), the derived dataset, the untouched source."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import read_image

from nnunet_ssl.data.sparse import kept_slices, sparsify


def test_kept_slices_spread_over_the_foreground_by_hand():
    label = np.zeros((10, 4, 4), np.uint8)
    label[2:8, 1, 1] = 1  # foreground on slices 2..7 along axis 0
    # 6 candidates in 3 parts: centres at 1, 3, 5 of the candidates -> slices 3, 5, 7
    assert kept_slices(label, 3, 0) == [3, 5, 7]
    assert kept_slices(label, 1, 0) == [5]
    assert kept_slices(label, 6, 0) == [2, 3, 4, 5, 6, 7]
    assert kept_slices(label, 9, 0) == [2, 3, 4, 5, 6, 7]  # never more than the foreground slices
    # along axis 2 only slice 1 has foreground; no foreground at all: spread over every slice
    assert kept_slices(label, 2, 2) == [1]
    assert kept_slices(np.zeros((8, 2)), 2, 0) == [2, 6]


def test_sparsify_keeps_only_those_slices():
    label = np.arange(24).reshape(2, 3, 4) % 3
    out = sparsify(label, [0, 2], 1, 9)
    assert np.array_equal(out[:, [0, 2]], label[:, [0, 2]]) and np.all(out[:, 1] == 9)


def test_sparse_copy_of_the_synthetic_dataset(copy_planned, monkeypatch, capsys):
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    from nnunet_ssl.cli.make_splits import main

    root, ds = copy_planned["root"], copy_planned["dataset"]
    for name in ("raw", "preprocessed", "results"):
        monkeypatch.setenv(f"nnUNet_{name}", str(root / name))
    source_labels = {p.name: p.read_bytes() for p in (root / "raw" / ds / "labelsTr").iterdir()}
    assert main(["-d", "990", "--sparse-slices", "2", "--num-labeled", "3"]) == 2
    assert "give its id with -t" in capsys.readouterr().err
    assert main(["-d", "990", "--sparse-slices", "2", "-t", "995"]) == 0
    target = root / "raw" / "Dataset995_SSLSyntheticSparse2"
    dataset_json = json.loads((target / "dataset.json").read_text())
    assert dataset_json["labels"]["ignore"] == 3 and dataset_json["numTraining"] == 8
    record = json.loads((target / "sparse_labels.json").read_text())["cases"]
    for case, info in record.items():
        sparse = read_image(target / "labelsTr" / f"{case}.nii.gz")[0]
        full = read_image(root / "raw" / ds / "labelsTr" / f"{case}.nii.gz")[0]
        # synthetic spacing (1.5, 1, 1) in z, y, x: the slices are along z
        assert info["axis"] == 0 and len(info["slices"]) == 2
        kept = np.zeros(sparse.shape[0], bool)
        kept[info["slices"]] = True
        assert np.array_equal(sparse[kept], full[kept]) and np.all(sparse[~kept] == 3)
        assert full[kept].any()  # the kept slices hold foreground
        assert info["annotated_fraction"] == pytest.approx(2 / sparse.shape[0])
    assert (target / "imagesTs").is_symlink() and (target / "imagesTr" / "case_000_0000.nii.gz").is_symlink()
    verify_dataset_integrity(str(target), 1)
    splits = json.loads((root / "preprocessed" / target.name / "splits_final.json").read_text())
    assert len(splits) == 5 and sorted(c for f in splits for c in f["val"]) == sorted(record)
    assert {p.name: p.read_bytes() for p in (root / "raw" / ds / "labelsTr").iterdir()} == source_labels
    assert main(["-d", "990", "--sparse-slices", "2", "-t", "995"]) == 2
    assert "pass --overwrite" in capsys.readouterr().err


def test_sparse_copy_of_an_unplanned_dataset(tmp_path, monkeypatch, capsys):
    """A source that was never planned has no splits: the copy gets nnU-Net's default 5 folds of its cases."""
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    from nnunet_ssl.cli.make_splits import main
    from nnunet_ssl.demo.synthetic import make_synthetic_dataset

    for name in ("raw", "preprocessed", "results"):
        (tmp_path / name).mkdir()
        monkeypatch.setenv(f"nnUNet_{name}", str(tmp_path / name))
    make_synthetic_dataset(tmp_path / "raw", dataset_id=990, num_train=6, num_unlabeled=0, num_test=1,
                           shape=(8, 16, 16))
    assert main(["-d", "990", "--sparse-slices", "1", "-t", "996"]) == 0
    assert "nnU-Net's default 5 folds" in capsys.readouterr().out
    splits = json.loads((tmp_path / "preprocessed" / "Dataset996_SSLSyntheticSparse1" / "splits_final.json")
                        .read_text())
    ids = [f"case_{i:03d}" for i in range(6)]
    assert splits == generate_crossval_split(ids, seed=12345, n_splits=5)
    assert not (tmp_path / "preprocessed" / "Dataset990_SSLSynthetic").exists()  # the source stays unplanned
