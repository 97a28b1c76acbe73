"""QG-SSL's quality guidance (QAR, PL-QW) as a plug-in: a frozen quality predictor scores the predictions."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from nnunet_ssl.errors import SSLInputError
from nnunet_ssl.losses import quality as qg
from nnunet_ssl.parts.ramps import linear_rampup
from nnunet_ssl.quality.predictor import load_quality_predictor, quality_checkpoint_path
from nnunet_ssl.trainers.step import SSLStep

#: path of a quality predictor checkpoint to use instead of the one derived from dataset, plans, configuration, fold
ENV_QUALITY_CHECKPOINT = "nnUNet_ssl_quality_checkpoint"


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class QualityGuidance:
    """Mixin (placed before a host) adding QG-SSL's frozen quality predictor ``g``: QAR and/or PL-QW.

    Paper: Abhishek & Hamarneh, "Quality-guided semi-supervised segmentation", MICCAI 2026, arXiv 2606.01753; code
    sfu-mial/QG-SSL. Equations, multi-class generalisation and loss-level deviations: :mod:`nnunet_ssl.losses.quality`.
    With ``x_u`` the unlabeled patch seen by the student (view 0) and by the teacher (view 1)::

        QAR   : L += lambda_QAR(t) (1 - mean g(x_u, softmax f_theta(x_u)))     gradient through the frozen g
        PL-QW : L_unsup = sum_b w_b l_b / (sum_b w_b + eps), w = q^T 1[q >= tau], q = g(x_u', onehot(argmax teacher))

    QAR is an extra term with its own linear ramp (0 for ``qar_delay_fraction`` of all iterations, then linear to
    ``qar_weight`` over ``qar_rampup_fraction``; defaults 0.15, 0.2, 0.01 from the official 30/40 of 200 epochs),
    added beside the host's ``lambda(t) L_unsup``. PL-QW replaces the host's unsupervised loss and its lambda by the
    official linear ramp (0 for 7.5 %, then to 0.25 over 15 %); on a loss that takes per-voxel weights
    (``accepts_voxel_weights``, MetaSSL) it weights that loss's unlabeled voxels instead and keeps its lambda::

        sum_r w_r sum_{i in r} omega_i CE_i / (sum_{i in r} omega_i + 1),   omega_i = PL-QW weight of voxel i

    with ``omega_i`` the weight of voxel i's sample (or of its pseudo-label class with ``qw_per = "class"``);
    ``omega = 1`` gives MetaSSL exactly. This combination is ours: neither paper describes it.

    The predictor: ``$nnUNet_results/<dataset>/nnUNetSSLQuality__<plans>__<configuration>/fold_<fold>/
    checkpoint_quality.pth`` from ``nnUNetv2_ssl_train_quality``, or the file named by the environment variable
    ``nnUNet_ssl_quality_checkpoint``. Without it training refuses to start with one line naming the command. It is
    loaded frozen (eval mode, no parameter gradients) onto the training device, never wrapped in DDP or compiled,
    not in the optimizer and not in the checkpoint's ``network_weights``; the checkpoint's ``ssl_state`` records
    its path and SHA-256 (a different file at ``--c`` is reported in the log). Gradients flow through it into the
    student's logits only.

    Logged (``progress_ssl.png``): mean predicted Dice of the student's soft prediction and of the teacher's
    pseudo-label, the share of pseudo-labels kept by tau, and the QAR weight.

    Deviations from the official code, and why:

    - Host: our Mean Teacher (EMA decay 0.99 with warm-up, teacher on view 1 with its own intensity augmentation,
      student on view 0 of the same patch); the official PL-QW uses decay 0.999 and the same image for both.
      The teacher's pseudo-label is scored on the image the teacher saw, the student's prediction on the student's.
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
        once its delay is over) or forward only for the log (``U``)."""
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
    qar_weight: float = qg.QAR_WEIGHT
    qar_delay_fraction: float = qg.QAR_DELAY_FRACTION
    qar_rampup_fraction: float = qg.QAR_RAMPUP_FRACTION
    qw_weight: float = qg.QW_WEIGHT
    qw_delay_fraction: float = qg.QW_DELAY_FRACTION
    qw_rampup_fraction: float = qg.QW_RAMPUP_FRACTION
    qw_threshold: float = qg.QW_THRESHOLD
    qw_temperature: float = qg.QW_TEMPERATURE
    #: "sample" (the paper's per-image weight) or "class" (one weight per foreground class)
    qw_per: qg.Per = "sample"

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

    def current_qar_weight(self) -> float:
        if not self.quality_qar:
            return 0.0
        total = self.total_iterations
        return self.qar_weight * linear_rampup(self.ssl_step, self.qar_delay_fraction * total,
                                               self.qar_rampup_fraction * total)

    def current_lambda(self) -> float:
        if self._qw_replaces_loss:
            total = self.total_iterations
            return self.qw_weight * linear_rampup(self.ssl_step, self.qw_delay_fraction * total,
                                                  self.qw_rampup_fraction * total)
        return super().current_lambda()

    # ------------------------------------------------------------------ losses
    def quality_reference_image(self, step: SSLStep) -> torch.Tensor:
        """The image the reference prediction was made on (the Mean Teacher's view 1)."""
        return step.views["view1"]

    def unsupervised_loss(self, student_logits, reference_logits, step):
        predictor = self.quality_predictor
        num_classes = student_logits.shape[1]
        labels = reference_logits.argmax(1)
        with torch.no_grad():
            one_hot = F.one_hot(labels, num_classes).movedim(-1, 1).float()
            q_reference = predictor(self.quality_reference_image(step).float(), one_hot)
        p_student = torch.softmax(student_logits.float(), 1)
        qar_weight = self.current_qar_weight()
        if qar_weight > 0:  # g scores the student's prediction on the image the student saw
            q_student = predictor(step.student_image.float(), p_student)
            step.add_scheduled_loss(qar_weight * qg.qar_loss(q_student))
        else:  # only logged
            with torch.no_grad():
                q_student = predictor(step.student_image.float(), p_student.detach())
        if self._qw_replaces_loss:  # PL-QW (Eq. 8): CE + Dice to the teacher's argmax, weighted by quality
            loss, stats = qg.quality_weighted_pseudo_label_loss(student_logits, labels, q_reference, self.qw_threshold,
                                                                self.qw_temperature, self.qw_per), {}
        elif self.quality_qw:
            with torch.no_grad():
                omega = qg.pseudo_label_voxel_weights(labels, q_reference, self.qw_threshold, self.qw_temperature,
                                                      self.qw_per)
            loss, stats = super().unsupervised_loss(student_logits, reference_logits, step, voxel_weights=omega)
        else:
            loss, stats = super().unsupervised_loss(student_logits, reference_logits, step)
        with torch.no_grad():
            values = torch.stack([q_student.mean(), q_reference.mean()]).tolist()  # one host transfer
        stats = {**stats, "quality_student": values[0], "quality_reference": values[1],
                 "quality_kept": qg.kept_fraction(q_reference, self.qw_threshold, self.qw_per),
                 "qar_weight": qar_weight}
        return loss, stats

    # ------------------------------------------------------------------ state and logs
    def ssl_state_dict(self) -> dict:
        return {**super().ssl_state_dict(), "quality_predictor": dict(self.quality_predictor_info)}

    def load_ssl_state_dict(self, state: dict) -> None:
        super().load_ssl_state_dict(state)
        saved = state.get("quality_predictor")
        if saved and saved.get("sha256") != self.quality_predictor_info["sha256"]:
            self.print_to_log_file(
                f"warning: this training started with the quality predictor {saved.get('path')} (sha256 "
                f"{str(saved.get('sha256'))[:12]}); it continues with {self.quality_predictor_info['path']} (sha256 "
                f"{self.quality_predictor_info['sha256'][:12]})", also_print_to_console=True)

    def ssl_log_keys(self) -> list[str]:
        return [*super().ssl_log_keys(), "ssl_quality_student", "ssl_quality_reference", "ssl_quality_kept",
                "ssl_qar_weight"]

    def ssl_plot_panels(self) -> list[tuple[str, dict[str, str]]]:
        kept = "samples" if self.qw_per == "sample" else "sample-classes"
        panels = [*super().ssl_plot_panels(),
                  ("predicted quality (Dice)", {self.student_name: "ssl_quality_student",
                                                f"{self.reference_name} pseudo-label": "ssl_quality_reference",
                                                f"{kept} kept (q >= {self.qw_threshold})": "ssl_quality_kept"})]
        if self.quality_qar:
            panels.append(("QAR weight", {"lambda QAR": "ssl_qar_weight"}))
        return panels


class QAR(QualityGuidance):
    """QG-SSL's quality-aware regularisation alone: ``lambda_QAR(t) (1 - predicted Dice of the student's soft
    prediction)`` beside the host's loss."""

    quality_qar = True


class QW(QualityGuidance):
    """QG-SSL's quality-weighted pseudo-labels alone (PL-QW): the reference's argmax supervises the student with CE +
    Dice, each sample weighted by ``q^T 1[q >= tau]`` (or each class, ``qw_per = "class"``)."""

    quality_qw = True


class QualityGuided(QualityGuidance):
    """Both QG-SSL mechanisms, QAR and PL-QW, each with its own ramp."""

    quality_qar = True
    quality_qw = True
