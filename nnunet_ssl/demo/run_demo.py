"""``nnUNetv2_ssl_demo``: the whole semi-supervised workflow on a small dataset, in a few minutes on a CPU.

It builds a synthetic 3D dataset (or copies a raw nnU-Net dataset given with ``--raw``) into a work folder, points
nnU-Net's three folders there, and runs the same commands a user would run: plan and preprocess, preprocess the
unlabeled images, simulate a label budget, then train the supervised baseline and Mean Teacher on fold 0. It ends
with a side-by-side table of validation Dice. Every command runs as a subprocess with its output streamed into a
log file of the work folder, so a failure shows exactly what a user would see.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path

#: file that marks a work folder as made by the demo; only such folders are ever cleaned
MARKER = ".nnunet_ssl_demo"
#: the only entries the demo creates (and therefore may delete) inside its work folder
WORK_SUBFOLDERS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "logs")
DEFAULT_WORKDIR = "nnunet_ssl_demo"
SYNTHETIC_ID = 990
CONFIGURATION = "3d_fullres"
PLANS = "nnUNetPlans"
FOLD = 0
TRAINERS = ("nnUNetTrainerSupervised", "nnUNetTrainerMeanTeacher")
UNLABELED_SUBFOLDER = "imagesUnlabeled"
# Sizes measured on 2 shared CPU cores: (16, 24, 24) patches cost ~0.13 s per supervised and ~0.28 s per Mean
# Teacher iteration, 2x less than (16, 32, 32). The smaller class needs ~200 iterations before its Dice leaves 0,
# so 300 iterations give a supervised foreground Dice of ~0.55 in ~1 minute (Mean Teacher ~2 minutes).
SYNTHETIC_CASES = {"num_train": 20, "num_unlabeled": 10, "num_test": 4, "shape": (16, 24, 24)}
DEFAULT_EPOCHS = 10
DEFAULT_ITERATIONS = 30
# per-epoch validation only feeds the pseudo Dice in the log; the real number comes from the final validation
VAL_ITERATIONS = 2
DEFAULT_NUM_LABELED = 4
NUM_PROCESSES = 2
_DATASET_NAME = re.compile(r"^Dataset(\d{3})_[A-Za-z0-9_.-]+$")


class DemoError(Exception):
    """Bad input or a work folder we must not touch: one line, exit status 2."""


class StageFailed(Exception):
    """A subprocess returned non-zero."""

    def __init__(self, stage: str, returncode: int, log: Path, tail: Sequence[str]) -> None:
        super().__init__(f"{stage} failed with exit status {returncode}")
        self.stage, self.returncode, self.log, self.tail = stage, returncode, log, list(tail)


# ---------------------------------------------------------------------------------------------------------------
# small helpers


def console_script(name: str) -> str:
    """The console script ``name`` of the running environment, so the demo works without an activated venv."""
    # sys.executable is not resolved on purpose: a venv's python is a symlink to the base interpreter
    candidate = Path(sys.executable).parent / name
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise DemoError(f"cannot find the command {name} next to {sys.executable} or on PATH; install nnunet-ssl "
                        "(pip install -e .) in this environment")
    return found


class Clock:
    def __init__(self) -> None:
        self.start = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def stamp(self) -> str:
        seconds = int(self.elapsed())
        return f"[{seconds // 60:02d}:{seconds % 60:02d}]"


def _say(message: str = "") -> None:
    print(message, flush=True)


# ---------------------------------------------------------------------------------------------------------------
# work folder and dataset


def prepare_workdir(workdir: Path, keep: bool) -> None:
    """Creates or reuses ``workdir``. A non-empty folder without our marker is refused, and inside a marked folder
    only the entries the demo creates are removed (unless ``keep``): user data is never deleted."""
    if workdir.exists() and not workdir.is_dir():
        raise DemoError(f"--workdir {workdir} exists and is not a folder; choose another --workdir")
    marker = workdir / MARKER
    if workdir.is_dir() and any(workdir.iterdir()) and not marker.is_file():
        raise DemoError(f"--workdir {workdir} is not empty and was not made by nnUNetv2_ssl_demo (it has no {MARKER} "
                        "file); choose a new or empty folder")
    workdir.mkdir(parents=True, exist_ok=True)
    marker.write_text("made by nnUNetv2_ssl_demo; the demo may delete nnUNet_raw, nnUNet_preprocessed, "
                      "nnUNet_results and logs in this folder\n")
    for sub in WORK_SUBFOLDERS:
        path = workdir / sub
        if not keep:
            if path.is_symlink() or path.is_file():
                path.unlink()  # a link is removed, never what it points to
            elif path.is_dir():
                shutil.rmtree(path)
        path.mkdir(exist_ok=True)


def check_raw_dataset(raw: Path, workdir: Path) -> tuple[int, str]:
    """Validates a user's raw dataset folder and returns (dataset id, folder name)."""
    if not raw.is_dir():
        raise DemoError(f"--raw {raw} is not a folder; give a raw nnU-Net dataset folder such as .../Dataset004_Name")
    match = _DATASET_NAME.match(raw.name)
    if match is None:
        raise DemoError(f"--raw {raw}: the folder name must look like DatasetXXX_Name (three digits), as in nnU-Net")
    missing = [p for p in ("dataset.json", "imagesTr", "labelsTr") if not (raw / p).exists()]
    if missing:
        raise DemoError(f"--raw {raw} has no {', '.join(missing)}; it must be a raw nnU-Net dataset folder")
    raw_resolved, work_resolved = raw.resolve(), workdir.resolve()
    if raw_resolved == work_resolved or work_resolved in raw_resolved.parents:
        raise DemoError(f"--raw {raw} lies inside the work folder {workdir}, which the demo cleans; copy it elsewhere")
    return int(match.group(1)), raw.name


# ---------------------------------------------------------------------------------------------------------------
# environment and commands


def demo_environment(workdir: Path, epochs: int, iterations: int, seed: int) -> tuple[dict[str, str], dict[str, str]]:
    """(environment for planning and preprocessing, environment for training)."""
    from nnunet_ssl.cli.trainers import ext_trainer_path

    env = dict(os.environ)
    env.update(
        nnUNet_raw=str(workdir / "nnUNet_raw"),
        nnUNet_preprocessed=str(workdir / "nnUNet_preprocessed"),
        nnUNet_results=str(workdir / "nnUNet_results"),
        nnUNet_def_n_proc=str(NUM_PROCESSES),
        nnUNet_compile="f",  # torch.compile costs minutes on a CPU and gains nothing in a short run
        nnUNet_extTrainer=ext_trainer_path(),
        PYTHONUNBUFFERED="1",  # so that epoch lines reach us while they happen
    )
    # OpenMP threads that spin while waiting make torch 3-4x slower on a busy 2-core machine (measured)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # nnU-Net's planner breaks with nnUNet_n_proc_DA=0, so it is set for training only
    env.pop("nnUNet_n_proc_DA", None)
    train_env = dict(env)
    train_env.update(
        nnUNet_n_proc_DA="0",  # data augmentation in the main process: worker processes only cost time on 2 cores
        nnUNet_ssl_epochs=str(epochs),
        nnUNet_ssl_iterations_per_epoch=str(iterations),
        nnUNet_ssl_val_iterations=str(VAL_ITERATIONS),
        nnUNet_ssl_seed=str(seed),
    )
    return env, train_env


def commands(dataset_id: int, num_labeled: int, seed: int, with_unlabeled: bool) -> dict[str, list[str]]:
    """The command lines of every stage, by stage name, with bare command names (resolved when run)."""
    d = str(dataset_id)
    out = {"plan": ["nnUNetv2_plan_and_preprocess", "-d", d, "-c", CONFIGURATION, "-np", str(NUM_PROCESSES),
                    "-npfp", str(NUM_PROCESSES)]}
    if with_unlabeled:
        out["unlabeled"] = ["nnUNetv2_ssl_preprocess_unlabeled", "-d", d, "-c", CONFIGURATION, "-np",
                            str(NUM_PROCESSES)]
    out["splits"] = ["nnUNetv2_ssl_make_splits", "-d", d, "--num-labeled", str(num_labeled), "--seed", str(seed)]
    for trainer in TRAINERS:
        out[trainer] = ["nnUNetv2_train", d, CONFIGURATION, str(FOLD), "-tr", trainer, "-device", "cpu"]
    return out


def reproduce_script(env: dict[str, str], train_env: dict[str, str], cmds: dict[str, list[str]]) -> str:
    """Shell lines that redo the demo by hand, with the same environment."""
    def export(names: Sequence[str], source: dict[str, str]) -> str:
        return "export " + " ".join(f"{n}={shlex.quote(source[n])}" for n in names)

    bin_dir = shlex.quote(str(Path(sys.executable).parent))
    lines = [
        f"export PATH={bin_dir}:\"$PATH\"",
        export(("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"), env),
        export(("nnUNet_def_n_proc", "nnUNet_compile", "OMP_WAIT_POLICY"), env),
        'export nnUNet_extTrainer="$(nnUNetv2_ssl_trainers --path)"',
        "unset nnUNet_n_proc_DA  # the planner breaks with nnUNet_n_proc_DA=0",
    ]
    lines += [shlex.join(cmds[k]) for k in ("plan", "unlabeled", "splits") if k in cmds]
    lines.append(export(("nnUNet_n_proc_DA", "nnUNet_ssl_epochs", "nnUNet_ssl_iterations_per_epoch",
                         "nnUNet_ssl_val_iterations", "nnUNet_ssl_seed"), train_env))
    lines += [shlex.join(cmds[t]) for t in TRAINERS]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# running a stage


def run_stage(argv: list[str], env: dict[str, str], log_path: Path, cwd: Path,
              on_line: Callable[[str], None] | None = None) -> None:
    """Runs ``argv`` with its output (stdout and stderr) streamed into ``log_path``; each line also goes to
    ``on_line``. Raises StageFailed on a non-zero exit."""
    stage = argv[0]
    argv = [console_script(argv[0]), *argv[1:]]
    tail: deque[str] = deque(maxlen=30)
    with open(log_path, "w", encoding="utf-8") as log:
        log.write(f"$ {shlex.join(argv)}\n")
        log.flush()
        # text mode splits tqdm's carriage-return updates into lines, which keeps the log and the tail readable
        proc = subprocess.Popen(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, encoding="utf-8", errors="replace", bufsize=1)
        try:
            assert proc.stdout is not None
            for raw_line in proc.stdout:
                log.write(raw_line)
                log.flush()
                line = raw_line.rstrip("\n")
                if line.strip():
                    tail.append(line)
                if on_line is not None:
                    on_line(line)
            returncode = proc.wait()
        except BaseException:
            # Ctrl-C or a bug here: do not leave a training running in the background
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
    if returncode != 0:
        raise StageFailed(stage, returncode, log_path, tail)


_FLOAT = r"[-+]?(?:\d+\.?\d*(?:[eE][-+]?\d+)?|nan|inf)"


def parse_floats(text: str) -> list[float]:
    """Numbers of an nnU-Net log value such as ``[np.float32(0.87), np.float32(0.0)]``."""
    text = re.sub(r"np\.float\d+\(", "(", text)
    return [float(x) for x in re.findall(_FLOAT, text)]


class TrainingReporter:
    """Turns nnU-Net's training log lines into one status line per epoch."""

    def __init__(self, label: str, epochs: int, clock: Clock) -> None:
        self.label, self.epochs, self.clock = label, epochs, clock
        self.epoch: int | None = None
        self.values: dict[str, str] = {}
        self.unlabeled_pool: int | None = None
        self.validating = False

    def __call__(self, line: str) -> None:
        # nnU-Net's lines read "2026-01-01 12:00:00.000000: message"
        message = line.split(": ", 1)[1].strip() if re.match(r"^\d{4}-\d\d-\d\d ", line) else line.strip()
        if m := re.fullmatch(r"Epoch (\d+)", message):
            self.epoch, self.values = int(m.group(1)), {}
        elif m := re.match(r"(train_loss|val_loss) (\S+)", message):
            self.values[m.group(1)] = f"{float(m.group(2)):+.3f}"
        elif message.startswith("Pseudo dice"):
            self.values["dice"] = " ".join(f"{v:.2f}" for v in parse_floats(message))
        elif message.startswith("ssl: "):
            pairs = dict(re.findall(r"(\w+) (" + _FLOAT + ")", message[5:]))
            if "unsup" in pairs and "lambda" in pairs:
                # MetaSSL's "unsup" includes its labeled branch; show that part so the total is not misread
                branch = f" (labeled branch {float(pairs['branch']):.4f})" if "branch" in pairs else ""
                self.values["ssl"] = f"unsup {float(pairs['unsup']):.4f}{branch} lambda {float(pairs['lambda']):.3f}"
        elif m := re.match(r"unlabeled pool: (\d+) cases", message):
            self.unlabeled_pool = int(m.group(1))
        elif m := re.match(r"Epoch time: (" + _FLOAT + ") s", message):
            self._epoch_line(float(m.group(1)))
        elif message.startswith("predicting ") and not self.validating:
            self.validating = True
            _say(f"{self.clock.stamp()}   {self.label}: final validation on fold {FOLD} ...")
        elif message.startswith("Mean Validation Dice"):
            _say(f"{self.clock.stamp()}   {self.label}: {message}")

    def _epoch_line(self, seconds: float) -> None:
        epoch = "?" if self.epoch is None else str(self.epoch + 1)
        parts = [f"{self.clock.stamp()}   {self.label} epoch {epoch:>3}/{self.epochs}",
                 f"loss {self.values.get('train_loss', '?')} (val {self.values.get('val_loss', '?')})",
                 f"pseudo Dice {self.values.get('dice', '?')}"]
        if "ssl" in self.values:
            parts.append(self.values["ssl"])
        parts.append(f"{seconds:.1f} s")
        _say("  ".join(parts))


class EchoFilter:
    """Prints the lines of a short stage that match ``pattern``, indented."""

    def __init__(self, pattern: str) -> None:
        self.pattern = re.compile(pattern)

    def __call__(self, line: str) -> None:
        if self.pattern.search(line):
            _say(f"          {line.strip()}")


# ---------------------------------------------------------------------------------------------------------------
# results


def trainer_folder(workdir: Path, dataset_name: str, trainer: str) -> Path:
    return workdir / "nnUNet_results" / dataset_name / f"{trainer}__{PLANS}__{CONFIGURATION}" / f"fold_{FOLD}"


def load_dice(summary_file: Path) -> dict[str, float]:
    """{'foreground mean': Dice, '<class key>': Dice, ...} from nnU-Net's validation summary.json."""
    summary = json.loads(summary_file.read_text())
    out = {"foreground mean": float(summary["foreground_mean"]["Dice"])}
    for key, metrics in summary["mean"].items():
        out[str(key)] = float(metrics["Dice"])
    return out


def label_names(dataset_json: dict) -> dict[str, str]:
    """Class key as written in summary.json -> label name (regions keep their key)."""
    names = {}
    for name, value in dataset_json.get("labels", {}).items():
        if isinstance(value, int) and value != 0:
            names[str(value)] = name
    return names


def format_table(results: dict[str, dict[str, float]], names: dict[str, str]) -> str:
    """Side-by-side Dice of the trainers in ``results`` (trainer -> row -> Dice), plus the difference of the last
    trainer to the first."""
    trainers = list(results)
    rows: list[str] = []
    for table in results.values():
        rows += [r for r in table if r not in rows]
    headers = [t.removeprefix("nnUNetTrainer") for t in trainers]
    width = max(len(f"{r} {names.get(r, '')}") for r in rows) + 2
    lines = ["".ljust(width) + "".join(h.rjust(14) for h in headers) + ("difference".rjust(13) if len(trainers) > 1
                                                                         else "")]
    for row in rows:
        label = f"{row} {names[row]}" if row in names else row
        values = [results[t].get(row) for t in trainers]
        cells = "".join(("-" if v is None else f"{v:.4f}").rjust(14) for v in values)
        if len(trainers) > 1 and values[0] is not None and values[-1] is not None:
            cells += f"{values[-1] - values[0]:+.4f}".rjust(13)
        lines.append(label.ljust(width) + cells)
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# main


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nnUNetv2_ssl_demo",
        description="Runs the nnunet-ssl workflow end to end on the CPU: plan and preprocess, preprocess unlabeled "
        "images, simulate a label budget, train the supervised baseline and Mean Teacher on fold 0, and compare "
        f"their validation Dice. By default on a synthetic 3D dataset (Dataset{SYNTHETIC_ID}), in about 4 minutes "
        "on 2 CPU cores. A short demo, not a benchmark.",
    )
    p.add_argument("--raw", type=Path, default=None, metavar="FOLDER",
                   help="a raw nnU-Net dataset folder (DatasetXXX_Name with dataset.json, imagesTr, labelsTr and "
                   "optionally imagesUnlabeled) to use instead of the synthetic one; it is copied, never modified. "
                   "Real datasets take much longer than the synthetic one")
    p.add_argument("--workdir", type=Path, default=Path(DEFAULT_WORKDIR), metavar="DIR",
                   help=f"folder for nnUNet_raw, nnUNet_preprocessed, nnUNet_results and logs (default ./"
                   f"{DEFAULT_WORKDIR}); must be new, empty, or made by an earlier demo")
    p.add_argument("--num-labeled", type=int, default=DEFAULT_NUM_LABELED, metavar="N",
                   help=f"labeled training cases kept in fold {FOLD}; the others become unlabeled "
                   f"(default {DEFAULT_NUM_LABELED})")
    p.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS, metavar="E",
                   help=f"epochs per training (default {DEFAULT_EPOCHS})")
    p.add_argument("--iterations", type=int, default=DEFAULT_ITERATIONS, metavar="I",
                   help=f"training iterations per epoch (default {DEFAULT_ITERATIONS})")
    p.add_argument("--seed", type=int, default=0, metavar="S",
                   help="seed of the synthetic data, the choice of labeled cases and the training (default 0)")
    p.add_argument("--keep", action="store_true",
                   help="reuse the dataset, the preprocessing and the finished trainings of an earlier demo in "
                   "--workdir (a training is redone if it has no validation result or ran with other settings); by "
                   "default the demo's folders in --workdir are rebuilt from scratch")
    return p


def _check_args(args: argparse.Namespace) -> None:
    for flag, value, minimum in (("--num-labeled", args.num_labeled, 1), ("--epochs", args.epochs, 1),
                                 ("--iterations", args.iterations, 1), ("--seed", args.seed, 0)):
        if value < minimum:
            raise DemoError(f"{flag} must be at least {minimum}, got {value}")


def _stage_header(clock: Clock, number: int, total: int, text: str) -> None:
    _say(f"{clock.stamp()} {number}/{total} {text}")


def run(args: argparse.Namespace) -> int:
    clock = Clock()
    _check_args(args)
    workdir = args.workdir.expanduser().absolute()
    if args.raw is not None:
        dataset_id, dataset_name = check_raw_dataset(args.raw.expanduser().absolute(), workdir)
    else:
        dataset_id, dataset_name = SYNTHETIC_ID, f"Dataset{SYNTHETIC_ID:03d}_SSLSynthetic"
    prepare_workdir(workdir, args.keep)
    logs = workdir / "logs"
    raw_dataset = workdir / "nnUNet_raw" / dataset_name
    _say(f"nnunet-ssl demo in {workdir} ({args.epochs} epochs x {args.iterations} iterations per trainer, "
         f"{args.num_labeled} labeled cases, seed {args.seed})")

    # 1. the dataset
    total = 6
    if args.raw is None:
        _stage_header(clock, 1, total, "synthetic dataset ...")
        if args.keep and (raw_dataset / "dataset.json").is_file():
            _say("          kept from an earlier run")
        else:
            from nnunet_ssl.demo.synthetic import make_synthetic_dataset

            make_synthetic_dataset(workdir / "nnUNet_raw", dataset_id=SYNTHETIC_ID, seed=args.seed, **SYNTHETIC_CASES)
            _say(f"          {raw_dataset} ({SYNTHETIC_CASES['num_train']} labeled, "
                 f"{SYNTHETIC_CASES['num_unlabeled']} unlabeled images, shape {SYNTHETIC_CASES['shape']})")
    else:
        _stage_header(clock, 1, total, f"copy {args.raw} ...")
        if args.keep and (raw_dataset / "dataset.json").is_file():
            _say("          kept from an earlier run")
        else:
            shutil.copytree(args.raw, raw_dataset, symlinks=False)
            _say(f"          -> {raw_dataset}")
    unlabeled_folder = raw_dataset / UNLABELED_SUBFOLDER
    with_unlabeled = unlabeled_folder.is_dir() and any(unlabeled_folder.iterdir())

    env, train_env = demo_environment(workdir, args.epochs, args.iterations, args.seed)
    cmds = commands(dataset_id, args.num_labeled, args.seed, with_unlabeled)
    reproduce = reproduce_script(env, train_env, cmds)
    script = workdir / "reproduce.sh"
    script.write_text("#!/usr/bin/env bash\n# the demo's commands, to run by hand\nset -euo pipefail\n" + reproduce)
    script.chmod(0o755)

    # 2.-4. preprocessing and the label budget
    pp_dataset = workdir / "nnUNet_preprocessed" / dataset_name
    planned = (pp_dataset / f"{PLANS}.json").is_file() and (pp_dataset / f"{PLANS}_{CONFIGURATION}").is_dir()
    _stage_header(clock, 2, total, "nnUNetv2_plan_and_preprocess ...")
    if args.keep and planned:
        _say("          kept from an earlier run")
    else:
        run_stage(cmds["plan"], env, logs / "1_plan_and_preprocess.log", workdir)
    _stage_header(clock, 3, total, "nnUNetv2_ssl_preprocess_unlabeled ...")
    if with_unlabeled:
        run_stage(cmds["unlabeled"], env, logs / "2_preprocess_unlabeled.log", workdir,
                  EchoFilter(r"processed"))
    else:
        _say(f"          skipped: no images in {unlabeled_folder}; Mean Teacher uses the unlabeled part of the split")
    _stage_header(clock, 4, total, f"nnUNetv2_ssl_make_splits --num-labeled {args.num_labeled} ...")
    run_stage(cmds["splits"], env, logs / "3_make_splits.log", workdir,
              EchoFilter(r"^\s*(fold|0)\s"))

    # 5.-6. the two trainings
    settings = {"epochs": args.epochs, "iterations": args.iterations, "val_iterations": VAL_ITERATIONS,
                "seed": args.seed, "num_labeled": args.num_labeled}
    pools: dict[str, int | None] = {}
    for number, trainer in enumerate(TRAINERS, start=5):
        short = trainer.removeprefix("nnUNetTrainer")
        _stage_header(clock, number, total, f"nnUNetv2_train -tr {trainer} (fold {FOLD}, cpu) ...")
        done_file = logs / f"{trainer}.done.json"
        summary = trainer_folder(workdir, dataset_name, trainer) / "validation" / "summary.json"
        done = json.loads(done_file.read_text()) if done_file.is_file() else {}
        if args.keep and summary.is_file() and done.get("settings") == settings:
            _say("          kept from an earlier run with the same settings")
            pools[trainer] = done.get("unlabeled_pool")
            continue
        done_file.unlink(missing_ok=True)
        start = clock.elapsed()
        reporter = TrainingReporter(short, args.epochs, clock)
        run_stage(cmds[trainer], train_env, logs / f"{number - 1}_train_{short}.log", workdir, reporter)
        pools[trainer] = reporter.unlabeled_pool
        # what --keep compares before it reuses this training
        done_file.write_text(json.dumps({"settings": settings, "unlabeled_pool": reporter.unlabeled_pool}))
        _say(f"{clock.stamp()}   {short} done in {clock.elapsed() - start:.0f} s")

    # the report
    results = {}
    for trainer in TRAINERS:
        summary = trainer_folder(workdir, dataset_name, trainer) / "validation" / "summary.json"
        results[trainer] = load_dice(summary)
    names = label_names(json.loads((raw_dataset / "dataset.json").read_text()))
    splits = json.loads((pp_dataset / "splits_final.json").read_text())[FOLD]
    n_val, n_lab = len(splits["val"]), len(splits["train"])
    pool = pools.get("nnUNetTrainerMeanTeacher")
    pool_text = f"{pool} unlabeled cases" if pool is not None else "the unlabeled cases"
    _say()
    _say(f"Validation Dice, fold {FOLD} ({n_val} cases). Both trainers used {n_lab} labeled cases; Mean Teacher "
         f"also {pool_text}.")
    _say(format_table(results, names))
    _say()
    _say("Training curves:")
    for trainer in TRAINERS:
        folder = trainer_folder(workdir, dataset_name, trainer)
        for png in ("progress.png", "progress_ssl.png"):
            if (folder / png).is_file():
                _say(f"  {folder / png}")
    _say()
    _say(f"Note: this is a short CPU demo ({args.epochs} epochs x {args.iterations} iterations instead of nnU-Net's "
         "1000 x 250, one fold, few validation cases), not a benchmark; its numbers are noisy and say nothing about "
         "how the methods compare on real data.")
    _say()
    _say(f"How to reproduce by hand (also in {script}):")
    for line in reproduce.splitlines():
        _say(f"  {line}")
    _say(f"Logs: {logs}")
    _say(f"{clock.stamp()} demo finished")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return run(args)
    except DemoError as e:
        print(f"nnUNetv2_ssl_demo: error: {e}", file=sys.stderr)
        return 2
    except StageFailed as e:
        print(f"\nnnUNetv2_ssl_demo: {e} (log: {e.log})\nlast lines of the log:", file=sys.stderr)
        for line in e.tail:
            print(f"  | {line}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nnnUNetv2_ssl_demo: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
