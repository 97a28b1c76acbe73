"""Presets ("default" vs "paper"), the balanced lambda, and the wiring of each host's reference, against hand
computations on in-process trainers with patched networks."""

from __future__ import annotations

import pytest
import torch
from helpers import budget_split, make_trainer

from nnunet_ssl.errors import SSLInputError
from nnunet_ssl.losses.consistency import mse_consistency
from nnunet_ssl.parts.ramps import sigmoid_rampup
from nnunet_ssl.trainers import (
    nnUNetTrainerCPS,
    nnUNetTrainerCPSMetaSSL,
    nnUNetTrainerFixMatch,
    nnUNetTrainerFixMatchMetaSSL,
    nnUNetTrainerMeanTeacher,
    nnUNetTrainerMeanTeacherMetaSSL,
    nnUNetTrainerMEDL,
    nnUNetTrainerUAMT,
)
from nnunet_ssl.trainers.base import full_resolution, nnUNetTrainerSSL, paper_settings_of
from nnunet_ssl.trainers.step import SSLStep


def test_paper_settings_merge_along_the_mro_plugin_over_host():
    merged = paper_settings_of(nnUNetTrainerFixMatchMetaSSL)
    # MetaSSL's schedule wins over FixMatch's lambda = 1 without ramp; FixMatch's views and CutMix stay
    assert merged["unsupervised_weight"] == 0.1 and merged["rampup_fraction"] == 0.2
    assert merged["view_intensity"] == (False, True) and merged["cutmix_probability"] == 0.5
    assert merged["unsupervised_share"] is None and merged["metassl_cap"] == 0.9
    assert merged["metassl_normalise"] is False
    assert paper_settings_of(nnUNetTrainerFixMatch)["unsupervised_weight"] == 1.0
    assert paper_settings_of(nnUNetTrainerFixMatch)["rampup_fraction"] == 0.0
    assert paper_settings_of(nnUNetTrainerMeanTeacher)["teacher_input"] == "noise"


@pytest.mark.parametrize("cls", [nnUNetTrainerMeanTeacher, nnUNetTrainerFixMatch, nnUNetTrainerCPS,
                                 nnUNetTrainerFixMatchMetaSSL, nnUNetTrainerMEDL, nnUNetTrainerUAMT])
def test_paper_preset_is_one_setting_away(cls, copy_planned, monkeypatch):
    budget_split(copy_planned)
    default = make_trainer(cls, copy_planned["root"], copy_planned["dataset"], monkeypatch)
    assert default.preset == "default" and default.unsupervised_share is None
    monkeypatch.setenv("nnUNet_ssl_preset", "paper")
    paper = make_trainer(cls, copy_planned["root"], copy_planned["dataset"], monkeypatch)
    assert paper.preset == "paper" and paper.unsupervised_share is None
    for name, value in paper_settings_of(cls).items():
        assert getattr(paper, name) == value, name
    assert cls.rampup_fraction == 0.2  # the class is untouched, only the instance
    # the paper's lambda is its fixed weight times the ramp, whatever the balance has seen
    paper.ssl_step = 7
    paper.loss_balance.load_state_dict({"sup": 1.0, "unsup": 1e-3, "steps": 100})
    assert paper.current_lambda() == pytest.approx(
        paper.unsupervised_weight * sigmoid_rampup(7, paper.rampup_fraction * paper.total_iterations))
    monkeypatch.setenv("nnUNet_ssl_preset", "papers")
    with pytest.raises(SSLInputError, match="preset 'papers' is unknown"):
        make_trainer(cls, copy_planned["root"], copy_planned["dataset"], monkeypatch)


def test_balanced_lambda_is_the_share_of_the_loss_sizes_and_resumes(copy_planned, monkeypatch):
    budget_split(copy_planned)
    monkeypatch.setenv("nnUNet_ssl_settings", "unsupervised_share=0.2")
    trainer = make_trainer(nnUNetTrainerMeanTeacher, copy_planned["root"], copy_planned["dataset"], monkeypatch,
                           epochs=10, iterations=10)
    # Mean Teacher's logged sizes: L_sup about -0.87 (so L_sup + 1 = 0.13) and an MSE of 0.003
    for _ in range(50):
        trainer.observe_losses(_step(trainer, 0, 0), torch.tensor(-0.87), torch.tensor(0.003))
    trainer.ssl_step = 40  # past the ramp (20 % of 100 iterations)
    assert trainer.current_lambda() == pytest.approx(0.2 * 0.13 / 0.003, rel=1e-4)
    trainer.ssl_step = 10
    assert trainer.current_lambda() == pytest.approx(sigmoid_rampup(10, 20) * 0.2 * 0.13 / 0.003, rel=1e-4)
    state = nnUNetTrainerSSL.ssl_state_dict(trainer)  # the base's part (no teacher before initialize)
    assert state["preset"] == "default" and state["loss_balance"]["steps"] == 50
    other = make_trainer(nnUNetTrainerMeanTeacher, copy_planned["root"], copy_planned["dataset"], monkeypatch,
                         epochs=10, iterations=10)
    nnUNetTrainerSSL.load_ssl_state_dict(other, state)
    assert other.current_lambda() == trainer.current_lambda()
    monkeypatch.setenv("nnUNet_ssl_preset", "paper")
    paper = make_trainer(nnUNetTrainerMeanTeacher, copy_planned["root"], copy_planned["dataset"], monkeypatch)
    with pytest.raises(SSLInputError, match="trained with preset 'default'"):
        nnUNetTrainerSSL.load_ssl_state_dict(paper, state)


def _step(trainer, labeled: int = 2, unlabeled: int = 2, seed: int = 0) -> SSLStep:
    g = torch.Generator().manual_seed(seed)
    patch = tuple(trainer.configuration_manager.patch_size)
    classes = trainer.label_manager.num_segmentation_heads
    return SSLStep(data=torch.randn(labeled, 1, *patch, generator=g),
                   target=[torch.randint(0, classes, (labeled, 1, *patch), generator=g).float()],
                   views={f"view{i}": torch.randn(unlabeled, 1, *patch, generator=g) for i in range(2)}, lam=1.0)


def _no_supervised_loss(trainer, monkeypatch):
    monkeypatch.setattr(trainer, "loss", lambda output, target: full_resolution(output).sum() * 0)


def test_mean_teacher_compares_the_student_on_view0_with_the_teacher_on_view1(copy_planned, monkeypatch):
    budget_split(copy_planned)
    trainer = make_trainer(nnUNetTrainerMeanTeacher, copy_planned["root"], copy_planned["dataset"], monkeypatch)
    trainer.initialize()
    _no_supervised_loss(trainer, monkeypatch)
    with torch.no_grad():  # a teacher that differs from the student
        for p in trainer.teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    step = _step(trainer)
    _, unsup, _ = trainer.forward_losses(step)
    with torch.no_grad():
        student = full_resolution(trainer.network(step.views["view0"]))
        teacher = full_resolution(trainer.teacher(step.views["view1"]))
        swapped = mse_consistency(full_resolution(trainer.network(step.views["view1"])),
                                  full_resolution(trainer.teacher(step.views["view0"])))
    expected = mse_consistency(student, teacher)
    assert unsup.item() == pytest.approx(expected.item(), rel=1e-4)
    assert abs(swapped.item() - expected.item()) > 1e-3 * expected.item()
    # the paper preset feeds the teacher the student's view plus clipped noise
    trainer.teacher_input = "noise"
    image = trainer.teacher_image(step)
    assert (image - step.views["view0"]).abs().max() <= 0.2 + 1e-6
    assert not torch.equal(image, step.views["view0"])


class _Counting(torch.nn.Module):
    def __init__(self, network):
        super().__init__()
        self.network = network
        self.inputs: list[torch.Tensor] = []

    def forward(self, x):
        self.inputs.append(x)
        return self.network(x)


def test_metassl_on_each_host_takes_the_reference_the_method_names(copy_planned, monkeypatch):
    budget_split(copy_planned)
    # Mean Teacher: the teacher predicts the labeled images
    mt = make_trainer(nnUNetTrainerMeanTeacherMetaSSL, copy_planned["root"], copy_planned["dataset"], monkeypatch)
    mt.initialize()
    _no_supervised_loss(mt, monkeypatch)
    seen = {}

    def record(student_logits, reference_logits, target, step):
        seen["student"], seen["reference"] = student_logits, reference_logits
        return reference_logits.new_zeros(()), {}

    monkeypatch.setattr(mt, "labeled_loss", record)
    step = _step(mt)
    mt.forward_losses(step)
    with torch.no_grad():
        assert torch.allclose(seen["reference"], full_resolution(mt.teacher(step.data)), atol=1e-5)

    # FixMatch: the student itself, no third forward; every labeled voxel is unanimous; CutMix logged
    fm = make_trainer(nnUNetTrainerFixMatchMetaSSL, copy_planned["root"], copy_planned["dataset"], monkeypatch)
    fm.initialize()
    _no_supervised_loss(fm, monkeypatch)
    fm.network = _Counting(fm.network)
    step = _step(fm)
    _, _, stats = fm.forward_losses(step)
    assert len(fm.network.inputs) == 2  # labeled + strong view with gradient, weak view without
    assert torch.equal(fm.network.inputs[1], step.views["view0"])
    assert stats["l_frac_dc"] == 0 and stats["l_frac_ds"] == 0
    assert stats["mixed_fraction"] == pytest.approx(float(step.mix.float().mean())) and stats["mixed_fraction"] > 0

    # CPS: direction k learns from network 3 - k, so its thresholds follow network 3 - k's unlabeled confidence
    cps = make_trainer(nnUNetTrainerCPSMetaSSL, copy_planned["root"], copy_planned["dataset"], monkeypatch)
    cps.initialize()
    step = _step(cps)
    g = torch.Generator().manual_seed(3)
    shape = (2, cps.label_manager.num_segmentation_heads, 4, 4, 4)
    u1, u2, l1, l2 = (3 * torch.randn(shape, generator=g) for _ in range(4))
    target = torch.randint(0, shape[1], (2, 1, 4, 4, 4), generator=g).float()
    step.target = [target]
    cps.mutual_loss([u1, u2], [l1, l2], step)

    def ema_of(logits: torch.Tensor, tau0: float = 0.9) -> torch.Tensor:
        conf, pred = torch.softmax(logits, 1).max(1)
        means = torch.tensor([conf[pred == c].mean() if (pred == c).any() else float("nan")
                              for c in range(shape[1])])
        return torch.where(torch.isnan(means), torch.full_like(means, tau0), 0.5 * means + 0.5 * tau0)

    assert torch.allclose(cps.metassl_losses[0].reference_thresholds.tau, ema_of(u2), atol=1e-6)
    assert torch.allclose(cps.metassl_losses[1].reference_thresholds.tau, ema_of(u1), atol=1e-6)
    # on labeled data each direction's thresholds follow its own (supervised) network
    assert torch.allclose(cps.metassl_losses[0].supervised_thresholds.tau, ema_of(l1), atol=1e-6)
    assert torch.allclose(cps.metassl_losses[1].supervised_thresholds.tau, ema_of(l2), atol=1e-6)


def test_fixmatch_strong_view_and_cutmix_in_each_preset(copy_planned, monkeypatch):
    budget_split(copy_planned)
    trainer = make_trainer(nnUNetTrainerFixMatch, copy_planned["root"], copy_planned["dataset"], monkeypatch)
    assert trainer.view_intensity == (False, "strong") and trainer.cutmix_probability == 1.0
    assert trainer.uses_confidence_gate
    means = {"ssl_ramp": 1.0, "ssl_unsup_share": 0.2, "ssl_other_share": 0.0, "ssl_coverage": 0.004}
    assert any("gate drops nearly everything" in w for w in trainer.mechanism_warnings(means))
    assert any("negligible" in w for w in trainer.mechanism_warnings({**means, "ssl_unsup_share": 0.001}))
    assert any("dominates" in w for w in trainer.mechanism_warnings({**means, "ssl_unsup_share": 3.0}))
    # during the early ramp a small term is intended
    assert not any("negligible" in w for w in trainer.mechanism_warnings(
        {**means, "ssl_ramp": 0.1, "ssl_unsup_share": 0.001}))
    assert trainer.mechanism_warnings({**means, "ssl_coverage": 0.5}) == []


def test_fixmatch_fits_its_temperature_on_validation_patches_and_gates_with_it(copy_planned, monkeypatch, tmp_path):
    budget_split(copy_planned)
    trainer = make_trainer(nnUNetTrainerFixMatch, copy_planned["root"], copy_planned["dataset"], monkeypatch)
    trainer.on_train_start()
    try:
        assert trainer.calibrate_reference and trainer.temperature == 1.0
        trainer.on_train_epoch_start()
        trainer.on_train_epoch_end([trainer.train_step(next(trainer.dataloader_train))])
        trainer.on_validation_epoch_start()
        trainer.on_validation_epoch_end([trainer.validation_step(next(trainer.dataloader_val))])
        log = trainer.logger.local_logger.my_fantastic_logging
        assert trainer.temperature != 1.0 and log["ssl_temperature"] == [trainer.temperature]
        assert 0 <= log["ssl_ece_raw"][0] <= 1 and 0 <= log["ssl_ece_calibrated"][0] <= 1
        assert log["ssl_sup_loss"] and len(log["ssl_sup_loss"]) == 1  # step means and validation keys apart
        assert nnUNetTrainerSSL.ssl_state_dict(trainer)["temperatures"] == [trainer.temperature]
        # the gate reads softmax(z / T): a tiny T makes every voxel confident, a huge one none
        step = _step(trainer)
        trainer.temperature = 1e-4
        _, unsup, stats = trainer.forward_losses(step)
        assert stats["coverage"] > 0.99 and unsup.item() > 0
        trainer.temperature = 1e4
        _, unsup, stats = trainer.forward_losses(_step(trainer))
        assert stats["coverage"] == 0.0 and unsup.item() == 0.0
    finally:
        trainer.on_train_end()


def test_settings_from_the_environment_override_the_preset_and_must_match_at_resume(copy_planned, monkeypatch):
    budget_split(copy_planned)
    monkeypatch.setenv("nnUNet_ssl_preset", "paper")
    monkeypatch.setenv("nnUNet_ssl_settings",
                       "unsupervised_share=0.5, metassl_cap=None,view_intensity=(False, 'strong')")
    trainer = make_trainer(nnUNetTrainerFixMatchMetaSSL, copy_planned["root"], copy_planned["dataset"], monkeypatch)
    assert trainer.unsupervised_share == 0.5 and trainer.metassl_cap is None
    assert trainer.view_intensity == (False, "strong") and trainer.cutmix_probability == 0.5  # the rest: paper
    state = nnUNetTrainerSSL.ssl_state_dict(trainer)
    monkeypatch.setenv("nnUNet_ssl_settings", "unsupervised_share=0.3")
    other = make_trainer(nnUNetTrainerFixMatchMetaSSL, copy_planned["root"], copy_planned["dataset"], monkeypatch)
    with pytest.raises(SSLInputError, match="resume with the same settings"):
        nnUNetTrainerSSL.load_ssl_state_dict(other, state)
    for bad, message in (("unsupervised_shares=0.5", "has no setting 'unsupervised_shares'"),
                         ("unsupervised_share=half", "is not a Python literal"),
                         ("rampup_fraction", "must be name=value"),
                         ("train_step=1", "has no setting 'train_step'")):
        monkeypatch.setenv("nnUNet_ssl_settings", bad)
        with pytest.raises(SSLInputError, match=message):
            make_trainer(nnUNetTrainerFixMatchMetaSSL, copy_planned["root"], copy_planned["dataset"], monkeypatch)


def test_two_networks_calibrate_each_network_and_read_it_where_it_is_the_reference(copy_planned, monkeypatch):
    budget_split(copy_planned)
    trainer = make_trainer(nnUNetTrainerCPSMetaSSL, copy_planned["root"], copy_planned["dataset"], monkeypatch)
    trainer.on_train_start()
    try:
        assert trainer.calibrate_reference and trainer.temperatures == [1.0, 1.0]
        trainer.on_train_epoch_start()
        trainer.on_train_epoch_end([trainer.train_step(next(trainer.dataloader_train))])
        trainer.on_validation_epoch_start()
        trainer.on_validation_epoch_end([trainer.validation_step(next(trainer.dataloader_val))])
        log = trainer.logger.local_logger.my_fantastic_logging
        assert log["ssl_temperature"] == [trainer.temperatures[0]] and log["ssl_temperature_2"] == [
            trainer.temperatures[1]]
        assert trainer.temperatures[0] != trainer.temperatures[1]  # two networks, two fits
        seen = []

        def record(student_logits, reference_logits, step, voxel_weights=None):
            seen.append(reference_logits)
            return reference_logits.new_zeros(()), {}

        monkeypatch.setattr(trainer, "unsupervised_loss", record)
        monkeypatch.setattr(trainer, "labeled_loss", lambda s, r, t, step: (r.new_zeros(()), {}))
        trainer.temperatures = [2.0, 4.0]
        u1, u2 = torch.randn(2, 3, 4, 4, 4), torch.randn(2, 3, 4, 4, 4)
        trainer.mutual_loss([u1, u2], [u1, u2], _step(trainer))
        assert torch.allclose(seen[0], u2 / 4.0) and torch.allclose(seen[1], u1 / 2.0)
        assert nnUNetTrainerSSL.ssl_state_dict(trainer)["temperatures"] == [2.0, 4.0]
    finally:
        trainer.on_train_end()
