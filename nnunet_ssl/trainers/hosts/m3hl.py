"""M3HL host: BCP's two-way mixing with per-sample block masks instead of one box, plus high- and low-level feature
consistency of the student on the mixed images with the EMA teacher on the unlabeled originals."""

from __future__ import annotations

import contextlib

import torch

from nnunet_ssl.compat.trainer import FeatureTaps
from nnunet_ssl.errors import SSLInputError
from nnunet_ssl.losses.features import high_level_cosine, low_level_l1
from nnunet_ssl.parts.copy_paste import block_mask, halves
from nnunet_ssl.trainers.hosts.bcp import BidirectionalCopyPaste
from nnunet_ssl.trainers.step import SSLStep

FEATURE_PAIRS = ("shared", "all")


class MutualMaskMixFeatures(BidirectionalCopyPaste):
    """M3HL: a labeled and an unlabeled image mixed both ways with one random block mask per pair (the two mixed
    images are complementary), supervised as in BCP, plus the student's bottleneck and last decoder features on
    the mixed images held to the EMA teacher's features on the unlabeled originals.

    Paper: Liu, Zhang, Yue, Guo, Li, "M3HL: Mutual Mask Mix with High-Low Level Feature Consistency for
    Semi-Supervised Medical Image Segmentation", MICCAI 2025, arXiv 2508.03752 (title and authors from the paper
    and MICCAI's page; the repository's README has neither); official code PHPJava666/M3HL (read at 19151b3:
    ``code/ACDC_M3HL_train.py``, ``code/LA_M3HL_train.py``, ``code/networks/unet.py``), a modification of BCP's.

    Per step, one stage only (``pretrain_fraction = 0``: the official scripts call only ``self_train``), with
    labeled halves L_a, L_b (labels y_a, y_b) and unlabeled halves U_a, U_b of ``view0``, n pairs
    (:func:`~nnunet_ssl.parts.copy_paste.number_of_pairs`, pairing as BCP, partners always within the rank's batch):

    - ``M_i``, i = 1..n: the patch cut into ``mask_grid`` cells per axis (4 x 4 in 2D, 4 x 4 x 4 in 3D) and
      ``int(G mask_ratio)`` of the G cells zero, drawn for each pair independently
      (:func:`~nnunet_ssl.parts.copy_paste.block_mask`; cell boundaries ``k n_d // g``, so any patch size works;
      on 256^2 and 112 x 112 x 80 exactly the official 64^2 and 28 x 28 x 20 blocks)
    - ``y^ = LCC(argmax f_theta'(U))``, the teacher's pseudo-labels with the largest component of each class
    - ``X_in,i = U_a,i M_i + L_a,i (1 - M_i)`` (target ``y^_a M + y_a (1 - M)``),
      ``X_out,i = L_b,i M_i + U_b,i (1 - M_i)`` (target ``y_b M + y^_b (1 - M)``): the same M_i for both, so the
      unlabeled parts of X_in and X_out are complementary; labels and pseudo-labels mixed with exactly the image's
      mask
    - BCP's region loss (:mod:`nnunet_ssl.losses.copy_paste`, here with one region per sample):
      ``L_sup = L_{1-M}(X_in) + L_M(X_out)``, ``L_unsup = L_M(X_in) + L_{1-M}(X_out)``, lambda = u_weight = 0.5
    - features (:class:`~nnunet_ssl.compat.trainer.FeatureTaps`, forward hooks on nnU-Net's own network): F^high
      the bottleneck (output of ``encoder.stages[-1]``), F^low the last decoder stage (``decoder.stages[-1]``,
      the full-resolution features before the segmentation head); student s on the 2n mixed images (the forward
      that gives the logits), teacher t on U (the forward that gives the pseudo-labels: no extra forward);
      over the set P of (mixed image, original) pairs (:mod:`nnunet_ssl.losses.features`):
      ``L_low = mean_{(X, U) in P} mean |F^low_s(X) - F^low_t(U)|``,
      ``L_high = mean_{(X, U) in P} mean_i (1 - cos(vec F^high_s(X_i), vec F^high_t(U_i)))``
    - ``L = L_sup + lambda L_unsup + w (L_low + L_high)``, w = ``feature_weight`` = 0.5, a constant float32 term
      (``step.add_constant_loss``: the official loss has no ramp on it, and a plug-in that reschedules lambda,
      MetaSSL, leaves it alone)
    - ``theta' <- 0.99 theta' + 0.01 theta`` after every step (plain EMA, no warm-up)

    With w = lambda = 0.5 this is the official ``(loss_dice + loss_ce) / 2 + (loss_low + loss_high) / 2``.
    Logged besides BCP's keys: ``ssl_feature_low`` and ``ssl_feature_high`` (before w; ``ssl_other_share`` is the
    weighted term's share of ``L_sup + 1``), plotted in the panel "M3HL feature consistency";
    ``ssl_pasted_fraction`` is the share of voxels that are labeled content in X_in.

    Which pairs P (``feature_pairs``):

    - ``"all"`` (the official code, paper preset): each mixed image against both originals,
      P = {(X_in, U_a), (X_in, U_b), (X_out, U_a), (X_out, U_b)}, index by index, averaged over the four.
    - ``"shared"`` (default): each mixed image against the original whose content it contains,
      P = {(X_in, U_a), (X_out, U_b)}. The paper's stated aim is consistency "between unlabeled and mixed images",
      i.e. of a mixed image with its own unlabeled source; U_b shares no voxel with X_in (nor U_a with X_out), so
      in the official pairs half of the targets are features of an unrelated image (for the low level, voxel by
      voxel at the same positions), which pull the student towards features of content it does not see.

    Presets (``preset``, or ``nnUNet_ssl_preset``):

    - ``"paper"``: the official 2D ACDC script: u_weight 0.5 without ramp, feature weight 0.5, blocks 4 per axis
      with half of them zero, EMA 0.99, no pre-training, the largest-component filter, ``feature_pairs = "all"``.
    - ``"default"``: the same except ``feature_pairs = "shared"`` (above) and, as BCP's default, nnU-Net's loss on
      the plain labeled batch beside the mixed images (``plain_supervision``; chosen on validation, Hippocampus 3
      labels, seed 0: 0.8467 with it, 0.8170 without, baseline 0.8321). The weights stay the official ones: both
      feature terms are means (the mean absolute difference of instance-normalised, LeakyReLU'd features of order 1,
      and 1 - cos in [0, 2]), so their size does not depend on nnU-Net's larger patches and channel
      counts, and 0.5 keeps them beside the region losses (each in [0, 1]) rather than above them. No ramp and no
      pre-training as the official code: without pre-training the first pseudo-labels are a random network's,
      but the EMA at 0.99 follows the student within a few hundred of nnU-Net's 250,000 steps.

    ``step.host_data`` is BCP's :class:`~nnunet_ssl.trainers.hosts.bcp.MixedBatch`, its ``keep`` the per-pair masks
    (n, *spatial).

    MetaSSL on M3HL (``uses_labeled_reference``): exactly as on BCP (the reference is the teacher's logits pasted
    with the same per-sample masks, MetaSSL's unlabeled branch on the pseudo-labeled regions, its labeled branch
    on the labeled regions); the feature terms are unchanged.

    Cost (:meth:`compute_units`): a student forward and backward on 2n mixed images and a teacher forward on the U
    unlabeled images (+ B with MetaSSL), and with ``plain_supervision`` a forward and backward on the B plain labeled
    images: ``6 n + U + 3B (+ B)``, 14 for nnU-Net's B = U = 2 (supervised: 6; 8 in the paper preset); the hooks add
    no pass.

    Deviations from the paper and the official code, and why (besides BCP's, which apply where they concern the
    mixed images' loss: nnU-Net's schedule, region Dice with squared denominators, the ignore label, views):

    - The released 3D (LA) script does no mixing (its ``random_mask_block_matio_img_a_img_b_3D`` never writes the
      sample masks into the returned batch mask, which stays all ones) and does not run (it reads the nonexistent
      ``args.self_max_iteration``); this host implements what the paper and the 2D script describe, in 2D and 3D.
      The LA script's layout (labeled content where M = 1, its threshold 0.5 pseudo-labels for 2 classes) is
      replaced by the 2D script's, which holds for any number of classes (argmax).
    - Block masks for any patch size (cells per axis instead of the official fixed 64 px / 28 x 28 x 20 blocks and
      its assertion on 256^2 / 112 x 112 x 80): the blocks scale with the patch, and the official sizes are
      4 cells per axis.
    - Feature pairs: ``"shared"`` by default, the official ``"all"`` in the paper preset (above).
    - The features are nnU-Net's network's own, taken with forward hooks: the bottleneck of the plans' U-Net
      (e.g. 320 channels, not the official UNet's 256 or the VNet's max-pooled fifth stage) and its last decoder
      stage (32 channels, not 16). The official network's unused projection and selector heads are left out.
    - The official script computes ``consistency_weight`` and logs it without using it: not reproduced. It also
      builds mixed targets from the unlabeled images' true labels for its TensorBoard images only (not the loss):
      not reproduced.
    - The official teacher runs in train mode with the UNet's dropout (0.05-0.5): nnU-Net's networks have no
      dropout, so train and eval mode agree.
    - The paper's "dynamically adjustable masks" have no schedule in the code (fixed block size and ratio): none
      here either; ``mask_grid`` and ``mask_ratio`` are fixed settings.
    - The official ``update_model_ema`` also averages BatchNorm buffers; EMA buffers here are copied from the
      student (nnU-Net's InstanceNorm networks have none).
    - Optional ``pretrain_fraction > 0`` runs BCP's stage 0 with a block mask shared by the batch (not in the
      official M3HL; off in both presets).
    """

    paper_settings = {"unsupervised_weight": 0.5, "rampup_fraction": 0.0, "unsupervised_share": None,
                      "calibrate_reference": False, "pretrain_fraction": 0.0, "ema_max_decay": 0.99,
                      "keep_largest_component": True, "mask_grid": 4, "mask_ratio": 0.5, "feature_weight": 0.5,
                      "feature_pairs": "all", "plain_supervision": False}
    #: no pre-training stage (the official scripts only self-train)
    pretrain_fraction: float = 0.0
    #: cells of the block mask per spatial axis (an int for every axis, or one per axis)
    mask_grid: int | tuple[int, ...] = 4
    #: share of the cells that are zero in M (unlabeled content of X_out, labeled content of X_in)
    mask_ratio: float = 0.5
    #: w, the constant weight of L_low + L_high
    feature_weight: float = 0.5
    #: "shared": each mixed image against the unlabeled original it contains; "all": against both (official code)
    feature_pairs: str = "shared"
    #: nnU-Net's loss on the plain labeled batch too (BCP's default; off in the paper preset)
    plain_supervision = True

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        dims = len(self.configuration_manager.patch_size)
        grid = (self.mask_grid,) * dims if isinstance(self.mask_grid, int) else tuple(self.mask_grid)
        if len(grid) != dims or not all(isinstance(g, int) and g >= 1 for g in grid):
            raise SSLInputError(f"mask_grid={self.mask_grid!r} must be a positive int or {dims} positive ints (cells "
                                f"of M3HL's block mask per axis of the {dims}D patch), e.g. mask_grid=4")
        if not isinstance(self.mask_ratio, (int, float)) or not 0.0 < self.mask_ratio < 1.0:
            raise SSLInputError(f"mask_ratio={self.mask_ratio!r} must be in (0, 1): the share of M3HL's blocks that "
                                "are zero, e.g. mask_ratio=0.5")
        if not isinstance(self.feature_weight, (int, float)) or not self.feature_weight >= 0.0:
            raise SSLInputError(f"feature_weight={self.feature_weight!r} must be a number >= 0 (the weight of "
                                "M3HL's feature terms), e.g. feature_weight=0.5")
        if self.feature_pairs not in FEATURE_PAIRS:
            raise SSLInputError(f"feature_pairs={self.feature_pairs!r} is unknown; set it to 'shared' (each mixed "
                                "image against its own unlabeled original) or 'all' (against both, official code)")

    # ------------------------------------------------------------------ hooks
    def build_ssl_modules(self) -> None:
        super().build_ssl_modules()
        # registered before any forward: a compiled student ignores hooks added after its first call
        self.student_taps = FeatureTaps(self.network)
        self.teacher_taps = FeatureTaps(self.teacher)

    def start_self_training(self) -> None:
        if self.pretrain_iterations > 0:
            super().start_self_training()
        else:
            self.sync_reference_from_student()

    def draw_masks(self, samples: int, spatial: tuple[int, ...]) -> torch.Tensor:
        """One block mask per pair, (samples, *spatial), True where M = 1."""
        return block_mask(samples, tuple(spatial), self.mask_grid, self.mask_ratio, device=self.device)

    def draw_mask(self, spatial: tuple[int, ...]) -> torch.Tensor:
        """Stage 0 (only with ``pretrain_fraction > 0``): one block mask for the batch."""
        return self.draw_masks(1, spatial)[0]

    # ------------------------------------------------------------------ the step (BCP's, with these hooks)
    def teacher_capture(self) -> contextlib.AbstractContextManager:
        return self.teacher_taps.capture()

    def student_capture(self) -> contextlib.AbstractContextManager:
        return self.student_taps.capture()

    def mixed_image_terms(self, step: SSLStep, stats: dict) -> None:
        """``w (L_low + L_high)`` from the features the two captured forwards recorded, a constant float32 term."""
        teacher_high, teacher_low = self.teacher_taps.read()
        student_high, student_low = self.student_taps.read()
        plain = step.data.shape[0] if self.plain_supervision else 0  # the plain labeled images come first
        student_high, student_low = student_high[plain:], student_low[plain:]
        low, high = self.feature_losses(student_low, student_high, teacher_low.detach(), teacher_high.detach(),
                                        step.host_data.pairs)
        step.add_constant_loss(float(self.feature_weight) * (low + high))
        stats.update(feature_low=low.detach(), feature_high=high.detach())

    def feature_losses(self, student_low: torch.Tensor, student_high: torch.Tensor, teacher_low: torch.Tensor,
                       teacher_high: torch.Tensor, pairs: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(L_low, L_high) in float32: the student's features of (X_in, X_out) (2n samples) against the teacher's
        of the unlabeled batch, split into its halves (U_a, U_b), over the pairs of ``feature_pairs``."""
        (low_a, low_b), (high_a, high_b) = halves(teacher_low, pairs), halves(teacher_high, pairs)
        s_low, s_high = (student_low[:pairs], student_low[pairs:]), (student_high[:pairs], student_high[pairs:])
        combos = [(0, 0), (1, 1)] if self.feature_pairs == "shared" else [(0, 0), (0, 1), (1, 0), (1, 1)]
        t_low, t_high = (low_a, low_b), (high_a, high_b)
        low = torch.stack([low_level_l1(s_low[m], t_low[k]) for m, k in combos]).mean()
        high = torch.stack([high_level_cosine(s_high[m], t_high[k]) for m, k in combos]).mean()
        return low, high

    # ------------------------------------------------------------------ cost and logs
    @classmethod
    def compute_units(cls, labeled_batch: int, unlabeled_batch: int) -> float:
        """``6 n + U`` (+ B with ``uses_labeled_reference``, + 3B with ``plain_supervision``),
        n = ceil(max(B, U) / 2): the student's forward and backward on the 2n mixed images (and the plain labeled
        ones) and the teacher's forward on U (its features come from that forward); BCP's weighting by
        ``pretrain_fraction``, 0 here."""
        return super().compute_units(labeled_batch, unlabeled_batch)

    def ssl_log_keys(self) -> list[str]:
        return [*super().ssl_log_keys(), "ssl_feature_low", "ssl_feature_high"]

    def ssl_plot_panels(self) -> list[tuple[str, dict[str, str]]]:
        return [*super().ssl_plot_panels(),
                ("M3HL feature consistency (before the weight)",
                 {"low level: mean |F_s - F_t|, last decoder stage": "ssl_feature_low",
                  "high level: 1 - cos, bottleneck": "ssl_feature_high"})]
