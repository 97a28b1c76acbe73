"""MEDL's loss terms for two networks, as one module on tensors (the equations: :mod:`nnunet_ssl.losses.evidential`
and :class:`nnunet_ssl.trainers.plugins.evidential.MutualEvidential`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn

from nnunet_ssl.losses.consistency import channel_argmax
from nnunet_ssl.losses.evidential import (
    class_aware_fusion,
    combined_uncertainty,
    curriculum_weight,
    dirichlet_from_logits,
    dirichlet_kl_to_uniform,
    evidential_cross_entropy,
    fisher_evidential_loss,
    one_hot,
    reliability,
    reliability_mask,
)
from nnunet_ssl.losses.pseudo_label import masked_cross_entropy, masked_soft_dice


class MEDLTerms(NamedTuple):
    """MEDL's three loss terms, each summed over both networks, and statistics to log."""

    pseudo_label: torch.Tensor        # L_u: Dice + CE against the fused pseudo-label, voxels masked or weighted by R
    weighted_labeled: torch.Tensor    # L_wl: omega-weighted Dirichlet CE on labeled voxels
    fisher: torch.Tensor              # L^I_u: omega-weighted I-EDL loss on unlabeled voxels (before lambda)
    stats: dict[str, float]


class MEDLLoss(nn.Module):
    """Eqs. 3-9 of MEDL on the full-resolution logits of two networks, float32 (call it outside autocast).

    ``forward(unlabeled, labeled, labels, progress)`` takes each network's logits on the unlabeled batch and on the
    labeled batch (two tensors (B, K, *spatial) each), the labels (B, *spatial) and the training progress ``q / Q``
    in [0, 1]. Fusion, pseudo-labels, reliability and curriculum weights carry no gradient; the three terms carry
    gradient into both networks' logits. Voxels equal to ``ignore_label`` are left out of ``L_wl``.

    ``reliability_quantile`` q says how ``R`` enters ``L_u``: a number in [0, 1) keeps the voxels of
    :func:`~nnunet_ssl.losses.evidential.reliability_mask` (weight 1, the others 0); ``None`` weights every voxel by
    ``R`` itself (the paper's soft weight). ``stats["medl_kept"]`` is the mean of that per-voxel weight."""

    def __init__(self, curriculum_amplitude: float = 1.0, curriculum_direction: str = "easy_to_hard",
                 fisher_coefficient: float = 0.05, kl_weight: float = 0.0, own_uncertainty_weight: float = 0.5,
                 fused_uncertainty_weight: float = 0.5, ignore_label: int | None = None,
                 reliability_quantile: float | None = 0.2) -> None:
        super().__init__()
        if reliability_quantile is not None and not 0.0 <= reliability_quantile < 1.0:
            raise ValueError(f"reliability_quantile must be None or in [0, 1), got {reliability_quantile}")
        self.reliability_quantile = reliability_quantile
        self.curriculum_amplitude = curriculum_amplitude
        self.curriculum_direction = curriculum_direction
        self.fisher_coefficient = fisher_coefficient
        self.kl_weight = kl_weight
        self.own_uncertainty_weight = own_uncertainty_weight
        self.fused_uncertainty_weight = fused_uncertainty_weight
        self.ignore_label = ignore_label

    def _omega(self, uncertainty: torch.Tensor, progress: float) -> torch.Tensor:
        return curriculum_weight(uncertainty, progress, self.curriculum_amplitude, self.curriculum_direction)

    def forward(self, unlabeled: Sequence[torch.Tensor], labeled: Sequence[torch.Tensor], labels: torch.Tensor,
                progress: float) -> MEDLTerms:
        k = unlabeled[0].shape[1]
        device = unlabeled[0].device
        # unlabeled: fused pseudo-label, reliability and curriculum (all without gradient)
        with torch.no_grad():
            d1, d2 = (dirichlet_from_logits(z.detach()) for z in unlabeled)
            belief, uncertainty = class_aware_fusion(d1.belief, d1.uncertainty, d2.belief, d2.uncertainty)
            pseudo = channel_argmax(belief)
            weight_r = reliability(belief, uncertainty)
            voxel_weight = weight_r if self.reliability_quantile is None else \
                reliability_mask(weight_r, pseudo, self.reliability_quantile)
            omega_u = self._omega(uncertainty[:, 0], progress)
            target_u = one_hot(pseudo, k)
        pseudo_loss = torch.zeros((), device=device)
        fisher_loss = torch.zeros((), device=device)
        for z in unlabeled:
            pseudo_loss = pseudo_loss + masked_cross_entropy(z, pseudo, voxel_weight) + \
                masked_soft_dice(z, pseudo, voxel_weight)
            alpha = dirichlet_from_logits(z).alpha
            fie = fisher_evidential_loss(alpha, target_u, self.fisher_coefficient)
            if self.kl_weight:
                fie = fie + self.kl_weight * dirichlet_kl_to_uniform(alpha, target_u)
            fisher_loss = fisher_loss + (omega_u * fie).mean()
        # labeled: omega from u_final = l1 u_eps + l2 u_fused, weighting the Dirichlet CE against the labels
        valid = torch.ones_like(labels, dtype=torch.float32)
        if self.ignore_label is not None:
            valid = (labels != self.ignore_label).float()
            labels = torch.where(labels == self.ignore_label, torch.zeros_like(labels), labels)
        with torch.no_grad():
            e1, e2 = (dirichlet_from_logits(z.detach()) for z in labeled)
            _, fused_l = class_aware_fusion(e1.belief, e1.uncertainty, e2.belief, e2.uncertainty)
            omegas_l = [self._omega(combined_uncertainty(e.uncertainty[:, 0], fused_l[:, 0],
                                                         self.own_uncertainty_weight,
                                                         self.fused_uncertainty_weight), progress) for e in (e1, e2)]
        weighted_ce = torch.zeros((), device=device)
        for z, omega in zip(labeled, omegas_l):
            ce = evidential_cross_entropy(dirichlet_from_logits(z).alpha, labels)
            weighted_ce = weighted_ce + (omega * valid * ce).sum() / valid.sum().clamp_min(1.0)
        stats = dict(medl_pseudo=float(pseudo_loss.detach()), medl_weighted_ce=float(weighted_ce.detach()),
                     medl_fisher=float(fisher_loss.detach()), medl_reliability=float(weight_r.mean()),
                     medl_kept=float(voxel_weight.mean()),
                     medl_uncertainty=float(uncertainty.mean()),
                     medl_agreement=float((channel_argmax(unlabeled[0]) == channel_argmax(unlabeled[1]))
                                          .float().mean()))
        return MEDLTerms(pseudo_loss, weighted_ce, fisher_loss, stats)
