"""M3HL's feature losses against hand computations: the mean absolute difference and 1 - cosine per sample."""

from __future__ import annotations

import math

import pytest
import torch

from nnunet_ssl.losses.features import high_level_cosine, low_level_l1


def test_low_level_is_the_mean_absolute_difference_over_all_elements():
    student = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])  # (1, 2, 2)
    teacher = torch.tensor([[[0.0, 0.0], [0.0, 8.0]]])
    assert float(low_level_l1(student, teacher)) == pytest.approx((1 + 2 + 3 + 4) / 4)
    # a mean, not a sum: the same value for a feature map repeated over more voxels and channels
    assert float(low_level_l1(student.repeat(3, 5, 7), teacher.repeat(3, 5, 7))) == pytest.approx(2.5)


def test_high_level_is_one_minus_the_cosine_of_each_flattened_sample():
    student = torch.tensor([[[1.0, 0.0], [0.0, 0.0]], [[1.0, 1.0], [0.0, 0.0]], [[1.0, 2.0], [2.0, 0.0]]])
    teacher = torch.tensor([[[0.0, 1.0], [0.0, 0.0]], [[2.0, 2.0], [0.0, 0.0]], [[0.0, 0.0], [3.0, 4.0]]])
    # orthogonal: 1; parallel: 0; (1, 2, 2, 0) . (0, 0, 3, 4) = 6, norms 3 and 5: 1 - 6/15
    expected = (1.0 + 0.0 + (1 - 6 / 15)) / 3
    assert float(high_level_cosine(student, teacher)) == pytest.approx(expected, abs=1e-6)
    assert float(high_level_cosine(-teacher, teacher)) == pytest.approx(2.0)  # opposite features


def test_float32_gradients_to_the_student_and_shape_checks():
    student = torch.randn(2, 3, 4, 4, dtype=torch.float16, requires_grad=True)
    teacher = torch.randn(2, 3, 4, 4, dtype=torch.float16)
    low, high = low_level_l1(student, teacher), high_level_cosine(student, teacher)
    assert low.dtype == torch.float32 and high.dtype == torch.float32
    (grad,) = torch.autograd.grad(low, student)
    # d mean|s - t| / ds = sign(s - t) / N
    expected = torch.sign(student.float() - teacher.float()) / student.numel()
    assert torch.allclose(grad.float(), expected, rtol=1e-3)  # the gradient comes back in float16
    assert math.isfinite(float(high.detach()))
    with pytest.raises(ValueError, match="differ in shape"):
        low_level_l1(torch.zeros(2, 3), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="differ in shape"):
        high_level_cosine(torch.zeros(2, 3), torch.zeros(1, 3))
