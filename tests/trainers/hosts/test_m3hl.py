"""The M3HL host: per-sample block masks mixing labeled and unlabeled images both ways with their labels and
pseudo-labels, BCP's region losses, the feature terms against the teacher's features of the unlabeled originals
(gradients to the student only), MetaSSL on top, resuming, presets and cost, 2D, and one short training."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from helpers import budget_split, budgeted_trainer, make_trainer, random_batch, state_copy

from nnunet_ssl.compat.trainer import feature_taps, unwrap
from nnunet_ssl.errors import SSLInputError
from nnunet_ssl.losses.copy_paste import region_dice_ce
from nnunet_ssl.losses.features import high_level_cosine, low_level_l1
from nnunet_ssl.parts.copy_paste import largest_component_per_class
from nnunet_ssl.trainers.base import full_resolution, paper_settings_of
from nnunet_ssl.trainers.hosts.m3hl import MutualMaskMixFeatures
from nnunet_ssl.trainers.plugins.metassl import MetaSSL
from nnunet_ssl.trainers.step import SSLStep

PATCH = (16, 32, 32)


class M3HLMetaSSL(MetaSSL, MutualMaskMixFeatures):
    """MetaSSL on M3HL, as the catalogue composes it."""


def _step(trainer, patch=PATCH, seed=0, labeled=2, unlabeled=2) -> SSLStep:
    data, target, views = random_batch(trainer, patch, seed, labeled, unlabeled, views=1)
    return SSLStep(data=data, target=target, views=views, lam=0.5)


def _hand_masks(pairs: int, patch=PATCH) -> torch.Tensor:
    """Two different hand-made masks (True = M = 1: unlabeled content in X_in)."""
    keep = torch.ones(pairs, *patch, dtype=torch.bool)
    keep[0, : patch[0] // 2] = False
    if pairs > 1:
        keep[1, ..., : patch[-1] // 4] = False
    return keep


def _move_student(trainer, scale=0.05):
    with torch.no_grad():
        for p in unwrap(trainer.network).parameters():
            p.add_(scale * torch.randn_like(p))


def _features(network, images):
    with torch.no_grad(), feature_taps(network) as taps:
        network(images)
    return taps.read()


def test_step_mixes_with_per_sample_masks_and_adds_the_feature_terms(copy_planned, monkeypatch):
    # the mixed images' loss by hand; BCP's tests cover the plain labeled batch (plain_supervision)
    monkeypatch.setenv("nnUNet_ssl_settings", "plain_supervision=False")
    trainer = budgeted_trainer(MutualMaskMixFeatures, copy_planned, monkeypatch)
    assert trainer.pretrain_iterations == 0 and not trainer.in_pretraining() and trainer.current_lambda() == 0.5
    keep = _hand_masks(2)
    monkeypatch.setattr(trainer, "draw_masks", lambda samples, spatial: keep[:samples])
    step = _step(trainer, labeled=4, unlabeled=4)
    _move_student(trainer)
    trainer.ssl_step = 0
    sup, unsup, stats = trainer.forward_losses(step)
    student = unwrap(trainer.network)
    for k, v in student.state_dict().items():  # step 0 starts the teacher from the student
        assert torch.equal(trainer.teacher.state_dict()[k], v), k

    x, u, y = step.data, step.views["view0"], step.target[0][:, 0].long()
    la, lb, ua, ub = x[:2], x[2:], u[:2], u[2:]
    m = keep[:, None]
    # X_in = U_a M + L_a (1 - M), X_out = L_b M + U_b (1 - M), each pair with its own M_i
    assert torch.equal(step.student_image, torch.cat([torch.where(m, ua, la), torch.where(m, lb, ub)]))
    with torch.no_grad():
        teacher_logits = full_resolution(trainer.teacher(u))
    pseudo, removed = largest_component_per_class(teacher_logits.argmax(1), 3)
    mixed = step.host_data
    assert mixed.pairs == 2 and torch.equal(mixed.pseudo_labels, pseudo) and stats["lcc_removed"] == removed
    # labels and pseudo-labels mixed with exactly the image's mask
    for i in range(2):
        assert torch.equal(mixed.target[i], torch.where(keep[i], pseudo[i], y[i]))
        assert torch.equal(mixed.target[2 + i], torch.where(keep[i], y[2 + i], pseudo[2 + i]))
    assert torch.equal(mixed.labeled_region, torch.cat([~keep, keep]))
    assert torch.equal(step.reference_weights, torch.cat([keep, ~keep]))
    assert stats["pasted_fraction"] == pytest.approx(float((~keep).float().mean()))

    with torch.no_grad():
        logits = full_resolution(trainer.network(step.student_image)).float()
    t = mixed.target
    expected_sup = region_dice_ce(logits[:2], t[:2], ~keep) + region_dice_ce(logits[2:], t[2:], keep)
    expected_unsup = region_dice_ce(logits[:2], t[:2], keep) + region_dice_ce(logits[2:], t[2:], ~keep)
    assert float(sup.detach()) == pytest.approx(float(expected_sup), rel=1e-5)
    assert float(unsup.detach()) == pytest.approx(float(expected_unsup), rel=1e-5)

    # features: the student on X_in against the teacher on U_a, on X_out against U_b ("shared")
    s_high, s_low = _features(trainer.network, step.student_image)
    t_high, t_low = _features(trainer.teacher, u)
    low = (low_level_l1(s_low[:2], t_low[:2]) + low_level_l1(s_low[2:], t_low[2:])) / 2
    high = (high_level_cosine(s_high[:2], t_high[:2]) + high_level_cosine(s_high[2:], t_high[2:])) / 2
    assert stats["feature_low"] == pytest.approx(float(low), rel=1e-5)
    assert stats["feature_high"] == pytest.approx(float(high), rel=1e-5)
    assert float(low) > 0 and float(high) > 0
    (term,) = step.constant_losses
    assert term.dtype == torch.float32 and float(term.detach()) == pytest.approx(0.5 * float(low + high), rel=1e-5)
    assert float(step.total(sup, unsup).detach()) == pytest.approx(
        float(expected_sup + 0.5 * expected_unsup + 0.5 * (low + high)), rel=1e-5)

    # the official pairs: both mixed images against both originals, index by index
    trainer.feature_pairs = "all"
    step2 = _step(trainer, labeled=4, unlabeled=4)
    trainer.ssl_step = 1
    _, _, stats2 = trainer.forward_losses(step2)
    s_high, s_low = _features(trainer.network, step2.student_image)
    t_high, t_low = _features(trainer.teacher, step2.views["view0"])
    pairs = [(s, k) for s in (slice(0, 2), slice(2, 4)) for k in (slice(0, 2), slice(2, 4))]
    low4 = sum(low_level_l1(s_low[s], t_low[k]) for s, k in pairs) / 4
    high4 = sum(high_level_cosine(s_high[s], t_high[k]) for s, k in pairs) / 4
    assert stats2["feature_low"] == pytest.approx(float(low4), rel=1e-5)
    assert stats2["feature_high"] == pytest.approx(float(high4), rel=1e-5)


def test_feature_gradients_reach_the_student_only(copy_planned, monkeypatch):
    trainer = budgeted_trainer(MutualMaskMixFeatures, copy_planned, monkeypatch)
    step = _step(trainer, seed=3)
    trainer.forward_losses(step)
    (term,) = step.constant_losses
    term.backward()
    student = unwrap(trainer.network)
    first = student.encoder.stages[0].parameters().__next__()
    assert first.grad is not None and float(first.grad.abs().sum()) > 0  # through the low and high features
    # the last segmentation head is after both taps: the feature terms give it no gradient
    assert all(p.grad is None or float(p.grad.abs().sum()) == 0 for p in student.decoder.seg_layers[-1].parameters())
    assert all(p.grad is None and not p.requires_grad for p in trainer.teacher.parameters())
    # a real block mask: 4 x 4 x 4 cells of 4 x 8 x 8 voxels on the 16 x 32 x 32 patch, half of them zero
    assert step.host_data.keep.shape == (1, *PATCH) and float((~step.host_data.keep).float().mean()) == 0.5

    # an optional BCP pre-training (off in both presets) mixes the labeled halves with one block mask
    keep = _hand_masks(1)
    monkeypatch.setattr(trainer, "draw_masks", lambda samples, spatial: keep[:samples])
    trainer.pretrain_fraction, trainer.ssl_step = 0.5, 0
    step = _step(trainer, seed=6)
    _, unsup, stats = trainer.forward_losses(step)
    assert stats["stage"] == 0.0 and float(unsup) == 0.0
    assert torch.equal(step.student_image, torch.where(keep[0], step.data[:1], step.data[1:]))


def test_metassl_on_m3hl_and_a_2d_step(copy_planned, monkeypatch):
    trainer = budgeted_trainer(M3HLMetaSSL, copy_planned, monkeypatch)
    step = _step(trainer, seed=4)
    sup, unsup, stats = trainer.forward_losses(step)
    assert math.isfinite(float(sup.detach())) and math.isfinite(float(unsup.detach()))
    assert math.isfinite(stats["labeled_branch_loss"]) and "u_frac_uc" in stats and len(step.constant_losses) == 1
    assert torch.equal(step.reference_weights, step.host_data.pseudo_region)

    # the 2d configuration of the same plans; the step runs on tensors, nnU-Net only needs a data folder to exist
    pp = copy_planned["root"] / "preprocessed" / copy_planned["dataset"]
    (pp / "nnUNetPlans_2d").symlink_to(pp / "nnUNetPlans_3d_fullres")
    planar = budgeted_trainer(MutualMaskMixFeatures, copy_planned, monkeypatch, configuration="2d")
    patch = (32, 32)
    keep = planar.draw_masks(3, patch)
    assert keep.shape == (3, *patch) and all(int((~k).sum()) == 8 * 8 * 8 for k in keep)  # 8 of 16 blocks of 8^2
    step = _step(planar, patch=patch, seed=5, labeled=6, unlabeled=6)
    sup, unsup, stats = planar.forward_losses(step)
    assert step.student_image.shape == (6, 1, *patch) and step.host_data.keep.shape == (3, *patch)
    assert math.isfinite(float(sup.detach())) and stats["feature_low"] > 0 and stats["feature_high"] > 0


def test_resume_restores_the_teacher_and_the_step(copy_planned, monkeypatch, tmp_path):
    trainer = budgeted_trainer(MutualMaskMixFeatures, copy_planned, monkeypatch)
    trainer.ssl_step = 3
    _move_student(trainer)
    trainer.after_optimizer_step()
    ckpt = tmp_path / "m3hl.pth"
    trainer.save_checkpoint(str(ckpt))
    resumed = budgeted_trainer(MutualMaskMixFeatures, copy_planned, monkeypatch, continue_training=True)
    resumed.load_checkpoint(str(ckpt))
    assert resumed.ssl_step == 3
    for k, v in state_copy(trainer.teacher).items():
        assert torch.equal(resumed.teacher.state_dict()[k], v), k
    assert not any(torch.equal(a, b) for a, b in zip(resumed.teacher.parameters(),
                                                     unwrap(resumed.network).parameters()) if a.numel() > 1)


def test_presets_settings_and_compute_units(copy_planned, monkeypatch):
    budget_split(copy_planned)
    default = make_trainer(MutualMaskMixFeatures, copy_planned["root"], copy_planned["dataset"], monkeypatch)
    monkeypatch.setenv("nnUNet_ssl_preset", "paper")
    paper = make_trainer(MutualMaskMixFeatures, copy_planned["root"], copy_planned["dataset"], monkeypatch)
    for trainer in (default, paper):
        assert trainer.unsupervised_weight == 0.5 and trainer.rampup_fraction == 0.0
        assert trainer.pretrain_fraction == 0.0 and trainer.ema_max_decay == 0.99 and trainer.keep_largest_component
        assert trainer.mask_grid == 4 and trainer.mask_ratio == 0.5 and trainer.feature_weight == 0.5
    assert default.feature_pairs == "shared" and paper.feature_pairs == "all"
    assert default.plain_supervision and not paper.plain_supervision
    for name, value in paper_settings_of(MutualMaskMixFeatures).items():
        assert getattr(paper, name) == value, name
    assert paper_settings_of(M3HLMetaSSL)["unsupervised_weight"] == 0.1  # MetaSSL's schedule wins
    monkeypatch.delenv("nnUNet_ssl_preset")
    for bad, name in [("mask_ratio=1.0", "mask_ratio"), ("mask_grid=(4, 4)", "mask_grid"),
                      ("feature_pairs='both'", "feature_pairs"), ("feature_weight=-1.0", "feature_weight")]:
        monkeypatch.setenv("nnUNet_ssl_settings", bad)
        with pytest.raises(SSLInputError, match=name):
            make_trainer(MutualMaskMixFeatures, copy_planned["root"], copy_planned["dataset"], monkeypatch)
    # two mixed images (6) + the teacher on U (2) + the plain labeled batch (6); MetaSSL: + the teacher on L (2);
    # batches of 4: n = 2
    assert MutualMaskMixFeatures.compute_units(2, 2) == 14.0 and M3HLMetaSSL.compute_units(2, 2) == 16.0
    assert MutualMaskMixFeatures.compute_units(4, 4) == 28.0
    monkeypatch.setattr(MutualMaskMixFeatures, "plain_supervision", False)
    assert MutualMaskMixFeatures.compute_units(2, 2) == 8.0


def test_short_training_writes_the_teacher_and_logs_the_feature_terms(copy_planned, monkeypatch):
    trainer = budgeted_trainer(MutualMaskMixFeatures, copy_planned, monkeypatch, epochs=1, iterations=2)
    trainer.run_training()
    out = Path(trainer.output_folder)
    assert trainer.ssl_step == 2
    saved = torch.load(out / "checkpoint_final_teacher.pth", map_location="cpu", weights_only=False)
    for k, v in trainer.teacher.state_dict().items():
        assert torch.equal(saved["network_weights"][k], v.cpu()), k
    log = trainer.logger.local_logger.my_fantastic_logging
    for key in ("ssl_feature_low", "ssl_feature_high", "ssl_other_share", "ssl_unsup_loss", "ssl_pasted_fraction"):
        assert len(log[key]) == 1 and math.isfinite(log[key][0]) and log[key][0] > 0, (key, log[key])
    assert log["ssl_stage"] == [1.0] and log["ssl_lambda"] == [0.5]
    assert (out / "progress_ssl.png").is_file()
