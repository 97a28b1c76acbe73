"""The small reusable parts: ramps, EMA teacher, CutMix boxes."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from nnunet_ssl.losses import quality as qg
from nnunet_ssl.losses.pseudo_label import hard_pseudo_labels
from nnunet_ssl.parts.balance import LossBalance
from nnunet_ssl.parts.calibration import expected_calibration_error, fit_temperature, sample_voxels
from nnunet_ssl.parts.cutmix import apply_cutmix, cutmix_masks
from nnunet_ssl.parts.ema import ema_decay, ema_update, make_teacher
from nnunet_ssl.parts.ramps import linear_rampup, sigmoid_rampup


def test_sigmoid_rampup_values():
    assert sigmoid_rampup(0, 100) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(50, 100) == pytest.approx(math.exp(-5 * 0.25))
    assert sigmoid_rampup(100, 100) == 1.0
    assert sigmoid_rampup(250, 100) == 1.0
    assert sigmoid_rampup(3, 0) == 1.0
    values = [sigmoid_rampup(t, 10) for t in range(11)]
    assert all(a < b for a, b in zip(values, values[1:]))


def test_ema_decay_warmup():
    assert ema_decay(0) == 0.0
    assert ema_decay(1) == 0.5
    assert ema_decay(3) == 0.75
    assert ema_decay(99) == pytest.approx(0.99)
    assert ema_decay(10_000) == 0.99
    assert ema_decay(10_000, 0.999) == pytest.approx(0.999)


def test_ema_update_matches_hand_computation_and_copies_buffers():
    student = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    teacher = make_teacher(student)
    assert all(not p.requires_grad for p in teacher.parameters())
    with torch.no_grad():
        for p in teacher.parameters():
            p.fill_(1.0)
        for p in student.parameters():
            p.fill_(3.0)
        student[1].running_mean.fill_(7.0)
    ema_update(teacher, student, decay=0.75)
    for p in teacher.parameters():
        assert torch.allclose(p, torch.full_like(p, 0.75 * 1.0 + 0.25 * 3.0))
    assert torch.equal(teacher[1].running_mean, torch.full((2,), 7.0))
    # decay 0 copies the student
    ema_update(teacher, student, decay=0.0)
    for pt, ps in zip(teacher.parameters(), student.parameters()):
        assert torch.equal(pt, ps)


def test_cutmix_masks_are_boxes_of_the_requested_size():
    g = torch.Generator().manual_seed(0)
    masks = cutmix_masks(200, (20, 24, 28), p=0.5, generator=g)
    mixed = masks.flatten(1).any(1)
    assert 60 < int(mixed.sum()) < 140  # about half the samples
    for m in masks[mixed]:
        idx = m.nonzero()
        lo, hi = idx.min(0).values, idx.max(0).values + 1
        assert int(m.sum()) == int((hi - lo).prod())  # one solid box
        assert 0.005 < float(m.float().mean()) < 0.6
    assert not cutmix_masks(4, (8, 8), p=0.0).any()


def test_cutmix_mixes_images_and_pseudo_labels_identically():
    x = torch.randn(3, 2, 6, 7)
    masks = torch.zeros(3, 6, 7, dtype=torch.bool)
    masks[0, 1:4, 2:5] = True
    mixed = apply_cutmix(x, masks)
    assert torch.equal(mixed[0][:, masks[0]], x[1][:, masks[0]])  # box of sample 0 comes from sample 1
    assert torch.equal(mixed[0][:, ~masks[0]], x[0][:, ~masks[0]])
    assert torch.equal(mixed[1], x[1]) and torch.equal(mixed[2], x[2])
    # mixing logits then taking argmax equals mixing the argmax labels
    labels, _ = hard_pseudo_labels(apply_cutmix(x, masks))
    assert torch.equal(labels, apply_cutmix(x.argmax(1, keepdim=True), masks)[:, 0])


def test_linear_rampup_matches_the_official_scheduler_shape():
    assert linear_rampup(0, 10, 20) == 0.0
    assert linear_rampup(9.9, 10, 20) == 0.0
    assert linear_rampup(10, 10, 20) == 0.0
    assert linear_rampup(20, 10, 20) == pytest.approx(0.5)
    assert linear_rampup(30, 10, 20) == 1.0 and linear_rampup(1000, 10, 20) == 1.0
    assert linear_rampup(4, 5, 0) == 0.0 and linear_rampup(5, 5, 0) == 1.0
    # official defaults: QAR 30 + 40 of 200 epochs, PL-QW 15 + 30 of 200 epochs
    assert (qg.QAR_DELAY_FRACTION, qg.QAR_RAMPUP_FRACTION, qg.QAR_WEIGHT) == (0.15, 0.2, 0.01)
    assert (qg.QW_DELAY_FRACTION, qg.QW_RAMPUP_FRACTION, qg.QW_WEIGHT) == (0.075, 0.15, 0.25)


def test_loss_balance_weight_is_the_share_of_the_averaged_loss_sizes():
    balance = LossBalance(momentum=0.5, initial_weight=0.3, warmup_steps=2)
    assert balance.weight(0.2, 1000.0) == 0.3  # before the loss sizes are known
    balance.update(1.0, 0.1)
    assert balance.weight(0.2, 1000.0) == 0.3
    balance.update(3.0, 0.3)
    # EMAs 0.5 * 0.5 * 1 + 0.5 * 3 = 1.75 and 0.175; bias correction 1 - 0.5^2 = 0.75
    assert balance.averages() == pytest.approx((1.75 / 0.75, 0.175 / 0.75))
    assert balance.weight(0.2, 1000.0) == pytest.approx(0.2 * 1.75 / 0.175)
    assert balance.weight(0.2, 1.5) == 1.5  # the cap
    balance.update(float("nan"), 0.1)  # a non-finite step does not enter the averages
    assert balance.steps == 2
    restored = LossBalance(momentum=0.5, warmup_steps=2)
    restored.load_state_dict(balance.state_dict())
    assert restored.weight(0.2, 1000.0) == balance.weight(0.2, 1000.0)
    zero = LossBalance(warmup_steps=0)
    zero.update(1.0, 0.0)
    assert zero.weight(0.2, 50.0) == 50.0  # an unsupervised loss of zero gets the cap, not a division by zero


def test_loss_balance_of_constant_sizes_reaches_the_stated_share():
    balance = LossBalance()
    for _ in range(300):
        balance.update(0.5, 0.002)
    weight = balance.weight(0.2, 1000.0)
    assert weight * 0.002 == pytest.approx(0.2 * 0.5)


def test_temperature_fit_recovers_the_scale_of_over_confident_logits():
    g = torch.Generator().manual_seed(0)
    logits = 2 * torch.randn(20000, 3, generator=g)
    labels = torch.multinomial(torch.softmax(logits, 1), 1, generator=g).flatten()  # calibrated at T = 1
    assert fit_temperature(3 * logits, labels) == pytest.approx(3.0, rel=0.05)
    assert fit_temperature(logits, labels) == pytest.approx(1.0, rel=0.05)
    raw = expected_calibration_error(3 * logits, labels)
    assert expected_calibration_error(3 * logits, labels, fit_temperature(3 * logits, labels)) < raw / 3
    assert fit_temperature(logits[:0], labels[:0]) == 1.0


def test_expected_calibration_error_by_hand():
    # confidences 0.9, 0.9 (one correct) and 0.6, 0.6 (both correct), 2 classes, 10 bins:
    # ECE = 2/4 |0.5 - 0.9| + 2/4 |1.0 - 0.6| = 0.4
    p = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.4, 0.6]])
    labels = torch.tensor([0, 1, 0, 1])
    assert expected_calibration_error(torch.log(p), labels, num_bins=10) == pytest.approx(0.4, abs=1e-5)


def test_sampled_voxels_leave_out_the_ignore_label():
    logits = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(1, 2, 3, 4)
    target = torch.tensor([[[0, 1, 5, 5], [1, 1, 0, 5], [0, 0, 1, 1]]])
    x, y = sample_voxels(logits, target, count=100, ignore_label=5)
    assert y.numel() == 9 and 5 not in y.tolist()
    # each sampled row is (channel 0, channel 1) of the same voxel: channel 1 = channel 0 + 12
    assert torch.equal(x[:, 1] - x[:, 0], torch.full((9,), 12.0))
    assert sample_voxels(logits, target, count=4, ignore_label=5)[1].numel() == 4
