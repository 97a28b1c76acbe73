"""UA-MT host: the EMA teacher's reference, used only where T stochastic teacher passes agree."""

from __future__ import annotations

import torch
from torch import nn

from nnunet_ssl.errors import SSLInputError
from nnunet_ssl.losses.consistency import (
    masked_mse_consistency,
    predictive_entropy,
    probabilities,
    uncertainty_threshold,
)
from nnunet_ssl.parts.ramps import sigmoid_rampup
from nnunet_ssl.trainers.base import full_resolution
from nnunet_ssl.trainers.hosts.mean_teacher import MeanTeacher
from nnunet_ssl.trainers.logs import GATE_MINIMUM
from nnunet_ssl.trainers.step import SSLStep


class UncertaintyAwareMeanTeacher(MeanTeacher):
    """UA-MT: Mean Teacher whose consistency counts only the voxels where the teacher is certain.

    Paper: Yu et al., "Uncertainty-aware Self-ensembling Model for Semi-supervised 3D Left Atrium Segmentation",
    MICCAI 2019; code yulequan/UA-MT (``train_LA.py``) and SSL4MIS ``train_uncertainty_aware_mean_teacher_3D.py``.

    Per step, besides Mean Teacher's reference ``p_t = softmax f_theta'(u_t)`` (see
    :class:`~nnunet_ssl.trainers.hosts.mean_teacher.MeanTeacher` for ``u_t``):

    - T stochastic teacher passes on ``u_t + clip(N(0, 0.1^2), -0.2, 0.2)`` (fresh noise each, and the teacher's
      dropout active where the plans' network has dropout): ``p_bar = mean_k softmax f_theta'(u_t + n_k)``
    - uncertainty ``U = -sum_c p_bar_c ln p_bar_c``, threshold ``H_t = (0.75 + 0.25 r(t)) ln C`` with ``r`` the
      sigmoid ramp over the whole training, mask ``m = 1[U < H_t]``
    - ``L_unsup = sum_i m_i sum_c (p_s - p_t)_ic^2 / (C sum_i m_i)``, ``L = L_sup + lambda(t) L_unsup``

    The mask travels on the step (``step.reference_weights``), so a plug-in's loss (MetaSSL) counts only the
    certain voxels too.

    Presets (``preset``, or ``nnUNet_ssl_preset``):

    - ``"default"``: Mean Teacher's defaults (``lambda = 1`` after the common 20 % ramp; the teacher sees its own
      intensity view, the stochastic passes that view plus noise): the masked MSE has the scale of Mean
      Teacher's, which at the paper's ``lambda = 0.1`` was about 1e-4 of the supervised loss on Hippocampus (Mean
      Teacher's logs; not measured for UA-MT), where the gate would decide nothing.
    - ``"paper"``: ``lambda(t) = 0.1 r(t)`` with the ramp over the whole training (the official
      ``consistency_rampup = 40`` epochs of 150 iterations is all 6,000 iterations), the teacher on the student's
      image plus noise.

    Deviations, and why:

    - ``H_max = ln C`` instead of the official ``ln 2``: the 2D SSL4MIS script keeps ``ln 2`` for four classes, where
      it caps the threshold at half the maximum entropy; ``ln C`` gives the paper's 3/4-to-1 range for any number of
      classes. For region (sigmoid) outputs U is the binary entropy averaged over regions, against ``ln 2``.
    - The entropy uses ``0 ln 0 = 0`` rather than ``ln(p + 1e-6)``.
    - Passes run ``uncertainty_passes_per_forward`` at a time (the official code runs 2 at a time).
    - nnU-Net's default networks have no dropout, so on them the passes differ by the input noise only (the official
      V-Net has dropout layers); the threshold ramp counts iterations, as the official code does.
    - L_sup is nnU-Net's deep-supervised Dice + CE; the consistency uses the full-resolution output only.
    """

    paper_settings = {"unsupervised_weight": 0.1, "rampup_fraction": 1.0, "teacher_input": "noise"}
    #: T, the number of stochastic teacher passes
    uncertainty_passes: int = 8
    #: passes batched into one teacher forward (memory against speed)
    uncertainty_passes_per_forward: int = 2
    #: length of the threshold's ramp, as a fraction of all training iterations
    uncertainty_rampup_fraction: float = 1.0

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        for name in ("uncertainty_passes", "uncertainty_passes_per_forward"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise SSLInputError(f"{name}={value!r} must be a whole number >= 1 (UA-MT's stochastic teacher "
                                    "passes)")

    @classmethod
    def compute_units(cls, labeled_batch: int, unlabeled_batch: int) -> float:
        """Mean Teacher's count plus T teacher forwards on the unlabeled batch."""
        return super().compute_units(labeled_batch, unlabeled_batch) + cls.uncertainty_passes * unlabeled_batch

    def current_uncertainty_threshold(self) -> float:
        progress = sigmoid_rampup(self.ssl_step, self.uncertainty_rampup_fraction * self.total_iterations)
        return uncertainty_threshold(progress, self.label_manager.num_segmentation_heads, self.regions)

    @torch.no_grad()
    def mean_stochastic_prediction(self, image: torch.Tensor) -> torch.Tensor:
        """``mean_k p(u + n_k)`` over ``uncertainty_passes`` noisy teacher passes, in float32."""
        dropout = [(m, m.training) for m in self.teacher.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
        for m, _ in dropout:
            m.train()
        total, done = None, 0
        while done < self.uncertainty_passes:
            k = min(self.uncertainty_passes_per_forward, self.uncertainty_passes - done)
            batch = image.repeat(k, *([1] * (image.ndim - 1)))
            noise = (torch.randn_like(batch) * self.teacher_noise_std).clamp(-self.teacher_noise_clip,
                                                                            self.teacher_noise_clip)
            probs = probabilities(full_resolution(self.teacher(batch + noise)), self.regions)
            summed = probs.reshape(k, *image.shape[:1], *probs.shape[1:]).sum(0)
            total = summed if total is None else total + summed
            done += k
        for m, training in dropout:
            m.train(training)
        return total / self.uncertainty_passes

    def reference_logits(self, step: SSLStep) -> torch.Tensor:
        logits = super().reference_logits(step)
        uncertainty = predictive_entropy(self.mean_stochastic_prediction(step.reference_image), self.regions)
        step.reference_weights = uncertainty < self.current_uncertainty_threshold()
        return logits

    def unsupervised_loss(self, student_logits, reference_logits, step):
        mask = step.reference_weights
        loss = masked_mse_consistency(student_logits, reference_logits, mask, self.regions)
        return loss, self.certainty_stats(step)

    def certainty_stats(self, step: SSLStep) -> dict[str, float]:
        return {"certain_fraction": float(step.reference_weights.float().mean()),
                "uncertainty_threshold": self.current_uncertainty_threshold()}

    def forward_losses(self, step: SSLStep):
        sup, unsup, stats = super().forward_losses(step)
        # a plug-in that replaces the loss (MetaSSL) still logs the gate
        return sup, unsup, {**self.certainty_stats(step), **stats}

    def ssl_log_keys(self) -> list[str]:
        return [*super().ssl_log_keys(), "ssl_certain_fraction", "ssl_uncertainty_threshold"]

    def ssl_plot_panels(self) -> list[tuple[str, dict[str, str]]]:
        return [*super().ssl_plot_panels(),
                ("UA-MT certainty gate", {"fraction of voxels kept": "ssl_certain_fraction",
                                          "entropy threshold H_t (nats)": "ssl_uncertainty_threshold"})]

    def mechanism_warnings(self, means: dict[str, float]) -> list[str]:
        out = super().mechanism_warnings(means)
        kept = means.get("ssl_certain_fraction", 1.0)
        if kept < GATE_MINIMUM:
            out.append(f"only {kept:.1%} of the unlabeled voxels are below UA-MT's entropy threshold: the "
                       "certainty gate drops nearly everything")
        return out
