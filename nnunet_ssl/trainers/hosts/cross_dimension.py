"""M&N host: a 2D network applied slice-wise and nnU-Net's 3D network trained in turns, each on the labels and the
other's soft pseudo-labels, with a learning-rate-guided share of pseudo-labeled samples."""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.helpers import softmax_helper_dim1
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

from nnunet_ssl.compat.networks_2d import (
    ENV_WEIGHTS_2D,
    SliceWise,
    add_lora,
    build_library_network,
    build_plans_network,
    configuration_2d,
    find_2d_checkpoint,
    load_library_weights,
    load_nnunet_checkpoint,
    plans_divisor,
)
from nnunet_ssl.compat.trainer import (
    atomic_save,
    log_history,
    should_compile,
    unwrap,
    wrap_for_ddp,
    write_inference_checkpoint,
)
from nnunet_ssl.errors import SSLInputError
from nnunet_ssl.losses.consistency import confidence_stats, probabilities
from nnunet_ssl.parts.share_schedule import (
    poly_factor,
    poly_restart_factor,
    pseudo_label_count,
    pseudo_label_progress,
    transition_epoch,
    warmup_cosine_restart_factor,
)
from nnunet_ssl.trainers.base import full_resolution, split_batch
from nnunet_ssl.trainers.hosts.two_networks import NET2_CHECKPOINT, TwoNetworks
from nnunet_ssl.trainers.logs import DOMINANT_SHARE, NEGLIGIBLE_SHARE
from nnunet_ssl.trainers.step import SSLStep

#: the 2D network's weights at the end of training, beside checkpoint_final.pth (not a checkpoint_final_* file:
#: nnUNetv2_predict on the 3D configuration cannot run it)
NETWORK_2D_FINAL = "network_2d_final.pth"
#: ``step.direction`` of the 3D network (nnU-Net's ``self.network``) and of the 2D network
DIRECTION_3D, DIRECTION_2D = 0, 1
#: the turns of one step: the 2D network learns from the 3D network, then the 3D network from the updated 2D one
#: (the official code trains a 2D epoch, then a 3D epoch)
TURN_ORDER = (DIRECTION_2D, DIRECTION_3D)
#: official M&N: 4000 epochs, pseudo-labels from epoch 500, linear LR warm-up over 50 epochs
OFFICIAL_TRANSITION_FRACTION = 500 / 4000
OFFICIAL_WARMUP_FRACTION = 50 / 4000


def distribution_loss(logits: torch.Tensor, target: torch.Tensor, regions: bool = False,
                      mean_over_classes: bool = False) -> torch.Tensor:
    """KL(q || p) per voxel, averaged over voxels: the soft-label term of M&N (``KLDivLoss(log_softmax(z), q)``),
    with q the reference's probabilities and p = softmax(z) (sigmoid per region, Bernoulli KL averaged over regions).
    Its gradient is the soft cross-entropy's; it is 0 where p = q. ``mean_over_classes`` divides by the number of
    classes as torch's ``KLDivLoss(reduction='mean')`` of the official code does."""
    z, q = logits.float(), target.float().detach()
    if regions:
        kl = F.binary_cross_entropy_with_logits(z, q, reduction="none") - \
            F.binary_cross_entropy(q, q, reduction="none")  # BCE(q, q) = H(q)
        kl = kl.mean(1)
    else:
        kl = (torch.xlogy(q, q) - q * F.log_softmax(z, 1)).sum(1)
        if mean_over_classes:
            kl = kl / z.shape[1]
    return kl.mean()


class EpochLR(LRScheduler):
    """``lr = initial_lr * factor(epoch)`` for every parameter group, stepped as nnU-Net steps its
    ``PolyLRScheduler`` (``step(current_epoch)`` at the start of each epoch): stateless, so ``--c`` resumes it."""

    def __init__(self, optimizer: torch.optim.Optimizer, initial_lr: float, factor: Callable[[int], float]):
        self.initial_lr, self.factor, self.ctr = initial_lr, factor, 0
        super().__init__(optimizer, -1)

    def step(self, current_step: int | None = None) -> None:
        if current_step is None or current_step == -1:
            current_step, self.ctr = self.ctr, self.ctr + 1
        lr = self.initial_lr * self.factor(int(current_step))
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self._last_lr = [lr] * len(self.optimizer.param_groups)

    def get_last_lr(self) -> list[float]:
        return self._last_lr


@contextlib.contextmanager
def evaluating(module: nn.Module) -> Iterator[None]:
    """``module`` in eval mode for the block (the official code predicts pseudo-labels in eval mode)."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


class CrossDimensionCoTraining(TwoNetworks):
    """M&N: a 2D network applied slice-wise and nnU-Net's 3D network, trained in turns on the labels and on each
    other's soft pseudo-labels, the pseudo-labeled share rising from the learning-rate restart on.

    Paper: Yeung, Ramesh, Lyu, Namburete, Rajapakse, "Semi-Supervised 3D Medical Segmentation from 2D Natural Images
    Pretrained Model", MLMI 2025 (arXiv 2509.15167); official code pakheiyeung/M-N (read: ``train.py``,
    ``losses.py``, ``model.py``, ``utilities.py`` ``Convert_2D_3D``, ``hyperparameters.py``).

    Networks. f3 is nnU-Net's network of the trained configuration (``self.network``: what ``nnUNetv2_predict``
    runs, ``checkpoint_final.pth``). f2 is a 2D network (``network2``) applied slice by slice along the first spatial
    axis (the axis nnU-Net's 2d configuration slices; the official code slices its depth axis): (B, C, Z, Y, X) ->
    (B Z, C, Y, X), padded in-plane to the network's divisor, cropped back and restacked
    (:class:`~nnunet_ssl.compat.networks_2d.SliceWise`). ``network_2d`` chooses f2 (``nnunet_ssl/compat/networks_2d``):

    - ``"plans"`` (default): nnU-Net's own network of the plans' ``network_2d_configuration`` (``2d``; the trained
      configuration itself when it is 2D), built as nnU-Net builds it, without deep supervision. Its starting weights
      are, in this order: the file of ``nnUNet_ssl_2d_weights`` or the setting ``weights_2d`` (the
      ``checkpoint_final.pth`` of ``nnUNetv2_train DATASET 2d FOLD`` on the same labeled split; its configuration and
      architecture are checked against the plans); else the ``checkpoint_final.pth`` of a supervised 2d run of the
      same fold under ``nnUNet_results`` (``nnUNetTrainer`` or ``nnUNetTrainerSupervised``; ``find_weights_2d``);
      else random, as nnU-Net initialises, and the labeled warm-up below trains it (the log says which).
    - ``"torchvision:<segmentation model>"`` or ``"timm:<encoder>"`` (timm: ``features_only`` encoder and a
      SegFormer-style all-MLP head) with weights from ``weights_2d`` (nothing is downloaded; tensors are matched by
      name and shape, the classifier of another class count is skipped); grey values are repeated to RGB as in the
      official code. ``lora_rank > 0`` adds LoRA adapters (peft, optional: ``pip install peft``) to the encoder's
      ``lora_targets``, the paper's SegFormer-B2 with rank 64, alpha 64, dropout 0.1. ``library_divisor`` pads slices.

    Schedule, with e the epoch, E_max = ``num_epochs``, E_tr = round(``transition_fraction`` E_max) (official
    500 / 4000), progress ``p(e) = (e - E_tr) / (E_max - E_tr)`` for e >= E_tr, else 0
    (:mod:`nnunet_ssl.parts.share_schedule`):

    - e < E_tr: warm-up, both networks on labeled data only (no unlabeled forward at all).
    - One step (one nnU-Net iteration, labeled batch (x, y) of B, unlabeled patches u): first f2's turn, then f3's
      (``TURN_ORDER``), each a forward, backward and optimizer step of one network:
      ``L_2 = w L_sup2(f2(x), y) + lambda L_p(f2(u), softmax f3(u))``, then
      ``L_3 = w L_sup3(f3(x), y) + lambda L_p(f3(u), softmax f2'(u))`` with f2' the just-updated f2; the reference
      is predicted without gradient, in eval mode. ``L_sup3`` is nnU-Net's deep-supervised Dice + CE; ``L_sup2`` the
      same Dice + CE at full resolution (nnU-Net's loss without its deep-supervision wrapper) on the restacked
      slices; ``L_p = Dice(softmax z, q) + KL(q || softmax z)`` with nnU-Net's soft Dice (foreground classes,
      ``MemoryEfficientSoftDiceLoss`` on soft targets) and the per-voxel KL (:func:`distribution_loss`); sigmoid
      and per-region Bernoulli KL for region-based datasets.
    - ``share_mode = "lambda"`` (default): all U unlabeled patches (``unlabeled_batch_size``, default B) enter each
      step once p > 0, w = 1, ``lambda = unsupervised_weight * p(e)`` (1 at most): nnU-Net's supervised term keeps
      its weight and the pseudo-label term rises linearly from the restart, as the official share does.
    - ``share_mode = "batch"`` (paper): the official count ``n_p = floor(p(e) B)`` of a batch of B
      (``configuration_manager.batch_size``, the global batch), share ``s = n_p / B``; each rank uses
      ``ceil(s U_rank)`` of its unlabeled patches, ``lambda = s`` and ``w = 1 - s``: the official loss over a batch
      of ``B - n_p`` labeled and ``n_p`` pseudo-labeled samples weights them ``(1 - s)`` and ``s``.
    - Learning rate, per network and per epoch: ``lr_schedule = "poly_restart"`` (default): nnU-Net's poly decay over
      [0, E_tr) restarted for a poly decay over [E_tr, E_max), with nnU-Net's SGD (momentum 0.99, Nesterov, weight
      decay 3e-5) at nnU-Net's initial rate for both networks (``learning_rate_3d`` / ``learning_rate_2d``);
      ``"warmup_cosine"`` (paper): linear warm-up from 0.01x over ``warmup_fraction`` of the run, a cosine cycle to
      E_tr and a second to E_max; ``"poly"``: nnU-Net's schedule without restart.

    Presets: ``"default"`` as above. ``"paper"``: ``share_mode = "batch"``, ``lr_schedule = "warmup_cosine"``, AdamW
    (torch's weight decay 0.01) at 1e-4 for the 3D and 1e-3 for the 2D network, and the KL divided by the number of
    classes (torch's ``KLDivLoss(reduction='mean')``, ``kl_over_classes``). The paper's 2D model (SegFormer-B2,
    ADE20K weights, LoRA) is a weights file away: ``network_2d='timm:<encoder>'``, ``weights_2d=FILE``,
    ``lora_rank=64``, ``lora_alpha=64`` (``nnUNet_ssl_settings``).

    Logs: ``ssl_sup_loss``/``ssl_unsup_loss``/``ssl_unsup_share`` are f3's, the ``..._2d`` keys f2's (share =
    ``lambda L_p / (w L_sup + 1)``), ``ssl_confidence``/``ssl_coverage`` read f2's pseudo-labels for f3,
    ``ssl_confidence_3d`` f3's for f2, ``ssl_pseudo_samples`` the unlabeled patches per rank and step,
    ``ssl_reference_dice`` f2's validation pseudo-Dice on nnU-Net's validation patches; the log warns when either
    network's pseudo-label term is negligible or dominant.

    Checkpoints: f2's weights and optimizer in ``ssl_state`` (``network2_weights``, ``optimizer2_state``), its source
    (architecture, weights file, SHA-256) too; ``--c`` restores both and refuses another ``network_2d``. The turns
    are complete within a step, so the step counter and the epoch are the whole alternation state. At the end,
    ``network_2d_final.pth`` beside ``checkpoint_final.pth`` holds f2's weights; for ``network_2d = "plans"`` it is an
    nnU-Net checkpoint of the 2d configuration, so ``nnUNetv2_predict_from_modelfolder -m <this run's folder above
    fold_F> -f F -chk network_2d_final.pth`` predicts with f2 (nnU-Net's 2d preprocessing). When the trained
    configuration is itself 2D and f2 is the plans' network, ``checkpoint_final_net2.pth`` is written as by the
    other two-network hosts. DDP: f2 is wrapped like nnU-Net's network (one gradient sync per turn), identical on
    all ranks.

    Deviations from the paper and the official code, and why:

    - Turns of one step instead of whole epochs (official: 8-iteration epochs, a 2D epoch then a 3D epoch, each
      network with its own epoch counter): nnU-Net's epochs are 250 iterations and carry its validation, LR and
      checkpoint schedule; alternating them would halve the 3D network's updates against nnU-Net's or double the
      run. Per step both networks get nnU-Net's number of updates, and each still learns from the other's latest
      weights, in the official order.
    - nnU-Net's labeled batch and a separate unlabeled batch (official: one batch of ``B - n_p`` labeled and ``n_p``
      pseudo-labeled volumes); the share becomes weights and a count as above. The default keeps nnU-Net's
      supervised weight and makes the share continuous: nnU-Net's 3D batch of 2 would turn the floor into one jump
      halfway through.
    - The reference is predicted on the fly from the other network (as the official training does: the pseudo-label
      files it saves at epochs 1000-3000 are loaded but not used by its training loop); no pseudo-label files.
    - Supervised terms are nnU-Net's Dice + CE (official: V-Net Dice with background + KL on one-hot labels), so
      the 3D baseline is nnU-Net; the soft Dice is nnU-Net's (foreground, linear denominators), applied to the soft
      targets.
    - The default 2D network is nnU-Net's 2d network (no natural-image weights can be downloaded at run time);
      natural-image architectures come from a file. Unlabeled patches get nnU-Net's geometric augmentation and one
      intensity draw, the same patch for both turns (official: its own augmentation of each volume).
    - Inferred (not in paper or code): the first spatial axis as slicing axis for any dataset, zero padding to the
      divisor, E_tr and the warm-up as fractions of the run, the LR restart with nnU-Net's poly shape in the default.
    """

    paper_settings = {"share_mode": "batch", "lr_schedule": "warmup_cosine", "optimizer_kind": "adamw",
                      "learning_rate_3d": 1e-4, "learning_rate_2d": 1e-3, "kl_over_classes": True,
                      "transition_fraction": OFFICIAL_TRANSITION_FRACTION,
                      "warmup_fraction": OFFICIAL_WARMUP_FRACTION, "unlabeled_batch_size": None}
    reference_name = "2D network"
    student_name = "3D network"
    calibrated_count = 1
    view_intensity = (True,)
    #: lambda_max of the default ``share_mode``: the pseudo-label term's weight at the end of the run
    unsupervised_weight = 1.0
    #: "plans" (nnU-Net's 2d network), "torchvision:<name>" or "timm:<name>"
    network_2d: str = "plans"
    #: the plans' 2D configuration whose network is f2 (the trained configuration when that is 2D)
    network_2d_configuration: str = "2d"
    #: f2's starting weights (an nnU-Net 2d checkpoint, or a weights file for a library network);
    #: ``nnUNet_ssl_2d_weights`` overrides it
    weights_2d: str | None = None
    #: without weights: look for a supervised 2d run of the same fold under nnUNet_results
    find_weights_2d: bool = True
    #: in-plane multiple that slices are padded to for a library network
    library_divisor: int = 32
    #: LoRA (peft) on a library network's encoder: rank (0 = off), alpha, module names, dropout
    lora_rank: int = 0
    lora_alpha: float = 64.0
    lora_targets: tuple[str, ...] = ("qkv", "attn.proj", "fc1", "fc2")
    lora_dropout: float = 0.1
    #: E_tr / E_max: the labeled warm-up and the learning-rate restart
    transition_fraction: float = OFFICIAL_TRANSITION_FRACTION
    #: "lambda" (pseudo-label weight rising with the progress) or "batch" (the official sample share)
    share_mode: str = "lambda"
    #: "poly_restart", "warmup_cosine" or "poly"
    lr_schedule: str = "poly_restart"
    #: linear warm-up length as a fraction of the run ("warmup_cosine")
    warmup_fraction: float = OFFICIAL_WARMUP_FRACTION
    #: "sgd" (nnU-Net's) or "adamw" (the official code's)
    optimizer_kind: str = "sgd"
    #: initial learning rates; None = nnU-Net's ``initial_lr``
    learning_rate_3d: float | None = None
    learning_rate_2d: float | None = None
    #: AdamW's weight decay (torch's default, as the official code)
    adamw_weight_decay: float = 0.01
    #: divide the KL by the number of classes (torch's KLDivLoss 'mean' of the official code)
    kl_over_classes: bool = False

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.check_settings()
        self.source_2d: dict = {}

    def check_settings(self) -> None:
        choices = {"share_mode": ("lambda", "batch"), "lr_schedule": ("poly_restart", "warmup_cosine", "poly"),
                   "optimizer_kind": ("sgd", "adamw")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise SSLInputError(f"{name}={getattr(self, name)!r} is unknown; set it to one of {', '.join(allowed)}")
        if not 0.0 <= self.transition_fraction < 1.0:
            raise SSLInputError(f"transition_fraction={self.transition_fraction} must be in [0, 1)")
        if not 0.0 <= self.warmup_fraction <= self.transition_fraction:
            raise SSLInputError(f"warmup_fraction={self.warmup_fraction} must be in [0, transition_fraction]")
        if self.calibrate_reference:
            raise SSLInputError(f"{type(self).__name__} has no temperature calibration; set calibrate_reference=False")
        if self.lora_rank and self.network_2d == "plans":
            raise SSLInputError("LoRA adapts a natural-image network (network_2d='timm:...' or 'torchvision:...'); "
                                "nnU-Net's 2d network is trained in full: set lora_rank=0")

    # ------------------------------------------------------------------ the 2D network
    @property
    def configuration_2d_name(self) -> str:
        return self.configuration_name if len(self.configuration_manager.patch_size) == 2 \
            else self.network_2d_configuration

    def weights_2d_path(self) -> tuple[str | None, str]:
        """(file, how it was chosen) of f2's starting weights; (None, reason) for a random start."""
        given = os.environ.get(ENV_WEIGHTS_2D) or self.weights_2d
        if given:
            return given, f"{ENV_WEIGHTS_2D}" if os.environ.get(ENV_WEIGHTS_2D) else "the setting weights_2d"
        if self.network_2d == "plans" and self.find_weights_2d:
            found = find_2d_checkpoint(os.environ.get("nnUNet_results"), self.plans_manager.dataset_name,
                                       self.plans_manager.plans_name, self.configuration_2d_name, self.fold)
            if found:
                return found, "the supervised 2d run of this fold"
        return None, "no weights given and no supervised 2d run of this fold found"

    def build_second_network(self) -> nn.Module:
        """f2 with its starting weights (and LoRA); records its source in ``self.source_2d``."""
        heads = self.label_manager.num_segmentation_heads
        path, why = self.weights_2d_path()
        if self.network_2d == "plans":
            configuration = configuration_2d(self.plans_manager, self.configuration_2d_name)
            network = build_plans_network(self.plans_manager, configuration, self.num_input_channels, heads)
            self.divisor_2d = plans_divisor(configuration)
            loaded = load_nnunet_checkpoint(network, path, self.plans_manager, self.configuration_2d_name) \
                if path else {}
        else:
            network = build_library_network(self.network_2d, self.num_input_channels, heads)
            self.divisor_2d = (self.library_divisor,) * 2
            loaded = load_library_weights(network, path) if path else {}
            if self.lora_rank:
                add_lora(network, self.lora_rank, self.lora_alpha, self.lora_targets, self.lora_dropout)
        self.source_2d = {"network_2d": self.network_2d, "configuration": self.configuration_2d_name,
                          "weights": {k: str(v) for k, v in loaded.items()}, "chosen_by": why}
        return network

    def build_ssl_modules(self) -> None:
        network = self.build_second_network().to(self.device)
        if should_compile(self):
            network = torch.compile(network)
        self.optimizer2, self.lr_scheduler2 = self.optimizer_and_schedule(network, self.learning_rate_2d)
        self.network2 = wrap_for_ddp(self, network) if self.is_ddp else network
        self.slicewise = SliceWise(self.network2, self.divisor_2d)
        # nnU-Net's Dice + CE without its deep-supervision wrapper, for f2's full-resolution output
        self.loss_2d = self.loss.loss if isinstance(self.loss, DeepSupervisionWrapper) else self.loss
        self.soft_dice = MemoryEfficientSoftDiceLoss(
            apply_nonlin=torch.sigmoid if self.regions else softmax_helper_dim1,
            batch_dice=self.configuration_manager.batch_dice, do_bg=self.regions, smooth=1e-5, ddp=False)

    def reference_network(self) -> nn.Module | None:
        return getattr(self, "slicewise", None)

    def calibration_networks(self) -> list[nn.Module]:
        return []

    def set_deep_supervision_enabled(self, enabled: bool) -> None:
        # f2 has no deep supervision: only nnU-Net's network switches (nnUNetTrainer's own method)
        nnUNetTrainer.set_deep_supervision_enabled(self, enabled)

    # ------------------------------------------------------------------ optimizers and schedules
    def lr_factor(self, epoch: int) -> float:
        """The learning rate of epoch ``epoch`` as a factor of the initial rate (both networks)."""
        transition = self.transition
        if self.lr_schedule == "poly":
            return poly_factor(epoch, self.num_epochs)
        if self.lr_schedule == "poly_restart":
            return poly_restart_factor(epoch, transition, self.num_epochs)
        warmup = min(int(round(self.warmup_fraction * self.num_epochs)), transition)
        return warmup_cosine_restart_factor(epoch, warmup, transition, self.num_epochs)

    def optimizer_and_schedule(self, network: nn.Module, lr: float | None) -> tuple[torch.optim.Optimizer, EpochLR]:
        lr = self.initial_lr if lr is None else float(lr)
        if self.optimizer_kind == "sgd":  # nnU-Net's configure_optimizers
            optimizer = torch.optim.SGD(network.parameters(), lr, weight_decay=self.weight_decay, momentum=0.99,
                                        nesterov=True)
        else:
            optimizer = torch.optim.AdamW(network.parameters(), lr, weight_decay=self.adamw_weight_decay)
        return optimizer, EpochLR(optimizer, lr, self.lr_factor)

    def configure_optimizers(self):
        return self.optimizer_and_schedule(self.network, self.learning_rate_3d)

    # ------------------------------------------------------------------ the share schedule
    @property
    def transition(self) -> int:
        return transition_epoch(self.num_epochs, self.transition_fraction)

    def progress(self) -> float:
        return pseudo_label_progress(self.current_epoch, self.transition, self.num_epochs)

    def batch_share(self) -> float:
        """s = n_p / B, the official share of pseudo-labeled samples in a batch of B (the global batch)."""
        batch = int(self.configuration_manager.batch_size)
        return pseudo_label_count(self.current_epoch, self.transition, self.num_epochs, batch) / batch

    def ramp(self) -> float:
        return self.batch_share() if self.share_mode == "batch" else self.progress()

    def current_lambda(self) -> float:
        return self.batch_share() if self.share_mode == "batch" else super().current_lambda()

    def supervised_weight(self) -> float:
        return 1.0 - self.batch_share() if self.share_mode == "batch" else 1.0

    def pseudo_samples(self, available: int) -> int:
        """How many of this rank's ``available`` unlabeled patches enter this step."""
        if self.share_mode == "batch":
            return min(available, math.ceil(self.batch_share() * available))
        return available if self.progress() > 0 else 0

    @classmethod
    def compute_units(cls, labeled_batch: int, unlabeled_batch: int) -> float:
        """Per step, each network forward + backward on labeled + unlabeled (``2 * 3 (B + U)``) plus the other's
        pseudo-label forward on the unlabeled batch (``2 U``); one slice-wise pass of the 2D network over a patch
        counts as one pass. During the warm-up, and with fewer pseudo-labeled samples, U is smaller."""
        return float(2 * 3 * (labeled_batch + unlabeled_batch) + 2 * unlabeled_batch)

    # ------------------------------------------------------------------ the step
    def unsupervised_loss(self, student_logits: torch.Tensor, reference_logits: torch.Tensor,
                          step: SSLStep) -> tuple[torch.Tensor, dict[str, float]]:
        """``L_p = Dice(p, q) + KL(q || p)`` on the full-resolution float32 logits, q the reference's
        probabilities."""
        q = probabilities(reference_logits.detach(), self.regions)
        dice = 1.0 + self.soft_dice(student_logits.float(), q)
        kl = distribution_loss(student_logits, q, self.regions, self.kl_over_classes)
        return dice + kl, {"pseudo_dice_loss": float(dice.detach()), "pseudo_kl": float(kl.detach())}

    def train_step(self, batch: dict) -> dict:
        target = batch["target"]
        unlabeled = next(self.dataloader_unlabeled)["view0"]
        count = self.pseudo_samples(unlabeled.shape[0])
        step = SSLStep(data=batch["data"].to(self.device, non_blocking=True),
                       target=[t.to(self.device, non_blocking=True) for t in target] if isinstance(target, list)
                       else target.to(self.device, non_blocking=True),
                       views={"view0": unlabeled[:count].to(self.device, non_blocking=True)} if count else {},
                       lam=self.current_lambda())
        step.student_image = step.views.get("view0")
        weight = self.supervised_weight()
        turns = {direction: self.train_turn(direction, step, weight) for direction in TURN_ORDER}
        if self.grad_scaler is not None:
            self.grad_scaler.update()
        self.after_optimizer_step()
        self.ssl_step += 1
        (sup3, pseudo3, stats3), (sup2, pseudo2, stats2) = turns[DIRECTION_3D], turns[DIRECTION_2D]
        self.observe_losses(step, sup3, pseudo3)
        nan = float("nan")
        record = {"ssl_sup_loss": float(sup3), "ssl_unsup_loss": float(pseudo3), "ssl_lambda": step.lam,
                  "ssl_ramp": self.ramp(), "ssl_other_share": 0.0, "ssl_supervised_weight": weight,
                  "ssl_unsup_share": step.lam * float(pseudo3) / max(weight * float(sup3) + 1.0, 1e-8),
                  "ssl_sup_loss_2d": float(sup2), "ssl_unsup_loss_2d": float(pseudo2),
                  "ssl_unsup_share_2d": step.lam * float(pseudo2) / max(weight * float(sup2) + 1.0, 1e-8),
                  "ssl_pseudo_samples": float(count), "ssl_lr_2d": self.optimizer2.param_groups[0]["lr"],
                  "ssl_confidence": stats3.get("confidence", nan), "ssl_coverage": stats3.get("coverage", nan),
                  "ssl_confidence_3d": stats2.get("confidence", nan),
                  **{f"ssl_{k}": v for k, v in stats3.items() if k.startswith("pseudo_")},
                  **{f"ssl_{k}_2d": v for k, v in stats2.items() if k.startswith("pseudo_")}}
        self.record_step_stats(record)
        # nnU-Net's train_loss curve follows its own (3D) network, comparable with the supervised baseline
        return {"loss": (weight * sup3 + step.lam * pseudo3).cpu().numpy()}

    def learner(self, direction: int) -> nn.Module:
        """What a turn trains and predicts with: nnU-Net's 3D network, or f2 applied slice-wise."""
        return self.network if direction == DIRECTION_3D else self.slicewise

    def train_turn(self, direction: int, step: SSLStep,
                   weight: float) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        """One network's forward, backward and optimizer step on the labels and the other network's soft
        pseudo-labels; returns (supervised loss, pseudo-label loss, statistics), the losses detached."""
        network, optimizer = self.trainable()[direction]
        optimizer.zero_grad(set_to_none=True)
        step.direction = direction
        n_labeled, unlabeled = step.data.shape[0], step.student_image
        reference = None
        if unlabeled is not None:
            other = self.learner(1 - direction)
            with torch.no_grad(), self._autocast(), evaluating(other):
                reference = full_resolution(other(unlabeled))
        with self._autocast():
            x = step.data if unlabeled is None else torch.cat([step.data, unlabeled], 0)
            out_labeled, out_unlabeled = split_batch(self.learner(direction)(x), n_labeled)
            if direction == DIRECTION_3D:
                sup = self.loss(out_labeled, step.target)
            else:
                sup = self.loss_2d(out_labeled, full_resolution(step.target))
        with self._no_autocast():
            if reference is None:
                pseudo, stats = torch.zeros((), device=self.device), {}
            else:
                pseudo, stats = self.unsupervised_loss(full_resolution(out_unlabeled).float(), reference.float(), step)
                stats.update(confidence_stats(reference, self.confidence_threshold, self.regions))
            loss = weight * sup.float() + step.lam * pseudo
        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
            self.grad_scaler.unscale_(optimizer)
            norm = torch.nn.utils.clip_grad_norm_(network.parameters(), 12)
            self.grad_scaler.step(optimizer)
            self.check_finite([norm], step, sup, pseudo)
        else:
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(network.parameters(), 12)
            if self.check_finite([norm], step, sup, pseudo):
                optimizer.step()
        step.direction = DIRECTION_3D
        return sup.detach().float(), pseudo.detach().float(), stats

    # ------------------------------------------------------------------ validation, logs
    def validation_step(self, batch: dict) -> dict:
        # nnU-Net's deep-supervised validation loss needs one output per target scale from f2 as well
        target = batch["target"]
        if isinstance(target, list):
            self.slicewise.output_shapes = [tuple(t.shape[2:]) for t in target]
        try:
            return super().validation_step(batch)
        finally:
            self.slicewise.output_shapes = None

    def ssl_log_keys(self) -> list[str]:
        return [*super().ssl_log_keys(), "ssl_supervised_weight", "ssl_sup_loss_2d", "ssl_unsup_loss_2d",
                "ssl_unsup_share_2d", "ssl_pseudo_samples", "ssl_lr_2d", "ssl_confidence_3d", "ssl_pseudo_dice_loss",
                "ssl_pseudo_kl", "ssl_pseudo_dice_loss_2d", "ssl_pseudo_kl_2d"]

    def ssl_plot_panels(self) -> list[tuple[str, dict[str, str]]]:
        return [*super().ssl_plot_panels(),
                ("2D network (f2)", {"supervised loss": "ssl_sup_loss_2d", "pseudo-label loss": "ssl_unsup_loss_2d",
                                     "lambda L_p share": "ssl_unsup_share_2d"}),
                ("pseudo-labeled share", {"pseudo-labeled patches per rank": "ssl_pseudo_samples",
                                          "lambda": "ssl_lambda", "supervised weight": "ssl_supervised_weight"})]

    def on_train_epoch_end(self, train_outputs: list[dict]) -> None:
        super().on_train_epoch_end(train_outputs)
        last = {k: log_history(self)[k][-1] for k in ("ssl_sup_loss_2d", "ssl_unsup_loss_2d", "ssl_unsup_share_2d",
                                                      "ssl_pseudo_samples", "ssl_confidence_3d", "ssl_lr_2d")}
        self.print_to_log_file(
            "M&N 2D network: sup {ssl_sup_loss_2d:.4f} pseudo {ssl_unsup_loss_2d:.4f} share {ssl_unsup_share_2d:.3f} "
            "(3D pseudo-label confidence {ssl_confidence_3d:.3f}); pseudo-labeled patches per rank and step "
            "{ssl_pseudo_samples:.2f}; 2D learning rate {ssl_lr_2d:.3g}".format(**last))

    def mechanism_warnings(self, means: dict[str, float]) -> list[str]:
        out = super().mechanism_warnings(means)
        if means.get("ssl_ramp", 0.0) >= 0.5:
            share = means.get("ssl_unsup_share_2d", float("nan"))
            if share < NEGLIGIBLE_SHARE:
                out.append(f"the 2D network's pseudo-label term is {share:.2g} of its supervised loss this epoch: "
                           "negligible")
            elif share > DOMINANT_SHARE:
                out.append(f"the 2D network's pseudo-label term is {share:.2g} times its supervised loss this epoch: "
                           "it dominates")
        return out

    def on_train_start(self) -> None:
        super().on_train_start()
        weights = self.source_2d.get("weights") or {}
        start = f"weights {weights['path']} ({self.source_2d['chosen_by']})" if weights else \
            f"random initialisation ({self.source_2d.get('chosen_by')}): the labeled warm-up trains it"
        self.print_to_log_file(
            f"M&N: 2D network {self.network_2d} ({self.source_2d.get('configuration')}) from {start}; labeled warm-up "
            f"until epoch {self.transition}, then pseudo-labels ({self.share_mode}), learning rate {self.lr_schedule}",
            also_print_to_console=True)

    # ------------------------------------------------------------------ checkpoints
    def ssl_state_dict(self) -> dict:
        return {**super().ssl_state_dict(), "network_2d_source": self.source_2d}

    def load_ssl_state_dict(self, state: dict) -> None:
        saved = state.get("network_2d_source", {}).get("network_2d", self.network_2d)
        if saved != self.network_2d:
            raise SSLInputError(f"the checkpoint's 2D network is {saved!r}, this run builds {self.network_2d!r}; "
                                f"resume with network_2d={saved!r}")
        super().load_ssl_state_dict(state)
        self.source_2d = state.get("network_2d_source", self.source_2d)

    def extra_final_checkpoints(self) -> dict[str, tuple[dict[str, torch.Tensor], dict]]:
        if self.network_2d == "plans" and self.configuration_2d_name == self.configuration_name:
            return {NET2_CHECKPOINT: (unwrap(self.network2).state_dict(), {"trainer_name": "nnUNetTrainer"})}
        return {}

    def on_train_end(self) -> None:
        super().on_train_end()
        if self.local_rank != 0 or self.disable_checkpointing:
            return
        final = os.path.join(self.output_folder, "checkpoint_final.pth")
        filename = os.path.join(self.output_folder, NETWORK_2D_FINAL)
        weights = unwrap(self.network2).state_dict()
        if self.network_2d == "plans":
            # an nnU-Net checkpoint of the 2d configuration: nnUNetTrainer builds f2 from the plans
            write_inference_checkpoint(final, filename, weights, trainer_name="nnUNetTrainer",
                                       init_args={**self.my_init_kwargs, "configuration": self.configuration_2d_name},
                                       inference_allowed_mirroring_axes=(0, 1))
        else:
            atomic_save({"network_weights": {k: v.detach().cpu() for k, v in weights.items()},
                         "network_2d_source": self.source_2d}, filename)
