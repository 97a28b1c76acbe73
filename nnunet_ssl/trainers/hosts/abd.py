"""ABD and CAD hosts: two networks on a weak and a strong view, cross pseudo-supervision on the plain views and on
views whose least confident region was displaced by confident content of the other view."""

from __future__ import annotations

import torch

from nnunet_ssl.data.unlabeled_loader import StrongIntensity, split_transforms
from nnunet_ssl.errors import SSLInputError
from nnunet_ssl.losses.consistency import confidence_stats
from nnunet_ssl.losses.copy_paste import region_dice, region_dice_ce
from nnunet_ssl.parts.displacement import (
    Displacement,
    abd_i,
    abd_r,
    cad_llcr,
    confidence_map,
    linear_schedule,
    make_grid,
)
from nnunet_ssl.trainers.base import full_resolution, split_batch
from nnunet_ssl.trainers.hosts.two_networks import TwoNetworks, mean_stats
from nnunet_ssl.trainers.step import SSLStep

#: the official cross-teaching script stops ABD-I after 20,000 of its 30,000 iterations
OFFICIAL_ABD_I_FRACTION = 20000 / 30000


class AdaptiveBidirectionalDisplacement(TwoNetworks):
    """ABD: two networks, one on a weak and one on a strong view, teach each other on the plain views and on views
    where each one's least confident patch was displaced by a confident patch of the other (ABD-R); on labeled
    images the most confident patch is displaced by the other view's least confident one, labels moved along (ABD-I).

    Paper: Chi, Pang, Zhang, Liu, "Adaptive Bidirectional Displacement for Semi-Supervised Medical Image
    Segmentation", CVPR 2024; official code chy-upc/ABD, cross-teaching variant (read:
    ``code/train_ACDC_Cross_Teaching.py``, ``code/utils/displacement.py``, ``code/dataloaders/dataset.py``).

    Per step, labeled images x (labels y) and unlabeled patches as two aligned views, u_w (weak) and u_s (strong):

    - network 1 predicts ``p1 = f1(cat(x, u_w))``, network 2 ``p2 = f2(cat(x_s, u_s))``; ``x_s`` is x after the strong
      intensity augmentation (:class:`~nnunet_ssl.data.unlabeled_loader.StrongIntensity`, applied on the CPU to the
      already augmented labeled batch, same labels y): network 2 sees strong labeled images as in the official
      ``image_strong``
    - ``L_sup = DC+CE(f1(x), y) + DC+CE(f2(x_s), y)``, nnU-Net's deep-supervised loss
    - ``L_cps = D(p1(u_w), argmax p2(u_s)) + D(p2(u_s), argmax p1(u_w))``, D the soft Dice of SSL4MIS (all classes
      with background, sums over the batch, the official ``DiceLoss``), each target detached, routed through
      ``unsupervised_loss`` with ``step.direction`` 0 (network 1 learns) and 1 (network 2 learns)
    - ABD-R (:func:`~nnunet_ssl.parts.displacement.abd_r`): each view cut into a grid of ``abd_grid`` equal cells
      per axis, a cell's confidence the mean max-softmax of its view's network; per sample, u_w's least confident
      cell b gets a cell c of u_s and u_s's least confident cell d a cell a of u_w; with probability
      ``abd_kl_probability`` the source is, of the ``abd_top_k`` most confident cells of the other view, the one
      whose mean class distribution q is closest to the replaced cell's p (``argmin KL(p || q)``), else the other
      view's most confident cell. Both displaced images ``r = (r_w, r_s)`` go through both networks:
      ``L_cps,ABD = D(f1(r), argmax f2(r)) + D(f2(r), argmax f1(r))``, routed like L_cps
    - ABD-I (:func:`~nnunet_ssl.parts.displacement.abd_i`), with probability ``abd_i_probability`` per sample: x's
      most confident cell gets x_s's least confident cell and x_s's most confident cell gets x's least confident one,
      labels moved with the same cells; both networks on both images ``i = (i_w, i_s)`` with labels ``y_i``:
      ``L_ABD-I = (DC+CE)/2 (f1(i), y_i) + (DC+CE)/2 (f2(i), y_i)`` (the official loss3 + loss4, SSL4MIS Dice and
      CE, full resolution), during the first ``abd_i_fraction`` of training
    - ``L = L_sup + abd_i_weight L_ABD-I + lambda(t) (L_cps + L_cps,ABD)``; ``abd_i_weight L_ABD-I`` is a constant
      term (``step.add_constant_loss``), every loss term in float32 outside autocast.

    The sum over both networks is the official ``model1_loss + model2_loss``; each network gets the gradient of its
    own terms only (the targets are detached). Network 2, its optimizer and ``checkpoint_final_net2.pth``:
    :class:`~nnunet_ssl.trainers.hosts.two_networks.TwoNetworks`. A plug-in that replaces ``unsupervised_loss``
    (MetaSSL) replaces every cross term, plain and displaced; its labeled branch reads the plain labeled outputs
    (``f1(x)`` against ``f2(x_s)`` and back).

    Logged: ``ssl_displaced_fraction`` (share of the unlabeled voxels replaced, both views), ``ssl_kl_branch``
    (share of samples that took the KL branch), ``ssl_abd_i_fraction`` (share of labeled voxels displaced),
    ``ssl_abd_i_active`` (1 while ABD-I trains) and ``ssl_abd_i_loss`` (``L_ABD-I`` before its weight).

    Presets (``preset``, or ``nnUNet_ssl_preset``):

    - ``"paper"``: the official cross-teaching script: ``lambda(t) = 0.1 exp(-5 (1 - t/T_r)^2)`` with
      ``T_r = 200 x 150 = 30,000`` iterations, the whole training (``rampup_fraction = 1``); a 4 x 4 grid (4 cells per
      axis, also in 3D), top 4, the KL branch always (the cross-teaching ``ABD_R`` has no random branch), ABD-I with
      probability 0.5 and weight 2 during the first 20,000 of 30,000 iterations; the weak view is nnU-Net's geometric
      augmentation only (the official weak view is rotation/flip), ``view_intensity = (False, "strong")``.
    - ``"default"``: lambda 0.1 after the common 20 % ramp (the CPS host's schedule: the official ramp over the whole
      run keeps lambda under 0.03 for the first half of an nnU-Net run, where the cross terms should already act);
      ``abd_grid = None``: 4 cells per axis in 2D (the official 16 cells, one cell 1/16 of the patch) and 3 in 3D
      (27 cells, one 1/27 of the patch; 4 per axis would displace 1/64, and the displaced images would nearly
      repeat the plain ones); the KL branch with probability 0.5 (the paper's "adaptive" choice between the
      distribution-matched and the most confident patch, as the official BCP variant ``ABD_R_BCP``); the weak view
      with nnU-Net's intensity augmentation (``(True, "strong")``) like the labeled batch network 1 also sees.
      ABD-I as in the paper preset.

    Deviations from the official code, and why:

    - L_sup is nnU-Net's deep-supervised Dice + CE (official (CE + Dice)/2 at one resolution); the cross terms and
      ABD-I use the full-resolution output (the displaced labels exist at full resolution only).
    - Two nnU-Nets of the same architecture (``second_network = "same"``; ``"other_unet"`` for nnU-Net's other U-Net)
      instead of a U-Net and a Swin-UNet with ImageNet weights: defined for 2D and 3D and any input size.
    - Views: nnU-Net's spatial augmentation shared by both views; the strong view is
      :class:`~nnunet_ssl.data.unlabeled_loader.StrongIntensity` instead of cutout plus colour jitter on 2D slices.
      The strong labeled copy applies it on top of nnU-Net's intensity augmentation of the labeled batch (the labeled
      loader has no weak/strong split); ``abd_strong_labeled = False`` gives network 2 the labeled batch unchanged.
    - Grid: any patch size, cells of ``n // g`` voxels centred in the patch, the remainder in no cell
      (:mod:`nnunet_ssl.parts.displacement`); the official code needs sizes that divide.
    - Official bugs fixed: ABD-R loops over ``labeled_bs`` samples to index the unlabeled ones (right only when the
      two batches have the same size; here every unlabeled sample); both directions read the original views (the
      official code writes view 1's cell and then reads view 1 for view 2's source, read-after-write when the two
      cells coincide); a cell's class distribution is the mean softmax of its voxels (the official code softmaxes the
      cell's mean logits and then, in ``kl_div``, applies a second softmax to those probabilities: the distributions
      compared were flattened towards uniform); top-k is capped at the number of cells.
    - The KL direction is the official ``kl_div(q.log(), p)`` = ``KL(p || q)``, p the replaced cell, q a candidate.
    - ABD-I's labels: both views have the same labels (nnU-Net's labeled batch), so ``y_i`` is y with the cells
      moved as in the images; the official ``label_batch_strong`` is the same label array.
    - Random draws (branches, ABD-I) from each process's own generator (torch's global one, seeded by nnU-Net per
      rank), one per sample: DDP ranks draw independently, nothing is decided across ranks.
    - The displacement reads each network's confidence after its temperature when ``calibrate_reference`` is on
      (MetaSSL's default preset), else the raw softmax as the official code.
    - nnU-Net's poly learning rate per epoch and its optimizer (SGD 0.01, Nesterov), nnU-Net's checkpoints: the
      official code keeps the best model by validation Dice.
    """

    paper_settings = {"unsupervised_weight": 0.1, "rampup_fraction": 1.0, "unsupervised_share": None,
                      "calibrate_reference": False, "view_intensity": (False, "strong"), "abd_grid": 4,
                      "abd_top_k": 4, "abd_kl_probability": 1.0, "abd_i_probability": 0.5, "abd_i_weight": 2.0,
                      "abd_i_fraction": OFFICIAL_ABD_I_FRACTION, "abd_strong_labeled": True}
    unsupervised_weight = 0.1
    rampup_fraction = 0.2
    #: view0: weak (network 1), view1: strong (network 2), geometrically aligned
    view_intensity = (True, "strong")
    needs_argmax_labels = True
    reference_name = "network 2"
    #: cells per axis (int, or one per spatial axis); None = 4 in 2D, 3 in 3D
    abd_grid: int | tuple[int, ...] | None = None
    #: ABD-R: the KL branch chooses among this many most confident cells of the other view
    abd_top_k: int = 4
    #: ABD-R: probability per sample of the KL branch (else the most confident cell)
    abd_kl_probability: float = 0.5
    #: ABD-I: probability per sample of displacing the labeled images
    abd_i_probability: float = 0.5
    #: ABD-I: weight of its (Dice + CE)/2 term, constant (not lambda)
    abd_i_weight: float = 2.0
    #: ABD-I trains during this share of all iterations (official 20,000 of 30,000)
    abd_i_fraction: float = OFFICIAL_ABD_I_FRACTION
    #: network 2's labeled images get the strong intensity augmentation on the CPU
    abd_strong_labeled: bool = True

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.check_displacement_settings()
        self._strong_labeled: StrongIntensity | None = None

    # ------------------------------------------------------------------ settings
    def check_displacement_settings(self) -> None:
        """One clear line for each bad setting."""
        views = tuple(self.view_intensity)
        if len(views) != 2:
            raise SSLInputError(f"view_intensity={views!r} must name two views (weak for network 1, strong for "
                                "network 2), e.g. (True, 'strong')")
        for name in ("abd_kl_probability", "abd_i_probability", "abd_i_fraction"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
                raise SSLInputError(f"{name}={value!r} must be a number in [0, 1]")
        if not isinstance(self.abd_i_weight, (int, float)) or self.abd_i_weight < 0:
            raise SSLInputError(f"abd_i_weight={self.abd_i_weight!r} must be a number >= 0 (2 in ABD)")
        if not isinstance(self.abd_top_k, int) or self.abd_top_k < 1:
            raise SSLInputError(f"abd_top_k={self.abd_top_k!r} must be a whole number >= 1 (4 in ABD)")
        grid = self.abd_grid
        if grid is not None:
            values = (grid,) if isinstance(grid, int) else tuple(grid) if isinstance(grid, (tuple, list)) else ()
            if not values or not all(isinstance(g, int) and g >= 1 for g in values):
                raise SSLInputError(f"abd_grid={grid!r} must be a whole number of cells per axis >= 1, one per "
                                    "spatial axis, or None (4 in 2D, 3 in 3D)")
        patch = tuple(self.configuration_manager.patch_size)
        try:
            grid = make_grid(patch, self.displacement_grid())
        except ValueError as e:
            raise SSLInputError(f"abd_grid={self.abd_grid!r}: {e}; set abd_grid to at most the patch size per "
                                "axis") from None
        if grid.count < 2:
            raise SSLInputError(f"abd_grid={self.abd_grid!r} gives one cell: the displacement would replace the "
                                "whole patch; use at least 2 cells along some axis")

    def displacement_grid(self) -> int | tuple[int, ...]:
        """Cells per axis: ``abd_grid``, or 4 in 2D and 3 in 3D."""
        if self.abd_grid is not None:
            return self.abd_grid if isinstance(self.abd_grid, int) else tuple(self.abd_grid)
        return 4 if len(self.configuration_manager.patch_size) == 2 else 3

    def abd_i_active(self) -> bool:
        """ABD-I trains during the first ``abd_i_fraction`` of all iterations (follows ``ssl_step``: resumes)."""
        return self.abd_i_weight > 0 and self.ssl_step < self.abd_i_fraction * self.total_iterations

    # ------------------------------------------------------------------ views
    def strong_labeled(self, data: torch.Tensor) -> torch.Tensor:
        """Network 2's labeled images: the strong intensity augmentation of each already augmented labeled patch,
        on the CPU (the trainer's intensity transforms, as the unlabeled loader's strong view)."""
        if not self.abd_strong_labeled:
            return data
        if self._strong_labeled is None:
            rotation, dummy_2d, _, mirror_axes = self.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
            pipeline = self.get_training_transforms(
                self.configuration_manager.patch_size, rotation, None, mirror_axes, dummy_2d,
                use_mask_for_norm=self.configuration_manager.use_mask_for_norm, is_cascaded=False,
                foreground_labels=self.label_manager.foreground_labels, regions=None,
                ignore_label=self.label_manager.ignore_label)
            self._strong_labeled = StrongIntensity(split_transforms(pipeline)[1])
        with torch.no_grad():
            cpu = data.detach().float().cpu()
            strong = torch.stack([self._strong_labeled(image=x.clone())["image"] for x in cpu])
        return strong.to(device=data.device, dtype=data.dtype)

    # ------------------------------------------------------------------ displacement
    def displace_unlabeled(self, weak: torch.Tensor, strong: torch.Tensor, probs1: torch.Tensor,
                           probs2: torch.Tensor) -> tuple[Displacement, dict[str, float]]:
        """ABD-R (CAD overrides it with its own rule); returns the displacement and its statistics."""
        displaced = abd_r(weak, strong, probs1, probs2, self.displacement_grid(), self.abd_top_k,
                          float(self.abd_kl_probability))
        return displaced, {"displaced_fraction": displaced.fraction,
                           "kl_branch": float(displaced.kl_branch.float().mean())}

    def displace_labeled(self, data: torch.Tensor, data_strong: torch.Tensor, labels: torch.Tensor,
                         probs1: torch.Tensor, probs2: torch.Tensor) -> Displacement:
        return abd_i(data, data_strong, labels, labels, confidence_map(probs1), confidence_map(probs2),
                     self.displacement_grid(), float(self.abd_i_probability))

    # ------------------------------------------------------------------ losses
    def unsupervised_loss(self, student_logits, reference_logits, step):
        """The official cross pseudo-supervision: SSL4MIS's soft Dice of the student against the reference's
        argmax (all classes with background, sums over the batch)."""
        labels = reference_logits.detach().argmax(1)
        everywhere = torch.ones(student_logits.shape[2:], dtype=torch.bool, device=student_logits.device)
        return region_dice(student_logits, labels, everywhere), {}

    def abd_i_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(Dice + CE)/2 of one network on the ABD-I images (voxels of nnU-Net's ignore label left out)."""
        ignore = self.label_manager.ignore_label
        region = torch.ones_like(labels, dtype=torch.bool) if ignore is None else labels != ignore
        return region_dice_ce(logits, torch.where(region, labels, torch.zeros_like(labels)), region)

    def forward_losses(self, step: SSLStep) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        n_labeled = step.data.shape[0]
        weak, strong = step.views["view0"], step.views["view1"]
        data_strong = self.strong_labeled(step.data)
        step.student_image, step.reference_image = weak, strong
        with self._autocast():
            out1 = self.network(torch.cat([step.data, weak], 0))
            out2 = self.network2(torch.cat([data_strong, strong], 0))
            lab1, _ = split_batch(out1, n_labeled)
            lab2, _ = split_batch(out2, n_labeled)
            sup_loss = self.loss(lab1, step.target) + self.loss(lab2, step.target)
        with self._no_autocast():
            logits1, logits2 = full_resolution(out1).float(), full_resolution(out2).float()
            with torch.no_grad():
                probs1 = torch.softmax(self.calibrated(logits1.detach(), 0), 1)
                probs2 = torch.softmax(self.calibrated(logits2.detach(), 1), 1)
                labels = full_resolution(step.target)
                images, stats = [], {}
                labeled_displacement = None
                if self.abd_i_active():
                    labeled_displacement = self.displace_labeled(step.data, data_strong, labels,
                                                                 probs1[:n_labeled], probs2[:n_labeled])
                    images += labeled_displacement.images
                displaced, displaced_stats = self.displace_unlabeled(weak, strong, probs1[n_labeled:],
                                                                     probs2[n_labeled:])
                images += displaced.images
        with self._autocast():
            x = torch.cat(images, 0)
            d1, d2 = full_resolution(self.network(x)), full_resolution(self.network2(x))
        with self._no_autocast():
            d1, d2 = d1.float(), d2.float()
            m = 2 * n_labeled if labeled_displacement is not None else 0
            plain, plain_stats = self.mutual_loss([logits1[n_labeled:], logits2[n_labeled:]],
                                                  [logits1[:n_labeled], logits2[:n_labeled]], step)
            cross, cross_stats = self.cross_loss(d1[m:], d2[m:], step)
            unsup_loss = plain + cross
            stats = {**mean_stats([plain_stats, cross_stats]), **displaced_stats, "abd_i_active": 0.0,
                     "abd_i_fraction": 0.0, "cps_displaced_loss": float(cross.detach())}
            if labeled_displacement is not None:
                y = torch.cat(labeled_displacement.labels, 0)[:, 0].long()
                abd_i_term = self.abd_i_loss(d1[:m], y) + self.abd_i_loss(d2[:m], y)
                step.add_constant_loss(float(self.abd_i_weight) * abd_i_term)
                stats.update(abd_i_active=1.0, abd_i_fraction=labeled_displacement.fraction,
                             abd_i_loss=float(abd_i_term.detach()))
            confidence = mean_stats([confidence_stats(self.calibrated(logits2[n_labeled:].detach(), 1),
                                                      self.confidence_threshold),
                                     confidence_stats(self.calibrated(logits1[n_labeled:].detach(), 0),
                                                      self.confidence_threshold)])
        return sup_loss, unsup_loss, {**confidence, **stats}

    # ------------------------------------------------------------------ cost and logs
    @classmethod
    def compute_units(cls, labeled_batch: int, unlabeled_batch: int) -> float:
        """Each network forward and backward on the plain ``B + U`` images (``3 (B + U)``), on the ``2 U`` ABD-R
        images (``6 U``) and, during the first ``abd_i_fraction`` f of training, on the ``2 B`` ABD-I images
        (``6 f B``): ``2 (3 (B + U) + 6 U + 6 f B)``. The strong labeled copy (CPU augmentation) and the
        displacement itself are not counted."""
        f = float(cls.abd_i_fraction) if cls.abd_i_weight > 0 else 0.0
        return float(2 * (3 * (labeled_batch + unlabeled_batch) + 6 * unlabeled_batch + 6 * f * labeled_batch))

    def displacement_log_keys(self) -> list[str]:
        return ["ssl_displaced_fraction", "ssl_kl_branch"]

    def ssl_log_keys(self) -> list[str]:
        return [*super().ssl_log_keys(), *self.displacement_log_keys(), "ssl_cps_displaced_loss",
                "ssl_abd_i_active", "ssl_abd_i_fraction", "ssl_abd_i_loss"]

    def displacement_curves(self) -> dict[str, str]:
        return {"unlabeled voxels displaced (ABD-R)": "ssl_displaced_fraction",
                "samples with the KL branch": "ssl_kl_branch"}

    def ssl_plot_panels(self) -> list[tuple[str, dict[str, str]]]:
        return [*super().ssl_plot_panels(),
                ("displacement", {**self.displacement_curves(),
                                  "labeled voxels displaced (ABD-I)": "ssl_abd_i_fraction",
                                  "ABD-I active": "ssl_abd_i_active"}),
                ("displacement losses", {"cross Dice on displaced images (before lambda)": "ssl_cps_displaced_loss",
                                         "ABD-I (before its weight)": "ssl_abd_i_loss"})]


class ConfidenceAwareDisplacement(AdaptiveBidirectionalDisplacement):
    """CAD: ABD whose unlabeled displacement replaces the largest connected low-confidence region (LLCR), with the
    confidence threshold and the largest region size rising during training (DTE).

    Paper: Xiao et al., "Confidence-Aware Adaptive Displacement for Semi-Supervised Medical Image Segmentation",
    arXiv 2502.00536. **The code is not released**: LLCR and DTE are implemented from the paper's description, and
    the schedule is exposed as settings whose defaults are ours (below).

    Everything is ABD's (:class:`AdaptiveBidirectionalDisplacement`: views, L_sup, L_cps, ABD-I, presets), except
    ABD-R, replaced per sample and per direction by
    (:func:`~nnunet_ssl.parts.displacement.cad_llcr`): the voxels of view 1 whose confidence (max softmax of its
    network) is below ``tau_t``; their largest connected component (full connectivity, on the CPU); its bounding
    box, each side capped at ``s_t`` of its axis and centred on the bounding box; replaced by the box of the same
    size in view 2 with the highest mean confidence (of network 2), from any position (summed-area tables). The same
    from view 2 to view 1. No displacement in a sample without a voxel below ``tau_t``.

    DTE, with progress ``t = ssl_step / T`` (T all iterations; it follows the step counter, so ``--c`` resumes it):
    ``tau_t = tau_0 + (tau_1 - tau_0) t`` and ``s_t = s_0 + (s_1 - s_0) t``, linear (the paper says only that both
    rise). Defaults, ours: ``tau`` from 0.75 to 0.95: nnU-Net's softmax is confident on most voxels within a few
    epochs, so 0.75 starts on the clearly uncertain regions and 0.95 ends at the package's confidence threshold,
    taking in the boundary voxels; ``s`` from 1/4 to 1/2 of each axis: 1/4 is ABD's official cell side (a 4 x 4
    grid), so CAD starts by displacing at most one ABD cell, and 1/2 lets a late region cover a quadrant (2D) or an
    octant (3D) of the patch. The paper preset uses the same values (none are published).

    Logged: ``ssl_displaced_fraction``, ``ssl_cad_threshold`` (tau_t), ``ssl_cad_max_fraction`` (s_t) and
    ``ssl_cad_no_region`` (share of sample-directions without a low-confidence voxel).

    Choices where the paper is silent: the region is boxed (a box can be displaced between views at any position,
    a free-form region cannot); the cap is per axis; the highest-confidence box is searched in the other view, as
    ABD takes its replacement from the other view; ABD-I keeps ABD's grid rule (CAD changes the replacement of the
    unlabeled images).
    """

    paper_settings = {"cad_threshold_start": 0.75, "cad_threshold_end": 0.95, "cad_size_start": 0.25,
                      "cad_size_end": 0.5}
    #: tau_0, tau_1: confidence threshold at the start and at the end of training
    cad_threshold_start: float = 0.75
    cad_threshold_end: float = 0.95
    #: s_0, s_1: the largest side of the replaced box, as a fraction of each axis, at the start and at the end
    cad_size_start: float = 0.25
    cad_size_end: float = 0.5

    def check_displacement_settings(self) -> None:
        super().check_displacement_settings()
        for name in ("cad_threshold_start", "cad_threshold_end", "cad_size_start", "cad_size_end"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 < float(value) <= 1.0:
                raise SSLInputError(f"{name}={value!r} must be a number in (0, 1]")
        if self.cad_threshold_end < self.cad_threshold_start or self.cad_size_end < self.cad_size_start:
            raise SSLInputError("CAD's schedule must not fall: set cad_threshold_end >= cad_threshold_start and "
                                "cad_size_end >= cad_size_start")

    def cad_schedule(self) -> tuple[float, float]:
        """(tau_t, s_t) of this step."""
        progress = self.ssl_step / max(self.total_iterations, 1)
        return (linear_schedule(progress, float(self.cad_threshold_start), float(self.cad_threshold_end)),
                linear_schedule(progress, float(self.cad_size_start), float(self.cad_size_end)))

    def displace_unlabeled(self, weak: torch.Tensor, strong: torch.Tensor, probs1: torch.Tensor,
                           probs2: torch.Tensor) -> tuple[Displacement, dict[str, float]]:
        threshold, size = self.cad_schedule()
        displaced = cad_llcr(weak, strong, confidence_map(probs1), confidence_map(probs2), threshold, size)
        missing = sum(r is None for view in displaced.replaced for r in view) / max(2 * weak.shape[0], 1)
        return displaced, {"displaced_fraction": displaced.fraction, "cad_threshold": threshold,
                           "cad_max_fraction": size, "cad_no_region": missing}

    def displacement_log_keys(self) -> list[str]:
        return ["ssl_displaced_fraction", "ssl_cad_threshold", "ssl_cad_max_fraction", "ssl_cad_no_region"]

    def displacement_curves(self) -> dict[str, str]:
        return {"unlabeled voxels displaced (LLCR)": "ssl_displaced_fraction",
                "confidence threshold tau_t": "ssl_cad_threshold",
                "largest box side s_t (fraction of an axis)": "ssl_cad_max_fraction",
                "sample-views without a low-confidence region": "ssl_cad_no_region"}

