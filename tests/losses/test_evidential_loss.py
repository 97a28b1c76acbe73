"""Evidential losses, MEDL's fusion, reliability and curriculum, against hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from nnunet_ssl.losses.evidential import (
    class_aware_fusion,
    combined_uncertainty,
    curriculum_weight,
    dirichlet_from_logits,
    dirichlet_kl_to_uniform,
    evidential_cross_entropy,
    fisher_evidential_loss,
    log_det_fisher,
    one_hot,
    predictive_entropy,
    reliability,
    reliability_mask,
    total_uncertainty,
    uncertainty_ranks,
)

TRIGAMMA_1 = math.pi ** 2 / 6  # psi1(1); psi1(n + 1) = psi1(n) - 1 / n^2


def _trigamma_int(n: int) -> float:
    return TRIGAMMA_1 - sum(1.0 / k ** 2 for k in range(1, n))


def _voxel(values) -> torch.Tensor:
    """A (1, K, 1) tensor: one voxel with K channels."""
    return torch.tensor(values, dtype=torch.float32)[None, :, None]


def test_dirichlet_quantities_from_logits():
    # softplus(0) = ln 2, softplus(ln(e - 1)) = 1, softplus(-30) ~ 0
    d = dirichlet_from_logits(_voxel([0.0, math.log(math.e - 1), -30.0]))
    e = torch.tensor([math.log(2), 1.0, 0.0])
    alpha = e + 1
    s = float(alpha.sum())
    assert torch.allclose(d.alpha[0, :, 0], alpha, atol=1e-6)
    assert float(d.strength) == pytest.approx(s, abs=1e-6)
    assert torch.allclose(d.belief[0, :, 0], e / s, atol=1e-6)
    assert float(d.uncertainty) == pytest.approx(3 / s, abs=1e-6)
    assert torch.allclose(d.probability[0, :, 0], alpha / s, atol=1e-6)
    assert float(d.belief.sum() + d.uncertainty) == pytest.approx(1.0, abs=1e-6)
    # more evidence, less uncertainty; the argmax is the logits' argmax (nnU-Net's segmentation is unchanged)
    z = torch.randn(2, 3, 4, 4)
    assert torch.all(total_uncertainty(z + 7) < total_uncertainty(z + 5))
    assert torch.equal(dirichlet_from_logits(z).alpha.argmax(1), z.argmax(1))


def test_fisher_loss_against_hand_computation():
    alpha = _voxel([2.0, 1.0, 1.0])
    y = _voxel([1.0, 0.0, 0.0])
    s, t1, t2, ts = 4.0, _trigamma_int(1), _trigamma_int(2), _trigamma_int(4)
    mse = 0.5 ** 2 * t2 + 2 * 0.25 ** 2 * t1
    var = 2 * 2 / (s ** 2 * (s + 1)) * t2 + 2 * (1 * 3 / (s ** 2 * (s + 1))) * t1
    log_det = math.log(t2) + 2 * math.log(t1) + math.log(1 - ts * (1 / t2 + 2 / t1))
    assert float(log_det_fisher(alpha)) == pytest.approx(log_det, rel=1e-5)
    assert float(fisher_evidential_loss(alpha, y, 0.0)) == pytest.approx(mse + var, rel=1e-5)
    assert float(fisher_evidential_loss(alpha, y, 1.0)) == pytest.approx(mse + var - log_det, rel=1e-5)
    assert float(fisher_evidential_loss(alpha, y, 0.5)) == pytest.approx(mse + var - 0.5 * log_det, rel=1e-5)
    # the determinant is that of the Dirichlet's Fisher matrix diag(psi1(alpha)) - psi1(S) 11^T
    fisher = np.diag([t2, t1, t1]) - ts * np.ones((3, 3))
    assert float(log_det_fisher(alpha)) == pytest.approx(math.log(np.linalg.det(fisher)), rel=1e-5)


def test_fisher_loss_is_finite_in_float32_for_extreme_and_half_inputs():
    # (4 voxels as a batch, 3 classes, 1): saturated, large, no evidence at all, huge
    logits = torch.tensor([[1e4, -1e4, 0.0], [60.0, 59.0, 58.0], [-1e4, -1e4, -1e4], [1e6, 1e6, 1e6]])[..., None]
    logits.requires_grad_(True)
    alpha = dirichlet_from_logits(logits).alpha
    target = one_hot(torch.zeros(4, 1, dtype=torch.long), 3)
    loss = fisher_evidential_loss(alpha, target, 1.0)
    assert torch.isfinite(loss).all()
    loss.sum().backward()
    assert torch.isfinite(logits.grad).all()
    # float32 would lose 1 - psi1(S) sum 1/psi1(alpha) at S ~ 3e6; the float64 evaluation matches scipy
    from scipy.special import polygamma

    big = np.array([1e6, 1e6, 1e6 + 1.0])
    ref = np.log(polygamma(1, big)).sum() + np.log(1 - polygamma(1, big.sum()) * (1 / polygamma(1, big)).sum())
    assert float(log_det_fisher(torch.tensor(big, dtype=torch.float32)[None, :, None])) == pytest.approx(ref,
                                                                                                         rel=1e-4)
    half = torch.randn(2, 3, 4, 4).half()
    assert dirichlet_from_logits(half).alpha.dtype == torch.float32
    assert torch.isfinite(fisher_evidential_loss(dirichlet_from_logits(half).alpha, one_hot(
        torch.zeros(2, 4, 4, dtype=torch.long), 3))).all()


@pytest.mark.parametrize("z0", [-2.0, 0.0, 2.0, 5.0])
def test_fisher_loss_gradient_builds_evidence_for_the_target_class(z0):
    def grad(coefficient: float) -> torch.Tensor:
        z = torch.tensor([[[z0], [0.0], [0.0]]], requires_grad=True)
        fisher_evidential_loss(dirichlet_from_logits(z).alpha, _voxel([1.0, 0.0, 0.0]), coefficient).sum().backward()
        return z.grad[0, :, 0]

    g = grad(0.05)  # the default: descent raises the target's logit and lowers the others
    assert g[0] < 0 < g[1] and g[1] == g[2]
    if z0 >= 0:  # with I-EDL's class default 1 the regulariser also removes the target's evidence
        assert grad(1.0)[0] > 0


def test_kl_and_evidential_cross_entropy_against_hand_computation():
    y = _voxel([1.0, 0.0, 0.0])
    # misleading evidence on class 1: KL(Dir(1, 3, 1) || Dir(1, 1, 1)) = ln(4!/(2! 2!)) - 2 (1/3 + 1/4)
    expected = math.log(24 / 4) - 2 * (1 / 3 + 1 / 4)
    assert float(dirichlet_kl_to_uniform(_voxel([1.0, 3.0, 1.0]), y)) == pytest.approx(expected, rel=1e-5)
    # evidence on the target class alone is not penalised
    assert float(dirichlet_kl_to_uniform(_voxel([7.0, 1.0, 1.0]), y)) == pytest.approx(0.0, abs=1e-6)
    assert float(evidential_cross_entropy(_voxel([2.0, 1.0, 1.0]), torch.tensor([[0]]))) == pytest.approx(
        math.log(2), rel=1e-6)
    assert float(evidential_cross_entropy(_voxel([2.0, 1.0, 1.0]), torch.tensor([[2]]))) == pytest.approx(
        math.log(4), rel=1e-6)


def test_class_aware_fusion_against_hand_computation():
    b1, u1 = _voxel([0.6, 0.1]), torch.tensor([[[0.3]]])
    b2, u2 = _voxel([0.5, 0.2]), torch.tensor([[[0.3]]])
    b, u = class_aware_fusion(b1, u1, b2, u2)
    # K = 2, coefficient 1/3: b = (0.3 + 0.33/3, 0.02 + 0.09/3) = (0.41, 0.05), u = 0.09, total 0.55
    assert torch.allclose(b[0, :, 0], torch.tensor([0.41, 0.05]) / 0.55, atol=1e-6)
    assert float(u) == pytest.approx(0.09 / 0.55, abs=1e-6)
    # symmetric, normalised, and two agreeing opinions are more certain than either
    rb, ru = class_aware_fusion(b2, u2, b1, u1)
    assert torch.allclose(rb, b) and torch.allclose(ru, u)
    d1, d2 = dirichlet_from_logits(torch.randn(2, 4, 5, 5) * 3), dirichlet_from_logits(torch.randn(2, 4, 5, 5) * 3)
    fb, fu = class_aware_fusion(d1.belief, d1.uncertainty, d2.belief, d2.uncertainty)
    assert torch.allclose(fb.sum(1, keepdim=True) + fu, torch.ones_like(fu), atol=1e-6)
    same_b, same_u = class_aware_fusion(d1.belief, d1.uncertainty, d1.belief, d1.uncertainty)
    confident = d1.belief.max(1, keepdim=True).values > d1.uncertainty
    assert torch.all(same_u[confident] < d1.uncertainty[confident])
    assert torch.equal(same_b.argmax(1), d1.belief.argmax(1))


def test_reliability_and_combined_uncertainty():
    # sum b log2 b = 0.5 * (-1) + 0.25 * (-2) = -1, so R = exp(0.25 * -1)
    assert float(reliability(_voxel([0.5, 0.25]), torch.tensor([[[0.25]]]))) == pytest.approx(math.exp(-0.25))
    assert float(reliability(_voxel([1.0, 0.0]), torch.tensor([[[0.0]]]))) == pytest.approx(1.0)
    # an opinion spread over classes is less reliable than a peaked one with the same uncertainty
    u = torch.tensor([[[0.4]]])
    assert float(reliability(_voxel([0.3, 0.3]), u)) < float(reliability(_voxel([0.6, 0.0]), u))
    assert float(combined_uncertainty(torch.tensor(0.2), torch.tensor(0.6))) == pytest.approx(0.4)
    assert float(combined_uncertainty(torch.tensor(0.2), torch.tensor(0.6), 0.25, 0.75)) == pytest.approx(0.5)


def test_reliability_mask_keeps_each_pseudo_class_above_its_own_quantile_pooled_over_the_batch():
    # class 0 has 5 voxels over both samples, class 1 has 3, all less reliable than class 0's
    r = torch.tensor([[0.90, 0.20, 0.50, 0.10, 0.30],
                      [0.70, 0.95, 0.05, 0.60, 0.80]])
    labels = torch.tensor([[0, 0, 0, 1, 1],
                           [0, 0, 1, 2, 2]])
    # q = 0.2: class 0 drops floor(0.2 * 5) = 1 voxel (R 0.20), class 1 (n 3) and class 2 (n 2) drop none
    assert reliability_mask(r, labels, 0.2).tolist() == [[1, 0, 1, 1, 1], [1, 1, 1, 1, 1]]
    # q = 0.5: class 0 drops 2 (0.20, 0.50), class 1 drops 1 (0.05), class 2 drops 1 (0.60)
    assert reliability_mask(r, labels, 0.5).tolist() == [[1, 0, 0, 1, 1], [1, 1, 0, 0, 1]]
    # a single quantile over all voxels would drop the whole of class 1; per class it keeps >= 1 - q of each
    mask = reliability_mask(r, labels, 0.5)
    for c in range(3):
        assert float(mask[labels == c].mean()) >= 0.5
    assert torch.equal(reliability_mask(r, labels, 0.0), torch.ones_like(r))
    # ties at the threshold are kept; the mask is a float 0/1 map without gradient
    tied = reliability_mask(torch.full((1, 4), 0.9, requires_grad=True), torch.zeros(1, 4, dtype=torch.long), 0.5)
    assert torch.equal(tied, torch.ones(1, 4)) and not tied.requires_grad and tied.dtype == torch.float32
    for q in (1.0, -0.1):
        with pytest.raises(ValueError):
            reliability_mask(r, labels, q)


def test_uncertainty_ranks_average_ties():
    u = torch.tensor([[0.1, 0.3, 0.3, 0.2]])
    assert uncertainty_ranks(u).tolist() == [[1.0, 3.5, 3.5, 2.0]]
    assert uncertainty_ranks(u, descending=True).tolist() == [[4.0, 1.5, 1.5, 3.0]]
    two = torch.stack([torch.tensor([[0.4, 0.1], [0.3, 0.2]]), torch.tensor([[0.0, 0.0], [0.0, 1.0]])])
    assert uncertainty_ranks(two).tolist() == [[[4.0, 1.0], [3.0, 2.0]], [[2.0, 2.0], [2.0, 4.0]]]


def test_curriculum_weights_certain_voxels_first_then_uncertain_ones():
    u = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    # ranks 1..4, psi = 2h/4 - 1 = (-0.5, 0, 0.5, 1); at the start zeta = -1
    start = curriculum_weight(u, 0.0, amplitude=1.0)
    assert torch.allclose(start[0], 1 + torch.tanh(torch.tensor([0.5, 0.0, -0.5, -1.0])), atol=1e-6)
    end = curriculum_weight(u, 1.0, amplitude=1.0)
    assert torch.allclose(end[0], 1 + torch.tanh(torch.tensor([-0.5, 0.0, 0.5, 1.0])), atol=1e-6)
    assert torch.allclose(curriculum_weight(u, 0.5), torch.ones_like(u))
    # direction of the schedule: the most certain voxel loses weight over training, the most uncertain gains it
    progress = np.linspace(0, 1, 11)
    certain = [float(curriculum_weight(u, q)[0, 0]) for q in progress]
    uncertain = [float(curriculum_weight(u, q)[0, 3]) for q in progress]
    assert all(a > b for a, b in zip(certain, certain[1:])) and all(a < b for a, b in zip(uncertain, uncertain[1:]))
    assert start[0, 0] > 1 > start[0, 3] and end[0, 0] < 1 < end[0, 3]
    # Eq. 6 as printed (descending sort) does the reverse; the amplitude scales the deviation from 1
    literal = curriculum_weight(u, 0.0, direction="literal")
    assert literal[0, 3] > 1 > literal[0, 0]
    assert torch.allclose(curriculum_weight(u, 0.0, amplitude=0.5) - 1, 0.5 * (start - 1), atol=1e-6)
    big = curriculum_weight(torch.rand(2, 8, 8, 8), 0.0, amplitude=1.0)
    assert float(big.min()) >= 1 - math.tanh(1) - 1e-6 and float(big.max()) <= 1 + math.tanh(1) + 1e-6
    assert float(big.mean()) == pytest.approx(1.0, abs=1e-2)
    with pytest.raises(ValueError):
        curriculum_weight(u, 0.0, direction="hard_to_easy")


def test_predictive_entropy():
    assert torch.allclose(predictive_entropy(torch.zeros(1, 3, 2, 2)), torch.ones(1, 2, 2))
    p = torch.tensor([0.7, 0.2, 0.1])
    expected = float(-(p * p.log()).sum() / math.log(3))
    assert float(predictive_entropy(p.log()[None, :, None])) == pytest.approx(expected, rel=1e-6)
    assert float(predictive_entropy(_voxel([50.0, -50.0, -50.0]))) == pytest.approx(0.0, abs=1e-6)
    # regions: mean binary entropy, 1 at p = 0.5
    assert float(predictive_entropy(_voxel([0.0, 0.0]), regions=True)) == pytest.approx(1.0)
    q = torch.sigmoid(torch.tensor(2.0))
    h = float(-(q * q.log() + (1 - q) * (1 - q).log()) / math.log(2))
    assert float(predictive_entropy(_voxel([2.0, 0.0]), regions=True)) == pytest.approx((h + 1) / 2, rel=1e-6)
