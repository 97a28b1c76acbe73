"""The TransMedSeg plug-in on the Mean Teacher host: one step against a hand computation from the student's and the
teacher's own features (statistics of the right network and voxels, the bound, beta and alpha), gradients to the
student only, the reverse direction, a 2D step, presets, settings and log lines, and one short training resumed
with its statistics and predicted with both checkpoints."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import budget_split, budgeted_trainer, make_trainer, predict_in_process, random_batch

from nnunet_ssl.compat.trainer import feature_taps, unwrap
from nnunet_ssl.errors import SSLInputError
from nnunet_ssl.losses.semantic_augmentation import (
    ClassStatistics,
    logit_adjustment,
    semantic_augmentation_loss,
    transfer_terms,
)
from nnunet_ssl.trainers.base import full_resolution, paper_settings_of
from nnunet_ssl.trainers.catalogue import nnUNetTrainerMeanTeacher
from nnunet_ssl.trainers.catalogue import nnUNetTrainerMeanTeacherTransMedSeg as TransMedSeg
from nnunet_ssl.trainers.step import SSLStep

PATCH = (16, 32, 32)


def _step(trainer, patch=PATCH, seed=0, labeled=2, unlabeled=2) -> SSLStep:
    data, target, views = random_batch(trainer, patch, seed, labeled, unlabeled)
    return SSLStep(data=data, target=target, views=views, lam=trainer.current_lambda())


def _move_student(trainer, scale=0.05):
    with torch.no_grad():
        for p in unwrap(trainer.network).parameters():
            p.add_(scale * torch.randn_like(p))


def _low_features(network, images):
    with torch.no_grad(), feature_taps(network) as taps:
        output = network(images)
    return taps.read()[1], full_resolution(output)


def _hand_term(trainer, step, side, statistics_before):
    """(L_tsa, updated labeled and unlabeled statistics) computed from the two networks' own features."""
    n = step.data.shape[0]
    student_low, student_out = _low_features(trainer.network, torch.cat([step.data, step.views["view0"]]))
    teacher_low, teacher_out = _low_features(trainer.teacher, step.views["view1"])
    head = unwrap(trainer.network).decoder.seg_layers[-1]
    # the features are the head's input: the network's full-resolution logits are the head applied to them
    assert torch.allclose(head(student_low), student_out, atol=1e-5)
    confidence, pseudo = torch.softmax(teacher_out, 1).max(1)
    labels = step.target[0][:, 0].long()
    lab, unl = (ClassStatistics(3, student_low.shape[1]) for _ in range(2))
    lab.load_state_dict(statistics_before["labeled"])
    unl.load_state_dict(statistics_before["unlabeled"])
    lab.update(lab.moments(student_low[:n], labels), trainer.statistics_momentum)
    unl.update(unl.moments(teacher_low, pseudo, confidence >= trainer.statistics_confidence),
               trainer.statistics_momentum)
    if side == "unlabeled":
        shift, cov, _ = transfer_terms(unl, lab, trainer.min_class_voxels)
        feats, y = student_low[n:], pseudo
    else:
        shift, cov, _ = transfer_terms(lab, unl, trainer.min_class_voxels)
        feats, y = student_low[:n], labels
    with torch.no_grad():
        adjustment = logit_adjustment(head.weight.flatten(1), shift.float(), cov.float(),
                                      trainer.current_semantic_alpha())
        loss = semantic_augmentation_loss(head(feats), y, adjustment)
        plain = F.cross_entropy(head(feats), y)
    return float(loss), lab, unl, float(plain)


def _assert_statistics(trainer, lab, unl):
    for side, hand in (("labeled", lab), ("unlabeled", unl)):
        got = trainer.semantic_statistics[side]
        for k in ("count", "weight", "mean", "covariance"):
            assert torch.allclose(getattr(got, k), getattr(hand, k), rtol=1e-5, atol=1e-6), (side, k)


def test_step_updates_both_sides_statistics_and_adds_the_bound(copy_planned, monkeypatch):
    trainer = budgeted_trainer(TransMedSeg, copy_planned, monkeypatch)
    trainer.statistics_confidence, trainer.min_class_voxels = 0.4, 50
    _move_student(trainer)  # student and teacher differ: a swapped network would change every statistic
    for t in (1, 3):  # alpha = 0.5 t / T (T = 4), beta = 0.5 after the ramp (0.2 T)
        trainer.ssl_step = t
        step = _step(trainer, seed=t)
        before = {s: v.state_dict() for s, v in trainer.semantic_statistics.items()}
        expected, lab, unl, plain_ce = _hand_term(trainer, step, "unlabeled", before)
        _, _, stats = trainer.forward_losses(step)
        _assert_statistics(trainer, lab, unl)
        (term,) = step.scheduled_losses
        assert term.dtype == torch.float32 and term.requires_grad
        assert stats["semantic_alpha"] == 0.5 * t / 4 and stats["semantic_weight"] == pytest.approx(
            0.5 * trainer.ramp())
        assert stats["semantic_loss"] == pytest.approx(expected, rel=1e-5)
        assert float(term) == pytest.approx(stats["semantic_weight"] * expected, rel=1e-5)
        assert stats["semantic_ce"] == pytest.approx(plain_ce, rel=1e-5)
    # after two updates with rho = 0.99: W = 0.99 n_1 + n_2 while count = n_1 + n_2
    lab_stats = trainer.semantic_statistics["labeled"]
    assert torch.all(lab_stats.weight < lab_stats.count) and torch.all(lab_stats.count > 0)
    unl_stats = trainer.semantic_statistics["unlabeled"]
    active = (lab_stats.count >= 50) & (unl_stats.count >= 50)
    assert bool(active.any()) and stats["semantic_active"] == pytest.approx(float(active.float().mean()))
    assert stats["semantic_loss"] != pytest.approx(stats["semantic_ce"], rel=1e-4)  # the augmentation acts
    assert 0 < stats["semantic_kept"] < 1 and stats["semantic_shift"] > 0


def test_the_bound_trains_the_student_not_the_teacher(copy_planned, monkeypatch):
    trainer = budgeted_trainer(TransMedSeg, copy_planned, monkeypatch)
    trainer.statistics_confidence, trainer.min_class_voxels, trainer.ssl_step = 0.0, 50, 3
    step = _step(trainer, seed=5)
    trainer.forward_losses(step)
    (term,) = step.scheduled_losses
    term.backward()
    student = unwrap(trainer.network)
    first = next(student.encoder.stages[0].parameters())
    head = student.decoder.seg_layers[-1]
    assert first.grad is not None and float(first.grad.abs().sum()) > 0  # through the features
    assert float(head.weight.grad.abs().sum()) > 0 and float(head.bias.grad.abs().sum()) > 0
    assert all(p.grad is None and not p.requires_grad for p in trainer.teacher.parameters())
    for statistics in trainer.semantic_statistics.values():
        assert not any(v.requires_grad for v in statistics.state_dict().values())


def test_labeled_side_and_a_2d_step(copy_planned, monkeypatch):
    monkeypatch.setenv("nnUNet_ssl_settings", "augmented_side='labeled', statistics_confidence=0.0, "
                                              "min_class_voxels=50")
    trainer = budgeted_trainer(TransMedSeg, copy_planned, monkeypatch)
    assert trainer.augmented_side == "labeled" and trainer.min_class_voxels == 50
    trainer.ssl_step = 2
    _move_student(trainer)
    step = _step(trainer, seed=7)
    before = {s: v.state_dict() for s, v in trainer.semantic_statistics.items()}
    expected, lab, unl, _ = _hand_term(trainer, step, "labeled", before)
    _, _, stats = trainer.forward_losses(step)
    _assert_statistics(trainer, lab, unl)
    assert stats["semantic_loss"] == pytest.approx(expected, rel=1e-5) and stats["semantic_kept"] == 1.0

    # the 2d configuration of the same plans; the step runs on tensors, nnU-Net only needs a data folder to exist
    monkeypatch.delenv("nnUNet_ssl_settings")
    pp = copy_planned["root"] / "preprocessed" / copy_planned["dataset"]
    (pp / "nnUNetPlans_2d").symlink_to(pp / "nnUNetPlans_3d_fullres")
    planar = budgeted_trainer(TransMedSeg, copy_planned, monkeypatch, configuration="2d")
    planar.statistics_confidence, planar.min_class_voxels, planar.ssl_step = 0.0, 10, 3
    step = _step(planar, patch=(32, 32), seed=8, labeled=3, unlabeled=2)
    sup, unsup, stats = planar.forward_losses(step)
    dim = unwrap(planar.network).decoder.seg_layers[-1].in_channels
    assert planar.semantic_statistics["unlabeled"].covariance.shape == (3, dim, dim)
    assert math.isfinite(float(sup.detach())) and math.isfinite(float(unsup.detach()))
    assert math.isfinite(stats["semantic_loss"]) and stats["semantic_active"] > 0


def test_presets_settings_cost_and_log_lines(copy_planned, monkeypatch):
    budget_split(copy_planned)
    default = make_trainer(TransMedSeg, copy_planned["root"], copy_planned["dataset"], monkeypatch)
    monkeypatch.setenv("nnUNet_ssl_preset", "paper")
    paper = make_trainer(TransMedSeg, copy_planned["root"], copy_planned["dataset"], monkeypatch)
    assert (default.semantic_ramp, default.statistics_confidence) == (True, 0.9)
    assert (paper.semantic_ramp, paper.statistics_confidence) == (False, 0.0)
    for trainer in (default, paper):
        assert trainer.semantic_weight == trainer.semantic_alpha == 0.5 and trainer.augmented_side == "unlabeled"
        assert trainer.statistics_momentum == 0.99 and trainer.min_class_voxels == 1000
    for name, value in paper_settings_of(TransMedSeg).items():
        assert getattr(paper, name) == value, name
    assert paper.unsupervised_weight == 0.1 and paper.teacher_input == "noise"  # the host's paper settings
    paper.ssl_step = 0
    assert paper.current_semantic_weight() == 0.5 and default.current_semantic_weight() < 0.01  # ramp or not
    monkeypatch.delenv("nnUNet_ssl_preset")
    for bad, name in [("augmented_side='teacher'", "augmented_side"), ("statistics_momentum=0.0", "momentum"),
                      ("statistics_confidence=1.0", "statistics_confidence"), ("semantic_weight=-1.0", "weight"),
                      ("min_class_voxels=-5", "min_class_voxels")]:
        monkeypatch.setenv("nnUNet_ssl_settings", bad)
        with pytest.raises(SSLInputError, match=name):
            make_trainer(TransMedSeg, copy_planned["root"], copy_planned["dataset"], monkeypatch)
    # no extra network pass: the Mean Teacher's cost
    assert TransMedSeg.compute_units(2, 2) == nnUNetTrainerMeanTeacher.compute_units(2, 2) == 14.0
    default.ssl_step = default.total_iterations  # past the ramp
    warnings = default.mechanism_warnings({"ssl_semantic_kept": 0.001, "ssl_semantic_active": 2 / 3,
                                           "ssl_other_share": 0.001, "ssl_ramp": 1.0, "ssl_unsup_share": 0.1})
    assert any("drops nearly everything" in w for w in warnings)
    assert any("adjusted 67% of the classes" in w for w in warnings)
    assert any("TransMedSeg's term is negligible" in w for w in warnings)
    assert not default.mechanism_warnings({"ssl_semantic_kept": 0.5, "ssl_semantic_active": 1.0,
                                           "ssl_other_share": 0.2, "ssl_ramp": 1.0, "ssl_unsup_share": 0.1})


def test_short_training_resumes_the_statistics_and_predicts(copy_planned, monkeypatch):
    monkeypatch.setenv("nnUNet_ssl_settings", "statistics_confidence=0.0, min_class_voxels=50")
    trainer = budgeted_trainer(TransMedSeg, copy_planned, monkeypatch, epochs=1, iterations=1)
    trainer.run_training()
    out = Path(trainer.output_folder)
    saved = {s: v.state_dict() for s, v in trainer.semantic_statistics.items()}
    assert all(float(v["count"].sum()) > 0 for v in saved.values())
    resumed = budgeted_trainer(TransMedSeg, copy_planned, monkeypatch, epochs=2, iterations=1,
                               continue_training=True)
    resumed.load_checkpoint(str(out / "checkpoint_final.pth"))
    for side, state in saved.items():
        for k, v in state.items():
            assert torch.equal(getattr(resumed.semantic_statistics[side], k).cpu(), v.cpu()), (side, k)
    resumed.run_training()
    assert resumed.ssl_step == 2 and resumed.current_epoch == 2
    counts = resumed.semantic_statistics["labeled"].count
    assert torch.all(counts >= saved["labeled"]["count"]) and float((counts - saved["labeled"]["count"]).sum()) > 0
    log = resumed.logger.local_logger.my_fantastic_logging
    for key in ("ssl_semantic_loss", "ssl_semantic_ce", "ssl_semantic_active", "ssl_semantic_kept", "ssl_other_share"):
        assert len(log[key]) == 2 and all(math.isfinite(v) for v in log[key]), (key, log[key])
    assert log["ssl_semantic_alpha"][1] > log["ssl_semantic_alpha"][0]
    assert "TransMedSeg: classes with statistics" in (out / next(p.name for p in out.glob("training_log*.txt"))
                                                      ).read_text()
    final = torch.load(out / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert torch.equal(final["ssl_state"]["semantic_statistics"]["labeled"]["count"], counts.cpu())
    # nnUNetv2_predict with the student's and the teacher's final checkpoints, in-process
    for checkpoint in ("checkpoint_final.pth", "checkpoint_final_teacher.pth"):
        predict_in_process(copy_planned, out, checkpoint, monkeypatch)
