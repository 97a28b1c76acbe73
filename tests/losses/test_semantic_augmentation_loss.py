"""TransMedSeg's pieces on small tensors: ISDA's logit adjustment against the formula, the bound against a Monte-Carlo
estimate of the expected cross-entropy (and equality without covariance), the forgetting class statistics against
a weighted mean and covariance computed by hand, the transfer between sides, and the state round trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nnunet_ssl.losses.semantic_augmentation import (
    ClassStatistics,
    augmented_logits,
    logit_adjustment,
    semantic_augmentation_loss,
    transfer_terms,
)


def _problem(seed: int = 0, classes: int = 3, dim: int = 4, voxels: int = 5):
    """A linear head, features, labels, shifts and covariances (positive definite), float64."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(classes, dim, generator=g, dtype=torch.float64)
    bias = torch.randn(classes, generator=g, dtype=torch.float64)
    features = torch.randn(voxels, dim, generator=g, dtype=torch.float64)
    labels = torch.randint(0, classes, (voxels,), generator=g)
    shift = 0.5 * torch.randn(classes, dim, generator=g, dtype=torch.float64)
    root = 0.4 * torch.randn(classes, dim, dim, generator=g, dtype=torch.float64)
    covariance = root @ root.transpose(1, 2) + 0.05 * torch.eye(dim, dtype=torch.float64)
    return weight, bias, features, labels, shift, covariance


def test_adjustment_is_the_formula_per_class_pair():
    weight, _, _, _, shift, covariance = _problem(1)
    alpha = 0.7
    adjustment = logit_adjustment(weight, shift, covariance, alpha)
    for y in range(3):
        for j in range(3):
            d = weight[j] - weight[y]
            expected = alpha * d @ shift[y] + 0.5 * alpha * d @ covariance[y] @ d
            assert float(adjustment[y, j]) == pytest.approx(float(expected), rel=1e-12, abs=1e-12)
    assert torch.all(adjustment.diagonal() == 0)
    with pytest.raises(ValueError, match="do not match"):
        logit_adjustment(weight, shift[:, :2], covariance, alpha)


def test_bound_against_monte_carlo_expected_cross_entropy():
    weight, bias, features, labels, shift, covariance = _problem(2)
    alpha, draws = 0.8, 200_000
    adjustment = logit_adjustment(weight, shift, covariance, alpha)
    logits = features @ weight.T + bias  # (N, C)
    bound = F.cross_entropy(augmented_logits(logits.T[None], labels[None], adjustment), labels[None],
                            reduction="none")[0]
    g = torch.Generator().manual_seed(3)
    roots = torch.linalg.cholesky(alpha * covariance)
    for i, y in enumerate(labels.tolist()):
        eps = torch.randn(draws, features.shape[1], generator=g, dtype=torch.float64)
        shifted = features[i] + alpha * shift[y] + eps @ roots[y].T  # a' ~ N(a + alpha dmu_y, alpha Sigma_y)
        z = shifted @ weight.T + bias
        ce = F.cross_entropy(z, torch.full((draws,), y), reduction="none")
        error = 3 * float(ce.std()) / draws ** 0.5
        # Jensen: E[CE] <= the bound, with a real gap for a non-zero covariance
        assert float(ce.mean()) <= float(bound[i]) + error
        assert float(bound[i]) - float(ce.mean()) > error
        # the inner expectation is exact: log E[sum_j exp(z'_j - z'_y)] is the bound (the 1/2 of the Gaussian MGF)
        mgf = torch.exp(z - z[:, y:y + 1]).sum(1)
        assert float(torch.log(mgf.mean())) == pytest.approx(float(bound[i]), rel=2e-2)
    # the loss is the mean of the per-voxel bounds
    loss = semantic_augmentation_loss(logits.T[None].float(), labels[None], adjustment.float())
    assert float(loss) == pytest.approx(float(bound.mean()), rel=1e-5)


def test_without_covariance_the_bound_is_the_shifted_features_cross_entropy():
    weight, bias, features, labels, shift, covariance = _problem(4)
    alpha = 1.3
    adjustment = logit_adjustment(weight, shift, torch.zeros_like(covariance), alpha)
    logits = (features @ weight.T + bias).T[None]
    shifted = ((features + alpha * shift[labels]) @ weight.T + bias).T[None]
    assert float(semantic_augmentation_loss(logits, labels[None], adjustment)) == pytest.approx(
        float(F.cross_entropy(shifted, labels[None])), rel=1e-6)
    # and alpha = 0 is the plain cross-entropy
    assert float(semantic_augmentation_loss(logits, labels[None], logit_adjustment(weight, shift, covariance, 0.0))
                 ) == pytest.approx(float(F.cross_entropy(logits, labels[None])), rel=1e-6)


def test_loss_weights_voxels_in_3d():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 3, 2, 3, 4, generator=g)
    labels = torch.randint(0, 3, (2, 2, 3, 4), generator=g)
    adjustment = torch.rand(3, 3, generator=g).fill_diagonal_(0)
    weights = torch.rand(2, 2, 3, 4, generator=g)
    ce = F.cross_entropy(logits + adjustment[labels].permute(0, 4, 1, 2, 3), labels, reduction="none")
    assert float(semantic_augmentation_loss(logits, labels, adjustment, weights)) == pytest.approx(
        float((ce * weights).sum() / weights.sum()), rel=1e-6)
    mask = weights > 0.5
    assert float(semantic_augmentation_loss(logits, labels, adjustment, mask)) == pytest.approx(
        float(ce[mask].mean()), rel=1e-6)
    assert float(semantic_augmentation_loss(logits, labels, adjustment, torch.zeros_like(weights))) == 0.0


def _weighted_moments(samples: list[tuple[np.ndarray, float]]) -> tuple[np.ndarray, np.ndarray]:
    """Weighted mean and biased covariance of feature rows, each batch with its own weight per voxel."""
    rows = np.concatenate([x for x, _ in samples])
    w = np.concatenate([np.full(len(x), wt) for x, wt in samples])
    mean = (w[:, None] * rows).sum(0) / w.sum()
    centered = rows - mean
    return mean, (w[:, None] * centered).T @ centered / w.sum()


def test_statistics_forget_exponentially_by_hand_with_masks_and_an_ignore_label():
    rho, classes, dim = 0.9, 4, 3
    g = torch.Generator().manual_seed(6)
    stats = ClassStatistics(classes, dim)
    # 2D batches (B, D, H, W); features around an offset of 3 (the moments are taken about the running mean)
    f1 = 3 + torch.randn(2, dim, 5, 6, generator=g)
    y1 = torch.randint(0, 3, (2, 5, 6), generator=g)  # class 3 never appears
    y1[0, 0, :3] = 7  # an ignore label: no class
    m1 = torch.rand(2, 5, 6, generator=g) > 0.3
    f2 = 3 + 2 * torch.randn(1, dim, 4, 4, generator=g)
    y2 = torch.randint(0, 2, (1, 4, 4), generator=g)  # class 2 absent from the second batch
    m2 = torch.ones(1, 4, 4, dtype=torch.bool)
    stats.update(stats.moments(f1, y1, m1), rho)
    first_mean = stats.mean.clone()
    stats.update(stats.moments(f2, y2, m2), rho)

    def rows(f, y, m, c):
        sel = ((y == c) & m).numpy()
        return f.double().movedim(1, -1).numpy()[sel]

    for c in range(classes):
        r1, r2 = rows(f1, y1, m1, c), rows(f2, y2, m2, c)
        assert float(stats.count[c]) == len(r1) + len(r2)
        assert float(stats.weight[c]) == pytest.approx(rho * len(r1) + len(r2))  # W = rho (rho 0 + n1) + n2
        if not len(r1) + len(r2):
            assert torch.all(stats.mean[c] == 0) and torch.all(stats.covariance[c] == 0)
            continue
        mean, cov = _weighted_moments([(r1, rho), (r2, 1.0)])  # each voxel decays by rho per later update
        np.testing.assert_allclose(stats.mean[c].numpy(), mean, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(stats.covariance[c].numpy(), cov, rtol=1e-5, atol=1e-6)
    assert float(stats.count[3]) == 0 and float(stats.count[2]) > 0
    assert torch.equal(stats.mean[2], first_mean[2])  # absent from batch 2: kept, only its weight decays
    # the ignore-label voxels counted for no class, the masked-out ones neither
    assert float(stats.count.sum()) == float(((y1 < 3) & m1).sum() + m2.sum())
    assert torch.allclose(stats.covariance, stats.covariance.transpose(1, 2))
    # rho = 1: ISDA's cumulative estimate, every voxel with the same weight
    cumulative = ClassStatistics(classes, dim)
    cumulative.update(cumulative.moments(f1, y1, m1), 1.0)
    cumulative.update(cumulative.moments(f2, y2, m2), 1.0)
    mean, cov = _weighted_moments([(rows(f1, y1, m1, 0), 1.0), (rows(f2, y2, m2, 0), 1.0)])
    np.testing.assert_allclose(cumulative.mean[0].numpy(), mean, rtol=1e-6)
    np.testing.assert_allclose(cumulative.covariance[0].numpy(), cov, rtol=1e-5, atol=1e-6)


def test_moments_sum_over_batches_like_ranks_and_the_state_round_trips():
    g = torch.Generator().manual_seed(7)
    f = torch.randn(4, 3, 2, 5, 5, generator=g)
    y = torch.randint(0, 2, (4, 2, 5, 5), generator=g)
    whole, halves = ClassStatistics(2, 3), ClassStatistics(2, 3)
    whole.update(whole.moments(f, y), 0.99)
    # two "ranks" with half of the batch each: their summed moments give the same statistics (DDP's all-reduce)
    halves.update(halves.moments(f[:2], y[:2]) + halves.moments(f[2:], y[2:]), 0.99)
    for a, b in zip(whole.state_dict().values(), halves.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6)
    restored = ClassStatistics(2, 3)
    restored.load_state_dict(whole.state_dict())
    for k, v in whole.state_dict().items():
        assert torch.equal(getattr(restored, k), v) and v.dtype == torch.float64, k
    with pytest.raises(ValueError, match=r"expected \(2, 4\)"):
        ClassStatistics(2, 4).load_state_dict(whole.state_dict())
    with pytest.raises(ValueError, match="moments of"):
        whole.update(torch.zeros(3, dtype=torch.float64), 0.9)


def test_transfer_moves_one_side_toward_the_other_only_for_classes_both_have_seen():
    own, other = ClassStatistics(3, 2), ClassStatistics(3, 2)
    own.mean, other.mean = torch.randn(3, 2, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)
    other.covariance = torch.eye(2, dtype=torch.float64).repeat(3, 1, 1) * torch.tensor([1.0, 2.0, 3.0])[:, None,
                                                                                                          None]
    own.count = torch.tensor([500.0, 5.0, 500.0], dtype=torch.float64)
    other.count = torch.tensor([500.0, 500.0, 99.0], dtype=torch.float64)
    shift, covariance, active = transfer_terms(own, other, 100)
    assert active.tolist() == [True, False, False]
    assert torch.equal(shift[0], other.mean[0] - own.mean[0]) and torch.equal(covariance[0], other.covariance[0])
    assert torch.all(shift[1:] == 0) and torch.all(covariance[1:] == 0)
