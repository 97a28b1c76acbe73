"""QG-SSL's quality guidance (QAR, PL-QW) as a plug-in: a frozen quality predictor scores the predictions."""

from __future__ import annotations

import os
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F

from nnunet_ssl.errors import SSLInputError
from nnunet_ssl.losses import quality as qg
from nnunet_ssl.losses.consistency import channel_argmax
from nnunet_ssl.parts.balance import LossBalance
from nnunet_ssl.parts.ramps import linear_rampup
from nnunet_ssl.quality.predictor import load_quality_predictor, quality_checkpoint_path
from nnunet_ssl.trainers.logs import GATE_MINIMUM, NEGLIGIBLE_SHARE
from nnunet_ssl.trainers.step import SSLStep
from nnunet_ssl.utils.files import file_sha256

#: path of a quality predictor checkpoint to use instead of the one derived from dataset, plans, configuration, fold
ENV_QUALITY_CHECKPOINT = "nnUNet_ssl_quality_checkpoint"




class QualityGuidance:
    """Mixin (placed before a host) adding QG-SSL's frozen quality predictor ``g``: QAR and/or PL-QW.

    Paper: Abhishek & Hamarneh, "Quality-guided semi-supervised segmentation", MICCAI 2026, arXiv 2606.01753; code
    sfu-mial/QG-SSL. Equations, multi-class generalisation and loss-level deviations: :mod:`nnunet_ssl.losses.quality`.
    With ``x_u`` the unlabeled patch seen by the student (view 0) and by the teacher (view 1)::

        QAR   : L += lambda_QAR(t) L_QAR,  L_QAR = 1 - mean g(x_u, softmax f_theta(x_u))   gradient through frozen g
        PL-QW : L_unsup = sum_b w_b l_b / (sum_b w_b + eps), w = q^T 1[q >= tau], q = g(x_u', onehot(argmax teacher))

    QAR is added beside the host's ``lambda(t) L_unsup`` (``step.add_scheduled_loss``); PL-QW replaces the host's
    unsupervised loss. On a loss that takes per-voxel weights (``accepts_voxel_weights``, MetaSSL) PL-QW weights
    that loss's unlabeled voxels instead and keeps its lambda::

        sum_r w_r sum_{i in r} omega_i CE_i / (sum_{i in r} omega_i + 1),   omega_i = PL-QW weight of voxel i

    with ``omega_i`` the weight of voxel i's sample (or of its pseudo-label class with ``qw_per = "class"``);
    ``omega = 1`` gives MetaSSL exactly. This combination is ours: neither paper describes it.

    Weights, schedules and threshold of the two presets (``preset`` or ``nnUNet_ssl_preset``), with ``T`` all
    training iterations, ``lin(t; d, r) = clip((t - d T) / (r T), 0, 1)`` the official linear ramp and
    ``r(t) = exp(-5 (1 - t / (0.2 T))^2)`` the common sigmoid ramp (``self.ramp()``).

    ``preset = "paper"`` (``paper_settings``: the official ``train_SSL_methods.sh``, 30/40 and 15/30 of 200 epochs)::

        lambda_QAR(t) = 0.01 lin(t; 0.15, 0.2)
        lambda_QW(t)  = 0.25 lin(t; 0.075, 0.15)          replaces the host's lambda
        tau           = 0.5

    ``preset = "default"`` (ours)::

        lambda_QAR(t) = r(t) min(s S_sup / S_QAR, lambda_QAR_max)    s = qar_share = 0.05, lambda_QAR_max = 1
        lambda_QW(t)  = the host's lambda(t) = r(t) min(rho S_sup / S_unsup, lambda_max)          rho = 0.2
        tau_t         = min(0.5, m_t)                    m_t = EMA of the pseudo-labels' mean predicted Dice

    with ``S_sup``, ``S_QAR`` bias-corrected EMAs (momentum 0.99) of ``L_sup + n`` and ``L_QAR`` over the previous
    steps (a :class:`~nnunet_ssl.parts.balance.LossBalance` of QAR's own, in the checkpoint; ``lambda_QAR`` is
    ``qar_weight`` = 0.01 for its first 10 steps), so after the ramp ``lambda_QAR L_QAR`` averages 5 % of
    ``L_sup + n``. Each default deviates from the paper for a reason:

    - QAR's weight: at 0.01, ``0.01 (1 - q)`` is well under 1 % of ``L_sup + n`` (the share below which the log
      calls a term negligible); on Hippocampus the test Dice with and without QAR agreed to 4 decimals. A share
      instead of a weight also makes QAR's size independent of how good the predictor thinks the student is.
      ``qar_share = 0.05`` is 5 times that negligible share and a quarter of the unsupervised share rho: QAR acts
      measurably but stays a regulariser beside the main unsupervised term, because its gradient comes from a
      frozen predictor that the student can learn to please without segmenting better (the reason the paper keeps
      it small). The cap (``max_qar_weight`` = 1, 100 times the paper's weight) bounds ``lambda_QAR`` when ``g``
      rates the student nearly perfect (``L_QAR`` near 0), where only its saturated sigmoid's gradient is left.
    - QAR's ramp: the common sigmoid ramp instead of a delay and a linear ramp of its own, so every term of every
      trainer follows one schedule; QAR then starts at ``exp(-5)`` = 0.7 % of its weight instead of 0.
    - PL-QW's lambda: the host's, i.e. the same share rho of ``L_sup + n`` as every host's unsupervised term,
      instead of a fixed 0.25 on the official binary BCE + Dice (whose size differs from our multi-class loss),
      so PL-QW and the consistency it replaces are compared at the same weight.
    - PL-QW's threshold: ``tau_t = min(tau, m_t)`` (:class:`~nnunet_ssl.losses.quality.QualityThreshold`): the fixed
      0.5 kept 0-3 % of the samples for half of a Hippocampus run because ``g``'s absolute calibration on unlabeled
      data is weak; its ranking is what PL-QW needs. Once ``g`` rates the pseudo-labels above 0.5 on average the
      gate is the paper's.

    In both presets the log warns when over an epoch the PL-QW gate keeps less than 1 % of the samples, or QAR's
    weighted term is under 1 % of ``L_sup + n`` once its ramp passed one half (:meth:`mechanism_warnings`).

    The predictor: ``$nnUNet_results/<dataset>/nnUNetSSLQuality__<plans>__<configuration>/fold_<fold>/
    checkpoint_quality.pth`` from ``nnUNetv2_ssl_train_quality``, or the file named by the environment variable
    ``nnUNet_ssl_quality_checkpoint``. Without it training refuses to start with one line naming the command. It is
    loaded frozen (eval mode, no parameter gradients) onto the training device, never wrapped in DDP or compiled,
    not in the optimizer and not in the checkpoint's ``network_weights``; the checkpoint's ``ssl_state`` records
    its path and SHA-256 (a different file at ``--c`` is reported in the log). Gradients flow through it into the
    student's logits only.

    Logged (``progress_ssl.png``): mean predicted Dice of the student's soft prediction and of the teacher's
    pseudo-label, the PL-QW threshold and the share of pseudo-labels it keeps, and the QAR weight.

    Deviations from the official code in both presets, and why:

    - Host: our Mean Teacher (EMA decay 0.99 with warm-up; student on view 0; teacher on view 1 of the same patch
      with its own intensity augmentation, or in its paper preset on view 0 plus clipped noise); the official PL-QW
      uses decay 0.999 and the same image for both. The teacher's pseudo-label is scored on the image the teacher
      saw (view 1; view 0 before the noise in the host's paper preset), the student's prediction on the student's.
    - PL-QW on a Mean Teacher replaces its consistency (as in the official PL-QW, which is an EMA-teacher
      pseudo-label method). The official launcher also lists an "MT-QW" variant (``train_mean_teacher_quality``,
      taking a consistency type) whose file is missing upstream; it is not reproduced.
    - Optimiser, learning rate, augmentation, patch sampling and L_sup (deep-supervised Dice + CE) are nnU-Net's,
      not the official AdamW/cosine/fp16/clip-1.0 recipe.
    - Region-based (BraTS-style) datasets are refused: ``g`` scores one label per voxel.
    """

    needs_argmax_labels = True

    @classmethod
    def compute_units(cls, labeled_batch: int, unlabeled_batch: int) -> float:
        """The host's units plus the frozen predictor's passes, counted as passes although ``g`` is an encoder only:
        forward on the pseudo-label (``U``), and on the student's prediction forward + backward with QAR (``3 U``,
        from the first step on the common ramp, after the delay on the official one) or forward only for the log
        (``U``)."""
        student = 3 * unlabeled_batch if cls.quality_qar else unlabeled_batch
        return super().compute_units(labeled_batch, unlabeled_batch) + unlabeled_batch + student

    @classmethod
    def benchmark_prerequisites(cls, dataset: str, configuration: str, fold: int, plans: str, device: str,
                                results_folder: str) -> list[list[str]]:
        """What ``nnUNetv2_ssl_benchmark`` runs before training: the predictor of this run's labeled cases."""
        from nnunet_ssl.quality.predictor import quality_checkpoint_path

        if quality_checkpoint_path(dataset, plans, configuration, fold, results_folder).is_file():
            return []
        return [["nnUNetv2_ssl_train_quality", "-d", dataset, "-c", configuration, "-f", str(fold), "-p", plans,
                 "-device", device]]

    #: which mechanisms are active
    quality_qar: bool = False
    quality_qw: bool = False
    #: QAR: lambda_QAR L_QAR averages this share of L_sup + n after the ramp (class docstring); None = the fixed
    #: ``qar_weight``
    qar_share: float | None = 0.05
    #: with a share: lambda_QAR of the first steps, before the loss sizes are known; without: lambda_QAR's maximum
    qar_weight: float = qg.QAR_WEIGHT
    #: with a share: the largest lambda_QAR (100 x the paper's weight)
    max_qar_weight: float = 1.0
    #: the official delay + linear ramp for QAR (``qar_delay_fraction``, ``qar_rampup_fraction``) instead of the
    #: common sigmoid ramp
    qar_official_ramp: bool = False
    qar_delay_fraction: float = qg.QAR_DELAY_FRACTION
    qar_rampup_fraction: float = qg.QAR_RAMPUP_FRACTION
    #: PL-QW replacing the host's loss brings the official lambda (``qw_weight`` after a delay and a linear ramp)
    #: instead of following the host's lambda
    qw_official_lambda: bool = False
    qw_weight: float = qg.QW_WEIGHT
    qw_delay_fraction: float = qg.QW_DELAY_FRACTION
    qw_rampup_fraction: float = qg.QW_RAMPUP_FRACTION
    #: tau, the paper's threshold; with ``qw_adaptive_threshold`` the upper bound of tau_t = min(tau, m_t)
    qw_threshold: float = qg.QW_THRESHOLD
    qw_adaptive_threshold: bool = True
    #: momentum of m_t, the EMA of the pseudo-labels' mean predicted Dice
    qw_threshold_momentum: float = qg.QW_THRESHOLD_MOMENTUM
    qw_temperature: float = qg.QW_TEMPERATURE
    #: "sample" (the paper's per-image weight) or "class" (one weight per foreground class)
    qw_per: qg.Per = "sample"
    #: ``preset = "paper"``: QG-SSL's official schedules and fixed threshold, as trained before the default changed
    paper_settings: ClassVar[dict[str, object]] = {"qar_share": None, "qar_official_ramp": True,
                                                   "qw_official_lambda": True, "qw_adaptive_threshold": False}

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.qar_balance = LossBalance(initial_weight=self.qar_weight)
        self.quality_threshold = qg.QualityThreshold(self.qw_threshold_momentum)

    # ------------------------------------------------------------------ predictor
    def quality_checkpoint(self) -> Path:
        """The predictor file: ``nnUNet_ssl_quality_checkpoint`` if set, else the standard path for this run."""
        override = os.environ.get(ENV_QUALITY_CHECKPOINT, "").strip()
        if override:
            return Path(override)
        return quality_checkpoint_path(self.plans_manager.dataset_name, self.plans_manager.plans_name,
                                       self.configuration_name, self.fold)

    def quality_train_command(self) -> str:
        plans = self.plans_manager.plans_name
        plans_part = "" if plans == "nnUNetPlans" else f" -p {plans}"
        return (f"nnUNetv2_ssl_train_quality -d {self.plans_manager.dataset_name} -c {self.configuration_name} "
                f"-f {self.fold}{plans_part}")

    def build_ssl_modules(self) -> None:
        if self.qw_per not in ("sample", "class"):
            raise SSLInputError(f"qw_per must be 'sample' or 'class', got {self.qw_per!r}; fix the trainer subclass")
        path = self.quality_checkpoint()
        if not path.is_file():
            if os.environ.get(ENV_QUALITY_CHECKPOINT, "").strip():
                raise SSLInputError(f"{ENV_QUALITY_CHECKPOINT}={path} is not a file; point it at a "
                                    f"checkpoint_quality.pth or unset it and run {self.quality_train_command()}")
            raise SSLInputError(f"no quality predictor for {self.plans_manager.dataset_name} "
                                f"({self.configuration_name}, fold {self.fold}) at {path}; train it first with "
                                f"{self.quality_train_command()}")
        super().build_ssl_modules()
        predictor = load_quality_predictor(path, map_location=self.device)
        expected = (self.num_input_channels, self.label_manager.num_segmentation_heads)
        if (predictor.num_input_channels, predictor.num_classes) != expected:
            raise SSLInputError(
                f"quality predictor {path} expects {predictor.num_input_channels} image channels and "
                f"{predictor.num_classes} classes, this dataset has {expected[0]} and {expected[1]}; retrain it with "
                f"{self.quality_train_command()}")
        predictor.eval()
        predictor.requires_grad_(False)
        self.quality_predictor = predictor
        self.quality_predictor_info = {"path": str(path.resolve()), "sha256": file_sha256(path)}
        self.print_to_log_file(f"quality predictor: {path} (sha256 {self.quality_predictor_info['sha256'][:12]})",
                               also_print_to_console=True)

    # ------------------------------------------------------------------ schedules
    @property
    def _qw_replaces_loss(self) -> bool:
        return self.quality_qw and not self.accepts_voxel_weights

    def qar_ramp(self) -> float:
        """QAR's ramp of this step: the official delay + linear ramp, or the common sigmoid ramp."""
        if self.qar_official_ramp:
            total = self.total_iterations
            return linear_rampup(self.ssl_step, self.qar_delay_fraction * total, self.qar_rampup_fraction * total)
        return self.ramp()

    def current_qar_weight(self) -> float:
        """``lambda_QAR(t)``: the ramp times ``min(qar_share S_sup / S_QAR, max_qar_weight)``, or times
        ``qar_weight`` without a share (class docstring)."""
        if not self.quality_qar:
            return 0.0
        if self.qar_share is None:
            return self.qar_weight * self.qar_ramp()
        return self.qar_ramp() * self.qar_balance.weight(self.qar_share, self.max_qar_weight)

    def current_lambda(self) -> float:
        if self._qw_replaces_loss and self.qw_official_lambda:
            total = self.total_iterations
            return self.qw_weight * linear_rampup(self.ssl_step, self.qw_delay_fraction * total,
                                                  self.qw_rampup_fraction * total)
        return super().current_lambda()

    def observe_losses(self, step: SSLStep, sup_loss: torch.Tensor, unsup_loss: torch.Tensor) -> float:
        """The host's balance, then QAR's: this step's ``(L_sup + n, L_QAR)`` (averaged over DDP ranks, so every
        rank keeps the same lambda_QAR) when QAR has a share."""
        sup_size = super().observe_losses(step, sup_loss, unsup_loss)
        qar_losses = step.observed.get("qar", [])
        if self.quality_qar and self.qar_share is not None and qar_losses:
            values = torch.stack([sup_loss.detach().float() + len(self.trainable()),
                                  torch.stack(qar_losses).float().mean()])
            self.qar_balance.update(*self.mean_over_ranks(values).tolist())
        return sup_size

    def current_qw_threshold(self) -> float:
        """The PL-QW threshold of this step: ``min(tau, m_t)``, or the fixed ``tau`` (paper)."""
        return self.quality_threshold.threshold(self.qw_threshold) if self.qw_adaptive_threshold else self.qw_threshold

    def _update_quality_threshold(self, q_reference: torch.Tensor) -> None:
        """Feeds this batch's mean predicted Dice (averaged over DDP ranks) to ``m_t``."""
        if not (self.quality_qw and self.qw_adaptive_threshold):
            return
        value = self.mean_over_ranks(q_reference.detach().to(torch.float64).mean().reshape(1))
        self.quality_threshold.update(float(value))

    # ------------------------------------------------------------------ losses
    def quality_reference_image(self, step: SSLStep) -> torch.Tensor:
        """The image the reference prediction was made on (``step.reference_image``: the Mean Teacher's view 1, or
        view 0 plus noise in its paper preset, as in the official PL-QW, where the teacher's input is noisy too)."""
        return step.reference_image if step.reference_image is not None else step.views["view1"]

    def unsupervised_loss(self, student_logits, reference_logits, step):
        predictor = self.quality_predictor
        num_classes = student_logits.shape[1]
        labels = channel_argmax(reference_logits)
        with torch.no_grad():
            one_hot = F.one_hot(labels, num_classes).movedim(-1, 1).float()
            q_reference = predictor(self.quality_reference_image(step).float(), one_hot)
        self._update_quality_threshold(q_reference)
        tau = self.current_qw_threshold() if self.quality_qw else self.qw_threshold
        p_student = torch.softmax(student_logits.float(), 1)
        qar_weight = self.current_qar_weight()
        if qar_weight > 0:  # g scores the student's prediction on the image the student saw
            q_student = predictor(step.student_image.float(), p_student)
            qar = qg.qar_loss(q_student)
            step.add_scheduled_loss(qar_weight * qar)
        else:  # only logged
            with torch.no_grad():
                q_student = predictor(step.student_image.float(), p_student.detach())
            qar = qg.qar_loss(q_student)
        if self.quality_qar:
            step.observe("qar", qar)
        if self._qw_replaces_loss:  # PL-QW (Eq. 8): CE + Dice to the teacher's argmax, weighted by quality
            loss, stats = qg.quality_weighted_pseudo_label_loss(student_logits, labels, q_reference, tau,
                                                                self.qw_temperature, self.qw_per), {}
        elif self.quality_qw:
            with torch.no_grad():
                omega = qg.pseudo_label_voxel_weights(labels, q_reference, tau, self.qw_temperature, self.qw_per)
            loss, stats = super().unsupervised_loss(student_logits, reference_logits, step, voxel_weights=omega)
        else:
            loss, stats = super().unsupervised_loss(student_logits, reference_logits, step)
        with torch.no_grad():
            values = torch.stack([q_student.mean(), q_reference.mean()]).tolist()  # one host transfer
        stats = {**stats, "quality_student": values[0], "quality_reference": values[1],
                 "quality_kept": qg.kept_fraction(q_reference, tau, self.qw_per), "quality_threshold": tau,
                 "qar_weight": qar_weight}
        return loss, stats

    # ------------------------------------------------------------------ state and logs
    def ssl_state_dict(self) -> dict:
        return {**super().ssl_state_dict(), "quality_predictor": dict(self.quality_predictor_info),
                "qar_balance": self.qar_balance.state_dict(), "quality_threshold": self.quality_threshold.state_dict()}

    def load_ssl_state_dict(self, state: dict) -> None:
        super().load_ssl_state_dict(state)
        # checkpoints of older versions have neither: QAR's balance and the threshold's EMA restart
        if "qar_balance" in state:
            self.qar_balance.load_state_dict(state["qar_balance"])
        if "quality_threshold" in state:
            self.quality_threshold.load_state_dict(state["quality_threshold"])
        saved = state.get("quality_predictor")
        if saved and saved.get("sha256") != self.quality_predictor_info["sha256"]:
            self.print_to_log_file(
                f"warning: this training started with the quality predictor {saved.get('path')} (sha256 "
                f"{str(saved.get('sha256'))[:12]}); it continues with {self.quality_predictor_info['path']} (sha256 "
                f"{self.quality_predictor_info['sha256'][:12]})", also_print_to_console=True)

    def ssl_log_keys(self) -> list[str]:
        return [*super().ssl_log_keys(), "ssl_quality_student", "ssl_quality_reference", "ssl_quality_kept",
                "ssl_quality_threshold", "ssl_qar_weight"]

    def mechanism_warnings(self, means: dict[str, float]) -> list[str]:
        """The host's lines, plus: the PL-QW gate kept less than 1 % of the pseudo-labels this epoch; QAR's weighted
        term (the only other SSL term of these trainers) is under 1 % of ``L_sup + n`` although its ramp is past
        one half."""
        out = super().mechanism_warnings(means)
        kept = means.get("ssl_quality_kept", float("nan"))
        if self.quality_qw and kept < GATE_MINIMUM:
            what = "samples" if self.qw_per == "sample" else "sample-classes"
            out.append(f"the PL-QW gate kept {kept:.1%} of the {what} this epoch (q >= tau, tau "
                       f"{means.get('ssl_quality_threshold', float('nan')):.3f}, mean predicted Dice of the "
                       f"pseudo-labels {means.get('ssl_quality_reference', float('nan')):.3f}): PL-QW drops nearly "
                       "every pseudo-label")
        other = means.get("ssl_other_share", float("nan"))
        if self.quality_qar and self.qar_ramp() >= 0.5 and other < NEGLIGIBLE_SHARE:
            out.append(f"lambda_QAR L_QAR is {other:.2g} of the supervised loss this epoch: QAR is negligible")
        return out

    def ssl_plot_panels(self) -> list[tuple[str, dict[str, str]]]:
        kept = "samples" if self.qw_per == "sample" else "sample-classes"
        panels = [*super().ssl_plot_panels(),
                  ("predicted quality (Dice)", {self.student_name: "ssl_quality_student",
                                                f"{self.reference_name} pseudo-label": "ssl_quality_reference",
                                                "PL-QW threshold tau": "ssl_quality_threshold",
                                                f"{kept} kept (q >= tau)": "ssl_quality_kept"})]
        if self.quality_qar:
            panels.append(("QAR weight", {"lambda QAR": "ssl_qar_weight"}))
        return panels


class QAR(QualityGuidance):
    """QG-SSL's quality-aware regularisation alone: ``lambda_QAR(t) (1 - predicted Dice of the student's soft
    prediction)`` beside the host's loss."""

    quality_qar = True


class QW(QualityGuidance):
    """QG-SSL's quality-weighted pseudo-labels alone (PL-QW): the reference's argmax supervises the student with CE +
    Dice, each sample weighted by ``q^T 1[q >= tau_t]`` (or each class, ``qw_per = "class"``), with the host's lambda
    (paper preset: the fixed tau = 0.5 and the official lambda)."""

    quality_qw = True


class QualityGuided(QualityGuidance):
    """Both QG-SSL mechanisms: QAR at its share of the supervised loss and PL-QW at the host's lambda, both on the
    common ramp (paper preset: each with its own linear ramp)."""

    quality_qar = True
    quality_qw = True
