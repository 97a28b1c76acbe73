"""``nnUNetv2_ssl_throughput``: seconds per training iteration of SSL trainers against nnU-Net's supervised step.

Every trainer is built in its own fresh Python process (as ``nnUNetv2_train`` builds it: plans, configuration,
fold, dataset.json, device), runs ``on_train_start()`` (dataloaders, unlabeled pool) and then ``W`` warm-up and
``N`` measured iterations of its real ``train_step``, on the same dataset, plans, configuration and fold, in one
run of the command. Per iteration it records:

- the step time: ``next(labeled loader)`` plus ``train_step(batch)``, with CUDA synchronised before and after;
- the data wait: time blocked in ``next()`` of every training loader of the trainer (nnU-Net's labeled loader and,
  for SSL trainers, the unlabeled loader that ``train_step`` draws from), measured by wrapping the loaders;
- peak memory: on CUDA ``torch.cuda.max_memory_allocated`` after the start of the timing; on CPU the process's peak
  resident set (``ru_maxrss``, which includes Python and torch themselves; worker processes of the data
  augmentation are not included). A fresh process per trainer keeps these peaks separate.

No validation, checkpoint or ``on_train_end`` runs; nnU-Net's output files of ``on_train_start`` (plans copy,
debug.json, log) go to a temporary results folder that is deleted afterwards; artefacts a trainer needs (a trained
quality predictor) are still read from the user's ``nnUNet_results``.

The analytic compute counts network passes of one sample: forward = 1, backward = 2 (the usual estimate that a
backward pass costs about two forwards), so nnU-Net's supervised step costs ``3 B`` for a labeled batch ``B``.
SSL trainers declare their count in ``compute_units(B, U)`` (:meth:`nnunet_ssl.trainers.base.nnUNetTrainerSSL
.compute_units`); losses, augmentation and EMA updates are not counted.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from tqdm import tqdm

from nnunet_ssl.errors import SSLInputError, exit_code_of

REFERENCE_TRAINER = "nnUNetTrainerSupervised"
#: environment variables that change the timing; the ones that are set are shown in front of the command
TIMING_ENV = ("nnUNet_n_proc_DA", "nnUNet_compile", "nnUNet_def_n_proc", "nnUNet_ssl_seed", "OMP_NUM_THREADS",
              "OMP_WAIT_POLICY", "CUDA_VISIBLE_DEVICES")
TABLE_COLUMNS = ["trainer", "s/it median", "s/it mean", "time × supervised", "data wait", "peak memory (MB)",
                 "B / U", "compute units", "units × supervised", "notes"]


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

    @property
    def median(self) -> float:
        return statistics.median(self.step_seconds)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.step_seconds)

    @property
    def wait_share(self) -> float:
        return sum(self.wait_seconds) / sum(self.step_seconds)


# ---------------------------------------------------------------------------------------------- trainers and units
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


def analytic_units(cls: type, labeled_batch: int, unlabeled_batch: int | None) -> tuple[float | None, str]:
    """(units per step, where the count comes from); forward of one sample = 1 unit, backward = 2.

    Trainers with ``compute_units`` declare their own count; an nnU-Net trainer that keeps nnU-Net's
    ``train_step`` costs ``3 B``; anything else is unknown (None)."""
    from nnunet_ssl.trainers.base import nnUNetTrainerSSL

    if hasattr(cls, "compute_units"):
        owner = next(c for c in cls.__mro__ if "compute_units" in vars(c))
        u = labeled_batch if unlabeled_batch is None else unlabeled_batch
        source = ("base-class default" if owner is nnUNetTrainerSSL else "declared by the trainer" if owner is cls
                  else f"declared by {owner.__name__}")
        return float(cls.compute_units(labeled_batch, u)), source
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    if cls.train_step is nnUNetTrainer.train_step:
        return float(3 * labeled_batch), "nnU-Net step"
    return None, "train_step of its own, no compute_units"


# ---------------------------------------------------------------------------------------------- the measurement
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


def _rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def measure_trainer(trainer_name: str, dataset_name: str, configuration: str, plans_identifier: str, fold,
                    device: str, warmup: int, iterations: int, progress: bool = True,
                    scratch_results: str | None = None) -> TrainerTiming:
    """Builds one trainer in this process and times ``warmup + iterations`` training steps (see module docstring).

    nnU-Net's folders come from the environment. With ``scratch_results``, the trainer is constructed with
    ``nnUNet_results`` pointing there (nnU-Net fixes its output folder, log and debug files in ``__init__``) and
    the user's ``nnUNet_results`` is restored afterwards, so artefacts a trainer reads during ``initialize`` (e.g. a
    trained quality predictor) come from the user's folder while nothing is written to it. A trainer that refuses
    its input (``SSLInputError``) is returned as skipped with the reason."""
    import torch
    from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA

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
            trainer = _construct(cls, scratch_results, plans, configuration, fold, dataset_json, torch_device)
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
        return result
    finally:
        if trainer is not None:
            for name, wrapper in timed.items():
                setattr(trainer, name, wrapper.loader)
            for value in vars(trainer).values():
                if _is_loader(value) and hasattr(value, "_finish"):
                    with contextlib.suppress(Exception):
                        value._finish()


def _construct(cls: type, scratch_results: str | None, *args):
    if scratch_results is None:
        return cls(*args)
    user = os.environ.get("nnUNet_results")
    os.environ["nnUNet_results"] = scratch_results
    try:
        return cls(*args)
    finally:
        if user is None:
            del os.environ["nnUNet_results"]
        else:
            os.environ["nnUNet_results"] = user


def _worker(spec_file: str, out_file: str) -> int:
    """Entry of the per-trainer process: measures one trainer and writes its TrainerTiming as JSON."""
    with open(spec_file) as f:
        spec = json.load(f)
    log = open(spec["log"], "a")
    try:
        # nnU-Net prints plans and log lines to stdout; keep them in the log so the progress bars stay readable
        with contextlib.redirect_stdout(log):
            result = measure_trainer(spec["trainer"], spec["dataset"], spec["configuration"], spec["plans"],
                                     spec["fold"], spec["device"], spec["warmup"], spec["iterations"],
                                     scratch_results=spec.get("scratch_results"))
    except SSLInputError as e:
        result = TrainerTiming(spec["trainer"], status="skipped", reason=e.message)
    except Exception as e:  # reported in the table; the traceback stays in the log
        traceback.print_exc(file=log)
        result = TrainerTiming(spec["trainer"], status="failed", reason=f"{type(e).__name__}: {e}".splitlines()[0])
    finally:
        log.close()
    with open(out_file, "w") as f:
        json.dump(asdict(result), f)
    return 0


def _run_in_subprocess(trainer: str, spec: dict, scratch: str, env: dict[str, str]) -> TrainerTiming:
    spec_file, out_file = os.path.join(scratch, f"{trainer}.spec.json"), os.path.join(scratch, f"{trainer}.json")
    log_file = os.path.join(scratch, f"{trainer}.log")
    with open(spec_file, "w") as f:
        json.dump({**spec, "trainer": trainer, "log": log_file}, f)
    proc = subprocess.run([sys.executable, "-m", "nnunet_ssl.evaluation.throughput", spec_file, out_file], env=env,
                          stdout=subprocess.PIPE, text=True)
    if os.path.isfile(out_file):
        with open(out_file) as f:
            data = json.load(f)
        result = TrainerTiming(**data)
    else:
        result = TrainerTiming(trainer, status="failed", reason=f"worker process exited with {proc.returncode}")
    if result.status == "failed" and os.path.isfile(log_file):
        with open(log_file) as f:
            tail = f.read()[-3000:]
        tqdm.write(f"--- {trainer} failed; end of its log:\n{tail}{proc.stdout[-2000:]}", file=sys.stderr)
    return result


def merge_rounds(runs: Sequence[TrainerTiming]) -> TrainerTiming:
    """One trainer's rounds as one result: measured iterations pooled, the highest peak memory; a skipped or failed
    round makes the whole result skipped or failed."""
    bad = next((r for r in runs if r.status != "ok"), None)
    if bad is not None:
        return bad
    first = runs[0]
    peaks = [r.peak_memory_mb for r in runs if r.peak_memory_mb is not None]
    starts = [r.start_memory_mb for r in runs if r.start_memory_mb is not None]
    return TrainerTiming(**{**asdict(first),
                            "step_seconds": [s for r in runs for s in r.step_seconds],
                            "wait_seconds": [s for r in runs for s in r.wait_seconds],
                            "peak_memory_mb": max(peaks) if peaks else None,
                            "start_memory_mb": min(starts) if starts else None})


# ---------------------------------------------------------------------------------------------- the table
def _fmt_seconds(s: float) -> str:
    return f"{s:.3f}" if s < 10 else f"{s:.1f}"


def _fmt_units(u: float) -> str:
    return f"{u:g}"


def table_rows(results: Sequence[TrainerTiming], classes: dict[str, type], plans_batch: int,
               reference: str = REFERENCE_TRAINER) -> list[list[str]]:
    """One row of strings per trainer, in TABLE_COLUMNS order."""
    ref = next((r for r in results if r.trainer == reference and r.status == "ok"), None)
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
        if source and source not in ("nnU-Net step", "declared by the trainer"):
            notes.append(f"units: {source}")  # inherited counts may miss what the subclass adds
        bu = f"{b} / {u}" if u is not None else f"{b} / –"
        units_cells = ["n/a", "n/a"] if units is None else [_fmt_units(units), f"{units / ref_units:.2f}"]
        if r.status == "ok" and r.step_seconds:
            ratio = f"{r.median / ref.median:.2f}" if ref is not None else "n/a"
            cells = [_fmt_seconds(r.median), _fmt_seconds(r.mean), ratio, f"{100 * r.wait_share:.0f} %",
                     f"{r.peak_memory_mb:.0f}"]
        else:
            cells = ["–"] * 5
        rows.append([f"`{r.trainer}`", *cells, bu, *units_cells, "; ".join(notes).replace("|", "/")])
    return rows


def markdown_table(rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "|".join("---" for _ in TABLE_COLUMNS) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _machine_info(device: str) -> list[str]:
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


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nnUNetv2_ssl_throughput",
        description="Seconds per training iteration of SSL trainers against the supervised nnUNetTrainer on the "
        "same dataset, plans, configuration and fold, each trainer in a fresh process; also the share of each step "
        "spent waiting for data, peak memory and the analytic compute (forward = 1, backward = 2 units). Prints a "
        "markdown table; -o also writes it with the command and machine details.",
    )
    p.add_argument("-d", required=True, metavar="DATASET", help="dataset id or name")
    p.add_argument("-c", required=True, metavar="CONFIGURATION", help="configuration, e.g. 3d_fullres")
    p.add_argument("-p", default="nnUNetPlans", metavar="PLANS", help="plans identifier (default nnUNetPlans)")
    p.add_argument("-f", default="0", metavar="FOLD", help="fold (default 0)")
    p.add_argument("-tr", nargs="+", default=None, metavar="TRAINER",
                   help=f"trainers to time (default: {REFERENCE_TRAINER} and every SSL trainer of the package); "
                   f"{REFERENCE_TRAINER} is always added as the reference")
    p.add_argument("--iterations", type=int, default=10, help="measured iterations per trainer (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="warm-up iterations per trainer, not measured (default 3)")
    p.add_argument("--rounds", type=int, default=1,
                   help="run the list of trainers this many times, interleaved (A B C A B C), and pool the measured "
                   "iterations, so that a change of the machine's load hits every trainer alike (default 1)")
    p.add_argument("-device", choices=("cpu", "cuda"), default=None,
                   help="default: cuda if available, else cpu")
    p.add_argument("-o", default=None, metavar="FILE.md", help="also write the table, command and machine to FILE")
    p.add_argument("--note", default=None, help="a sentence added under the table in -o (e.g. the machine's load)")
    return p


def run_benchmark(args: argparse.Namespace, command_line: str) -> str:
    """Times every trainer and returns the markdown document (also written to ``args.o`` when given)."""
    from nnunet_ssl.data import datasets

    if args.iterations < 1 or args.warmup < 0 or args.rounds < 1:
        raise SSLInputError("need --iterations >= 1, --warmup >= 0 and --rounds >= 1")
    fold = args.f if args.f == "all" else int(args.f) if args.f.isdigit() else None
    if fold is None:
        raise SSLInputError(f"fold {args.f!r} is not a number or 'all'; pass e.g. -f 0")
    device = args.device
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SSLInputError("-device cuda but torch sees no GPU; use -device cpu")
    name = datasets.resolve_dataset_name(args.d)
    base = datasets.preprocessed_dataset_folder(name)
    configuration = datasets.load_configuration(datasets.load_plans(base, args.p), args.c)
    names = list(dict.fromkeys(args.tr)) if args.tr else default_trainers()
    if REFERENCE_TRAINER not in names:
        names.insert(0, REFERENCE_TRAINER)
    classes = {n: find_trainer_class(n) for n in names}
    if args.o and os.path.isdir(args.o):
        raise SSLInputError(f"-o {args.o} is a folder; give a file name such as docs/throughput.md")

    load_before = os.getloadavg()
    env = dict(os.environ)
    env.setdefault("nnUNet_ssl_seed", "0")
    scratch = tempfile.mkdtemp(prefix="nnunet_ssl_throughput_")
    os.makedirs(os.path.join(scratch, "results"))
    spec = {"dataset": name, "configuration": args.c, "plans": args.p, "fold": fold, "device": device,
            "warmup": args.warmup, "iterations": args.iterations, "scratch_results": os.path.join(scratch, "results")}
    runs: dict[str, list[TrainerTiming]] = {n: [] for n in names}
    try:
        bar = tqdm([(r, n) for r in range(args.rounds) for n in names], desc="trainer runs", unit="run")
        for round_index, trainer in bar:
            bar.set_postfix_str(trainer)
            if runs[trainer] and runs[trainer][-1].status != "ok":
                continue  # a trainer that refused or failed once is not retried
            result = _run_in_subprocess(trainer, spec, scratch, env)
            msg = f"round {round_index + 1}, {trainer}: {result.status}" + (
                f", median {result.median:.3f} s/it, data wait {100 * result.wait_share:.0f} %" if
                result.status == "ok" else f" ({result.reason})")
            tqdm.write(msg)
            runs[trainer].append(result)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    results = [merge_rounds(runs[n]) for n in names]
    load_after = os.getloadavg()

    table = markdown_table(table_rows(results, classes, configuration.batch_size))
    ok = [r for r in results if r.status == "ok"]
    da = sorted({r.n_proc_da for r in ok if r.n_proc_da is not None})
    threads = sorted({r.torch_threads for r in ok if r.torch_threads is not None})
    settings = [
        f"- dataset {name}, plans `{args.p}`, configuration `{args.c}`, fold {fold}: patch "
        f"{list(configuration.patch_size)}, labeled batch B = {configuration.batch_size}, features per stage "
        f"{configuration.network_arch_init_kwargs.get('features_per_stage')}",
        f"- {args.rounds} round(s), trainers interleaved; per round and trainer a fresh process with {args.warmup} "
        f"warm-up + {args.iterations} measured iterations (pooled over rounds); "
        f"data-augmentation workers (nnUNet_n_proc_DA): {', '.join(map(str, da)) or '?'}; torch threads: "
        f"{', '.join(map(str, threads)) or '?'}",
        f"- load average (1 min) before / after: {load_before[0]:.2f} / {load_after[0]:.2f}",
    ]
    memory = ("`torch.cuda.max_memory_allocated` during the timed steps" if device == "cuda" else
              "peak resident memory of the trainer's process (`ru_maxrss`; includes Python and torch, excludes "
              "data-augmentation worker processes)")
    doc = "\n".join([
        "# Training throughput", "",
        "Command:", "", "```bash", command_line, "```", "",
        *_machine_info(device), *settings, "",
        table, "",
        "- s/it: one training iteration, `next()` of the labeled loader plus `train_step` (median and mean over the "
        "measured iterations); time × supervised: median over the median of "
        f"`{REFERENCE_TRAINER}` (nnU-Net's `nnUNetTrainer` step) measured in the same run.",
        "- data wait: share of the step spent blocked in `next()` of the trainer's training loaders (labeled and, "
        "for SSL trainers, unlabeled).",
        f"- peak memory: {memory}.",
        "- compute units: network passes of one sample per step, forward = 1, backward = 2; the supervised step is "
        "3 B. Mean Teacher and FixMatch: 3 (B + U) + U (+ B with MetaSSL's labeled reference); CPS and MEDL: "
        "2 · 3 (B + U); quality-guided trainers add the quality predictor's passes, U + 3 U with QAR (U + U "
        "without), although it is a smaller network. Losses, augmentation and EMA updates are not counted. "
        "B / U: labeled / unlabeled batch.",
        "- Absolute seconds depend on the machine and on what else runs on it; ratios measured in the same run are "
        "the comparable numbers.",
    ])
    if args.note:
        doc += "\n- " + args.note.strip()
    doc += "\n"
    if args.o:
        os.makedirs(os.path.dirname(os.path.abspath(args.o)), exist_ok=True)
        with open(args.o, "w") as f:
            f.write(doc)
    print(table)
    if args.o:
        print(f"written to {args.o}")
    failed = [r.trainer for r in results if r.status == "failed"]
    if failed:
        raise RuntimeError(f"trainers failed: {', '.join(failed)} (see the log tails above)")
    return doc


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    shown = list(sys.argv[1:] if argv is None else argv)
    env = [f"{k}={shlex.quote(os.environ[k])}" for k in TIMING_ENV if os.environ.get(k) is not None]
    command_line = " ".join([*env, "nnUNetv2_ssl_throughput", shlex.join(shown)])

    def command() -> None:
        try:
            run_benchmark(args, command_line)
        except RuntimeError as e:
            sys.stdout.flush()
            print(f"nnunet-ssl: {e}", file=sys.stderr)
            raise SystemExit(1) from None

    return exit_code_of(command)


if __name__ == "__main__":
    # `python -m nnunet_ssl.evaluation.throughput SPEC OUT` is the per-trainer process started by main()
    if len(sys.argv) != 3 or not sys.argv[1].endswith(".json"):
        sys.exit("usage: nnUNetv2_ssl_throughput ... (this module's __main__ is the internal per-trainer worker)")
    sys.exit(_worker(sys.argv[1], sys.argv[2]))
