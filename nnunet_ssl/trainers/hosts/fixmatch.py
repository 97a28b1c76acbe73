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
    u_s (the same geometry plus a strong intensity draw):

    - ``p_w = softmax f_theta(u_w)`` without gradient, ``y_hat = argmax p_w``, ``m = 1[max p_w >= 0.95]``
    - CutMix: a box (2-40 % of the patch) of another sample is pasted into u_s, and ``y_hat``, ``m`` are mixed with
      the same box
    - ``L = L_sup + lambda(t) * sum_i m_i CE(f_theta(u_s)_i, y_hat_i) / N``

    Presets (``preset``, or ``nnUNet_ssl_preset``), and why the default differs from the paper:

    - ``"default"``: the strong view always differs from the weak one
      (:class:`~nnunet_ssl.data.unlabeled_loader.StrongIntensity`: each of nnU-Net's intensity transforms at
      probability >= 0.5, UniMatch-strength brightness/contrast jitter, and at least one transform that changes
      the image); CutMix on every sample (``cutmix_probability = 1``); ``lambda = 1`` after the common 20 % ramp.
      With nnU-Net's own intensity augmentation about a third of strong views were bit-identical to the weak view,
      and with CutMix at 0.5 about 16 % of unlabeled samples trained on exactly the weak image, which only teaches
      the network to repeat itself. The gate reads the weak view's softmax after temperature scaling fitted on the
      fold's validation cases (:class:`~nnunet_ssl.trainers.calibration.ReferenceCalibration`), so 0.95 means
      95 % on held-out data.
    - ``"paper"``: nnU-Net's intensity augmentation at its own probabilities as the strong view, CutMix with
      probability 0.5 per sample, ``lambda = 1`` without a ramp, the raw softmax in the gate (UniMatch).

    Deviations, and why:

    - The strong augmentation is built from nnU-Net's intensity augmentation (noise, blur, brightness, contrast,
      low resolution, gamma) instead of ColorJitter, grayscale and blur on 2D RGB-like slices: it is defined for any
      number of channels and for 3D.
    - The weak view uses nnU-Net's spatial augmentation (rotation, scaling, mirroring) rather than rot90/flip.
    - CutMix takes its source patch from the same unlabeled batch (cyclic shift) instead of a second unlabeled
      batch; with an unlabeled batch of one the patch is mixed with itself (no-op).
    - The pseudo-label pass runs the network in training mode (nnU-Net's InstanceNorm has no running statistics
      and its default networks have no dropout, so train and eval mode give the same output).
    - L_sup is nnU-Net's deep-supervised Dice + CE; the unsupervised loss uses the full-resolution output only.
    - With ``uses_labeled_reference`` (MetaSSL) the reference on labeled images is the same network without
      gradient, so every labeled voxel is unanimous; the student's own labeled output is reused (no extra forward).
    - ``unsupervised_loss_type = "dice"`` or ``"ce+dice"`` selects nnU-Net's soft Dice with the confidence mask as
      loss mask (UniMatch's medical branch uses Dice) instead of the default masked CE.
    """

    paper_settings = {"view_intensity": (False, True), "cutmix_probability": 0.5, "unsupervised_weight": 1.0,
                      "rampup_fraction": 0.0}
    view_intensity = (False, "strong")
    unsupervised_weight = 1.0
    confidence_threshold = 0.95
    uses_confidence_gate = True
    cutmix_probability = 1.0
    unsupervised_loss_type = "ce"
    needs_argmax_labels = True
    labeled_reference_is_student = True
    calibrate_reference = True

    def calibration_network(self):
        return self.network

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

    def unsupervised_loss(self, student_logits, reference_logits, step):
        labels, confidence = hard_pseudo_labels(reference_logits)
        return self.gated_loss(student_logits, labels, confidence >= self.confidence_threshold), {}

    def gated_loss(self, student_logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``unsupervised_loss_type``'s masked CE and/or soft Dice of the student against hard pseudo-labels."""
        loss = student_logits.new_zeros(())
        if "ce" in self.unsupervised_loss_type:
            loss = loss + self.masked_ce(student_logits, labels, mask)
        if "dice" in self.unsupervised_loss_type:
            loss = loss + masked_soft_dice(student_logits, labels, mask)
        return loss

    def masked_ce(self, student_logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """CE over the gated voxels, divided by all voxels (UniMatch)."""
        return masked_cross_entropy(student_logits, labels, mask)

    def ssl_log_keys(self) -> list[str]:
        return [*super().ssl_log_keys(), "ssl_mixed_fraction"]
