"""The demo's workflow: the whole semi-supervised pipeline on a small dataset, in a few minutes on a CPU.

It builds a synthetic 3D dataset (or copies a raw nnU-Net dataset given with ``raw``) into a work folder, points
nnU-Net's three folders there, and runs the same commands a user would run: plan and preprocess, preprocess the
unlabeled images, simulate a label budget, then train the supervised baseline and Mean Teacher on fold 0. It ends
with a side-by-side table of validation Dice. Every command runs as a subprocess with its output streamed into a
log file of the work folder, so a failure shows exactly what a user would see. The command line is
:mod:`nnunet_ssl.cli.demo` (``nnUNetv2_ssl_demo``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from nnunet_ssl.demo.commands import commands, demo_environment, reproduce_script
from nnunet_ssl.demo.results import format_table, label_names, load_dice, trainer_folder
from nnunet_ssl.demo.settings import (
    CONFIGURATION,
    FOLD,
    PLANS,
    SYNTHETIC_CASES,
    SYNTHETIC_ID,
    TRAINERS,
    UNLABELED_SUBFOLDER,
    VAL_ITERATIONS,
)
from nnunet_ssl.demo.workdir import DemoError, check_raw_dataset, prepare_workdir
from nnunet_ssl.evaluation.stages import Clock, EchoFilter, TrainingReporter, run_stage, say


def check_options(num_labeled: int, epochs: int, iterations: int, seed: int) -> None:
    """Refuses counts below their minimum (DemoError naming the flag)."""
    for flag, value, minimum in (("--num-labeled", num_labeled, 1), ("--epochs", epochs, 1),
                                 ("--iterations", iterations, 1), ("--seed", seed, 0)):
        if value < minimum:
            raise DemoError(f"{flag} must be at least {minimum}, got {value}")


def _stage_header(clock: Clock, number: int, total: int, text: str) -> None:
    say(f"{clock.stamp()} {number}/{total} {text}")


def run_demo(raw: Path | None, workdir: Path, num_labeled: int, epochs: int, iterations: int, seed: int,
             keep: bool) -> int:
    """Runs the demo in ``workdir`` and prints its progress and result table; returns 0. Raises DemoError for bad
    input, StageFailed when a command fails and CommandNotFound when a console script is missing."""
    clock = Clock()
    check_options(num_labeled, epochs, iterations, seed)
    workdir = workdir.expanduser().absolute()
    if raw is not None:
        dataset_id, dataset_name = check_raw_dataset(raw.expanduser().absolute(), workdir)
    else:
        dataset_id, dataset_name = SYNTHETIC_ID, f"Dataset{SYNTHETIC_ID:03d}_SSLSynthetic"
    prepare_workdir(workdir, keep)
    logs = workdir / "logs"
    raw_dataset = workdir / "nnUNet_raw" / dataset_name
    say(f"nnunet-ssl demo in {workdir} ({epochs} epochs x {iterations} iterations per trainer, "
        f"{num_labeled} labeled cases, seed {seed})")

    # 1. the dataset
    total = 6
    if raw is None:
        _stage_header(clock, 1, total, "synthetic dataset ...")
        if keep and (raw_dataset / "dataset.json").is_file():
            say("          kept from an earlier run")
        else:
            from nnunet_ssl.demo.synthetic import make_synthetic_dataset

            make_synthetic_dataset(workdir / "nnUNet_raw", dataset_id=SYNTHETIC_ID, seed=seed, **SYNTHETIC_CASES)
            say(f"          {raw_dataset} ({SYNTHETIC_CASES['num_train']} labeled, "
                f"{SYNTHETIC_CASES['num_unlabeled']} unlabeled images, shape {SYNTHETIC_CASES['shape']})")
    else:
        _stage_header(clock, 1, total, f"copy {raw} ...")
        if keep and (raw_dataset / "dataset.json").is_file():
            say("          kept from an earlier run")
        else:
            shutil.copytree(raw, raw_dataset, symlinks=False)
            say(f"          -> {raw_dataset}")
    unlabeled_folder = raw_dataset / UNLABELED_SUBFOLDER
    with_unlabeled = unlabeled_folder.is_dir() and any(unlabeled_folder.iterdir())

    env, train_env = demo_environment(workdir, epochs, iterations, seed)
    cmds = commands(dataset_id, num_labeled, seed, with_unlabeled)
    reproduce = reproduce_script(env, train_env, cmds)
    script = workdir / "reproduce.sh"
    script.write_text("#!/usr/bin/env bash\n# the demo's commands, to run by hand\nset -euo pipefail\n" + reproduce)
    script.chmod(0o755)

    # 2.-4. preprocessing and the label budget
    pp_dataset = workdir / "nnUNet_preprocessed" / dataset_name
    planned = (pp_dataset / f"{PLANS}.json").is_file() and (pp_dataset / f"{PLANS}_{CONFIGURATION}").is_dir()
    _stage_header(clock, 2, total, "nnUNetv2_plan_and_preprocess ...")
    if keep and planned:
        say("          kept from an earlier run")
    else:
        run_stage(cmds["plan"], env, logs / "1_plan_and_preprocess.log", workdir)
    _stage_header(clock, 3, total, "nnUNetv2_ssl_preprocess_unlabeled ...")
    if with_unlabeled:
        run_stage(cmds["unlabeled"], env, logs / "2_preprocess_unlabeled.log", workdir,
                  EchoFilter(r"processed"))
    else:
        say(f"          skipped: no images in {unlabeled_folder}; Mean Teacher uses the unlabeled part of the split")
    _stage_header(clock, 4, total, f"nnUNetv2_ssl_make_splits --num-labeled {num_labeled} ...")
    run_stage(cmds["splits"], env, logs / "3_make_splits.log", workdir,
              EchoFilter(r"^\s*(fold|0)\s"))

    # 5.-6. the two trainings
    settings = {"epochs": epochs, "iterations": iterations, "val_iterations": VAL_ITERATIONS,
                "seed": seed, "num_labeled": num_labeled}
    pools: dict[str, int | None] = {}
    for number, trainer in enumerate(TRAINERS, start=5):
        short = trainer.removeprefix("nnUNetTrainer")
        _stage_header(clock, number, total, f"nnUNetv2_train -tr {trainer} (fold {FOLD}, cpu) ...")
        done_file = logs / f"{trainer}.done.json"
        summary = trainer_folder(workdir, dataset_name, trainer) / "validation" / "summary.json"
        done = json.loads(done_file.read_text()) if done_file.is_file() else {}
        if keep and summary.is_file() and done.get("settings") == settings:
            say("          kept from an earlier run with the same settings")
            pools[trainer] = done.get("unlabeled_pool")
            continue
        done_file.unlink(missing_ok=True)
        start = clock.elapsed()
        reporter = TrainingReporter(short, epochs, clock, fold=FOLD)
        run_stage(cmds[trainer], train_env, logs / f"{number - 1}_train_{short}.log", workdir, reporter)
        pools[trainer] = reporter.unlabeled_pool
        # what --keep compares before it reuses this training
        done_file.write_text(json.dumps({"settings": settings, "unlabeled_pool": reporter.unlabeled_pool}))
        say(f"{clock.stamp()}   {short} done in {clock.elapsed() - start:.0f} s")

    # the report
    results = {}
    for trainer in TRAINERS:
        summary = trainer_folder(workdir, dataset_name, trainer) / "validation" / "summary.json"
        results[trainer] = load_dice(summary)
    names = label_names(json.loads((raw_dataset / "dataset.json").read_text()))
    splits = json.loads((pp_dataset / "splits_final.json").read_text())[FOLD]
    n_val, n_lab = len(splits["val"]), len(splits["train"])
    pool = pools.get("nnUNetTrainerMeanTeacher")
    pool_text = f"{pool} unlabeled cases" if pool is not None else "the unlabeled cases"
    say()
    say(f"Validation Dice, fold {FOLD} ({n_val} cases). Both trainers used {n_lab} labeled cases; Mean Teacher "
        f"also {pool_text}.")
    say(format_table(results, names))
    say()
    say("Training curves:")
    for trainer in TRAINERS:
        folder = trainer_folder(workdir, dataset_name, trainer)
        for png in ("progress.png", "progress_ssl.png"):
            if (folder / png).is_file():
                say(f"  {folder / png}")
    say()
    say(f"Note: this is a short CPU demo ({epochs} epochs x {iterations} iterations instead of nnU-Net's "
        "1000 x 250, one fold, few validation cases), not a benchmark; its numbers are noisy and say nothing about "
        "how the methods compare on real data.")
    say()
    say(f"How to reproduce by hand (also in {script}):")
    for line in reproduce.splitlines():
        say(f"  {line}")
    say(f"Logs: {logs}")
    say(f"{clock.stamp()} demo finished")
    return 0
