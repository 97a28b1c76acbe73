"""Cross Pseudo Supervision host."""

from __future__ import annotations

import torch
from torch import nn

from nnunet_ssl.losses.consistency import confidence_stats
from nnunet_ssl.losses.pseudo_label import hard_pseudo_labels, masked_cross_entropy
from nnunet_ssl.trainers.base import full_resolution, nnUNetTrainerSSL, split_batch, unwrap


class nnUNetTrainerCPS(nnUNetTrainerSSL):
    """Cross Pseudo Supervision: two differently initialised nnU-Nets learn from each other's argmax on unlabeled data.

    Paper: Chen et al., "Semi-Supervised Semantic Segmentation with Cross Pseudo Supervision", CVPR 2021;
    reference implementation for medical segmentation: SSL4MIS ``train_cross_pseudo_supervision_3D.py``.

    ``L = sum_{k=1,2} [ L_sup(f_k(x_l), y) + lambda(t) CE(f_k(u), argmax f_{3-k}(u)) ]``, both networks updated
    (each target is detached), ``lambda(t) = 0.1 exp(-5 (1 - t/T_r)^2)`` over the first 20 % of training.

    Network 1 is ``self.network`` (saved as ``network_weights``, predicted by default); network 2 is saved in the
    checkpoints' ``ssl_state`` with its optimizer and resumed by ``--c``, and written as
    ``checkpoint_final_net2.pth`` for ``nnUNetv2_predict -chk``.

    Deviations, and why:

    - L_sup is nnU-Net's deep-supervised Dice + CE for each network; the cross terms use the full-resolution output.
    - Both networks see the same unlabeled view (one draw of nnU-Net's augmentation), as in CPS.
    - ``-pretrained_weights`` initialises network 1 only: copying it into network 2 would remove the different
      initialisation CPS relies on.
    - One GradScaler serves both optimizers under CUDA AMP (GradScaler supports several optimizers).
    """

    view_intensity = (True,)
    unsupervised_weight = 0.1
    reference_name = "network 2"
    student_name = "network 1"
    needs_argmax_labels = True

    def build_ssl_modules(self) -> None:
        # the generator has moved on since network 1 was built, so network 2 gets a different initialisation
        network = self.build_network_architecture(
            self.plans_manager, self.configuration_manager, self.num_input_channels,
            self.label_manager.num_segmentation_heads, self.enable_deep_supervision).to(self.device)
        self.network2, self.optimizer2, self.lr_scheduler2 = self.attach_trained_network(network)

    def reference_network(self) -> nn.Module | None:
        return getattr(self, "network2", None)

    @classmethod
    def compute_units(cls, labeled_batch: int, unlabeled_batch: int) -> float:
        """Both networks forward + backward on labeled + unlabeled, ``2 * 3 (B + U)``; the pseudo-labels and
        MetaSSL's labeled reference reuse these outputs, so there is no extra forward."""
        return float(2 * 3 * (labeled_batch + unlabeled_batch))

    def trainable(self):
        return [(self.network, self.optimizer), (self.network2, self.optimizer2)]

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        self.lr_scheduler2.step(self.current_epoch)

    def student_input(self, views):
        return views["view0"]

    def forward_losses(self, data, target, views):
        n_labeled = data.shape[0]
        x = torch.cat([data, views["view0"]], 0)
        with self._autocast():
            out1, out2 = self.network(x), self.network2(x)
            lab1, unl1 = split_batch(out1, n_labeled)
            lab2, unl2 = split_batch(out2, n_labeled)
            sup_loss = self.loss(lab1, target) + self.loss(lab2, target)
        with self._no_autocast():
            u1, u2 = full_resolution(unl1).float(), full_resolution(unl2).float()
            self.loss_direction = 0
            loss12, stats12 = self.unsupervised_loss(u1, u2.detach(), views)
            self.loss_direction = 1
            loss21, stats21 = self.unsupervised_loss(u2, u1.detach(), views)
            unsup_loss = loss12 + loss21
            stats = _mean_stats([{**confidence_stats(u2, self.confidence_threshold), **stats12},
                                 {**confidence_stats(u1, self.confidence_threshold), **stats21}])
            if self.uses_labeled_reference:
                l1, l2, t = full_resolution(lab1).float(), full_resolution(lab2).float(), full_resolution(target)
                self.loss_direction = 0
                a, sa = self.labeled_loss(l1, l2.detach(), t)
                self.loss_direction = 1
                b, sb = self.labeled_loss(l2, l1.detach(), t)
                unsup_loss = unsup_loss + a + b
                stats.update(_mean_stats([sa, sb]), labeled_branch_loss=(a + b).detach())
            self.loss_direction = 0
        return sup_loss, unsup_loss, stats

    def unsupervised_loss(self, student_logits, reference_logits, views):
        labels, _ = hard_pseudo_labels(reference_logits)
        return masked_cross_entropy(student_logits, labels), {}

    def ssl_state_dict(self) -> dict:
        return {**super().ssl_state_dict(), "network2_weights": unwrap(self.network2).state_dict(),
                "optimizer2_state": self.optimizer2.state_dict()}

    def load_ssl_state_dict(self, state: dict) -> None:
        super().load_ssl_state_dict(state)
        unwrap(self.network2).load_state_dict(state["network2_weights"])
        self.optimizer2.load_state_dict(state["optimizer2_state"])

    def extra_final_checkpoints(self) -> dict[str, dict]:
        return {"checkpoint_final_net2.pth": unwrap(self.network2).state_dict()}


def _mean_stats(stats: list[dict]) -> dict[str, float]:
    keys = set().union(*stats)
    return {k: sum(float(s[k]) for s in stats if k in s) / sum(1 for s in stats if k in s) for k in keys}
