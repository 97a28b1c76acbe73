"""Training throughput: seconds per training iteration of SSL trainers against nnU-Net's supervised step.

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
.compute_units`); losses, augmentation and EMA updates are not counted. Units weigh every network and every pass
alike; the FLOPs of one more real step, counted by torch's ``FlopCounterMode`` after the timed steps
(:func:`.throughput_measure.count_flops`), weigh them by their convolutions and matrix products, so a heavier
second network or a small quality predictor counts for what it computes. "time ÷ FLOPs" (time ratio over FLOP
ratio, both against the supervised step) is then the overhead beyond network compute: 1.00 when there is none.

Parts: :mod:`.throughput_measure` (one trainer, in one process), :mod:`.throughput_worker` (the fresh process per
trainer), :mod:`.throughput_table` (compute units and the table); the command line is
:mod:`nnunet_ssl.cli.throughput` (``nnUNetv2_ssl_throughput``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass

from tqdm import tqdm

from nnunet_ssl.errors import SSLInputError
from nnunet_ssl.evaluation.throughput_measure import TrainerTiming, find_trainer_class
from nnunet_ssl.evaluation.throughput_table import (
    REFERENCE_TRAINER,
    default_trainers,
    machine_info,
    markdown_table,
    merge_rounds,
    table_rows,
)
from nnunet_ssl.evaluation.throughput_worker import run_in_subprocess

#: environment variables that change the timing; the ones that are set are shown in front of the command
TIMING_ENV = ("nnUNet_n_proc_DA", "nnUNet_compile", "nnUNet_def_n_proc", "nnUNet_ssl_seed", "OMP_NUM_THREADS",
              "OMP_WAIT_POLICY", "CUDA_VISIBLE_DEVICES")


@dataclass
class ThroughputReport:
    """The markdown document, its table alone, and the trainers whose measurement failed."""

    document: str
    table: str
    failed: list[str]


def run_throughput(dataset: str, configuration: str, plans: str = "nnUNetPlans", fold: str = "0",
                   trainers: Sequence[str] | None = None, iterations: int = 10, warmup: int = 3, rounds: int = 1,
                   device: str | None = None, output: str | None = None, note: str | None = None,
                   command_line: str = "", at_fraction: float = 0.5) -> ThroughputReport:
    """Times every trainer (``trainers``, default ``default_trainers()``; the reference is always added) and returns
    the markdown document, also written to ``output`` when given. ``fold`` is a number or ``"all"``, ``device``
    ``cpu``, ``cuda`` or None (cuda if available); ``command_line`` is shown in the document; the steps are timed
    at the start of the epoch ``round(at_fraction * num_epochs)``."""
    from nnunet_ssl.data import datasets

    if iterations < 1 or warmup < 0 or rounds < 1:
        raise SSLInputError("need --iterations >= 1, --warmup >= 0 and --rounds >= 1")
    if not 0.0 <= at_fraction < 1.0:
        raise SSLInputError(f"--at {at_fraction} is not in [0, 1): give the point of the run to time, e.g. 0.5")
    fold_value: int | str | None = fold if fold == "all" else int(fold) if fold.isdigit() else None
    if fold_value is None:
        raise SSLInputError(f"fold {fold!r} is not a number or 'all'; pass e.g. -f 0")
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SSLInputError("-device cuda but torch sees no GPU; use -device cpu")
    name = datasets.resolve_dataset_name(dataset)
    base = datasets.preprocessed_dataset_folder(name)
    cm = datasets.load_configuration(datasets.load_plans(base, plans), configuration)
    names = list(dict.fromkeys(trainers)) if trainers else default_trainers()
    if REFERENCE_TRAINER not in names:
        names.insert(0, REFERENCE_TRAINER)
    classes = {n: find_trainer_class(n) for n in names}
    if output and os.path.isdir(output):
        raise SSLInputError(f"-o {output} is a folder; give a file name such as docs/throughput.md")

    load_before = os.getloadavg()
    env = dict(os.environ)
    env.setdefault("nnUNet_ssl_seed", "0")
    scratch = tempfile.mkdtemp(prefix="nnunet_ssl_throughput_")
    os.makedirs(os.path.join(scratch, "results"))
    spec = {"dataset": name, "configuration": configuration, "plans": plans, "fold": fold_value, "device": device,
            "warmup": warmup, "iterations": iterations, "scratch_results": os.path.join(scratch, "results"),
            "at_fraction": at_fraction}
    runs: dict[str, list[TrainerTiming]] = {n: [] for n in names}
    try:
        bar = tqdm([(r, n) for r in range(rounds) for n in names], desc="trainer runs", unit="run")
        for round_index, trainer in bar:
            bar.set_postfix_str(trainer)
            if runs[trainer] and runs[trainer][-1].status != "ok":
                continue  # a trainer that refused or failed once is not retried
            result = run_in_subprocess(trainer, spec, scratch, env)
            msg = f"round {round_index + 1}, {trainer}: {result.status}" + (
                f", median {result.median:.3f} s/it, data wait {100 * result.wait_share:.0f} %" if
                result.status == "ok" else f" ({result.reason})")
            tqdm.write(msg)
            runs[trainer].append(result)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    results = [merge_rounds(runs[n]) for n in names]
    load_after = os.getloadavg()

    table = markdown_table(table_rows(results, classes, cm.batch_size))
    ok = [r for r in results if r.status == "ok"]
    da = sorted({r.n_proc_da for r in ok if r.n_proc_da is not None})
    epochs = sorted({r.epoch for r in ok if r.epoch is not None})
    threads = sorted({r.torch_threads for r in ok if r.torch_threads is not None})
    settings = [
        f"- dataset {name}, plans `{plans}`, configuration `{configuration}`, fold {fold_value}: patch "
        f"{list(cm.patch_size)}, labeled batch B = {cm.batch_size}, features per stage "
        f"{cm.network_arch_init_kwargs.get('features_per_stage')}",
        f"- {rounds} round(s), trainers interleaved; per round and trainer a fresh process with {warmup} "
        f"warm-up + {iterations} measured iterations (pooled over rounds) at the start of epoch "
        f"{', '.join(map(str, epochs)) or '?'} ({at_fraction:g} of the run, as a resumed run); "
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
        *machine_info(device), *settings, "",
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
        "- GFLOP / it: floating-point operations of one more training step after the timed ones, backward included, "
        "counted by torch's `FlopCounterMode` (convolutions and matrix products, 2 per multiply-add; normalisation, "
        "activations, losses and optimizer updates not counted); FLOPs × supervised: over the reference's count; "
        "time ÷ FLOPs: time × supervised over FLOPs × supervised, the share of extra time that is not network "
        "compute (1.00: none).",
        "- Absolute seconds depend on the machine and on what else runs on it; ratios measured in the same run are "
        "the comparable numbers.",
    ])
    if note:
        doc += "\n- " + note.strip()
    doc += "\n"
    if output:
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        with open(output, "w") as f:
            f.write(doc)
    return ThroughputReport(doc, table, [r.trainer for r in results if r.status == "failed"])
