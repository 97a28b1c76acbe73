"""The demo's engine without running nnU-Net: its work folder, the user's raw dataset, its commands and environment,
and the result table."""

from __future__ import annotations

import json
import shlex
import sys

import pytest

from nnunet_ssl.demo.commands import commands, demo_environment, reproduce_script
from nnunet_ssl.demo.results import format_table, label_names, load_dice, trainer_folder
from nnunet_ssl.demo.run_demo import check_options, run_demo
from nnunet_ssl.demo.settings import MARKER, WORK_SUBFOLDERS
from nnunet_ssl.demo.workdir import DemoError, check_raw_dataset, prepare_workdir


def test_prepare_workdir_cleans_only_what_the_demo_made(tmp_path):
    work = tmp_path / "work"
    prepare_workdir(work, keep=False)
    assert (work / MARKER).is_file() and all((work / sub).is_dir() for sub in WORK_SUBFOLDERS)
    # the user's own file in the folder and the target of a link survive a rebuild
    (work / "notes.txt").write_text("mine")
    (work / "nnUNet_raw" / "old").mkdir()
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "keep.txt").write_text("x")
    (work / "logs").rmdir()
    (work / "logs").symlink_to(target)
    prepare_workdir(work, keep=True)
    assert (work / "nnUNet_raw" / "old").is_dir() and (work / "logs").is_symlink()
    prepare_workdir(work, keep=False)
    assert (work / "notes.txt").read_text() == "mine" and not (work / "nnUNet_raw" / "old").exists()
    assert (target / "keep.txt").is_file() and (work / "logs").is_dir() and not (work / "logs").is_symlink()


def test_prepare_workdir_refuses_folders_it_did_not_make(tmp_path):
    (tmp_path / "data.txt").write_text("user data")
    with pytest.raises(DemoError, match="is not empty and was not made by nnUNetv2_ssl_demo"):
        prepare_workdir(tmp_path, keep=False)
    assert (tmp_path / "data.txt").read_text() == "user data" and not (tmp_path / MARKER).exists()
    with pytest.raises(DemoError, match="exists and is not a folder"):
        prepare_workdir(tmp_path / "data.txt", keep=False)


def test_check_raw_dataset(tmp_path):
    raw = tmp_path / "Dataset004_Hippo"
    for sub in ("imagesTr", "labelsTr"):
        (raw / sub).mkdir(parents=True)
    with pytest.raises(DemoError, match="has no dataset.json"):
        check_raw_dataset(raw, tmp_path / "work")
    (raw / "dataset.json").write_text("{}")
    assert check_raw_dataset(raw, tmp_path / "work") == (4, "Dataset004_Hippo")
    with pytest.raises(DemoError, match="lies inside the work folder"):
        check_raw_dataset(raw, tmp_path)
    (tmp_path / "Dataset4_Short").mkdir()
    with pytest.raises(DemoError, match="three digits"):
        check_raw_dataset(tmp_path / "Dataset4_Short", tmp_path / "work")
    with pytest.raises(DemoError, match="is not a folder"):
        check_raw_dataset(tmp_path / "missing", tmp_path / "work")


@pytest.mark.parametrize("flag, values", [("--num-labeled", (0, 1, 1, 0)), ("--epochs", (1, 0, 1, 0)),
                                          ("--iterations", (1, 1, 0, 0)), ("--seed", (1, 1, 1, -1))])
def test_options_below_their_minimum_are_refused_before_anything_is_made(flag, values, tmp_path):
    with pytest.raises(DemoError, match=f"^{flag} must be at least"):
        check_options(*values)
    with pytest.raises(DemoError, match=f"^{flag} must be at least"):
        run_demo(None, tmp_path / "work", *values, keep=False)
    assert not (tmp_path / "work").exists()


def test_commands_environment_and_reproduce_script(tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_n_proc_DA", "4")
    env, train_env = demo_environment(tmp_path, epochs=3, iterations=7, seed=5)
    # the planner breaks with nnUNet_n_proc_DA=0: only training gets it
    assert "nnUNet_n_proc_DA" not in env and train_env["nnUNet_n_proc_DA"] == "0"
    assert (train_env["nnUNet_ssl_epochs"], train_env["nnUNet_ssl_iterations_per_epoch"],
            train_env["nnUNet_ssl_seed"]) == ("3", "7", "5")
    assert env["nnUNet_results"] == str(tmp_path / "nnUNet_results") and env["nnUNet_compile"] == "f"
    cmds = commands(990, num_labeled=4, seed=5, with_unlabeled=False)
    assert list(cmds) == ["plan", "splits", "nnUNetTrainerSupervised", "nnUNetTrainerMeanTeacher"]
    assert cmds["splits"] == ["nnUNetv2_ssl_make_splits", "-d", "990", "--num-labeled", "4", "--seed", "5"]
    assert cmds["nnUNetTrainerMeanTeacher"] == ["nnUNetv2_train", "990", "3d_fullres", "0", "-tr",
                                                "nnUNetTrainerMeanTeacher", "-device", "cpu"]
    assert "unlabeled" in commands(990, 4, 5, with_unlabeled=True)
    script = reproduce_script(env, train_env, cmds).splitlines()
    assert script[0] == f'export PATH={shlex.quote(str(sys.executable.rsplit("/", 1)[0]))}:"$PATH"'
    assert shlex.join(cmds["plan"]) in script and script[-1] == shlex.join(cmds["nnUNetTrainerMeanTeacher"])
    assert "nnUNet_ssl_epochs=3" in script[-3] and "nnUNet_n_proc_DA=0" in script[-3]


def test_result_table_by_hand(tmp_path):
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps({"foreground_mean": {"Dice": 0.5}, "mean": {"1": {"Dice": 0.6}, "2": {"Dice": 0.4}}}))
    supervised = load_dice(summary)
    assert supervised == {"foreground mean": 0.5, "1": 0.6, "2": 0.4}
    names = label_names({"labels": {"background": 0, "anterior": 1, "posterior": 2, "both": [1, 2]}})
    assert names == {"1": "anterior", "2": "posterior"}
    table = format_table({"nnUNetTrainerSupervised": supervised,
                          "nnUNetTrainerMeanTeacher": {"foreground mean": 0.55, "1": 0.7}}, names)
    width = len("foreground mean ") + 2  # the longest row label (unnamed rows keep a trailing space) + 2
    assert table.splitlines() == [
        " " * width + "Supervised".rjust(14) + "MeanTeacher".rjust(14) + "difference".rjust(13),
        "foreground mean".ljust(width) + "0.5000".rjust(14) + "0.5500".rjust(14) + "+0.0500".rjust(13),
        "1 anterior".ljust(width) + "0.6000".rjust(14) + "0.7000".rjust(14) + "+0.1000".rjust(13),
        "2 posterior".ljust(width) + "0.4000".rjust(14) + "-".rjust(14),
    ]
    assert trainer_folder(tmp_path, "Dataset990_X", "T") == \
        tmp_path / "nnUNet_results" / "Dataset990_X" / "T__nnUNetPlans__3d_fullres" / "fold_0"
