"""MLB-Seg host: per-voxel weights of two label maps (an initial model's labels and the enhanced pseudo-labels of
five geometric views) learned by a one-step look-ahead on the labeled batch, with view and EMA consistency."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from batchgenerators.utilities.file_and_folder_operations import isfile
from torch import nn
from torch.func import functional_call

from nnunet_ssl.compat.trainer import set_deep_supervision, unwrap
from nnunet_ssl.errors import SSLInputError
from nnunet_ssl.losses.consistency import confidence_stats, mse_consistency
from nnunet_ssl.losses.meta_reweight import (
    enhanced_labels,
    label_costs,
    labels_in_views,
    mean_ce,
    normalised_weights,
    sgd_lookahead,
    sgd_slopes,
    uniform_weights,
    view_consistency,
    voxel_meta_gradient,
)
from nnunet_ssl.parts.ema import ema_decay, ema_update, make_teacher
from nnunet_ssl.parts.ramps import sigmoid_rampup
from nnunet_ssl.parts.views import MLB_VIEWS, MLB_ZOOM_RANGE, VIEW_KINDS, View, draw_views
from nnunet_ssl.trainers.base import full_resolution, split_batch
from nnunet_ssl.trainers.hosts.mean_teacher import MeanTeacher
from nnunet_ssl.trainers.logs import GATE_MINIMUM
from nnunet_ssl.trainers.step import SSLStep

#: the look-ahead's parameter sets (``meta_scope``)
META_SCOPES = ("all", "decoder")
#: analytic cost of the decoder-only look-ahead's backward and tangent passes, as a share of the whole network's
#: (nnU-Net's U-Nets: the decoder holds about half of the convolutions' work)
DECODER_SHARE = 0.5


@dataclass
class BootstrapBatch:
    """What a bootstrapping step leaves on ``step.host_data`` for ``unsupervised_loss`` and tests."""

    #: the geometric views of this step (the same for every unlabeled image of the batch)
    views: list[View]
    #: the initial model's labels in every view, view-major (V U, *spatial)
    initial_labels: torch.Tensor
    #: the per-voxel weights of ``[c1; c2]`` (2, V U, *spatial), summing to 1 (or all zero)
    weights: torch.Tensor
    #: whether the weights come from a look-ahead (else uniform)
    meta_step: bool
    #: the PLE labels of the real step (V U, *spatial), set by ``unsupervised_loss``
    enhanced_labels: torch.Tensor | None = None


class MetaLearnedBootstrapping(MeanTeacher):
    """MLB-Seg: per-voxel weights of the initial labels and of the enhanced pseudo-labels, learned by a one-step
    look-ahead on clean labeled data, plus view and EMA consistency.

    Paper: Wei, Hu, Liu, Hu, Ding, Xu, Zhang, Lu, "Consistency-guided Meta-Learning for Bootstrapping
    Semi-Supervised Medical Image Segmentation", MICCAI 2023 (arXiv 2307.11604); official code aijinrjinr/MLB-Seg
    (``train.py``, ``dataloader.py``: 2D UNet++, one sigmoid channel, BCE). Learning to reweight: Ren, Zeng, Yang,
    Urtasun, ICML 2018.

    Stages, in one ``nnUNetv2_train`` run (the stage follows from ``ssl_step`` and ``bootstrap_start``, both in the
    checkpoint, so ``--c`` resumes either):

    0. Warm-up, ``T_0 = max(1, round(warmup_fraction T))`` steps: nnU-Net's supervised step on the labeled batch
       (lambda = 0). At its end the student is frozen as the *initial model* f_0 and copied into the EMA teacher.
       With ``initial_checkpoint`` (a supervised nnU-Net run's checkpoint of the same plans) there is no warm-up:
       the checkpoint's weights, segmentation heads included, become the student, f_0 and the teacher at the start.
    1. Bootstrapping. Per step, with labeled batch (x_l, y) (the meta set: clean labels) and unlabeled batch u:

       - views: ``A = (identity, zoom-in, zoom-out, zoom-out, flip)`` drawn once per step
         (:func:`~nnunet_ssl.parts.views.draw_views`), images ``A_k(u)``, a view-major batch of ``n = V U``
       - initial labels ``y~_k = argmax A_k(softmax f_0(u))`` (f_0 on the original patch, its probabilities mapped
         into each view, padding = background)
       - PLE: ``p_bar = sum_k m_k A_k^-1(softmax f(A_k u)) / sum_k m_k`` (m_k: the voxels view k shows), and
         ``y^_k = argmax A_k(p_bar)``, from the detached student
       - per-voxel costs ``c1 = CE(f(A_k u), y~_k)``, ``c2 = CE(f(A_k u), y^_k)``, ``c = [c1; c2]`` (2, n, *spatial)
       - ``L_aug = mean over ordered pairs i != j of MSE(p_i, A_i A_j^-1 p_j.detach())`` over the voxels both views
         show; ``L_ema = mean (softmax f(A_k u) - softmax f_theta'(A_k u + 0.02 N(0, 1)))^2``
       - look-ahead (every ``meta_every`` steps since the switch, on ``meta_scope``'s parameters theta):
         ``theta^(eps) = SGD(theta, grad [sum eps c + L_aug + L_ema])`` with the optimizer's learning rate,
         momentum buffer, Nesterov and weight decay, ``L_meta = mean CE(f_theta^(x_l), y)``, and
         ``g = dL_meta/d eps at 0 = (d theta^/d grad) * JVP_theta(c)[grad L_meta(theta^(0))]``
         (:mod:`nnunet_ssl.losses.meta_reweight`)
       - weights (the official 'org' rule) ``w = max(-g, 0) / (sum max(-g, 0) + 1e-10)`` over all voxels of both
         maps and all views; between look-aheads ``w = 1 / (2 n |voxels|)`` (uniform)
       - ``L = L_sup + lambda(t) (sum w c + L_aug + L_ema)``, then ``theta' <- alpha_t theta' + (1 - alpha_t)
         theta`` with ``alpha_t = min(1 - 1/(t + 1), 0.99)``, t counted from the switch, never reset.

    Scale: ``w`` sums to 1, so ``sum w c`` is a convex combination of per-voxel CEs, on the scale of one mean CE
    (uniform weights: the mean of the two maps' mean CE); no further factor. All SSL terms, the look-ahead
    included, run in float32 outside autocast.

    Multi-class: the official one sigmoid channel with per-pixel BCE becomes nnU-Net's softmax with per-voxel CE
    (the same loss for two classes); the labels are argmaxes (the official threshold at 0.5); ``eps`` and ``w``
    have one entry per voxel and label map, (2, n, *spatial), the official ``cat((cost1, cost2), dim=1)`` of one
    channel each; the MSE terms average over the C channels (equal to the official one-channel MSE for C = 2).
    Region-based (sigmoid) datasets are refused (argmax labels).

    Look-ahead cost settings: ``meta_every = k`` runs the look-ahead every k-th step (uniform weights between:
    the weights belong to this step's random patches and views, so the last ones cannot be reused);
    ``meta_scope = "decoder"`` puts only the decoder's parameters in theta (the encoder is held fixed in the
    virtual step: the backward and tangent passes stop at the decoder). Both approximate the paper; neither is in
    it. Measured on CPU (synthetic 3D patches 16 x 32 x 32, B = U = 2, 5 views, one step of each case per round),
    per step against nnU-Net's supervised step: bootstrapping without a look-ahead 7.2x, with one every step over
    all parameters 17.9x, over the decoder 15.1x (:meth:`compute_units`: 8, 19 and 15.3). Memory: the real step's
    forward holds B + V U samples (12 with nnU-Net's 3D batch of 2; 7 in the paper preset), the look-ahead one
    pass of V U at a time.

    DDP: every rank computes the weights of its own batch from its own labeled batch (the look-ahead runs on the
    unwrapped module, without gradient synchronisation; the official code has one GPU); the real step goes through
    DDP, so the students stay identical, and with them the teacher and the initial model.

    torch.compile and AMP: the real step is nnU-Net's (compiled student, autocast, GradScaler); the look-ahead
    calls ``torch.func.functional_call`` on the plain module behind DDP and compile (``compat.trainer.unwrap``),
    eagerly, in float32, and leaves that module's parameters as they were, so the compiled graph is unaffected.

    Presets (``preset``, or ``nnUNet_ssl_preset``):

    - ``"paper"``: lambda = 1 without ramp, one unlabeled image per step (the official training batch of 1 with its
      5 views; the meta batch is nnU-Net's labeled batch, the official 2), look-ahead every step on all parameters,
      EMA 0.99, teacher noise 0.02, zoom margins 4-30 of 144 voxels per side. Under DDP the unlabeled batch is
      split over the GPUs like nnU-Net's: raise it to their number (``nnUNet_ssl_settings='unlabeled_batch_size=N'``).
    - ``"default"``: the same, with nnU-Net's unlabeled batch (the labeled batch size) and the common sigmoid ramp
      of lambda over 20 % of the iterations, counted from the switch (the weighted CE pulls towards the initial
      model's labels, which are poorest right after the warm-up).

    Deviations from the paper and the official code, and why:

    - The EMA teacher is never reset: the official ``update_ema_variables(..., i)`` passes the batch index within
      the epoch, so ``alpha = 0`` at index 0 copies the student into the teacher every epoch (a bug).
    - One optimizer step per iteration: the official second step on the meta batch (``CE + L_aug + L_ema`` of the
      meta images) is nnU-Net's supervised loss in the same step (``L_sup``, deep-supervised Dice + CE), without
      view consistency on the labeled images (5 more student passes per labeled image); hence one EMA update per
      step (the official two), and nnU-Net's optimizer, poly schedule and gradient clipping at 12 (official SGD
      0.005, momentum 0.9, ``20 / (epoch + 20)``, clipping at 0.2).
    - The initial labels come from a frozen copy of the warmed-up student, predicted on the fly (nnU-Net's patches
      are random crops), not from stored predictions of a separately trained model; ``initial_checkpoint`` is the
      official ``--checkpoint``. nnU-Net's ``-pretrained_weights`` cannot serve as the initial model: it leaves
      the segmentation heads out (``load_pretrained_weights`` skips ``.seg_layers.``), so it only initialises the
      student before the warm-up.
    - The warm-up length is not in the paper (the official model is trained beforehand): 20 % of the iterations.
    - The meta loss is the mean CE on nnU-Net's labeled batch as its augmentation left it (the official: BCE on the
      5 views of 2 meta images): 5 times cheaper.
    - The meta-gradient is the same quantity computed without differentiating through the optimizer (a JVP after
      one backward, instead of ``higher``'s double backward).
    - PLE averages each voxel over the views that show it (the official pads a zoom-in's missing border with zeros,
      i.e. background votes); L_aug compares only voxels both views show (the official compares the padding with
      zeros) and over ordered pairs, each view pulled towards every other (the official loop sends the gradient to
      the lower-indexed view of each pair only).
    - The views are made from nnU-Net's augmented unlabeled patch (``view0``: its spatial and intensity
      augmentation), on the device, with ``torch.nn.functional.interpolate`` (official: cv2 on the CPU).
    - One draw of the views per step for the whole unlabeled batch (the official batch is one image); zoom margins
      as fractions of each axis, continuous (official: 4, 6, ..., 30 pixels of 144); flips over any non-empty set
      of spatial axes (3 choices in 2D, 7 in 3D).
    - The consistency and cost terms use the full-resolution output only (deep supervision applies to L_sup).
    """

    paper_settings = {"unsupervised_weight": 1.0, "rampup_fraction": 0.0, "unsupervised_share": None,
                      "calibrate_reference": False, "unlabeled_batch_size": 1, "meta_every": 1, "meta_scope": "all",
                      "ema_max_decay": 0.99, "teacher_noise_std": 0.02, "view_kinds": MLB_VIEWS,
                      "zoom_range": MLB_ZOOM_RANGE, "warmup_fraction": 0.2}
    unsupervised_weight = 1.0
    rampup_fraction = 0.2
    view_intensity = (True,)
    needs_argmax_labels = True
    ema_max_decay = 0.99
    #: std of the Gaussian noise added to the teacher's views (official 0.02, not clipped)
    teacher_noise_std: float = 0.02
    #: share of the iterations spent in the supervised warm-up that yields the initial model
    warmup_fraction: float = 0.2
    #: a supervised nnU-Net checkpoint of the same plans: the initial model, the student and the teacher at the start
    #: (no warm-up); set it with nnUNet_ssl_settings="initial_checkpoint='/path/checkpoint_final.pth'"
    initial_checkpoint: str | None = None
    #: k: the look-ahead runs every k-th step (uniform weights between)
    meta_every: int = 1
    #: "all": every parameter in the look-ahead; "decoder": only the decoder's (nnU-Net's U-Nets)
    meta_scope: str = "all"
    #: the geometric views (kinds of :mod:`nnunet_ssl.parts.views`), at least two
    view_kinds: tuple[str, ...] = MLB_VIEWS
    #: per-side zoom margin, as a fraction of each axis, drawn uniformly from this range
    zoom_range: tuple[float, float] = MLB_ZOOM_RANGE

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        if type(self).unsupervised_loss is not MetaLearnedBootstrapping.unsupervised_loss \
                or self.uses_labeled_reference:
            raise SSLInputError(f"{type(self).__name__}: MLB-Seg's loss is its own (weighted label costs, view and "
                                "EMA consistency); it takes no plug-in, train nnUNetTrainerMLBSeg")
        if not 0.0 <= float(self.warmup_fraction) < 1.0:
            raise SSLInputError(f"warmup_fraction={self.warmup_fraction!r} must be in [0, 1): the share of the "
                                "iterations spent in MLB-Seg's supervised warm-up")
        if float(self.warmup_fraction) == 0.0 and not self.initial_checkpoint:
            raise SSLInputError("warmup_fraction=0 leaves MLB-Seg without an initial model: keep a warm-up, or name a "
                                "supervised run's checkpoint with initial_checkpoint='/path/checkpoint_final.pth'")
        if self.initial_checkpoint and not isfile(str(self.initial_checkpoint)):
            raise SSLInputError(f"initial_checkpoint {self.initial_checkpoint!r} does not exist; name the "
                                "checkpoint_final.pth of a supervised nnU-Net run with the same plans")
        if not isinstance(self.meta_every, int) or self.meta_every < 1:
            raise SSLInputError(f"meta_every={self.meta_every!r} must be a positive integer (the look-ahead runs "
                                "every meta_every-th step)")
        if self.meta_scope not in META_SCOPES:
            raise SSLInputError(f"meta_scope={self.meta_scope!r} is unknown; use one of {', '.join(META_SCOPES)}")
        kinds = tuple(self.view_kinds)
        if len(kinds) < 2 or any(k not in VIEW_KINDS for k in kinds):
            raise SSLInputError(f"view_kinds={kinds!r} must name at least two views among {', '.join(VIEW_KINDS)}")
        low, high = (float(z) for z in self.zoom_range)
        if not 0.0 <= low <= high < 0.5:
            raise SSLInputError(f"zoom_range={self.zoom_range!r} must be (low, high) with 0 <= low <= high < 0.5: the "
                                "zoom margin per side as a fraction of each axis")
        #: the step at which bootstrapping began (None: still warming up)
        self.bootstrap_start: int | None = None

    # ------------------------------------------------------------------ stages
    @property
    def warmup_iterations(self) -> int:
        """T_0: the supervised warm-up steps (0 with an initial checkpoint, else at least 1)."""
        if self.initial_checkpoint:
            return 0
        return max(1, int(round(self.warmup_fraction * self.total_iterations)))

    def in_warmup(self) -> bool:
        return self.bootstrap_start is None and self.ssl_step < self.warmup_iterations

    def ramp(self) -> float:
        """0 in the warm-up; then the sigmoid ramp counted from the switch."""
        if self.in_warmup():
            return 0.0
        # train_step asks before forward_losses switches: the switch is this step
        start = self.warmup_iterations if self.bootstrap_start is None else self.bootstrap_start
        return sigmoid_rampup(self.ssl_step - start, self.rampup_fraction * self.total_iterations)

    def meta_step_due(self) -> bool:
        return (self.ssl_step - (self.bootstrap_start or 0)) % self.meta_every == 0

    def start_bootstrapping(self) -> None:
        """f_0 and the teacher <- the student; bootstrapping starts at this step."""
        student = unwrap(self.network)
        self.initial_model.load_state_dict(student.state_dict())
        self.teacher.load_state_dict(student.state_dict())
        self.bootstrap_start = self.ssl_step
        self.print_to_log_file(f"MLB-Seg: the initial model and the teacher start from the student at step "
                               f"{self.ssl_step}", also_print_to_console=True)

    # ------------------------------------------------------------------ hooks
    def build_ssl_modules(self) -> None:
        super().build_ssl_modules()
        self.initial_model = make_teacher(unwrap(self.network))
        self.lookahead_parameters()  # refuses a decoder scope the network does not have, before training

    def set_deep_supervision_enabled(self, enabled: bool) -> None:
        super().set_deep_supervision_enabled(enabled)
        if getattr(self, "initial_model", None) is not None:
            set_deep_supervision(self.initial_model, enabled)

    def sync_reference_from_student(self) -> None:
        """Fresh start: with ``initial_checkpoint`` its weights (heads included) become the student's; the teacher
        and the initial model start from the student (again at the switch)."""
        if self.initial_checkpoint:
            self.load_initial_checkpoint(str(self.initial_checkpoint))
        super().sync_reference_from_student()
        self.initial_model.load_state_dict(unwrap(self.network).state_dict())

    def load_initial_checkpoint(self, path: str) -> None:
        checkpoint = torch.load(path, map_location=self.device, weights_only=False)
        weights = checkpoint.get("network_weights", checkpoint) if isinstance(checkpoint, dict) else None
        student = unwrap(self.network)
        expected = student.state_dict()
        if not isinstance(weights, dict) or set(weights) != set(expected) \
                or any(tuple(weights[k].shape) != tuple(v.shape) for k, v in expected.items()):
            raise SSLInputError(f"initial_checkpoint {path} does not hold this network's weights (keys or shapes "
                                "differ); name the checkpoint of a supervised nnU-Net run with the same plans and "
                                "configuration")
        student.load_state_dict(weights)
        self.print_to_log_file(f"MLB-Seg: initial model, student and teacher from {path}", also_print_to_console=True)

    def lookahead_parameters(self) -> dict[str, nn.Parameter]:
        """theta of the look-ahead: every parameter, or the decoder's (``meta_scope``)."""
        named = dict(unwrap(self.network).named_parameters())
        if self.meta_scope == "all":
            return named
        scope = {k: p for k, p in named.items() if k.startswith("decoder.")}
        if not scope:
            raise SSLInputError(f"meta_scope='decoder' needs a network with a 'decoder' module (nnU-Net's U-Nets); "
                                f"{type(unwrap(self.network)).__name__} has none: use meta_scope='all'")
        return scope

    def after_optimizer_step(self) -> None:
        if self.bootstrap_start is not None:
            # t counts the updates since the teacher started from the student, never reset
            ema_update(self.teacher, unwrap(self.network),
                       ema_decay(self.ssl_step - self.bootstrap_start, self.ema_max_decay))

    # ------------------------------------------------------------------ the step
    def forward_losses(self, step: SSLStep) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        if self.in_warmup():
            return self.warmup_losses(step)
        if self.bootstrap_start is None:
            self.start_bootstrapping()
        return self.bootstrap_losses(step)

    def warmup_losses(self, step: SSLStep) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        """Stage 0: nnU-Net's supervised step."""
        with self._autocast():
            sup_loss = self.loss(self.network(step.data), step.target)
        return sup_loss, sup_loss.new_zeros((), dtype=torch.float32), {"stage": 0.0}

    def draw_views(self, spatial: tuple[int, ...]) -> list[View]:
        return draw_views(self.view_kinds, spatial, tuple(self.zoom_range))

    def bootstrap_losses(self, step: SSLStep) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        """Stage 1 (see the class docstring)."""
        unlabeled = step.views["view0"]
        views = self.draw_views(tuple(unlabeled.shape[2:]))
        images = torch.cat([v.forward(unlabeled) for v in views])
        step.student_image = images
        step.reference_image = images + self.teacher_noise_std * torch.randn_like(images)
        with torch.no_grad():
            with self._autocast():
                teacher_logits = full_resolution(self.teacher(step.reference_image))
                initial_logits = full_resolution(self.initial_model(unlabeled))
            teacher_logits = teacher_logits.float()
            initial_labels = labels_in_views(torch.softmax(initial_logits.float(), 1), views)
        meta = self.meta_step_due()
        stats: dict[str, float] = {"stage": 1.0, "meta_step": float(meta)}
        with self._no_autocast():
            if meta:
                weights, meta_stats = self.meta_weights(step, views, images, initial_labels, teacher_logits)
                stats.update(meta_stats)
            else:
                weights = uniform_weights((2, *initial_labels.shape), device=images.device)
        step.host_data = BootstrapBatch(views=views, initial_labels=initial_labels, weights=weights, meta_step=meta)
        n_labeled = step.data.shape[0]
        with self._autocast():
            output = self.network(torch.cat([step.data, images]))
            out_labeled, out_unlabeled = split_batch(output, n_labeled)
            sup_loss = self.loss(out_labeled, step.target)
        with self._no_autocast():
            unsup_loss, loss_stats = self.unsupervised_loss(full_resolution(out_unlabeled).float(), teacher_logits,
                                                            step)
            stats = {**confidence_stats(teacher_logits, self.confidence_threshold), **stats, **loss_stats}
        return sup_loss, unsup_loss, stats

    def unsupervised_loss(self, student_logits, reference_logits, step):
        """``sum w [c1; c2] + L_aug + L_ema`` of the student's views against the initial labels, its own PLE labels
        and the teacher's views (``step.host_data``)."""
        batch: BootstrapBatch = step.host_data
        enhanced, _ = enhanced_labels(torch.softmax(student_logits.detach(), 1), batch.views)
        batch.enhanced_labels = enhanced
        costs = label_costs(student_logits, batch.initial_labels, enhanced)
        weighted = (batch.weights * costs).sum()
        aug = view_consistency(student_logits, batch.views)
        ema = mse_consistency(student_logits, reference_logits)
        stats = {"weighted_ce": float(weighted.detach()), "view_consistency": float(aug.detach()),
                 "ema_consistency": float(ema.detach()),
                 "ple_agreement": float((enhanced == batch.initial_labels).float().mean())}
        return weighted + aug + ema, stats

    def meta_weights(self, step: SSLStep, views: list[View], images: torch.Tensor, initial_labels: torch.Tensor,
                     teacher_logits: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """The look-ahead (float32, outside autocast, on the plain module): ``w`` from ``g`` and its statistics."""
        network = unwrap(self.network)
        scope = self.lookahead_parameters()
        fixed = {k: p.detach() for k, p in network.named_parameters() if k not in scope}
        params = {k: p.detach().requires_grad_(True) for k, p in scope.items()}

        def logits_of(theta: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
            # tie_weights=False: nnU-Net's conv blocks reach each conv twice (``conv`` and ``all_modules.0``); with
            # the default, torch swaps the aliases one after the other and restores them out of order, leaving our
            # tensors in the module instead of its parameters (torch 2.14)
            return full_resolution(functional_call(network, {**fixed, **theta}, (x.float(),),
                                                   tie_weights=False)).float()

        logits = logits_of(params, images)
        enhanced, _ = enhanced_labels(torch.softmax(logits.detach(), 1), views)
        inner = view_consistency(logits, views) + mse_consistency(logits, teacher_logits)
        labels = full_resolution(step.target)[:, 0]
        ignore = self.label_manager.ignore_label
        g, clean = voxel_meta_gradient(
            costs=lambda theta: label_costs(logits_of(theta, images), initial_labels, enhanced),
            meta_loss=lambda theta: mean_ce(logits_of(theta, step.data), labels, ignore),
            params=params, inner_loss=inner,
            lookahead=lambda theta, grads: sgd_lookahead(theta, grads, scope, self.optimizer),
            slopes=sgd_slopes(scope, self.optimizer))
        weights = normalised_weights(g)
        total = float(weights.sum())
        return weights, {"meta_loss": float(clean), "weighted_fraction": float((weights > 0).float().mean()),
                         "weight_initial": float(weights[0].sum()) / total if total > 0 else float("nan")}

    # ------------------------------------------------------------------ state, cost, logs
    def ssl_state_dict(self) -> dict:
        return {**super().ssl_state_dict(), "initial_weights": self.initial_model.state_dict(),
                "bootstrap_start": -1 if self.bootstrap_start is None else int(self.bootstrap_start)}

    def load_ssl_state_dict(self, state: dict) -> None:
        super().load_ssl_state_dict(state)
        self.initial_model.load_state_dict(state["initial_weights"])
        start = int(state["bootstrap_start"])
        self.bootstrap_start = None if start < 0 else start

    @classmethod
    def compute_units(cls, labeled_batch: int, unlabeled_batch: int) -> float:
        """Per step, averaged over the schedule, with ``n = V U`` view images: warm-up ``3 B``; bootstrapping the
        student's forward and backward on B + n (``3 (B + n)``), the teacher on n, the initial model on U, and
        every ``meta_every``-th step the look-ahead: forward and backward on the n views (inner gradient), on the B
        labeled images at theta^ (meta gradient), and the JVP of the costs on the n views (measured about a forward
        and backward): ``6 n + 3 B``; with ``meta_scope = "decoder"`` the backward and tangent parts count
        ``DECODER_SHARE`` of the network: ``n (2 + 4 s) + B (1 + 2 s)``."""
        b, n = labeled_batch, len(cls.view_kinds) * unlabeled_batch
        s = DECODER_SHARE if cls.meta_scope == "decoder" else 1.0
        lookahead = 2 * n * (1 + 2 * s) + b * (1 + 2 * s)
        stage1 = 3 * (b + n) + n + unlabeled_batch + lookahead / cls.meta_every
        f = 0.0 if cls.initial_checkpoint else float(cls.warmup_fraction)
        return f * 3 * b + (1.0 - f) * stage1

    def ssl_log_keys(self) -> list[str]:
        return [*super().ssl_log_keys(), "ssl_stage", "ssl_meta_step", "ssl_meta_loss",
                "ssl_weighted_ce", "ssl_view_consistency", "ssl_ema_consistency", "ssl_weight_initial",
                "ssl_weighted_fraction", "ssl_ple_agreement"]

    def ssl_plot_panels(self) -> list[tuple[str, dict[str, str]]]:
        return [*super().ssl_plot_panels(),
                ("MLB-Seg terms (before lambda)", {"sum w c (weighted CE)": "ssl_weighted_ce",
                                                   "L_aug (views)": "ssl_view_consistency",
                                                   "L_ema (teacher)": "ssl_ema_consistency"}),
                ("MLB-Seg weights", {"share of weight on the initial labels": "ssl_weight_initial",
                                     "voxel-map pairs with weight > 0": "ssl_weighted_fraction",
                                     "PLE label = initial label": "ssl_ple_agreement"})]

    def mechanism_warnings(self, means: dict[str, float]) -> list[str]:
        out = super().mechanism_warnings(means)
        kept = means.get("ssl_weighted_fraction", float("nan"))
        if not math.isnan(kept) and kept < GATE_MINIMUM:
            out.append(f"the meta-learned weights keep only {kept:.1%} of the voxel-label pairs this epoch (the "
                       "others have a non-negative meta-gradient): the weighted CE drops nearly everything")
        return out
