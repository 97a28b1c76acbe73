"""FixMatch host: the same network on a weak view predicts the reference for a strong, CutMixed view."""

from __future__ import annotations

import torch

from nnunet_ssl.errors import SSLInputError
from nnunet_ssl.losses.pseudo_label import hard_pseudo_labels, masked_cross_entropy, masked_soft_dice
from nnunet_ssl.parts.cutmix import apply_cutmix, cutmix_masks
from nnunet_ssl.trainers.base import full_resolution, nnUNetTrainerSSL
from nnunet_ssl.trainers.step import SSLStep


class FixMatch(nnUNetTrainerSSL):
    """FixMatch: confident pseudo-labels from the weak view supervise the same network on a strong, CutMixed view.

    Paper: Sohn et al., "FixMatch: Simplifying Semi-Supervised Learning with Consistency and Confidence",
    NeurIPS 2020; segmentation form as in UniMatch's medical branch (Yang et al., CVPR 2023, LiheYoung/UniMatch
    ``more-scenarios/medical``), not the SSL4MIS variants (EMA teacher without mask; min-max-normalised threshold).

    Per step, for unlabeled patches with a weak view u_w (nnU-Net's geometric augmentation only) and a strong view
    u_s (the same geometry plus an independent draw of nnU-Net's intensity augmentation):

    - ``p_w = softmax f_theta(u_w)`` without gradient, ``y_hat = argmax p_w``, ``m = 1[max p_w >= 0.95]``
    - CutMix: with probability 0.5 per sample a box (2-40 % of the patch) of another sample is pasted into u_s, and
      ``y_hat``, ``m`` are mixed with the same box
    - ``L = L_sup + lambda * sum_i m_i CE(f_theta(u_s)_i, y_hat_i) / N`` with ``lambda = 1`` and no ramp-up

    Deviations, and why:

    - The strong augmentation is nnU-Net's intensity augmentation (noise, blur, brightness, contrast, low
      resolution, gamma; each with nnU-Net's probabilities) instead of ColorJitter and blur on 2D RGB-like slices:
      it is defined for any number of channels and for 3D.
    - The weak view uses nnU-Net's spatial augmentation (rotation, scaling, mirroring) rather than rot90/flip.
    - CutMix takes its source patch from the same unlabeled batch (cyclic shift) instead of a second unlabeled
      batch; with an unlabeled batch of one the patch is mixed with itself (no-op).
    - The pseudo-label pass runs the network in training mode (nnU-Net's InstanceNorm has no running statistics
      and its default networks have no dropout, so train and eval mode give the same output).
    - L_sup is nnU-Net's deep-supervised Dice + CE; the unsupervised loss uses the full-resolution output only.
    - With ``uses_labeled_reference`` (MetaSSL) the reference on labeled images is the same network without
      gradient, so every labeled voxel is unanimous.
    - ``unsupervised_loss_type = "dice"`` or ``"ce+dice"`` selects nnU-Net's soft Dice with the confidence mask as
      loss mask (UniMatch's medical branch uses Dice) instead of the default masked CE.
    """

    view_intensity = (False, True)
    unsupervised_weight = 1.0
    rampup_fraction = 0.0
    confidence_threshold = 0.95
    cutmix_probability = 0.5
    unsupervised_loss_type = "ce"
    needs_argmax_labels = True

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.unsupervised_loss_type not in ("ce", "dice", "ce+dice"):
            raise SSLInputError(f"unsupervised_loss_type={self.unsupervised_loss_type!r} is unknown; set it to 'ce', "
                                "'dice' or 'ce+dice'")

    def student_input(self, step: SSLStep) -> torch.Tensor:
        strong = step.views["view1"]
        step.mix = cutmix_masks(strong.shape[0], tuple(strong.shape[2:]), self.cutmix_probability,
                                device=strong.device)
        return apply_cutmix(strong, step.mix)

    def reference_logits(self, step: SSLStep) -> torch.Tensor:
        weak = full_resolution(self.network(step.views["view0"]))
        return apply_cutmix(weak, step.mix)

    def reference_logits_labeled(self, step: SSLStep) -> torch.Tensor:
        return full_resolution(self.network(step.data))

    def unsupervised_loss(self, student_logits, reference_logits, step):
        labels, confidence = hard_pseudo_labels(reference_logits)
        mask = confidence >= self.confidence_threshold
        loss = student_logits.new_zeros(())
        if "ce" in self.unsupervised_loss_type:
            loss = loss + masked_cross_entropy(student_logits, labels, mask)
        if "dice" in self.unsupervised_loss_type:
            loss = loss + masked_soft_dice(student_logits, labels, mask)
        return loss, {"mixed_fraction": float(step.mix.float().mean())}

    def ssl_log_keys(self) -> list[str]:
        return [*super().ssl_log_keys(), "ssl_mixed_fraction"]
