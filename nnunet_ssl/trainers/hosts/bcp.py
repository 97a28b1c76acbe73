"""BCP host: labeled and unlabeled patches copy-pasted into each other with one box, an EMA teacher's pseudo-labels
on the unlabeled parts, after a copy-paste pre-training on labeled images in the same run."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

from nnunet_ssl.compat.trainer import unwrap
from nnunet_ssl.errors import SSLInputError
from nnunet_ssl.losses.consistency import channel_argmax, confidence_stats
from nnunet_ssl.losses.copy_paste import region_dice_ce
from nnunet_ssl.parts.copy_paste import (
    box_mask,
    halves,
    largest_component_per_class,
    number_of_pairs,
    paste,
    resize_mask,
)
from nnunet_ssl.parts.ema import ema_update
from nnunet_ssl.parts.ramps import sigmoid_rampup
from nnunet_ssl.trainers.base import full_resolution, split_batch
from nnunet_ssl.trainers.hosts.mean_teacher import MeanTeacher
from nnunet_ssl.trainers.step import SSLStep

#: LA: 2,000 pre-training iterations before 15,000 self-training iterations (official ``LA_BCP_train.py``)
LA_PRETRAIN_FRACTION = 2000 / (2000 + 15000)


@dataclass
class MixedBatch:
    """What the self-training step leaves on ``step.host_data`` for ``unsupervised_loss``, plug-ins and tests."""

    #: M per pair (n, *spatial): False where the labeled image's content of X_in goes (BCP: inside the box, the same
    #: box for every pair), True elsewhere
    keep: torch.Tensor
    #: n, the number of mixed images per direction: ``student_image`` is (X_in: n samples, X_out: n samples)
    pairs: int
    #: the pasted labels and pseudo-labels (2n, *spatial), class indices
    target: torch.Tensor
    #: (2n, *spatial): True where the target is a label (1 - M in X_in, M in X_out), less ignore-label voxels
    labeled_region: torch.Tensor
    #: (2n, *spatial): True where the target is a teacher pseudo-label (M in X_in, 1 - M in X_out)
    pseudo_region: torch.Tensor
    #: the teacher's pseudo-labels on the unlabeled batch (after the largest-component filter)
    pseudo_labels: torch.Tensor


class BidirectionalCopyPaste(MeanTeacher):
    """BCP: a labeled patch pasted into an unlabeled image and an unlabeled patch into a labeled image, with one box,
    supervised by the labels and the EMA teacher's pseudo-labels of the parts they came from.

    Paper: Bai, Chen, Li, Shen, Wang, "Bidirectional Copy-Paste for Semi-Supervised Medical Image Segmentation",
    CVPR 2023; official code DeepMed-Lab-ECNU/BCP (read: ``code/ACDC_BCP_train.py``, ``code/LA_BCP_train.py``,
    ``code/LA&ACDC/utils/BCP_utils.py``).

    Both stages run in one ``nnUNetv2_train`` run; the stage follows from the step counter ``ssl_step`` (part of the
    checkpoint), so ``--c`` resumes either stage. With T the run's iterations and ``T_0 = round(pretrain_fraction T)``:

    Stage 0, pre-training (``ssl_step < T_0``), labeled images only. The labeled batch is split into halves L_a,
    L_b (:func:`~nnunet_ssl.parts.copy_paste.halves`), a box mask M is drawn (below) and
    ``X = L_a M + L_b (1 - M)``, ``Y = y_a M + y_b (1 - M)`` at every deep-supervision scale (the mask resized by
    nearest neighbour to each scale); ``L = L_sup = nnU-Net's deep-supervised Dice + CE (f(X), Y)``, lambda = 0.
    Only the mixed images are trained on, as in the official pre-training (no term on the plain images).

    At the first step of stage 1 (``ssl_step == T_0``) the teacher is set to the student.

    Stage 1, self-training. Labeled halves L_a, L_b (labels y_a, y_b), unlabeled halves U_a, U_b of ``view0``:

    - ``M``: ones, with zeros in one box of ``int(box_ratio n_d)`` voxels along each spatial axis d, uniform
      position inside the patch, the same M for the whole batch (:func:`~nnunet_ssl.parts.copy_paste.box_mask`)
    - ``y^ = LCC(argmax f_theta'(U))``: the teacher's argmax on the unlabeled images (the very ones that are
      pasted), each foreground class reduced to its largest connected component
      (:func:`~nnunet_ssl.parts.copy_paste.largest_component_per_class`)
    - ``X_in = U_a M + L_a (1 - M)``, target ``y^_a M + y_a (1 - M)``;
      ``X_out = L_b M + U_b (1 - M)``, target ``y_b M + y^_b (1 - M)``
    - with ``L_R(X)`` = (Dice + CE)/2 of the student on X restricted to region R, each region's CE averaged over its
      own voxels and the Dice masked (:mod:`nnunet_ssl.losses.copy_paste`):
      ``L_sup = L_{1-M}(X_in) + L_M(X_out)`` (labels, weight 1),
      ``L_unsup = L_M(X_in) + L_{1-M}(X_out)`` (pseudo-labels), ``L = L_sup + lambda L_unsup``, lambda = u_weight
    - ``theta' <- 0.99 theta' + 0.01 theta`` after every stage-1 step (plain EMA, no warm-up)

    With lambda = ``unsupervised_weight`` = 0.5 this is exactly the official loss, which has no separate supervised
    term in stage 1 (the mixed images carry both): the split only names its labeled part ``L_sup`` (logged as
    ``ssl_sup_loss``, nnU-Net's Dice + CE on the mixed images in stage 0, BCP's region loss in stage 1: the two
    stages' values are on different scales) and its pseudo-labeled part ``L_unsup``. ``ssl_stage`` logs the stage
    (the epoch's mean: a fraction in the epoch of the switch), ``ssl_lcc_removed`` the fraction of pseudo-label
    foreground the largest-component filter turned into background, ``ssl_pasted_fraction`` the box's share of the
    patch; ``ssl_confidence`` and ``ssl_coverage`` read the teacher on the unlabeled batch (NaN for epochs
    entirely in stage 0, which has no teacher prediction).

    Pairing: n = ceil(max(B, U) / 2) mixed images per direction (nnU-Net's batch of 2: n = 1, one labeled and one
    unlabeled image in each mixed image, so the student sees 2 images per step as in plain nnU-Net). Sample i of the
    first half is sample ``i mod B`` of the batch, of the second ``(i + n) mod B``: for an even batch the official
    split, with an odd one the last sample is paired with the first, with a batch of one both halves are that sample
    (stage 0 then trains on the plain image, stage 1 pastes one labeled and one unlabeled image both ways). The same
    for the unlabeled batch.

    Presets (``preset``, or ``nnUNet_ssl_preset``):

    - ``"paper"``: the official configuration: ``u_weight`` 0.5 as lambda without ramp, box 2/3 of each axis,
      EMA 0.99, and pre-training ``pretrain_fraction = 2000 / 17000`` (LA's 2,000 pre-training iterations before
      15,000 self-training ones; ACDC's script pre-trains for ``max_iterations`` = 30,000, then self-trains 30,000,
      i.e. 0.5, its ``pre_iterations`` = 10,000 argument is unused). LA's fraction because nnU-Net's 3D patches are
      LA's setting and a long supervised stage costs the semi-supervised one.
    - ``"default"``: the paper's, plus ``plain_supervision = True``: stage 1's ``L_sup`` also has nnU-Net's
      deep-supervised Dice + CE of the student on the plain labeled batch, in the same forward as the mixed images
      (``3 B`` more per step), so the labels also reach the network whole, not only as pasted parts of mixed images.
      Not in the paper or the official code; chosen on validation (Hippocampus, 3 labels, seed 0, 20 x 100
      iterations, fold 0's 42 validation cases): without it 0.7478 (the posterior class was not learned until 80 %
      of the run: after the short pre-training the teacher predicted none of it and its pseudo-labels taught its
      absence), with it 0.8461, against supervised nnU-Net's 0.8321 (``docs/results/hippocampus_sweep``). The
      pre-training already warms the student up, so the common 20 % ramp of the other hosts is not needed; BCP's
      loss has a fixed ratio of labeled and pseudo-labeled terms by construction.

    MetaSSL on BCP (``uses_labeled_reference``): the reference is the teacher's logits pasted with the same mask as
    the images (the teacher on U for the unlabeled parts, an extra teacher forward on the labeled batch for the
    labeled parts), so it is the teacher's prediction of every voxel the student sees. ``L_sup`` stays BCP's labeled
    region term; MetaSSL's unlabeled branch replaces ``L_unsup`` with voxel weights ``step.reference_weights`` = the
    pseudo-labeled region (its CE counts only there; its thresholds follow the teacher's confidence on all mixed
    voxels); its labeled branch sees the mixed images with the labels on the labeled region and the ignore label
    elsewhere (the dataset's, or ``C`` set as MetaSSL's ignore label when the dataset has none). The largest
    component filter does not apply to MetaSSL's pseudo-labels (its own argmax of the reference).

    Deviations from the paper and the official code, and why:

    - One run with nnU-Net's schedule: poly learning rate over both stages and the optimizer kept at the switch (the
      official code restarts SGD for self-training; LA then decays 0.1x every 2,500 iterations, ACDC keeps 0.01), so
      the run is one nnU-Net training that resumes with ``--c``.
    - The teacher starts from the last pre-training student, not the best by validation Dice: nnU-Net's validation
      cases are the fold's held-out cases and its pseudo-Dice is too noisy to select on.
    - L_sup of stage 0 is nnU-Net's deep-supervised Dice + CE on the mixed images (official: (CE + Dice)/2 without
      deep supervision), so that stage 0 is nnU-Net's own training on copy-pasted images.
    - Stage 1 uses the full-resolution output only (as the other hosts' unsupervised terms): BCP's region losses
      are defined on the mixed images' own labels; deep supervision applies in stage 0 only.
    - The Dice is SSL4MIS's masked Dice of the official code (all classes with background, squared denominators,
      sums over the group's samples); the CE over a region's voxels of the group; per group X_in, X_out as the
      official two ``mix_loss`` calls. Voxels with nnU-Net's ignore label are left out of the labeled regions.
    - Box: the side ``int(2/3 n)`` as the official code, the start uniform over all ``n - side + 1`` positions (the
      official ``randint(0, n - side)`` leaves out the last); the official LA code draws the start from the fixed
      112 x 112 x 80 size, here from the patch's. One ACDC layout for both: labeled content inside the box of X_in
      and outside it in X_out, as the spec (the LA script swaps the roles; the same loss up to which region the
      box covers).
    - Largest connected component with full connectivity (skimage's default), per sample, class and 3D patch (ACDC
      is 2D, per slice: nnU-Net's 2d configuration does the same), with ``scipy.ndimage.label`` on CPU: one
      argmax copy to the host and one labelling per foreground class and sample, a few ms per 3D patch of
      nnU-Net's CPU plans, tens of ms for 128^3 GPU patches, beside a network step of hundreds of ms.
      A class the teacher does not predict stays absent (the official ACDC 3D helper asserts it exists).
    - Views: the teacher and the student see the same ``view0`` (nnU-Net's spatial and intensity augmentation),
      as the official code passes one image to both; the official augmentation is random rotation/flip and crop.
    - EMA buffers are copied from the student (nnU-Net's InstanceNorm networks have none).
    """

    paper_settings = {"unsupervised_weight": 0.5, "rampup_fraction": 0.0, "unsupervised_share": None,
                      "calibrate_reference": False, "pretrain_fraction": LA_PRETRAIN_FRACTION, "box_ratio": 2 / 3,
                      "ema_max_decay": 0.99, "keep_largest_component": True,
                      "plain_supervision": False}
    #: u_weight, the weight of the pseudo-labeled regions (lambda, constant after the pre-training)
    unsupervised_weight = 0.5
    rampup_fraction = 0.0
    #: share of all iterations spent in stage 0 (copy-paste pre-training on labeled images)
    pretrain_fraction: float = LA_PRETRAIN_FRACTION
    #: side of the box as a fraction of each spatial axis of the patch
    box_ratio: float = 2 / 3
    #: plain EMA decay of stage 1 (no warm-up)
    ema_max_decay = 0.99
    #: the official "nms": keep the largest connected component of each class of the pseudo-labels
    keep_largest_component: bool = True
    #: stage 1 also trains on the plain labeled batch with nnU-Net's deep-supervised Dice + CE (not in the paper;
    #: chosen on validation, see the class docstring)
    plain_supervision: bool = True
    #: one unlabeled view: the teacher predicts the very images that are pasted
    view_intensity = (True,)
    needs_argmax_labels = True

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        if not 0.0 <= float(self.pretrain_fraction) < 1.0:
            raise SSLInputError(f"pretrain_fraction={self.pretrain_fraction!r} must be in [0, 1): the share of the "
                                "iterations spent in BCP's pre-training on labeled images")
        if not 0.0 < float(self.box_ratio) <= 1.0:
            raise SSLInputError(f"box_ratio={self.box_ratio!r} must be in (0, 1]: the side of BCP's box as a "
                                "fraction of each axis of the patch")

    # ------------------------------------------------------------------ stages
    @property
    def pretrain_iterations(self) -> int:
        """T_0: the steps of stage 0."""
        return int(round(self.pretrain_fraction * self.total_iterations))

    def in_pretraining(self) -> bool:
        return self.ssl_step < self.pretrain_iterations

    def ramp(self) -> float:
        """0 in stage 0; in stage 1 the sigmoid ramp counted from the switch (none in BCP's presets)."""
        if self.in_pretraining():
            return 0.0
        return sigmoid_rampup(self.ssl_step - self.pretrain_iterations, self.rampup_fraction * self.total_iterations)

    def start_self_training(self) -> None:
        self.sync_reference_from_student()
        self.print_to_log_file(f"BCP: pre-training done after {self.ssl_step} steps; the teacher starts from the "
                               "student", also_print_to_console=True)

    # ------------------------------------------------------------------ hooks
    def initialize(self) -> None:
        super().initialize()
        # MetaSSL's labeled branch reads the mixed images: the pseudo-labeled voxels carry the ignore value
        for module in getattr(self, "metassl_losses", []):
            if module.ignore_label is None:
                module.ignore_label = self.outside_labels_value()

    def outside_labels_value(self) -> int:
        """The target value of MetaSSL's labeled branch outside the labeled regions."""
        ignore = self.label_manager.ignore_label
        return int(ignore) if ignore is not None else int(self.label_manager.num_segmentation_heads)

    def reference_logits(self, step: SSLStep) -> torch.Tensor:
        step.reference_image = step.views["view0"]
        return full_resolution(self.teacher(step.reference_image))

    def unsupervised_loss(self, student_logits, reference_logits, step):
        """BCP's pseudo-labeled term ``L_M(X_in) + L_{1-M}(X_out)`` (the reference is read through the pseudo-labels
        on ``step.host_data``)."""
        mixed: MixedBatch = step.host_data
        n = mixed.pairs
        loss = (region_dice_ce(student_logits[:n], mixed.target[:n], mixed.pseudo_region[:n])
                + region_dice_ce(student_logits[n:], mixed.target[n:], mixed.pseudo_region[n:]))
        return loss, {}

    def after_optimizer_step(self) -> None:
        if not self.in_pretraining():
            ema_update(self.teacher, unwrap(self.network), self.ema_max_decay)

    # ------------------------------------------------------------------ the step
    def forward_losses(self, step: SSLStep) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        if self.in_pretraining():
            return self.pretraining_losses(step)
        if self.ssl_step == self.pretrain_iterations:
            self.start_self_training()
        return self.self_training_losses(step)

    def draw_mask(self, spatial: tuple[int, ...]) -> torch.Tensor:
        """One box mask M (spatial shape): stage 0, and every pair of stage 1."""
        return box_mask(tuple(spatial), self.box_ratio, device=self.device)

    def draw_masks(self, pairs: int, spatial: tuple[int, ...]) -> torch.Tensor:
        """Stage 1's masks, one per pair (pairs, *spatial): BCP's one box for the whole batch."""
        return self.draw_mask(tuple(spatial)).expand(pairs, *spatial)

    def teacher_capture(self) -> contextlib.AbstractContextManager:
        """Wraps the teacher's forward on the unlabeled batch (M3HL reads its features there)."""
        return contextlib.nullcontext()

    def student_capture(self) -> contextlib.AbstractContextManager:
        """Wraps the student's forward on the mixed images."""
        return contextlib.nullcontext()

    def mixed_image_terms(self, step: SSLStep, stats: dict) -> None:
        """Adds terms beside BCP's (M3HL's feature consistency) after the captured forwards; fills ``stats``."""

    def pretraining_losses(self, step: SSLStep) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        """Stage 0: nnU-Net's loss on ``L_a M + L_b (1 - M)`` with the labels mixed by the same mask."""
        pairs = max(1, math.ceil(step.data.shape[0] / 2))
        keep = self.draw_mask(step.data.shape[2:])
        step.student_image = paste(*halves(step.data, pairs), keep)

        def mixed(target: torch.Tensor) -> torch.Tensor:
            return paste(*halves(target, pairs), resize_mask(keep, tuple(target.shape[2:])))

        target = [mixed(t) for t in step.target] if isinstance(step.target, (list, tuple)) else mixed(step.target)
        with self._autocast():
            sup_loss = self.loss(self.network(step.student_image), target)
        stats = {"stage": 0.0, "pasted_fraction": float((~keep).float().mean())}
        return sup_loss, sup_loss.new_zeros((), dtype=torch.float32), stats

    def self_training_losses(self, step: SSLStep) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        """Stage 1: the two mixed images, their labeled and pseudo-labeled terms (see the class docstring)."""
        data, unlabeled = step.data, step.views["view0"]
        labels = full_resolution(step.target)[:, 0].long()
        n = number_of_pairs(data.shape[0], unlabeled.shape[0])
        keep = self.draw_masks(n, tuple(data.shape[2:]))
        with torch.no_grad():
            with self._autocast():
                with self.teacher_capture():
                    teacher_u = self.reference_logits(step)
                teacher_l = self.reference_logits_labeled(step) if self.uses_labeled_reference else None
            teacher_u = self.calibrated(teacher_u.float())
            pseudo = channel_argmax(teacher_u)
            removed = 0.0
            if self.keep_largest_component:
                pseudo, removed = largest_component_per_class(pseudo, self.label_manager.num_segmentation_heads)
            (la, lb), (ya, yb) = halves(data, n), halves(labels, n)
            (ua, ub), (pa, pb) = halves(unlabeled, n), halves(pseudo, n)
            target = torch.cat([paste(pa, ya, keep, per_sample=True), paste(yb, pb, keep, per_sample=True)])
            labeled_region = torch.cat([~keep, keep])
            pseudo_region = ~labeled_region
            ignore = self.label_manager.ignore_label
            if ignore is not None:
                labeled_region = labeled_region & (target != ignore)
                target = torch.where(labeled_region | pseudo_region, target, torch.zeros_like(target))
            # the teacher's prediction of every voxel the student sees (the labeled parts only with a plug-in that
            # reads them; BCP's own loss reads the pseudo-labels)
            tua, tub = halves(teacher_u, n)
            if teacher_l is None:
                tla, tlb = torch.zeros_like(tua), torch.zeros_like(tub)
            else:
                tla, tlb = halves(self.calibrated(teacher_l.float()), n)
            reference = torch.cat([paste(tua, tla, keep, per_sample=True), paste(tlb, tub, keep, per_sample=True)])
        step.student_image = torch.cat([paste(ua, la, keep, per_sample=True), paste(lb, ub, keep, per_sample=True)])
        step.reference_weights = pseudo_region
        step.host_data = MixedBatch(keep=keep, pairs=n, target=target, labeled_region=labeled_region,
                                    pseudo_region=pseudo_region, pseudo_labels=pseudo)
        plain = data.shape[0] if self.plain_supervision else 0
        with self._autocast():
            with self.student_capture():
                output = self.network(torch.cat([data, step.student_image]) if plain else step.student_image)
            out_plain, output = split_batch(output, plain)
            logits = full_resolution(output)
            plain_loss = self.loss(out_plain, step.target) if plain else None
            if self.is_ddp and isinstance(output, (list, tuple)) and plain_loss is None:
                # DDP needs a gradient for every parameter: the coarser deep-supervision heads, unused here, get 0
                # (float32 means: a float16 sum over a patch can overflow, and 0 * inf is NaN)
                plain_loss = sum(o.float().mean() for o in output[1:]) * 0.0
        with self._no_autocast():
            logits = logits.float()
            sup_loss = (region_dice_ce(logits[:n], target[:n], labeled_region[:n])
                        + region_dice_ce(logits[n:], target[n:], labeled_region[n:]))
            if plain_loss is not None:
                sup_loss = sup_loss + plain_loss.float()
            unsup_loss, stats = self.unsupervised_loss(logits, reference, step)
            stats = {**confidence_stats(teacher_u, self.confidence_threshold), "stage": 1.0,
                     "pasted_fraction": float((~keep).float().mean()), "lcc_removed": removed, **stats}
            self.mixed_image_terms(step, stats)
            if self.uses_labeled_reference:
                branch_target = torch.where(labeled_region, target,
                                            torch.full_like(target, self.outside_labels_value()))
                lab_loss, lab_stats = self.labeled_loss(logits, reference, branch_target, step)
                unsup_loss = unsup_loss + lab_loss
                stats.update(lab_stats, labeled_branch_loss=lab_loss.detach())
        return sup_loss, unsup_loss, stats

    # ------------------------------------------------------------------ cost and logs
    @classmethod
    def compute_units(cls, labeled_batch: int, unlabeled_batch: int) -> float:
        """Per step, averaged over the schedule: stage 0 a student forward and backward on ``ceil(B / 2)`` mixed
        images; stage 1 on the ``2 n`` mixed images (``n = ceil(max(B, U) / 2)``), a teacher forward on the U
        unlabeled images and, with ``uses_labeled_reference``, on the B labeled ones; with ``plain_supervision``
        the student's forward and backward on the B plain labeled images."""
        stage0 = 3 * max(1, math.ceil(labeled_batch / 2))
        n = number_of_pairs(labeled_batch, unlabeled_batch)
        stage1 = 3 * 2 * n + unlabeled_batch + (labeled_batch if cls.uses_labeled_reference else 0) \
            + (3 * labeled_batch if cls.plain_supervision else 0)
        f = float(cls.pretrain_fraction)
        return f * stage0 + (1.0 - f) * stage1

    def ssl_log_keys(self) -> list[str]:
        return [*super().ssl_log_keys(), "ssl_stage", "ssl_pasted_fraction", "ssl_lcc_removed"]

    def ssl_plot_panels(self) -> list[tuple[str, dict[str, str]]]:
        return [*super().ssl_plot_panels(),
                ("BCP", {"stage (0 pre-training, 1 self-training)": "ssl_stage",
                         "pseudo-label foreground removed by the largest-component filter": "ssl_lcc_removed"})]
