"""The throughput table: analytic compute per trainer (forward = 1, backward = 2 units per sample), the counted
FLOPs of one step, the rows of measured times against the supervised reference, and the machine it ran on."""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
from collections.abc import Sequence
from dataclasses import asdict

from nnunet_ssl.evaluation.throughput_measure import TrainerTiming

REFERENCE_TRAINER = "nnUNetTrainerSupervised"


TABLE_COLUMNS = ["trainer", "s/it median", "s/it mean", "time × supervised", "data wait", "peak memory (MB)",
                 "B / U", "compute units", "units × supervised", "GFLOP / it", "FLOPs × supervised", "time ÷ FLOPs",
                 "notes"]


def default_trainers() -> list[str]:
    """The supervised baseline, then every SSL trainer the package exports."""
    from nnunet_ssl import trainers
    from nnunet_ssl.trainers.base import nnUNetTrainerSSL

    ssl = [n for n in trainers.__all__
           if isinstance(getattr(trainers, n), type) and issubclass(getattr(trainers, n), nnUNetTrainerSSL)]
    return [REFERENCE_TRAINER, *ssl]


def unlabeled_batch_of(cls: type, labeled_batch: int) -> int | None:
    """The (single-process) unlabeled batch of an SSL trainer class; None for supervised trainers."""
    from nnunet_ssl.trainers.base import nnUNetTrainerSSL

    if not issubclass(cls, nnUNetTrainerSSL):
        return None
    return labeled_batch if cls.unlabeled_batch_size is None else int(cls.unlabeled_batch_size)


#: the package's trainers: each one composes a host and plug-ins whose counts are meant to add up
CATALOGUE = "nnunet_ssl.trainers.catalogue"


def analytic_units(cls: type, labeled_batch: int, unlabeled_batch: int | None) -> tuple[float | None, str]:
    """(units per step, where the count comes from); forward of one sample = 1 unit, backward = 2.

    Trainers with ``compute_units`` declare their own count; an nnU-Net trainer that keeps nnU-Net's
    ``train_step`` costs ``3 B``; anything else is unknown (None)."""

    if hasattr(cls, "compute_units"):
        owner = next(c for c in cls.__mro__ if "compute_units" in vars(c))
        u = labeled_batch if unlabeled_batch is None else unlabeled_batch
        source = "declared by the trainer" if owner is cls else f"declared by {owner.__name__}"
        return float(cls.compute_units(labeled_batch, u)), source
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    if cls.train_step is nnUNetTrainer.train_step:
        return float(3 * labeled_batch), "nnU-Net step"
    return None, "train_step of its own, no compute_units"


def merge_rounds(runs: Sequence[TrainerTiming]) -> TrainerTiming:
    """One trainer's rounds as one result: measured iterations pooled, the highest peak memory, the first round's
    counted FLOPs; a skipped or failed round makes the whole result skipped or failed."""
    bad = next((r for r in runs if r.status != "ok"), None)
    if bad is not None:
        return bad
    first = runs[0]
    peaks = [r.peak_memory_mb for r in runs if r.peak_memory_mb is not None]
    starts = [r.start_memory_mb for r in runs if r.start_memory_mb is not None]
    counted = next((r for r in runs if r.step_flops is not None), first)
    return TrainerTiming(**{**asdict(first),
                            "step_flops": counted.step_flops, "flops_note": counted.flops_note,
                            "step_seconds": [s for r in runs for s in r.step_seconds],
                            "wait_seconds": [s for r in runs for s in r.wait_seconds],
                            "peak_memory_mb": max(peaks) if peaks else None,
                            "start_memory_mb": min(starts) if starts else None})


def _fmt_seconds(s: float) -> str:
    return f"{s:.3f}" if s < 10 else f"{s:.1f}"


def _fmt_units(u: float) -> str:
    return f"{u:g}"


def table_rows(results: Sequence[TrainerTiming], classes: dict[str, type], plans_batch: int,
               reference: str = REFERENCE_TRAINER) -> list[list[str]]:
    """One row of strings per trainer, in TABLE_COLUMNS order. "time ÷ FLOPs" is the time ratio over the FLOP ratio,
    both against the reference: 1.00 when a trainer's extra time is all network compute."""
    ref = next((r for r in results if r.trainer == reference and r.status == "ok"), None)
    ref_flops = ref.step_flops if ref is not None and ref.step_flops else None
    ref_units = 3.0 * (ref.labeled_batch if ref is not None else plans_batch)
    rows = []
    for r in results:
        cls = classes.get(r.trainer)
        b = r.labeled_batch if r.labeled_batch is not None else plans_batch
        u = r.unlabeled_batch if r.unlabeled_batch is not None else (
            unlabeled_batch_of(cls, b) if cls is not None else None)
        units, source = analytic_units(cls, b, u) if cls is not None else (None, "")
        notes = []
        if r.status != "ok":
            notes.append(f"{r.status}: {r.reason}")
        elif r.flops_note:
            notes.append(r.flops_note)
        if source and source not in ("nnU-Net step", "declared by the trainer") and cls.__module__ != CATALOGUE:
            notes.append(f"units: {source}")  # a user subclass's inherited count may miss what it adds
        bu = f"{b} / {u}" if u is not None else f"{b} / –"
        units_cells = ["n/a", "n/a"] if units is None else [_fmt_units(units), f"{units / ref_units:.2f}"]
        flops_cells = ["–"] * 3
        if r.status == "ok" and r.step_seconds:
            ratio = f"{r.median / ref.median:.2f}" if ref is not None else "n/a"
            cells = [_fmt_seconds(r.median), _fmt_seconds(r.mean), ratio, f"{100 * r.wait_share:.0f} %",
                     f"{r.peak_memory_mb:.0f}"]
            if r.step_flops is not None:
                flop_ratio = r.step_flops / ref_flops if ref_flops else None
                flops_cells = [f"{r.step_flops / 1e9:.3g}", "n/a" if flop_ratio is None else f"{flop_ratio:.2f}",
                               "n/a" if flop_ratio is None or ref is None
                               else f"{r.median / ref.median / flop_ratio:.2f}"]
        else:
            cells = ["–"] * 5
        rows.append([f"`{r.trainer}`", *cells, bu, *units_cells, *flops_cells, "; ".join(notes).replace("|", "/")])
    return rows


def markdown_table(rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "|".join("---" for _ in TABLE_COLUMNS) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def machine_info(device: str) -> list[str]:
    from importlib.metadata import version

    import torch

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    lines = [f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
             f"- CPU: {cpu}, {os.cpu_count()} logical cores", f"- device: {device}"]
    if device == "cuda" and torch.cuda.is_available():
        lines[-1] += f" ({torch.cuda.get_device_name(0)})"
    lines.append(f"- torch {torch.__version__}, nnunetv2 {version('nnunetv2')}, Python {platform.python_version()}")
    return lines
