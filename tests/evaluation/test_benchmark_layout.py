"""The benchmark folder's layout: the run matrix, each run's paths, the stored settings and their merging, and the
JSON conversion of nnU-Net's logs (``nnunet_ssl.evaluation.benchmark_layout``)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict

import numpy as np
import pytest
import torch

from nnunet_ssl.errors import SSLInputError
from nnunet_ssl.evaluation.benchmark_layout import (
    BASELINE,
    SETTINGS_FILE,
    BenchmarkSettings,
    Paths,
    Run,
    jsonable,
    load_or_store_settings,
    load_settings,
    run_matrix,
)


def _settings(**changes) -> BenchmarkSettings:
    s = BenchmarkSettings("Dataset004_Hippocampus", "3d_fullres", 0, "nnUNetPlans_CPU", ["MT", "FM"], [3, 10], [0, 1],
                          True, 20, 100, 10, ["c1"])
    for k, v in changes.items():
        setattr(s, k, v)
    return s


def test_run_matrix_order_baseline_then_each_trainer_then_full():
    runs = run_matrix(_settings(trainers=["MT", BASELINE, "FM", "MT"]))
    assert [(r.trainer, r.budget, r.seed) for r in runs] == [
        (BASELINE, "3", 0), (BASELINE, "10", 0), (BASELINE, "3", 1), (BASELINE, "10", 1),
        ("MT", "3", 0), ("MT", "10", 0), ("MT", "3", 1), ("MT", "10", 1),
        ("FM", "3", 0), ("FM", "10", 0), ("FM", "3", 1), ("FM", "10", 1),
        (BASELINE, "all", 0), (BASELINE, "all", 1)]
    assert runs[-1].label == f"{BASELINE} | all labels | seed 1" and runs[4].label == "MT | 3 labeled | seed 0"


def test_paths_of_a_run(tmp_path):
    p = Paths(tmp_path, Run("MT", "10", 1), _settings())
    ws = tmp_path / "runs" / "labeled_10" / "seed_1"
    assert p.model == ws / "nnUNet_results" / "Dataset004_Hippocampus" / "MT__nnUNetPlans_CPU__3d_fullres" / "fold_0"
    assert (p.evaluation, p.predictions, p.training_stages) == (ws / "test_evaluation" / "MT",
                                                                ws / "test_predictions" / "MT",
                                                                ws / "logs" / "provenance_MT.json")
    assert Paths(tmp_path, Run(BASELINE, "all", 0), _settings()).workspace == tmp_path / "runs" / "all" / "seed_0"
    assert not p.done
    p.evaluation.mkdir(parents=True)
    (p.evaluation / "summary.json").write_text("{}")
    assert p.done


def test_settings_grow_by_union_and_fixed_settings_are_kept(tmp_path):
    load_or_store_settings(tmp_path, _settings(), store=False)
    assert not (tmp_path / SETTINGS_FILE).exists()
    load_or_store_settings(tmp_path, _settings())
    load_or_store_settings(tmp_path, _settings(trainers=["CPS", "MT"], budgets=[5], seeds=[2, 0], full=False))
    stored = load_settings(tmp_path)
    assert (stored.trainers, stored.budgets, stored.seeds, stored.full) == (["MT", "FM", "CPS"], [3, 10, 5],
                                                                             [0, 1, 2], True)
    before = (tmp_path / SETTINGS_FILE).read_text()
    with pytest.raises(SSLInputError, match="other settings .epochs: 20 there, 5 now"):
        load_or_store_settings(tmp_path, _settings(epochs=5))
    assert (tmp_path / SETTINGS_FILE).read_text() == before
    assert json.loads(before)["epochs"] == 20 and asdict(stored)["nsd_tolerance_mm"] == 1.0


def test_jsonable_turns_numpy_torch_and_non_finite_values_into_json():
    log = {"train_losses": [np.float32(-0.5), torch.tensor(0.25)], "mean_fg_dice": (0.1, math.nan),
           1: np.array([1, 2]), "when": np.datetime64("2026-01-01"), "none": None}
    assert jsonable(log) == {"train_losses": [-0.5, 0.25], "mean_fg_dice": [0.1, None], "1": [1, 2],
                             "when": "2026-01-01", "none": None}
    json.dumps(jsonable(log), allow_nan=False)
