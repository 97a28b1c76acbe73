"""MEDL's mutual evidential learning as a plug-in for a two-network host with different architectures."""

from __future__ import annotations

import torch

from nnunet_ssl.losses.medl import MEDLLoss
from nnunet_ssl.trainers.base import full_resolution
from nnunet_ssl.trainers.step import SSLStep


class MutualEvidential:
    """Mutual Evidential Deep Learning: a PlainConvUNet and a ResidualEncoderUNet exchange evidential pseudo-labels.

    Paper: He et al., "Mutual Evidential Deep Learning for Medical Image Segmentation", BIBM 2024, extended version
    arXiv 2505.12418 (no official code); the evidential loss is I-EDL's (Deng et al., ICML 2023). Equations and
    their readings: :mod:`nnunet_ssl.losses.evidential`.

    Both networks ``eps in {1, 2}`` see the same labeled batch ``x_l`` and unlabeled view ``x_u``. Evidence
    ``e = softplus(z)``, ``alpha = e + 1``, ``b = e / S``, ``u = K / S`` from each network's logits ``z``. Per step:

    1. CAEF (Eq. 3) fuses the two detached opinions on ``x_u`` into ``(b, u)``; the pseudo-label is
       ``y^ = argmax_n b_n`` and its reliability ``R = exp(-u H_2(b))`` (Eq. 4).
    2. The curriculum weight ``omega`` (Eq. 6) ranks voxels by uncertainty within each sample: the fused ``u`` on
       ``x_u``; on ``x_l`` network eps's ``u_final = 0.5 u_eps + 0.5 u_fused`` (Eq. 5, with the labeled fusion).
    3. ``L^eps = L_l + L_u + L_wl + lambda_GWU(t) L^I_u`` (Eqs. 8-9), summed over both networks, with
       ``L_l`` = nnU-Net's deep-supervised Dice + CE on ``x_l``; ``L_u`` = Dice + CE of ``z_eps(x_u)`` against
       ``y^``, each voxel weighted by ``R``; ``L_wl`` = mean of ``omega * CE(alpha/S, y)`` on ``x_l``;
       ``L^I_u`` = mean of ``omega * FIE(alpha_eps(x_u), onehot(y^))`` (Eq. 7) and
       ``lambda_GWU(t) = w_max exp(-5 (1 - t / t_max)^2)``.

    Host: :class:`~nnunet_ssl.trainers.hosts.two_networks.TwoNetworks` with ``second_network = "other_unet"``.
    Network 1 is built from the plans (``self.network``, saved as ``network_weights``, predicted by default and by
    ``nnUNetv2_predict``); network 2 is the other nnU-Net U-Net, written as ``checkpoint_final_net2.pth`` with
    ``trainer_name = nnUNetTrainerMEDLNet2``: that class builds network 2's architecture, so ``nnUNetv2_predict -chk
    checkpoint_final_net2.pth`` works unchanged. The loss terms: :class:`~nnunet_ssl.losses.medl.MEDLLoss`. The
    paper predicts with the mean of both networks: predict with both checkpoints and ``--save_probabilities``, then
    ``nnUNetv2_ensemble``, or pass both to ``nnUNetv2_ssl_predict_uncertainty -chk``.

    Choices where the paper is silent (all class attributes):

    - evidence ``softplus`` (I-EDL's choice; numerically safe; keeps nnU-Net's argmax);
    - ``medl_curriculum_amplitude`` Xi = 1.0 (omega in [0.24, 1.76]); progress ``q / Q`` is counted in training
      iterations (equal to the epoch fraction at epoch boundaries, smoother within one);
    - ``medl_fisher_coefficient`` lambda = 0.05, the value of I-EDL's released CIFAR-10 configuration (the paper
      reuses the symbol for Eq. 5's weights); I-EDL's class default 1 lets the regulariser remove all evidence;
    - ``unsupervised_weight`` w_max = 0.1 and ``rampup_fraction`` = 1.0: the Gaussian warm-up of UA-MT/SASSNet,
      whose code ends the ramp at the end of training (40 x 150 iterations = MEDL's 6000);
    - reliability is used as a soft per-voxel weight of ``L_u`` ("masked by reliability"; no threshold is given);
    - ``L_wl``'s per-voxel loss is the cross-entropy of the Dirichlet mean ``alpha / S`` ("the loss of the v-th
      voxel"), which also trains the evidence scale on labeled data.

    Deviations, and why:

    - ``direction = "easy_to_hard"``: Eq. 6 as printed sorts uncertainties descending and so weights uncertain voxels
      up first, the reverse of the curriculum the text describes; we implement the text (certain voxels first) and
      keep the formula as ``medl_curriculum_direction = "literal"``.
    - Networks: the paper pairs VNet with a ResNet34-encoder VNet; we pair nnU-Net's PlainConvUNet with its
      ResidualEncoderUNet (ResEnc preset blocks), both from the plans, so patch size and pooling match.
    - ``L_l`` and ``L_u`` are nnU-Net's Dice + CE on the softmax of the logits (deep supervision for ``L_l``, full
      resolution for ``L_u``), whereas the paper's evidential networks presumably use ``alpha / S``; the argmax is
      the same, and the evidential terms ``L_wl`` and ``L^I_u`` train the Dirichlet of the same logits.
    - ``L_wl`` averages over labeled samples instead of summing (``sum_i sum_v / V``), so its scale does not
      depend on nnU-Net's batch size; all losses average over voxels.
    - ``L_u`` and ``L_wl`` have weight 1 from the first step, as in Eq. 9 (constant terms of the step); they are
      logged as ``ssl_medl_pseudo`` and ``ssl_medl_weighted_ce``, ``ssl_sup_loss`` is ``L_l`` alone and
      ``ssl_unsup_loss`` is ``L^I_u``.
    - ``-pretrained_weights`` initialise network 1 only (network 2 has another architecture).
    - SGD, LR schedule, epochs, batch and patch are nnU-Net's, not the paper's (6000 iterations, batch 2 + 2).
    """

    unsupervised_weight = 0.1
    rampup_fraction = 1.0
    needs_argmax_labels = True
    second_network = "other_unet"
    net2_inference_trainer = "nnUNetTrainerMEDLNet2"
    #: predict_uncertainty maps these checkpoints to the Dirichlet total uncertainty K/S
    evidential_output = True
    #: weight of L_u (Dice + CE against the fused, reliability-weighted pseudo-label); Eq. 9 uses 1
    medl_pseudo_label_weight: float = 1.0
    #: weight of L_wl (omega-weighted Dirichlet CE on labeled voxels); Eq. 9 uses 1
    medl_weighted_labeled_weight: float = 1.0
    #: Xi of Eq. 6 (not given in the paper)
    medl_curriculum_amplitude: float = 1.0
    #: "easy_to_hard" (the paper's text) or "literal" (Eq. 6 as printed)
    medl_curriculum_direction: str = "easy_to_hard"
    #: lambda of Eq. 7, the weight of -log|I(alpha)| (I-EDL's released CIFAR-10 configuration)
    medl_fisher_coefficient: float = 0.05
    #: optional EDL KL term added to the FIE loss (MEDL is KL-free: 0)
    medl_kl_weight: float = 0.0
    #: lambda_1, lambda_2 of Eq. 5
    medl_own_uncertainty_weight: float = 0.5
    medl_fused_uncertainty_weight: float = 0.5

    def build_ssl_modules(self) -> None:
        super().build_ssl_modules()
        self.medl_loss = MEDLLoss(self.medl_curriculum_amplitude, self.medl_curriculum_direction,
                                  self.medl_fisher_coefficient, self.medl_kl_weight, self.medl_own_uncertainty_weight,
                                  self.medl_fused_uncertainty_weight, self.label_manager.ignore_label)

    def training_progress(self) -> float:
        """q / Q of Eq. 6, in training iterations."""
        return min(self.ssl_step / max(self.total_iterations, 1), 1.0)

    def mutual_loss(self, unlabeled: list[torch.Tensor], labeled: list[torch.Tensor],
                    step: SSLStep) -> tuple[torch.Tensor, dict[str, float]]:
        terms = self.medl_loss(unlabeled, labeled, full_resolution(step.target)[:, 0], self.training_progress())
        step.add_constant_loss(self.medl_pseudo_label_weight * terms.pseudo_label)
        step.add_constant_loss(self.medl_weighted_labeled_weight * terms.weighted_labeled)
        return terms.fisher, terms.stats

    def ssl_log_keys(self) -> list[str]:
        return [*super().ssl_log_keys(), "ssl_medl_pseudo", "ssl_medl_weighted_ce", "ssl_medl_fisher",
                "ssl_medl_reliability", "ssl_medl_uncertainty", "ssl_medl_agreement"]

    def ssl_plot_panels(self) -> list[tuple[str, dict[str, str]]]:
        return [
            *super().ssl_plot_panels(),
            ("MEDL losses (both networks)", {"L_l (Dice+CE)": "ssl_sup_loss", "L_u (pseudo-labels)": "ssl_medl_pseudo",
                                             "L_wl (omega CE)": "ssl_medl_weighted_ce",
                                             "L_I (FIE, before lambda)": "ssl_medl_fisher"}),
            ("MEDL evidence (unlabeled)", {"mean reliability R": "ssl_medl_reliability",
                                           "mean fused uncertainty u": "ssl_medl_uncertainty",
                                           "argmax agreement": "ssl_medl_agreement"}),
        ]
