"""MEDL's composed loss (MEDLLoss) against a hand computation on tiny tensors: fusion, pseudo-labels, reliability
(mask in the default preset, soft weight in the paper's), curriculum weights and the three terms, values and
gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from nnunet_ssl.losses.evidential import fisher_evidential_loss
from nnunet_ssl.losses.medl import MEDLLoss

K = 3


def _f(t: torch.Tensor) -> float:
    return float(t.detach())


def _opinion(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(b, u, alpha) with e = softplus(z): b = e / S, u = K / S, S = sum e + K."""
    e = F.softplus(z)
    s = e.sum(1, keepdim=True) + K
    return e / s, K / s, e + 1


def _fuse(b1, u1, b2, u2):
    b = b1 * b2 + (b1 * u2 + b2 * u1) / (1 + K)
    u = u1 * u2
    total = b.sum(1, keepdim=True) + u
    return b / total, u / total


def _omega(u: torch.Tensor, progress: float) -> torch.Tensor:
    """1 + tanh(psi zeta) with ascending 1-based ranks per sample (the random inputs have no ties)."""
    flat = u.reshape(u.shape[0], -1)
    ranks = flat.argsort(1).argsort(1).float() + 1
    return (1 + torch.tanh((2 * ranks / flat.shape[1] - 1) * (2 * progress - 1))).reshape(u.shape)


def _mask(r: torch.Tensor, labels: torch.Tensor, q: float) -> torch.Tensor:
    """Per pseudo-class: drop the floor(q n_c) least reliable voxels of the batch (no ties here)."""
    keep = torch.zeros_like(r)
    for c in labels.unique().tolist():
        values = sorted(r[labels == c].tolist())
        threshold = values[math.floor(q * len(values))]
        keep[(labels == c) & (r >= threshold)] = 1.0
    return keep


def _dice_ce(z: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """CE weighted per voxel and averaged over all voxels, plus 1 - soft Dice of the foreground classes per sample
    with w as loss mask (nnU-Net's smooth 1e-5)."""
    ce = (F.cross_entropy(z, y, reduction="none") * w).mean()
    p = torch.softmax(z, 1)[:, 1:]
    onehot = F.one_hot(y, K).movedim(-1, 1).float()[:, 1:]
    tp = (p * onehot * w[:, None]).sum(-1)
    dice = (2 * tp + 1e-5) / ((p * w[:, None]).sum(-1) + (onehot * w[:, None]).sum(-1) + 1e-5)
    return ce + 1 - dice.mean()


def _reference(unlabeled, labeled, labels, progress, quantile, ignore_label=None):
    """The three MEDL terms, computed from the equations with every weight a constant."""
    with torch.no_grad():
        (b1, u1, _), (b2, u2, _) = (_opinion(z) for z in unlabeled)
        b, u = _fuse(b1, u1, b2, u2)
        pseudo = b.argmax(1)
        r = torch.exp(u[:, 0] * (b * torch.log2(b)).sum(1))
        weight = r if quantile is None else _mask(r, pseudo, quantile)
        omega_u = _omega(u[:, 0], progress)
        (c1, v1, _), (c2, v2, _) = (_opinion(z) for z in labeled)
        _, fused_l = _fuse(c1, v1, c2, v2)
        omegas = [_omega(0.5 * v[:, 0] + 0.5 * fused_l[:, 0], progress) for v in (v1, v2)]
    pseudo_loss = sum(_dice_ce(z, pseudo, weight) for z in unlabeled)
    target = F.one_hot(pseudo, K).movedim(-1, 1).float()
    fisher = sum((omega_u * fisher_evidential_loss(_opinion(z)[2], target, 0.05)).mean() for z in unlabeled)
    valid = torch.ones_like(labels, dtype=torch.float32) if ignore_label is None else (labels != ignore_label).float()
    safe = labels.clamp_max(K - 1)
    weighted = 0.0
    for z, omega in zip(labeled, omegas):
        alpha = _opinion(z)[2]
        ce = torch.log(alpha.sum(1)) - torch.log(alpha.gather(1, safe[:, None])[:, 0])
        weighted = weighted + (omega * valid * ce).sum() / valid.sum()
    return pseudo_loss, weighted, fisher, dict(pseudo=pseudo, reliability=r, weight=weight, omega_u=omega_u)


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    unlabeled = [(torch.randn(2, K, 12, generator=g) * 2).requires_grad_() for _ in range(2)]
    labeled = [(torch.randn(2, K, 12, generator=g) * 2).requires_grad_() for _ in range(2)]
    labels = torch.randint(0, K, (2, 12), generator=g)
    return unlabeled, labeled, labels


@pytest.mark.parametrize("quantile", [0.2, 0.5, None])
def test_medl_terms_and_gradients_against_the_equations(quantile):
    unlabeled, labeled, labels = _inputs()
    progress = 0.1  # early: omega weights certain voxels up
    terms = MEDLLoss(reliability_quantile=quantile)(unlabeled, labeled, labels, progress)
    pseudo, weighted, fisher, parts = _reference(unlabeled, labeled, labels, progress, quantile)
    assert _f(terms.pseudo_label) == pytest.approx(_f(pseudo), rel=1e-5)
    assert _f(terms.weighted_labeled) == pytest.approx(_f(weighted), rel=1e-5)
    assert _f(terms.fisher) == pytest.approx(_f(fisher), rel=1e-5)
    # the inputs exercise each part: the curriculum is not flat, the mask drops voxels, R is a weight below 1
    assert float(parts["omega_u"].max() - parts["omega_u"].min()) > 0.5
    if quantile is None:
        assert terms.stats["medl_kept"] == pytest.approx(float(parts["reliability"].mean()), rel=1e-5)
        assert float(parts["weight"].min()) < 1
    else:
        assert terms.stats["medl_kept"] == pytest.approx(float(parts["weight"].mean()), rel=1e-6)
        assert 1 - quantile <= terms.stats["medl_kept"] < 1
    assert terms.stats["medl_reliability"] == pytest.approx(float(parts["reliability"].mean()), rel=1e-5)
    # gradients: fusion, pseudo-labels, R and omega are constants, the three terms reach all four logits
    coefficients = (0.7, 1.3, 2.1)
    got = torch.autograd.grad(sum(c * t for c, t in zip(coefficients, terms[:3])), [*unlabeled, *labeled])
    want = torch.autograd.grad(sum(c * t for c, t in zip(coefficients, (pseudo, weighted, fisher))),
                               [*unlabeled, *labeled])
    for a, b in zip(got, want):
        assert float(b.abs().max()) > 0
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)


def test_medl_mask_and_soft_weight_differ_only_in_the_pseudo_label_term():
    unlabeled, labeled, labels = _inputs(1)
    masked = MEDLLoss(reliability_quantile=0.2)(unlabeled, labeled, labels, 0.3)
    soft = MEDLLoss(reliability_quantile=None)(unlabeled, labeled, labels, 0.3)
    assert _f(masked.pseudo_label) != pytest.approx(_f(soft.pseudo_label), rel=1e-3)
    assert _f(masked.weighted_labeled) == _f(soft.weighted_labeled)
    assert _f(masked.fisher) == _f(soft.fisher)
    # q = 0 keeps every voxel with weight 1: plain Dice + CE against the fused pseudo-label
    everything = MEDLLoss(reliability_quantile=0.0)(unlabeled, labeled, labels, 0.3)
    pseudo, *_ = _reference(unlabeled, labeled, labels, 0.3, 0.0)
    assert everything.stats["medl_kept"] == 1.0
    assert _f(everything.pseudo_label) == pytest.approx(_f(pseudo), rel=1e-5)
    with pytest.raises(ValueError, match="reliability_quantile"):
        MEDLLoss(reliability_quantile=1.0)


def test_medl_curriculum_and_ignore_label():
    unlabeled, labeled, labels = _inputs(2)
    labels[0, :3] = K  # nnU-Net's ignore label is the class after the last head
    for progress in (0.0, 1.0):
        terms = MEDLLoss(ignore_label=K)(unlabeled, labeled, labels, progress)
        _, weighted, fisher, _ = _reference(unlabeled, labeled, labels, progress, 0.2, ignore_label=K)
        assert _f(terms.weighted_labeled) == pytest.approx(_f(weighted), rel=1e-5)
        assert _f(terms.fisher) == pytest.approx(_f(fisher), rel=1e-5)
    # halfway omega = 1 everywhere: L^I_u is the plain mean of the FIE loss
    terms = MEDLLoss(ignore_label=K)(unlabeled, labeled, labels, 0.5)
    _, _, _, parts = _reference(unlabeled, labeled, labels, 0.5, 0.2, ignore_label=K)
    target = F.one_hot(parts["pseudo"], K).movedim(-1, 1).float()
    plain = sum(fisher_evidential_loss(_opinion(z)[2], target, 0.05).mean() for z in unlabeled)
    assert _f(terms.fisher) == pytest.approx(_f(plain), rel=1e-5)
