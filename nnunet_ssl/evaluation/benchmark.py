"""``nnUNetv2_ssl_benchmark``: trainers x label budgets x seeds on one fold, evaluated on held-out test cases.

Each (budget, seed) gets its own workspace ``OUT/runs/<budget>/seed_<s>/``: an ``nnUNet_preprocessed`` folder
whose dataset entries are symbolic links to the real preprocessed data, except ``splits_final.json``, which holds
that budget's split, and its own ``nnUNet_results``. So the user's splits are never changed and runs never share
a results folder. Seed ``s`` draws the labeled cases (``budget_splits(seed=s)``) and seeds training
(``nnUNet_ssl_seed=s``). The supervised baseline ``nnUNetTrainerSupervised`` (nnU-Net's trainer with the same
schedule) always runs; ``--full`` adds it on all of the fold's training cases. ``-tr nnUNetTrainerSupervisedReseeded``
adds the control for training noise: the baseline again, on the same labeled cases, with training seed ``s + 1000``.
Runs are made in the order of ``run_matrix``.

Every model is tested with ``checkpoint_final.pth``: nothing is selected on test data. Before anything runs,
test cases found in the fold's labeled, unlabeled or validation data, in imagesTr/imagesUnlabeled, or as a
byte-identical image file there, stop the benchmark. Finished steps (training, test prediction, evaluation) are
detected from their files and skipped, so an interrupted benchmark resumes where it stopped; an interrupted
training continues from its ``checkpoint_latest.pth`` (nnU-Net's ``--c``).

``--records DIR`` keeps a compact copy of every finished run (per-case metrics, summary, per-epoch training log,
provenance; a few kB) in a folder of the same layout, with its own report. Runs found there count as finished, so
a campaign whose work folder is lost (a new machine) continues from the records, which are small enough to commit.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from nnunet_ssl.data import datasets
from nnunet_ssl.data.layout import unlabeled_preprocessed_folder
from nnunet_ssl.errors import SSLInputError, exit_code_of

BASELINE = "nnUNetTrainerSupervised"
#: the baseline with another training seed on the same labeled cases: the control for training noise
RESEEDED = "nnUNetTrainerSupervisedReseeded"
FULL = "all"
SETTINGS_FILE = "benchmark.json"
#: nnU-Net's per-epoch logging of a run, kept beside its evaluation so that curves survive without checkpoints
TRAINING_LOG = "training_log.json"
#: the software and machine of each training stage and of the evaluation: results differ between machines
PROVENANCE = "provenance.json"
#: what a record of a finished run holds (summary.json last: it marks the run as finished)
RECORD_FILES = ("per_case.csv", TRAINING_LOG, PROVENANCE, "summary.json")
#: settings that must not change between invocations writing into the same output folder
FIXED_SETTINGS = ("dataset", "configuration", "fold", "plans", "epochs", "iterations_per_epoch", "val_iterations",
                  "test_cases", "nsd_tolerance_mm")


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
        self.predictions = self.workspace / "test_predictions" / run.trainer
        self.evaluation = self.workspace / "test_evaluation" / run.trainer
        self.logs = self.workspace / "logs"
        #: the environment of every training stage of the run, until its evaluation copies it
        self.training_stages = self.logs / f"provenance_{run.trainer}.json"

    @property
    def done(self) -> bool:
        return (self.evaluation / "summary.json").is_file()


def checkpoint_logging(model_folder: Path) -> dict | None:
    """nnU-Net's per-epoch logging (train_losses, mean_fg_dice, ...) from the newest checkpoint of a run, as plain
    JSON values."""
    import torch

    for name in ("checkpoint_final.pth", "checkpoint_latest.pth"):
        path = model_folder / name
        if path.is_file():
            # our own trainings' checkpoints; they hold numpy scalars, hence weights_only=False
            log = torch.load(path, map_location="cpu", weights_only=False).get("logging")
            return _jsonable(log) if log is not None else None
    return None


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "tolist"):  # numpy and torch scalars and arrays
        return _jsonable(obj.tolist())
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


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------------------
# preparation


def load_or_store_settings(out: Path, s: BenchmarkSettings, store: bool = True) -> None:
    """Stores the settings; a folder made with other fixed settings is refused (its numbers would not compare).
    Trainers, budgets and seeds may grow between invocations: the stored lists become the union."""
    path = out / SETTINGS_FILE
    if path.is_file():
        old = json.loads(path.read_text())
        diff = [k for k in FIXED_SETTINGS if old.get(k) != asdict(s)[k]]
        if diff:
            shown = ", ".join(f"{k}: {old.get(k)!r} there, {asdict(s)[k]!r} now" for k in diff[:3])
            raise SSLInputError(f"{out} holds a benchmark made with other settings ({shown}); use the same settings "
                                "to resume it, or another -o for a new benchmark")
        merged = asdict(s)
        for k in ("trainers", "budgets", "seeds"):
            merged[k] = list(dict.fromkeys([*old.get(k, []), *merged[k]]))
        merged["full"] = bool(old.get("full")) or s.full
        if store:
            _write_json(path, merged)
    elif store:
        _write_json(path, asdict(s))


def prepare_workspace(paths: Paths, real_pp_dataset: Path, dataset: str, splits: list[dict]) -> None:
    """The run's nnUNet_preprocessed: links to every entry of the real dataset folder, and its own splits."""
    target = paths.preprocessed / dataset
    target.mkdir(parents=True, exist_ok=True)
    for entry in real_pp_dataset.iterdir():
        if entry.name.startswith("splits_final"):
            continue
        link = target / entry.name
        if not link.exists() and not link.is_symlink():
            link.symlink_to(entry.resolve())
    _write_json(target / datasets.SPLITS_FILE, splits)
    paths.results.mkdir(parents=True, exist_ok=True)
    paths.logs.mkdir(parents=True, exist_ok=True)


def splits_for(base: list[dict], budget: str, seed: int, fold: int) -> list[dict]:
    from nnunet_ssl.data.splits import budget_splits

    if budget == FULL:
        return [dict(f) for f in base]
    n = int(budget)
    if n > len(base[fold]["train"]):
        raise SSLInputError(f"--budgets {n} is more than the {len(base[fold]['train'])} training cases of fold {fold}")
    return budget_splits(base, num_labeled=n, seed=seed)


def test_set(raw_dataset: Path, file_ending: str, images: Path | None, labels: Path | None,
             cases: Sequence[str] | None) -> tuple[Path, Path, list[str]]:
    """(image folder, label folder, case ids) of the test set; imagesTs/labelsTs by default."""
    from nnunetv2.utilities.utils import get_identifiers_from_splitted_dataset_folder

    images = images or raw_dataset / "imagesTs"
    labels = labels or raw_dataset / "labelsTs"
    for what, folder, flag in (("test images", images, "--test-images"), ("test labels", labels, "--test-labels")):
        if not folder.is_dir():
            raise SSLInputError(f"{what} folder {folder} does not exist; put the held-out cases there or pass {flag}")
    ids = sorted(str(i) for i in get_identifiers_from_splitted_dataset_folder(str(images), file_ending))
    if cases:
        unknown = sorted(set(cases) - set(ids))
        if unknown:
            raise SSLInputError(f"--test-cases {unknown[:5]} are not in {images}; choose among its {len(ids)} cases")
        ids = sorted(set(cases))
    if not ids:
        raise SSLInputError(f"no test images ending in {file_ending} in {images}")
    missing = [i for i in ids if not (labels / f"{i}{file_ending}").is_file()]
    if missing:
        raise SSLInputError(f"{len(missing)} test case(s) have no label in {labels}, e.g. {missing[0]}{file_ending}; "
                            "every test case needs its reference segmentation")
    return images, labels, ids


def link_test_images(out: Path, images: Path, ids: Sequence[str], file_ending: str) -> Path:
    """A folder of links to the chosen test images, which nnUNetv2_predict reads."""
    folder = out / "test_images"
    folder.mkdir(parents=True, exist_ok=True)
    chosen = {f.name for f in images.iterdir() if f.name.endswith(file_ending)
              and f.name[: -len(file_ending) - 5] in set(ids)}
    for f in folder.iterdir():
        if f.name not in chosen:
            f.unlink()
    for name in chosen:
        if not (folder / name).exists():
            (folder / name).symlink_to((images / name).resolve())
    return folder


# ---------------------------------------------------------------------------------------------------------------
# running


def _environment(paths: Paths, s: BenchmarkSettings, seed: int) -> dict[str, str]:
    from nnunet_ssl.cli.trainers import ext_trainer_path

    env = dict(os.environ)
    env.update(nnUNet_preprocessed=str(paths.preprocessed), nnUNet_results=str(paths.results),
               nnUNet_extTrainer=ext_trainer_path(), nnUNet_ssl_epochs=str(s.epochs),
               nnUNet_ssl_iterations_per_epoch=str(s.iterations_per_epoch),
               nnUNet_ssl_val_iterations=str(s.val_iterations), nnUNet_ssl_seed=str(seed), PYTHONUNBUFFERED="1")
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env


def execute(run: Run, paths: Paths, s: BenchmarkSettings, test_images: Path, test_labels: Path,
            test_ids: list[str], device: str, dataset_json: Path, clock) -> None:
    from nnunet_ssl.demo.run_demo import TrainingReporter, run_stage

    env = _environment(paths, s, run.seed)
    if not (paths.model / "checkpoint_final.pth").is_file():
        resume = (paths.model / "checkpoint_latest.pth").is_file()
        print(f"{clock.stamp()}   training ({'resuming from checkpoint_latest.pth' if resume else 'from scratch'})",
              flush=True)
        train = ["nnUNetv2_train", s.dataset, s.configuration, str(s.fold), "-tr", run.trainer, "-p", s.plans,
                 "-device", device]
        if resume:
            train.append("--c")
        # every stage of a training, since one resumed elsewhere mixes machines; a start from scratch replaces
        # the model of any earlier start that was stopped before its first checkpoint, so it drops those entries
        entries = json.loads(paths.training_stages.read_text()) if resume and paths.training_stages.is_file() else []
        entries.append({"stage": "resume" if resume else "train", "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                        **environment_info(device)})
        _write_json(paths.training_stages, entries)
        run_stage(train, env, paths.logs / f"train_{run.trainer}.log", paths.workspace,
                  TrainingReporter(run.trainer, s.epochs, clock))
    if not paths.done:
        print(f"{clock.stamp()}   predicting {len(test_ids)} test cases with checkpoint_final.pth", flush=True)
        paths.predictions.mkdir(parents=True, exist_ok=True)
        predict = ["nnUNetv2_predict", "-i", str(test_images), "-o", str(paths.predictions), "-d", s.dataset,
                   "-c", s.configuration, "-f", str(s.fold), "-tr", run.trainer, "-p", s.plans,
                   "-chk", "checkpoint_final.pth", "-device", device, "-npp", "1", "-nps", "1",
                   "--continue_prediction"]
        run_stage(predict, env, paths.logs / f"predict_{run.trainer}.log", paths.workspace)
        from nnunet_ssl.evaluation.metrics import evaluate_folders

        # evaluated into a side folder first: summary.json in the final folder marks the run as done
        tmp = paths.evaluation.with_name(paths.evaluation.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        evaluate_folders(test_labels, paths.predictions, tmp, dataset_json=dataset_json,
                         nsd_tolerance_mm=s.nsd_tolerance_mm, case_ids=test_ids)
        _write_json(tmp / TRAINING_LOG, checkpoint_logging(paths.model))
        stages = json.loads(paths.training_stages.read_text()) if paths.training_stages.is_file() else []
        _write_json(tmp / PROVENANCE, {"training": stages, "evaluation": environment_info(device)})
        shutil.rmtree(paths.evaluation, ignore_errors=True)
        os.replace(tmp, paths.evaluation)


# ---------------------------------------------------------------------------------------------------------------
# records: finished runs kept outside the work folder


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
            _write_json(paths.evaluation / TRAINING_LOG, log)
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


def check_trainers(names: Sequence[str]) -> None:
    """Refuses trainer names that neither nnU-Net nor nnunet-ssl defines."""
    import nnunetv2
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class

    from nnunet_ssl import trainers

    for name in names:
        if name in trainers.__all__:
            if getattr(getattr(trainers, name), "inference_only", False):
                raise SSLInputError(f"{name} only loads a checkpoint for prediction and cannot be trained; drop it "
                                    "from -tr")
            continue
        found = recursive_find_python_class(os.path.join(nnunetv2.__path__[0], "training", "nnUNetTrainer"), name,
                                            "nnunetv2.training.nnUNetTrainer")
        if found is None:
            raise SSLInputError(f"unknown trainer {name!r}; list ours with nnUNetv2_ssl_trainers")
        # nnU-Net's own trainers ignore nnUNet_ssl_epochs and would train 1000 epochs
        raise SSLInputError(f"{name} does not follow the benchmark's training budget; the supervised baseline "
                            f"{BASELINE} (nnUNetTrainer with the benchmark's schedule) always runs, drop {name}")


def run_benchmark(s: BenchmarkSettings, out: Path, device: str = "cuda", test_images: Path | None = None,
                  test_labels: Path | None = None, dry_run: bool = False, compare_files: bool = True,
                  records: Path | None = None) -> list[Run]:
    """Runs every missing step of the matrix and rewrites the report after each finished run (and the records'
    report, with ``records``)."""
    from nnunet_ssl.data.splits import original_splits
    from nnunet_ssl.demo.run_demo import Clock, StageFailed
    from nnunet_ssl.evaluation.leakage import check_no_leakage
    from nnunet_ssl.evaluation.report import write_report

    s.dataset = datasets.resolve_dataset_name(s.dataset)
    raw = Path(datasets.raw_dataset_folder(s.dataset))
    pp = Path(datasets.preprocessed_dataset_folder(s.dataset))
    dataset_json = datasets.load_preprocessed_dataset_json(str(pp))
    ending = dataset_json["file_ending"]
    cm = datasets.load_configuration(datasets.load_plans(str(pp), s.plans), s.configuration)
    check_trainers(s.trainers)
    base, _ = original_splits(str(pp), str(raw))
    if not 0 <= s.fold < len(base):
        raise SSLInputError(f"fold {s.fold} does not exist; the splits have folds 0-{len(base) - 1}")
    images, labels, ids = test_set(raw, ending, test_images, test_labels, s.test_cases or None)
    unl_folder = unlabeled_preprocessed_folder(str(pp), cm.data_identifier)
    unl_ids = sorted(f[:-5] for f in os.listdir(unl_folder) if f.endswith(".b2nd")) if os.path.isdir(unl_folder) \
        else []
    image_files = [str(f) for f in sorted(images.iterdir()) if f.name.endswith(ending)
                   and f.name[: -len(ending) - 5] in set(ids)]
    # the union over folds covers every labeled case; the fold entry adds its unlabeled list below
    everything = {"train": sorted({c for f in base for c in f["train"]}), "val": sorted({c for f in base for c in
                                                                                         f["val"]})}
    check_no_leakage(ids, image_files, everything, str(raw), unl_ids, ending, compare_files=compare_files)
    s.test_cases = ids
    runs = run_matrix(s)
    if records is not None:  # refused before anything is written
        load_or_store_settings(records, s, store=False)
    if not dry_run:
        out.mkdir(parents=True, exist_ok=True)
    load_or_store_settings(out, s, store=not dry_run)

    def finished(r: Run) -> bool:
        return Paths(out, r, s).done or (records is not None
                                         and (record_folder(records, r, s) / "summary.json").is_file())

    if records is not None:
        load_or_store_settings(records, s, store=not dry_run)
        if not dry_run:
            # over the union of both folders' matrices, not only this invocation's subset
            union = BenchmarkSettings(**json.loads((records / SETTINGS_FILE).read_text()))
            known = BenchmarkSettings(**json.loads((out / SETTINGS_FILE).read_text()))
            everything = list(dict.fromkeys([*run_matrix(union), *run_matrix(known)]))
            restored, exported = sync_records(out, records, s, everything)
            print(f"records {records}: {restored} finished run(s) restored from them, {exported} added to them",
                  flush=True)
    todo = [r for r in runs if not finished(r)]
    print(f"benchmark {s.dataset} {s.configuration} fold {s.fold} plans {s.plans}: {len(runs)} runs "
          f"({len(runs) - len(todo)} done, {len(todo)} to do), {s.epochs} epochs x {s.iterations_per_epoch} "
          f"iterations, {len(ids)} test cases; output {out}", flush=True)
    if dry_run:
        for r in runs:
            print(f"  {'done ' if finished(r) else 'to do'}  {r.label}")
        return todo
    test_folder = link_test_images(out, images, ids, ending)
    clock = Clock()
    durations: list[float] = []
    for k, run in enumerate(todo, 1):
        paths = Paths(out, run, s)
        eta = ""
        if durations:
            eta = f", about {sum(durations) / len(durations) * (len(todo) - k + 1) / 60:.0f} min left"
        print(f"{clock.stamp()} [{k}/{len(todo)}{eta}] {run.label}", flush=True)
        started = time.monotonic()
        prepare_workspace(paths, pp, s.dataset, splits_for(base, run.budget, run.seed, s.fold))
        for cmd in prerequisites(run.trainer, s, device, paths.results):
            from nnunet_ssl.demo.run_demo import run_stage

            print(f"{clock.stamp()}   prerequisite: {' '.join(cmd)}", flush=True)
            run_stage(cmd, _environment(paths, s, run.seed), paths.logs / f"prerequisite_{run.trainer}.log",
                      paths.workspace)
        try:
            execute(run, paths, s, test_folder, labels, ids, device, pp / "dataset.json", clock)
        except StageFailed as e:
            raise SSLInputError(f"{run.label}: {e} (log: {e.log}); fix the cause and rerun the same command to "
                                "resume") from None
        durations.append(time.monotonic() - started)
        write_report(out)
        if records is not None:
            export_record(out, records, run, s)
            write_report(records)
    write_report(out)
    if records is not None:
        write_report(records)
        print(f"{clock.stamp()} records and their report: {records}", flush=True)
    print(f"{clock.stamp()} report: {out / 'report.md'}", flush=True)
    return todo


def prerequisites(trainer: str, s: BenchmarkSettings, device: str, results_folder: Path) -> list[list[str]]:
    """Commands a trainer still needs before training (its class may define ``benchmark_prerequisites``), e.g.
    the quality predictor of the quality-guided trainers, trained on the run's own labeled cases."""
    from nnunet_ssl import trainers

    cls = getattr(trainers, trainer, None)
    hook = getattr(cls, "benchmark_prerequisites", None)
    if hook is None:
        return []
    return hook(s.dataset, s.configuration, s.fold, s.plans, device, str(results_folder))


# ---------------------------------------------------------------------------------------------------------------
# command line


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nnUNetv2_ssl_benchmark",
        description="Train trainers x label budgets x seeds on one fold, predict the held-out test set with the final "
        "checkpoint, evaluate in mm and write a report with paired tests against the supervised baseline. "
        "Rerun the same command to resume.")
    p.add_argument("-d", metavar="DATASET", help="dataset id or name")
    p.add_argument("-c", default="3d_fullres", metavar="CONFIGURATION", help="default 3d_fullres")
    p.add_argument("-f", type=int, default=0, metavar="FOLD", help="fold (default 0)")
    p.add_argument("-p", default="nnUNetPlans", metavar="PLANS", help="plans identifier, e.g. nnUNetPlans_CPU")
    p.add_argument("-o", required=True, metavar="OUT", help="benchmark folder (resumed if it exists)")
    p.add_argument("-tr", nargs="*", default=[], metavar="TRAINER",
                   help=f"SSL trainers to compare with {BASELINE} (which always runs); add {RESEEDED} for the "
                   "training-noise control")
    p.add_argument("--budgets", nargs="+", type=int, metavar="N", help="labeled cases, e.g. 3 10")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="default 0 1")
    p.add_argument("--full", action="store_true", help=f"also train {BASELINE} on all training cases of the fold")
    p.add_argument("--epochs", type=int)
    p.add_argument("--iterations-per-epoch", type=int)
    p.add_argument("--val-iterations", type=int, default=10, help="validation iterations per epoch (default 10)")
    p.add_argument("--test-images", type=Path, default=None, help="default nnUNet_raw/<dataset>/imagesTs")
    p.add_argument("--test-labels", type=Path, default=None, help="default nnUNet_raw/<dataset>/labelsTs")
    p.add_argument("--test-cases", nargs="+", default=None, metavar="ID", help="only these test cases")
    p.add_argument("--nsd-tolerance", type=float, default=1.0, help="NSD tolerance in mm (default 1)")
    p.add_argument("-device", default="cuda", choices=("cuda", "cpu", "mps"))
    p.add_argument("--no-file-check", action="store_true",
                   help="skip the byte-identical image check between test and training files")
    p.add_argument("--records", type=Path, default=None, metavar="DIR",
                   help="keep a small copy of every finished run (per-case metrics, training log, provenance) and a "
                   "report in DIR; runs found there count as finished, so the benchmark resumes from DIR in a new "
                   "work folder")
    p.add_argument("--dry-run", action="store_true", help="print the runs and their state, run nothing")
    p.add_argument("--report-only", action="store_true",
                   help="rewrite the report of -o (a work or records folder) from its finished runs; needs no "
                   "other option")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    a = parser.parse_args(argv)
    if not a.report_only:
        missing = [flag for flag, value in (("-d", a.d), ("--budgets", a.budgets), ("--epochs", a.epochs),
                                            ("--iterations-per-epoch", a.iterations_per_epoch)) if value is None]
        if missing:
            parser.error(f"the following arguments are required: {', '.join(missing)}")

    def command() -> None:
        from nnunet_ssl.evaluation.report import write_report

        out = Path(a.o).resolve()
        if a.report_only:
            if not (out / SETTINGS_FILE).is_file():
                raise SSLInputError(f"{out} has no {SETTINGS_FILE}; it is not a benchmark folder")
            write_report(out)
            print(f"report: {out / 'report.md'}")
            return
        for name, value, low in (("--epochs", a.epochs, 1), ("--iterations-per-epoch", a.iterations_per_epoch, 1),
                                 ("--val-iterations", a.val_iterations, 1)):
            if value < low:
                raise SSLInputError(f"{name} must be at least {low}, got {value}")
        if any(b < 1 for b in a.budgets):
            raise SSLInputError(f"--budgets must be positive numbers of labeled cases, got {a.budgets}")
        s = BenchmarkSettings(dataset=a.d, configuration=a.c, fold=a.f, plans=a.p, trainers=list(a.tr),
                              budgets=sorted(set(a.budgets)), seeds=list(dict.fromkeys(a.seeds)), full=a.full,
                              epochs=a.epochs, iterations_per_epoch=a.iterations_per_epoch,
                              val_iterations=a.val_iterations, test_cases=list(a.test_cases or []),
                              nsd_tolerance_mm=a.nsd_tolerance)
        records = a.records.resolve() if a.records is not None else None
        if records == out:
            raise SSLInputError("--records must be another folder than -o; the records copy the runs of -o")
        run_benchmark(s, out, a.device, a.test_images, a.test_labels, a.dry_run, not a.no_file_check, records)

    return exit_code_of(command)


if __name__ == "__main__":
    sys.exit(main())
