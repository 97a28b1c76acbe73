"""Every private or fragile part of nnU-Net's trainer (and of torch's wrappers) that the SSL trainers rely on.

Pinned range: nnunetv2 >= 2.8.0, < 2.9 (``pyproject.toml``). Each function names the nnU-Net code it depends on;
``tests/compat/test_trainer.py`` checks each against the installed nnU-Net, so an nnU-Net release that changes one
of them fails there, by name, instead of silently elsewhere.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator

import torch
from batchgenerators.dataloading.multi_threaded_augmenter import MultiThreadedAugmenter
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from torch import distributed as dist
from torch import nn
from torch._dynamo import OptimizedModule

from nnunet_ssl.errors import SSLInputError

#: the keys of checkpoint_final.pth that nnU-Net's predictor reads besides the weights
#: (nnunetv2/inference/predict_from_raw_data.py, nnUNetPredictor.initialize_from_trained_model_folder)
INFERENCE_KEYS = ("init_args", "trainer_name", "inference_allowed_mirroring_axes", "current_epoch")


def unwrap(network: nn.Module) -> nn.Module:
    """The plain module behind DDP (``.module``) and torch.compile (``OptimizedModule._orig_mod``, a private
    attribute of torch that nnU-Net's own ``save_checkpoint`` also reads)."""
    if isinstance(network, nn.parallel.DistributedDataParallel):
        network = network.module
    if isinstance(network, OptimizedModule):
        network = network._orig_mod
    return network


class FeatureTaps:
    """Forward hooks on a dynamic_network_architectures U-Net (``PlainConvUNet``, ``ResidualEncoderUNet``: the
    networks of nnU-Net's plans) that record, while armed, two intermediate outputs of a normal forward:

    - ``high``: the bottleneck, the output of the encoder's last stage ``encoder.stages[-1]`` (the last of the
      encoder's skips, which the decoder starts from);
    - ``low``: the last decoder stage ``decoder.stages[-1]``, the features the last segmentation head
      (``decoder.seg_layers[-1]``) reads, at the resolution of the first encoder stage (nnU-Net's plans: the full
      patch resolution).

    The hooks sit on the plain module behind DDP and torch.compile (:func:`unwrap`), so the forward still runs
    through the wrappers (DDP's gradient sync). They stay registered, disarmed, until :meth:`remove`: Dynamo
    ignores hooks added to a module after it was compiled (``torch._dynamo.config.skip_nnmodule_hook_guards``),
    so a compiled network needs them before its first forward; disarmed they record nothing (under torch.compile,
    one graph for each state). :func:`feature_taps` is the one-off form that removes them again."""

    NAMES = ("high", "low")

    def __init__(self, network: nn.Module):
        net = unwrap(network)
        encoder, decoder = getattr(net, "encoder", None), getattr(net, "decoder", None)
        stages = [getattr(encoder, "stages", None), getattr(decoder, "stages", None)]
        if any(not isinstance(s, (nn.Sequential, nn.ModuleList)) or len(s) == 0 for s in stages):
            raise SSLInputError(
                f"feature consistency reads the bottleneck (encoder.stages[-1]) and the last decoder stage "
                f"(decoder.stages[-1]) of a dynamic_network_architectures U-Net; {type(net).__name__} has no such "
                "modules: train with plans whose network is PlainConvUNet or ResidualEncoderUNet (nnU-Net's "
                "default or ResEnc plans)")
        self.modules = {"high": stages[0][-1], "low": stages[1][-1]}
        self.armed = False
        self.features: dict[str, torch.Tensor] = {}
        self._handles = [self.modules["high"].register_forward_hook(self._record_high),
                         self.modules["low"].register_forward_hook(self._record_low)]

    def _record_high(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if self.armed:
            self.features["high"] = output

    def _record_low(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if self.armed:
            self.features["low"] = output

    @contextlib.contextmanager
    def capture(self) -> Iterator[dict[str, torch.Tensor]]:
        """Arms the hooks for the forwards inside the block; yields the dict they fill (``high``, ``low``; the same
        dict object every time, emptied on entry: read it before the next capture)."""
        self.features.clear()
        self.armed = True
        try:
            yield self.features
        finally:
            self.armed = False

    def read(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(high, low) of the last captured forward; one clear error if the hooks did not fire."""
        missing = [n for n in self.NAMES if n not in self.features]
        if missing:
            raise SSLInputError(
                f"the feature hooks recorded no {' and no '.join(missing)} features: the network was probably "
                "compiled (torch.compile) before they were registered, or its forward skips encoder.stages[-1] / "
                "decoder.stages[-1]; register FeatureTaps before the first forward, or set nnUNet_compile=f")
        return self.features["high"], self.features["low"]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.armed = False


@contextlib.contextmanager
def feature_taps(network: nn.Module) -> Iterator[FeatureTaps]:
    """:class:`FeatureTaps` armed for the block and removed after it (no hooks left behind); after the forwards,
    ``taps.read()`` gives (bottleneck, last decoder stage). For networks that are not compiled."""
    taps = FeatureTaps(network)
    try:
        with taps.capture():
            yield taps
    finally:
        taps.remove()


def log_history(trainer: nnUNetTrainer) -> dict[str, list]:
    """The per-epoch lists nnU-Net logs, plots and checkpoints (``MetaLogger.local_logger.my_fantastic_logging``,
    nnunetv2/training/logging/nnunet_logger.py). Its ``log()`` accepts only keys that already exist there."""
    return trainer.logger.local_logger.my_fantastic_logging


def ensure_log_keys(trainer: nnUNetTrainer, keys: list[str]) -> None:
    """Registers extra per-epoch log keys (also after loading a checkpoint of an older version that lacks some)."""
    history = log_history(trainer)
    for key in keys:
        history.setdefault(key, [])


def should_compile(trainer: nnUNetTrainer) -> bool:
    """nnU-Net's own decision whether to torch.compile the network (``nnUNetTrainer._do_i_compile``: CUDA only,
    ``nnUNet_compile``), so that second networks are compiled exactly when the student is."""
    return bool(trainer._do_i_compile())


@contextlib.contextmanager
def network_swapped(trainer: nnUNetTrainer, network: nn.Module) -> Iterator[None]:
    """Temporarily makes ``network`` the trainer's ``self.network``, for nnU-Net methods that read only that
    attribute: ``configure_optimizers`` (a second network's optimizer and LR schedule) and ``validation_step``
    (the reference model's validation pseudo-Dice)."""
    original = trainer.network
    trainer.network = network
    try:
        yield
    finally:
        trainer.network = original


def gloo_on_cpu(trainer: nnUNetTrainer, device: torch.device) -> bool:
    """True when DDP runs over gloo with a CPU device (used to test the DDP path without GPUs); nnU-Net's DDP path
    assumes CUDA and NCCL."""
    return bool(trainer.is_ddp and device.type != "cuda" and dist.is_initialized() and dist.get_backend() == "gloo")


def keep_cpu_device(trainer: nnUNetTrainer, device: torch.device) -> None:
    """Under DDP, ``nnUNetTrainer.__init__`` replaces the device by ``cuda:<local_rank>`` and makes a CUDA
    GradScaler; with gloo on CPU keep the CPU device and no scaler."""
    trainer.device = device
    trainer.grad_scaler = None


def wrap_for_ddp(trainer: nnUNetTrainer, network: nn.Module) -> nn.Module:
    """SyncBatchNorm and DDP as ``nnUNetTrainer.initialize`` wraps the student; ``device_ids`` only on CUDA (DDP
    refuses them for CPU modules)."""
    network = nn.SyncBatchNorm.convert_sync_batchnorm(network)
    device_ids = [trainer.local_rank] if trainer.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(network, device_ids=device_ids)


def initialize_on_cpu_ddp(trainer: nnUNetTrainer, initialize: Callable[[], None]) -> None:
    """``nnUNetTrainer.initialize`` for DDP over gloo on CPU, without patching nnU-Net's module.

    nnU-Net wraps the network with ``DDP(network, device_ids=[local_rank])``, which only CUDA modules accept. So the
    wrap is skipped by running ``initialize`` with ``is_ddp`` off, then the two things it derives from ``is_ddp``
    are redone as under DDP: the per-rank batch size and oversampling (``_set_batch_size_and_oversample``) and the
    loss, whose batch Dice gathers over ranks (``_build_loss``: ``'ddp': self.is_ddp``); finally the network is
    wrapped as nnU-Net would, without ``device_ids``."""
    trainer.is_ddp = False
    try:
        initialize()
    finally:
        trainer.is_ddp = True
    trainer._set_batch_size_and_oversample()
    trainer.loss = trainer._build_loss()
    trainer.network = wrap_for_ddp(trainer, trainer.network)


def set_deep_supervision(network: nn.Module, enabled: bool) -> None:
    """What ``nnUNetTrainer.set_deep_supervision_enabled`` does to its own network (``decoder.deep_supervision`` of
    dynamic_network_architectures' U-Nets), for a second network."""
    unwrap(network).decoder.deep_supervision = enabled


def atomic_save(obj: object, filename: str) -> None:
    """``torch.save`` to a temporary file in the same folder, flushed to disk, then renamed over ``filename``: a kill
    at any instant leaves the old complete file or the new one, never a truncated one."""
    folder, name = os.path.split(os.path.abspath(filename))
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, filename)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    if hasattr(os, "O_DIRECTORY"):  # the rename itself survives a power loss once the folder is synced
        dir_fd = os.open(folder, os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def nnunet_checkpoint(trainer: nnUNetTrainer) -> dict:
    """The dict ``nnUNetTrainer.save_checkpoint`` (nnunetv2 2.8.x) writes, built without writing it, so our trainers
    can add their state and write the file once, atomically."""
    return {
        "network_weights": unwrap(trainer.network).state_dict(),
        "optimizer_state": trainer.optimizer.state_dict(),
        "grad_scaler_state": trainer.grad_scaler.state_dict() if trainer.grad_scaler is not None else None,
        "logging": trainer.logger.get_checkpoint(),
        "_best_ema": trainer._best_ema,
        "current_epoch": trainer.current_epoch + 1,
        "init_args": trainer.my_init_kwargs,
        "trainer_name": trainer.__class__.__name__,
        "inference_allowed_mirroring_axes": trainer.inference_allowed_mirroring_axes,
    }


def write_inference_checkpoint(final_checkpoint: str, filename: str, weights: dict[str, torch.Tensor],
                               **overrides: object) -> None:
    """Writes ``filename`` with ``weights`` and the keys of ``final_checkpoint`` that ``nnUNetv2_predict -chk`` reads
    (:data:`INFERENCE_KEYS`); ``overrides`` replace any of them (e.g. the ``trainer_name`` whose
    ``build_network_architecture`` builds these weights' network). Written with :func:`atomic_save`."""
    final = torch.load(final_checkpoint, map_location="cpu", weights_only=False)
    checkpoint = {k: final[k] for k in INFERENCE_KEYS}
    checkpoint["network_weights"] = {k: v.detach().cpu() for k, v in weights.items()}
    checkpoint.update(overrides)
    atomic_save(checkpoint, filename)


def stop_augmenter(augmenter: object) -> None:
    """Stops the worker processes of a batchgenerators augmenter (``_finish``, private in batchgenerators, as
    nnU-Net's own ``on_train_end`` calls it); single-threaded augmenters have none."""
    if isinstance(augmenter, (NonDetMultiThreadedAugmenter, MultiThreadedAugmenter)):
        augmenter._finish()
