"""Records of a benchmark: finished runs (per-case metrics, summary, training log, provenance; a few kB each) kept
in a second folder of the same layout, so that a campaign whose work folder is lost continues from them."""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from nnunet_ssl.evaluation.benchmark_layout import (
    RECORD_FILES,
    TRAINING_LOG,
    BenchmarkSettings,
    Paths,
    Run,
    checkpoint_logging,
    write_json,
)


def record_folder(records: Path, run: Run, s: BenchmarkSettings) -> Path:
    return Paths(records, run, s).evaluation


def _copy_record(source: Path, target: Path) -> None:
    """Copies a finished run's record files through a side folder, so an interrupted copy is never finished."""
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in RECORD_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, tmp / name)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)


def export_record(out: Path, records: Path, run: Run, s: BenchmarkSettings) -> bool:
    """Copies a run finished in ``out`` into ``records`` unless it is there; True if copied."""
    paths = Paths(out, run, s)
    target = record_folder(records, run, s)
    if not paths.done or (target / "summary.json").is_file():
        return False
    if not (paths.evaluation / TRAINING_LOG).is_file():  # finished before training logs were kept
        log = checkpoint_logging(paths.model)
        if log is not None:
            write_json(paths.evaluation / TRAINING_LOG, log)
    _copy_record(paths.evaluation, target)
    return True


def restore_record(out: Path, records: Path, run: Run, s: BenchmarkSettings) -> bool:
    """Makes a run recorded in ``records`` but unfinished in ``out`` finished there; True if restored."""
    source = record_folder(records, run, s)
    if Paths(out, run, s).done or not (source / "summary.json").is_file():
        return False
    _copy_record(source, Paths(out, run, s).evaluation)
    return True


def sync_records(out: Path, records: Path, s: BenchmarkSettings, runs: Sequence[Run]) -> tuple[int, int]:
    """(restored, exported): runs only in the records become finished in ``out``, and runs finished only in
    ``out`` are recorded."""
    restored = sum(restore_record(out, records, r, s) for r in runs)
    exported = sum(export_record(out, records, r, s) for r in runs)
    return restored, exported
