"""MetaSSL's heterogeneous loss as a plug-in for any host (Mean Teacher, FixMatch, CPS)."""

from __future__ import annotations

import torch

from nnunet_ssl.losses.metassl import REGION_NAMES, MetaSSLLoss, RegionWeights
from nnunet_ssl.trainers.step import SSLStep


class MetaSSL:
    """Mixin that replaces a host's unsupervised loss by MetaSSL's region-weighted CE and adds its labeled branch.

    Paper: "MetaSSL: A General Heterogeneous Loss for Semi-Supervised Medical Image Segmentation", IEEE TMI 2025,
    arXiv 2509.01144; code HiLab-git/MetaSSL. Equations, defaults and deviations: :mod:`nnunet_ssl.losses.metassl`.
    Per step, with ``p`` the host's supervised prediction and ``p~`` its reference (EMA teacher, weak view, or the
    other network): ``L = L_sup + lambda(t) [L_MetaSSL^unl(p_u, argmax p~_u) + L_MetaSSL^lab(p_l, y)]``, with
    MetaSSL's schedule ``lambda(t) = 0.1 exp(-5 (1 - t/T_r)^2)`` whatever the host's own weight.

    Host-specific notes: with Mean Teacher the teacher also predicts the labeled images (as in the official MT
    code); with FixMatch the reference on labeled images is the same network without gradient, so every labeled
    voxel is unanimous and the labeled branch splits by confidence only; with two networks each direction
    (``step.direction``) has its own loss module and thresholds. Thresholds are part of the checkpoint and resume with
    ``--c``. The logged ``ssl_unsup_loss`` is the whole bracket (unlabeled + labeled branch);
    ``ssl_labeled_branch_loss`` is the labeled branch alone (summed over both directions with two networks).
    The unlabeled branch accepts per-voxel weights (``accepts_voxel_weights``), e.g. quality weights.

    Set ``metassl_order = "paper"`` for the abstract's UC > US > DC > DS order (default: the official 3D MT
    weights, UC > US > DS > DC), or the ``metassl_*`` attributes below in a subclass.

    Presets (``preset``, or ``nnUNet_ssl_preset``):

    - ``"default"``: region weights normalised to mean 1 (``metassl_normalise``), so both branches are on a CE's
      scale (about 1-2 on Hippocampus, so ``lambda = 0.1`` makes them a substantial share of ``L_sup + n`` rather
      than 7-25 times it); thresholds without the 0.9 cap (``metassl_cap = None``), so that they
      follow the class-mean confidence of nnU-Net's over-confident softmax instead of sitting at the cap from the
      first epochs (logged: they did on Hippocampus), and "confident" keeps meaning "above this class's average";
      the reference's confidence is read after temperature scaling on the fold's validation cases (CPS: each network
      through its own temperature; :class:`~nnunet_ssl.trainers.calibration.ReferenceCalibration`).
    - ``"paper"``: the official 3D code: unnormalised weights (the bracket is 60-260 on Hippocampus, 7-25 times
      ``|L_sup|`` at lambda 0.1, which nnU-Net's gradient clipping then rescales), cap 0.9, lambda 0.1 over 20 %.
    """

    paper_settings = {"unsupervised_share": None, "unsupervised_weight": 0.1, "rampup_fraction": 0.2,
                      "metassl_cap": 0.9, "metassl_normalise": False, "calibrate_reference": False}
    #: the reference's confidence defines the unlabeled regions: read it after temperature scaling
    calibrate_reference = True
    unsupervised_weight = 0.1
    rampup_fraction = 0.2
    uses_labeled_reference = True
    accepts_voxel_weights = True
    metassl_order: str = "code"
    metassl_alpha: float = 0.5
    metassl_tau0: float = 0.9
    metassl_cap: float | None = None
    #: divide each branch by its total voxel weight (mean-1 voxel weights); False in the official code
    metassl_normalise: bool = True
    metassl_unlabeled_weights: RegionWeights | None = None
    metassl_labeled_weights: RegionWeights | None = None

    def build_ssl_modules(self) -> None:
        super().build_ssl_modules()
        self.metassl_losses = [
            MetaSSLLoss(self.label_manager.num_segmentation_heads, order=self.metassl_order,
                        unlabeled_weights=self.metassl_unlabeled_weights,
                        labeled_weights=self.metassl_labeled_weights, alpha=self.metassl_alpha,
                        tau0=self.metassl_tau0, cap=self.metassl_cap, ignore_label=self.label_manager.ignore_label,
                        regions=self.label_manager.has_regions, normalise=self.metassl_normalise).to(self.device)
            for _ in range(self.loss_directions)]

    def unsupervised_loss(self, student_logits: torch.Tensor, reference_logits: torch.Tensor, step: SSLStep,
                          voxel_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        loss, stats = self.metassl_losses[step.direction].unlabeled(student_logits, reference_logits,
                                                                    voxel_weights=step.voxel_weights(voxel_weights))
        return loss, {f"u_{k}": v for k, v in stats.items()}

    def labeled_loss(self, student_logits, reference_logits, target, step):
        loss, stats = self.metassl_losses[step.direction].labeled(student_logits, reference_logits, target)
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
        keys = [f"ssl_{b}_frac_{r}" for b in "ul" for r in REGION_NAMES]
        keys += [f"ssl_{b}_tau_{c}" for b in "ul" for c in self._classes()]
        return [*super().ssl_log_keys(), *keys]

    def ssl_plot_panels(self) -> list[tuple[str, dict[str, str]]]:
        return [
            *super().ssl_plot_panels(),
            ("MetaSSL regions, unlabeled", {r.upper(): f"ssl_u_frac_{r}" for r in REGION_NAMES}),
            ("MetaSSL regions, labeled", {r.upper(): f"ssl_l_frac_{r}" for r in REGION_NAMES}),
            ("MetaSSL class thresholds", {
                **{f"class {c}, reference (unlabeled)": f"ssl_u_tau_{c}" for c in self._classes()},
                **{f"class {c}, supervised (labeled)": f"ssl_l_tau_{c}" for c in self._classes()}}),
        ]
