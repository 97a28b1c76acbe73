"""TransMedSeg's transferable semantic augmentation (TSA) as a plug-in: class statistics of the labeled and the
unlabeled domain, and ISDA's closed-form bound of the cross-entropy under features moved toward the other domain."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import distributed as dist
from torch import nn

from nnunet_ssl.compat.trainer import FeatureTaps, unwrap
from nnunet_ssl.errors import SSLInputError
from nnunet_ssl.losses.semantic_augmentation import (
    ClassStatistics,
    logit_adjustment,
    semantic_augmentation_loss,
    transfer_terms,
)
from nnunet_ssl.trainers.base import full_resolution
from nnunet_ssl.trainers.logs import GATE_MINIMUM, NEGLIGIBLE_SHARE
from nnunet_ssl.trainers.step import SSLStep

#: which side's features are augmented toward the other side's class statistics
AUGMENTED_SIDES = ("unlabeled", "labeled")
SIDES = ("labeled", "unlabeled")


class TransferableSemanticAugmentation:
    """TransMedSeg: the features of one domain implicitly augmented toward the other domain's class semantics, through
    ISDA's upper bound of the expected cross-entropy, on a Mean Teacher host.

    Paper: Wang, Li, Wang, Lan, Tan, Yang, Yang, "TransMedSeg: A Transferable Semantic Framework for Semi-Supervised
    Medical Image Segmentation", arXiv 2505.14753 (2025); no code released. The bound is ISDA's (Wang et al.,
    "Implicit Semantic Data Augmentation for Deep Networks", NeurIPS 2019 / TPAMI 2021; official code
    blackfeather-wang/ISDA-for-Deep-Networks, read to understand); the transfer of statistics between domains is
    TSA's (Li et al., "Transferable Semantic Augmentation for Domain Adaptation", CVPR 2021). Only the abstract and a
    secondary summary of TransMedSeg were reachable (research notes section 9.3); what follows them is marked,
    everything else is inferred.

    Features: ``a``, the input of nnU-Net's last segmentation head ``decoder.seg_layers[-1]`` (a 1 x 1 convolution,
    i.e. a linear classifier ``z = W a + b`` per voxel), which is the output of ``decoder.stages[-1]``
    (:class:`~nnunet_ssl.compat.trainer.FeatureTaps`' "low", hooks registered before the first forward); D its
    channels (32 in nnU-Net's plans), C the classes. Per step, with labeled images (x_l, y) and unlabeled views
    (u_a for the student, u_b for the teacher):

    - statistics (:class:`~nnunet_ssl.losses.semantic_augmentation.ClassStatistics`): per class c, mean and
      covariance ``(mu^l_c, Sigma^l_c)`` of the student's features of labeled voxels with their labels (ignore label
      left out), and ``(mu^u_c, Sigma^u_c)`` of the teacher's features of unlabeled voxels with its argmax
      pseudo-labels ``y^`` where its confidence is at least ``statistics_confidence``; voxel-weighted exponential
      forgetting with ``statistics_momentum`` rho per step (``W' = rho W + n``, the new batch weighs ``n / W'``),
      detached, float32 sums and float64 state; under DDP the batch sums are all-reduced first, so every rank holds
      the same statistics; saved in the SSL state (``--c`` resumes them).
    - transfer (``augmented_side``), for class y active on both sides (each has seen ``min_class_voxels``):

      - ``"unlabeled"`` (default, the abstract's "teacher network features are adaptively augmented towards student
        network semantics"): unlabeled voxels, label ``y^``, ``a' ~ N(a + alpha (mu^l_y - mu^u_y), alpha Sigma^l_y)``
        with ``a`` the student's features of u_a;
      - ``"labeled"`` (the secondary summary's ``dmu = mu^t - mu^s`` with ``Sigma^t``, and TSA's source-toward-target
        direction): labeled voxels, label y, ``a' ~ N(a + alpha (mu^u_y - mu^l_y), alpha Sigma^u_y)``;

      an inactive class gets no shift and no covariance (its voxels keep the plain cross-entropy); a line in the log
      names the active classes whenever they change, ``ssl_semantic_active`` is their share.
    - bound (:mod:`nnunet_ssl.losses.semantic_augmentation`), exact for the linear head, no sampling:
      ``A_yj = alpha (w_j - w_y)^T dmu_y + (alpha / 2) (w_j - w_y)^T Sigma_y (w_j - w_y)`` once per step (C x C),
      ``L_tsa = mean over the voxels of CE(z + A_y, y)`` >= ``E[CE(W a' + b, y)]``, z recomputed in float32 from the
      captured features with the head's own weights (the gradient reaches the backbone through a and the head
      through z and A). On the unlabeled side the voxels carry the host's ``reference_weights``, if any.
    - schedule: ``alpha(t) = semantic_alpha * t / T`` (ISDA's linear ramp over all T iterations);
      ``beta(t) = semantic_weight * r(t)``, r the common sigmoid ramp (``semantic_ramp``);
      ``L = L_sup + lambda(t) L_MT + beta(t) L_tsa``, the last a scheduled float32 term outside autocast
      (``step.add_scheduled_loss``) whose share of ``L_sup + 1`` is ``ssl_other_share``.

    Logged: ``ssl_semantic_loss`` (L_tsa before beta), ``ssl_semantic_ce`` (the plain CE of the same voxels: the
    difference is the augmentation's own part), ``ssl_semantic_weight`` (beta(t)), ``ssl_semantic_alpha``,
    ``ssl_semantic_active`` (share of classes adjusted), ``ssl_semantic_kept`` (share of unlabeled voxels entering the
    statistics), ``ssl_semantic_shift`` (mean ``|dmu_y|`` over the active classes); the log warns when the gate keeps
    under 1 % of the unlabeled voxels, when a class has no statistics yet, and when ``beta L_tsa`` is under 1 % of
    the supervised loss past the ramp's midpoint.

    Presets (``preset``, or ``nnUNet_ssl_preset``):

    - ``"default"``: beta = 0.5 on the common ramp: L_tsa is a cross-entropy to argmax pseudo-labels on every
      unlabeled voxel (plus the augmentation), beside nnU-Net's CE on labels; half the weight of that CE, because
      pseudo-labels are less reliable than labels, and ramped in because the first ones are a random network's.
      alpha_0 = 0.5, ISDA's value for its full-covariance classifiers (its Cityscapes code uses 7.5 with a diagonal
      covariance of 512 features). rho = 0.99 (statistics of about the last 100 steps: the features of a network
      that changes). ``statistics_confidence = 0.9``: a wrong pseudo-label puts a voxel's feature into another
      class's mean and covariance, and wrong labels gather at low confidence. ``min_class_voxels = 1000``, about
      30 voxels per dimension of a 32-channel covariance.
    - ``"paper"``: ``L = L_GraphCL + beta L_tsa`` has no ramp on beta (``semantic_ramp = False``); the sources
      mention no confidence gate (``statistics_confidence = 0``). beta, alpha_0 and the memory's momentum are not
      given (UNKNOWN): ours; the direction is the abstract's in both presets. The Mean Teacher host's own
      ``paper_settings`` apply too.

    Deviations and inferences, and why:

    - TransMedSeg is built on GraphCL; we do not implement GraphCL: the Mean Teacher host's consistency (its own
      lambda-weighted loss) stands in for it, and TSA is the plug-in on top.
    - The abstract augments the teacher's features, but the teacher is an EMA and takes no gradient: the loss is on
      the student's features of the same unlabeled voxels (its view u_a, same geometry as the teacher's u_b), with
      the teacher's pseudo-labels; the teacher's features define the unlabeled statistics.
    - Direction: the abstract and the secondary summary disagree; the abstract's is the default, the other is
      ``augmented_side = "labeled"``.
    - Features at full resolution only (deep supervision's lower heads are left out), from nnU-Net's own network.
    - Statistics: exponentially forgetting instead of the paper's unspecified "memory module" (EMA per the
      summary); rho = 1 is ISDA's cumulative estimator. Full covariance (ISDA's classification code), not the
      diagonal of ISDA's segmentation code: D = 32 makes it cheap. Reduced over DDP ranks (ISDA's code keeps one
      estimator per GPU).
    - The confidence gate on the unlabeled statistics and the minimum voxel count are ours (above); the loss itself
      keeps every unlabeled voxel, as CPS's argmax cross-entropy does.
    - The statistics are updated before the loss of the same step (ISDA's order).

    Cost: no extra network pass (the features come from the forwards that give the logits); per step the moments
    cost about ``C N D^2`` multiply-adds per side (N voxels of the side's batch) and the bound a C x C x D^2
    matrix, a gather and a cross-entropy; memory ``2 C D^2`` floats of state.
    """

    paper_settings = {"semantic_ramp": False, "statistics_confidence": 0.0}
    needs_argmax_labels = True
    #: beta: weight of L_tsa (after the common ramp, with ``semantic_ramp``)
    semantic_weight: float = 0.5
    #: alpha_0: alpha(t) = alpha_0 t / T, ISDA's linear schedule over the whole training
    semantic_alpha: float = 0.5
    #: whether beta follows the common sigmoid ramp of lambda (default) or is constant (paper preset)
    semantic_ramp: bool = True
    #: "unlabeled": unlabeled voxels' features move toward the labeled statistics (abstract); "labeled": the reverse
    augmented_side: str = "unlabeled"
    #: rho of the statistics (each voxel's weight decays by rho per step); 1 = ISDA's cumulative estimate
    statistics_momentum: float = 0.99
    #: unlabeled voxels enter the statistics only where the teacher's confidence reaches this (0 = every voxel)
    statistics_confidence: float = 0.9
    #: a class gets an adjustment only once both sides' statistics have seen this many of its voxels
    min_class_voxels: int = 1000

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        checks = [
            ("semantic_weight", self.semantic_weight, lambda v: v >= 0, "a number >= 0 (beta), e.g. 0.5"),
            ("semantic_alpha", self.semantic_alpha, lambda v: v >= 0, "a number >= 0 (alpha_0), e.g. 0.5"),
            ("statistics_momentum", self.statistics_momentum, lambda v: 0 < v <= 1,
             "in (0, 1] (1 = cumulative statistics), e.g. 0.99"),
            ("statistics_confidence", self.statistics_confidence, lambda v: 0 <= v < 1,
             "in [0, 1) (0 = every unlabeled voxel), e.g. 0.9"),
            ("min_class_voxels", self.min_class_voxels, lambda v: v >= 0, "a number of voxels >= 0, e.g. 1000"),
        ]
        for name, value, ok, what in checks:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(value):
                raise SSLInputError(f"{name}={value!r} must be {what} (a TransMedSeg setting)")
        if self.augmented_side not in AUGMENTED_SIDES:
            raise SSLInputError(f"augmented_side={self.augmented_side!r} is unknown; set it to 'unlabeled' (unlabeled "
                                "features toward the labeled statistics, the abstract) or 'labeled' (the reverse)")
        self._semantic_active: list[int] | None = None

    # ------------------------------------------------------------------ modules
    def build_ssl_modules(self) -> None:
        super().build_ssl_modules()
        head = self.segmentation_head()
        if not isinstance(head, nn.modules.conv._ConvNd) or any(k != 1 for k in head.kernel_size) or head.bias is None:
            raise SSLInputError(
                f"TransMedSeg needs nnU-Net's last segmentation head decoder.seg_layers[-1] to be a 1x1 convolution "
                f"with bias (a linear classifier over the last decoder stage); "
                f"{type(unwrap(self.network)).__name__} has {type(head).__name__}: train with nnU-Net's default or "
                "ResEnc plans")
        # registered before any forward: a compiled student ignores hooks added after its first call
        self.student_taps = FeatureTaps(self.network)
        self.teacher_taps = FeatureTaps(self.teacher)
        self.semantic_statistics = {side: ClassStatistics(head.out_channels, head.in_channels, self.device)
                                    for side in SIDES}

    def segmentation_head(self) -> nn.Module:
        """The student's full-resolution segmentation head (``decoder.seg_layers[-1]``)."""
        decoder = getattr(unwrap(self.network), "decoder", None)
        layers = getattr(decoder, "seg_layers", None)
        if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
            raise SSLInputError(f"TransMedSeg reads the segmentation head decoder.seg_layers[-1] of a "
                                f"dynamic_network_architectures U-Net; {type(unwrap(self.network)).__name__} has none: "
                                "train with nnU-Net's default or ResEnc plans")
        return layers[-1]

    # ------------------------------------------------------------------ schedule
    def current_semantic_alpha(self) -> float:
        """alpha(t) = alpha_0 t / T (ISDA)."""
        return float(self.semantic_alpha) * min(self.ssl_step / max(self.total_iterations, 1), 1.0)

    def current_semantic_weight(self) -> float:
        """beta(t) = beta r(t) (default) or beta (``semantic_ramp = False``)."""
        return float(self.semantic_weight) * (self.ramp() if self.semantic_ramp else 1.0)

    # ------------------------------------------------------------------ the step
    def forward_losses(self, step: SSLStep):
        # the student's one forward (labeled + unlabeled) records its last decoder features
        with self.student_taps.capture():
            return super().forward_losses(step)

    def reference_logits(self, step: SSLStep) -> torch.Tensor:
        with self.teacher_taps.capture():
            return super().reference_logits(step)

    def unsupervised_loss(self, student_logits, reference_logits, step, *args, **kwargs):
        loss, stats = super().unsupervised_loss(student_logits, reference_logits, step, *args, **kwargs)
        return loss, {**stats, **self.semantic_augmentation_term(reference_logits, step)}

    def labeled_targets(self, step: SSLStep) -> tuple[torch.Tensor, torch.Tensor]:
        """(labels (B, *spatial) with ignored voxels set to 0, mask of the labeled voxels) at full resolution."""
        labels = full_resolution(step.target)[:, 0].long()
        ignore = self.label_manager.ignore_label
        if ignore is None:
            return labels, torch.ones_like(labels, dtype=torch.bool)
        keep = labels != ignore
        return torch.where(keep, labels, torch.zeros_like(labels)), keep

    def update_semantic_statistics(self, labeled: tuple, unlabeled: tuple) -> None:
        """One update of both sides' statistics from (features, labels, mask) each, summed over DDP ranks first."""
        stats = self.semantic_statistics
        moments = torch.cat([stats["labeled"].moments(*labeled), stats["unlabeled"].moments(*unlabeled)])
        if self.is_ddp:
            dist.all_reduce(moments)
        size = stats["labeled"].moment_size
        stats["labeled"].update(moments[:size], self.statistics_momentum)
        stats["unlabeled"].update(moments[size:], self.statistics_momentum)

    def semantic_augmentation_term(self, reference_logits: torch.Tensor, step: SSLStep) -> dict[str, float]:
        """Updates the statistics, adds ``beta(t) L_tsa`` as a scheduled float32 term, returns the statistics to log
        (called outside autocast)."""
        n_labeled = step.data.shape[0]
        student_low = self.student_taps.read()[1]
        teacher_low = self.teacher_taps.read()[1]
        labels_l, keep_l = self.labeled_targets(step)
        with torch.no_grad():
            confidence, pseudo = torch.softmax(reference_logits.float(), 1).max(1)
            keep_u = confidence >= self.statistics_confidence
        self.update_semantic_statistics((student_low[:n_labeled], labels_l, keep_l), (teacher_low, pseudo, keep_u))

        if self.augmented_side == "unlabeled":
            own, other = self.semantic_statistics["unlabeled"], self.semantic_statistics["labeled"]
            features, labels, weights = student_low[n_labeled:], pseudo, step.voxel_weights()
        else:
            own, other = self.semantic_statistics["labeled"], self.semantic_statistics["unlabeled"]
            features, labels, weights = student_low[:n_labeled], labels_l, keep_l
        shift, covariance, active = transfer_terms(own, other, self.min_class_voxels)
        self.log_active_classes(active)
        alpha = self.current_semantic_alpha()
        head = self.segmentation_head()
        adjustment = logit_adjustment(head.weight.flatten(1).float(), shift.float(), covariance.float(), alpha)
        logits = head(features.float())  # float32: we are outside autocast
        loss = semantic_augmentation_loss(logits, labels, adjustment, weights)
        beta = self.current_semantic_weight()
        step.add_scheduled_loss(beta * loss)
        with torch.no_grad():
            ce = F.cross_entropy(logits, labels, reduction="none")
            ce = ce.mean() if weights is None else (ce * weights.float()).sum() / weights.float().sum().clamp_min(1.0)
            norms = shift.norm(dim=1)
            shift_size = norms[active].mean() if bool(active.any()) else torch.tensor(float("nan"))
            values = torch.stack([loss.detach(), ce, active.float().mean(), keep_u.float().mean(),
                                  shift_size.to(loss.device, loss.dtype)]).tolist()  # one host transfer
        return {"semantic_loss": values[0], "semantic_ce": values[1], "semantic_active": values[2],
                "semantic_kept": values[3], "semantic_shift": values[4], "semantic_weight": beta,
                "semantic_alpha": alpha}

    def log_active_classes(self, active: torch.Tensor) -> None:
        """A line in the log whenever the set of classes with an adjustment changes."""
        classes = [int(c) for c in torch.nonzero(active).flatten().tolist()]
        if classes != self._semantic_active:
            inactive = [c for c in range(active.numel()) if c not in classes]
            self.print_to_log_file(
                f"TransMedSeg: classes with statistics on both sides (>= {self.min_class_voxels} voxels each): "
                f"{classes or 'none'}; no augmentation yet for {inactive or 'none'}", also_print_to_console=False)
            self._semantic_active = classes

    # ------------------------------------------------------------------ state and logs
    def ssl_state_dict(self) -> dict:
        return {**super().ssl_state_dict(),
                "semantic_statistics": {side: s.state_dict() for side, s in self.semantic_statistics.items()}}

    def load_ssl_state_dict(self, state: dict) -> None:
        super().load_ssl_state_dict(state)
        saved = state.get("semantic_statistics")
        if saved is None:
            self.print_to_log_file("the checkpoint has no TransMedSeg class statistics: they restart empty",
                                   also_print_to_console=True)
            return
        for side, statistics in self.semantic_statistics.items():
            try:
                statistics.load_state_dict(saved[side])
            except (KeyError, ValueError) as e:
                raise SSLInputError(f"the checkpoint's TransMedSeg statistics ({side}) do not fit this network: {e}; "
                                    "resume with the plans and configuration it was trained with") from None

    def ssl_log_keys(self) -> list[str]:
        return [*super().ssl_log_keys(), "ssl_semantic_loss", "ssl_semantic_ce", "ssl_semantic_weight",
                "ssl_semantic_alpha", "ssl_semantic_active", "ssl_semantic_kept", "ssl_semantic_shift"]

    def mechanism_warnings(self, means: dict[str, float]) -> list[str]:
        """The host's lines, plus: the confidence gate keeps under 1 % of the unlabeled voxels for the statistics;
        some classes have no adjustment yet; ``beta L_tsa`` is under 1 % of ``L_sup + n`` past the ramp's
        midpoint."""
        out = super().mechanism_warnings(means)
        kept = means.get("ssl_semantic_kept", float("nan"))
        if kept < GATE_MINIMUM:
            out.append(f"only {kept:.1%} of the unlabeled voxels reach the teacher's confidence "
                       f"{self.statistics_confidence} for TransMedSeg's statistics: the gate drops nearly everything")
        active = means.get("ssl_semantic_active", float("nan"))
        if active < 1.0:
            out.append(f"TransMedSeg adjusted {active:.0%} of the classes this epoch: the others have fewer than "
                       f"{self.min_class_voxels} voxels in one side's statistics and keep the plain cross-entropy")
        other = means.get("ssl_other_share", float("nan"))
        if (self.ramp() if self.semantic_ramp else 1.0) >= 0.5 and other < NEGLIGIBLE_SHARE:
            out.append(f"beta L_tsa is {other:.2g} of the supervised loss this epoch: TransMedSeg's term is "
                       "negligible")
        return out

    def ssl_plot_panels(self) -> list[tuple[str, dict[str, str]]]:
        return [*super().ssl_plot_panels(),
                ("TransMedSeg (L_tsa before beta)", {"ISDA bound L_tsa": "ssl_semantic_loss",
                                                     "plain CE, same voxels": "ssl_semantic_ce",
                                                     "mean |dmu|, active classes": "ssl_semantic_shift"}),
                ("TransMedSeg schedule and statistics", {"beta(t)": "ssl_semantic_weight",
                                                         "alpha(t)": "ssl_semantic_alpha",
                                                         "classes adjusted": "ssl_semantic_active",
                                                         "unlabeled voxels in statistics": "ssl_semantic_kept"})]
