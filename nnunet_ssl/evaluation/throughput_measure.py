"""One trainer's training steps timed in this process: step time, data wait, peak memory and the floating-point
operations of one more step (``TrainerTiming``).

See :mod:`nnunet_ssl.evaluation.throughput` for what is measured and how; :mod:`.throughput_worker` runs this in a
fresh process per trainer.
"""

from __future__ import annotations

import contextlib
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from tqdm import tqdm

from nnunet_ssl.compat.tooling import trainer_in_results_folder
from nnunet_ssl.errors import SSLInputError


@dataclass
class TrainerTiming:
    """What one trainer's run measured (or why it did not run)."""

    trainer: str
    status: str = "ok"  # "ok", "skipped" (the trainer refused its input) or "failed"
    reason: str = ""
    step_seconds: list[float] = field(default_factory=list)
    wait_seconds: list[float] = field(default_factory=list)
    peak_memory_mb: float | None = None
    start_memory_mb: float | None = None
    labeled_batch: int | None = None
    unlabeled_batch: int | None = None
    loaders: list[str] = field(default_factory=list)
    torch_threads: int | None = None
    n_proc_da: int | None = None
    epoch: int | None = None  # the epoch the steps were timed in
    step_flops: float | None = None  # one training step, backward included (:func:`count_flops`)
    flops_note: str = ""  # why step_flops is None

    @property
    def median(self) -> float:
        return statistics.median(self.step_seconds)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.step_seconds)

    @property
    def wait_share(self) -> float:
        return sum(self.wait_seconds) / sum(self.step_seconds)


def find_trainer_class(name: str) -> type:
    """A trainer class by name: the package's own trainers, then nnU-Net's lookup (its folder and nnUNet_extTrainer)."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from nnunet_ssl import trainers

    cls = getattr(trainers, name, None)
    if cls is None:
        from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

        with contextlib.redirect_stdout(sys.stderr):
            try:
                cls = recursive_find_trainer_class_by_name(name)
            except (RuntimeError, AssertionError):
                cls = None
    if not (isinstance(cls, type) and issubclass(cls, nnUNetTrainer)):
        raise SSLInputError(f"unknown trainer {name!r}; list ours with nnUNetv2_ssl_trainers, or set "
                            "nnUNet_extTrainer to the folder of your own trainer")
    return cls


class _TimedLoader:
    """Wraps a batch generator and adds the time spent in ``next()`` to ``waited``."""

    def __init__(self, loader) -> None:
        self.loader = loader
        self.waited = 0.0

    def __iter__(self):
        return self

    def __next__(self):
        start = time.perf_counter()
        try:
            return next(self.loader)
        finally:
            self.waited += time.perf_counter() - start

    def __getattr__(self, name: str):
        return getattr(self.loader, name)


def _is_loader(value) -> bool:
    from batchgenerators.dataloading.multi_threaded_augmenter import MultiThreadedAugmenter
    from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
    from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter

    return isinstance(value, (SingleThreadedAugmenter, NonDetMultiThreadedAugmenter, MultiThreadedAugmenter))


def count_flops(step: Callable[[], object]) -> float:
    """Floating-point operations of one call of ``step``, its backward passes included, as torch's
    ``FlopCounterMode`` counts them: convolutions and matrix products at 2 per multiply-add, gradients only where
    autograd computes them. Normalisation, activations, losses and optimizer updates are not counted, so this is
    the network compute of the step, the floor its time cannot go below for long."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return float(counter.get_total_flops())


def _step_flops(trainer, labeled) -> tuple[float | None, str]:
    """(FLOPs of one more training step, why None): counted outside the timed steps, since the counter slows the
    step it watches; not under torch.compile, whose graphs the counter does not see."""
    from nnunet_ssl.compat.trainer import should_compile

    if should_compile(trainer):
        return None, "FLOPs not counted under torch.compile (nnUNet_compile=f counts them)"
    try:
        return count_flops(lambda: trainer.train_step(next(labeled))), ""
    except Exception as e:  # a step the counter cannot follow (e.g. an op it does not know) keeps its timing
        return None, f"FLOPs not counted: {type(e).__name__}"


def place_at_epoch(trainer, epoch: int) -> None:
    """Puts a trainer at the start of ``epoch`` as a resumed run would be: nnU-Net's epoch (the learning rate
    follows in ``on_epoch_start``) and, for SSL trainers, the step counter that schedules their stages and ramps."""
    trainer.current_epoch = int(epoch)
    if hasattr(trainer, "ssl_step"):
        trainer.ssl_step = int(epoch) * int(trainer.num_iterations_per_epoch)


def _rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def measure_trainer(trainer_name: str, dataset_name: str, configuration: str, plans_identifier: str, fold,
                    device: str, warmup: int, iterations: int, progress: bool = True,
                    scratch_results: str | None = None, at_fraction: float = 0.5) -> TrainerTiming:
    """Builds one trainer in this process, times ``warmup + iterations`` training steps (see module docstring) and
    counts the FLOPs of one more (:func:`count_flops`; peak memory is read before it). The steps are those of the
    epoch ``round(at_fraction * num_epochs)`` (:func:`place_at_epoch`): the middle of the run by default, where the
    staged trainers (BCP's pre-training, MLB-Seg's warm-up, ...) are past their cheaper first stage.

    nnU-Net's folders come from the environment. With ``scratch_results``, the trainer is constructed with
    ``nnUNet_results`` pointing there (nnU-Net fixes its output folder, log and debug files in ``__init__``) and
    the user's ``nnUNet_results`` is restored afterwards, so artefacts a trainer reads during ``initialize`` (e.g. a
    trained quality predictor) come from the user's folder while nothing is written to it. A trainer that refuses
    its input (``SSLInputError``) is returned as skipped with the reason."""
    import torch
    from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA

    from nnunet_ssl.compat.trainer import stop_augmenter
    from nnunet_ssl.data import datasets

    result = TrainerTiming(trainer_name)
    cls = find_trainer_class(trainer_name)
    base = datasets.preprocessed_dataset_folder(dataset_name)
    plans = datasets.load_plans(base, plans_identifier).plans
    plans["continue_training"] = False
    dataset_json = datasets.load_preprocessed_dataset_json(base)
    torch_device = torch.device(device)
    if device == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)  # as nnUNetv2_train -device cpu
    else:
        torch.backends.cudnn.benchmark = True
    trainer = None
    timed: dict[str, _TimedLoader] = {}
    try:
        try:
            trainer = trainer_in_results_folder(cls, scratch_results, plans, configuration, fold, dataset_json,
                                                torch_device)
            trainer.disable_checkpointing = True
            trainer.on_train_start()
        except SSLInputError as e:
            result.status, result.reason = "skipped", e.message
            return result
        for name, value in list(vars(trainer).items()):
            if name != "dataloader_val" and _is_loader(value):
                timed[name] = _TimedLoader(value)
                setattr(trainer, name, timed[name])
        result.loaders = sorted(timed)
        result.labeled_batch = int(trainer.batch_size)
        result.unlabeled_batch = getattr(trainer, "unlabeled_batch_size_per_rank", None)
        result.torch_threads = torch.get_num_threads()
        result.n_proc_da = get_allowed_n_proc_DA()
        result.epoch = min(int(round(at_fraction * trainer.num_epochs)), trainer.num_epochs - 1)
        place_at_epoch(trainer, result.epoch)
        trainer.on_epoch_start()
        trainer.on_train_epoch_start()
        cuda = torch_device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        result.start_memory_mb = torch.cuda.memory_allocated() / 2**20 if cuda else _rss_mb()
        labeled = timed.get("dataloader_train") or _TimedLoader(trainer.dataloader_train)
        bar = tqdm(range(warmup + iterations), desc=trainer_name, unit="it", disable=not progress, leave=False)
        for i in bar:
            waited_before = sum(t.waited for t in timed.values())
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            trainer.train_step(next(labeled))
            if cuda:
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            if i >= warmup:
                result.step_seconds.append(seconds)
                result.wait_seconds.append(sum(t.waited for t in timed.values()) - waited_before)
        result.peak_memory_mb = torch.cuda.max_memory_allocated() / 2**20 if cuda else _rss_mb()
        result.step_flops, result.flops_note = _step_flops(trainer, labeled)
        return result
    finally:
        if trainer is not None:
            for name, wrapper in timed.items():
                setattr(trainer, name, wrapper.loader)
            for value in vars(trainer).values():
                if _is_loader(value):
                    with contextlib.suppress(Exception):
                        stop_augmenter(value)
