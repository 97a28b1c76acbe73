"""Cross Pseudo Supervision host: two networks, each trained on the other's argmax."""

from __future__ import annotations

from nnunet_ssl.losses.pseudo_label import hard_pseudo_labels, masked_cross_entropy
from nnunet_ssl.trainers.hosts.two_networks import TwoNetworks


class CrossPseudoSupervision(TwoNetworks):
    """Cross Pseudo Supervision: two differently initialised nnU-Nets learn from each other's argmax on unlabeled data.

    Paper: Chen et al., "Semi-Supervised Semantic Segmentation with Cross Pseudo Supervision", CVPR 2021;
    reference implementation for medical segmentation: SSL4MIS ``train_cross_pseudo_supervision_3D.py``.

    ``L = sum_{k=1,2} [ L_sup(f_k(x_l), y) + lambda(t) CE(f_k(u), argmax f_{3-k}(u)) ]``, both networks updated
    (each target is detached). Network 2, its checkpoints and ``checkpoint_final_net2.pth``:
    :class:`~nnunet_ssl.trainers.hosts.two_networks.TwoNetworks`.

    Presets (``preset``, or ``nnUNet_ssl_preset``): both use SSL4MIS's ``lambda(t) = 0.1 exp(-5 (1 - t/T_r)^2)``
    over the first 20 % of training (the cross terms are 2-10 % of ``L_sup + 2`` on Hippocampus: they act); the
    default preset differs only where a plug-in changes it.

    Deviations, and why:

    - L_sup is nnU-Net's deep-supervised Dice + CE for each network; the cross terms use the full-resolution output.
    - Both networks see the same unlabeled view (one draw of nnU-Net's augmentation), as in CPS.
    - ``-pretrained_weights`` initialise network 1 only: copying them into network 2 would remove the different
      initialisation CPS relies on.
    - One GradScaler serves both optimizers under CUDA AMP (GradScaler supports several optimizers).
    """

    paper_settings = {"unsupervised_weight": 0.1, "rampup_fraction": 0.2}
    unsupervised_weight = 0.1
    needs_argmax_labels = True

    def unsupervised_loss(self, student_logits, reference_logits, step):
        labels, _ = hard_pseudo_labels(reference_logits)
        return masked_cross_entropy(student_logits, labels), {}
