"""AD-MT's entropy-weighted fusion of two teachers, the student compromise and the official CE normalisation,
against hand computations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from nnunet_ssl.losses.teachers import (
    cross_entropy_over_confident,
    entropy_bits,
    entropy_weighted_fusion,
    prefer_confident_student,
    sharpen,
)


def test_fusion_weights_and_probabilities_on_two_voxels():
    # (B=1, C=2, 2 voxels); voxel 0: A uniform (1 bit), B certain (0 bits); voxel 1: A (0.25, 0.75), B uniform
    prob_a = torch.tensor([[[0.5, 0.25], [0.5, 0.75]]])
    prob_b = torch.tensor([[[1.0, 0.5], [0.0, 0.5]]])
    h_a = [1.0, -(0.25 * math.log2(0.25) + 0.75 * math.log2(0.75))]  # 1 and 0.8113 bits
    h_b = [0.0, 1.0]
    assert entropy_bits(prob_a)[0].tolist() == pytest.approx(h_a, abs=1e-6)
    assert entropy_bits(prob_b)[0].tolist() == pytest.approx(h_b, abs=1e-6)
    w = [math.exp(-ha) / (math.exp(-ha) + math.exp(-hb)) for ha, hb in zip(h_a, h_b)]
    assert w[0] == pytest.approx(1 / (1 + math.e))  # exp of bits: 0.269, not the 1/3 of entropies in nats
    fused, weight_a = entropy_weighted_fusion(prob_a, prob_b)
    assert weight_a.shape == (1, 2) and weight_a[0].tolist() == pytest.approx(w, abs=1e-6)
    expected = [[w[0] * 0.5 + (1 - w[0]) * 1.0, w[1] * 0.25 + (1 - w[1]) * 0.5],
                [w[0] * 0.5 + (1 - w[0]) * 0.0, w[1] * 0.75 + (1 - w[1]) * 0.5]]
    assert fused[0].tolist() == [pytest.approx(row, abs=1e-6) for row in expected]
    assert fused.sum(1).tolist() == [pytest.approx([1.0, 1.0])]
    assert fused.dtype == torch.float32
    # the fusion is symmetric in the teachers: swapping them swaps the weights
    fused_ba, weight_b = entropy_weighted_fusion(prob_b, prob_a)
    assert torch.allclose(fused_ba, fused) and torch.allclose(weight_b, 1 - weight_a)


def test_fusion_is_stable_for_extreme_probabilities_and_sharpening_one_is_a_no_op():
    certain = F.one_hot(torch.tensor([[0, 1, 2]]), 3).permute(0, 2, 1).float()
    uniform = torch.full((1, 3, 3), 1 / 3)
    fused, weight_a = entropy_weighted_fusion(certain, uniform)
    assert torch.isfinite(fused).all() and torch.isfinite(weight_a).all()
    h = math.log2(3)
    assert weight_a[0].tolist() == pytest.approx([1 / (1 + math.exp(-h))] * 3, abs=1e-6)
    assert sharpen(fused, 1.0) is fused
    sharp = sharpen(torch.tensor([[[0.75], [0.25]]]), 0.5)  # p^2 / sum: (9/16, 1/16) / (10/16)
    assert sharp[0, :, 0].tolist() == pytest.approx([0.9, 0.1])


def test_compromise_replaces_exactly_the_voxels_the_rule_names():
    # voxel:                 0     1     2     3     4     5
    labels = torch.tensor([[1, 1, 1, 1, 2, 0]])
    confidence = torch.tensor([[0.6, 0.6, 0.6, 0.9, 0.5, 0.7]])
    student_labels = torch.tensor([[2, 2, 1, 2, 0, 1]])
    student_confidence = torch.tensor([[0.8, 0.8, 0.99, 0.8, 0.6, 0.7]])
    conflict = torch.tensor([[True, False, True, True, True, True]])
    # 0: all three hold -> student; 1: teachers agree; 2: student agrees with the fusion; 3: student less
    # confident; 4: all three hold -> student; 5: equal confidence (not strictly more)
    new_labels, new_confidence, replaced = prefer_confident_student(labels, confidence, student_labels,
                                                                    student_confidence, conflict)
    assert replaced.tolist() == [[True, False, False, False, True, False]]
    assert new_labels.tolist() == [[2, 1, 1, 1, 0, 0]]
    assert new_confidence[0].tolist() == pytest.approx([0.8, 0.6, 0.6, 0.9, 0.6, 0.7])
    assert labels.tolist() == [[1, 1, 1, 1, 2, 0]]  # inputs untouched


def test_cross_entropy_over_confident_divides_by_the_confident_voxels():
    logits = torch.zeros(1, 3, 4)  # CE = log 3 at every voxel
    target = torch.zeros(1, 4, dtype=torch.long)
    mask = torch.tensor([[True, False, False, False]])
    assert cross_entropy_over_confident(logits, target, mask).item() == pytest.approx(math.log(3))
    # as F.cross_entropy with the unconfident voxels ignored
    ignored = torch.where(mask, target, torch.full_like(target, -100))
    assert cross_entropy_over_confident(logits, target, mask).item() == pytest.approx(
        F.cross_entropy(logits, ignored, ignore_index=-100).item())
    assert cross_entropy_over_confident(logits, target, torch.zeros_like(mask)).item() == 0.0  # not NaN
