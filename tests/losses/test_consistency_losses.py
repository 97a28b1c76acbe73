"""Consistency and pseudo-label losses and the confidence statistics every host logs, against hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from nnunet_ssl.losses.consistency import (
    confidence_stats,
    masked_mse_consistency,
    mse_consistency,
    predictive_entropy,
    uncertainty_threshold,
)
from nnunet_ssl.losses.pseudo_label import masked_cross_entropy, masked_soft_dice


def test_mse_consistency_hand_computed():
    # two classes, one voxel: logits (0, 0) -> p = (0.5, 0.5); logits (log 3, 0) -> p = (0.75, 0.25)
    s = torch.tensor([[[0.0], [0.0]]], requires_grad=True)
    t = torch.tensor([[[math.log(3.0)], [0.0]]])
    loss = mse_consistency(s, t)
    assert loss.item() == pytest.approx(((0.5 - 0.75) ** 2 + (0.5 - 0.25) ** 2) / 2)
    loss.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    # half-precision input is computed in float32
    assert mse_consistency(s.detach().half(), t.half()).dtype == torch.float32
    # sigmoid (region) variant: sigmoid(0) = 0.5, sigmoid(log 3) = 0.75 per channel
    assert mse_consistency(s.detach(), t, regions=True).item() == pytest.approx(((0.5 - 0.75) ** 2 + 0) / 2)


def test_confidence_stats_hand_computed():
    # three voxels with max probabilities 0.75, 0.5, ~0.982
    logits = torch.tensor([[[math.log(3.0), 0.0, 4.0], [0.0, 0.0, 0.0]]])
    stats = confidence_stats(logits, threshold=0.9)
    p3 = 1 / (1 + math.exp(-4.0))
    assert stats["confidence"] == pytest.approx((0.75 + 0.5 + p3) / 3)
    assert stats["coverage"] == pytest.approx(1 / 3)


def test_masked_cross_entropy_and_dice_hand_computed():
    logits = torch.tensor([[[math.log(3.0), 0.0], [0.0, 0.0]]]).permute(0, 2, 1)  # (1, 2 classes, 2 voxels)
    target = torch.tensor([[0, 1]])
    mask = torch.tensor([[True, False]])
    # voxel 0: p(class 0) = 0.75 -> CE = -log 0.75; voxel 1 masked; normalised by all 2 voxels
    assert masked_cross_entropy(logits, target, mask).item() == pytest.approx(-math.log(0.75) / 2)
    assert masked_cross_entropy(logits, target).item() == pytest.approx((-math.log(0.75) - math.log(0.5)) / 2)
    # foreground Dice with only voxel 1 (class 1) unmasked: p1 = 0.5 -> 2*0.5/(0.5+1)
    dice = masked_soft_dice(logits, target, torch.tensor([[False, True]]))
    assert dice.item() == pytest.approx(1 - (2 * 0.5 + 1e-5) / (0.5 + 1 + 1e-5), abs=1e-6)


def test_masked_mse_counts_only_the_masked_voxels():
    # voxel 0: p_s = (0.5, 0.5), p_t = (0.75, 0.25); voxel 1: p_s = (0.5, 0.5), p_t = (0.5, 0.5) -> 0
    s = torch.zeros(1, 2, 2, requires_grad=True)
    t = torch.tensor([[[math.log(3.0), 0.0], [0.0, 0.0]]])
    both = masked_mse_consistency(s, t, torch.ones(1, 2))
    assert both.item() == pytest.approx(2 * 0.25 ** 2 / (2 * 2))  # equals the plain mean
    assert both.item() == pytest.approx(mse_consistency(s, t).item())
    first = masked_mse_consistency(s, t, torch.tensor([[1.0, 0.0]]))
    assert first.item() == pytest.approx(2 * 0.25 ** 2 / 2)  # normalised by C x (one voxel)
    assert masked_mse_consistency(s, t, torch.tensor([[0.0, 1.0]])).item() == 0.0
    assert masked_mse_consistency(s, t, torch.zeros(1, 2)).item() == 0.0  # empty mask: 0, not NaN
    first.backward()
    assert s.grad[..., 1].abs().sum() == 0 and s.grad[..., 0].abs().sum() > 0


def test_predictive_entropy_and_the_ua_mt_threshold():
    p = torch.tensor([[[0.5, 1.0], [0.5, 0.0]]])  # voxel 0 uniform over 2 classes, voxel 1 certain
    h = predictive_entropy(p)
    assert h.shape == (1, 2)
    assert h[0, 0].item() == pytest.approx(math.log(2)) and h[0, 1].item() == 0.0
    three = torch.full((1, 3, 1), 1 / 3)
    assert predictive_entropy(three).item() == pytest.approx(math.log(3))
    # regions: binary entropy per channel, averaged: (ln 2 + 0) / 2
    assert predictive_entropy(torch.tensor([[[0.5], [1.0]]]), regions=True).item() == pytest.approx(math.log(2) / 2)
    assert uncertainty_threshold(0.0, 3) == pytest.approx(0.75 * math.log(3))
    assert uncertainty_threshold(1.0, 3) == pytest.approx(math.log(3))
    assert uncertainty_threshold(0.5, 4) == pytest.approx(0.875 * math.log(4))
    assert uncertainty_threshold(1.0, 4, regions=True) == pytest.approx(math.log(2))
