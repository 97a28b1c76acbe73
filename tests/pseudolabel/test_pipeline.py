"""nnUNetv2_ssl_pseudolabel on the synthetic dataset with random two-fold models: the derived dataset, its
integrity, scores, ignored voxels, provenance, sharding, resumption and refusals; the source is never written."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
from helpers import read_image

from nnunet_ssl.cli.pseudolabel import main
from nnunet_ssl.demo.synthetic import save_random_model_folder as save_model_folder

TARGET = "Dataset991_SSLSyntheticPseudoLabeled"


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _use(root: Path, monkeypatch) -> None:
    for name in ("raw", "preprocessed", "results"):
        monkeypatch.setenv(f"nnUNet_{name}", str(root / name))


def _args(model: Path, work: Path, *extra: str) -> list[str]:
    return ["-d", "990", "-t", "991", "-o", str(work), "-m", str(model), "-device", "cpu", "--disable_tta",
            "-npp", "1", *extra]


@pytest.fixture()
def pseudolabelled(copy_planned, monkeypatch):
    root, ds = copy_planned["root"], copy_planned["dataset"]
    _use(root, monkeypatch)
    model = save_model_folder(root / "preprocessed" / ds, root / "results", folds=(0, 1), foreground_bias=2.0)
    before = {sub: tree_digest(root / sub / ds) for sub in ("raw", "preprocessed")}
    work = root / "work"
    assert main(_args(model, work, "--ignore-below", "0.6")) == 0
    return {"root": root, "ds": ds, "model": model, "work": work, "before": before}


def test_derived_dataset_scores_ignore_label_and_untouched_source(pseudolabelled, capsys):
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    root, ds, work = pseudolabelled["root"], pseudolabelled["ds"], pseudolabelled["work"]
    target = root / "raw" / TARGET
    source_json = json.loads((root / "raw" / ds / "dataset.json").read_text())
    derived = json.loads((target / "dataset.json").read_text())
    # the synthetic labels are 0, 1, 2: the ignore label is the next value
    assert derived["labels"] == {**source_json["labels"], "ignore": 3}
    provenance = json.loads((target / "pseudolabel.json").read_text())
    pool = sorted(p.name[: -len("_0000.nii.gz")] for p in (root / "raw" / ds / "imagesUnlabeled").iterdir())
    assert sorted(provenance["cases"]) == pool
    kept = provenance["pseudo_labeled_cases"]
    assert derived["numTraining"] == 8 + len(kept) and kept == sorted(
        c for c, r in provenance["cases"].items() if r["decision"] == "kept")
    assert [s["fold"] for s in provenance["sources"]] == [0, 1]
    verify_dataset_integrity(str(target), 1)  # nnU-Net's own check; raises on a broken dataset
    for case, record in provenance["cases"].items():
        # two folds, one checkpoint: agreement exists, stability cannot
        assert 0 <= record["agreement"] <= 1 and math.isnan(record["stability"])
        assert 0 < record["confidence"] <= 1 and 0 <= record["uncertainty"] <= 1
        label = read_image(work / "pseudo_labels" / f"{case}.nii.gz")[0]
        assert np.mean(label == 3) == pytest.approx(record["ignored_fraction"])
        probabilities = np.load(work / "probabilities" / f"{case}.npz")["probabilities"]
        assert probabilities.shape == (3, *label.shape)
        # the ignored voxels are exactly the ensemble's max-probability < 0.6
        assert np.array_equal(label == 3, probabilities.max(0) < 0.6)
        assert np.array_equal(label[label != 3], probabilities.argmax(0)[label != 3])
    for case in kept:
        image = target / "imagesTr" / f"{case}_0000.nii.gz"
        assert image.is_file() and not image.is_symlink()
        assert (target / "labelsTr" / f"{case}.nii.gz").read_bytes() == \
            (work / "pseudo_labels" / f"{case}.nii.gz").read_bytes()
    # labeled cases keep their own labels
    assert (target / "labelsTr" / "case_000.nii.gz").read_bytes() == \
        (root / "raw" / ds / "labelsTr" / "case_000.nii.gz").read_bytes()
    # splits: nnU-Net's default 5 folds of the 8 labeled cases, pseudo-labeled cases in training only
    splits = json.loads((root / "preprocessed" / TARGET / "splits_final.json").read_text())
    assert len(splits) == 5 and sorted(c for f in splits for c in f["val"]) == [f"case_{i:03d}" for i in range(8)]
    assert all(set(kept) <= set(f["train"]) and not set(kept) & set(f["val"]) for f in splits)
    plans = json.loads((root / "preprocessed" / TARGET / "nnUNetPlans.json").read_text())
    assert plans["dataset_name"] == TARGET and (root / "preprocessed" / TARGET / "dataset_fingerprint.json").is_file()
    # the source dataset, raw and preprocessed, is unchanged
    assert {sub: tree_digest(root / sub / ds) for sub in ("raw", "preprocessed")} == pseudolabelled["before"]
    with open(work / "scores.csv") as f:
        assert f.readline().startswith("case,agreement,stability,confidence,uncertainty,quality")
        assert len(f.readlines()) == len(pool)


def test_shards_resumption_and_refusals(pseudolabelled, capsys):
    root, model, work = pseudolabelled["root"], pseudolabelled["model"], pseudolabelled["work"]
    capsys.readouterr()
    # the same pool in two shards, then the merge: the same pseudo-labels and scores as in one go
    sharded = root / "sharded"
    first = _args(model, sharded, "--ignore-below", "0.6", "-t", "992", "--num-parts", "2")
    assert main([*first, "--part-id", "0"]) == 0
    out = capsys.readouterr().out
    assert "(2 in part 0 of 2, 2 to predict)" in out and "2 case(s) of other parts still to predict" in out
    assert not (root / "raw" / "Dataset992_SSLSyntheticPseudoLabeled").exists()
    assert main([*first, "--part-id", "1"]) == 0
    assert not (root / "raw" / "Dataset992_SSLSyntheticPseudoLabeled").exists()
    assert main(_args(model, sharded, "--ignore-below", "0.6", "-t", "992")) == 0
    assert "(4 in part 0 of 1, 0 to predict)" in capsys.readouterr().out
    for f in sorted((work / "scores").iterdir()):
        assert (sharded / "scores" / f.name).read_text() == f.read_text()
        case = f.name[:-5]
        assert np.array_equal(read_image(sharded / "pseudo_labels" / f"{case}.nii.gz")[0],
                              read_image(work / "pseudo_labels" / f"{case}.nii.gz")[0])
    # an interrupted prediction: only the missing case is predicted again
    (sharded / "scores" / "unl_001.json").unlink()
    assert main(_args(model, sharded, "--ignore-below", "0.6", "-t", "992", "--overwrite")) == 0
    assert "1 to predict" in capsys.readouterr().out
    # refusals: one line each, and nothing replaced
    stamp = (root / "raw" / TARGET / "dataset.json").stat().st_mtime_ns
    for extra, message in ((["--ignore-below", "0.6"], "exists; pass --overwrite"),
                           (["--ignore-below", "0.6", "-t", "990"], "is the source dataset's"),
                           (["--ignore-below", "0.9"], "was made with other voxels"),
                           (["--top-k", "0"], "--top-k must be at least 1")):
        assert main(_args(model, work, *extra)) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    assert (root / "raw" / TARGET / "dataset.json").stat().st_mtime_ns == stamp


def test_budget_split_pool_keeps_validation_real(copy_planned, monkeypatch, capsys):
    """With --split-fold the pool is the budget's unlabeled cases (plus imagesUnlabeled); the labeled and validation
    cases keep their labels, the validation stays validation, and a budget split without --split-fold is refused
    (it would hand the unlabeled cases' labels to the student)."""
    from helpers import save_untrained_quality_predictor, write_budget_splits

    root, ds = copy_planned["root"], copy_planned["dataset"]
    _use(root, monkeypatch)
    pp = root / "preprocessed" / ds
    write_budget_splits(pp, ["case_000", "case_001"], ["case_006", "case_007"],
                        [f"case_{i:03d}" for i in range(2, 6)])
    model = save_model_folder(pp, root / "results", folds=(0,), foreground_bias=2.0)
    quality, _ = save_untrained_quality_predictor(pp, root / "results")
    work = root / "work"
    assert main(_args(model, work, "--no-images-unlabeled")) == 2
    assert "pass --split-fold" in capsys.readouterr().err
    assert main(_args(model, work, "--split-fold", "0", "--no-images-unlabeled", "--top-k", "3",
                      "--rank-by", "confidence", "--link-images", "--quality-predictor", str(quality))) == 0
    target = root / "raw" / TARGET
    provenance = json.loads((target / "pseudolabel.json").read_text())
    assert sorted(provenance["cases"]) == [f"case_{i:03d}" for i in range(2, 6)]
    assert len(provenance["pseudo_labeled_cases"]) == 3
    # the quality predictor scored every case (an untrained one: any value in [0, 1], not all equal)
    q = [r["quality"] for r in provenance["cases"].values()]
    assert all(0 <= x <= 1 for x in q) and len(set(q)) > 1
    assert provenance["labeled_cases"] == ["case_000", "case_001", "case_006", "case_007"]
    derived = json.loads((target / "dataset.json").read_text())
    assert "ignore" not in derived["labels"]  # no voxel rule, no ignore label
    (fold,) = json.loads((root / "preprocessed" / TARGET / "splits_final.json").read_text())
    assert fold == {"train": sorted(["case_000", "case_001", *provenance["pseudo_labeled_cases"]]),
                    "val": ["case_006", "case_007"]}
    # a pseudo-labeled case's label is the prediction, not the true label it has in the source
    for case in provenance["pseudo_labeled_cases"]:
        assert (target / "imagesTr" / f"{case}_0000.nii.gz").is_symlink()
        assert (target / "labelsTr" / f"{case}.nii.gz").read_bytes() == \
            (work / "pseudo_labels" / f"{case}.nii.gz").read_bytes()
    # the highest-confidence cases were kept
    ranked = sorted(provenance["cases"], key=lambda c: -provenance["cases"][c]["confidence"])
    assert sorted(ranked[:3]) == provenance["pseudo_labeled_cases"]


def test_evidential_sources_score_dirichlet_uncertainty(copy_planned, monkeypatch):
    """Every source an evidential trainer (MEDL's network 1): the uncertainty score is the sources' mean Dirichlet
    K / S (softplus evidence + 1), not the softmax entropy of the ensemble."""
    import torch

    from nnunet_ssl.pseudolabel.predict import PoolPredictor, resolve_sources
    from nnunet_ssl.pseudolabel.scores import normalised_entropy

    root, ds = copy_planned["root"], copy_planned["dataset"]
    _use(root, monkeypatch)
    pp = root / "preprocessed" / ds
    plain = save_model_folder(pp, root / "results", folds=(0,), foreground_bias=2.0)
    medl = save_model_folder(pp, root / "results", folds=(0,), foreground_bias=2.0, trainer="nnUNetTrainerMEDL")
    work = root / "work"
    assert main(_args(medl, work, "--top-k", "1")) == 0
    records = [json.loads(p.read_text()) for p in sorted((work / "scores").glob("*.json"))]
    assert not PoolPredictor(resolve_sources([str(plain)], ["0"], ["checkpoint_final.pth"]),
                             torch.device("cpu"), use_mirroring=False).evidential
    for record in records:
        case = record["case"]
        p = np.load(work / "probabilities" / f"{case}.npz")["probabilities"]
        seg, _ = read_image(work / "pseudo_labels" / f"{case}.nii.gz")
        region = seg > 0 if (seg > 0).any() else np.ones(seg.shape, bool)
        entropy = float(normalised_entropy(p)[region].mean())
        assert 0 < record["uncertainty"] <= 1 and not math.isclose(record["uncertainty"], entropy, rel_tol=1e-3)
        assert record["uncertainty_measure"] == "dirichlet_total_uncertainty"
