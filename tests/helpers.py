"""Shared helpers for tests that build trainers in-process."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from batchgenerators.utilities.file_and_folder_operations import load_json


def write_budget_splits(pp_dataset: Path, labeled: list[str], val: list[str], unlabeled: list[str]) -> None:
    (pp_dataset / "splits_final.json").write_text(
        json.dumps([{"train": labeled, "val": val, "unlabeled": unlabeled}], indent=1))


def make_trainer(cls, root: Path, dataset: str, monkeypatch, fold: int = 0, configuration: str = "3d_fullres",
                 seed: int | None = 0, epochs: int | str = 2, iterations: int = 2, continue_training: bool = False):
    """A trainer built as nnUNetv2_train builds it, with the nnU-Net folders of ``root``."""
    monkeypatch.setenv("nnUNet_raw", str(root / "raw"))
    monkeypatch.setenv("nnUNet_preprocessed", str(root / "preprocessed"))
    monkeypatch.setenv("nnUNet_results", str(root / "results"))
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    monkeypatch.setenv("nnUNet_ssl_epochs", str(epochs))
    monkeypatch.setenv("nnUNet_ssl_iterations_per_epoch", str(iterations))
    monkeypatch.setenv("nnUNet_ssl_val_iterations", "1")
    if seed is None:
        monkeypatch.delenv("nnUNet_ssl_seed", raising=False)
    else:
        monkeypatch.setenv("nnUNet_ssl_seed", str(seed))
    pp = root / "preprocessed" / dataset
    plans = load_json(str(pp / "nnUNetPlans.json"))
    plans["continue_training"] = continue_training
    return cls(plans, configuration, fold, load_json(str(pp / "dataset.json")), torch.device("cpu"))


def case_ids(pp_dataset: Path) -> list[str]:
    return sorted(p.name[: -len(".b2nd")] for p in (pp_dataset / "nnUNetPlans_3d_fullres").glob("*.b2nd")
                  if not p.name.endswith("_seg.b2nd"))
