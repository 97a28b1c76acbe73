"""What a benchmark folder holds and where: its settings, the run matrix, each run's paths and file names, and the
JSON it writes (settings, per-epoch training log, provenance).

Shared by the benchmark, its records and its report, which only read and write these files.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from nnunet_ssl.errors import SSLInputError

BASELINE = "nnUNetTrainerSupervised"
#: the baseline with another training seed on the same labeled cases: the control for training noise
RESEEDED = "nnUNetTrainerSupervisedReseeded"
FULL = "all"
#: the offline pseudo-labelling row: the baseline as teacher, its pseudo-labels of the budget's unlabeled cases,
#: then the baseline trainer again as student on labeled + pseudo-labeled cases (``nnUNetv2_ssl_pseudolabel``)
OFFLINE = "OfflinePseudoLabel"
#: id of the derived datasets inside a run's workspace (each workspace has its own nnUNet_raw)
OFFLINE_DATASET_ID = 900
SETTINGS_FILE = "benchmark.json"
#: nnU-Net's per-epoch logging of a run, kept beside its evaluation so that curves survive without checkpoints
TRAINING_LOG = "training_log.json"
#: the software and machine of each training stage and of the evaluation: results differ between machines
PROVENANCE = "provenance.json"
#: what a record of a finished run holds (summary.json last: it marks the run as finished)
RECORD_FILES = ("per_case.csv", TRAINING_LOG, PROVENANCE, "summary.json")
#: settings that must not change between invocations writing into the same output folder
FIXED_SETTINGS = ("dataset", "configuration", "fold", "plans", "epochs", "iterations_per_epoch", "val_iterations",
                  "test_cases", "nsd_tolerance_mm", "offline_rounds", "groups")


@dataclass
class BenchmarkSettings:
    dataset: str
    configuration: str
    fold: int
    plans: str
    trainers: list[str]
    budgets: list[int]
    seeds: list[int]
    full: bool
    epochs: int
    iterations_per_epoch: int
    val_iterations: int
    test_cases: list[str] = field(default_factory=list)
    nsd_tolerance_mm: float = 1.0
    #: rounds of the offline pseudo-labelling row
    offline_rounds: int = 1
    #: a JSON file case id -> group (frames of one sweep): folds and budgets keep groups whole; "" = none
    groups: str = ""


@dataclass(frozen=True)
class Run:
    trainer: str
    budget: str  # "3", "10" or "all"
    seed: int

    @property
    def label(self) -> str:
        tag = "all labels" if self.budget == FULL else f"{self.budget} labeled"
        return f"{self.trainer} | {tag} | seed {self.seed}"


def budget_tag(budget: str) -> str:
    return "all" if budget == FULL else f"labeled_{budget}"


def run_matrix(s: BenchmarkSettings) -> list[Run]:
    """The runs in the order they are made: the baseline at every budget and seed first, then each trainer at every
    seed and budget, then the fully supervised reference. A campaign that spans several sittings so completes whole
    trainer-vs-baseline comparisons one trainer at a time."""
    runs = [Run(BASELINE, str(b), seed) for seed in s.seeds for b in s.budgets]
    for t in dict.fromkeys(s.trainers):
        if t != BASELINE:
            runs += [Run(t, str(b), seed) for seed in s.seeds for b in s.budgets]
    if s.full:
        runs += [Run(BASELINE, FULL, seed) for seed in s.seeds]
    return runs


class Paths:
    """Where one run's files live."""

    def __init__(self, out: Path, run: Run, s: BenchmarkSettings) -> None:
        self.workspace = out / "runs" / budget_tag(run.budget) / f"seed_{run.seed}"
        self.preprocessed = self.workspace / "nnUNet_preprocessed"
        self.results = self.workspace / "nnUNet_results"
        self.model = self.results / s.dataset / f"{run.trainer}__{s.plans}__{s.configuration}" / f"fold_{s.fold}"
        self.raw = self.workspace / "nnUNet_raw"
        self.offline_work = self.workspace / "pseudolabel"
        if run.trainer == OFFLINE:
            # the last round's student; its derived dataset's split has the fold as fold 0
            last = offline_dataset_name(s, s.offline_rounds)
            self.model = self.results / last / f"{BASELINE}__{s.plans}__{s.configuration}" / "fold_0"
        self.predictions = self.workspace / "test_predictions" / run.trainer
        self.evaluation = self.workspace / "test_evaluation" / run.trainer
        self.logs = self.workspace / "logs"
        #: the environment of every training stage of the run, until its evaluation copies it
        self.training_stages = self.logs / f"provenance_{run.trainer}.json"

    @property
    def done(self) -> bool:
        return (self.evaluation / "summary.json").is_file()


def offline_dataset_name(s: BenchmarkSettings, round_: int) -> str:
    """The derived dataset of the offline row's round ``round_`` (as ``nnUNetv2_ssl_pseudolabel --rounds`` names
    it)."""
    return f"Dataset{OFFLINE_DATASET_ID + round_ - 1:03d}_{offline_name(s)}Round{round_}"


def offline_name(s: BenchmarkSettings) -> str:
    return f"{s.dataset[11:]}PL"


def load_settings(folder: Path) -> BenchmarkSettings:
    """The settings stored in a benchmark (or records) folder."""
    return BenchmarkSettings(**json.loads((folder / SETTINGS_FILE).read_text()))


def checkpoint_logging(model_folder: Path) -> dict | None:
    """nnU-Net's per-epoch logging (train_losses, mean_fg_dice, ...) from the newest checkpoint of a run, as plain
    JSON values."""
    import torch

    for name in ("checkpoint_final.pth", "checkpoint_latest.pth"):
        path = model_folder / name
        if path.is_file():
            # our own trainings' checkpoints; they hold numpy scalars, hence weights_only=False
            log = torch.load(path, map_location="cpu", weights_only=False).get("logging")
            return jsonable(log) if log is not None else None
    return None


def jsonable(obj: Any) -> Any:
    """``obj`` with numpy/torch values as plain numbers and non-finite floats as None (strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if hasattr(obj, "tolist"):  # numpy and torch scalars and arrays
        return jsonable(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(obj)


def environment_info(device: str) -> dict:
    """Versions and hardware that can change a run's numbers."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    import torch

    def ver(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    info = {"python": platform.python_version(), "platform": platform.platform(), "cpu": cpu,
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            **{name: ver(name) for name in ("nnunetv2", "nnunet-ssl", "numpy", "dynamic_network_architectures",
                                            "batchgeneratorsv2")}, "device": device}
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def write_json(path: Path, obj: Any) -> None:
    """Writes ``obj`` atomically (a reader never sees half a file), readable by all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def load_or_store_settings(out: Path, s: BenchmarkSettings, store: bool = True) -> None:
    """Stores the settings; a folder made with other fixed settings is refused (its numbers would not compare).
    Trainers, budgets and seeds may grow between invocations: the stored lists become the union."""
    path = out / SETTINGS_FILE
    if path.is_file():
        old = json.loads(path.read_text())
        # a setting added after the folder was made counts as its default there
        defaults = {f.name: f.default for f in fields(BenchmarkSettings) if f.default is not MISSING}
        diff = [k for k in FIXED_SETTINGS if old.get(k, defaults.get(k)) != asdict(s)[k]]
        if diff:
            shown = ", ".join(f"{k}: {old.get(k)!r} there, {asdict(s)[k]!r} now" for k in diff[:3])
            raise SSLInputError(f"{out} holds a benchmark made with other settings ({shown}); use the same settings "
                                "to resume it, or another -o for a new benchmark")
        merged = asdict(s)
        for k in ("trainers", "budgets", "seeds"):
            merged[k] = list(dict.fromkeys([*old.get(k, []), *merged[k]]))
        merged["full"] = bool(old.get("full")) or s.full
        if store:
            write_json(path, merged)
    elif store:
        write_json(path, asdict(s))
