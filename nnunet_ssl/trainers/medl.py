"""Mutual Evidential Deep Learning (MEDL): two networks of different architectures, evidential fusion, curriculum."""

from __future__ import annotations

import os

import torch
from batchgenerators.utilities.file_and_folder_operations import isfile, join
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import nn

from nnunet_ssl.errors import SSLInputError
from nnunet_ssl.losses.consistency import confidence_stats
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
)
from nnunet_ssl.losses.pseudo_label import masked_cross_entropy, masked_soft_dice
from nnunet_ssl.trainers.base import full_resolution, nnUNetTrainerSSL, split_batch, unwrap
from nnunet_ssl.trainers.cps import _mean_stats

PLAIN_UNET = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
RESENC_UNET = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
#: encoder residual blocks per stage of nnU-Net's ResEnc presets (nnUNetPlannerResEnc{M,L,XL}): ResNet34-like
RESENC_BLOCKS_PER_STAGE = (1, 3, 4, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6)
#: decoder convolutions per stage of nnU-Net's ResEnc presets
RESENC_DECODER_CONVS = 1
#: encoder/decoder convolutions per stage of nnU-Net's default (PlainConvUNet) planner
PLAIN_CONVS = 2
NET2_CHECKPOINT = "checkpoint_final_net2.pth"


def _short(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def second_architecture(configuration_manager: ConfigurationManager) -> tuple[str, dict]:
    """(class name, init kwargs) of MEDL's second network: the other of nnU-Net's two U-Nets, with the plans'
    patch size, kernel sizes, strides, features per stage, normalisation and non-linearity.

    Plans with a PlainConvUNet (nnU-Net's default) give a ResidualEncoderUNet with the ResEnc presets' blocks per
    encoder stage (1, 3, 4, 6, 6, ...: a ResNet34-like encoder, as the paper's 3D-ResVNet) and one convolution per
    decoder stage; ResEnc plans give a PlainConvUNet with nnU-Net's default two convolutions per stage. Other
    architectures are refused: there is no principled 'different' network to pair them with."""
    name = configuration_manager.network_arch_class_name
    kwargs = dict(configuration_manager.network_arch_init_kwargs)
    n_stages = int(kwargs["n_stages"])
    if _short(name) == "PlainConvUNet":
        kwargs.pop("n_conv_per_stage")
        kwargs["n_blocks_per_stage"] = list(RESENC_BLOCKS_PER_STAGE[:n_stages])
        kwargs["n_conv_per_stage_decoder"] = [RESENC_DECODER_CONVS] * (n_stages - 1)
        return RESENC_UNET, kwargs
    if _short(name) == "ResidualEncoderUNet":
        for key in ("n_blocks_per_stage", "block", "bottleneck_channels", "stem_channels"):
            kwargs.pop(key, None)
        kwargs["n_conv_per_stage"] = [PLAIN_CONVS] * n_stages
        kwargs["n_conv_per_stage_decoder"] = [PLAIN_CONVS] * (n_stages - 1)
        return PLAIN_UNET, kwargs
    raise SSLInputError(f"nnUNetTrainerMEDL pairs nnU-Net's PlainConvUNet and ResidualEncoderUNet; the plans use "
                        f"{name}: train with nnU-Net's default plans or a ResEnc preset")


def build_second_network(plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                         num_input_channels: int, num_output_channels: int,
                         enable_deep_supervision: bool = True) -> nn.Module:
    """MEDL's second network (:func:`second_architecture`), built and initialised as nnU-Net builds its own."""
    name, kwargs = second_architecture(configuration_manager)
    return get_network_from_plans(name, kwargs, configuration_manager.network_arch_init_kwargs_req_import,
                                  num_input_channels, num_output_channels, allow_init=True,
                                  deep_supervision=enable_deep_supervision)


class nnUNetTrainerMEDL(nnUNetTrainerSSL):
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

    Network 1 is built from the plans (``self.network``, saved as ``network_weights``, predicted by default and by
    ``nnUNetv2_predict``); network 2 is the other nnU-Net U-Net (:func:`second_architecture`), trained with its own
    optimizer and LR schedule (the trainer's recipe), DDP-wrapped, saved in ``ssl_state`` and resumed by ``--c``, and
    written as ``checkpoint_final_net2.pth`` with ``trainer_name = nnUNetTrainerMEDLNet2``: that class builds network
    2's architecture, so ``nnUNetv2_predict -chk checkpoint_final_net2.pth`` works unchanged. The paper predicts
    with the mean of both networks: predict with both checkpoints and ``--save_probabilities``, then
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
    - ``L_u`` and ``L_wl`` have weight 1 from the first step, as in Eq. 9; they are logged inside
      ``ssl_sup_loss`` (the unramped part) and separately as ``ssl_medl_*``; ``ssl_unsup_loss`` is ``L^I_u``.
    - ``-pretrained_weights`` initialise network 1 only (network 2 has another architecture).
    - SGD, LR schedule, epochs, batch and patch are nnU-Net's, not the paper's (6000 iterations, batch 2 + 2).
    """

    view_intensity = (True,)
    unsupervised_weight = 0.1
    rampup_fraction = 1.0
    needs_argmax_labels = True
    reference_name = "network 2"
    student_name = "network 1"
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
        network = build_second_network(self.plans_manager, self.configuration_manager, self.num_input_channels,
                                       self.label_manager.num_segmentation_heads,
                                       self.enable_deep_supervision).to(self.device)
        self.network2, self.optimizer2, self.lr_scheduler2 = self.attach_trained_network(network)

    def reference_network(self) -> nn.Module | None:
        return getattr(self, "network2", None)

    def trainable(self):
        return [(self.network, self.optimizer), (self.network2, self.optimizer2)]

    @classmethod
    def compute_units(cls, labeled_batch: int, unlabeled_batch: int) -> float:
        """Both networks forward + backward on labeled + unlabeled, ``2 * 3 (B + U)`` sample passes (as CPS); the
        fusion reuses these outputs. Counts passes, not FLOPs: the residual encoder of network 2 is the heavier one."""
        return float(2 * 3 * (labeled_batch + unlabeled_batch))

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        self.lr_scheduler2.step(self.current_epoch)

    def training_progress(self) -> float:
        """q / Q of Eq. 6, in training iterations."""
        return min(self.ssl_step / max(self.total_iterations, 1), 1.0)

    def _omega(self, uncertainty: torch.Tensor) -> torch.Tensor:
        return curriculum_weight(uncertainty, self.training_progress(), self.medl_curriculum_amplitude,
                                 self.medl_curriculum_direction)

    def forward_losses(self, data, target, views):
        n_labeled = data.shape[0]
        x = torch.cat([data, views["view0"]], 0)
        with self._autocast():
            out1, out2 = self.network(x), self.network2(x)
            lab1, unl1 = split_batch(out1, n_labeled)
            lab2, unl2 = split_batch(out2, n_labeled)
            labeled_loss = self.loss(lab1, target) + self.loss(lab2, target)
        with self._no_autocast():
            u_logits = [full_resolution(unl1).float(), full_resolution(unl2).float()]
            l_logits = [full_resolution(lab1).float(), full_resolution(lab2).float()]
            k = u_logits[0].shape[1]
            # unlabeled: fused pseudo-label, reliability and curriculum (all without gradient)
            with torch.no_grad():
                d1, d2 = (dirichlet_from_logits(z.detach()) for z in u_logits)
                belief, uncertainty = class_aware_fusion(d1.belief, d1.uncertainty, d2.belief, d2.uncertainty)
                pseudo = belief.argmax(1)
                weight_r = reliability(belief, uncertainty)
                omega_u = self._omega(uncertainty[:, 0])
                target_u = one_hot(pseudo, k)
            pseudo_loss = torch.zeros((), device=x.device)
            fisher_loss = torch.zeros((), device=x.device)
            for z in u_logits:
                pseudo_loss = pseudo_loss + masked_cross_entropy(z, pseudo, weight_r) + \
                    masked_soft_dice(z, pseudo, weight_r)
                alpha = dirichlet_from_logits(z).alpha
                fie = fisher_evidential_loss(alpha, target_u, self.medl_fisher_coefficient)
                if self.medl_kl_weight:
                    fie = fie + self.medl_kl_weight * dirichlet_kl_to_uniform(alpha, target_u)
                fisher_loss = fisher_loss + (omega_u * fie).mean()
            # labeled: omega from u_final = l1 u_eps + l2 u_fused, weighting the Dirichlet CE against the labels
            labels = full_resolution(target)[:, 0]
            valid = torch.ones_like(labels, dtype=torch.float32)
            if self.label_manager.ignore_label is not None:
                valid = (labels != self.label_manager.ignore_label).float()
                labels = torch.where(labels == self.label_manager.ignore_label, torch.zeros_like(labels), labels)
            with torch.no_grad():
                e1, e2 = (dirichlet_from_logits(z.detach()) for z in l_logits)
                _, fused_l = class_aware_fusion(e1.belief, e1.uncertainty, e2.belief, e2.uncertainty)
                omegas_l = [self._omega(combined_uncertainty(e.uncertainty[:, 0], fused_l[:, 0],
                                                             self.medl_own_uncertainty_weight,
                                                             self.medl_fused_uncertainty_weight)) for e in (e1, e2)]
            weighted_ce = torch.zeros((), device=x.device)
            for z, omega in zip(l_logits, omegas_l):
                ce = evidential_cross_entropy(dirichlet_from_logits(z).alpha, labels)
                weighted_ce = weighted_ce + (omega * valid * ce).sum() / valid.sum().clamp_min(1.0)
            unramped = labeled_loss.float() + self.medl_pseudo_label_weight * pseudo_loss + \
                self.medl_weighted_labeled_weight * weighted_ce
            stats = _mean_stats([confidence_stats(u_logits[1], self.confidence_threshold),
                                 confidence_stats(u_logits[0], self.confidence_threshold)])
            stats.update(medl_labeled=float(labeled_loss.detach()), medl_pseudo=float(pseudo_loss.detach()),
                         medl_weighted_ce=float(weighted_ce.detach()), medl_fisher=float(fisher_loss.detach()),
                         medl_reliability=float(weight_r.mean()), medl_uncertainty=float(uncertainty.mean()),
                         medl_agreement=float((u_logits[0].argmax(1) == u_logits[1].argmax(1)).float().mean()))
        return unramped, fisher_loss, stats

    def ssl_log_keys(self) -> list[str]:
        return [*super().ssl_log_keys(), "ssl_medl_labeled", "ssl_medl_pseudo", "ssl_medl_weighted_ce",
                "ssl_medl_fisher", "ssl_medl_reliability", "ssl_medl_uncertainty", "ssl_medl_agreement"]

    def ssl_plot_panels(self) -> list[tuple[str, dict[str, str]]]:
        return [
            *super().ssl_plot_panels(),
            ("MEDL losses (both networks)", {"L_l (Dice+CE)": "ssl_medl_labeled", "L_u (pseudo-labels)":
                                             "ssl_medl_pseudo", "L_wl (omega CE)": "ssl_medl_weighted_ce",
                                             "L_I (FIE, before lambda)": "ssl_medl_fisher"}),
            ("MEDL evidence (unlabeled)", {"mean reliability R": "ssl_medl_reliability",
                                           "mean fused uncertainty u": "ssl_medl_uncertainty",
                                           "argmax agreement": "ssl_medl_agreement"}),
        ]

    def ssl_state_dict(self) -> dict:
        return {**super().ssl_state_dict(), "network2_weights": unwrap(self.network2).state_dict(),
                "optimizer2_state": self.optimizer2.state_dict()}

    def load_ssl_state_dict(self, state: dict) -> None:
        super().load_ssl_state_dict(state)
        unwrap(self.network2).load_state_dict(state["network2_weights"])
        self.optimizer2.load_state_dict(state["optimizer2_state"])

    def extra_final_checkpoints(self) -> dict[str, dict]:
        return {NET2_CHECKPOINT: unwrap(self.network2).state_dict()}

    def on_train_end(self) -> None:
        super().on_train_end()
        path = join(self.output_folder, NET2_CHECKPOINT)
        if self.local_rank == 0 and not self.disable_checkpointing and isfile(path):
            # nnU-Net's predictor builds the network of checkpoint['trainer_name']: name the class that builds network 2
            checkpoint = torch.load(path, map_location="cpu", weights_only=False)
            checkpoint["trainer_name"] = nnUNetTrainerMEDLNet2.__name__
            checkpoint["network_class_name"] = second_architecture(self.configuration_manager)[0]
            tmp = path + ".tmp"
            torch.save(checkpoint, tmp)
            os.replace(tmp, path)


class nnUNetTrainerMEDLNet2(nnUNetTrainerMEDL):
    """Inference only: builds MEDL's network 2 so that nnUNetv2_predict can load checkpoint_final_net2.pth.

    nnU-Net's predictor never instantiates the trainer: it resolves ``checkpoint['trainer_name']`` and calls its
    static ``build_network_architecture``; this class returns network 2's architecture there. Training it is
    refused (train ``nnUNetTrainerMEDL``, which writes the file)."""

    #: not a training recipe (nnUNetv2_ssl_benchmark refuses it)
    inference_only = True

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        raise SSLInputError("nnUNetTrainerMEDLNet2 only loads checkpoint_final_net2.pth for prediction; train with "
                            "-tr nnUNetTrainerMEDL")

    @staticmethod
    def build_network_architecture(plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        return build_second_network(plans_manager, configuration_manager, num_input_channels, num_output_channels,
                                    enable_deep_supervision)
