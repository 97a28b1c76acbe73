"""The one place where nnunet-ssl couples to nnU-Net's trainer.

``nnUNetTrainerSSL`` adds to ``nnUNetTrainer``: the unlabeled loader, the loss
``L = L_sup + lambda(t) * L_unsup`` with nnU-Net's deep-supervised DC+CE as ``L_sup`` and a sigmoid ramp-up of
``lambda``, SSL logging and plots, checkpointing of all SSL state, the DDP and AMP details, and the schedule
overrides from the environment. Hosts (Mean Teacher, ...) subclass it and override a few hooks; losses are plain
functions in :mod:`nnunet_ssl.losses`.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence

import numpy as np
import torch
from batchgenerators.dataloading.multi_threaded_augmenter import MultiThreadedAugmenter
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from batchgenerators.utilities.file_and_folder_operations import isdir, isfile, join, load_json
from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
from nnunetv2.training.nnUNetTrainer import nnUNetTrainer as _nnunet_trainer_module
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA
from nnunetv2.utilities.helpers import dummy_context
from torch import autocast, nn
from torch import distributed as dist
from torch._dynamo import OptimizedModule

from nnunet_ssl.data.layout import RAW_UNLABELED_SUBFOLDER, SPLITS_UNLABELED_KEY, unlabeled_preprocessed_folder
from nnunet_ssl.data.unlabeled_loader import (
    UnlabeledMultiViewLoader,
    UnlabeledPool,
    make_augmenter,
    split_transforms,
)
from nnunet_ssl.errors import SSLInputError
from nnunet_ssl.losses.consistency import confidence_stats
from nnunet_ssl.utils.plotting import plot_ssl_progress
from nnunet_ssl.utils.schedules import sigmoid_rampup

ENV_EPOCHS = "nnUNet_ssl_epochs"
ENV_ITERATIONS = "nnUNet_ssl_iterations_per_epoch"
ENV_VAL_ITERATIONS = "nnUNet_ssl_val_iterations"
ENV_SEED = "nnUNet_ssl_seed"


def _env_int(name: str, minimum: int) -> int | None:
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return None
    try:
        number = int(value)
    except ValueError:
        number = None
    if number is None or number < minimum:
        raise SSLInputError(f"{name}={value!r} must be an integer >= {minimum}; fix or unset the variable")
    return number


def unwrap(network: nn.Module) -> nn.Module:
    """The plain module behind DDP and torch.compile wrappers."""
    if isinstance(network, nn.parallel.DistributedDataParallel):
        network = network.module
    if isinstance(network, OptimizedModule):
        network = network._orig_mod
    return network


def full_resolution(output: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """The highest-resolution logits of a (possibly deep-supervised) network output."""
    return output[0] if isinstance(output, (list, tuple)) else output


def split_batch(output: torch.Tensor | Sequence[torch.Tensor], n: int):
    """Splits each deep-supervision scale of ``output`` into its first ``n`` samples and the rest."""
    if isinstance(output, (list, tuple)):
        return [o[:n] for o in output], [o[n:] for o in output]
    return output[:n], output[n:]


class ScheduleFromEnvironment:
    """Mixin: training length and seed from the environment, for smoke runs, the demo and benchmarks.

    ``nnUNet_ssl_epochs``, ``nnUNet_ssl_iterations_per_epoch``, ``nnUNet_ssl_val_iterations`` override
    ``num_epochs``, ``num_iterations_per_epoch`` and ``num_val_iterations_per_epoch``; ``nnUNet_ssl_seed`` seeds
    python, numpy and torch (offset by the DDP rank, so ranks draw different batches). A shortened schedule also
    saves ``checkpoint_latest.pth`` about every tenth of it (nnU-Net: every 50 epochs), so that ``--c`` after an
    interruption loses little."""

    #: added to ``nnUNet_ssl_seed``: another training seed for the same run settings (see the Reseeded baseline)
    training_seed_offset: int = 0

    def apply_environment(self) -> None:
        epochs = _env_int(ENV_EPOCHS, 1)
        iterations = _env_int(ENV_ITERATIONS, 1)
        val_iterations = _env_int(ENV_VAL_ITERATIONS, 0)
        if epochs is not None:
            self.num_epochs = epochs
            self.save_every = max(1, min(self.save_every, epochs // 10))
        if iterations is not None:
            self.num_iterations_per_epoch = iterations
        if val_iterations is not None:
            self.num_val_iterations_per_epoch = val_iterations
        seed = _env_int(ENV_SEED, 0)
        if seed is not None:
            seed += self.training_seed_offset
        rank = self.local_rank if self.is_ddp else 0
        if seed is not None:
            random.seed(seed + rank)
            np.random.seed(seed + rank)
            torch.manual_seed(seed + rank)
        elif self.is_ddp:
            # torch's default seed is the same in every spawned rank; augmentation draws must differ per rank
            torch.manual_seed(int(np.random.randint(0, 2**31 - 1)))
        self.ssl_seed = seed


class nnUNetTrainerSupervised(ScheduleFromEnvironment, nnUNetTrainer):
    """Supervised nnUNetTrainer (the baseline at the same label budget), with the package's schedule overrides."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.apply_environment()


class nnUNetTrainerSupervisedReseeded(nnUNetTrainerSupervised):
    """The supervised baseline trained with another seed (``nnUNet_ssl_seed`` + 1000): a control for training noise.

    In ``nnUNetv2_ssl_benchmark`` it trains on the same labeled cases as ``nnUNetTrainerSupervised`` (the benchmark's
    seed draws those) with a different initialisation, patch sampling and augmentation. Its paired difference to the
    baseline is what two trainings of the same method differ by; an SSL trainer's difference to the baseline means
    little unless it exceeds that."""

    training_seed_offset = 1000


class nnUNetTrainerSSL(ScheduleFromEnvironment, nnUNetTrainer):
    """Base class of all SSL trainers (not meant to be trained directly).

    Subclasses set the class attributes below and override the host hooks ``build_ssl_modules``,
    ``student_input``, ``reference_logits``, ``unsupervised_loss`` and ``after_optimizer_step``; state
    that must survive ``--c`` goes through ``ssl_state_dict``/``load_ssl_state_dict``."""

    #: global unlabeled batch per step, split over DDP ranks like nnU-Net's batch; None = the labeled batch size
    unlabeled_batch_size: int | None = None
    #: lambda_max, the weight of the unsupervised loss after the ramp-up
    unsupervised_weight: float = 0.1
    #: length of the sigmoid ramp-up of lambda, as a fraction of all training iterations (0 = no ramp)
    rampup_fraction: float = 0.2
    #: which unlabeled views get their own intensity augmentation (all views share the geometric one)
    view_intensity: tuple[bool, ...] = (True, True)
    #: confidence above which a pseudo-label voxel counts as covered (logged statistic)
    confidence_threshold: float = 0.95
    #: whether the loss also needs the reference prediction on labeled images (labeled_loss)
    uses_labeled_reference: bool = False
    #: hosts with hard argmax pseudo-labels cannot train region-based (sigmoid, overlapping) datasets
    needs_argmax_labels: bool = False
    #: what the reference model is called in logs and plots
    reference_name: str = "reference"
    student_name: str = "student"

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.is_ddp and device.type != "cuda" and dist.get_backend() == "gloo":
            # nnU-Net assumes DDP means CUDA; keep a CPU device for gloo (used to test the DDP path)
            self.device = device
            self.grad_scaler = None
        if self.is_cascaded:
            raise SSLInputError(
                f"configuration '{configuration}' is cascaded; SSL trainers support only non-cascaded configurations "
                "(e.g. 3d_fullres, 2d, 3d_lowres)"
            )
        if self.needs_argmax_labels and self.label_manager.has_regions:
            raise SSLInputError(f"{type(self).__name__} needs argmax pseudo-labels; region-based (BraTS-style) "
                                "datasets are not supported, use nnUNetTrainerMeanTeacher")
        self.apply_environment()
        self.ssl_step = 0
        self.dataloader_unlabeled = None
        self.unlabeled_batch_size_per_rank: int | None = None
        self._ssl_state_restored = False
        #: which (supervised, reference) pair a loss call evaluates; symmetric hosts such as CPS set it per call
        self.loss_direction = 0
        self._epoch_stats: list[dict] = []
        self._extra_losses: list[torch.Tensor] = []
        for key in self.ssl_log_keys():
            self.logger.local_logger.my_fantastic_logging.setdefault(key, [])

    # ------------------------------------------------------------------ host hooks
    def build_ssl_modules(self) -> None:
        """Create extra networks (teachers, second networks) after the student exists."""

    def attach_trained_network(self, network: nn.Module) -> tuple[nn.Module, torch.optim.Optimizer, object]:
        """A second trained network (CPS, MEDL): moved to the device, compiled like the student, given the trainer's
        own optimizer and LR recipe, and DDP-wrapped. Returns (network, optimizer, lr_scheduler)."""
        network = network.to(self.device)
        if self._do_i_compile():
            network = torch.compile(network)
        network1 = self.network
        self.network = network  # configure_optimizers reads self.network
        try:
            optimizer, lr_scheduler = self.configure_optimizers()
        finally:
            self.network = network1
        if self.is_ddp:
            network = nn.SyncBatchNorm.convert_sync_batchnorm(network)
            device_ids = [self.local_rank] if self.device.type == "cuda" else None
            network = _nnunet_trainer_module.DDP(network, device_ids=device_ids)
        return network, optimizer, lr_scheduler

    def reference_network(self) -> nn.Module | None:
        """A second model whose validation pseudo-Dice is logged next to the student's (teacher, network 2)."""
        return None

    def sync_reference_from_student(self) -> None:
        """Called at the start of a fresh training (after -pretrained_weights were loaded into the student)."""

    def student_input(self, views: dict[str, torch.Tensor]) -> torch.Tensor:
        """The unlabeled images the student sees with gradient."""
        return views["view0"]

    def reference_logits(self, views: dict[str, torch.Tensor]) -> torch.Tensor:
        """Full-resolution logits of the reference prediction (no gradient)."""
        raise NotImplementedError

    def reference_logits_labeled(self, data: torch.Tensor) -> torch.Tensor:
        """Full-resolution reference logits on the labeled images (only if ``uses_labeled_reference``)."""
        raise NotImplementedError

    def labeled_loss(self, student_logits: torch.Tensor, reference_logits: torch.Tensor,
                     target: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """Extra loss on labeled images that needs the reference (e.g. MetaSSL's labeled branch), weighted by
        lambda like the unsupervised loss; only called if ``uses_labeled_reference``."""
        raise NotImplementedError

    def unsupervised_loss(self, student_logits: torch.Tensor, reference_logits: torch.Tensor,
                          views: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss on the unlabeled batch, in float32 (called outside autocast), plus statistics to log."""
        raise NotImplementedError

    def add_extra_loss(self, weighted_loss: torch.Tensor) -> None:
        """Adds an already weighted float32 term with its own schedule (e.g. QAR) to this step's loss, outside
        lambda(t): ``L = L_sup + lambda(t) L_unsup + sum(extra)``. Call it from a hook during ``forward_losses``."""
        self._extra_losses.append(weighted_loss)

    def after_optimizer_step(self) -> None:
        """E.g. the EMA update of a teacher."""

    def ssl_state_dict(self) -> dict:
        return {"ssl_step": self.ssl_step}

    def load_ssl_state_dict(self, state: dict) -> None:
        self.ssl_step = int(state["ssl_step"])

    def extra_final_checkpoints(self) -> dict[str, dict]:
        """File name -> network state dict written beside checkpoint_final.pth, loadable with
        ``nnUNetv2_predict -chk FILE``."""
        return {}

    @classmethod
    def compute_units(cls, labeled_batch: int, unlabeled_batch: int) -> float:
        """Analytic network cost of one training step, in passes of one sample (forward = 1, backward = 2).

        nnU-Net's supervised step costs ``3 B``. The default counts what :meth:`forward_losses` does: one student
        forward and backward on labeled + unlabeled (``3 (B + U)``), one reference forward without gradient on the
        unlabeled batch (``U``) and, with ``uses_labeled_reference``, one on the labeled batch (``B``). Losses,
        augmentation and EMA updates are not counted. Hosts whose step differs override it
        (``nnUNetv2_ssl_throughput`` reports the count)."""
        extra = labeled_batch if cls.uses_labeled_reference else 0
        return float(3 * (labeled_batch + unlabeled_batch) + unlabeled_batch + extra)

    def ssl_log_keys(self) -> list[str]:
        keys = ["ssl_sup_loss", "ssl_unsup_loss", "ssl_lambda", "ssl_confidence", "ssl_coverage", "ssl_reference_dice"]
        return [*keys, "ssl_labeled_branch_loss"] if self.uses_labeled_reference else keys

    def ssl_plot_panels(self) -> list[tuple[str, dict[str, str]]]:
        """(title, {legend label: log key}) for each panel of progress_ssl.png."""
        unsup = {"unsupervised loss": "ssl_unsup_loss"}
        if self.uses_labeled_reference:  # a labeled branch (MetaSSL) is part of the lambda-weighted term
            unsup = {"unlabeled + labeled branch": "ssl_unsup_loss", "labeled branch alone": "ssl_labeled_branch_loss"}
        return [
            # nnU-Net's Dice + CE turns negative, so it gets a linear axis of its own
            ("supervised loss (nnU-Net's Dice + CE)", {"supervised loss": "ssl_sup_loss"}),
            ("unsupervised loss, before lambda (log)", unsup),
            ("unsupervised weight", {"lambda": "ssl_lambda"}),
            ("pseudo-labels", {"mean confidence": "ssl_confidence",
                               f"coverage (conf >= {self.confidence_threshold})": "ssl_coverage"}),
            ("validation pseudo-Dice", {self.student_name: "mean_fg_dice", self.reference_name: "ssl_reference_dice"}),
        ]

    # ------------------------------------------------------------------ schedule
    @property
    def total_iterations(self) -> int:
        return self.num_epochs * self.num_iterations_per_epoch

    def current_lambda(self) -> float:
        return self.unsupervised_weight * sigmoid_rampup(self.ssl_step, self.rampup_fraction * self.total_iterations)

    @property
    def regions(self) -> bool:
        return self.label_manager.has_regions

    # ------------------------------------------------------------------ nnU-Net lifecycle
    def initialize(self) -> None:
        if self.is_ddp and self.device.type != "cuda" and not self.was_initialized:
            # nnU-Net wraps with DDP(device_ids=[rank]), which only CUDA modules accept
            original = _nnunet_trainer_module.DDP
            _nnunet_trainer_module.DDP = lambda module, device_ids=None, **kw: original(module, **kw)
            try:
                super().initialize()
            finally:
                _nnunet_trainer_module.DDP = original
        else:
            super().initialize()
        self.build_ssl_modules()

    def set_deep_supervision_enabled(self, enabled: bool) -> None:
        super().set_deep_supervision_enabled(enabled)
        ref = self.reference_network()
        if ref is not None:
            unwrap(ref).decoder.deep_supervision = enabled

    def on_train_start(self) -> None:
        if not self.was_initialized:
            self.initialize()
        if not self._ssl_state_restored:
            self.sync_reference_from_student()
        super().on_train_start()

    def get_dataloaders(self):
        # unlabeled first: a missing pool fails before nnU-Net starts its background workers
        self.dataloader_unlabeled = self.get_unlabeled_dataloader()
        return super().get_dataloaders()

    def unlabeled_sources(self) -> list[tuple[str, list[str]]]:
        """(folder, case ids) of the unlabeled pool: preprocessed imagesUnlabeled and the 'unlabeled' list of this
        fold in splits_final.json. Refuses an empty pool and ids that collide with training or validation cases."""
        tr_keys, val_keys = self.do_split()
        labeled = set(tr_keys) | set(val_keys)
        sources = []
        real_folder = unlabeled_preprocessed_folder(self.preprocessed_dataset_folder_base,
                                                    self.configuration_manager.data_identifier)
        if isdir(real_folder):
            real_ids = sorted(nnUNetDatasetBlosc2.get_identifiers(real_folder))
            clash = sorted(set(real_ids) & labeled)
            if clash:
                raise SSLInputError(
                    f"unlabeled case ids {clash[:5]} are also training/validation cases of fold {self.fold}; rename "
                    f"those images in {RAW_UNLABELED_SUBFOLDER} and rerun nnUNetv2_ssl_preprocess_unlabeled"
                )
            test_ids = self._raw_test_ids()
            clash = sorted(set(real_ids) & test_ids)
            if clash:
                raise SSLInputError(
                    f"unlabeled case ids {clash[:5]} are also test cases in imagesTs; remove them from "
                    f"{RAW_UNLABELED_SUBFOLDER} (never train on test images) and rerun "
                    "nnUNetv2_ssl_preprocess_unlabeled"
                )
            if real_ids:
                sources.append((real_folder, real_ids))
        splits_file = join(self.preprocessed_dataset_folder_base, "splits_final.json")
        if self.fold != "all" and isfile(splits_file):
            splits = load_json(splits_file)
            if self.fold < len(splits):
                budget_ids = sorted(splits[self.fold].get(SPLITS_UNLABELED_KEY, []))
                clash = sorted(set(budget_ids) & labeled)
                if clash:
                    raise SSLInputError(
                        f"splits_final.json lists {clash[:5]} as both unlabeled and labeled in fold {self.fold}; "
                        "rewrite the splits with nnUNetv2_ssl_make_splits"
                    )
                missing = [i for i in budget_ids if not isfile(join(self.preprocessed_dataset_folder, i + ".b2nd"))]
                if missing:
                    raise SSLInputError(
                        f"unlabeled cases {missing[:5]} of splits_final.json are not in "
                        f"{self.preprocessed_dataset_folder}; rerun nnUNetv2_preprocess for this configuration"
                    )
                if budget_ids:
                    sources.append((self.preprocessed_dataset_folder, budget_ids))
        if not sources:
            name = self.plans_manager.dataset_name
            raise SSLInputError(
                f"no unlabeled data for {name} ({self.configuration_name}, fold {self.fold}): put images in "
                f"nnUNet_raw/{name}/{RAW_UNLABELED_SUBFOLDER} and run nnUNetv2_ssl_preprocess_unlabeled -d {name} "
                f"-c {self.configuration_name}, or simulate a label budget with nnUNetv2_ssl_make_splits -d {name} "
                "--num-labeled N"
            )
        return sources

    def _raw_test_ids(self) -> set[str]:
        raw = os.environ.get("nnUNet_raw")
        if not raw:
            return set()
        folder = join(raw, self.plans_manager.dataset_name, "imagesTs")
        if not isdir(folder):
            return set()
        ending = self.dataset_json["file_ending"]
        return {f[: -len(ending) - 5] for f in os.listdir(folder) if f.endswith(ending)}

    def _unlabeled_batch_size_for_this_rank(self) -> int:
        if self.unlabeled_batch_size is None:
            return self.batch_size
        if not self.is_ddp:
            return int(self.unlabeled_batch_size)
        world, rank = dist.get_world_size(), dist.get_rank()
        per_rank = [self.unlabeled_batch_size // world + (1 if r < self.unlabeled_batch_size % world else 0)
                    for r in range(world)]
        if min(per_rank) < 1:
            raise SSLInputError(f"unlabeled_batch_size={self.unlabeled_batch_size} is smaller than the number of "
                                f"GPUs ({world}); raise it to at least {world}")
        return per_rank[rank]

    def get_unlabeled_dataloader(self):
        pool = UnlabeledPool(self.unlabeled_sources())
        rotation, dummy_2d, initial_patch_size, mirror_axes = \
            self.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        pipeline = self.get_training_transforms(
            self.configuration_manager.patch_size, rotation, None, mirror_axes, dummy_2d,
            use_mask_for_norm=self.configuration_manager.use_mask_for_norm, is_cascaded=False,
            foreground_labels=self.label_manager.foreground_labels,
            regions=self.label_manager.foreground_regions if self.label_manager.has_regions else None,
            ignore_label=self.label_manager.ignore_label)
        geometric, intensity = split_transforms(pipeline)
        self.unlabeled_batch_size_per_rank = self._unlabeled_batch_size_for_this_rank()
        loader = UnlabeledMultiViewLoader(pool, self.unlabeled_batch_size_per_rank, initial_patch_size,
                                          self.configuration_manager.patch_size, self.label_manager, geometric,
                                          intensity, self.view_intensity)
        self.print_to_log_file(f"unlabeled pool: {len(pool)} cases, {self.unlabeled_batch_size_per_rank} per step "
                               f"and rank", also_print_to_console=True)
        n_proc = get_allowed_n_proc_DA()
        return make_augmenter(loader, max(1, n_proc // 2) if n_proc > 0 else 0, self.device.type == "cuda")

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        ref = self.reference_network()
        if ref is not None:
            ref.train()
        self._epoch_stats = []

    def _autocast(self):
        return autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context()

    def _no_autocast(self):
        return autocast(self.device.type, enabled=False) if self.device.type == "cuda" else dummy_context()

    def trainable(self) -> list[tuple[nn.Module, torch.optim.Optimizer]]:
        """(network, optimizer) pairs stepped every iteration."""
        return [(self.network, self.optimizer)]

    def forward_losses(self, data: torch.Tensor, target, views: dict[str, torch.Tensor]):
        """Returns (supervised loss, unsupervised loss before lambda, statistics) for one step.

        One forward through the (DDP) student on labeled + unlabeled: one gradient sync per step, and with nnU-Net's
        per-sample InstanceNorm the concatenation changes nothing. The unsupervised part runs in float32."""
        n_labeled = data.shape[0]
        with self._autocast():
            output = self.network(torch.cat([data, self.student_input(views)], 0))
            out_labeled, out_unlabeled = split_batch(output, n_labeled)
            sup_loss = self.loss(out_labeled, target)
            with torch.no_grad():
                reference = self.reference_logits(views)
                reference_labeled = self.reference_logits_labeled(data) if self.uses_labeled_reference else None
        with self._no_autocast():
            unsup_loss, stats = self.unsupervised_loss(full_resolution(out_unlabeled).float(), reference.float(),
                                                       views)
            stats = {**confidence_stats(reference, self.confidence_threshold, self.regions), **stats}
            if reference_labeled is not None:
                lab_loss, lab_stats = self.labeled_loss(full_resolution(out_labeled).float(),
                                                        reference_labeled.float(), full_resolution(target))
                unsup_loss = unsup_loss + lab_loss
                stats.update(lab_stats, labeled_branch_loss=lab_loss.detach())
        return sup_loss, unsup_loss, stats

    def train_step(self, batch: dict) -> dict:
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"]
        target = [t.to(self.device, non_blocking=True) for t in target] if isinstance(target, list) \
            else target.to(self.device, non_blocking=True)
        unlabeled = next(self.dataloader_unlabeled)
        views = {k: v.to(self.device, non_blocking=True) for k, v in unlabeled.items() if k.startswith("view")}
        lam = self.current_lambda()
        pairs = self.trainable()
        for _, optimizer in pairs:
            optimizer.zero_grad(set_to_none=True)
        self._extra_losses = []
        sup_loss, unsup_loss, stats = self.forward_losses(data, target, views)
        with self._no_autocast():
            loss = sup_loss.float() + lam * unsup_loss
            for extra in self._extra_losses:
                loss = loss + extra
        self._extra_losses = []
        if self.grad_scaler is not None:
            # one scaler for all optimizers, as GradScaler supports
            self.grad_scaler.scale(loss).backward()
            for network, optimizer in pairs:
                self.grad_scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(network.parameters(), 12)
                self.grad_scaler.step(optimizer)
            self.grad_scaler.update()
        else:
            loss.backward()
            for network, optimizer in pairs:
                torch.nn.utils.clip_grad_norm_(network.parameters(), 12)
                optimizer.step()
        self.after_optimizer_step()
        self.ssl_step += 1
        self._epoch_stats.append({"ssl_sup_loss": float(sup_loss.detach()),
                                  "ssl_unsup_loss": float(unsup_loss.detach()), "ssl_lambda": lam,
                                  **{f"ssl_{k}": float(v) for k, v in stats.items()}})
        return {"loss": loss.detach().cpu().numpy()}

    def on_train_epoch_end(self, train_outputs: list[dict]) -> None:
        super().on_train_epoch_end(train_outputs)
        keys = [k for k in self.ssl_log_keys() if k != "ssl_reference_dice"]
        means = {k: float(np.nanmean([s.get(k, np.nan) for s in self._epoch_stats])) if self._epoch_stats
                 else float("nan") for k in keys}
        if self.is_ddp:
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, means)
            means = {k: float(np.nanmean([g[k] for g in gathered])) for k in keys}
        for k in keys:
            self.logger.log(k, means[k], self.current_epoch)
        branch = f" (labeled branch {means['ssl_labeled_branch_loss']:.4f})" if self.uses_labeled_reference else ""
        self.print_to_log_file(
            "ssl: sup {:.4f} unsup {:.4f}{} lambda {:.4f} confidence {:.3f} coverage {:.3f}".format(
                means["ssl_sup_loss"], means["ssl_unsup_loss"], branch, means["ssl_lambda"], means["ssl_confidence"],
                means["ssl_coverage"]))

    def on_validation_epoch_start(self) -> None:
        super().on_validation_epoch_start()
        ref = self.reference_network()
        if ref is not None:
            ref.eval()

    def validation_step(self, batch: dict) -> dict:
        ref = self.reference_network()
        # nnU-Net's validation_step edits the target in place (ignore label), so the reference gets its own copy
        target = batch["target"]
        ref_batch = {**batch, "target": [t.clone() for t in target] if isinstance(target, list) else target.clone()}
        result = super().validation_step(batch)
        if ref is not None:
            student = self.network
            self.network = ref
            try:
                ref_result = super().validation_step(ref_batch)
            finally:
                self.network = student
            result.update({f"ref_{k}": ref_result[k] for k in ("tp_hard", "fp_hard", "fn_hard")})
        return result

    def on_validation_epoch_end(self, val_outputs: list[dict]) -> None:
        super().on_validation_epoch_end(val_outputs)
        dice = float("nan")
        if val_outputs and "ref_tp_hard" in val_outputs[0]:
            sums = [np.sum([o[f"ref_{k}"] for o in val_outputs], 0) for k in ("tp_hard", "fp_hard", "fn_hard")]
            if self.is_ddp:
                gathered = [None] * dist.get_world_size()
                dist.all_gather_object(gathered, sums)
                sums = [np.sum([g[i] for g in gathered], 0) for i in range(3)]
            tp, fp, fn = sums
            with np.errstate(invalid="ignore", divide="ignore"):
                dice = float(np.nanmean(2 * tp / (2 * tp + fp + fn)))
        self.logger.log("ssl_reference_dice", dice, self.current_epoch)

    def on_epoch_end(self) -> None:
        super().on_epoch_end()  # increments current_epoch
        if self.local_rank == 0:
            try:
                plot_ssl_progress(self.logger.local_logger.my_fantastic_logging, self.ssl_plot_panels(),
                                  join(self.output_folder, "progress_ssl.png"))
            except Exception as e:  # a plotting failure must never stop a training
                self.print_to_log_file(f"could not draw progress_ssl.png: {e}")

    def save_checkpoint(self, filename: str) -> None:
        super().save_checkpoint(filename)
        if self.local_rank == 0 and not self.disable_checkpointing:
            checkpoint = torch.load(filename, map_location="cpu", weights_only=False)
            checkpoint["ssl_state"] = self.ssl_state_dict()
            tmp = filename + ".tmp"
            torch.save(checkpoint, tmp)
            os.replace(tmp, filename)

    def load_checkpoint(self, filename_or_checkpoint: str) -> None:
        if not isinstance(filename_or_checkpoint, str):
            raise TypeError("nnunet-ssl trainers load checkpoints from a path")  # nnU-Net 2.8.1 breaks on dicts
        super().load_checkpoint(filename_or_checkpoint)
        checkpoint = torch.load(filename_or_checkpoint, map_location=self.device, weights_only=False)
        for key in self.ssl_log_keys():  # checkpoints of older versions may lack keys
            self.logger.local_logger.my_fantastic_logging.setdefault(key, [])
        if "ssl_state" in checkpoint:
            self.load_ssl_state_dict(checkpoint["ssl_state"])
            self._ssl_state_restored = True
        else:
            self.print_to_log_file(f"{filename_or_checkpoint} has no SSL state; the reference model restarts from "
                                   "the student", also_print_to_console=True)

    def on_train_end(self) -> None:
        super().on_train_end()
        if self.local_rank == 0 and not self.disable_checkpointing:
            final = torch.load(join(self.output_folder, "checkpoint_final.pth"), map_location="cpu",
                               weights_only=False)
            for filename, weights in self.extra_final_checkpoints().items():
                checkpoint = {k: final[k] for k in ("init_args", "trainer_name", "inference_allowed_mirroring_axes",
                                                    "current_epoch")}
                checkpoint["network_weights"] = {k: v.detach().cpu() for k, v in weights.items()}
                torch.save(checkpoint, join(self.output_folder, filename))
        if isinstance(self.dataloader_unlabeled, (NonDetMultiThreadedAugmenter, MultiThreadedAugmenter)):
            self.dataloader_unlabeled._finish()
        self.dataloader_unlabeled = None
