from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HIPPOCAMPUS = REPO.parent / "shared" / "data" / "Dataset004_Hippocampus"
BIN = Path(sys.executable).parent

# CPU-friendly settings for every nnU-Net process the tests start
os.environ.setdefault("nnUNet_def_n_proc", "2")
os.environ.setdefault("nnUNet_compile", "f")


def run_cli(args: list[str], env: dict[str, str] | None = None, check: bool = True, timeout: int = 900):
    """Runs a console script of the test venv and returns the CompletedProcess (stdout and stderr captured)."""
    exe = str(BIN / args[0]) if (BIN / args[0]).exists() else args[0]
    proc = subprocess.run([exe, *args[1:]], env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def lower_batch_size(pp_dataset: Path, batch_size: int = 2, configuration: str = "3d_fullres") -> None:
    """Lowers the planned batch size of nnU-Net's own plans: its Hippocampus plans use 9, about 10 s per training
    iteration on 2 CPU cores, and the real-data tests check the pipeline, not the batch."""
    plans_file = pp_dataset / "nnUNetPlans.json"
    plans = json.loads(plans_file.read_text())
    plans["configurations"][configuration]["batch_size"] = batch_size
    plans_file.write_text(json.dumps(plans, indent=1))


def nnunet_env(root: Path, training: bool = True) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        nnUNet_raw=str(root / "raw"),
        nnUNet_preprocessed=str(root / "preprocessed"),
        nnUNet_results=str(root / "results"),
        nnUNet_def_n_proc="2",
        nnUNet_compile="f",
    )
    # the planner breaks on nnUNet_n_proc_DA=0, training on CPU wants it
    if training:
        env["nnUNet_n_proc_DA"] = "0"
    else:
        env.pop("nnUNet_n_proc_DA", None)
    ext = subprocess.run([str(BIN / "nnUNetv2_ssl_trainers"), "--path"], capture_output=True, text=True)
    if ext.returncode == 0:
        env["nnUNet_extTrainer"] = ext.stdout.strip()
    return env


@pytest.fixture(scope="session")
def synthetic_planned(tmp_path_factory) -> dict:
    """A synthetic dataset (id 990), planned and preprocessed for 3d_fullres once per test session.
    Tests that modify it must copy the folders first (see ``copy_planned``)."""
    from nnunet_ssl.demo.synthetic import make_synthetic_dataset

    root = tmp_path_factory.mktemp("synthetic")
    make_synthetic_dataset(root / "raw", dataset_id=990, num_train=8, num_unlabeled=4, num_test=2,
                           shape=(16, 32, 32))
    env = nnunet_env(root, training=False)
    run_cli(["nnUNetv2_plan_and_preprocess", "-d", "990", "-c", "3d_fullres", "-np", "2", "-npfp", "2"], env=env)
    return {"root": root, "dataset": "Dataset990_SSLSynthetic", "id": 990}


@pytest.fixture()
def copy_planned(synthetic_planned, tmp_path) -> dict:
    """A private copy of the planned synthetic dataset that a test may change."""
    for sub in ("raw", "preprocessed"):
        shutil.copytree(synthetic_planned["root"] / sub, tmp_path / sub)
    (tmp_path / "results").mkdir()
    return {**synthetic_planned, "root": tmp_path}
