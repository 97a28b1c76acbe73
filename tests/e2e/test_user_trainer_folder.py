"""The top-level ``trainers/`` folder: nnU-Net finds its example by name when ``nnUNet_extTrainer`` lists it after the
package's shim, and the example trains from the command line with background augmentation workers, under the
default start method and under spawn. A transform class defined in such a folder fails under spawn, as
trainers/README.md says."""

from __future__ import annotations

import json
import os
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import REPO, nnunet_env, run_cli
from helpers import case_ids, write_budget_splits

TRAINERS = REPO / "trainers"
EXAMPLE = "nnUNetTrainerMeanTeacherStrong"
CHANGED = {"unsupervised_weight": 3.0, "rampup_fraction": 0.4, "unlabeled_batch_size": 4, "ema_max_decay": 0.999}
# nnUNetv2_train with a forced start method; ``python -c`` has no main file for spawned children to re-run
FORCED_START = ("import multiprocessing, sys; multiprocessing.set_start_method(sys.argv.pop(1)); "
                "from nnunetv2.run.run_training import run_training_entry; run_training_entry()")


def ext_trainer(*folders: Path) -> str:
    """The package's folder first, then ``folders``: export nnUNet_extTrainer="$(nnUNetv2_ssl_trainers --path):..."."""
    shim = run_cli(["nnUNetv2_ssl_trainers", "--path"]).stdout.strip()
    return os.pathsep.join([shim, *map(str, folders)])


def train(root: Path, trainer: str, start_method: str | None, ext: str, check: bool = True):
    env = nnunet_env(root, training=True)
    env.update(nnUNet_extTrainer=ext, nnUNet_n_proc_DA="2", nnUNet_ssl_epochs="1", nnUNet_ssl_iterations_per_epoch="2",
               nnUNet_ssl_val_iterations="1", nnUNet_ssl_seed="0", OMP_NUM_THREADS="1")
    args = ["990", "3d_fullres", "0", "-tr", trainer, "-device", "cpu"]
    cmd = ["nnUNetv2_train", *args] if start_method is None else [sys.executable, "-c", FORCED_START, start_method,
                                                                  *args]
    return run_cli(cmd, env=env, check=check)


@pytest.fixture()
def budget(copy_planned) -> dict:
    """3 labeled, 3 unlabeled and 2 validation cases in fold 0 of a private copy of the synthetic dataset."""
    pp = copy_planned["root"] / "preprocessed" / copy_planned["dataset"]
    ids = case_ids(pp)
    write_budget_splits(pp, labeled=ids[:3], val=ids[3:5], unlabeled=ids[5:])
    return copy_planned


def test_example_is_found_by_name(monkeypatch):
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    from nnunet_ssl.trainers import nnUNetTrainerMeanTeacher

    monkeypatch.setenv("nnUNet_extTrainer", ext_trainer(TRAINERS))
    cls = recursive_find_trainer_class_by_name(EXAMPLE)
    assert cls.__name__ == EXAMPLE and issubclass(cls, nnUNetTrainerMeanTeacher) and cls is not nnUNetTrainerMeanTeacher
    for name, value in CHANGED.items():
        assert getattr(cls, name) == value != getattr(nnUNetTrainerMeanTeacher, name), name
    # the package's trainers still come from the package (the shim folder is searched first)
    assert recursive_find_trainer_class_by_name("nnUNetTrainerMeanTeacher") is nnUNetTrainerMeanTeacher
    # nnU-Net imported the example as a top-level module and dropped it again (what trainers/README.md describes)
    assert cls.__module__ == "my_ssl_trainers" and "my_ssl_trainers" not in sys.modules
    assert str(TRAINERS) not in sys.path


@pytest.mark.slow
@pytest.mark.parametrize("start_method", [None, "spawn"], ids=["default", "spawn"])
def test_example_trains_with_background_workers(budget, start_method):
    root = budget["root"]
    proc = train(root, EXAMPLE, start_method, ext_trainer(TRAINERS))
    assert f"Using trainer '{EXAMPLE}' from: {TRAINERS}" in proc.stdout
    out = root / "results" / budget["dataset"] / f"{EXAMPLE}__nnUNetPlans__3d_fullres" / "fold_0"
    final = torch.load(out / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert final["trainer_name"] == EXAMPLE and final["current_epoch"] == 1
    # the changed batch size (the planned labeled batch is 2) and the background workers took effect
    assert "unlabeled pool: 3 cases, 4 per step and rank" in proc.stdout
    debug = json.loads((out / "debug.json").read_text())
    assert debug["dataloader_train.num_processes"] == "2" and "NonDetMultiThreadedAugmenter" in debug["dataloader_val"]
    assert any("unlabeled" in k and "NonDetMultiThreadedAugmenter" in v for k, v in debug.items())
    for name, value in CHANGED.items():
        assert debug[name] == str(value), name


@pytest.mark.slow
def test_transform_class_in_the_folder_fails_under_spawn(budget, tmp_path):
    """The one thing that breaks: a class in a folder module that the workers receive (here a transform)."""
    folder = tmp_path / "user_trainers"
    folder.mkdir()
    (folder / "user_transform_trainer.py").write_text(textwrap.dedent("""
        from batchgeneratorsv2.transforms.base.basic_transform import ImageOnlyTransform
        from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms

        from nnunet_ssl.trainers import nnUNetTrainerMeanTeacher


        class IdentityTransform(ImageOnlyTransform):
            def _apply_to_image(self, img, **params):
                return img


        class nnUNetTrainerMeanTeacherOwnTransform(nnUNetTrainerMeanTeacher):
            @staticmethod
            def get_training_transforms(*args, **kwargs):
                pipeline = nnUNetTrainerMeanTeacher.get_training_transforms(*args, **kwargs)
                return ComposeTransforms([*pipeline.transforms, IdentityTransform()])
        """))
    proc = train(budget["root"], "nnUNetTrainerMeanTeacherOwnTransform", "spawn", ext_trainer(TRAINERS, folder),
                 check=False)
    assert proc.returncode != 0
    # Python 3.11: "_pickle.PicklingError: Can't pickle <class 'user_transform_trainer.IdentityTransform'>: import of
    # module 'user_transform_trainer' failed"
    assert "PicklingError" in proc.stderr and "user_transform_trainer.IdentityTransform" in proc.stderr
    assert "Epoch 0" not in proc.stdout  # it fails while starting the workers, before the first step
    # (this also shows that FORCED_START really switches to spawn: under fork the same trainer trains)
