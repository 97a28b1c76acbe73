"""Two-network host: a second trained network (its optimizer, LR schedule, checkpoints and cost) is the reference."""

from __future__ import annotations

import torch
from torch import nn

from nnunet_ssl.compat.trainer import network_swapped, should_compile, unwrap, wrap_for_ddp
from nnunet_ssl.errors import SSLInputError
from nnunet_ssl.losses.consistency import confidence_stats
from nnunet_ssl.trainers.base import full_resolution, nnUNetTrainerSSL, split_batch
from nnunet_ssl.trainers.hosts.architectures import build_other_unet, other_unet_architecture
from nnunet_ssl.trainers.step import SSLStep

NET2_CHECKPOINT = "checkpoint_final_net2.pth"


def mean_stats(stats: list[dict]) -> dict[str, float]:
    """Per-key mean of statistics dicts (keys missing in some dicts are averaged over the others)."""
    keys = set().union(*stats)
    return {k: sum(float(s[k]) for s in stats if k in s) / sum(1 for s in stats if k in s) for k in keys}


class TwoNetworks(nnUNetTrainerSSL):
    """Host of two networks trained together on the same labeled batch and unlabeled view.

    Network 1 is ``self.network`` (saved as ``network_weights``, predicted by default); network 2 (``network2``) has
    its own optimizer and LR schedule (the trainer's recipe), is compiled when nnU-Net compiles network 1, is
    DDP-wrapped, saved in the checkpoints' ``ssl_state`` and resumed by ``--c``, and written at the end as
    ``checkpoint_final_net2.pth`` for ``nnUNetv2_predict -chk``. Both see ``cat(x_l, x_u)`` in one forward each;
    ``L_sup`` is nnU-Net's deep-supervised Dice + CE of both. One GradScaler serves both optimizers under CUDA AMP.
    ``-pretrained_weights`` initialise network 1 only (copying them would remove the different initialisation).

    ``second_network = "same"`` builds network 2 like network 1 (the generator has moved on, so it starts from
    another initialisation); ``"other_unet"`` builds nnU-Net's other U-Net
    (:func:`~nnunet_ssl.trainers.hosts.architectures.other_unet_architecture`), whose final checkpoint names the
    inference-only class ``net2_inference_trainer`` so that ``nnUNetv2_predict`` builds the right network.

    The loss is :meth:`mutual_loss`: by default each network learns from the other's detached prediction through
    ``unsupervised_loss`` (and ``labeled_loss``), with ``step.direction`` 0 for network 1 and 1 for network 2.
    """

    view_intensity = (True,)
    loss_directions = 2
    #: with ``calibrate_reference`` (MetaSSL) each network gets its own temperature, used where it is the reference
    calibrated_count = 2
    reference_name = "network 2"
    student_name = "network 1"
    #: "same" or "other_unet"
    second_network: str = "same"
    #: trainer name written into checkpoint_final_net2.pth when network 2 has another architecture
    net2_inference_trainer: str | None = None

    def build_second_network(self) -> nn.Module:
        if self.second_network == "same":
            return self.build_network_architecture(
                self.plans_manager, self.configuration_manager, self.num_input_channels,
                self.label_manager.num_segmentation_heads, self.enable_deep_supervision)
        if self.second_network == "other_unet":
            return build_other_unet(self.plans_manager, self.configuration_manager, self.num_input_channels,
                                    self.label_manager.num_segmentation_heads, self.enable_deep_supervision)
        raise SSLInputError(f"second_network={self.second_network!r} is unknown; set it to 'same' or 'other_unet'")

    def build_ssl_modules(self) -> None:
        network = self.build_second_network().to(self.device)
        if should_compile(self):
            network = torch.compile(network)
        with network_swapped(self, network):  # configure_optimizers reads self.network
            self.optimizer2, self.lr_scheduler2 = self.configure_optimizers()
        self.network2 = wrap_for_ddp(self, network) if self.is_ddp else network

    def reference_network(self) -> nn.Module | None:
        return getattr(self, "network2", None)

    def calibration_networks(self) -> list[nn.Module]:
        return [self.network, self.network2]

    @classmethod
    def compute_units(cls, labeled_batch: int, unlabeled_batch: int) -> float:
        """Both networks forward + backward on labeled + unlabeled, ``2 * 3 (B + U)``; the pseudo-labels reuse these
        outputs, so there is no extra forward. Counts passes, not FLOPs (another architecture may be heavier)."""
        return float(2 * 3 * (labeled_batch + unlabeled_batch))

    def trainable(self) -> list[tuple[nn.Module, torch.optim.Optimizer]]:
        return [(self.network, self.optimizer), (self.network2, self.optimizer2)]

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        self.lr_scheduler2.step(self.current_epoch)

    def forward_losses(self, step: SSLStep) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        n_labeled = step.data.shape[0]
        step.student_image = self.student_input(step)
        x = torch.cat([step.data, step.student_image], 0)
        with self._autocast():
            out1, out2 = self.network(x), self.network2(x)
            lab1, unl1 = split_batch(out1, n_labeled)
            lab2, unl2 = split_batch(out2, n_labeled)
            sup_loss = self.loss(lab1, step.target) + self.loss(lab2, step.target)
        with self._no_autocast():
            unlabeled = [full_resolution(unl1).float(), full_resolution(unl2).float()]
            labeled = [full_resolution(lab1).float(), full_resolution(lab2).float()]
            unsup_loss, stats = self.mutual_loss(unlabeled, labeled, step)
            # each network's pseudo-labels come from the other one
            confidence = mean_stats([confidence_stats(self.calibrated(unlabeled[1].detach(), 1),
                                                      self.confidence_threshold),
                                     confidence_stats(self.calibrated(unlabeled[0].detach(), 0),
                                                      self.confidence_threshold)])
        return sup_loss, unsup_loss, {**confidence, **stats}

    def mutual_loss(self, unlabeled: list[torch.Tensor], labeled: list[torch.Tensor],
                    step: SSLStep) -> tuple[torch.Tensor, dict[str, float]]:
        """The unsupervised loss (before lambda) from both networks' full-resolution float32 logits on the
        unlabeled and labeled images, plus statistics to log."""
        loss, stats = self.cross_loss(*unlabeled, step)
        if self.uses_labeled_reference:
            (l1, l2), target = labeled, full_resolution(step.target)
            step.direction = 0
            a, stats_a = self.labeled_loss(l1, self.calibrated(l2.detach(), 1), target, step)
            step.direction = 1
            b, stats_b = self.labeled_loss(l2, self.calibrated(l1.detach(), 0), target, step)
            loss = loss + a + b
            stats.update(mean_stats([stats_a, stats_b]), labeled_branch_loss=(a + b).detach())
        step.direction = 0
        return loss, stats

    def cross_loss(self, out1: torch.Tensor, out2: torch.Tensor,
                   step: SSLStep) -> tuple[torch.Tensor, dict[str, float]]:
        """Both directions of ``unsupervised_loss`` on the same images: network 1 against network 2's detached
        output (``step.direction`` 0) and back (1), each reference read through its own temperature."""
        step.direction = 0
        loss12, stats12 = self.unsupervised_loss(out1, self.calibrated(out2.detach(), 1), step)
        step.direction = 1
        loss21, stats21 = self.unsupervised_loss(out2, self.calibrated(out1.detach(), 0), step)
        step.direction = 0
        return loss12 + loss21, mean_stats([stats12, stats21])

    def ssl_state_dict(self) -> dict:
        return {**super().ssl_state_dict(), "network2_weights": unwrap(self.network2).state_dict(),
                "optimizer2_state": self.optimizer2.state_dict()}

    def load_ssl_state_dict(self, state: dict) -> None:
        super().load_ssl_state_dict(state)
        unwrap(self.network2).load_state_dict(state["network2_weights"])
        self.optimizer2.load_state_dict(state["optimizer2_state"])

    def extra_final_checkpoints(self) -> dict[str, tuple[dict[str, torch.Tensor], dict]]:
        overrides = {}
        if self.second_network == "other_unet":
            overrides = {"trainer_name": self.net2_inference_trainer,
                         "network_class_name": other_unet_architecture(self.configuration_manager)[0]}
        return {NET2_CHECKPOINT: (unwrap(self.network2).state_dict(), overrides)}


class SecondNetworkForInference:
    """Mixin for an inference-only class: builds the other U-Net, so ``nnUNetv2_predict -chk
    checkpoint_final_net2.pth`` works unchanged.

    nnU-Net's predictor never instantiates the trainer: it resolves ``checkpoint['trainer_name']`` and calls its
    static ``build_network_architecture``; this class returns network 2's architecture there. Training it is
    refused (train the class it derives from, which writes the file)."""

    #: not a training recipe (nnUNetv2_ssl_benchmark refuses it)
    inference_only = True

    def __init__(self, *args, **kwargs):
        trained = next(c.__name__ for c in type(self).__mro__[1:] if c.__name__.startswith("nnUNetTrainer"))
        raise SSLInputError(f"{type(self).__name__} only loads checkpoint_final_net2.pth for prediction; train with "
                            f"-tr {trained}")

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> nn.Module:
        return build_other_unet(plans_manager, configuration_manager, num_input_channels, num_output_channels,
                                enable_deep_supervision)
