"""Rounds of offline pseudo-labelling: teacher -> pseudo-labels -> student, the student teaching the next round.

Round ``r`` (1-based) writes dataset ``target_id + r - 1`` (``<name>Round<r>``) from the work folder
``<work>/round_<r>``, preprocesses it with the teacher's plans (``nnUNetv2_preprocess``) and trains the student on
it (``nnUNetv2_train``), from scratch or from the teacher's weights (``-pretrained_weights``). Round 1's teacher is
the given models; round r's is round r-1's student. Every step is recognised from its files, so rerunning the
same command after an interruption continues where it stopped (a training with ``--c``).
"""

from __future__ import annotations

import copy
import json
import os
import time
from pathlib import Path

import torch

from nnunet_ssl.errors import SSLInputError
from nnunet_ssl.evaluation.stages import Clock, StageFailed, TrainingReporter, run_stage
from nnunet_ssl.pseudolabel.pipeline import PseudoLabelSettings, pseudolabel, target_dataset_name

DONE = "dataset.done"
PREPROCESSED = "preprocessed.done"
INITS = ("scratch", "teacher")


def _environment() -> dict[str, str]:
    from nnunet_ssl.uncertainty.predict_uncertainty import ensure_ext_trainers_visible

    ensure_ext_trainers_visible()  # nnUNetv2_train must find our trainers too
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


def student_folder(results_root: Path, dataset: str, trainer: str, plans: str, configuration: str) -> Path:
    return results_root / dataset / f"{trainer}__{plans}__{configuration}"


def run_rounds(s: PseudoLabelSettings, rounds: int, trainer: str, configuration: str, fold: int, init: str,
               device: str, epochs: int | None = None) -> Path:
    """Runs (or resumes) ``rounds`` rounds; returns the last student's model folder (``.../fold_<fold>``)."""
    from nnunet_ssl.data import datasets

    if rounds < 1:
        raise SSLInputError(f"--rounds must be at least 1, got {rounds}")
    if init not in INITS:
        raise SSLInputError(f"--student-init must be one of {', '.join(INITS)}, got {init!r}")
    results_root = Path(datasets.require_env("nnUNet_results"))
    source = datasets.resolve_dataset_name(s.dataset)
    plans = json.loads((Path(s.model_folders[0]) / "plans.json").read_text())["plans_name"]
    env = _environment()
    clock = Clock()
    teacher = copy.deepcopy(s)
    model = Path()
    for r in range(1, rounds + 1):
        rs = copy.deepcopy(teacher)
        rs.work = str(Path(s.work) / f"round_{r}")
        rs.target_id = s.target_id + r - 1
        rs.target_name = f"{s.target_name or source[11:] + 'PseudoLabeled'}Round{r}"
        target = target_dataset_name(rs.target_id, rs.target_name, source)
        work = Path(rs.work)
        print(f"{clock.stamp()} round {r}/{rounds}: teacher {', '.join(rs.model_folders)} -> {target}", flush=True)
        if not (work / DONE).is_file():
            # a dataset of this round written before an interruption is ours to replace
            rs.overwrite = True
            pseudolabel(rs, torch.device(device))
            (work / DONE).write_text(time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        logs = work / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        try:
            if not (work / PREPROCESSED).is_file():
                print(f"{clock.stamp()}   preprocessing {target} with plans {plans}", flush=True)
                run_stage(["nnUNetv2_preprocess", "-d", str(rs.target_id), "-plans_name", plans, "-c", configuration,
                           "-np", str(max(1, s.num_processes))], env, logs / "preprocess.log", work)
                (work / PREPROCESSED).write_text(time.strftime("%Y-%m-%dT%H:%M:%S%z"))
            model = student_folder(results_root, target, trainer, plans, configuration) / f"fold_{fold}"
            if not (model / "checkpoint_final.pth").is_file():
                train = ["nnUNetv2_train", str(rs.target_id), configuration, str(fold), "-tr", trainer, "-p", plans,
                         "-device", device]
                if (model / "checkpoint_latest.pth").is_file():
                    train.append("--c")
                elif init == "teacher":
                    first = rs.model_folders[0]
                    fold0 = rs.folds[0] if rs.folds else fold
                    train += ["-pretrained_weights", str(Path(first) / f"fold_{fold0}" / rs.checkpoints[-1])]
                print(f"{clock.stamp()}   training the student {trainer} on {target} fold {fold}", flush=True)
                run_stage(train, env, logs / "train.log", work, TrainingReporter(
                    trainer, epochs or int(os.environ.get("nnUNet_ssl_epochs") or 1000), clock, fold))
        except StageFailed as e:
            raise SSLInputError(f"round {r}: {e} (log: {e.log}); fix the cause and rerun the same command to "
                                "resume") from None
        teacher = copy.deepcopy(s)
        teacher.model_folders = [str(model.parent)]
        teacher.folds = [str(fold)]
        teacher.checkpoints = ["checkpoint_final.pth"]
    print(f"{clock.stamp()} {rounds} round(s) done; last student: {model}", flush=True)
    return model
