"""The SSL trainer: hooks, the training step, and the SSL state in nnU-Net's checkpoints.

``nnUNetTrainerSSL`` adds to ``nnUNetTrainer`` the loss ``L = L_sup + lambda(t) * L_unsup`` with nnU-Net's
deep-supervised DC+CE as ``L_sup`` and a sigmoid ramp-up of ``lambda`` over 20 % of training for every trainer
(optionally following the ratio of the two losses' sizes, :mod:`nnunet_ssl.parts.balance`); ``preset = "paper"``
gives each method's published configuration. Hosts (``trainers/hosts/``) override the hooks
that say where the reference prediction comes from; plug-ins (``trainers/plugins/``) override how each voxel of the
two predictions is used. Every hook of one step receives the same :class:`~nnunet_ssl.trainers.step.SSLStep`.
The unlabeled data comes from :class:`~nnunet_ssl.trainers.unlabeled.UnlabeledData`, the logs and plots from
:class:`~nnunet_ssl.trainers.logs.SSLLogs`; nnU-Net internals only through :mod:`nnunet_ssl.compat.trainer`.
"""

from __future__ import annotations

import ast
import os
from collections.abc import Sequence
from typing import ClassVar

import torch
from batchgenerators.utilities.file_and_folder_operations import isfile, join
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.helpers import dummy_context
from torch import autocast, nn
from torch import distributed as dist

from nnunet_ssl.compat.trainer import (
    ensure_log_keys,
    gloo_on_cpu,
    initialize_on_cpu_ddp,
    keep_cpu_device,
    set_deep_supervision,
    stop_augmenter,
    write_inference_checkpoint,
)
from nnunet_ssl.errors import SSLInputError
from nnunet_ssl.losses.consistency import confidence_stats
from nnunet_ssl.parts.balance import LossBalance
from nnunet_ssl.parts.ramps import sigmoid_rampup
from nnunet_ssl.trainers.calibration import ReferenceCalibration
from nnunet_ssl.trainers.checkpoints import AtomicCheckpoints
from nnunet_ssl.trainers.environment import ScheduleFromEnvironment, env_int
from nnunet_ssl.trainers.logs import SSLLogs
from nnunet_ssl.trainers.step import SSLStep
from nnunet_ssl.trainers.unlabeled import UnlabeledData


def full_resolution(output: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """The highest-resolution logits of a (possibly deep-supervised) network output."""
    return output[0] if isinstance(output, (list, tuple)) else output


def split_batch(output: torch.Tensor | Sequence[torch.Tensor], n: int):
    """Splits each deep-supervision scale of ``output`` into its first ``n`` samples and the rest."""
    if isinstance(output, (list, tuple)):
        return [o[:n] for o in output], [o[n:] for o in output]
    return output[:n], output[n:]


#: 1 lets ``--c`` continue from a checkpoint without SSL state, restarting the reference model from the student
ENV_RESTART_REFERENCE = "nnUNet_ssl_restart_reference"
#: how many steps with non-finite gradients a run may skip before it stops (default 0)
ENV_SKIP_NONFINITE = "nnUNet_ssl_skip_nonfinite"
#: "paper" trains every host and plug-in with its published configuration instead of our defaults
ENV_PRESET = "nnUNet_ssl_preset"
PRESETS = ("default", "paper")
#: "name=value,name=value": class attributes of the trainer set for this run, after the preset (sweeps)
ENV_SETTINGS = "nnUNet_ssl_settings"


def parse_settings(text: str, cls: type) -> dict[str, object]:
    """``"unsupervised_share=0.5, view_intensity=(False, 'strong')"`` -> {name: Python literal}; one clear error
    for a name the trainer does not have or a value that is not a literal."""
    if not text.strip():
        return {}
    example = f"write e.g. {ENV_SETTINGS}='unsupervised_share=0.5, rampup_fraction=0.3'"
    try:
        call = ast.parse(f"settings({text})", mode="eval").body
    except SyntaxError:
        raise SSLInputError(f"{ENV_SETTINGS}={text!r} is not a list of name=value; {example}") from None
    if call.args or any(kw.arg is None for kw in call.keywords):
        raise SSLInputError(f"{ENV_SETTINGS}={text!r}: every item must be name=value; {example}")
    settings: dict[str, object] = {}
    for kw in call.keywords:
        if kw.arg.startswith("_") or not hasattr(cls, kw.arg) or callable(getattr(cls, kw.arg)):
            raise SSLInputError(f"{ENV_SETTINGS}: {cls.__name__} has no setting '{kw.arg}'; the settings are its "
                                "class attributes (see the docstrings of its host and plug-ins)")
        try:
            settings[kw.arg] = ast.literal_eval(kw.value)
        except ValueError:
            raise SSLInputError(f"{ENV_SETTINGS}: the value of '{kw.arg}' ({ast.unparse(kw.value)}) is not a Python "
                                "literal (a number, True/False/None, a quoted string or a tuple)") from None
    return settings


def paper_settings_of(cls: type) -> dict[str, object]:
    """The attributes that ``preset = "paper"`` sets: every class's ``paper_settings`` along the MRO, the more
    derived class winning (a plug-in over its host)."""
    settings: dict[str, object] = {}
    for klass in reversed(cls.__mro__):
        settings.update(klass.__dict__.get("paper_settings", {}))
    return settings


class nnUNetTrainerSSL(UnlabeledData, ReferenceCalibration, SSLLogs, AtomicCheckpoints, ScheduleFromEnvironment,
                       nnUNetTrainer):
    """Base class of all SSL trainers (not meant to be trained directly).

    Hosts and plug-ins set the class attributes below and override the hooks; state that must survive ``--c`` goes
    through ``ssl_state_dict``/``load_ssl_state_dict``."""

    #: "default" (settings under which each mechanism acts) or "paper" (each method's published configuration:
    #: ``paper_settings`` of every host and plug-in); ``nnUNet_ssl_preset`` overrides it
    preset: str = "default"
    #: what ``preset = "paper"`` changes, per class (merged along the MRO by :func:`paper_settings_of`)
    paper_settings: ClassVar[dict[str, object]] = {"unsupervised_share": None, "calibrate_reference": False}
    #: global unlabeled batch per step, split over DDP ranks like nnU-Net's batch; None = the labeled batch size
    unlabeled_batch_size: int | None = None
    #: rho: after the ramp, lambda L_unsup averages rho (L_sup + n) (:mod:`nnunet_ssl.parts.balance`); None (default)
    #: = the fixed ``unsupervised_weight``. Off by default: measured on Hippocampus, rho = 0.2 drove lambda to
    #: 280-990 as the unsupervised loss shrank, and the posterior class was not learned by 45 % of training
    unsupervised_share: float | None = None
    #: lambda_max after the common ramp; with a share, the weight of the first steps before the loss sizes are known
    unsupervised_weight: float = 0.1
    #: with a share: the largest lambda (bounds the weight while the unsupervised loss is nearly zero)
    max_unsupervised_weight: float = 1000.0
    #: length of the sigmoid ramp-up of lambda, as a fraction of all training iterations (0 = no ramp)
    rampup_fraction: float = 0.2
    #: which unlabeled views get their own intensity augmentation (all views share the geometric one)
    view_intensity: tuple[bool, ...] = (True, True)
    #: confidence above which a pseudo-label voxel counts as covered (logged statistic)
    confidence_threshold: float = 0.95
    #: whether the host's loss keeps only voxels above ``confidence_threshold`` (the log warns when it drops nearly
    #: every voxel for an epoch)
    uses_confidence_gate: bool = False
    #: whether the loss also needs the reference prediction on labeled images (labeled_loss)
    uses_labeled_reference: bool = False
    #: the reference on labeled images is the student itself (FixMatch): its detached output is reused
    labeled_reference_is_student: bool = False
    #: the host's ``reference_logits`` already divides by its temperatures (AD-MT fuses two teachers after scaling
    #: each), so the step does not divide the fused reference again
    reference_is_calibrated: bool = False
    #: how many (student, reference) pairs a step evaluates (``step.direction`` runs over them): 2 for two networks
    loss_directions: int = 1
    #: whether ``unsupervised_loss`` takes ``voxel_weights`` (a plug-in such as quality weights may pass them)
    accepts_voxel_weights: bool = False
    #: hosts with hard argmax pseudo-labels cannot train region-based (sigmoid, overlapping) datasets
    needs_argmax_labels: bool = False
    #: what the reference model is called in logs and plots
    reference_name: str = "reference"
    student_name: str = "student"

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        if gloo_on_cpu(self, device):
            keep_cpu_device(self, device)
        if self.is_cascaded:
            raise SSLInputError(
                f"configuration '{configuration}' is cascaded; SSL trainers support only non-cascaded configurations "
                "(e.g. 3d_fullres, 2d, 3d_lowres)"
            )
        if self.needs_argmax_labels and self.label_manager.has_regions:
            raise SSLInputError(f"{type(self).__name__} needs argmax pseudo-labels; region-based (BraTS-style) "
                                "datasets are not supported, use nnUNetTrainerMeanTeacher")
        self.apply_preset()
        self.apply_environment()
        self.ssl_step = 0
        self.loss_balance = LossBalance(initial_weight=self.unsupervised_weight)
        self._nonfinite_steps = 0  # all skipped steps, and those in a row (AMP), for check_finite
        self._nonfinite_in_a_row = 0
        self._nonfinite_last_step = -1  # a step of several turns (M&N) counts once
        self.partially_labeled_ids: list[str] = []
        self.dataloader_unlabeled = None
        self.unlabeled_batch_size_per_rank: int | None = None
        self._ssl_state_restored = False
        self.init_calibration()
        self.init_ssl_logs()

    def apply_preset(self) -> None:
        """Sets the ``paper_settings`` of every host and plug-in on this instance when the preset is "paper", then
        the settings of ``nnUNet_ssl_settings``."""
        preset = os.environ.get(ENV_PRESET) or self.preset
        if preset not in PRESETS:
            raise SSLInputError(f"preset {preset!r} is unknown ({ENV_PRESET} or the class attribute 'preset'); use "
                                f"one of {', '.join(PRESETS)}")
        self.preset = preset
        if preset == "paper":
            for name, value in paper_settings_of(type(self)).items():
                setattr(self, name, value)
        self.settings = parse_settings(os.environ.get(ENV_SETTINGS, ""), type(self))
        for name, value in self.settings.items():
            setattr(self, name, value)

    # ------------------------------------------------------------------ hooks
    def build_ssl_modules(self) -> None:
        """Create extra networks (teachers, second networks) and loss modules after the student exists."""

    def reference_network(self) -> nn.Module | None:
        """A second model whose validation pseudo-Dice is logged next to the student's (teacher, network 2)."""
        return None

    def sync_reference_from_student(self) -> None:
        """Called at the start of a fresh training (after -pretrained_weights were loaded into the student)."""

    def student_input(self, step: SSLStep) -> torch.Tensor:
        """The unlabeled images the student sees with gradient (a host that mixes them sets ``step.mix``)."""
        return step.views["view0"]

    def reference_logits(self, step: SSLStep) -> torch.Tensor:
        """Full-resolution logits of the reference prediction on the unlabeled batch (no gradient)."""
        raise NotImplementedError

    def reference_logits_labeled(self, step: SSLStep) -> torch.Tensor:
        """Full-resolution reference logits on the labeled images (only if ``uses_labeled_reference``)."""
        raise NotImplementedError

    def unsupervised_loss(self, student_logits: torch.Tensor, reference_logits: torch.Tensor,
                          step: SSLStep) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss on the unlabeled batch, in float32 (called outside autocast), plus statistics to log."""
        raise NotImplementedError

    def labeled_loss(self, student_logits: torch.Tensor, reference_logits: torch.Tensor, target: torch.Tensor,
                     step: SSLStep) -> tuple[torch.Tensor, dict[str, float]]:
        """Extra loss on labeled images that needs the reference (e.g. MetaSSL's labeled branch), weighted by
        lambda like the unsupervised loss; only called if ``uses_labeled_reference``."""
        raise NotImplementedError

    def after_optimizer_step(self) -> None:
        """E.g. the EMA update of a teacher."""

    def trainable(self) -> list[tuple[nn.Module, torch.optim.Optimizer]]:
        """(network, optimizer) pairs stepped every iteration."""
        return [(self.network, self.optimizer)]

    def ssl_state_dict(self) -> dict:
        return {"ssl_step": self.ssl_step, "loss_balance": self.loss_balance.state_dict(), "preset": self.preset,
                "settings": {k: repr(v) for k, v in self.settings.items()}, "temperatures": list(self.temperatures)}

    def load_ssl_state_dict(self, state: dict) -> None:
        self.ssl_step = int(state["ssl_step"])
        if "loss_balance" in state:  # checkpoints of older versions have none: the balance restarts
            self.loss_balance.load_state_dict(state["loss_balance"])
        self.temperatures = [float(t) for t in state.get("temperatures", self.temperatures)]
        saved = state.get("preset", self.preset)
        if saved != self.preset:
            raise SSLInputError(f"the checkpoint was trained with preset {saved!r}, this run uses {self.preset!r}; "
                                f"resume with the same preset ({ENV_PRESET}={saved})")
        settings = state.get("settings", {})
        if settings != {k: repr(v) for k, v in self.settings.items()}:
            text = ",".join(f"{k}={v}" for k, v in settings.items())
            raise SSLInputError(f"the checkpoint was trained with {ENV_SETTINGS}='{text}', this run with "
                                f"'{os.environ.get(ENV_SETTINGS, '')}'; resume with the same settings")

    def extra_final_checkpoints(self) -> dict[str, tuple[dict[str, torch.Tensor], dict]]:
        """File name -> (network state dict, overrides of checkpoint keys) written beside checkpoint_final.pth,
        loadable with ``nnUNetv2_predict -chk FILE``."""
        return {}

    @classmethod
    def compute_units(cls, labeled_batch: int, unlabeled_batch: int) -> float:
        """Analytic network cost of one training step, in passes of one sample (forward = 1, backward = 2).

        nnU-Net's supervised step costs ``3 B``. The default counts what :meth:`forward_losses` does: one student
        forward and backward on labeled + unlabeled (``3 (B + U)``), one reference forward without gradient on the
        unlabeled batch (``U``: the EMA teacher, or the same network on the weak view) and, with
        ``uses_labeled_reference``, one on the labeled batch (``B``). Losses, augmentation and EMA updates are not
        counted (``nnUNetv2_ssl_throughput`` reports the count)."""
        extra = labeled_batch if cls.uses_labeled_reference and not cls.labeled_reference_is_student else 0
        return float(3 * (labeled_batch + unlabeled_batch) + unlabeled_batch + extra)

    # ------------------------------------------------------------------ schedule
    @property
    def total_iterations(self) -> int:
        return self.num_epochs * self.num_iterations_per_epoch

    def ramp(self) -> float:
        """The sigmoid ramp of this step, in [0, 1]: the one schedule every term of every trainer follows."""
        return sigmoid_rampup(self.ssl_step, self.rampup_fraction * self.total_iterations)

    def current_lambda(self) -> float:
        if self.unsupervised_share is None:
            return self.unsupervised_weight * self.ramp()
        return self.ramp() * self.loss_balance.weight(self.unsupervised_share, self.max_unsupervised_weight)

    def mean_over_ranks(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` averaged over the DDP ranks (in float64; unchanged without DDP), so that every rank derives
        the same weights and thresholds from them."""
        if not self.is_ddp:
            return values
        values = values.to(torch.float64)
        dist.all_reduce(values)
        return values / dist.get_world_size()

    def observe_losses(self, step: SSLStep, sup_loss: torch.Tensor, unsup_loss: torch.Tensor) -> float:
        """Feeds this step's loss sizes to the balance (averaged over DDP ranks, so every rank keeps the same
        lambda); returns ``L_sup + n`` (n networks), the supervised size the logged shares divide by."""
        values = torch.stack([sup_loss.detach().float() + len(self.trainable()), unsup_loss.detach().float()])
        if self.unsupervised_share is not None:
            values = self.mean_over_ranks(values)
        sup, unsup = values.tolist()
        self.loss_balance.update(sup, unsup)
        return sup

    @property
    def regions(self) -> bool:
        return self.label_manager.has_regions

    # ------------------------------------------------------------------ nnU-Net lifecycle
    def initialize(self) -> None:
        if gloo_on_cpu(self, self.device) and not self.was_initialized:
            initialize_on_cpu_ddp(self, super().initialize)
        else:
            super().initialize()
        self.build_ssl_modules()

    def set_deep_supervision_enabled(self, enabled: bool) -> None:
        super().set_deep_supervision_enabled(enabled)
        ref = self.reference_network()
        if ref is not None:
            set_deep_supervision(ref, enabled)

    def on_train_start(self) -> None:
        if not self.was_initialized:
            self.initialize()
        if not self._ssl_state_restored:
            self.sync_reference_from_student()
        super().on_train_start()
        self.print_to_log_file(f"SSL preset '{self.preset}'" + (f", settings from {ENV_SETTINGS}: {self.settings}"
                                                                if self.settings else ""), also_print_to_console=True)

    def _autocast(self):
        return autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context()

    def _no_autocast(self):
        return autocast(self.device.type, enabled=False) if self.device.type == "cuda" else dummy_context()

    def forward_losses(self, step: SSLStep) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        """Returns (supervised loss, unsupervised loss before lambda, statistics) for one step.

        One forward through the (DDP) student on labeled + unlabeled: one gradient sync per step, and with nnU-Net's
        per-sample InstanceNorm the concatenation changes nothing. The unsupervised part runs in float32."""
        n_labeled = step.data.shape[0]
        with self._autocast():
            step.student_image = self.student_input(step)
            output = self.network(torch.cat([step.data, step.student_image], 0))
            out_labeled, out_unlabeled = split_batch(output, n_labeled)
            sup_loss = self.loss(out_labeled, step.target)
            with torch.no_grad():
                reference = self.reference_logits(step)
                if not self.reference_is_calibrated:
                    reference = self.calibrated(reference)
                reference_labeled = None
                if self.uses_labeled_reference:
                    # the same network on the same images: its output is the reference, no third forward
                    reference_labeled = full_resolution(out_labeled).detach() if self.labeled_reference_is_student \
                        else self.reference_logits_labeled(step)
        with self._no_autocast():
            unsup_loss, stats = self.unsupervised_loss(full_resolution(out_unlabeled).float(), reference.float(), step)
            stats = {**confidence_stats(reference, self.confidence_threshold, self.regions), **stats}
            if step.mix is not None:
                stats["mixed_fraction"] = float(step.mix.float().mean())
            if reference_labeled is not None:
                lab_loss, lab_stats = self.labeled_loss(full_resolution(out_labeled).float(),
                                                        reference_labeled.float(), full_resolution(step.target), step)
                unsup_loss = unsup_loss + lab_loss
                stats.update(lab_stats, labeled_branch_loss=lab_loss.detach())
        return sup_loss, unsup_loss, stats

    def train_step(self, batch: dict) -> dict:
        target = batch["target"]
        unlabeled = next(self.dataloader_unlabeled)
        step = SSLStep(
            data=batch["data"].to(self.device, non_blocking=True),
            target=[t.to(self.device, non_blocking=True) for t in target] if isinstance(target, list)
            else target.to(self.device, non_blocking=True),
            views={k: v.to(self.device, non_blocking=True) for k, v in unlabeled.items() if k.startswith("view")},
            lam=self.current_lambda())
        ramp = self.ramp()
        pairs = self.trainable()
        for _, optimizer in pairs:
            optimizer.zero_grad(set_to_none=True)
        sup_loss, unsup_loss, stats = self.forward_losses(step)
        with self._no_autocast():
            loss = step.total(sup_loss, unsup_loss)
        sup_size = self.observe_losses(step, sup_loss, unsup_loss)
        if self.grad_scaler is not None:
            # one scaler for all optimizers, as GradScaler supports; it skips steps with non-finite gradients
            self.grad_scaler.scale(loss).backward()
            norms = []
            for network, optimizer in pairs:
                self.grad_scaler.unscale_(optimizer)
                norms.append(torch.nn.utils.clip_grad_norm_(network.parameters(), 12))
                self.grad_scaler.step(optimizer)
            self.grad_scaler.update()
            self.check_finite(norms, step, sup_loss, unsup_loss)
            self.after_optimizer_step()
        else:
            loss.backward()
            norms = [torch.nn.utils.clip_grad_norm_(network.parameters(), 12) for network, _ in pairs]
            # decided on the gradient norm, identical on every DDP rank after the all-reduce, so ranks agree
            if self.check_finite(norms, step, sup_loss, unsup_loss):
                for _, optimizer in pairs:
                    optimizer.step()
                self.after_optimizer_step()
        self.ssl_step += 1
        weighted = step.lam * float(unsup_loss.detach())
        others = sum(float(t.detach()) for t in [*step.constant_losses, *step.scheduled_losses])
        self.record_step_stats({"ssl_sup_loss": float(sup_loss.detach()), "ssl_unsup_loss": float(unsup_loss.detach()),
                                "ssl_lambda": step.lam, "ssl_ramp": ramp,
                                "ssl_unsup_share": weighted / max(sup_size, 1e-8),
                                "ssl_other_share": others / max(sup_size, 1e-8),
                                **{f"ssl_{k}": float(v) for k, v in stats.items()}})
        return {"loss": loss.detach().cpu().numpy()}

    # ------------------------------------------------------------------ non-finite steps
    def check_finite(self, norms: list[torch.Tensor], step: SSLStep, sup_loss: torch.Tensor,
                     unsup_loss: torch.Tensor) -> bool:
        """Whether this step's gradients are finite. A non-finite step is skipped (no optimizer step, no EMA
        update) while ``nnUNet_ssl_skip_nonfinite`` allows it (default 0; with CUDA AMP the GradScaler skips such
        steps itself and only 100 in a row stop the run); otherwise the run stops with one line naming the step,
        the loss terms and the last good checkpoint, before NaN reaches the weights or any checkpoint. Hosts that
        step their networks in turns call it once per turn; a training step counts once however many of its turns
        fail, so the limits are in steps for every host."""
        if all(bool(torch.isfinite(n)) for n in norms):
            if self._nonfinite_last_step != self.ssl_step:
                self._nonfinite_in_a_row = 0
            return True
        if self._nonfinite_last_step != self.ssl_step:
            self._nonfinite_last_step = self.ssl_step
            self._nonfinite_steps += 1
            self._nonfinite_in_a_row += 1
        allowed = env_int(ENV_SKIP_NONFINITE, 0) or 0
        amp = self.grad_scaler is not None
        if (self._nonfinite_in_a_row <= max(allowed, 99)) if amp else (self._nonfinite_steps <= allowed):
            self.print_to_log_file(f"step {self.ssl_step}: non-finite gradients, step skipped "
                                   f"({self._nonfinite_steps} so far)", also_print_to_console=True)
            return False
        terms = {"supervised": sup_loss, "unsupervised": unsup_loss,
                 **{f"constant term {i}": t for i, t in enumerate(step.constant_losses)},
                 **{f"scheduled term {i}": t for i, t in enumerate(step.scheduled_losses)}}
        bad = [f"{k} {float(v.detach()):g}" for k, v in terms.items() if not bool(torch.isfinite(v.detach()))]
        last = [n for n in ("checkpoint_latest.pth", "checkpoint_best.pth")
                if isfile(join(self.output_folder, n))]
        raise SSLInputError(
            f"non-finite loss or gradients at step {self.ssl_step} (epoch {self.current_epoch}): "
            f"{', '.join(bad) or 'the loss terms are finite, the gradients are not'}; the weights were not updated "
            f"and no final checkpoint is written; last good checkpoint: "
            f"{join(self.output_folder, last[0]) if last else 'none yet'}. Check the images for NaN (rerun "
            f"nnUNetv2_ssl_preprocess_unlabeled, which refuses them) or lower the learning rate; "
            f"{ENV_SKIP_NONFINITE}=N skips up to N such steps")

    # ------------------------------------------------------------------ checkpoints
    def extra_checkpoint_entries(self) -> dict:
        return {"ssl_state": self.ssl_state_dict()}

    def after_checkpoint_loaded(self, filename: str, checkpoint: dict) -> None:
        ensure_log_keys(self, self.ssl_log_keys())  # checkpoints of older versions may lack keys
        if "ssl_state" in checkpoint:
            self.load_ssl_state_dict(checkpoint["ssl_state"])
            self._ssl_state_restored = True
        elif env_int(ENV_RESTART_REFERENCE, 0):
            # the schedule (lambda ramp, EMA warm-up) goes on from the epoch nnU-Net restored
            self.ssl_step = self.current_epoch * self.num_iterations_per_epoch
            self.print_to_log_file(f"{filename} has no SSL state; {ENV_RESTART_REFERENCE}=1: the {self.reference_name} "
                                   f"restarts from the student, the step counter from epoch {self.current_epoch}",
                                   also_print_to_console=True)
        else:
            raise SSLInputError(
                f"{filename} has no SSL state ({self.reference_name}, step counter), so --c cannot resume "
                f"{type(self).__name__} exactly; set {ENV_RESTART_REFERENCE}=1 to restart the {self.reference_name} "
                "from the student, or train from its weights with -pretrained_weights")

    def on_train_end(self) -> None:
        super().on_train_end()
        if self.local_rank == 0 and not self.disable_checkpointing:
            final = join(self.output_folder, "checkpoint_final.pth")
            for filename, (weights, overrides) in self.extra_final_checkpoints().items():
                write_inference_checkpoint(final, join(self.output_folder, filename), weights, **overrides)
        stop_augmenter(self.dataloader_unlabeled)
        self.dataloader_unlabeled = None
