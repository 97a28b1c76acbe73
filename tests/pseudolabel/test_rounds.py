"""--rounds: teacher -> pseudo-labels -> student, the student teaching the next round; resumable."""

from __future__ import annotations

import json

import pytest

from nnunet_ssl.cli.pseudolabel import main
from nnunet_ssl.demo.synthetic import save_random_model_folder as save_model_folder


@pytest.mark.slow
def test_two_rounds_then_an_interrupted_round_resumes(copy_planned, monkeypatch, capsys):
    from conftest import nnunet_env

    root, ds = copy_planned["root"], copy_planned["dataset"]
    for key, value in nnunet_env(root, training=True).items():
        if key.startswith("nnUNet_"):
            monkeypatch.setenv(key, value)
    for key, value in (("epochs", "1"), ("iterations_per_epoch", "2"), ("val_iterations", "1"), ("seed", "0")):
        monkeypatch.setenv(f"nnUNet_ssl_{key}", value)
    model = save_model_folder(root / "preprocessed" / ds, root / "results", folds=(0,), foreground_bias=2.0)
    args = ["-d", "990", "-t", "991", "-o", str(root / "work"), "-m", str(model), "-device", "cpu", "--disable_tta",
            "-npp", "1", "--rounds", "2", "--student-trainer", "nnUNetTrainerSupervised", "--student-init", "teacher"]
    assert main(args) == 0
    out = capsys.readouterr().out
    names = ["Dataset991_SSLSyntheticPseudoLabeledRound1", "Dataset992_SSLSyntheticPseudoLabeledRound2"]
    students = [root / "results" / n / "nnUNetTrainerSupervised__nnUNetPlans__3d_fullres" / "fold_0" for n in names]
    assert all((s / "checkpoint_final.pth").is_file() for s in students)
    assert out.count("training the student") == 2
    # round 2 is taught by round 1's student; the pool and the labeled cases stay those of the source
    first, second = (json.loads((root / "raw" / n / "pseudolabel.json").read_text()) for n in names)
    assert first["sources"][0]["model_folder"] == str(model)
    assert second["sources"] == [{"model_folder": str(students[0].parent), "fold": 0,
                                  "checkpoint": "checkpoint_final.pth"}]
    assert sorted(first["cases"]) == sorted(second["cases"]) == ["unl_000", "unl_001", "unl_002", "unl_003"]
    assert first["labeled_cases"] == second["labeled_cases"]
    # round 1's student started from the teacher's weights
    log = (root / "work" / "round_1" / "logs" / "train.log").read_text().splitlines()[0]
    assert "-pretrained_weights" in log and str(model / "fold_0" / "checkpoint_final.pth") in log

    # done: a rerun trains nothing
    stamps = [(s / "checkpoint_final.pth").stat().st_mtime_ns for s in students]
    assert main(args) == 0
    assert "training the student" not in capsys.readouterr().out
    assert [(s / "checkpoint_final.pth").stat().st_mtime_ns for s in students] == stamps
    # interrupted in round 2 before its preprocessing finished: round 1 is kept, round 2 continues
    (students[1] / "checkpoint_final.pth").unlink()
    (root / "work" / "round_2" / "preprocessed.done").unlink()
    dataset_stamp = (root / "raw" / names[0] / "dataset.json").stat().st_mtime_ns
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.count("training the student") == 1 and "preprocessing Dataset992" in out
    assert "preprocessing Dataset991" not in out
    assert (root / "raw" / names[0] / "dataset.json").stat().st_mtime_ns == dataset_stamp
    assert (students[0] / "checkpoint_final.pth").stat().st_mtime_ns == stamps[0]
    assert (students[1] / "checkpoint_final.pth").is_file()
