"""Self-paced contrastive learning with meta-labels as a plug-in: a contrastive pre-training stage of the same run,
then the host's training with the contrastive term as a regulariser."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from batchgenerators.utilities.file_and_folder_operations import isfile, load_json
from torch import distributed as dist
from torch import nn

from nnunet_ssl.compat.loader_boxes import BOXES_KEY, loader_of, record_boxes
from nnunet_ssl.compat.trainer import FeatureTaps, unwrap, wrap_for_ddp
from nnunet_ssl.errors import SSLInputError
from nnunet_ssl.losses.self_paced import MODES, age_schedule, position_bins, self_paced_supcon, stable_label
from nnunet_ssl.parts.ramps import sigmoid_rampup
from nnunet_ssl.trainers.logs import GATE_MINIMUM, NEGLIGIBLE_SHARE, finite_mean
from nnunet_ssl.trainers.step import SSLStep

#: path of a JSON file {case id: label} for the "user" meta-label (overrides the setting spcl_meta_label_file)
ENV_META_LABELS = "nnUNet_ssl_meta_labels"
META_LABELS = ("position", "case", "user")
#: FeatureTaps' names: "high" the bottleneck, "low" the last decoder stage
FEATURE_SOURCES = ("high", "low")
#: the official ACDC schedule: 80 pre-training epochs, then 60 fine-tuning epochs (``script/run_self_paced_acdc``)
OFFICIAL_PRETRAIN_FRACTION = 80 / (80 + 60)


class ProjectionHeads(nn.Module):
    """One head per (feature source, meta-label), each the official ``ProjectionHead`` after its pooling:
    ``Linear(C, hidden) -> LeakyReLU(0.01) -> Linear(hidden, D) -> L2 normalisation``. One module, so that one DDP
    wrapper sees one forward per step."""

    def __init__(self, channels: dict[str, int], labels: tuple[str, ...], hidden: int, dim: int) -> None:
        super().__init__()
        self.channels = dict(channels)
        self.heads = nn.ModuleDict({f"{source}_{label}": nn.Sequential(
            nn.Linear(c, hidden), nn.LeakyReLU(0.01), nn.Linear(hidden, dim))
            for source, c in channels.items() for label in labels})

    def forward(self, pooled: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: F.normalize(head(pooled[name.split("_")[0]]), dim=1) for name, head in self.heads.items()}


@dataclass
class PatchMeta:
    """What a batch says about its patches: case ids and crop boxes (B, 3, D): volume shape, lower, upper corner."""

    keys: list[str]
    boxes: torch.Tensor

    @classmethod
    def of(cls, batch: dict, what: str) -> PatchMeta:
        if "keys" not in batch or BOXES_KEY not in batch:
            raise SSLInputError(f"the {what} batch has no case ids or crop boxes ('keys', '{BOXES_KEY}'): the "
                                "self-paced contrastive plug-in needs its loaders, wrapped by get_dataloaders "
                                "(nnunet_ssl.compat.loader_boxes.record_boxes)")
        boxes = torch.as_tensor(np.asarray(batch[BOXES_KEY]), dtype=torch.int64).cpu()
        return cls([str(k) for k in batch["keys"]], boxes)


def pool_rows(features: torch.Tensor, planes: int | None) -> torch.Tensor:
    """(N, C, *spatial) -> rows: the mean over the patch (N, C), or over each of ``planes`` slabs along the first
    spatial axis (N * planes, C; sample-major, planes in order)."""
    f = features.float()
    if planes is None:
        return f.flatten(2).mean(2)
    pooled = F.adaptive_avg_pool3d(f, (planes, 1, 1)).flatten(2)  # (N, C, planes)
    return pooled.permute(0, 2, 1).reshape(-1, f.shape[1])


class SelfPacedContrastive:
    """Self-paced supervised contrastive learning with meta-labels: a contrastive pre-training of nnU-Net's encoder
    (optionally decoder) on labeled and unlabeled patches within the same ``nnUNetv2_train`` run, then the host's
    semi-supervised training with the contrastive term as a regulariser.

    Paper: Peng, Wang, Pedersoli, Desrosiers, "Self-Paced Contrastive Learning for Semi-supervised Medical Image
    Segmentation with Meta-labels", NeurIPS 2021, arXiv 2107.13741; official code
    jizongFox/Self-paced-Contrastive-Learning (read: ``contrastyou/losses/contrast_loss3.py``,
    ``semi_seg/hooks/infonce.py``, ``contrastyou/projectors/heads.py``, ``semi_seg/data/dataset.py``,
    ``semi_seg/main_infonce.py``, ``config/``, ``semi_seg/scripts/run_self_paced_acdc``). Loss:
    :mod:`nnunet_ssl.losses.self_paced`.

    Stages, from the step counter ``ssl_step`` (in the checkpoint, so ``--c`` resumes either), T the run's
    iterations, ``T_0 = round(spcl_pretrain_fraction T)``:

    - Stage 0, pre-training (``ssl_step < T_0``): the student sees ``cat(x_l, u^0, u^1)`` (labeled images and both
      unlabeled views; only ``x_l`` with ``spcl_unlabeled = False``) in one forward; ``L = sum_k a_k
      L_SPCL(f, m_k)``, nnU-Net's supervised loss and the host's loss off (lambda = 0), the host's reference not
      used and not updated (no EMA step).
    - At ``ssl_step = T_0`` the host's reference restarts from the student (``sync_reference_from_student``: the
      teacher of Mean Teacher), and lambda ramps up from there (the host's ``rampup_fraction``, counted from T_0).
    - Stage 1, fine-tuning: the host's step unchanged, plus ``beta sum_k a_k L_SPCL`` on the student's own forward
      (``x_l`` and the unlabeled images it sees, when they are the unmixed view 0): ``L = L_sup + lambda(t) L_host +
      beta L_SPCL`` (a constant term, ``spcl_weight = beta``).

    Features: per row ``r``, ``h_r = pool(F(x))`` with F the bottleneck (FeatureTaps' ``high``; with
    ``spcl_decoder_features`` also the last decoder stage, ``low``, its own terms), pooled over the patch
    (``spcl_feature_pool = "patch"``) or over each bottleneck plane along the first spatial axis (``"plane"``, 3D);
    ``z_r = normalize(g_{F,k}(h_r))`` with one projection head g per (feature, meta-label), the official
    ``ProjectionHead`` (Linear-LeakyReLU-Linear, 256-256), trained by the student's optimizer as a second parameter
    group (following nnU-Net's poly learning rate), clipped with it, saved in ``ssl_state`` (``spcl_heads``) and
    DDP-wrapped under DDP; the heads are not part of the inference network.

    Meta-labels ``m_k`` (``spcl_meta_labels``, weights ``a_k`` = ``spcl_meta_label_weights``): ``"position"``, the
    position of the row's centre along the first spatial axis divided by the preprocessed volume's extent, in
    ``spcl_position_bins`` equal bins (the official "partition"; for 2D configurations the slice index of the
    sample, which nnU-Net's 2D loader crops as a one-slice box); ``"case"``, the case id (the official "patient");
    ``"user"``, a label per case from a JSON file ``{case id: label}`` (``nnUNet_ssl_meta_labels`` or
    ``spcl_meta_label_file``; e.g. ACDC's cardiac phase, the official "cycle"). The crop boxes come from nnU-Net's
    own loaders, switched to subclasses that record them (:mod:`nnunet_ssl.compat.loader_boxes`). Rows of the two
    views of one unlabeled patch share every meta-label, so they are positives of each other, as in the official
    two-view batches.

    Loss per (feature, meta-label), :func:`~nnunet_ssl.losses.self_paced.self_paced_supcon`: SupCon with
    temperature ``tau = spcl_temperature`` over all rows, positives the rows sharing the meta-label, each positive
    pair weighted by ``w_ij`` (hard ``1[l_ij <= gamma]``, soft ``max(0, 1 - l_ij / gamma)``, ``spcl_weighting``),
    negatives weight 1, renormalised by the mean weight (``spcl_renormalise``, the official ``correct_grad``).
    The age ``gamma(t) = gamma_0 + (gamma_1 - gamma_0) (t / T_0)^p`` over stage 0 (over the whole run when T_0 = 0),
    ``gamma_1`` afterwards (``spcl_age_begin``, ``spcl_age_end``, ``spcl_age_power``).

    DDP: the projections and meta-labels of every rank are gathered (``torch.distributed.nn.functional.all_gather``,
    which keeps the gradient to the rank that made them; ``spcl_gather``), so each rank's anchors meet the
    positives and negatives of the global batch; each rank averages over its own anchors, and DDP's mean of the
    gradients is the gradient of the mean over ranks. With ``spcl_gather = False`` the loss is per rank.

    Logged: ``ssl_spcl_loss`` (``sum_k a_k L_SPCL`` before beta), ``ssl_spcl_kept`` (mean self-paced weight of the
    positive pairs: for hard weights the share kept), ``ssl_spcl_positives`` (share of pairs that are positive),
    ``ssl_spcl_age`` and ``ssl_stage``; ``ssl_other_share`` is the weighted term over ``L_sup + 1``. The log warns
    when nearly no positive pair is kept, when no or every pair is positive, and when beta L_SPCL is negligible.

    Presets (``preset``, or ``nnUNet_ssl_preset``):

    - ``"paper"``: the official ACDC configuration: pre-training for 80 / 140 of the run (80 pre-training and 60
      fine-tuning epochs), meta-labels position (3 bins, ACDC's ``partition_num``) and case with weights 1 and 0.1
      (the first multi-task run of ``run_self_paced_acdc``), soft weights with gamma from 5 to 60 (the position
      term's values there) and ``p = 0.5`` (``PScheduler``), ``tau = 0.07``, renormalised, heads 256-256 on the
      bottleneck, no contrastive term while fine-tuning (beta = 0: the official fine-tuning is supervised only).
    - ``"default"``: the same losses and schedule; pre-training for 10 % of the run, because nnU-Net's one poly
      learning-rate schedule spans both stages and every pre-training step is taken from the supervised and
      semi-supervised ones (BCP's reasoning); meta-label position only (on nnU-Net's random batches of 2 + 2
      patches two patches of one case are rare, so the case term is mostly the two views of each unlabeled patch);
      beta = ``spcl_weight`` = 0.1 in stage 1, so that the structure learned in stage 0 is kept while fine-tuning
      (the issue's design). At initialisation on the synthetic 3D dataset the unweighted term's parameter-gradient
      norm was 0.9 (case meta-label) against 2.0 for L_sup: beta = 0.1 keeps it a regulariser of about 5 % of the
      supervised gradient, and its loss about 4 % of ``L_sup + 1``, above the 1 % the log calls negligible. The
      age values are the official ones: with nnU-Net's few rows per step (4 to 6 per rank with patch pooling) the
      pair losses start near ``log(N - 1)``, 1.1 to 1.6, so soft weights start at 0.7 to 0.8 (logged).

    Why a stage of the same run rather than a separate command whose output ``-pretrained_weights`` takes: one
    ``nnUNetv2_train`` call trains the method (as nnU-Net's users expect of ``-tr``), the stage follows from
    ``ssl_step`` so ``--c`` resumes mid-pre-training or mid-fine-tuning with the heads, their momentum and the age,
    the same loaders, augmentation, patches, DDP and checkpoints serve both stages, and the heads, kept through
    the switch, carry the regulariser of stage 1. ``-pretrained_weights`` still works as for every trainer.

    Deviations from the paper and the official code, and why:

    - One run with nnU-Net's SGD and poly schedule over both stages, the optimizer kept at the switch (official:
      RAdam with separate learning rates, a new optimizer for fine-tuning); the age advances per step, not per
      epoch.
    - Stage 0 trains the whole network's path up to the features (the official freezes the layers after the
      feature layer, which receive no gradient anyway); under DDP every parameter joins the graph with a zero term
      on the outputs, since nnU-Net's DDP wrapper does not look for unused parameters (BCP's way). Weight decay
      still acts on the decoder.
    - Views: the official pairs each unlabeled image with an affinely transformed copy (features transformed
      equivariantly); here the two views are nnU-Net's aligned views (shared geometry, own intensity
      augmentation), and labeled patches, one view each, take part through their meta-labels.
    - Batches: the official samples 7 scans x 3 partitions per batch so positives abound; here nnU-Net's random
      patches (and 2D slices), with per-plane pooling (3D) and the gathering over ranks for more rows. Anchors
      without a positive are left out of the mean (the official batches have none).
    - Position in 3D: the patch (or plane) centre on the first spatial axis of the preprocessed (foreground-
      cropped) volume, computed from the crop box; nnU-Net's rotation and scaling about the centre are ignored for
      planes, and ``"plane"`` pooling refuses mirroring along that axis (it would reverse the planes' order). The
      official uses the slice index within the scan in ``partition_num`` parts cut at multiples of
      ``len // partition_num`` (the last part takes the remainder); here equal parts of [0, 1].
    - Decoder features (``spcl_decoder_features``) are pooled like the bottleneck's with the same meta-labels
      (inferred: the official decoder pre-training contrasts dense points against themselves, SimCLR-like).
    - The contrastive term while fine-tuning (beta) is our addition (issue #37), 0 in the paper preset.
    """

    paper_settings: ClassVar[dict[str, object]] = {
        "spcl_pretrain_fraction": OFFICIAL_PRETRAIN_FRACTION, "spcl_meta_labels": ("position", "case"),
        "spcl_meta_label_weights": (1.0, 0.1), "spcl_position_bins": 3, "spcl_weighting": "soft",
        "spcl_age_begin": 5.0, "spcl_age_end": 60.0, "spcl_age_power": 0.5, "spcl_temperature": 0.07,
        "spcl_renormalise": True, "spcl_weight": 0.0, "spcl_feature_pool": "patch", "spcl_decoder_features": False,
        "spcl_projector_hidden": 256, "spcl_projector_dim": 256}
    #: share of all iterations spent in the contrastive pre-training (stage 0)
    spcl_pretrain_fraction: float = 0.1
    #: meta-labels, each its own contrastive term: "position", "case", "user"
    spcl_meta_labels: tuple[str, ...] = ("position",)
    #: a_k, one weight per meta-label
    spcl_meta_label_weights: tuple[float, ...] = (1.0,)
    #: equal bins of the normalised position along the first spatial axis
    spcl_position_bins: int = 3
    #: "patch": one row per patch; "plane": one row per bottleneck plane along the first spatial axis (3D)
    spcl_feature_pool: str = "patch"
    #: also contrast the last decoder stage (own heads and terms)
    spcl_decoder_features: bool = False
    #: unlabeled patches take part (both views in stage 0)
    spcl_unlabeled: bool = True
    #: "soft", "hard" or "none" (plain SupCon)
    spcl_weighting: str = "soft"
    spcl_age_begin: float = 5.0
    spcl_age_end: float = 60.0
    spcl_age_power: float = 0.5
    spcl_temperature: float = 0.07
    #: divide by the mean self-paced weight of the positive pairs (the official correct_grad)
    spcl_renormalise: bool = True
    #: beta, the weight of the contrastive regulariser in stage 1 (0: off)
    spcl_weight: float = 0.1
    #: gather projections and meta-labels over DDP ranks (else the loss is per rank)
    spcl_gather: bool = True
    spcl_projector_hidden: int = 256
    spcl_projector_dim: int = 256
    #: JSON file {case id: label} for the "user" meta-label (nnUNet_ssl_meta_labels overrides it)
    spcl_meta_label_file: str | None = None

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.check_spcl_settings()
        self._spcl_meta: tuple[PatchMeta, PatchMeta] | None = None
        self.spcl_user_labels: dict[str, object] = {}

    # ------------------------------------------------------------------ settings
    def check_spcl_settings(self) -> None:
        """One clear line for each bad setting."""
        def number(name: str, low: float, low_open: bool = False, high: float | None = None) -> None:
            v = getattr(self, name)
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v)) and \
                (float(v) > low if low_open else float(v) >= low) and (high is None or float(v) < high)
            if not ok:
                bound = f"{'>' if low_open else '>='} {low}" + (f" and < {high}" if high is not None else "")
                raise SSLInputError(f"{name}={v!r} must be a number {bound}")

        number("spcl_pretrain_fraction", 0.0, high=1.0)
        for name in ("spcl_temperature", "spcl_age_begin", "spcl_age_power"):
            number(name, 0.0, low_open=True)
        number("spcl_age_end", float(self.spcl_age_begin))
        number("spcl_weight", 0.0)
        labels = tuple(self.spcl_meta_labels)
        if not labels or len(set(labels)) != len(labels) or any(m not in META_LABELS for m in labels):
            raise SSLInputError(f"spcl_meta_labels={self.spcl_meta_labels!r} must name distinct meta-labels among "
                                f"{', '.join(META_LABELS)}, e.g. ('position', 'case')")
        weights = tuple(self.spcl_meta_label_weights)
        if len(weights) != len(labels) or any(not isinstance(w, (int, float)) or isinstance(w, bool) or w < 0
                                              for w in weights):
            raise SSLInputError(f"spcl_meta_label_weights={self.spcl_meta_label_weights!r} must hold one number >= 0 "
                                f"per meta-label of spcl_meta_labels={labels!r}")
        for name in ("spcl_position_bins", "spcl_projector_hidden", "spcl_projector_dim"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise SSLInputError(f"{name}={v!r} must be a whole number >= 1")
        if self.spcl_weighting not in MODES:
            raise SSLInputError(f"spcl_weighting={self.spcl_weighting!r} must be one of {', '.join(MODES)}")
        if self.spcl_feature_pool not in ("patch", "plane"):
            raise SSLInputError(f"spcl_feature_pool={self.spcl_feature_pool!r} must be 'patch' or 'plane'")
        if self.spcl_feature_pool == "plane" and len(self.configuration_manager.patch_size) != 3:
            raise SSLInputError("spcl_feature_pool='plane' needs 3D patches (planes along the first spatial axis); "
                                "2D configurations contrast one row per slice: use spcl_feature_pool='patch'")
        if "user" in labels and not self.meta_label_file():
            raise SSLInputError(f"the 'user' meta-label needs a JSON file {{case id: label}}: set {ENV_META_LABELS}="
                                "/path/labels.json or the setting spcl_meta_label_file")

    def meta_label_file(self) -> str | None:
        return os.environ.get(ENV_META_LABELS) or self.spcl_meta_label_file

    def load_user_labels(self) -> dict[str, object]:
        path = self.meta_label_file()
        if not path or not isfile(path):
            raise SSLInputError(f"the meta-label file {path!r} ({ENV_META_LABELS} or spcl_meta_label_file) does not "
                                "exist; write a JSON file {case id: label}")
        try:
            labels = load_json(path)
        except ValueError as e:
            raise SSLInputError(f"the meta-label file {path} is not valid JSON ({e}); write {{case id: label}}") \
                from None
        if not isinstance(labels, dict) or any(not isinstance(v, (str, int, float, bool)) for v in labels.values()):
            raise SSLInputError(f"the meta-label file {path} must hold one JSON object {{case id: label}} with a "
                                "string or number per case")
        return {str(k): v for k, v in labels.items()}

    # ------------------------------------------------------------------ stages
    @property
    def spcl_pretrain_iterations(self) -> int:
        """T_0: the steps of the pre-training stage."""
        return int(round(float(self.spcl_pretrain_fraction) * self.total_iterations))

    def in_pretraining(self) -> bool:
        return self.ssl_step < self.spcl_pretrain_iterations

    def spcl_age(self) -> float:
        """gamma(t): grows over stage 0 (the whole run without one), then stays at its end value."""
        span = self.spcl_pretrain_iterations or self.total_iterations
        return age_schedule(self.ssl_step / max(span, 1), self.spcl_age_begin, self.spcl_age_end,
                            self.spcl_age_power)

    def ramp(self) -> float:
        """0 in stage 0; in stage 1 the host's sigmoid ramp counted from the switch."""
        if self.in_pretraining():
            return 0.0
        return sigmoid_rampup(self.ssl_step - self.spcl_pretrain_iterations,
                              self.rampup_fraction * self.total_iterations)

    def start_fine_tuning(self) -> None:
        self.sync_reference_from_student()
        self.print_to_log_file(f"self-paced contrastive pre-training done after {self.ssl_step} steps; the "
                               f"{self.reference_name} starts from the student", also_print_to_console=True)

    # ------------------------------------------------------------------ modules
    def feature_sources(self) -> tuple[str, ...]:
        return FEATURE_SOURCES if self.spcl_decoder_features else FEATURE_SOURCES[:1]

    def feature_channels(self) -> dict[str, int]:
        """Channels of the bottleneck (the plans' last ``features_per_stage``) and of the last decoder stage (the
        first)."""
        features = self.configuration_manager.network_arch_init_kwargs.get("features_per_stage")
        if not features:
            raise SSLInputError("the self-paced contrastive heads read the bottleneck of nnU-Net's U-Nets; these "
                                "plans have no features_per_stage: train with nnU-Net's default or ResEnc plans")
        channels = {"high": int(features[-1]), "low": int(features[0])}
        return {s: channels[s] for s in self.feature_sources()}

    def build_ssl_modules(self) -> None:
        # the host's modules first: a teacher deep-copied after the taps would copy their hooks
        super().build_ssl_modules()
        self.spcl_taps = FeatureTaps(self.network)
        heads = ProjectionHeads(self.feature_channels(), tuple(self.spcl_meta_labels),
                                int(self.spcl_projector_hidden), int(self.spcl_projector_dim)).to(self.device)
        self.optimizer.add_param_group({"params": list(heads.parameters())})
        self.spcl_heads = wrap_for_ddp(self, heads) if self.is_ddp else heads
        if "user" in self.spcl_meta_labels:
            self.spcl_user_labels = self.load_user_labels()

    def trainable(self) -> list[tuple[nn.Module, torch.optim.Optimizer]]:
        # the heads are clipped (and unscaled) with the student, whose optimizer steps them
        pairs = super().trainable()
        if not hasattr(self, "spcl_heads"):
            return pairs
        return [(nn.ModuleList([network, self.spcl_heads]) if optimizer is self.optimizer else network, optimizer)
                for network, optimizer in pairs]

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        self.sync_head_lr()

    def sync_head_lr(self) -> None:
        """nnU-Net's PolyLRScheduler sets ``param_groups[0]`` only; the heads' group follows it."""
        for group in self.optimizer.param_groups[1:]:
            group["lr"] = self.optimizer.param_groups[0]["lr"]

    # ------------------------------------------------------------------ loaders
    def get_unlabeled_dataloader(self) -> object:
        augmenter = record_boxes(super().get_unlabeled_dataloader())
        self.check_user_labels(loader_of(augmenter).indices)
        return augmenter

    def check_user_labels(self, cases) -> None:
        """One line naming the cases the meta-label file has no label for (only with the "user" meta-label)."""
        if not self.spcl_user_labels:
            return
        missing = sorted(set(cases) - set(self.spcl_user_labels))
        if missing:
            raise SSLInputError(f"the meta-label file {self.meta_label_file()} has no label for {missing[:5]} "
                                f"({len(missing)} training or unlabeled cases in all); add them")

    def get_dataloaders(self):
        if self.spcl_feature_pool == "plane":
            mirror_axes = self.configure_rotation_dummyDA_mirroring_and_inital_patch_size()[3]
            if mirror_axes is not None and 0 in tuple(mirror_axes):
                raise SSLInputError("spcl_feature_pool='plane' reads each plane's position along the first spatial "
                                    "axis, which nnU-Net's mirroring along that axis reverses; use "
                                    "spcl_feature_pool='patch', or a trainer whose "
                                    "configure_rotation_dummyDA_mirroring_and_inital_patch_size leaves axis 0 out")
        train, val = super().get_dataloaders()
        record_boxes(train)
        self.check_user_labels(loader_of(train).indices)
        return train, val

    # ------------------------------------------------------------------ the step
    def train_step(self, batch: dict) -> dict:
        """The host's step, with both batches' case ids and crop boxes at hand for the meta-labels (read in
        ``forward_losses`` of the same step, then dropped). The unlabeled batch is drawn here and handed to the
        host's step unchanged."""
        unlabeled = next(self.dataloader_unlabeled)
        self._spcl_meta = (PatchMeta.of(batch, "labeled"), PatchMeta.of(unlabeled, "unlabeled"))
        loader, self.dataloader_unlabeled = self.dataloader_unlabeled, iter((unlabeled,))
        try:
            return super().train_step(batch)
        finally:
            self.dataloader_unlabeled = loader
            self._spcl_meta = None

    def after_optimizer_step(self) -> None:
        if not self.in_pretraining():  # the reference waits for the fine-tuning
            super().after_optimizer_step()

    def forward_losses(self, step: SSLStep) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        if self._spcl_meta is None:
            raise RuntimeError("forward_losses of the self-paced contrastive plug-in runs inside train_step, which "
                               "reads the batches' case ids and crop boxes")
        labeled, unlabeled = self._spcl_meta
        if self.in_pretraining():
            return self.pretraining_losses(step, labeled, unlabeled)
        if self.ssl_step == self.spcl_pretrain_iterations and self.ssl_step > 0:
            self.start_fine_tuning()
        if float(self.spcl_weight) == 0:
            sup_loss, unsup_loss, stats = super().forward_losses(step)
            return sup_loss, unsup_loss, {**stats, "stage": 1.0, "spcl_age": self.spcl_age()}
        with self.spcl_taps.capture():
            sup_loss, unsup_loss, stats = super().forward_losses(step)
        features = dict(zip(FEATURE_SOURCES, self.spcl_taps.read()))
        parts = [(labeled, step.data.shape[0])]
        # the student's unlabeled images carry their patches' meta-labels only when they are the unmixed view 0
        if self.spcl_unlabeled and step.mix is None and step.student_image is step.views.get("view0"):
            parts.append((unlabeled, step.student_image.shape[0]))
        rows = sum(n for _, n in parts)
        with self._no_autocast():
            loss, spcl_stats = self.contrastive_loss({k: v[:rows] for k, v in features.items()}, parts)
            step.add_constant_loss(float(self.spcl_weight) * loss)
        return sup_loss, unsup_loss, {**stats, **spcl_stats, "stage": 1.0}

    def pretraining_views(self, step: SSLStep) -> list[torch.Tensor]:
        if not self.spcl_unlabeled:
            return []
        return [step.views[k] for k in ("view0", "view1") if k in step.views]

    def pretraining_losses(self, step: SSLStep, labeled: PatchMeta, unlabeled: PatchMeta
                           ) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        """Stage 0: the contrastive loss alone on the labeled images and both unlabeled views, one forward."""
        views = self.pretraining_views(step)
        step.student_image = views[0] if views else None
        with self._autocast():
            with self.spcl_taps.capture():
                output = self.network(torch.cat([step.data, *views]))
            features = dict(zip(FEATURE_SOURCES, self.spcl_taps.read()))
        outputs = output if isinstance(output, (list, tuple)) else [output]
        with self._no_autocast():
            # every parameter joins the graph with a zero gradient: nnU-Net's DDP wrapper expects one for each
            # (means, not sums: a float16 sum of a large patch's logits could overflow to inf, and 0 * inf is NaN)
            sup_loss = torch.stack([o.float().mean() for o in outputs]).sum() * 0.0
            parts = [(labeled, step.data.shape[0])] + [(unlabeled, v.shape[0]) for v in views]
            loss, stats = self.contrastive_loss(features, parts)
            step.add_constant_loss(loss)
        return sup_loss, sup_loss.new_zeros(()), {**stats, "stage": 0.0}

    # ------------------------------------------------------------------ meta-labels and the loss
    def planes(self, features: torch.Tensor) -> int | None:
        """Rows per sample along the first spatial axis: the bottleneck's planes, or None (one per patch)."""
        if self.spcl_feature_pool != "plane":
            return None
        return int(features.shape[2])

    def meta_labels(self, parts: list[tuple[PatchMeta, int]], planes: int | None) -> dict[str, torch.Tensor]:
        """Per meta-label, the labels (rows,) of the rows of ``parts`` (each its batch's meta and how many of its
        samples, in order), ``planes`` rows per sample (or one)."""
        keys, centres, extents = [], [], []
        patch = float(self.configuration_manager.patch_size[0]) if len(self.configuration_manager.patch_size) == 3 \
            else 1.0
        for meta, n in parts:
            if n > len(meta.keys):
                raise RuntimeError(f"{n} samples but {len(meta.keys)} case ids in the batch")
            for i in range(n):
                shape, lo, hi = meta.boxes[i].double()
                centre = (lo[0] + hi[0]) / 2
                if planes is None:
                    keys.append(meta.keys[i])
                    centres.append(centre)
                    extents.append(shape[0])
                else:  # plane k of the final patch, centred on the crop box's centre
                    for k in range(planes):
                        keys.append(meta.keys[i])
                        centres.append(centre - patch / 2 + (k + 0.5) * patch / planes)
                        extents.append(shape[0])
        out = {}
        for name in self.spcl_meta_labels:
            if name == "position":
                values = position_bins(torch.stack(centres), torch.stack(extents), int(self.spcl_position_bins))
            elif name == "case":
                values = torch.tensor([stable_label(k) for k in keys], dtype=torch.int64)
            else:
                missing = sorted({k for k in keys if k not in self.spcl_user_labels})
                if missing:
                    raise SSLInputError(f"the meta-label file {self.meta_label_file()} has no label for {missing[:5]}; "
                                        "add them")
                values = torch.tensor([stable_label(self.spcl_user_labels[k]) for k in keys], dtype=torch.int64)
            out[name] = values.to(self.device)
        return out

    def gather(self, rows: torch.Tensor, labels: dict[str, torch.Tensor]
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """(rows of all ranks with gradient, their labels, this rank's rows in them); unchanged without DDP."""
        n = rows.shape[0]
        if not (self.is_ddp and self.spcl_gather):
            return rows, labels, torch.arange(n, device=rows.device)
        world, rank = dist.get_world_size(), dist.get_rank()
        sizes = [torch.zeros(1, dtype=torch.int64, device=rows.device) for _ in range(world)]
        dist.all_gather(sizes, torch.tensor([n], dtype=torch.int64, device=rows.device))
        sizes = [int(s) for s in sizes]
        width = max(sizes)
        padded = F.pad(rows, (0, 0, 0, width - n))
        gathered = torch.distributed.nn.functional.all_gather(padded)
        all_rows = torch.cat([g[:s] for g, s in zip(gathered, sizes)])
        all_labels = {}
        for name, values in labels.items():
            out = [torch.zeros(width, dtype=values.dtype, device=values.device) for _ in range(world)]
            dist.all_gather(out, F.pad(values, (0, width - n)))
            all_labels[name] = torch.cat([o[:s] for o, s in zip(out, sizes)])
        start = sum(sizes[:rank])
        return all_rows, all_labels, torch.arange(start, start + n, device=rows.device)

    def contrastive_loss(self, features: dict[str, torch.Tensor], parts: list[tuple[PatchMeta, int]]
                         ) -> tuple[torch.Tensor, dict[str, float]]:
        """``sum_k a_k L_SPCL`` over the feature sources and meta-labels, in float32, with its statistics."""
        sources = self.feature_sources()
        planes = self.planes(features["high"])
        pooled = {s: pool_rows(features[s], planes) for s in sources}
        expected = self.feature_channels()
        for s in sources:
            if pooled[s].shape[1] != expected[s]:
                raise SSLInputError(f"the {'bottleneck' if s == 'high' else 'last decoder stage'} has "
                                    f"{pooled[s].shape[1]} channels, the projection heads expect {expected[s]}: "
                                    "train with nnU-Net's U-Net plans")
        labels = self.meta_labels(parts, planes)
        projected = self.spcl_heads(pooled)
        age = self.spcl_age()
        total = pooled[sources[0]].new_zeros(())
        kept, positives = [], []
        for source in sources:
            for name, weight in zip(self.spcl_meta_labels, self.spcl_meta_label_weights):
                z, gathered, anchors = self.gather(projected[f"{source}_{name}"], {name: labels[name]})
                loss, stats = self_paced_supcon(z, gathered[name], anchors, float(self.spcl_temperature), age,
                                                self.spcl_weighting, bool(self.spcl_renormalise))
                total = total + float(weight) * loss
                kept.append(stats["kept"])
                positives.append(stats["positives"])
        return total, {"spcl_loss": float(total.detach()), "spcl_kept": finite_mean(kept),
                       "spcl_positives": float(np.mean(positives)), "spcl_age": age}

    # ------------------------------------------------------------------ state, cost and logs
    def ssl_state_dict(self) -> dict:
        return {**super().ssl_state_dict(), "spcl_heads": unwrap(self.spcl_heads).state_dict()}

    def load_ssl_state_dict(self, state: dict) -> None:
        super().load_ssl_state_dict(state)
        unwrap(self.spcl_heads).load_state_dict(state["spcl_heads"])

    @classmethod
    def compute_units(cls, labeled_batch: int, unlabeled_batch: int) -> float:
        """Stage 0: one student forward and backward on the labeled batch and both unlabeled views,
        ``3 (B + 2U)``; stage 1: the host's cost (the heads and the loss on pooled rows are not counted); averaged
        over the schedule."""
        views = min(2, len(tuple(cls.view_intensity))) if cls.spcl_unlabeled else 0
        stage0 = 3 * (labeled_batch + views * unlabeled_batch)
        f = float(cls.spcl_pretrain_fraction)
        return f * stage0 + (1.0 - f) * super().compute_units(labeled_batch, unlabeled_batch)

    def ssl_log_keys(self) -> list[str]:
        return [*super().ssl_log_keys(), "ssl_stage", "ssl_spcl_loss", "ssl_spcl_kept", "ssl_spcl_positives",
                "ssl_spcl_age"]

    def ssl_plot_panels(self) -> list[tuple[str, dict[str, str]]]:
        return [*super().ssl_plot_panels(),
                ("self-paced contrastive (before beta)", {"sum_k a_k L_SPCL": "ssl_spcl_loss"}),
                ("self-paced pairs", {"mean weight of positive pairs (kept)": "ssl_spcl_kept",
                                      "share of pairs that are positive": "ssl_spcl_positives",
                                      "stage (0 pre-training, 1 fine-tuning)": "ssl_stage"}),
                ("self-paced age gamma", {"gamma": "ssl_spcl_age"})]

    def mechanism_warnings(self, means: dict[str, float]) -> list[str]:
        """The host's lines, plus: the self-paced weights keep nearly no positive pair; no pair, or every pair, is
        positive (the meta-label says nothing); beta L_SPCL is negligible beside the supervised loss while
        fine-tuning."""
        out = super().mechanism_warnings(means)
        kept = means.get("ssl_spcl_kept", float("nan"))
        if kept < GATE_MINIMUM:
            out.append(f"the self-paced weights keep {kept:.1%} of the positive pairs this epoch (age "
                       f"{means.get('ssl_spcl_age', float('nan')):.3g}): the contrastive term is nearly off; raise "
                       "spcl_age_begin")
        positives = means.get("ssl_spcl_positives", float("nan"))
        if positives == 0:
            out.append("no two rows of a batch shared a meta-label this epoch: the contrastive term had no positive "
                       "pair; use fewer spcl_position_bins, spcl_feature_pool='plane', or more unlabeled patches")
        elif positives > 1 - GATE_MINIMUM:
            out.append(f"{positives:.1%} of the pairs share their meta-label this epoch: it hardly separates "
                       "patches (does the patch cover the volume's first axis?); use 'plane' pooling or other "
                       "meta-labels")
        if means.get("ssl_stage", 0.0) == 1.0 and float(self.spcl_weight) > 0 and means.get("ssl_ramp", 0.0) >= 0.5:
            share = means.get("ssl_other_share", float("nan"))
            if share < NEGLIGIBLE_SHARE:
                out.append(f"beta L_SPCL is {share:.2g} of the supervised loss this epoch: the contrastive "
                           "regulariser is negligible")
        return out
