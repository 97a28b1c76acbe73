"""Evidential deep learning for segmentation: Dirichlet outputs, the Fisher-information evidential loss, MEDL's
class-aware evidential fusion, reliability and curriculum weights. Pure functions on tensors (no nnU-Net imports).

References
----------
* MEDL: He et al., "Mutual Evidential Deep Learning for Medical Image Segmentation", BIBM 2024; extended version
  arXiv 2505.12418 (equation numbers below follow the extended version). No official code was released.
* I-EDL: Deng et al., "Uncertainty Estimation by Fisher Information-based Evidential Deep Learning", ICML 2023;
  code danruod/IEDL (read to understand the loss; nothing copied).
* EDL: Sensoy et al., "Evidential Deep Learning to Quantify Classification Uncertainty", NeurIPS 2018.

Conventions
-----------
Tensors are ``(B, K, *spatial)`` for class maps and ``(B, *spatial)`` for voxel maps. Every function casts its
input to float32 (parts of the Fisher log-determinant run in float64, see :func:`log_det_fisher`), so it is safe
to call on float16/bfloat16 network outputs; callers run it outside autocast.

Subjective logic on K classes (MEDL §III-A): evidence ``e_n >= 0``, ``alpha_n = e_n + 1``, Dirichlet strength
``S = sum_n alpha_n``, belief ``b_n = e_n / S``, uncertainty ``u = K / S`` (so ``sum_n b_n + u = 1``), expected
probability ``p_n = alpha_n / S``.

Evidence from logits: ``e = softplus(z)``. The paper does not say how evidence is obtained; softplus is I-EDL's
choice, is non-negative, smooth, never overflows (linear above 20 in PyTorch) and keeps ``argmax_n alpha_n =
argmax_n z_n``, so nnU-Net's argmax segmentation of the logits equals the evidential one.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

#: curriculum directions accepted by :func:`curriculum_weight`
CURRICULUM_DIRECTIONS = ("easy_to_hard", "literal")


class Dirichlet(NamedTuple):
    """Subjective-logic quantities of one prediction; ``strength`` and ``uncertainty`` keep the class axis (size 1)."""

    alpha: torch.Tensor        # (B, K, ...)
    strength: torch.Tensor     # S, (B, 1, ...)
    belief: torch.Tensor       # b = e / S, (B, K, ...)
    uncertainty: torch.Tensor  # u = K / S, (B, 1, ...)
    probability: torch.Tensor  # p = alpha / S, (B, K, ...)


def evidence_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Non-negative evidence ``e = softplus(z)`` in float32 (see the module docstring for why softplus)."""
    return F.softplus(logits.float())


def dirichlet_from_logits(logits: torch.Tensor) -> Dirichlet:
    """``alpha = softplus(z) + 1`` and the derived ``S, b, u, p`` of MEDL §III-A, in float32."""
    evidence = evidence_from_logits(logits)
    alpha = evidence + 1.0
    strength = alpha.sum(1, keepdim=True)
    k = logits.shape[1]
    return Dirichlet(alpha, strength, evidence / strength, k / strength, alpha / strength)


def total_uncertainty(logits: torch.Tensor) -> torch.Tensor:
    """Dirichlet total uncertainty ``u = K / S`` per voxel, ``(B, *spatial)``, in ``(0, 1]``."""
    return dirichlet_from_logits(logits).uncertainty[:, 0]


def predictive_entropy(logits: torch.Tensor, regions: bool = False, normalise: bool = True) -> torch.Tensor:
    """Entropy of the softmax prediction per voxel, ``-sum_n p_n log p_n``, ``(B, *spatial)``.

    For region (sigmoid) outputs it is the mean over regions of the binary entropy. With ``normalise`` the value is
    divided by its maximum (``log K``, or ``log 2`` for regions), so it lies in ``[0, 1]`` like ``K / S``."""
    logits = logits.float()
    if regions:
        p = torch.sigmoid(logits)
        h = -(torch.xlogy(p, p) + torch.xlogy(1 - p, 1 - p)).mean(1)
        return h / math.log(2.0) if normalise else h
    log_p = torch.log_softmax(logits, 1)
    h = -(log_p.exp() * log_p).sum(1)
    k = logits.shape[1]
    return h / math.log(k) if normalise and k > 1 else h


def one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``(B, *spatial)`` integer labels -> ``(B, K, *spatial)`` float32 one-hot."""
    return F.one_hot(labels.long(), num_classes).movedim(-1, 1).float()


def log_det_fisher(alpha: torch.Tensor, trigamma: torch.Tensor | None = None) -> torch.Tensor:
    """``log |I(alpha)|`` of the Dirichlet's Fisher information per voxel, ``(B, *spatial)``:

        log|I(alpha)| = sum_n log psi1(alpha_n) + log(1 - psi1(S) sum_n 1 / psi1(alpha_n))

    (psi1 = trigamma; I-EDL Eq. 8, MEDL Eq. 7). For large ``S`` both parts of ``1 - ...`` approach 1 and the
    difference, about ``(K - 1) / (2 S)``, loses its digits in float32; this term is therefore evaluated in float64
    (element-wise, cheap next to the network) and clamped to the smallest positive float64 before the log.
    ``trigamma``: ``psi1(alpha)`` in float64 if the caller has it already (polygamma is the slowest operation of
    MEDL's step on the CPU)."""
    a = alpha.double()
    if trigamma is None:
        trigamma = torch.polygamma(1, a)
    trigamma_s = torch.polygamma(1, a.sum(1))
    inner = 1.0 - trigamma_s * (1.0 / trigamma).sum(1)
    out = torch.log(trigamma).sum(1) + torch.log(inner.clamp_min(torch.finfo(torch.float64).tiny))
    return out.float()


def fisher_evidential_loss(alpha: torch.Tensor, target: torch.Tensor,
                           fisher_coefficient: float = 0.05) -> torch.Tensor:
    """I-EDL's Fisher-information-weighted evidential loss per voxel, ``(B, *spatial)`` (MEDL Eq. 7 without omega):

        L = sum_n [ (y_n - alpha_n / S)^2 + alpha_n (S - alpha_n) / (S^2 (S + 1)) ] psi1(alpha_n)
            - lambda log|I(alpha)|

    ``target`` is one-hot ``(B, K, ...)`` (a pseudo-label or the ground truth). The first sum is the
    trigamma-weighted squared error and variance of the Dirichlet; the second, the regulariser, grows with the
    total evidence and so limits it. ``lambda`` = ``fisher_coefficient``; MEDL does not give its value. I-EDL's
    model class defaults to 1, but its released configurations use 0.05 (CIFAR-10) and 0.005 (MNIST): at 1 the
    regulariser dominates and its gradient lowers the evidence of the target class too (see the tests), so 0.05 is
    the default used by the MEDL trainer. MEDL drops I-EDL's KL term ("KL-free"); :func:`dirichlet_kl_to_uniform`
    provides it for variants."""
    alpha = alpha.float()
    target = target.float()
    strength = alpha.sum(1, keepdim=True)
    # one psi1(alpha) for both parts (in the float64 the log-determinant needs): one polygamma forward and backward
    trigamma64 = torch.polygamma(1, alpha.double()) if fisher_coefficient else None
    trigamma = trigamma64.float() if trigamma64 is not None else torch.polygamma(1, alpha)
    squared_error = (target - alpha / strength) ** 2
    variance = alpha * (strength - alpha) / (strength * strength * (strength + 1.0))
    loss = ((squared_error + variance) * trigamma).sum(1)
    if fisher_coefficient:
        loss = loss - fisher_coefficient * log_det_fisher(alpha, trigamma64)
    return loss


def dirichlet_kl_to_uniform(alpha: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """EDL's regulariser ``KL(Dir(alpha~) || Dir(1))`` per voxel with the target's evidence removed,
    ``alpha~ = y + (1 - y) alpha`` (Sensoy et al. 2018, Eq. 5): it pushes misleading evidence to zero.
    Not part of MEDL's objective (KL-free); available for variants."""
    alpha = alpha.float()
    tilde = target.float() + (1.0 - target.float()) * alpha
    k = alpha.shape[1]
    s = tilde.sum(1, keepdim=True)
    log_norm = torch.lgamma(s[:, 0]) - torch.lgamma(tilde).sum(1) - math.lgamma(k)
    return log_norm + ((tilde - 1.0) * (torch.digamma(tilde) - torch.digamma(s))).sum(1)


def evidential_cross_entropy(alpha: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the Dirichlet's expected probability per voxel, ``-log(alpha_y / S)``, ``(B, *spatial)``;
    ``labels`` are integer ``(B, *spatial)`` (any ignore label must be replaced before and masked after)."""
    alpha = alpha.float()
    log_alpha_y = torch.log(torch.gather(alpha, 1, labels.long()[:, None]))[:, 0]
    return torch.log(alpha.sum(1)) - log_alpha_y


def class_aware_fusion(belief1: torch.Tensor, uncertainty1: torch.Tensor, belief2: torch.Tensor,
                       uncertainty2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MEDL's class-aware evidential fusion (CAEF, Eq. 3) of two opinions ``(b^1, u^1)`` and ``(b^2, u^2)``:

        b_n = b^1_n b^2_n + |C_n| / (|C_n| + |C_K|) (b^1_n u^2 + b^2_n u^1),   u = u^1 u^2,
        then both divided by sum_n b_n + u so that the fused opinion sums to 1,

    with ``|C_n| = 1`` (a singleton class) and ``|C_K| = K`` (the whole frame, on which ``u`` is the mass), so the
    coefficient is ``1 / (1 + K)``. The printed equation mixes the indices ``C_N`` and ``C_K``; this is the only
    reading in which the masses are consistent. Agreement of the two networks (``b^1_n b^2_n``) dominates; a class
    only one network believes in is discounted by the other's uncertainty and by the class-aware factor.
    Inputs are ``(B, K, ...)`` beliefs and ``(B, 1, ...)`` uncertainties; returns the fused ``(b, u)``."""
    k = belief1.shape[1]
    coefficient = 1.0 / (1.0 + k)
    belief = belief1 * belief2 + coefficient * (belief1 * uncertainty2 + belief2 * uncertainty1)
    uncertainty = uncertainty1 * uncertainty2
    total = belief.sum(1, keepdim=True) + uncertainty
    return belief / total, uncertainty / total


def reliability(belief: torch.Tensor, uncertainty: torch.Tensor) -> torch.Tensor:
    """MEDL's pseudo-label reliability (Eq. 4) per voxel, ``(B, *spatial)``, in ``(0, 1]``:

        R = exp(u * sum_n b_n log2 b_n) = exp(-u H_2(b)),    with 0 log 0 = 0.

    It is low where the fused opinion is both uncertain and spread over classes. As printed, a voxel without any
    evidence (``b = 0``, ``u = 1``) also gets ``R = 1``; with softplus evidence this needs all logits far below 0
    and does not occur in practice, so the formula is kept as printed."""
    neg_entropy = (torch.xlogy(belief, belief) / math.log(2.0)).sum(1)
    return torch.exp(uncertainty[:, 0] * neg_entropy)


def reliability_mask(reliability_map: torch.Tensor, labels: torch.Tensor, quantile: float) -> torch.Tensor:
    """A 0/1 float mask ``(B, *spatial)`` that keeps, within each pseudo-label class of the batch, the voxels whose
    reliability is at or above that class's lower ``quantile`` (without gradient):

        m_v = 1[R_v >= t_c],   t_c = the (floor(q n_c) + 1)-th smallest R among the n_c voxels with y^ = c,

    pooled over all samples of the batch. So at most ``floor(q n_c)`` voxels of each class are dropped (fewer where
    R ties at ``t_c``) and every predicted class keeps at least ``1 - q`` of its voxels; ``q = 0`` keeps all.
    The threshold only ranks R, so it is unaffected by how compressed R's range is (MEDL's R lies in 0.98-0.997 on
    Hippocampus from the first epoch) and needs no absolute value; per class, so that the rare foreground classes,
    whose voxels are the least reliable, are not dropped wholesale in favour of background (the class-imbalance
    failure of a single confidence threshold). ``labels`` are integer ``(B, *spatial)``."""
    if not 0.0 <= quantile < 1.0:
        raise ValueError(f"quantile must be in [0, 1), got {quantile}")
    with torch.no_grad():
        r = reliability_map.detach().float()
        keep = torch.zeros_like(r, dtype=torch.bool)
        for c in torch.unique(labels).tolist():
            in_class = labels == c
            values = r[in_class]
            k = min(int(math.floor(quantile * values.numel() + 1e-6)) + 1, values.numel())
            keep |= in_class & (r >= values.kthvalue(k).values)
        return keep.float()


def combined_uncertainty(own: torch.Tensor, fused: torch.Tensor, own_weight: float = 0.5,
                         fused_weight: float = 0.5) -> torch.Tensor:
    """MEDL Eq. 5 for labeled voxels: ``u_final = lambda_1 u_i + lambda_2 u`` with network i's own uncertainty and
    the fused one; ``lambda_1 = lambda_2 = 0.5`` gave the best Dice in the paper's Table VII."""
    return own_weight * own + fused_weight * fused


def uncertainty_ranks(uncertainty: torch.Tensor, descending: bool = False) -> torch.Tensor:
    """1-based rank ``h(v)`` of each voxel's uncertainty within its sample, ``(B, *spatial)`` float32.

    Ascending (default): rank 1 is the most certain voxel. Tied values share their average rank, so equal
    uncertainties get equal curriculum weights wherever they are in the patch (a plain argsort would rank ties by
    position)."""
    flat = uncertainty.detach().float().reshape(uncertainty.shape[0], -1)
    values, order = torch.sort(-flat if descending else flat, dim=1)
    ranks = torch.empty_like(flat)
    for i in range(flat.shape[0]):
        _, inverse, counts = torch.unique_consecutive(values[i], return_inverse=True, return_counts=True)
        last = counts.cumsum(0).to(flat.dtype)
        mean_rank = last - (counts.to(flat.dtype) - 1.0) / 2.0  # average of the group's 1-based ranks
        ranks[i].scatter_(0, order[i], mean_rank[inverse])
    return ranks.reshape(uncertainty.shape)


def curriculum_weight(uncertainty: torch.Tensor, progress: float, amplitude: float = 1.0,
                      direction: str = "easy_to_hard") -> torch.Tensor:
    """MEDL's uncertainty-driven asymptotic curriculum (Eq. 6) per voxel, ``(B, *spatial)``, without gradient:

        omega(q, v) = Xi tanh(psi(h(v)) zeta(q)) + 1,   psi = 2 h(v) / V - 1,   zeta = 2 q / Q - 1,

    with ``h(v)`` the voxel's uncertainty rank within its sample (V voxels), ``q / Q = progress`` in ``[0, 1]`` and
    ``Xi = amplitude`` (not given in the paper; ``Xi <= 1 / tanh(1) ~ 1.31`` keeps omega >= 0).

    The paper sorts uncertainties *descending*, so rank 1 is the most uncertain voxel: read literally, uncertain
    voxels get ``omega ~ 1 + 0.76 Xi`` at the start and certain ones at the end, the opposite of the easy-to-hard
    curriculum its text describes ("first focuses on reliable pseudo-labels and gradually moves to harder ones").
    ``direction="easy_to_hard"`` (default) implements the text: ranks ascend (rank 1 = most certain), so certain
    voxels are weighted up early (zeta < 0) and uncertain ones late (zeta > 0), with omega = 1 everywhere halfway.
    ``direction="literal"`` implements the formula as printed."""
    if direction not in CURRICULUM_DIRECTIONS:
        raise ValueError(f"direction must be one of {CURRICULUM_DIRECTIONS}, got {direction!r}")
    with torch.no_grad():
        ranks = uncertainty_ranks(uncertainty, descending=direction == "literal")
        voxels = ranks[0].numel()
        psi = 2.0 * ranks / voxels - 1.0
        zeta = 2.0 * min(max(float(progress), 0.0), 1.0) - 1.0
        return amplitude * torch.tanh(psi * zeta) + 1.0
