"""MEDL's mutual evidential learning as a plug-in for a two-network host with different architectures."""

from __future__ import annotations

from typing import ClassVar

import torch

from nnunet_ssl.losses.medl import MEDLLoss
from nnunet_ssl.trainers.base import full_resolution
from nnunet_ssl.trainers.logs import GATE_MINIMUM, NEGLIGIBLE_SHARE
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
    3. The loss, summed over both networks (Eqs. 8-9), with ``t`` the training iteration of ``T``::

           L = sum_eps [ L_l + w_u(t) L_u(m) + L_wl ] + lambda_GWU(t) sum_eps L^I_u

       ``L_l`` = nnU-Net's deep-supervised Dice + CE on ``x_l``; ``L_u(m)`` = Dice + CE of ``z_eps(x_u)`` against
       ``y^`` with per-voxel weight ``m``; ``L_wl`` = mean of ``omega * CE(alpha/S, y)`` on ``x_l``;
       ``L^I_u`` = mean of ``omega * FIE(alpha_eps(x_u), onehot(y^))`` (Eq. 7). Only ``L^I_u`` is scaled by
       ``lambda_GWU`` (the host's ``lambda``, logged as ``ssl_lambda``; ``ssl_unsup_loss`` is ``L^I_u``).

    The two presets (``preset``, or ``nnUNet_ssl_preset``; ``paper_settings`` restores the paper's)::

                        default (a mechanism must act)                paper (Eq. 9 as published)
        m_v             1[R_v >= t_c(v)], q = 0.2                      R_v
        w_u(t)          r(t) = exp(-5 (1 - t / (0.2 T))^2)             1
        lambda_GWU(t)   0.1 r(t)                                       0.1 exp(-5 (1 - t / T)^2)

    with ``t_c`` the ``(floor(q n_c) + 1)``-th smallest ``R`` among the batch's ``n_c`` voxels whose pseudo-label is
    ``c`` (:func:`~nnunet_ssl.losses.evidential.reliability_mask`). ``L_wl`` has weight 1 in both presets.

    Host: :class:`~nnunet_ssl.trainers.hosts.two_networks.TwoNetworks` with ``second_network = "other_unet"``.
    Network 1 is built from the plans (``self.network``, saved as ``network_weights``, predicted by default and by
    ``nnUNetv2_predict``); network 2 is the other nnU-Net U-Net, written as ``checkpoint_final_net2.pth`` with
    ``trainer_name = nnUNetTrainerMEDLNet2``: that class builds network 2's architecture, so ``nnUNetv2_predict -chk
    checkpoint_final_net2.pth`` works unchanged. The loss terms: :class:`~nnunet_ssl.losses.medl.MEDLLoss`. The
    paper predicts with the mean of both networks: predict with both checkpoints and ``--save_probabilities``, then
    ``nnUNetv2_ensemble``, or pass both to ``nnUNetv2_ssl_predict_uncertainty -chk``.

    Deviations of the default preset from the paper, each because the paper's setting does not act:

    - Reliability is a mask, not a weight. As a soft weight, ``R`` was 0.98-0.997 from the first epoch on
      Hippocampus (3D, 2000 iterations), so weighting ``L_u`` by it changed nothing. An absolute threshold on so
      compressed a range, whose scale also drifts with the evidence, would need recalibration per dataset and
      epoch; a per-batch quantile only ranks ``R`` and is calibrated by construction. It is taken per pseudo-label
      class so that the least reliable voxels, often those of the rare foreground classes and their boundaries,
      are not all dropped in favour of background; every predicted class keeps at least ``1 - q`` of its voxels.
      Per batch rather than an EMA-tracked threshold: no state to checkpoint or keep equal over DDP ranks, and no
      lag behind R's drift (an EMA threshold on a moving scale may keep everything or nothing for a while). The cost
      is that about ``q`` of the voxels are dropped even when all pseudo-labels are good; the kept ones still
      train. ``q = medl_reliability_quantile = 0.2``: the fifth of each class with the least reliable fused
      opinion, where the networks disagree or are least certain. Logged as ``ssl_medl_kept``; the log warns when
      it falls below 1 % for an epoch.
    - ``L_u`` is warmed up by the common ramp ``r(t)`` (``medl_pseudo_label_warmup``): at weight 1 from step 0 it
      trains each network on the fused argmax of two random networks. ``L_wl`` keeps weight 1 from step 0: its
      targets are the ground truth, ``omega`` only re-weights voxels within [0.24, 1.76], and it trains the
      evidence scale on labeled data, which the uncertainties that drive ``omega`` and ``R`` need early.
    - ``lambda_GWU`` follows the common convention: the ramp over 20 % of training instead of 100 % (over the whole
      run the Fisher term stays below ``exp(-1.25)`` = 29 % of its final weight for the first half), to the same
      ``w_max = 0.1``.

    Choices where the paper is silent (both presets; all class attributes):

    - evidence ``softplus`` (I-EDL's choice; numerically safe; keeps nnU-Net's argmax);
    - ``medl_curriculum_amplitude`` Xi = 1.0 (omega in [0.24, 1.76]); progress ``q / Q`` is counted in training
      iterations (equal to the epoch fraction at epoch boundaries, smoother within one);
    - ``medl_fisher_coefficient`` lambda = 0.05, the value of I-EDL's released CIFAR-10 configuration (the paper
      reuses the symbol for Eq. 5's weights); I-EDL's class default 1 lets the regulariser remove all evidence;
    - paper preset: ``w_max`` = 0.1 over the whole run, the Gaussian warm-up of UA-MT/SASSNet, whose code ends the
      ramp at the end of training (40 x 150 iterations = MEDL's 6000); reliability as a soft per-voxel weight of
      ``L_u`` ("masked by reliability"; no threshold is given);
    - ``L_wl``'s per-voxel loss is the cross-entropy of the Dirichlet mean ``alpha / S`` ("the loss of the v-th
      voxel"), which also trains the evidence scale on labeled data.

    Deviations in both presets, and why:

    - ``direction = "easy_to_hard"``: Eq. 6 as printed sorts uncertainties descending and so weights uncertain voxels
      up first, the reverse of the curriculum the text describes; we implement the text (certain voxels first) and
      keep the formula as ``medl_curriculum_direction = "literal"``.
    - Networks: the paper pairs VNet with a ResNet34-encoder VNet; we pair nnU-Net's PlainConvUNet with its
      ResidualEncoderUNet (ResEnc preset blocks), both from the plans, so patch size and pooling match.
    - ``L_l`` and ``L_u`` are nnU-Net's Dice + CE on the softmax of the logits (deep supervision for ``L_l``, full
      resolution for ``L_u``), whereas the paper's evidential networks presumably use ``alpha / S``; the argmax is
      the same, and the evidential terms ``L_wl`` and ``L^I_u`` train the Dirichlet of the same logits.
    - ``L_wl`` averages over labeled samples instead of summing (``sum_i sum_v / V``), so its scale does not
      depend on nnU-Net's batch size; all losses average over voxels (masked voxels count in ``V``).
    - ``L_u`` and ``L_wl`` are terms of the step outside ``lambda`` (``L_u`` a scheduled one while warmed up); they
      are logged before their weights as ``ssl_medl_pseudo`` and ``ssl_medl_weighted_ce``, ``w_u(t)`` as
      ``ssl_medl_pseudo_weight``; ``ssl_sup_loss`` is ``L_l`` alone and ``ssl_unsup_loss`` is ``L^I_u``.
    - ``-pretrained_weights`` initialise network 1 only (network 2 has another architecture).
    - SGD, LR schedule, epochs, batch and patch are nnU-Net's, not the paper's (6000 iterations, batch 2 + 2).
    """

    #: the paper's configuration (Eq. 9 with weight-1 terms, soft reliability, UA-MT's ramp of lambda_GWU)
    paper_settings: ClassVar[dict[str, object]] = {
        "unsupervised_share": None, "unsupervised_weight": 0.1, "rampup_fraction": 1.0,
        "medl_reliability_quantile": None, "medl_pseudo_label_warmup": False,
    }
    needs_argmax_labels = True
    second_network = "other_unet"
    net2_inference_trainer = "nnUNetTrainerMEDLNet2"
    #: predict_uncertainty maps these checkpoints to the Dirichlet total uncertainty K/S
    evidential_output = True
    #: weight of L_u (Dice + CE against the fused, reliability-masked pseudo-label); Eq. 9 uses 1
    medl_pseudo_label_weight: float = 1.0
    #: whether L_u is weighted by the common ramp r(t) (default) or has its weight from step 0 (paper: False)
    medl_pseudo_label_warmup: bool = True
    #: q: L_u keeps the voxels whose reliability R is at or above the q-quantile of R among the batch's voxels of the
    #: same pseudo-label class; None = every voxel weighted by R (paper)
    medl_reliability_quantile: float | None = 0.2
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
                                  self.medl_fused_uncertainty_weight, self.label_manager.ignore_label,
                                  reliability_quantile=self.medl_reliability_quantile)

    def training_progress(self) -> float:
        """q / Q of Eq. 6, in training iterations."""
        return min(self.ssl_step / max(self.total_iterations, 1), 1.0)

    def pseudo_label_schedule(self) -> float:
        """w_u(t): the common ramp while ``medl_pseudo_label_warmup``, else 1 (Eq. 9)."""
        return self.ramp() if self.medl_pseudo_label_warmup else 1.0

    def mutual_loss(self, unlabeled: list[torch.Tensor], labeled: list[torch.Tensor],
                    step: SSLStep) -> tuple[torch.Tensor, dict[str, float]]:
        """Adds ``w_u(t) L_u`` and ``L_wl`` to the step and returns ``L^I_u``, the term the host scales by lambda."""
        terms = self.medl_loss(unlabeled, labeled, full_resolution(step.target)[:, 0], self.training_progress())
        schedule = self.pseudo_label_schedule()
        pseudo = self.medl_pseudo_label_weight * schedule * terms.pseudo_label
        if self.medl_pseudo_label_warmup:
            step.add_scheduled_loss(pseudo)
        else:
            step.add_constant_loss(pseudo)
        step.add_constant_loss(self.medl_weighted_labeled_weight * terms.weighted_labeled)
        return terms.fisher, {**terms.stats, "medl_pseudo_weight": schedule}

    def mechanism_warnings(self, means: dict[str, float]) -> list[str]:
        out = super().mechanism_warnings(means)
        kept = means.get("ssl_medl_kept", float("nan"))
        if kept < GATE_MINIMUM:
            out.append(f"MEDL's reliability keeps only {kept:.1%} of the unlabeled voxels' weight in L_u this epoch: "
                       "the pseudo-label loss is nearly off")
        elif self.medl_reliability_quantile is None and 1.0 - kept < NEGLIGIBLE_SHARE:
            out.append(f"MEDL's soft reliability weight averages {kept:.3f} this epoch: it barely changes L_u "
                       "(medl_reliability_quantile masks instead)")
        return out

    def ssl_log_keys(self) -> list[str]:
        return [*super().ssl_log_keys(), "ssl_medl_pseudo", "ssl_medl_weighted_ce", "ssl_medl_fisher",
                "ssl_medl_reliability", "ssl_medl_kept", "ssl_medl_pseudo_weight", "ssl_medl_uncertainty",
                "ssl_medl_agreement"]

    def ssl_plot_panels(self) -> list[tuple[str, dict[str, str]]]:
        return [
            *super().ssl_plot_panels(),
            ("MEDL losses (both networks)", {"L_l (Dice+CE)": "ssl_sup_loss", "L_u (pseudo-labels)": "ssl_medl_pseudo",
                                             "L_wl (omega CE)": "ssl_medl_weighted_ce",
                                             "L_I (FIE, before lambda)": "ssl_medl_fisher"}),
            ("MEDL evidence (unlabeled)", {"mean reliability R": "ssl_medl_reliability",
                                           "L_u weight kept by R": "ssl_medl_kept",
                                           "L_u warm-up w_u(t)": "ssl_medl_pseudo_weight",
                                           "mean fused uncertainty u": "ssl_medl_uncertainty",
                                           "argmax agreement": "ssl_medl_agreement"}),
        ]
