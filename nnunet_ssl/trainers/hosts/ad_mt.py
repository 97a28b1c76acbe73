"""AD-MT host: two EMA teachers, updated alternately, fused by their entropy into FixMatch-style pseudo-labels."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from nnunet_ssl.compat.trainer import set_deep_supervision, unwrap
from nnunet_ssl.errors import SSLInputError
from nnunet_ssl.losses.consistency import channel_argmax
from nnunet_ssl.losses.pseudo_label import hard_pseudo_labels
from nnunet_ssl.losses.teachers import cross_entropy_over_confident, entropy_weighted_fusion, prefer_confident_student
from nnunet_ssl.parts.alternation import AlternatingTeachers
from nnunet_ssl.parts.cutmix import apply_cutmix, cutmix_masks
from nnunet_ssl.parts.ema import ema_decay, ema_update, make_teacher
from nnunet_ssl.trainers.base import full_resolution
from nnunet_ssl.trainers.hosts.fixmatch import FixMatch
from nnunet_ssl.trainers.step import SSLStep

TEACHER_CHECKPOINT = "checkpoint_final_teacher.pth"
TEACHER2_CHECKPOINT = "checkpoint_final_teacher2.pth"
#: the smallest fused probability whose log the reference returns (log 0 would be -inf)
FUSED_FLOOR = torch.finfo(torch.float32).tiny
EMA_RULES = ("own_updates", "half_iteration")
NORMALISATIONS = ("voxels", "confident")


@dataclass
class TeachersOfStep:
    """What ``reference_logits`` leaves on the step for ``unsupervised_loss`` and the logs (``step.host_data``)."""

    #: the student's logits on the weak view (no gradient, calibrated, CutMixed like the reference)
    student_logits: torch.Tensor
    #: argmax of teacher A != argmax of teacher B, (U, *spatial), CutMixed like the reference
    conflict: torch.Tensor
    #: statistics on the weak view: conflict fraction, mean weight of teacher A, whether A is active
    stats: dict[str, float]


class AlternateDiverseTeachers(FixMatch):
    """AD-MT: two EMA teachers of one student, updated in alternation, whose entropy-weighted fusion gives
    confidence-gated pseudo-labels for a strong or CutMixed view.

    Paper: Zhao et al., "Alternate Diverse Teaching for Semi-supervised Medical Image Segmentation", ECCV 2024;
    official code ZhenZHAO/AD-MT (read at commit 03ef84c: ``code/train_post_3d_aut.py``, ``code/train_utils.py``,
    ``cfgs/config_3d_la_aut.yml``).

    Per step, with unlabeled patches seen as a weak view u_w (``view0``: nnU-Net's geometric augmentation only) and a
    strong view u_s (``view1``), student f_theta and teachers A (f_A) and B (f_B):

    - alternation (:class:`~nnunet_ssl.parts.alternation.AlternatingTeachers`): A is active first; after a turn of
      k ~ U{1..P} steps the other teacher becomes active and a new k is drawn
    - ``p_A = softmax f_A(u_w)``, ``p_B = softmax f_B(u_w)``, entropies ``H_i = -sum_c p_i log2 p_i``,
      ``w_A = exp(-H_A) / (exp(-H_A) + exp(-H_B))``, ``w_B = 1 - w_A``, ``p = w_A p_A + w_B p_B``;
      ``y_hat = argmax p``, ``c = max p``; the teachers conflict where ``argmax p_A != argmax p_B``
      (:func:`~nnunet_ssl.losses.teachers.entropy_weighted_fusion`)
    - student input: with A active, u_s unmixed; with B active, CutMix of u_w (``cutmix_probability``), and
      ``y_hat``, ``c``, the conflict mask and the student's weak prediction mixed with the same boxes. The
      perturbation alternates with the teachers.
    - compromise: ``q = softmax f_theta(u_w)`` without gradient; where ``y_hat != argmax q``, the teachers conflict
      and ``max q > c``, ``y_hat, c <- argmax q, max q``
      (:func:`~nnunet_ssl.losses.teachers.prefer_confident_student`)
    - ``L = L_sup + lambda(t) * CE(f_theta(student input), y_hat)`` over the voxels with ``c >= threshold``
    - only the active teacher is updated: ``theta_i <- alpha theta_i + (1 - alpha) theta``; then the turn advances

    ``reference_logits`` returns ``log p`` (fused, mixed like the student input), so the logged confidence, the
    gate and a plug-in's loss (MetaSSL) read the fused teachers; ``reference_network`` is teacher A (the logged
    reference pseudo-Dice). The logged confidence and coverage read the fused teachers before the compromise
    (which only raises the confidence of the voxels it replaces, ``ssl_student_replaced``); the log also holds the
    teachers' disagreement on the weak view (``ssl_teachers_conflict``), teacher A's mean weight and the share of
    steps in which A was active. Both teachers are part of the checkpoints' SSL state with the alternation and
    resume with ``--c``; the final ones are written as ``checkpoint_final_teacher.pth`` (A) and
    ``checkpoint_final_teacher2.pth`` (B), each predictable with ``nnUNetv2_predict -chk``.

    Presets (``preset``, or ``nnUNet_ssl_preset``):

    - ``"paper"``: the official left atrium (LA) configuration: ``lambda = 2`` under a sigmoid ramp over 40 % of
      training (``consistency_rampup`` 40 x 150 of 15000 iterations), CE over voxels with fused confidence >= 0.8,
      averaged over those voxels (``ce_normalisation = "confident"``), the raw softmax, nnU-Net's intensity
      augmentation at its own probabilities as the strong view, turns of at most P = 19 steps (half of LA's
      38-iteration epoch), CutMix on every sample, the EMA of the official code (``ema_step_rule =
      "half_iteration"``: ``t = iteration // 2``, the teacher copies the student while ``t < 40``, then
      ``alpha = min(1 - 1/(t - 40 + 1), 0.99)``). The ACDC configuration (Dice loss, threshold 0.95, P = 50) is
      ``nnUNet_ssl_settings='unsupervised_loss_type="dice", confidence_threshold=0.95, alternate_period=50'``.
    - ``"default"``: ``lambda = 1`` over the common 20 % ramp of every host; threshold 0.95 on the teachers'
      softmax after temperature scaling fitted on the fold's validation cases (each teacher its own temperature,
      :class:`~nnunet_ssl.trainers.calibration.ReferenceCalibration`), so that 0.95 means 95 % correct on held-out
      data rather than a point of nnU-Net's over-confident softmax; the always-different strong view of the
      FixMatch host (with nnU-Net's own intensity augmentation about a third of strong views equal the weak one,
      and the unmixed turns of AD-MT train on exactly that view); turns of at most half an epoch
      (``alternate_period = None``: ``num_iterations_per_epoch // 2``, the official comment "half epoch", which is
      125 steps for nnU-Net's 250-iteration epoch where the literal 19 would switch about 25 times an epoch); CE
      averaged over all unlabeled voxels like the FixMatch host, so that AD-MT and FixMatch differ only in their
      teachers; and each teacher's EMA counted in its own updates (``ema_step_rule = "own_updates"``, no copy
      phase), so that each teacher is the Mean Teacher running average of the students it saw. The official
      ``iteration // 2`` approximates the same count, but with the copy phase it borrows the value of
      ``consistency_rampup`` (40), a number from the lambda schedule.

    Deviations from the official code, and why:

    - The student's weak prediction is a forward without gradient of its own; the official code passes the weak
      images through the gradient forward with the labeled and strong ones and uses the output only detached. With
      nnU-Net's per-sample InstanceNorm the output is the same, and it saves a backward pass.
    - With CutMix the student's weak prediction is mixed with the same boxes as the pseudo-label before the
      compromise. The official code compares the unmixed student prediction with the mixed pseudo-label, so inside
      each pasted box it compares predictions of two different images (a bug).
    - CutMix boxes are those of :mod:`nnunet_ssl.parts.cutmix` (2-40 % of the patch, log-uniform aspect ratios,
      source: the next sample of the batch, probability per sample), not one box of side fraction
      ``sqrt(1 - lambda)``, ``lambda ~ Beta(4, 4)``, from a random permutation, probability per batch; with the
      probability 1 of both presets every sample is mixed either way.
    - Views: nnU-Net's spatial augmentation for both, nnU-Net's intensity augmentation (paper) or the FixMatch
      host's strong intensity augmentation (default) for u_s, instead of rotation/flip and brightness/contrast
      (p = 0.8) plus Gaussian noise (p = 0.2) on LA volumes: defined for any modality and for 2D and 3D.
    - L_sup is nnU-Net's deep-supervised Dice + CE (not (CE + Dice) / 2); the unsupervised loss reads the
      full-resolution output only.
    - The ramp is continuous in iterations (the official ramp steps every 150 iterations); it ends at the same
      40 % of LA's training.
    - The paper preset's CE returns 0 when no voxel passes the gate (the official ``reduction="mean"`` over no
      voxel is NaN).
    - Turn lengths come from ``numpy.random.default_rng([seed, turn])`` (seed: ``nnUNet_ssl_seed``, else 0) instead
      of numpy's global generator, so DDP ranks agree without communication and ``--c`` continues the same turns.
    - EMA buffers are copied from the student rather than averaged, and both teachers run in training mode during
      training (the official code puts the inactive teacher in eval mode): nnU-Net's InstanceNorm networks have no
      buffers and no dropout, so neither changes an output.
    - With ``calibrate_reference`` the student's weak logits, compared in the compromise with the fused calibrated
      confidence, are divided by the active teacher's temperature: the student has no temperature of its own and
      the active teacher is the one following it.
    - Only the branch of the official configuration is implemented: "pixel_confidence" compromise restricted to
      the teachers' conflicts, conflict weight 1 (one CE over all gated voxels), fusion without sharpening (T = 1),
      no per-epoch teacher shuffle, no self-training stage (never entered in the official loop).
    - The official code keeps the best teacher A by validation Dice; nnU-Net writes the final networks (student,
      both teachers) and logs teacher A's validation pseudo-Dice.
    - With ``uses_labeled_reference`` (MetaSSL) the reference on labeled images is the fused teachers (an extra
      forward of each), and MetaSSL's loss replaces AD-MT's, so the student compromise does not apply.
    """

    paper_settings = {"unsupervised_weight": 2.0, "rampup_fraction": 0.4, "confidence_threshold": 0.8,
                      "view_intensity": (False, True), "calibrate_reference": False, "alternate_period": 19,
                      "cutmix_probability": 1.0, "ce_normalisation": "confident", "ema_step_rule": "half_iteration",
                      "ema_copy_steps": 40}
    unsupervised_weight = 1.0
    rampup_fraction = 0.2
    confidence_threshold = 0.95
    calibrate_reference = True
    calibrated_count = 2
    reference_is_calibrated = True
    labeled_reference_is_student = False
    reference_name = "teacher A"
    #: P: each teacher's turn lasts k ~ U{1..P} steps; None = half an epoch (``num_iterations_per_epoch // 2``)
    alternate_period: int | None = None
    #: "voxels": masked CE / all unlabeled voxels (FixMatch host); "confident": / the gated voxels (official)
    ce_normalisation: str = "voxels"
    #: the EMA's t: "own_updates" (updates of that teacher so far) or "half_iteration" (training step // 2, official)
    ema_step_rule: str = "own_updates"
    #: while t < this, the updated teacher copies the student; then alpha = min(1 - 1/(t - copy + 1), max decay)
    ema_copy_steps: int = 0
    ema_max_decay: float = 0.99

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.ema_step_rule not in EMA_RULES:
            raise SSLInputError(f"ema_step_rule={self.ema_step_rule!r} is unknown; set it to one of "
                                f"{', '.join(EMA_RULES)}")
        if self.ce_normalisation not in NORMALISATIONS:
            raise SSLInputError(f"ce_normalisation={self.ce_normalisation!r} is unknown; set it to one of "
                                f"{', '.join(NORMALISATIONS)}")
        period = self.alternate_period
        if period is None:
            period = max(1, self.num_iterations_per_epoch // 2)
        if not isinstance(period, int) or period < 1:
            raise SSLInputError(f"alternate_period={self.alternate_period!r} must be a whole number of steps >= 1, "
                                "or None for half an epoch")
        self.alternation = AlternatingTeachers(period, seed=self.ssl_seed or 0)
        #: EMA updates each teacher has received (t of ``ema_step_rule = "own_updates"``)
        self.teacher_updates = [0, 0]

    # ------------------------------------------------------------------ networks
    def build_ssl_modules(self) -> None:
        student = unwrap(self.network)
        self.teacher = make_teacher(student)
        self.teacher2 = make_teacher(student)

    def teachers(self) -> list[nn.Module]:
        return [self.teacher, self.teacher2]

    def reference_network(self) -> nn.Module | None:
        return getattr(self, "teacher", None)

    def calibration_network(self) -> nn.Module | None:
        return self.reference_network()

    def calibration_networks(self) -> list[nn.Module]:
        return self.teachers()

    def sync_reference_from_student(self) -> None:
        weights = unwrap(self.network).state_dict()
        for teacher in self.teachers():
            teacher.load_state_dict(weights)

    def set_deep_supervision_enabled(self, enabled: bool) -> None:
        super().set_deep_supervision_enabled(enabled)  # the student and teacher A
        if getattr(self, "teacher2", None) is not None:
            set_deep_supervision(self.teacher2, enabled)

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        self.teacher2.train()

    def on_validation_epoch_start(self) -> None:
        super().on_validation_epoch_start()
        self.teacher2.eval()

    @classmethod
    def compute_units(cls, labeled_batch: int, unlabeled_batch: int) -> float:
        """The student's forward and backward on labeled + unlabeled (``3 (B + U)``), both teachers on the weak view
        (``2 U``), the student's weak prediction without gradient (``U``) and, with ``uses_labeled_reference``,
        both teachers on the labeled images (``2 B``)."""
        labeled_reference = 2 * labeled_batch if cls.uses_labeled_reference else 0
        return float(3 * (labeled_batch + unlabeled_batch) + 3 * unlabeled_batch + labeled_reference)

    # ------------------------------------------------------------------ the step
    def student_input(self, step: SSLStep) -> torch.Tensor:
        if self.alternation.teacher_a_active:
            step.mix = None
            return step.views["view1"]
        weak = step.views["view0"]
        step.mix = cutmix_masks(weak.shape[0], tuple(weak.shape[2:]), self.cutmix_probability, device=weak.device)
        return apply_cutmix(weak, step.mix)

    def fused_teachers(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(fused probabilities, teacher A's weight, teachers' conflict mask) of both teachers on ``images``, each
        teacher's logits divided by its own temperature (with ``calibrate_reference``) before its softmax."""
        with torch.no_grad():
            probs = [torch.softmax(self.calibrated(full_resolution(teacher(images)).float(), i), 1)
                     for i, teacher in enumerate(self.teachers())]
            fused, weight_a = entropy_weighted_fusion(*probs)
            conflict = channel_argmax(probs[0]) != channel_argmax(probs[1])
        return fused, weight_a, conflict

    @staticmethod
    def as_logits(probs: torch.Tensor) -> torch.Tensor:
        """``log p`` (floored at the smallest float32), whose softmax is ``p`` again."""
        return torch.log(probs.clamp_min(FUSED_FLOOR))

    def reference_logits(self, step: SSLStep) -> torch.Tensor:
        weak = step.views["view0"]
        with torch.no_grad():
            fused, weight_a, conflict = self.fused_teachers(weak)
            student = full_resolution(self.network(weak)).float()
            student = self.calibrated(student, self.alternation.active)
            stats = {"teachers_conflict": float(conflict.float().mean()), "teacher_a_weight": float(weight_a.mean()),
                     "teacher_a_active": float(self.alternation.teacher_a_active)}
            if step.mix is not None:
                fused = apply_cutmix(fused, step.mix)
                student = apply_cutmix(student, step.mix)
                conflict = apply_cutmix(conflict[:, None], step.mix)[:, 0]
        step.host_data = TeachersOfStep(student_logits=student, conflict=conflict, stats=stats)
        return self.as_logits(fused)

    def reference_logits_labeled(self, step: SSLStep) -> torch.Tensor:
        return self.as_logits(self.fused_teachers(step.data)[0])

    def forward_losses(self, step: SSLStep) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        sup_loss, unsup_loss, stats = super().forward_losses(step)
        teachers = step.host_data
        extra = {} if teachers is None else teachers.stats
        # an unmixed turn mixes nothing: 0 rather than a missing value
        return sup_loss, unsup_loss, {"mixed_fraction": 0.0, **stats, **extra}

    def unsupervised_loss(self, student_logits, reference_logits, step):
        labels, confidence = hard_pseudo_labels(reference_logits)
        stats = {}
        teachers = step.host_data
        if teachers is not None:
            student_labels, student_confidence = hard_pseudo_labels(teachers.student_logits)
            labels, confidence, replaced = prefer_confident_student(labels, confidence, student_labels,
                                                                    student_confidence, teachers.conflict)
            stats["student_replaced"] = float(replaced.float().mean())
        return self.gated_loss(student_logits, labels, confidence >= self.confidence_threshold), stats

    def masked_ce(self, student_logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.ce_normalisation == "confident":
            return cross_entropy_over_confident(student_logits, labels, mask)
        return super().masked_ce(student_logits, labels, mask)

    def ema_decay_of(self, index: int) -> float:
        """alpha of the next EMA update of teacher ``index`` under ``ema_step_rule`` and ``ema_copy_steps``."""
        t = self.teacher_updates[index] if self.ema_step_rule == "own_updates" else self.ssl_step // 2
        return ema_decay(max(t - self.ema_copy_steps, 0), self.ema_max_decay)

    def after_optimizer_step(self) -> None:
        active = self.alternation.active
        ema_update(self.teachers()[active], unwrap(self.network), self.ema_decay_of(active))
        self.teacher_updates[active] += 1
        self.alternation.step()

    # ------------------------------------------------------------------ state, logs, checkpoints
    def ssl_state_dict(self) -> dict:
        return {**super().ssl_state_dict(), "teacher_weights": self.teacher.state_dict(),
                "teacher2_weights": self.teacher2.state_dict(), "alternation": self.alternation.state_dict(),
                "teacher_updates": list(self.teacher_updates)}

    def load_ssl_state_dict(self, state: dict) -> None:
        super().load_ssl_state_dict(state)
        self.teacher.load_state_dict(state["teacher_weights"])
        self.teacher2.load_state_dict(state["teacher2_weights"])
        self.alternation.load_state_dict(state["alternation"])
        self.teacher_updates = [int(n) for n in state["teacher_updates"]]

    def extra_final_checkpoints(self) -> dict[str, tuple[dict[str, torch.Tensor], dict]]:
        return {TEACHER_CHECKPOINT: (self.teacher.state_dict(), {}),
                TEACHER2_CHECKPOINT: (self.teacher2.state_dict(), {})}

    @classmethod
    def applies_compromise(cls) -> bool:
        """Whether AD-MT's own loss (with the student compromise) is the unsupervised loss (not a plug-in's)."""
        return cls.unsupervised_loss is AlternateDiverseTeachers.unsupervised_loss

    def ssl_log_keys(self) -> list[str]:
        keys = ["ssl_teachers_conflict", "ssl_teacher_a_weight", "ssl_teacher_a_active"]
        if self.applies_compromise():
            keys.append("ssl_student_replaced")
        return [*super().ssl_log_keys(), *keys]

    def ssl_plot_panels(self) -> list[tuple[str, dict[str, str]]]:
        curves = {"teachers disagree (fraction of voxels)": "ssl_teachers_conflict",
                  "mean weight of teacher A": "ssl_teacher_a_weight",
                  "steps with teacher A active": "ssl_teacher_a_active"}
        if self.applies_compromise():
            curves["pseudo-labels taken from the student"] = "ssl_student_replaced"
        return [*super().ssl_plot_panels(), ("AD-MT teachers", curves)]
