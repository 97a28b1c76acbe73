"""The BCP host: the pre-training stage on mixed labeled images, the switch that starts the teacher from the
student, the two mixed images of self-training and their loss, the plain EMA, resuming either stage, presets and
cost, and short trainings with and without MetaSSL."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from helpers import budget_split, make_trainer, state_copy

from nnunet_ssl.compat.trainer import unwrap
from nnunet_ssl.errors import SSLInputError
from nnunet_ssl.losses.copy_paste import region_dice_ce
from nnunet_ssl.parts.copy_paste import largest_component_per_class, paste
from nnunet_ssl.trainers.base import full_resolution, paper_settings_of
from nnunet_ssl.trainers.hosts.bcp import LA_PRETRAIN_FRACTION, BidirectionalCopyPaste
from nnunet_ssl.trainers.plugins.metassl import MetaSSL
from nnunet_ssl.trainers.step import SSLStep

PATCH = (16, 32, 32)


class BCPMetaSSL(MetaSSL, BidirectionalCopyPaste):
    """MetaSSL on BCP, as the catalogue composes it."""


def _bcp(cls, ds, monkeypatch, pretrain_fraction=0.5, plain_supervision=False, **kwargs):
    """BCP with the official loss unless ``plain_supervision`` (the default preset's extra term)."""
    budget_split(ds)
    trainer = make_trainer(cls, ds["root"], ds["dataset"], monkeypatch, **kwargs)
    trainer.pretrain_fraction = pretrain_fraction
    trainer.plain_supervision = plain_supervision
    trainer.initialize()
    return trainer


def _fixed_mask() -> torch.Tensor:
    keep = torch.ones(PATCH, dtype=torch.bool)
    keep[3:13, 5:26, 10:31] = False  # 2/3 of each axis
    return keep


def _step(trainer, seed=0, labeled=2, unlabeled=2) -> SSLStep:
    g = torch.Generator().manual_seed(seed)
    data = torch.randn(labeled, 1, *PATCH, generator=g)
    full = torch.randint(0, 3, (labeled, 1, *PATCH), generator=g).float()
    # nnU-Net's deep-supervision targets: the full-resolution one and coarser ones
    shapes = [tuple(t.shape[2:]) for t in full_resolution_targets(trainer, full)]
    target = [torch.nn.functional.interpolate(full, size=s, mode="nearest") for s in shapes]
    return SSLStep(data=data, target=target, views={"view0": torch.randn(unlabeled, 1, *PATCH, generator=g)}, lam=0.0)


def full_resolution_targets(trainer, full):
    with torch.no_grad():
        out = trainer.network(torch.zeros(1, 1, *PATCH))
    return out if isinstance(out, (list, tuple)) else [out]


def _move_student(trainer, scale=0.05):
    with torch.no_grad():
        for p in unwrap(trainer.network).parameters():
            p.add_(scale * torch.randn_like(p))


def test_stage_zero_trains_on_mixed_labeled_images(copy_planned, monkeypatch):
    trainer = _bcp(BidirectionalCopyPaste, copy_planned, monkeypatch, epochs=2, iterations=5)
    assert trainer.total_iterations == 10 and trainer.pretrain_iterations == 5
    keep = _fixed_mask()
    monkeypatch.setattr(trainer, "draw_mask", lambda spatial: keep)
    step = _step(trainer)
    seen = {}
    original = trainer.loss

    def recording(output, target):
        seen["target"] = target
        return original(output, target)

    monkeypatch.setattr(trainer, "loss", recording)
    teacher = state_copy(trainer.teacher)
    for s in (0, 4):
        trainer.ssl_step = s
        assert trainer.in_pretraining() and trainer.current_lambda() == 0.0 and trainer.ramp() == 0.0
        sup, unsup, stats = trainer.forward_losses(step)
        assert stats["stage"] == 0.0 and float(unsup) == 0.0 and math.isfinite(float(sup.detach()))
        # L_a outside the box, L_b inside, the labels at every scale with the same (resized) box
        assert torch.equal(step.student_image, torch.where(keep, step.data[:1], step.data[1:]))
        assert torch.equal(seen["target"][0], torch.where(keep, step.target[0][:1], step.target[0][1:]))
        coarse = seen["target"][-1]
        assert coarse.shape == step.target[-1][:1].shape
        assert set(coarse.unique().tolist()) <= set(step.target[-1].unique().tolist())
        trainer.after_optimizer_step()  # no EMA update during the pre-training
        _move_student(trainer)
    for k, v in teacher.items():
        assert torch.equal(trainer.teacher.state_dict()[k], v), k


def test_self_training_mixes_both_ways_and_syncs_the_teacher_at_the_switch(copy_planned, monkeypatch):
    trainer = _bcp(BidirectionalCopyPaste, copy_planned, monkeypatch, epochs=2, iterations=5)
    keep = _fixed_mask()
    monkeypatch.setattr(trainer, "draw_mask", lambda spatial: keep)
    step = _step(trainer, seed=1)
    _move_student(trainer)  # the pre-trained student differs from the teacher
    student = unwrap(trainer.network)
    trainer.ssl_step = trainer.pretrain_iterations
    assert not trainer.in_pretraining() and trainer.current_lambda() == 0.5
    sup, unsup, stats = trainer.forward_losses(step)
    for k, v in student.state_dict().items():  # the teacher starts from the student
        assert torch.equal(trainer.teacher.state_dict()[k], v), k
    assert stats["stage"] == 1.0 and stats["pasted_fraction"] == pytest.approx(float((~keep).float().mean()))

    la, lb, ua, ub = step.data[:1], step.data[1:], step.views["view0"][:1], step.views["view0"][1:]
    y = step.target[0][:, 0].long()
    with torch.no_grad():
        teacher_logits = full_resolution(trainer.teacher(step.views["view0"]))
    pseudo, removed = largest_component_per_class(teacher_logits.argmax(1), 3)
    assert stats["lcc_removed"] == pytest.approx(removed)
    mixed = step.host_data
    assert torch.equal(mixed.pseudo_labels, pseudo) and mixed.pairs == 1
    # X_in = U_a M + L_a (1 - M), X_out = L_b M + U_b (1 - M); the targets with the same mask
    assert torch.equal(step.student_image, torch.cat([paste(ua, la, keep), paste(lb, ub, keep)]))
    assert torch.equal(mixed.target[0], torch.where(keep, pseudo[0], y[0]))
    assert torch.equal(mixed.target[1], torch.where(keep, y[1], pseudo[1]))
    assert torch.equal(mixed.labeled_region[0], ~keep) and torch.equal(mixed.labeled_region[1], keep)
    assert torch.equal(step.reference_weights, ~mixed.labeled_region)

    # L_sup: the labeled regions (weight 1); L_unsup: the pseudo-labeled ones, weighted by lambda = u_weight = 0.5
    with torch.no_grad():
        logits = full_resolution(trainer.network(step.student_image)).float()
    expected_sup = region_dice_ce(logits[:1], mixed.target[:1], ~keep) + region_dice_ce(logits[1:], mixed.target[1:],
                                                                                        keep)
    expected_unsup = region_dice_ce(logits[:1], mixed.target[:1], keep) + region_dice_ce(logits[1:],
                                                                                         mixed.target[1:], ~keep)
    assert float(sup.detach()) == pytest.approx(float(expected_sup), rel=1e-5)
    assert float(unsup.detach()) == pytest.approx(float(expected_unsup), rel=1e-5)

    # plain EMA 0.99 in stage 1, no warm-up
    before = state_copy(trainer.teacher)
    _move_student(trainer)
    trainer.after_optimizer_step()
    for k, v in student.state_dict().items():
        if v.is_floating_point():
            assert torch.allclose(trainer.teacher.state_dict()[k], 0.99 * before[k] + 0.01 * v, atol=1e-6), k

    # a later step does not sync the teacher again
    trainer.ssl_step += 1
    ema_teacher = state_copy(trainer.teacher)
    _move_student(trainer)
    trainer.forward_losses(_step(trainer, seed=2))
    for k, v in ema_teacher.items():
        assert torch.equal(trainer.teacher.state_dict()[k], v), k


def test_plain_supervision_adds_nnunets_loss_on_the_plain_labeled_batch(copy_planned, monkeypatch):
    trainer = _bcp(BidirectionalCopyPaste, copy_planned, monkeypatch, epochs=2, iterations=5)
    keep = _fixed_mask()
    monkeypatch.setattr(trainer, "draw_mask", lambda spatial: keep)
    trainer.ssl_step = trainer.pretrain_iterations
    step = _step(trainer, seed=3)
    sup_off, unsup_off, _ = trainer.forward_losses(step)
    trainer.plain_supervision = True
    trainer.ssl_step += 1  # past the switch: the teacher is not synced again
    step_on = _step(trainer, seed=3)
    sup_on, unsup_on, _ = trainer.forward_losses(step_on)
    with torch.no_grad():
        plain = trainer.loss(trainer.network(step_on.data), step_on.target)
    # the same mixed images (one forward with the plain batch first), plus nnU-Net's loss on the plain images
    assert torch.equal(step_on.student_image, step.student_image)
    assert float(sup_on.detach()) == pytest.approx(float(sup_off.detach()) + float(plain), rel=1e-4, abs=1e-5)
    assert float(unsup_on.detach()) == pytest.approx(float(unsup_off.detach()), rel=1e-4, abs=1e-6)
    # 3 B more in stage 1 only
    official = type("Official", (BidirectionalCopyPaste,), {"plain_supervision": False})
    assert BidirectionalCopyPaste.compute_units(2, 2) == pytest.approx(official.compute_units(2, 2)
                                                                       + 6 * (1 - LA_PRETRAIN_FRACTION))


def test_odd_and_single_batches_pair_with_the_next_or_themselves(copy_planned, monkeypatch):
    trainer = _bcp(BidirectionalCopyPaste, copy_planned, monkeypatch, pretrain_fraction=0.0)
    keep = _fixed_mask()
    monkeypatch.setattr(trainer, "draw_mask", lambda spatial: keep)
    step = _step(trainer, labeled=1, unlabeled=1)
    trainer.forward_losses(step)
    x, u = step.data, step.views["view0"]
    assert torch.equal(step.student_image, torch.cat([paste(u, x, keep), paste(x, u, keep)]))
    step = _step(trainer, labeled=3, unlabeled=3)
    trainer.forward_losses(step)
    x, u = step.data, step.views["view0"]
    assert step.host_data.pairs == 2 and step.student_image.shape[0] == 4
    assert torch.equal(step.student_image[2:], paste(x[[2, 0]], u[[2, 0]], keep))


@pytest.mark.parametrize("stage_step", [3, 7])
def test_resume_restores_the_stage_and_the_teacher(stage_step, copy_planned, monkeypatch, tmp_path):
    trainer = _bcp(BidirectionalCopyPaste, copy_planned, monkeypatch, epochs=2, iterations=5)
    _move_student(trainer)
    trainer.ssl_step = stage_step
    if stage_step >= trainer.pretrain_iterations:
        trainer.after_optimizer_step()
    assert any(not torch.equal(a, b) for a, b in zip(trainer.teacher.parameters(),
                                                     unwrap(trainer.network).parameters()))
    ckpt = tmp_path / "bcp.pth"
    trainer.save_checkpoint(str(ckpt))
    resumed = make_trainer(BidirectionalCopyPaste, copy_planned["root"], copy_planned["dataset"], monkeypatch,
                           epochs=2, iterations=5, continue_training=True)
    resumed.pretrain_fraction = 0.5
    resumed.initialize()
    resumed.load_checkpoint(str(ckpt))
    assert resumed.ssl_step == stage_step
    assert resumed.in_pretraining() == (stage_step < 5) == trainer.in_pretraining()
    for k, v in trainer.teacher.state_dict().items():
        assert torch.equal(resumed.teacher.state_dict()[k], v), k


def test_presets_settings_and_compute_units(copy_planned, monkeypatch):
    budget_split(copy_planned)
    default = make_trainer(BidirectionalCopyPaste, copy_planned["root"], copy_planned["dataset"], monkeypatch)
    monkeypatch.setenv("nnUNet_ssl_preset", "paper")
    paper = make_trainer(BidirectionalCopyPaste, copy_planned["root"], copy_planned["dataset"], monkeypatch)
    for trainer in (default, paper):
        assert trainer.unsupervised_weight == 0.5 and trainer.rampup_fraction == 0.0
        assert trainer.box_ratio == pytest.approx(2 / 3) and trainer.ema_max_decay == 0.99
        assert trainer.pretrain_fraction == pytest.approx(2000 / 17000) and trainer.keep_largest_component
        assert trainer.view_intensity == (True,)
    assert default.plain_supervision and not paper.plain_supervision
    for name, value in paper_settings_of(BidirectionalCopyPaste).items():
        assert getattr(paper, name) == value, name
    assert paper_settings_of(BCPMetaSSL)["unsupervised_weight"] == 0.1  # MetaSSL's schedule wins
    monkeypatch.setenv("nnUNet_ssl_settings", "pretrain_fraction=1.0")
    with pytest.raises(SSLInputError, match="pretrain_fraction"):
        make_trainer(BidirectionalCopyPaste, copy_planned["root"], copy_planned["dataset"], monkeypatch)
    f = LA_PRETRAIN_FRACTION
    # stage 0: one mixed image (3); stage 1: two mixed images (6) + the plain labeled batch (6) + the teacher on U
    # (2); MetaSSL: + teacher on L
    assert BidirectionalCopyPaste.compute_units(2, 2) == pytest.approx(f * 3 + (1 - f) * 14)
    assert BCPMetaSSL.compute_units(2, 2) == pytest.approx(f * 3 + (1 - f) * 16)


@pytest.mark.parametrize("cls", [BidirectionalCopyPaste, BCPMetaSSL])
def test_short_training_switches_stage_and_writes_the_teacher(cls, copy_planned, monkeypatch):
    # the default preset's loss (with the plain labeled batch)
    trainer = _bcp(cls, copy_planned, monkeypatch, pretrain_fraction=0.5, plain_supervision=True, epochs=2,
                   iterations=2)
    trainer.run_training()
    out = Path(trainer.output_folder)
    assert trainer.ssl_step == 4
    final = torch.load(out / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert final["ssl_state"]["ssl_step"] == 4
    saved = torch.load(out / "checkpoint_final_teacher.pth", map_location="cpu", weights_only=False)
    for k, v in trainer.teacher.state_dict().items():
        assert torch.equal(saved["network_weights"][k], v.cpu()), k
    log = trainer.logger.local_logger.my_fantastic_logging
    assert log["ssl_stage"] == [0.0, 1.0] and log["ssl_lambda"][0] == 0.0
    for key in ("ssl_sup_loss", "ssl_unsup_loss", "ssl_pasted_fraction"):
        assert len(log[key]) == 2 and all(math.isfinite(v) for v in log[key]), (key, log[key])
    assert math.isfinite(log["ssl_lcc_removed"][1]) and math.isfinite(log["ssl_confidence"][1])
    if cls is BCPMetaSSL:
        assert math.isfinite(log["ssl_labeled_branch_loss"][1]) and math.isfinite(log["ssl_u_frac_uc"][1])
        assert log["ssl_lambda"][1] > 0
    else:
        assert log["ssl_lambda"][1] == 0.5
    assert (out / "progress_ssl.png").is_file()
