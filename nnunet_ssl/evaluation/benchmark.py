"""The label-budget benchmark: trainers x label budgets x seeds on one fold, evaluated on held-out test cases.

Each (budget, seed) gets its own workspace ``OUT/runs/<budget>/seed_<s>/``: an ``nnUNet_preprocessed`` folder
whose dataset entries are symbolic links to the real preprocessed data, except ``splits_final.json``, which holds
that budget's split, and its own ``nnUNet_results``. So the user's splits are never changed and runs never share
a results folder. Seed ``s`` draws the labeled cases (``budget_splits(seed=s)``) and seeds training
(``nnUNet_ssl_seed=s``). The supervised baseline ``nnUNetTrainerSupervised`` (nnU-Net's trainer with the same
schedule) always runs; ``full`` adds it on all of the fold's training cases. The trainer
``nnUNetTrainerSupervisedReseeded`` adds the control for training noise: the baseline again, on the same labeled
cases, with training seed ``s + 1000``. Runs are made in the order of ``run_matrix``.

Every model is tested with ``checkpoint_final.pth``: nothing is selected on test data. Before anything runs,
test cases found in the fold's labeled, unlabeled or validation data, in imagesTr/imagesUnlabeled, or as a
byte-identical image file there, stop the benchmark. Finished steps (training, test prediction, evaluation) are
detected from their files and skipped, so an interrupted benchmark resumes where it stopped; an interrupted
training continues from its ``checkpoint_latest.pth`` (nnU-Net's ``--c``).

With ``records`` a compact copy of every finished run (:mod:`.benchmark_records`) is kept in a folder of the same
layout, with its own report. Runs found there count as finished, so a campaign whose work folder is lost (a new
machine) continues from the records, which are small enough to commit. The folder layout is
:mod:`.benchmark_layout`, the report :mod:`.report`, the command line :mod:`nnunet_ssl.cli.benchmark`
(``nnUNetv2_ssl_benchmark``).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

from nnunet_ssl.data import datasets
from nnunet_ssl.data.layout import SPLITS_UNLABELED_KEY, unlabeled_preprocessed_folder
from nnunet_ssl.errors import SSLInputError
from nnunet_ssl.evaluation.benchmark_layout import (
    BASELINE,
    FULL,
    OFFLINE,
    OFFLINE_DATASET_ID,
    PROVENANCE,
    SETTINGS_FILE,
    TRAINING_LOG,
    BenchmarkSettings,
    Paths,
    Run,
    checkpoint_logging,
    environment_info,
    load_or_store_settings,
    load_settings,
    offline_dataset_name,
    offline_name,
    run_matrix,
    write_json,
)
from nnunet_ssl.evaluation.benchmark_records import export_record, record_folder, sync_records
from nnunet_ssl.evaluation.stages import Clock, StageFailed, TrainingReporter, run_stage

# ---------------------------------------------------------------------------------------------------------------
# preparation


def check_schedule(epochs: int, iterations_per_epoch: int, val_iterations: int, budgets: Sequence[int]) -> None:
    """Refuses a training schedule or label budgets that cannot run (SSLInputError naming the flag)."""
    for name, value, low in (("--epochs", epochs, 1), ("--iterations-per-epoch", iterations_per_epoch, 1),
                             ("--val-iterations", val_iterations, 1)):
        if value < low:
            raise SSLInputError(f"{name} must be at least {low}, got {value}")
    if any(b < 1 for b in budgets):
        raise SSLInputError(f"--budgets must be positive numbers of labeled cases, got {budgets}")


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
    write_json(target / datasets.SPLITS_FILE, splits)
    paths.results.mkdir(parents=True, exist_ok=True)
    paths.logs.mkdir(parents=True, exist_ok=True)


def splits_for(base: list[dict], budget: str, seed: int, fold: int,
               groups: dict[str, str] | None = None) -> list[dict]:
    from nnunet_ssl.data.splits import budget_splits

    if budget == FULL:
        return [dict(f) for f in base]
    n = int(budget)
    if n > len(base[fold]["train"]):
        raise SSLInputError(f"--budgets {n} is more than the {len(base[fold]['train'])} training cases of fold {fold}")
    return budget_splits(base, num_labeled=n, seed=seed, groups=groups)


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


def check_trainers(names: Sequence[str]) -> None:
    """Refuses trainer names that neither nnU-Net nor nnunet-ssl defines."""
    import nnunetv2
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class

    from nnunet_ssl import trainers

    for name in names:
        if name == OFFLINE:
            continue
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
# running


def training_environment(paths: Paths, s: BenchmarkSettings, seed: int) -> dict[str, str]:
    """The environment of every nnU-Net command of one run: its workspace, the schedule and the seed."""
    from nnunet_ssl import ext_trainer_path

    env = dict(os.environ)
    env.update(nnUNet_preprocessed=str(paths.preprocessed), nnUNet_results=str(paths.results),
               nnUNet_extTrainer=ext_trainer_path(), nnUNet_ssl_epochs=str(s.epochs),
               nnUNet_ssl_iterations_per_epoch=str(s.iterations_per_epoch),
               nnUNet_ssl_val_iterations=str(s.val_iterations), nnUNet_ssl_seed=str(seed), PYTHONUNBUFFERED="1",
               # snapshots at 1/3 and 2/3 of training: the offline row's teacher sources
               nnUNet_ssl_snapshots="3")
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env


#: the lines of nnUNetv2_ssl_pseudolabel the benchmark shows
PSEUDOLABEL_PROGRESS = ("[", "pseudo-labelling ", "predicted ", "kept ", "WARNING", "nnunet-ssl:")


def train(run: Run, paths: Paths, s: BenchmarkSettings, device: str, clock: Clock, role: str = "") -> None:
    """Trains (or resumes) one run's model with nnUNetv2_train, unless its checkpoint_final.pth exists; ``role``
    names it in the progress line (e.g. the offline row's teacher)."""
    if (paths.model / "checkpoint_final.pth").is_file():
        return
    env = training_environment(paths, s, run.seed)
    resume = (paths.model / "checkpoint_latest.pth").is_file()
    how = "resuming from checkpoint_latest.pth" if resume else "from scratch"
    print(f"{clock.stamp()}   training {role}({how})", flush=True)
    train_cmd = ["nnUNetv2_train", s.dataset, s.configuration, str(s.fold), "-tr", run.trainer, "-p", s.plans,
                 "-device", device]
    if resume:
        train_cmd.append("--c")
    # every stage of a training, since one resumed elsewhere mixes machines; a start from scratch replaces
    # the model of any earlier start that was stopped before its first checkpoint, so it drops those entries
    entries = json.loads(paths.training_stages.read_text()) if resume and paths.training_stages.is_file() else []
    entries.append({"stage": "resume" if resume else "train", "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    **environment_info(device)})
    write_json(paths.training_stages, entries)
    run_stage(train_cmd, env, paths.logs / f"train_{run.trainer}.log", paths.workspace,
              TrainingReporter(run.trainer, s.epochs, clock, s.fold))


def offline_pseudolabel(run: Run, paths: Paths, s: BenchmarkSettings, device: str, raw: Path, clock: Clock) -> None:
    """The offline row's training: the baseline of the same budget and seed is the teacher (trained here if this
    workspace lacks it), ``nnUNetv2_ssl_pseudolabel --rounds`` pseudo-labels the budget's unlabeled cases (and
    imagesUnlabeled) and trains the baseline trainer on them with the same schedule, in the workspace's own
    nnUNet_raw. Every pool case is kept and no voxel is ignored: the plain recipe; the teacher's snapshots at 1/3
    and 2/3 of training join its final checkpoint as sources, so the scores include stability."""
    from nnunet_ssl.trainers.environment import snapshot_name

    teacher_run = Run(BASELINE, run.budget, run.seed)
    teacher = Paths(paths.workspace.parent.parent.parent, teacher_run, s)
    train(teacher_run, teacher, s, device, clock, role=f"the teacher {BASELINE} ")
    if (paths.model / "checkpoint_final.pth").is_file():
        return
    paths.raw.mkdir(parents=True, exist_ok=True)
    link = paths.raw / s.dataset
    if not link.exists():
        link.symlink_to(raw.resolve())
    checkpoints = [c for c in (snapshot_name(1, 3), snapshot_name(2, 3)) if (teacher.model / c).is_file()]
    env = {**training_environment(paths, s, run.seed), "nnUNet_raw": str(paths.raw)}
    cmd = ["nnUNetv2_ssl_pseudolabel", "-d", s.dataset, "-t", str(OFFLINE_DATASET_ID), "--name", offline_name(s),
           "-o", str(paths.offline_work), "-m", str(teacher.model.parent), "-f", str(s.fold),
           "-chk", *checkpoints, "checkpoint_final.pth", "--split-fold", str(s.fold), "--rounds",
           str(s.offline_rounds), "--student-trainer", BASELINE, "--link-images", "--no-probabilities",
           "-device", device, "-npp", "1"]
    entries = json.loads(paths.training_stages.read_text()) if paths.training_stages.is_file() else []
    entries.append({"stage": "pseudolabel", "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "teacher": str(teacher.model), "training_runs": 1 + s.offline_rounds,
                    **environment_info(device)})
    write_json(paths.training_stages, entries)
    print(f"{clock.stamp()}   offline pseudo-labelling, {s.offline_rounds} round(s)", flush=True)
    # the command reports its own progress (rounds, the student's epochs); the rest stays in the log
    run_stage(cmd, env, paths.logs / f"train_{run.trainer}.log", paths.workspace,
              lambda line: print(f"    {line}", flush=True) if line.startswith(PSEUDOLABEL_PROGRESS) else None)


def execute(run: Run, paths: Paths, s: BenchmarkSettings, test_images: Path, test_labels: Path,
            test_ids: list[str], device: str, dataset_json: Path, clock: Clock, raw: Path | None = None) -> None:
    """The missing steps of one run: training (or its resumption), test prediction, evaluation."""
    env = training_environment(paths, s, run.seed)
    predict_dataset, predict_trainer, predict_fold = s.dataset, run.trainer, s.fold
    if run.trainer == OFFLINE:
        offline_pseudolabel(run, paths, s, device, raw or Path(datasets.raw_dataset_folder(s.dataset)), clock)
        env["nnUNet_raw"] = str(paths.raw)
        predict_dataset, predict_trainer, predict_fold = offline_dataset_name(s, s.offline_rounds), BASELINE, 0
    else:
        train(run, paths, s, device, clock)
    if not paths.done:
        print(f"{clock.stamp()}   predicting {len(test_ids)} test cases with checkpoint_final.pth", flush=True)
        paths.predictions.mkdir(parents=True, exist_ok=True)
        predict = ["nnUNetv2_predict", "-i", str(test_images), "-o", str(paths.predictions), "-d", predict_dataset,
                   "-c", s.configuration, "-f", str(predict_fold), "-tr", predict_trainer, "-p", s.plans,
                   "-chk", "checkpoint_final.pth", "-device", device, "-npp", "1", "-nps", "1",
                   "--continue_prediction"]
        run_stage(predict, env, paths.logs / f"predict_{run.trainer}.log", paths.workspace)
        from nnunet_ssl.evaluation.metrics_folders import evaluate_folders

        # evaluated into a side folder first: summary.json in the final folder marks the run as done
        tmp = paths.evaluation.with_name(paths.evaluation.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        evaluate_folders(test_labels, paths.predictions, tmp, dataset_json=dataset_json,
                         nsd_tolerance_mm=s.nsd_tolerance_mm, case_ids=test_ids)
        write_json(tmp / TRAINING_LOG, checkpoint_logging(paths.model))
        stages = json.loads(paths.training_stages.read_text()) if paths.training_stages.is_file() else []
        write_json(tmp / PROVENANCE, {"training": stages, "evaluation": environment_info(device)})
        shutil.rmtree(paths.evaluation, ignore_errors=True)
        os.replace(tmp, paths.evaluation)


def run_benchmark(s: BenchmarkSettings, out: Path, device: str = "cuda", test_images: Path | None = None,
                  test_labels: Path | None = None, dry_run: bool = False, compare_files: bool = True,
                  records: Path | None = None) -> list[Run]:
    """Runs every missing step of the matrix and rewrites the report after each finished run (and the records'
    report, with ``records``). Returns the runs that were to do."""
    from nnunet_ssl.data.splits import original_splits
    from nnunet_ssl.evaluation.leakage import check_no_leakage, nnunet_image_reader
    from nnunet_ssl.evaluation.report import write_report

    if records is not None and Path(records).resolve() == Path(out).resolve():
        raise SSLInputError("--records must be another folder than -o; the records copy the runs of -o")
    s.dataset = datasets.resolve_dataset_name(s.dataset)
    raw = Path(datasets.raw_dataset_folder(s.dataset))
    pp = Path(datasets.preprocessed_dataset_folder(s.dataset))
    dataset_json = datasets.load_preprocessed_dataset_json(str(pp))
    ending = dataset_json["file_ending"]
    cm = datasets.load_configuration(datasets.load_plans(str(pp), s.plans), s.configuration)
    check_trainers(s.trainers)
    base, _ = original_splits(str(pp), str(raw))
    groups = None
    if s.groups:
        from nnunet_ssl.data.splits import grouped_base, load_groups

        s.groups = str(Path(s.groups).resolve())
        groups = load_groups(s.groups)
        base, note = grouped_base(base, groups)
        if note:
            print(note, flush=True)
    if not 0 <= s.fold < len(base):
        raise SSLInputError(f"fold {s.fold} does not exist; the splits have folds 0-{len(base) - 1}")
    n_train = len(set(base[s.fold]["train"]) | set(base[s.fold].get(SPLITS_UNLABELED_KEY, [])))
    too_big = [b for b in s.budgets if b > n_train]
    if too_big:  # refused here, so that --dry-run says it too
        raise SSLInputError(f"--budgets {' '.join(map(str, too_big))} exceed the {n_train} training cases of fold "
                            f"{s.fold}; use budgets of at most {n_train}")
    images, labels, ids = test_set(raw, ending, test_images, test_labels, s.test_cases or None)
    unl_folder = unlabeled_preprocessed_folder(str(pp), cm.data_identifier)
    unl_ids = sorted(f[:-5] for f in os.listdir(unl_folder) if f.endswith(".b2nd")) if os.path.isdir(unl_folder) \
        else []
    image_files = [str(f) for f in sorted(images.iterdir()) if f.name.endswith(ending)
                   and f.name[: -len(ending) - 5] in set(ids)]
    # the union over folds covers every labeled case; the fold entry adds its unlabeled list below
    everything = {"train": sorted({c for f in base for c in f["train"]}), "val": sorted({c for f in base for c in
                                                                                         f["val"]})}
    read = nnunet_image_reader(dataset_json, image_files[0]) if compare_files and image_files else None
    check_no_leakage(ids, image_files, everything, str(raw), unl_ids, ending, compare_files=compare_files, read=read)
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
            union, known = load_settings(records), load_settings(out)
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
        prepare_workspace(paths, pp, s.dataset, splits_for(base, run.budget, run.seed, s.fold, groups))
        for cmd in prerequisites(run.trainer, s, device, paths.results):
            print(f"{clock.stamp()}   prerequisite: {' '.join(cmd)}", flush=True)
            run_stage(cmd, training_environment(paths, s, run.seed), paths.logs / f"prerequisite_{run.trainer}.log",
                      paths.workspace)
        try:
            execute(run, paths, s, test_folder, labels, ids, device, pp / "dataset.json", clock, raw)
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


def rewrite_report(out: Path) -> Path:
    """Rewrites the report of a benchmark (work or records) folder from its finished runs; returns report.md."""
    from nnunet_ssl.evaluation.report import write_report

    if not (out / SETTINGS_FILE).is_file():
        raise SSLInputError(f"{out} has no {SETTINGS_FILE}; it is not a benchmark folder")
    return write_report(out)
