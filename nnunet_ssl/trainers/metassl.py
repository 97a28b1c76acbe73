"""MetaSSL's heterogeneous loss as a plug-in for any host (Mean Teacher, FixMatch, CPS)."""

from __future__ import annotations

import torch

from nnunet_ssl.losses.metassl import MetaSSLLoss, RegionWeights
from nnunet_ssl.trainers.base import full_resolution
from nnunet_ssl.trainers.cps import nnUNetTrainerCPS
from nnunet_ssl.trainers.fixmatch import nnUNetTrainerFixMatch
from nnunet_ssl.trainers.mean_teacher import nnUNetTrainerMeanTeacher

_REGIONS = ("uc", "us", "dc", "ds")


class MetaSSL:
    """Mixin that replaces a host's unsupervised loss by MetaSSL's region-weighted CE and adds its labeled branch.

    Paper: "MetaSSL: A General Heterogeneous Loss for Semi-Supervised Medical Image Segmentation", IEEE TMI 2025,
    arXiv 2509.01144; code HiLab-git/MetaSSL. Equations, defaults and deviations: :mod:`nnunet_ssl.losses.metassl`.
    Per step, with ``p`` the host's supervised prediction and ``p~`` its reference (EMA teacher, weak view, or the
    other network): ``L = L_sup + lambda(t) [L_MetaSSL^unl(p_u, argmax p~_u) + L_MetaSSL^lab(p_l, y)]``, with
    MetaSSL's schedule ``lambda(t) = 0.1 exp(-5 (1 - t/T_r)^2)`` whatever the host's own weight.

    Host-specific notes: with Mean Teacher the teacher also predicts the labeled images (as in the official MT
    code); with FixMatch the reference on labeled images is the same network without gradient, so every labeled
    voxel is unanimous and the labeled branch splits by confidence only; with CPS each direction has its own loss
    module and thresholds. Thresholds are part of the checkpoint and resume with ``--c``. The logged
    ``ssl_unsup_loss`` is the whole bracket (unlabeled + labeled branch); ``ssl_labeled_branch_loss`` is the
    labeled branch alone (summed over both directions with CPS).

    Set ``metassl_order = "paper"`` for the abstract's UC > US > DC > DS order (default: the official 3D MT
    weights, UC > US > DS > DC), or the ``metassl_*`` attributes below in a subclass.
    """

    unsupervised_weight = 0.1
    rampup_fraction = 0.2
    uses_labeled_reference = True
    metassl_order: str = "code"
    metassl_alpha: float = 0.5
    metassl_tau0: float = 0.9
    metassl_cap: float | None = 0.9
    metassl_unlabeled_weights: RegionWeights | None = None
    metassl_labeled_weights: RegionWeights | None = None
    metassl_directions: int = 1

    def build_ssl_modules(self) -> None:
        super().build_ssl_modules()
        self.metassl_losses = [
            MetaSSLLoss(self.label_manager.num_segmentation_heads, order=self.metassl_order,
                        unlabeled_weights=self.metassl_unlabeled_weights,
                        labeled_weights=self.metassl_labeled_weights, alpha=self.metassl_alpha,
                        tau0=self.metassl_tau0, cap=self.metassl_cap, ignore_label=self.label_manager.ignore_label,
                        regions=self.label_manager.has_regions).to(self.device)
            for _ in range(self.metassl_directions)]

    def unsupervised_loss(self, student_logits, reference_logits, views):
        loss, stats = self.metassl_losses[self.loss_direction].unlabeled(student_logits, reference_logits)
        return loss, {f"u_{k}": v for k, v in stats.items()}

    def labeled_loss(self, student_logits, reference_logits, target):
        loss, stats = self.metassl_losses[self.loss_direction].labeled(student_logits, reference_logits, target)
        return loss, {f"l_{k}": v for k, v in stats.items()}

    def ssl_state_dict(self) -> dict:
        return {**super().ssl_state_dict(), "metassl": [m.state_dict() for m in self.metassl_losses]}

    def load_ssl_state_dict(self, state: dict) -> None:
        super().load_ssl_state_dict(state)
        for module, saved in zip(self.metassl_losses, state["metassl"]):
            module.load_state_dict(saved)

    def _classes(self) -> range:
        return range(self.label_manager.num_segmentation_heads)

    def ssl_log_keys(self) -> list[str]:
        keys = [f"ssl_{b}_frac_{r}" for b in "ul" for r in _REGIONS]
        keys += [f"ssl_{b}_tau_{c}" for b in "ul" for c in self._classes()]
        return [*super().ssl_log_keys(), *keys]

    def ssl_plot_panels(self) -> list[tuple[str, dict[str, str]]]:
        return [
            *super().ssl_plot_panels(),
            ("MetaSSL regions, unlabeled", {r.upper(): f"ssl_u_frac_{r}" for r in _REGIONS}),
            ("MetaSSL regions, labeled", {r.upper(): f"ssl_l_frac_{r}" for r in _REGIONS}),
            ("MetaSSL class thresholds", {
                **{f"class {c}, reference (unlabeled)": f"ssl_u_tau_{c}" for c in self._classes()},
                **{f"class {c}, supervised (labeled)": f"ssl_l_tau_{c}" for c in self._classes()}}),
        ]


class nnUNetTrainerMeanTeacherMetaSSL(MetaSSL, nnUNetTrainerMeanTeacher):
    """Mean Teacher host with MetaSSL's heterogeneous UC/US/DC/DS loss (and its labeled branch)."""

    def reference_logits_labeled(self, data: torch.Tensor) -> torch.Tensor:
        return full_resolution(self.teacher(data))


class nnUNetTrainerFixMatchMetaSSL(MetaSSL, nnUNetTrainerFixMatch):
    """FixMatch host (weak-view reference, strong CutMixed view) with MetaSSL's heterogeneous loss."""

    def reference_logits_labeled(self, data: torch.Tensor) -> torch.Tensor:
        return full_resolution(self.network(data))


class nnUNetTrainerCPSMetaSSL(MetaSSL, nnUNetTrainerCPS):
    """Cross Pseudo Supervision host with MetaSSL's heterogeneous loss in both directions."""

    metassl_directions = 2
