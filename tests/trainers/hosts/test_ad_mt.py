"""The AD-MT host: alternating EMA teachers, their fusion as the reference, the CutMix and strong turns, the
calibration of each teacher, the SSL state and a short training with MetaSSL."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from helpers import budget_split, make_trainer, state_copy

from nnunet_ssl.compat.trainer import unwrap
from nnunet_ssl.losses.teachers import entropy_weighted_fusion
from nnunet_ssl.parts.alternation import AlternatingTeachers
from nnunet_ssl.parts.cutmix import apply_cutmix
from nnunet_ssl.parts.ema import ema_decay
from nnunet_ssl.trainers import nnUNetTrainerADMT, nnUNetTrainerADMTMetaSSL
from nnunet_ssl.trainers.base import full_resolution, paper_settings_of
from nnunet_ssl.trainers.step import SSLStep


class _PerVoxel(torch.nn.Module):
    """Logits ``w_c * x`` per class c from the first channel: a network that acts voxel by voxel, so its output on a
    CutMixed image is its output CutMixed with the same boxes."""

    def __init__(self, *weights: float):
        super().__init__()
        self.register_buffer("w", torch.tensor(weights).view(1, -1, 1, 1, 1))

    def forward(self, x):
        return x[:, :1] * self.w


def _admt(cls, ds, monkeypatch, **kwargs):
    budget_split(ds)
    trainer = make_trainer(cls, ds["root"], ds["dataset"], monkeypatch, **kwargs)
    trainer.initialize()
    return trainer


def _views(seed: int = 0, batch: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"view0": torch.randn(batch, 1, 8, 8, 8, generator=g), "view1": torch.randn(batch, 1, 8, 8, 8, generator=g)}


def _per_voxel_networks(trainer):
    # A: argmax 0 where x > 0, else 1; B: argmax 0 where x > 0, else 2: the teachers conflict exactly where x < 0
    trainer.network = _PerVoxel(1.0, 0.5, -1.0)
    trainer.teacher = _PerVoxel(1.0, -1.0, 0.0)
    trainer.teacher2 = _PerVoxel(1.0, 0.0, -1.0)


def _fused(trainer, image):
    probs = [torch.softmax(t(image), 1) for t in (trainer.teacher, trainer.teacher2)]
    return entropy_weighted_fusion(*probs)[0]


def test_only_the_active_teacher_moves_and_the_turn_advances(copy_planned, monkeypatch):
    trainer = _admt(nnUNetTrainerADMT, copy_planned, monkeypatch)
    student = unwrap(trainer.network)
    trainer.sync_reference_from_student()
    trainer.alternation = AlternatingTeachers(1)  # a turn of one step: A, B, A, ...
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.1 * torch.randn_like(p))
    before_a, before_b = state_copy(trainer.teacher), state_copy(trainer.teacher2)
    trainer.after_optimizer_step()  # A's update 0: alpha = 0, a copy of the student
    for k, v in student.state_dict().items():
        assert torch.equal(trainer.teacher.state_dict()[k], v), k
        assert torch.equal(trainer.teacher2.state_dict()[k], before_b[k]), k  # B bit-identical
    assert any(not torch.equal(trainer.teacher.state_dict()[k], v) for k, v in before_a.items())
    assert trainer.teacher_updates == [1, 0] and trainer.alternation.active == 1

    a_now = state_copy(trainer.teacher)
    trainer.after_optimizer_step()  # B's update 0: B copies the student, A stays
    for k, v in student.state_dict().items():
        assert torch.equal(trainer.teacher2.state_dict()[k], v), k
        assert torch.equal(trainer.teacher.state_dict()[k], a_now[k]), k
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.1 * torch.randn_like(p))
    b_now, s_now = state_copy(trainer.teacher2), state_copy(student)
    trainer.after_optimizer_step()  # A's update 1: alpha = 0.5
    for name, p in trainer.teacher.named_parameters():
        assert torch.allclose(p, 0.5 * a_now[name] + 0.5 * s_now[name], atol=1e-6), name
    for k, v in b_now.items():
        assert torch.equal(trainer.teacher2.state_dict()[k], v), k
    assert trainer.teacher_updates == [2, 1]

    # the official rule: t = iteration // 2, a copy while t < 40, then min(1 - 1/(t - 40 + 1), 0.99)
    trainer.ema_step_rule, trainer.ema_copy_steps = "half_iteration", 40
    trainer.ssl_step = 79
    assert trainer.ema_decay_of(0) == 0.0
    trainer.ssl_step = 100  # t = 50
    assert trainer.ema_decay_of(1) == pytest.approx(1 - 1 / 11) == ema_decay(10)
    trainer.ssl_step = 10_000
    assert trainer.ema_decay_of(0) == 0.99


def test_cutmix_turn_mixes_image_pseudo_labels_conflicts_and_student_with_the_same_boxes(copy_planned, monkeypatch):
    trainer = _admt(nnUNetTrainerADMT, copy_planned, monkeypatch)
    _per_voxel_networks(trainer)
    trainer.alternation.active = 1  # teacher B's turn: CutMix of the weak view
    views = _views()
    step = SSLStep(data=torch.zeros(0, 1, 8, 8, 8), target=torch.zeros(0), views=views, lam=1.0)
    student_in = trainer.student_input(step)
    reference = trainer.reference_logits(step)
    assert step.mix is not None and step.mix.flatten(1).any(1).all()  # cutmix_probability 1: every sample
    assert torch.equal(student_in, apply_cutmix(views["view0"], step.mix))  # the weak image, not the strong one
    assert not torch.equal(student_in, views["view0"])
    # per-voxel networks: each mixed quantity equals the network's output on the mixed image
    assert torch.allclose(torch.softmax(reference, 1), _fused(trainer, student_in), atol=1e-6)
    assert torch.allclose(reference.exp(), apply_cutmix(_fused(trainer, views["view0"]), step.mix), atol=1e-6)
    assert torch.equal(step.host_data.student_logits, trainer.network(student_in))
    assert not torch.equal(step.host_data.student_logits, trainer.network(views["view0"]))
    assert torch.equal(step.host_data.conflict, student_in[:, 0] < 0)
    stats = step.host_data.stats
    assert stats["teacher_a_active"] == 0.0
    assert stats["teachers_conflict"] == pytest.approx(float((views["view0"] < 0).float().mean()))

    # the loss takes the student's label where it conflicts with the fusion, the teachers conflict and it is surer
    student_logits = torch.randn(4, 3, 8, 8, 8)
    loss, loss_stats = trainer.unsupervised_loss(student_logits, reference, step)
    fused = torch.softmax(reference, 1)
    conf, labels = fused.max(1)
    s_conf, s_labels = torch.softmax(step.host_data.student_logits, 1).max(1)
    replaced = (labels != s_labels) & (student_in[:, 0] < 0) & (s_conf > conf)
    assert replaced.any() and loss_stats["student_replaced"] == pytest.approx(float(replaced.float().mean()))
    final_labels = torch.where(replaced, s_labels, labels)
    mask = torch.where(replaced, s_conf, conf) >= trainer.confidence_threshold
    ce = torch.nn.functional.cross_entropy(student_logits, final_labels, reduction="none")
    assert loss.item() == pytest.approx(float((ce * mask).sum() / mask.numel()), rel=1e-5)  # / all voxels
    trainer.ce_normalisation = "confident"  # the paper preset: / the confident voxels
    loss, _ = trainer.unsupervised_loss(student_logits, reference, step)
    assert loss.item() == pytest.approx(float((ce * mask).sum() / mask.sum()), rel=1e-5)


def test_strong_turn_does_not_mix(copy_planned, monkeypatch):
    trainer = _admt(nnUNetTrainerADMT, copy_planned, monkeypatch)
    _per_voxel_networks(trainer)
    assert trainer.alternation.teacher_a_active
    views = _views(1)
    step = SSLStep(data=torch.zeros(0, 1, 8, 8, 8), target=torch.zeros(0), views=views, lam=1.0)
    assert trainer.student_input(step) is views["view1"] and step.mix is None
    reference = trainer.reference_logits(step)
    assert torch.allclose(torch.softmax(reference, 1), _fused(trainer, views["view0"]), atol=1e-6)
    assert torch.equal(step.host_data.student_logits, trainer.network(views["view0"]))
    assert torch.equal(step.host_data.conflict, views["view0"][:, 0] < 0)
    assert step.host_data.stats["teacher_a_active"] == 1.0


def test_each_teacher_is_divided_by_its_own_temperature_once(copy_planned, monkeypatch):
    trainer = _admt(nnUNetTrainerADMT, copy_planned, monkeypatch)
    _per_voxel_networks(trainer)
    assert trainer.calibrate_reference and trainer.reference_is_calibrated and trainer.calibrated_count == 2
    assert trainer.calibration_networks() == [trainer.teacher, trainer.teacher2]
    trainer.temperatures = [2.0, 4.0]
    monkeypatch.setattr(trainer, "loss", lambda output, target: full_resolution(output).sum() * 0)
    seen = {}

    def recording(student_logits, reference_logits, step):
        seen["reference"] = reference_logits
        return reference_logits.new_zeros(()), {}

    monkeypatch.setattr(trainer, "unsupervised_loss", recording)
    views = _views(2)
    step = SSLStep(data=torch.zeros(0, 1, 8, 8, 8), target=torch.zeros(0), views=views, lam=1.0)
    _, _, stats = trainer.forward_losses(step)
    weak = views["view0"]
    expected = entropy_weighted_fusion(torch.softmax(trainer.teacher(weak) / 2.0, 1),
                                       torch.softmax(trainer.teacher2(weak) / 4.0, 1))[0]
    assert torch.allclose(torch.softmax(seen["reference"], 1), expected, atol=1e-6)
    twice = entropy_weighted_fusion(torch.softmax(trainer.teacher(weak) / 4.0, 1),
                                    torch.softmax(trainer.teacher2(weak) / 16.0, 1))[0]
    assert not torch.allclose(torch.softmax(seen["reference"], 1), twice, atol=1e-3)
    assert stats["coverage"] == pytest.approx(float((expected.max(1).values >= 0.95).float().mean()))
    # the student's weak logits go through the active teacher's temperature (A: 2)
    assert torch.allclose(step.host_data.student_logits, trainer.network(weak) / 2.0)
    assert stats["mixed_fraction"] == 0.0 and stats["teacher_a_active"] == 1.0


def test_presets_and_compute_units(copy_planned, monkeypatch):
    budget_split(copy_planned)
    default = make_trainer(nnUNetTrainerADMT, copy_planned["root"], copy_planned["dataset"], monkeypatch,
                           iterations=10)
    assert default.unsupervised_weight == 1.0 and default.rampup_fraction == 0.2
    assert default.confidence_threshold == 0.95 and default.calibrate_reference
    assert default.view_intensity == (False, "strong") and default.cutmix_probability == 1.0
    assert default.alternation.max_period == 5  # half an epoch of 10 iterations
    monkeypatch.setenv("nnUNet_ssl_preset", "paper")
    paper = make_trainer(nnUNetTrainerADMT, copy_planned["root"], copy_planned["dataset"], monkeypatch,
                         iterations=10)
    for name, value in paper_settings_of(nnUNetTrainerADMT).items():
        assert getattr(paper, name) == value, name
    assert paper.unsupervised_weight == 2.0 and paper.rampup_fraction == 0.4 and paper.confidence_threshold == 0.8
    assert paper.view_intensity == (False, True) and not paper.calibrate_reference
    assert paper.alternation.max_period == 19 and paper.cutmix_probability == 1.0
    # MetaSSL's schedule wins on the combined trainer
    assert paper_settings_of(nnUNetTrainerADMTMetaSSL)["unsupervised_weight"] == 0.1
    # student 3 (B + U), two teachers 2 U, the student's weak view U; MetaSSL: both teachers on the labeled batch
    assert nnUNetTrainerADMT.compute_units(2, 2) == 3 * 4 + 2 * 2 + 2
    assert nnUNetTrainerADMTMetaSSL.compute_units(2, 2) == 3 * 4 + 2 * 2 + 2 + 2 * 2


def test_ssl_state_restores_both_teachers_and_the_alternation(copy_planned, monkeypatch, tmp_path):
    trainer = _admt(nnUNetTrainerADMT, copy_planned, monkeypatch)
    trainer.alternation = AlternatingTeachers(7, seed=3)
    student = unwrap(trainer.network)

    def train_one_step():  # a student that moves, and the EMA of the active teacher
        with torch.no_grad():
            for p in student.parameters():
                p.add_(0.01 * torch.randn_like(p))
        trainer.after_optimizer_step()

    for _ in range(20):
        train_one_step()
    while trainer.alternation.counter == 0:
        train_one_step()
    ckpt = tmp_path / "admt.pth"
    trainer.save_checkpoint(str(ckpt))
    resumed = make_trainer(nnUNetTrainerADMT, copy_planned["root"], copy_planned["dataset"], monkeypatch,
                           continue_training=True)
    resumed.load_checkpoint(str(ckpt))
    for mine, theirs in ((trainer.teacher, resumed.teacher), (trainer.teacher2, resumed.teacher2)):
        for k, v in mine.state_dict().items():
            assert torch.equal(theirs.state_dict()[k], v), k
    assert not all(torch.equal(a, b) for a, b in zip(resumed.teacher.parameters(), resumed.teacher2.parameters()))
    assert resumed.alternation.state_dict() == trainer.alternation.state_dict()
    assert resumed.teacher_updates == trainer.teacher_updates and min(trainer.teacher_updates) > 0
    assert [resumed.alternation.step() for _ in range(30)] == [trainer.alternation.step() for _ in range(30)]


@pytest.mark.parametrize("cls", [nnUNetTrainerADMT, nnUNetTrainerADMTMetaSSL])
def test_short_training_writes_both_teachers(cls, copy_planned, monkeypatch):
    trainer = _admt(cls, copy_planned, monkeypatch, epochs=2, iterations=2)
    trainer.run_training()
    out = Path(trainer.output_folder)
    assert trainer.ssl_step == 4 and trainer.teacher_updates == [2, 2]  # turns of one step (half an epoch)
    for filename, teacher in (("checkpoint_final_teacher.pth", trainer.teacher),
                              ("checkpoint_final_teacher2.pth", trainer.teacher2)):
        saved = torch.load(out / filename, map_location="cpu", weights_only=False)
        assert saved["trainer_name"] == cls.__name__
        for k, v in teacher.state_dict().items():
            assert torch.equal(saved["network_weights"][k], v.cpu()), (filename, k)
    final = torch.load(out / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert final["ssl_state"]["alternation"] == trainer.alternation.state_dict()
    log = trainer.logger.local_logger.my_fantastic_logging
    keys = ["ssl_teachers_conflict", "ssl_teacher_a_weight", "ssl_teacher_a_active", "ssl_unsup_loss"]
    if cls is nnUNetTrainerADMT:
        keys.append("ssl_student_replaced")
    else:
        assert "ssl_student_replaced" not in log and len(log["ssl_labeled_branch_loss"]) == 2
    for key in keys:
        assert len(log[key]) == 2 and all(math.isfinite(v) for v in log[key]), (key, log[key])
    assert all(0.0 <= v <= 1.0 for v in log["ssl_teacher_a_weight"])
    assert (out / "progress_ssl.png").is_file()
