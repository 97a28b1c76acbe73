"""The demo's command lines and environments, and the shell script that redoes them by hand."""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from nnunet_ssl.demo.settings import CONFIGURATION, FOLD, NUM_PROCESSES, TRAINERS, VAL_ITERATIONS


def demo_environment(workdir: Path, epochs: int, iterations: int, seed: int) -> tuple[dict[str, str], dict[str, str]]:
    """(environment for planning and preprocessing, environment for training)."""
    from nnunet_ssl import ext_trainer_path

    env = dict(os.environ)
    env.update(
        nnUNet_raw=str(workdir / "nnUNet_raw"),
        nnUNet_preprocessed=str(workdir / "nnUNet_preprocessed"),
        nnUNet_results=str(workdir / "nnUNet_results"),
        nnUNet_def_n_proc=str(NUM_PROCESSES),
        nnUNet_compile="f",  # torch.compile costs minutes on a CPU and gains nothing in a short run
        nnUNet_extTrainer=ext_trainer_path(),
        PYTHONUNBUFFERED="1",  # so that epoch lines reach us while they happen
    )
    # OpenMP threads that spin while waiting make torch 3-4x slower on a busy 2-core machine (measured)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # nnU-Net's planner breaks with nnUNet_n_proc_DA=0, so it is set for training only
    env.pop("nnUNet_n_proc_DA", None)
    train_env = dict(env)
    train_env.update(
        nnUNet_n_proc_DA="0",  # data augmentation in the main process: worker processes only cost time on 2 cores
        nnUNet_ssl_epochs=str(epochs),
        nnUNet_ssl_iterations_per_epoch=str(iterations),
        nnUNet_ssl_val_iterations=str(VAL_ITERATIONS),
        nnUNet_ssl_seed=str(seed),
    )
    return env, train_env


def commands(dataset_id: int, num_labeled: int, seed: int, with_unlabeled: bool) -> dict[str, list[str]]:
    """The command lines of every stage, by stage name, with bare command names (resolved when run)."""
    d = str(dataset_id)
    out = {"plan": ["nnUNetv2_plan_and_preprocess", "-d", d, "-c", CONFIGURATION, "-np", str(NUM_PROCESSES),
                    "-npfp", str(NUM_PROCESSES)]}
    if with_unlabeled:
        out["unlabeled"] = ["nnUNetv2_ssl_preprocess_unlabeled", "-d", d, "-c", CONFIGURATION, "-np",
                            str(NUM_PROCESSES)]
    out["splits"] = ["nnUNetv2_ssl_make_splits", "-d", d, "--num-labeled", str(num_labeled), "--seed", str(seed)]
    for trainer in TRAINERS:
        out[trainer] = ["nnUNetv2_train", d, CONFIGURATION, str(FOLD), "-tr", trainer, "-device", "cpu"]
    return out


def reproduce_script(env: dict[str, str], train_env: dict[str, str], cmds: dict[str, list[str]]) -> str:
    """Shell lines that redo the demo by hand, with the same environment."""
    def export(names: Sequence[str], source: dict[str, str]) -> str:
        return "export " + " ".join(f"{n}={shlex.quote(source[n])}" for n in names)

    bin_dir = shlex.quote(str(Path(sys.executable).parent))
    lines = [
        f"export PATH={bin_dir}:\"$PATH\"",
        export(("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"), env),
        export(("nnUNet_def_n_proc", "nnUNet_compile", "OMP_WAIT_POLICY"), env),
        'export nnUNet_extTrainer="$(nnUNetv2_ssl_trainers --path)"',
        "unset nnUNet_n_proc_DA  # the planner breaks with nnUNet_n_proc_DA=0",
    ]
    lines += [shlex.join(cmds[k]) for k in ("plan", "unlabeled", "splits") if k in cmds]
    lines.append(export(("nnUNet_n_proc_DA", "nnUNet_ssl_epochs", "nnUNet_ssl_iterations_per_epoch",
                         "nnUNet_ssl_val_iterations", "nnUNet_ssl_seed"), train_env))
    lines += [shlex.join(cmds[t]) for t in TRAINERS]
    return "\n".join(lines) + "\n"
