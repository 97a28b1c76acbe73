"""C3S3 host: two U-Nets of different architectures compete on the labeled batch, the winner's sharpened soft labels
teach the loser on two views of the unlabeled batch, and an outcome-driven contrastive loss ties the two networks'
voxel features."""

from __future__ import annotations

import math

import torch
from torch import nn

from nnunet_ssl.compat.trainer import FeatureTaps, unwrap, wrap_for_ddp
from nnunet_ssl.errors import SSLInputError
from nnunet_ssl.losses.consistency import confidence_stats
from nnunet_ssl.losses.contrastive import (
    VoxelProjector,
    competition_loss,
    cosine_consistency,
    draw_voxels,
    gather_voxels,
    odcl_loss,
    sharpened_mse,
)
from nnunet_ssl.trainers.base import full_resolution, split_batch
from nnunet_ssl.trainers.hosts.two_networks import TwoNetworks, mean_stats
from nnunet_ssl.trainers.step import SSLStep

#: the official lambda ramp, ``ramps.sigmoid_rampup(iter // 150, 40)``, ends after 40 x 150 = 6,000 iterations of a
#: 2,500-iteration run: as a fraction of the run it is 2.4, and lambda peaks at exp(-5 (1 - 2500/6000)^2) = 0.18 of
#: its weight (0.1 x 0.165 = 0.0165 with the step-wise official counter)
OFFICIAL_RAMPUP_FRACTION = 6000 / 2500


class ComplementaryCompetition(TwoNetworks):
    """C3S3: of two networks, the one with the lower competition loss on the labeled batch is the winner and teaches
    the loser with sharpened soft labels on two views of the unlabeled batch (dynamic complementary competition,
    DCC); an outcome-driven contrastive loss (ODCL) pulls the two networks' projected voxel features together where
    their predictions agree on foreground and apart where either predicts it.

    Paper: He, Lin, Chen, Xu, Zheng, "C3S3: Complementary Competition and Contrastive Selection for Semi-Supervised
    Medical Image Segmentation", ICME 2025, arXiv 2506.07368; official code Y-TARL/C3S3 (read: ``train_LA.py``,
    ``utils/ContrastiveLoss.py``, ``utils/losses.py``, ``models/vnet.py``, ``dataloaders/LA_Data.py``, README).
    Loss terms: :mod:`nnunet_ssl.losses.contrastive`.

    Networks: A = network 1, built from the plans (nnU-Net's PlainConvUNet by default), B = network 2, nnU-Net's
    other U-Net (ResidualEncoderUNet with ResNet34-like encoder blocks; :class:`~nnunet_ssl.trainers.hosts.
    two_networks.TwoNetworks` with ``second_network = "other_unet"``, as MEDL pairs them; the paper pairs VNet and a
    ResNet34-VNet). Each has a projector head :class:`~nnunet_ssl.losses.contrastive.VoxelProjector` (the official
    ``Conv1x1 C->C, PReLU, Conv1x1 C->D``, ``D = projector_dim``) on its last decoder stage, read by forward hooks
    (:class:`~nnunet_ssl.compat.trainer.FeatureTaps`, ``low``; the official projector reads the last decoder block).

    Per step, labeled images x (labels y) as nnU-Net gives them, unlabeled patches as two views u^1, u^2 (shared
    geometric augmentation, each its own intensity augmentation, ``view_intensity = (True, True)``); each network N
    predicts ``z_N = N(cat(x, u^1, u^2))`` in one forward (one DDP gradient sync per network and step):

    - ``L_sup = DC+CE(A(x), y) + DC+CE(B(x), y)``, nnU-Net's deep-supervised loss
    - ``L_comp^N = alpha CE(z_N(x), y) + (1 - alpha) Dice(z_N(x), y)``, full resolution, no gradient; under DDP
      averaged over the ranks (:meth:`mean_over_ranks`) so that every rank picks the same winner. Winner
      ``W = A`` if ``L_comp^A < L_comp^B`` else B (the official strict ``<``: a tie goes to B); loser ``L`` the other
    - ``L_cp = sum_k mean((softmax z_L(u^k) - sharpen(softmax z_W(u^k)))^2)``, ``T = sharpen_temperature``, routed
      through ``unsupervised_loss(z_L(u), z_W(u), step)`` with ``step.direction`` = the loser's index (0 for A, 1 for
      B) so that a plug-in (MetaSSL) replaces it and keeps one state per direction; with ``uses_labeled_reference``
      the loser's ``labeled_loss`` against the winner on x as well
    - ``L_cos = sum_N mean(1 - cos(z_N(u^1), z_N(u^2)))`` along the last spatial axis (the official term)
    - ``L_iuc = sum_{j, k in {1, 2}} ODCL(A^j, B^k)``: ``A^j`` the projected features and argmax of A on
      ``cat(x, u^j)`` at ``contrastive_voxels`` locations per image, drawn uniformly without replacement, the same
      for both networks and both views of an unlabeled patch; ``tau = contrastive_temperature``
    - ``L = L_sup + cosine_weight L_cos + lambda(t) L_cp + contrastive_weight r_c(t) L_iuc``, every SSL term in
      float32 outside autocast; ``r_c(t)`` the common ramp with ``contrastive_ramp``, else 1 (a constant term).

    The projectors are trained with their network's optimizer (a second parameter group, which follows the
    group-0 learning rate nnU-Net's poly schedule sets, at every epoch start), are clipped with their network,
    saved in ``ssl_state`` (and their momentum in the optimizers' states) so ``--c`` restores them, DDP-wrapped
    under DDP (one forward per step each), and are not part of the inference network: ``checkpoint_final.pth``
    (network A) and ``checkpoint_final_net2.pth`` (network B, ``nnUNetTrainerC3S3Net2``) predict with
    ``nnUNetv2_predict`` as any nnU-Net.

    Logged: ``ssl_net1_won`` (the share of the epoch's steps network 1 won), ``ssl_competition_net1`` and
    ``ssl_competition_net2`` (L_comp), ``ssl_odcl_loss`` (L_iuc before its weight), ``ssl_cosine_loss`` (L_cos),
    ``ssl_odcl_intersection`` and ``ssl_odcl_union`` (shares of sampled voxels in I and U); ``ssl_unsup_loss`` is
    L_cp (plus MetaSSL's labeled branch); ``ssl_confidence``/``ssl_coverage`` read the winner on both views.

    Presets (``preset``, or ``nnUNet_ssl_preset``):

    - ``"paper"``: the official LA configuration: ``alpha = 0.8``, ``T = 0.1``, ``tau = 0.1``, ``lambda = 0.1`` with
      the official ramp expressed as a fraction of the run (``rampup_fraction = 6000 / 2500 = 2.4``: it never
      reaches its weight, lambda ends at about 0.018), L_cos and L_iuc constant from the first step, L_iuc with
      weight 2 (see the deviations), projector dimension 64.
    - ``"default"``: ``lambda = 1`` after the common 20 % ramp: L_cp is an MSE of probabilities averaged over every
      class and voxel, mostly confident background, which Mean Teacher's host measured at 0.001-0.006 on
      Hippocampus (its default is 1 for the same reason); with 0.1 and the official ramp the competition would add
      about 1e-4 of the supervised loss. L_iuc is ramped with the same sigmoid (``contrastive_ramp``): its masks are
      the argmax of both networks, random at the start, and at full weight from step 0 it would pull features
      together on the outcomes of untrained networks. ``contrastive_weight = 0.05`` instead of the official 2:
      ODCL's gradient with respect to the similarities carries a mass of up to ``2 / tau`` per term whatever the
      number of voxels (a softmax over the negatives plus the mean over the positives), 16 / tau over the four
      pairs; at initialisation on the synthetic 3D dataset (3 classes, K = 4096) its parameter-gradient norm at
      weight 2 was 65 (network 1) and 77 (network 2) against 1.2 and 0.6 for L_sup and 1.3 and 1.2 for L_cos.
      nnU-Net clips each network's gradient norm at 12, so at the official weight every step would be clipped and
      L_sup's share of the update cut about 70-fold (the official code does not clip). At 0.05 ODCL's gradient is
      about 1.5-2 times L_sup's at the start: the term shapes the features without scaling the segmentation
      gradient away. Everything else as the paper preset.

    Deviations from the paper and the official code, and why:

    - Views: the official dataset applies ``ToTensor`` only to its "two views", so they are identical copies (only
      dropout differs) and L_cos, the cross-view ODCL pairs and the two L_cp terms repeat one view; the paper and
      README describe two augmentations. Both presets use real views: nnU-Net's augmentation with an independent
      intensity draw per view, aligned voxel for voxel, so the four ODCL pairs compare the same locations. The
      labeled batch is nnU-Net's one batch (both "views" of it would be one forward): it enters L_sup once, the
      competition once and each of the four ODCL pairs (as the official identical copies do), and L_cos only on the
      unlabeled views, where two views differ.
    - lambda: the official ramp ends after 6,000 iterations of a 2,500-iteration run, so lambda peaks at about
      0.0165 instead of 0.1; the default preset ramps over 20 % of the run and reaches its weight (the paper preset
      keeps the official fraction, 2.4).
    - L_iuc's weight: the official code adds L_iuc to both networks' losses and backpropagates each loss through
      both networks, so each network receives twice L_iuc's gradient; ``contrastive_weight = 2`` in one summed loss
      is that gradient.
    - ODCL on ``contrastive_voxels`` sampled locations per image (default 4096; a setting) instead of every voxel:
      memory and time are linear in the sample and independent of the patch (the official computes four dense
      full-resolution terms under gradient checkpointing), and the projector runs on the sampled voxels only (a 1x1
      convolution is a per-voxel map, so this is the same head). Negatives are the pair's sampled voxels of this
      rank's batch: under DDP the loss is per rank and the gradients are averaged, which equals a single-GPU run of
      the per-rank batch; gathering negatives across ranks would change the denominator's size (and the loss's
      scale, ``log M``) with the number of GPUs. The official constructs a Gumbel top-k sampler it never uses.
    - Several classes: I = both networks predict the same foreground class, U = either predicts foreground; for
      two classes the official masks (:mod:`nnunet_ssl.losses.contrastive`). The competition's Dice averages the
      foreground classes (the official has one). Region-based (sigmoid) datasets are refused (argmax outcomes).
    - The competition uses the full-resolution output (the segmentation the two networks are compared on) rather
      than nnU-Net's deep-supervised loss, whose lower-resolution terms would rank the decoders' auxiliary heads;
      both presets use the official Dice (squared denominators, foreground only) and the mean CE.
    - L_sup is nnU-Net's deep-supervised Dice + CE of each network (official: ``(CE + Dice)`` averaged over the two
      identical copies); L_cp, L_cos and ODCL read the full-resolution output.
    - nnU-Net's SGD, poly learning rate, epochs, batch and patch; the official runs SGD 0.01 with momentum 0.9 for
      2,500 iterations with one labeled and one unlabeled image. ``-pretrained_weights`` initialise network 1 only.
    - The draw of voxels uses each process's own torch generator (seeded by nnU-Net per rank): ranks sample
      independently, and only the winner is decided across ranks.
    """

    paper_settings = {"unsupervised_share": None, "unsupervised_weight": 0.1,
                      "rampup_fraction": OFFICIAL_RAMPUP_FRACTION, "calibrate_reference": False,
                      "view_intensity": (True, True), "competition_alpha": 0.8, "sharpen_temperature": 0.1,
                      "contrastive_temperature": 0.1, "contrastive_weight": 2.0, "contrastive_ramp": False,
                      "cosine_weight": 1.0, "projector_dim": 64}
    second_network = "other_unet"
    net2_inference_trainer = "nnUNetTrainerC3S3Net2"
    needs_argmax_labels = True
    reference_name = "network 2"
    #: both networks see both views; each view its own intensity augmentation
    view_intensity = (True, True)
    #: lambda, the weight of L_cp (the loser's MSE to the winner's sharpened soft labels)
    unsupervised_weight = 1.0
    rampup_fraction = 0.2
    #: alpha of the competition ``alpha CE + (1 - alpha) Dice`` (0.8 LA, 0.5 Pancreas-CT in the official README)
    competition_alpha: float = 0.8
    #: T of the sharpening ``P^{1/T} / sum P^{1/T}``
    sharpen_temperature: float = 0.1
    #: tau of ODCL
    contrastive_temperature: float = 0.1
    #: the weight of L_iuc (2 = the official gradient; 0.05 by default, see the class docstring); 0 switches ODCL
    #: and the projectors off
    contrastive_weight: float = 0.05
    #: L_iuc follows the common sigmoid ramp (else constant from the first step)
    contrastive_ramp: bool = True
    #: voxels sampled per image for ODCL (memory and time linear in it)
    contrastive_voxels: int = 4096
    #: the weight of L_cos (the official view consistency); 0 switches it off
    cosine_weight: float = 1.0
    #: D, the output dimension of each projector head
    projector_dim: int = 64

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.check_c3s3_settings()

    # ------------------------------------------------------------------ settings
    def check_c3s3_settings(self) -> None:
        """One clear line for each bad setting."""
        views = tuple(self.view_intensity)
        if len(views) != 2:
            raise SSLInputError(f"view_intensity={views!r} must name two views (C3S3 trains both networks on two "
                                "views of the unlabeled batch), e.g. (True, True)")
        alpha = self.competition_alpha
        if not isinstance(alpha, (int, float)) or not 0.0 <= float(alpha) <= 1.0:
            raise SSLInputError(f"competition_alpha={alpha!r} must be a number in [0, 1] (0.8 on LA, 0.5 on "
                                "Pancreas-CT in C3S3)")
        for name in ("sharpen_temperature", "contrastive_temperature"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not float(value) > 0 or not math.isfinite(float(value)):
                raise SSLInputError(f"{name}={value!r} must be a number > 0 (0.1 in C3S3)")
        for name in ("contrastive_weight", "cosine_weight"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not float(value) >= 0 or not math.isfinite(float(value)):
                raise SSLInputError(f"{name}={value!r} must be a number >= 0 (0 switches the term off)")
        for name in ("contrastive_voxels", "projector_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SSLInputError(f"{name}={value!r} must be a whole number >= 1 (defaults: contrastive_voxels "
                                    "4096, projector_dim 64)")

    def feature_channels(self) -> int:
        """Channels of the last decoder stage: the plans' first ``features_per_stage`` (both U-Nets share them)."""
        features = self.configuration_manager.network_arch_init_kwargs.get("features_per_stage")
        if not features:
            raise SSLInputError("C3S3's projectors read the last decoder stage of nnU-Net's U-Nets; these plans have "
                                "no features_per_stage: train with nnU-Net's default or ResEnc plans")
        return int(features[0])

    # ------------------------------------------------------------------ modules
    @property
    def uses_contrastive(self) -> bool:
        return float(self.contrastive_weight) > 0

    def build_ssl_modules(self) -> None:
        super().build_ssl_modules()
        # registered before the first forward, which compiles a compiled network (see FeatureTaps)
        self.taps = [FeatureTaps(self.network), FeatureTaps(self.network2)]
        self.projectors: list[nn.Module] = []
        self._trainable: list[tuple[nn.Module, torch.optim.Optimizer]] = []
        if not self.uses_contrastive:  # no projectors: under DDP an unused parameter would be an error
            self._trainable = list(super().trainable())
            return
        for network, optimizer in super().trainable():
            projector = VoxelProjector(self.feature_channels(), int(self.projector_dim)).to(self.device)
            optimizer.add_param_group({"params": list(projector.parameters())})
            if self.is_ddp:
                projector = wrap_for_ddp(self, projector)
            self.projectors.append(projector)
            # clipped (and unscaled) together with the network whose optimizer steps it
            self._trainable.append((nn.ModuleList([network, projector]), optimizer))

    def trainable(self) -> list[tuple[nn.Module, torch.optim.Optimizer]]:
        return self._trainable

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        self.sync_projector_lr()

    def sync_projector_lr(self) -> None:
        """nnU-Net's PolyLRScheduler sets ``param_groups[0]`` only; the projector groups follow it."""
        for optimizer in (self.optimizer, self.optimizer2):
            for group in optimizer.param_groups[1:]:
                group["lr"] = optimizer.param_groups[0]["lr"]

    # ------------------------------------------------------------------ losses
    def unsupervised_loss(self, student_logits: torch.Tensor, reference_logits: torch.Tensor,
                          step: SSLStep) -> tuple[torch.Tensor, dict[str, float]]:
        """``L_cp``: the loser's MSE to the winner's sharpened soft labels, summed over the two views (the inputs
        hold both views, each an equal share of the samples)."""
        views = len(tuple(self.view_intensity))
        return views * sharpened_mse(student_logits, reference_logits, float(self.sharpen_temperature)), {}

    def competition(self, labeled: list[torch.Tensor], target: torch.Tensor) -> tuple[int, torch.Tensor]:
        """(winner index, both competition losses averaged over the ranks), without gradient."""
        with torch.no_grad():
            values = torch.stack([competition_loss(z, target, float(self.competition_alpha),
                                                   self.label_manager.ignore_label) for z in labeled])
            values = self.mean_over_ranks(values)
        return (0 if bool(values[0] < values[1]) else 1), values

    def contrastive(self, logits: list[torch.Tensor], features: list[torch.Tensor], n_labeled: int,
                    n_unlabeled: int) -> tuple[torch.Tensor, dict[str, float]]:
        """``L_iuc`` over the four (view of A, view of B) pairs on sampled voxels (class docstring)."""
        spatial = tuple(logits[0].shape[2:])
        for f in features:
            if tuple(f.shape[2:]) != spatial:
                raise SSLInputError(f"C3S3 reads the last decoder stage at the output's resolution; it has the "
                                    f"spatial shape {tuple(f.shape[2:])}, the output {spatial}: train with nnU-Net's "
                                    "U-Net plans")
        voxels = math.prod(spatial)
        device = logits[0].device
        count = int(self.contrastive_voxels)
        index_l = draw_voxels(n_labeled, voxels, count, device)
        index_u = draw_voxels(n_unlabeled, voxels, count, device)
        index = torch.cat([index_l, index_u, index_u])  # rows of cat(x, u^1, u^2)
        projected, labels = [], []
        for z, f, projector in zip(logits, features, self.projectors):
            sampled = gather_voxels(f, index).float()
            if sampled.shape[-1] != unwrap(projector).in_channels:
                raise SSLInputError(f"the last decoder stage has {sampled.shape[-1]} channels, the projector expects "
                                    f"{unwrap(projector).in_channels}: train with nnU-Net's U-Net plans")
            projected.append(projector(sampled))
            labels.append(gather_voxels(z.detach(), index).argmax(-1))
        labeled = torch.arange(n_labeled, device=device)
        rows = [torch.cat([labeled, n_labeled + k * n_unlabeled + torch.arange(n_unlabeled, device=device)])
                for k in range(2)]
        total, stats = projected[0].new_zeros(()), []
        for j in range(2):
            for k in range(2):
                loss, s = odcl_loss(projected[0][rows[j]], projected[1][rows[k]], labels[0][rows[j]],
                                    labels[1][rows[k]], float(self.contrastive_temperature))
                total = total + loss
                stats.append(s)
        return total, mean_stats(stats)

    def forward_losses(self, step: SSLStep) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        n_labeled = step.data.shape[0]
        u1, u2 = step.views["view0"], step.views["view1"]
        n_unlabeled = u1.shape[0]
        step.student_image, step.reference_image = u1, u2
        x = torch.cat([step.data, u1, u2], 0)
        outputs, features = [], []
        with self._autocast():
            for network, taps in zip((self.network, self.network2), self.taps):
                with taps.capture():
                    outputs.append(network(x))
                features.append(taps.read()[1])
            labeled_out = [split_batch(o, n_labeled)[0] for o in outputs]
            sup_loss = self.loss(labeled_out[0], step.target) + self.loss(labeled_out[1], step.target)
        with self._no_autocast():
            logits = [full_resolution(o).float() for o in outputs]
            target = full_resolution(step.target)
            winner, values = self.competition([z[:n_labeled] for z in logits], target)
            loser = 1 - winner
            student, reference = logits[loser], self.calibrated(logits[winner].detach(), winner)
            step.direction = loser
            unsup_loss, stats = self.unsupervised_loss(student[n_labeled:], reference[n_labeled:], step)
            if self.uses_labeled_reference:
                lab_loss, lab_stats = self.labeled_loss(student[:n_labeled], reference[:n_labeled], target, step)
                unsup_loss = unsup_loss + lab_loss
                stats = {**stats, **lab_stats, "labeled_branch_loss": lab_loss.detach()}
            step.direction = 0
            stats = {**confidence_stats(reference[n_labeled:], self.confidence_threshold), **stats,
                     "net1_won": float(winner == 0), "competition_net1": float(values[0]),
                     "competition_net2": float(values[1])}
            if float(self.cosine_weight) > 0:
                views = [(z[n_labeled:n_labeled + n_unlabeled], z[n_labeled + n_unlabeled:]) for z in logits]
                cosine = sum(cosine_consistency(a, b) for a, b in views)
                step.add_constant_loss(float(self.cosine_weight) * cosine)
                stats["cosine_loss"] = float(cosine.detach())
            if self.uses_contrastive:
                odcl, odcl_stats = self.contrastive(logits, features, n_labeled, n_unlabeled)
                if self.contrastive_ramp:
                    step.add_scheduled_loss(float(self.contrastive_weight) * self.ramp() * odcl)
                else:
                    step.add_constant_loss(float(self.contrastive_weight) * odcl)
                stats.update(odcl_stats, odcl_loss=float(odcl.detach()))
        return sup_loss, unsup_loss, stats

    # ------------------------------------------------------------------ state, cost and logs
    def ssl_state_dict(self) -> dict:
        return {**super().ssl_state_dict(), "projectors": [unwrap(p).state_dict() for p in self.projectors]}

    def load_ssl_state_dict(self, state: dict) -> None:
        super().load_ssl_state_dict(state)
        for projector, saved in zip(self.projectors, state["projectors"]):
            unwrap(projector).load_state_dict(saved)

    @classmethod
    def compute_units(cls, labeled_batch: int, unlabeled_batch: int) -> float:
        """Each network forward and backward on the labeled batch and both unlabeled views, ``2 x 3 (B + 2U)``;
        the competition, soft labels and ODCL reuse these outputs (projectors and losses on sampled voxels are not
        counted)."""
        return float(2 * 3 * (labeled_batch + 2 * unlabeled_batch))

    def ssl_log_keys(self) -> list[str]:
        return [*super().ssl_log_keys(), "ssl_net1_won", "ssl_competition_net1", "ssl_competition_net2",
                "ssl_odcl_loss", "ssl_cosine_loss", "ssl_odcl_intersection", "ssl_odcl_union"]

    def ssl_plot_panels(self) -> list[tuple[str, dict[str, str]]]:
        return [*super().ssl_plot_panels(),
                ("C3S3 competition", {"share of steps network 1 won": "ssl_net1_won",
                                      "competition loss, network 1": "ssl_competition_net1",
                                      "competition loss, network 2": "ssl_competition_net2"}),
                ("C3S3 contrastive and consistency terms (before weights)",
                 {"ODCL (4 view pairs)": "ssl_odcl_loss", "L_cos (both networks)": "ssl_cosine_loss"}),
                ("C3S3 ODCL masks (share of sampled voxels)", {"intersection": "ssl_odcl_intersection",
                                                               "union": "ssl_odcl_union"})]
