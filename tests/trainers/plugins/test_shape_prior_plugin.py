"""The ERSR plug-in on Mean Teacher (2D): 3D refused, the classes from the attribute and the environment, one step
against a hand-assembled loss on crafted teacher outputs (gate, refined labels, mirrored copy), the adaptive
thresholds and their checkpoint, the log's warnings, presets and cost, and a short 2D training that resumes and
predicts with the student and the teacher."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import budget_split, budgeted_trainer, make_trainer, predict_in_process, random_batch

from nnunet_ssl.compat.trainer import unwrap
from nnunet_ssl.errors import SSLInputError
from nnunet_ssl.losses.consistency import mse_consistency
from nnunet_ssl.losses.shape_prior import (
    assess_batch,
    gate,
    ground_truth_pass_counts,
    mirror_consistency,
    refined_label_loss,
    refined_targets,
)
from nnunet_ssl.parts.ellipse import Ellipse, radius_map
from nnunet_ssl.trainers.base import full_resolution, paper_settings_of
from nnunet_ssl.trainers.catalogue import nnUNetTrainerMeanTeacher, nnUNetTrainerMeanTeacherERSR
from nnunet_ssl.trainers.plugins.shape_prior import ENV_SHAPE_PRIOR_CLASSES
from nnunet_ssl.trainers.step import SSLStep

ERSR = nnUNetTrainerMeanTeacherERSR
PATCH = (32, 32)


@pytest.fixture(scope="module")
def planar(synthetic_planned, tmp_path_factory) -> dict:
    """A copy of the synthetic dataset with a 2d configuration and the test budget (2 labeled, 2 validation, 4
    unlabeled). nnU-Net's 2d preprocessing of these volumes (in-plane spacing 1 x 1 as planned, no resampling,
    per-case z-score) writes the same arrays as 3d_fullres, so the 2d data folder is a link to those."""
    root = tmp_path_factory.mktemp("ersr")
    for sub in ("raw", "preprocessed"):
        shutil.copytree(synthetic_planned["root"] / sub, root / sub)
    (root / "results").mkdir()
    pp = root / "preprocessed" / synthetic_planned["dataset"]
    (pp / "nnUNetPlans_2d").symlink_to(pp / "nnUNetPlans_3d_fullres")
    ds = {**synthetic_planned, "root": root}
    budget_split(ds)
    return ds


def _planar_trainer(ds, monkeypatch, cls=ERSR, **kwargs):
    return make_trainer(cls, ds["root"], ds["dataset"], monkeypatch, configuration="2d", **kwargs)


def _teacher_labels() -> np.ndarray:
    """Sample 0: class 2 an ellipse, class 1 absent. Sample 1: class 1 a small ellipse, class 2 a cross (not
    convex: the regularity gate drops it)."""
    labels = np.zeros((2, *PATCH), np.int64)
    labels[0][radius_map(Ellipse((16.0, 15.0), (9.0, 6.0), 0.4), PATCH).numpy() <= 1] = 2
    labels[1][radius_map(Ellipse((9.0, 20.0), (6.0, 4.0), 1.0), PATCH).numpy() <= 1] = 1
    labels[1, 24:27, 16:30] = 2
    labels[1, 18:31, 21:24] = 2
    return labels


def test_3d_configurations_and_bad_settings_are_refused_with_one_line(planar, monkeypatch):
    with pytest.raises(SSLInputError) as error:
        make_trainer(ERSR, planar["root"], planar["dataset"], monkeypatch)  # 3d_fullres
    message = str(error.value)
    assert "\n" not in message and "configuration '3d_fullres' is 3D" in message
    assert f"nnUNetv2_train DATASET 2d FOLD -tr {ERSR.__name__}" in message
    for bad, name in (("ersr_mirror_axes=(2,)", "ersr_mirror_axes"), ("ersr_mirror_axes=()", "ersr_mirror_axes"),
                      ("ersr_profile_floor=1.5", "ersr_profile_floor"), ("ersr_label_weight=-1", "ersr_label_weight"),
                      ("ersr_threshold_momentum=1.0", "ersr_threshold_momentum"), ("ersr_min_pixels=0",
                                                                                   "ersr_min_pixels"),
                      ("ersr_profile_sigma=0", "ersr_profile_sigma")):
        monkeypatch.setenv("nnUNet_ssl_settings", bad)
        with pytest.raises(SSLInputError, match=name):
            _planar_trainer(planar, monkeypatch)


def test_classes_from_the_attribute_and_the_environment(planar, monkeypatch):
    # default "auto": the labeled cases' ground truth, scored as the teacher's prediction would be; of the two
    # labeled synthetic cases part1 (a blob) passes the gate in both, part2 (a thin shell) in neither
    trainer = _planar_trainer(planar, monkeypatch)
    maps = trainer.labeled_label_maps()
    assert len(maps) == 2 and maps[0].ndim == 3
    counts = ground_truth_pass_counts(maps, (1, 2), 0.8, 0.9)
    assert counts == {1: (2, 2), 2: (2, 0)}
    assert trainer.shape_classes == (1,)
    assert ("ERSR classes chosen from the labeled ground truth (cases whose mask passes the gate / cases holding "
            "the class: 1 (part1) 2/2; 2 (part2) 0/2): 1") in Path(trainer.log_file).read_text()
    # no class passing is refused with one line
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ERSR, "labeled_label_maps", lambda self: [m * (m == 2) for m in maps])
        with pytest.raises(SSLInputError) as error:
            _ = _planar_trainer(planar, monkeypatch).shape_classes
    assert "\n" not in str(error.value) and "1 (part1) 0/0; 2 (part2) 0/2" in str(error.value)
    assert f"({ENV_SHAPE_PRIOR_CLASSES}=ID,...)" in str(error.value)
    for text in ("all", None):
        class Every(ERSR):
            shape_prior_classes = text
        assert _planar_trainer(planar, monkeypatch, cls=Every).shape_classes == (1, 2)

    class OnlyPart1(ERSR):
        shape_prior_classes = ("part1",)

    assert _planar_trainer(planar, monkeypatch, cls=OnlyPart1).shape_classes == (1,)
    for text, expected in (("part2", (2,)), ("2", (2,)), (" part2, 1 ", (1, 2)), ("1,part1", (1,)),
                           ("all", (1, 2))):
        monkeypatch.setenv(ENV_SHAPE_PRIOR_CLASSES, text)
        assert _planar_trainer(planar, monkeypatch, cls=OnlyPart1).shape_classes == expected, text
    for text in ("liver", "0", "3", "part1,", "background"):
        monkeypatch.setenv(ENV_SHAPE_PRIOR_CLASSES, text)
        with pytest.raises(SSLInputError) as error:
            _planar_trainer(planar, monkeypatch)
        assert ENV_SHAPE_PRIOR_CLASSES in str(error.value) and "1 (part1), 2 (part2)" in str(error.value), text
    monkeypatch.delenv(ENV_SHAPE_PRIOR_CLASSES)
    monkeypatch.setenv("nnUNet_ssl_settings", "shape_prior_classes=(2,)")
    assert _planar_trainer(planar, monkeypatch).shape_classes == (2,)


def test_step_is_the_host_loss_plus_the_refined_labels_and_the_mirror_term(planar, monkeypatch):
    monkeypatch.setenv(ENV_SHAPE_PRIOR_CLASSES, "all")
    trainer = budgeted_trainer(ERSR, planar, monkeypatch, configuration="2d")
    assert not trainer.ersr_adaptive_thresholds  # the default's fixed gate: tau_b 0.8, tau_r 0.9
    labels = _teacher_labels()
    reference = 8.0 * torch.nn.functional.one_hot(torch.from_numpy(labels), 3).movedim(-1, 1).float()
    monkeypatch.setattr(trainer, "reference_logits", lambda step: reference)
    data, target, views = random_batch(trainer, PATCH, seed=1)
    step = SSLStep(data=data, target=target, views=views, lam=0.5)
    sup, unsup, stats = trainer.forward_losses(step)

    x = views["view0"]
    assert torch.equal(step.student_image, torch.cat([x, x.flip(-1)]))  # the mirrored copy joins the one forward
    with torch.no_grad():
        out = full_resolution(trainer.network(torch.cat([data, step.student_image]))).float()[2:]
    student, mirrored = out[:2], out[2:]
    assessments = assess_batch(labels, (1, 2))
    kept = gate(assessments, 0.8, 0.9)
    assert kept.tolist() == [[False, True], [True, False]]
    targets = refined_targets(assessments, kept, PATCH)
    # the refined label of the kept ellipse is that ellipse
    truth = torch.from_numpy(labels[0] == 2)
    refined = targets.labels[0, 1].bool()
    assert float((refined & truth).sum() / (refined | truth).sum()) > 0.9
    host = mse_consistency(student, reference)
    label = refined_label_loss(student, (1, 2), targets)
    mirror = mirror_consistency(student, mirrored.flip(-1), (1, 2))
    assert float(unsup.detach()) == pytest.approx(float(host + label + mirror), rel=1e-5)
    assert float(label) > 0.1 and float(mirror) > 0
    assert stats["ersr_kept"] == 0.5 and stats["ersr_fitted"] == 0.75
    assert stats["ersr_host_loss"] == pytest.approx(float(host), rel=1e-5)
    assert stats["ersr_label_loss"] == pytest.approx(float(label), rel=1e-5)
    assert stats["ersr_mirror_loss"] == pytest.approx(float(mirror), rel=1e-5)
    size = float(sup.detach()) + 1
    assert stats["ersr_label_share"] == pytest.approx(0.5 * float(label) / size, rel=1e-5)
    assert stats["ersr_boundary_threshold"] == 0.8 and stats["ersr_regularity_threshold"] == 0.9
    # the whole unsupervised loss is float32 and reaches the student
    assert unsup.dtype == torch.float32
    unsup.backward()
    assert float(next(unwrap(trainer.network).parameters()).grad.abs().sum()) > 0

    # weights and axes are settings: the rows axis, the refined labels doubled, no mirror term (no mirrored copy)
    trainer.ersr_mirror_axes, trainer.ersr_label_weight, trainer.ersr_mirror_weight = (0,), 2.0, 0.0
    step = SSLStep(data=data, target=target, views=views, lam=0.5)
    _, unsup, stats = trainer.forward_losses(step)
    assert torch.equal(step.student_image, x) and "ersr_mirror_loss" not in stats
    assert float(unsup.detach()) == pytest.approx(float(host + 2 * label), rel=1e-5)
    trainer.ersr_mirror_weight = 1.0
    assert torch.equal(trainer.student_input(step), torch.cat([x, x.flip(-2)]))


def test_adaptive_thresholds_follow_each_class_and_resume(planar, monkeypatch, tmp_path):
    monkeypatch.setenv(ENV_SHAPE_PRIOR_CLASSES, "all")
    trainer = budgeted_trainer(ERSR, planar, monkeypatch, configuration="2d")
    fitted = torch.tensor([[True, False], [True, True]])
    boundary = torch.tensor([[0.6, 0.0], [0.8, 0.95]], dtype=torch.float64)
    regularity = torch.tensor([[0.9, 0.0], [0.7, 0.85]], dtype=torch.float64)
    assert trainer.current_ersr_thresholds(fitted, boundary, regularity) == ([0.8, 0.8], [0.9, 0.9])  # fixed
    trainer.ersr_adaptive_thresholds = True
    # class 1: its fitted samples' means 0.7 and 0.8 are below tau, so tau_1(t) is the (bias-corrected) EMA, here
    # the first mean; class 2: 0.95 above tau_b = 0.8, 0.85 below tau_r = 0.9
    taus = trainer.current_ersr_thresholds(fitted, boundary, regularity)
    assert taus == (pytest.approx([0.7, 0.8]), pytest.approx([0.8, 0.85]))
    # class 1 alone: the EMA of 0.7 then 1.0, (0.99 * 0.01 * 0.7 + 0.01) / (1 - 0.99^2) = 0.85 > 0.8; class 2 stays
    one = torch.tensor([[True, False]])
    taus = trainer.current_ersr_thresholds(one, torch.tensor([[1.0, 0.0]], dtype=torch.float64),
                                           torch.tensor([[0.85, 0.0]], dtype=torch.float64))
    assert taus[0] == pytest.approx([0.8, 0.8])
    assert taus[1] == pytest.approx([(0.99 * 0.01 * 0.8 + 0.01 * 0.85) / (1 - 0.99**2), 0.85])
    # a batch without any fit leaves them as they are
    none = torch.zeros(1, 2, dtype=torch.bool)
    assert trainer.current_ersr_thresholds(none, boundary[:1], regularity[:1]) == taus

    ckpt = tmp_path / "ersr.pth"
    trainer.save_checkpoint(str(ckpt))
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)["ssl_state"]
    assert saved["ersr_classes"] == [1, 2]
    assert [t["steps"] for t in saved["ersr_thresholds"]["boundary"]] == [2, 1]
    resumed = budgeted_trainer(ERSR, planar, monkeypatch, configuration="2d", continue_training=True)
    resumed.load_checkpoint(str(ckpt))
    for key in ("boundary", "regularity"):
        assert [t.state_dict() for t in resumed.ersr_thresholds[key]] == saved["ersr_thresholds"][key]
    resumed.ersr_adaptive_thresholds = True
    assert resumed.current_ersr_thresholds(none, boundary[:1], regularity[:1]) == taus
    # the epoch's line: each class's kept fraction, and a warning for a class the gate keeps nothing of
    trainer._epoch_stats = [{"ssl_ersr_kept": 0.5, "ssl_ersr_fitted": 1.0, "ssl_ersr_kept_1": 0.0,
                             "ssl_ersr_kept_2": k} for k in (1.0, 0.5)]
    trainer.on_train_epoch_end([{"loss": np.array(0.5)}])
    text = Path(trainer.log_file).read_text()
    assert "ersr: kept 1 (part1) 0.0%, 2 (part2) 75.0% of the samples (all classes 50.0%, fitted 100.0%;" in text
    assert ("WARNING: ERSR's gate kept 0.0% of the samples of class 1 (part1) this epoch (no ellipse fit, or scores "
            f"below the thresholds): if its shape is not elliptical, leave it out ({ENV_SHAPE_PRIOR_CLASSES})") in text
    assert "of class 2" not in text
    monkeypatch.setenv(ENV_SHAPE_PRIOR_CLASSES, "part2")
    other = budgeted_trainer(ERSR, planar, monkeypatch, configuration="2d", continue_training=True)
    with pytest.raises(SSLInputError, match=f"{ENV_SHAPE_PRIOR_CLASSES}=1,2"):
        other.load_checkpoint(str(ckpt))


def test_warnings_presets_and_cost(planar, monkeypatch):
    monkeypatch.setenv(ENV_SHAPE_PRIOR_CLASSES, "all")
    trainer = _planar_trainer(planar, monkeypatch)
    base = {"ssl_ramp": 1.0, "ssl_unsup_share": 0.2, "ssl_other_share": 0.0, "ssl_ersr_fitted": 0.6,
            "ssl_ersr_kept": 0.4, "ssl_ersr_boundary": 0.9, "ssl_ersr_regularity": 0.95,
            "ssl_ersr_label_share": 0.1, "ssl_ersr_mirror_share": 0.05}
    assert trainer.mechanism_warnings(base) == []
    dropped = trainer.mechanism_warnings({**base, "ssl_ersr_kept": 0.005, "ssl_ersr_label_share": 0.0})
    assert dropped == ["ERSR's gate kept 0.5% of the sample-class pairs this epoch (60.0% fitted; mean boundary "
                       "score 0.900, regularity 0.950): it drops nearly every pseudo-label"]
    absent = trainer.mechanism_warnings({**base, "ssl_ersr_fitted": 0.0, "ssl_ersr_kept": 0.0})
    assert absent[0].startswith("the teacher's prediction of class(es) 1 (part1), 2 (part2) gave no ellipse fit")
    small = trainer.mechanism_warnings({**base, "ssl_ersr_mirror_share": 0.001, "ssl_ersr_label_share": 2.0})
    assert small == ["the refined-label term of ERSR is 2 times the supervised loss this epoch: it dominates",
                     "the mirror term of ERSR is 0.001 of the supervised loss this epoch: negligible"]
    assert trainer.mechanism_warnings({**base, "ssl_ramp": 0.1, "ssl_ersr_mirror_share": 0.001}) == []
    trainer.ersr_mirror_weight = 0.0  # a term that is off is not reported
    assert trainer.mechanism_warnings({**base, "ssl_ersr_mirror_share": float("nan")}) == []

    # the paper preset: Mean Teacher's, and the abstract's adaptive filtering as we read it
    assert paper_settings_of(ERSR) == {**paper_settings_of(nnUNetTrainerMeanTeacher), "ersr_adaptive_thresholds": True}
    assert not trainer.ersr_adaptive_thresholds
    monkeypatch.setenv("nnUNet_ssl_preset", "paper")
    paper = _planar_trainer(planar, monkeypatch)
    assert paper.unsupervised_weight == 0.1 and paper.teacher_input == "noise" and paper.ersr_adaptive_thresholds
    assert (paper.ersr_boundary_threshold, paper.ersr_regularity_threshold) == (0.8, 0.9)
    # Mean Teacher's 3 (B + U) + U, plus the student's forward and backward on the U mirrored copies

    class NoMirror(ERSR):
        ersr_mirror_weight = 0.0

    assert nnUNetTrainerMeanTeacher.compute_units(2, 2) == 14.0
    assert ERSR.compute_units(2, 2) == 20.0 and NoMirror.compute_units(2, 2) == 14.0


def test_short_2d_training_resumes_and_predicts(planar, monkeypatch):
    trainer = budgeted_trainer(ERSR, planar, monkeypatch, configuration="2d", epochs=1, iterations=2)
    trainer.run_training()
    out = Path(trainer.output_folder)
    resumed = budgeted_trainer(ERSR, planar, monkeypatch, configuration="2d", epochs=2, iterations=2,
                               continue_training=True)
    resumed.load_checkpoint(str(out / "checkpoint_final.pth"))
    assert resumed.ssl_step == 2
    for key in ("boundary", "regularity"):
        assert [t.state_dict() for t in resumed.ersr_thresholds[key]] == \
            [t.state_dict() for t in trainer.ersr_thresholds[key]]
    resumed.run_training()
    assert resumed.ssl_step == 4 and resumed.current_epoch == 2
    log = resumed.logger.local_logger.my_fantastic_logging
    for key in ("ssl_ersr_fitted", "ssl_ersr_kept", "ssl_ersr_host_loss", "ssl_ersr_mirror_loss",
                "ssl_ersr_label_share", "ssl_ersr_mirror_share", "ssl_ersr_boundary_threshold"):
        assert len(log[key]) == 2 and all(math.isfinite(v) for v in log[key]), (key, log[key])
    text = Path(resumed.log_file).read_text()
    # the default "auto" named part1 alone, in training and again on resuming
    assert "ERSR shape prior on class(es) 1 (part1); class(es) [2] get the host's consistency only" in text
    assert "ersr: kept 1 (part1) " in text and "2 (part2)" not in text.split("ersr: kept")[-1].split("\n")[0]
    assert (out / "progress_ssl.png").is_file() and (out / "checkpoint_final_teacher.pth").is_file()
    # nnUNetv2_predict, student and teacher: the 2d configuration predicts each volume slice by slice
    for checkpoint in ("checkpoint_final.pth", "checkpoint_final_teacher.pth"):
        predictor = predict_in_process(planar, out, checkpoint, monkeypatch)
        assert len(predictor.configuration_manager.patch_size) == 2
        assert len(list((planar["root"] / f"pred_{checkpoint.removesuffix('.pth')}").glob("*.nii.gz"))) == 2
