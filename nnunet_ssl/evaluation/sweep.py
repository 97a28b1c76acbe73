"""A validation-only settings sweep on a benchmark workspace (``nnUNetv2_ssl_sweep``).

Each grid point trains the trainer with ``nnUNet_ssl_settings`` (and ``nnUNet_ssl_preset``) on one label budget and
seed of an existing benchmark, with the benchmark's schedule, labeled cases, unlabeled pool and seed, and is scored
by nnU-Net's own final validation of the fold's validation cases (``validation/summary.json``). The supervised
baseline of the same workspace is scored the same way. Nothing here predicts, reads or lists the test cases, so a
setting chosen from the sweep is chosen without them; the test benchmark then runs once with the choice.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

from nnunet_ssl.errors import SSLInputError
from nnunet_ssl.evaluation.benchmark_layout import (
    BASELINE,
    SETTINGS_FILE,
    TRAINING_LOG,
    BenchmarkSettings,
    Paths,
    Run,
    checkpoint_logging,
    environment_info,
    load_settings,
    write_json,
)
from nnunet_ssl.evaluation.stages import Clock, TrainingReporter, run_stage

SWEEP_FILE = "sweep.json"
SWEEP_REPORT = "sweep.md"


def parse_grid(items: list[str]) -> list[dict[str, str]]:
    """``["a=1,2", "b=x"]`` -> the cartesian product ``[{a: 1, b: x}, {a: 2, b: x}]`` (values kept as text: the
    trainer parses them as Python literals). A value with commas inside brackets stays one value."""
    axes: list[tuple[str, list[str]]] = []
    for item in items:
        name, sep, values = item.partition("=")
        if not sep or not name.strip() or not values.strip():
            raise SSLInputError(f"--grid '{item}' is not name=value1,value2,...; e.g. "
                                "--grid unsupervised_share=0.1,0.5")
        axes.append((name.strip(), _split_top_level(values)))
    names = [n for n, _ in axes]
    if len(set(names)) != len(names):
        raise SSLInputError(f"--grid names a setting twice: {', '.join(names)}")
    return [dict(zip(names, combo)) for combo in itertools.product(*(v for _, v in axes))] or [{}]


def _split_top_level(text: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for ch in text:
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == "," and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += ch
    parts.append(current.strip())
    return [p for p in parts if p]


def point_tag(point: dict[str, str]) -> str:
    """A folder name for one grid point, e.g. ``unsupervised_share=0.5__rampup_fraction=0.3``; the default preset is
    implied (``preset=default`` alone is ``defaults``, as is the empty point)."""
    point = {k: v for k, v in point.items() if (k, v) != ("preset", "default")}
    if not point:
        return "defaults"
    safe = {k: "".join(c if c.isalnum() or c in ".-" else "_" for c in v) for k, v in point.items()}
    return "__".join(f"{k}={v}" for k, v in safe.items())


def validation_dice(model_folder: Path) -> dict | None:
    """nnU-Net's final validation of a run: {"mean": foreground mean Dice, "per_class": {label: Dice}}; None if it
    has not run."""
    path = model_folder / "validation" / "summary.json"
    if not path.is_file():
        return None
    summary = json.loads(path.read_text())
    return {"mean": float(summary["foreground_mean"]["Dice"]),
            "per_class": {k: float(v["Dice"]) for k, v in summary["mean"].items()}}


@dataclass
class SweepSpec:
    benchmark: Path
    budget: int
    seed: int
    trainer: str
    points: list[dict[str, str]]
    out: Path
    device: str


def check_points(trainer: str, points: list[dict[str, str]]) -> None:
    """Refuses, before any training, a trainer that is not one of ours and a grid point its class would refuse."""
    from nnunet_ssl import trainers
    from nnunet_ssl.trainers.base import ENV_SETTINGS, PRESETS, nnUNetTrainerSSL, parse_settings

    cls = getattr(trainers, trainer, None) if trainer in trainers.__all__ else None
    if cls is None or not issubclass(cls, nnUNetTrainerSSL):
        raise SSLInputError(f"-tr {trainer}: the sweep sets SSL trainer settings; name one of the SSL trainers that "
                            "nnUNetv2_ssl_trainers lists")
    for point in points:
        if point.get("preset", "default") not in PRESETS:
            raise SSLInputError(f"--grid preset={point['preset']} is unknown; use {' or '.join(PRESETS)}")
        text = ", ".join(f"{k}={v}" for k, v in point.items() if k != "preset")
        try:
            parse_settings(text, cls)
        except SSLInputError as e:
            raise SSLInputError(f"--grid: {e.message.replace(ENV_SETTINGS + ': ', '')}") from None


def _workspace(spec: SweepSpec, s: BenchmarkSettings) -> Paths:
    baseline = Paths(spec.benchmark, Run(BASELINE, str(spec.budget), spec.seed), s)
    if not (baseline.preprocessed / s.dataset / "splits_final.json").is_file():
        raise SSLInputError(
            f"{baseline.workspace} has no label-budget split for {spec.budget} labeled cases and seed {spec.seed}; "
            f"run nnUNetv2_ssl_benchmark -o {spec.benchmark} --budgets {spec.budget} --seeds {spec.seed} first "
            "(its baseline is the sweep's reference)")
    return baseline


def _environment(ws: Paths, s: BenchmarkSettings, seed: int, results: Path, point: dict[str, str]) -> dict[str, str]:
    from nnunet_ssl.evaluation.benchmark import training_environment

    settings = ", ".join(f"{k}={v}" for k, v in point.items() if k != "preset")
    return {**training_environment(ws, s, seed), "nnUNet_raw": str(ws.raw), "nnUNet_results": str(results),
            "nnUNet_ssl_preset": point.get("preset", "default"), "nnUNet_ssl_settings": settings}


def run_sweep(spec: SweepSpec) -> dict:
    """Trains every grid point (resuming, skipping finished ones), then writes ``sweep.json`` and ``sweep.md``."""
    if not (spec.benchmark / SETTINGS_FILE).is_file():
        raise SSLInputError(f"{spec.benchmark} is not a benchmark folder (no {SETTINGS_FILE}); pass the -o folder of "
                            "nnUNetv2_ssl_benchmark")
    check_points(spec.trainer, spec.points)
    s = load_settings(spec.benchmark)
    ws = _workspace(spec, s)
    baseline = validation_dice(ws.model)
    if baseline is None:
        raise SSLInputError(f"the baseline of {ws.workspace} has no final validation ({ws.model}/validation/"
                            "summary.json); let nnUNetv2_ssl_benchmark finish its baseline first")
    clock = Clock()
    rows = []
    for i, point in enumerate(spec.points, 1):
        tag = point_tag(point)
        results = spec.out / "results" / spec.trainer / tag
        model = results / s.dataset / f"{spec.trainer}__{s.plans}__{s.configuration}" / f"fold_{s.fold}"
        print(f"{clock.stamp()} [{i}/{len(spec.points)}] {spec.trainer} {tag}", flush=True)
        if validation_dice(model) is None:
            resume = (model / "checkpoint_latest.pth").is_file()
            logs = spec.out / "logs"
            logs.mkdir(parents=True, exist_ok=True)
            cmd = ["nnUNetv2_train", s.dataset, s.configuration, str(s.fold), "-tr", spec.trainer, "-p", s.plans,
                   "-device", spec.device, *(["--c"] if resume else [])]
            run_stage(cmd, _environment(ws, s, spec.seed, results, point), logs / f"train_{spec.trainer}_{tag}.log",
                      spec.out, TrainingReporter(f"{spec.trainer} {tag}", s.epochs, clock, s.fold))
        dice = validation_dice(model)
        log = checkpoint_logging(model)
        if log is not None:
            write_json(spec.out / "runs" / spec.trainer / tag / TRAINING_LOG, log)
        rows.append({"trainer": spec.trainer, "settings": point, "tag": tag, "validation": dice,
                     "delta": None if dice is None else dice["mean"] - baseline["mean"]})
    return write_sweep(spec, s, baseline, rows)


def write_sweep(spec: SweepSpec, s: BenchmarkSettings, baseline: dict, rows: list[dict]) -> dict:
    """Merges these rows into ``sweep.json`` (rows of other trainers or points stay) and rewrites ``sweep.md``."""
    path = spec.out / SWEEP_FILE
    old = json.loads(path.read_text()) if path.is_file() else {}
    if old and (old.get("budget"), old.get("seed"), old.get("benchmark")) != (spec.budget, spec.seed,
                                                                               str(spec.benchmark)):
        raise SSLInputError(f"{spec.out} holds a sweep of another budget, seed or benchmark; use another -o")
    merged = {(r["trainer"], r["tag"]): r for r in old.get("rows", [])}
    merged.update({(r["trainer"], r["tag"]): r for r in rows})
    sweep = {"benchmark": str(spec.benchmark), "dataset": s.dataset, "fold": s.fold, "budget": spec.budget,
             "seed": spec.seed, "epochs": s.epochs, "iterations_per_epoch": s.iterations_per_epoch,
             "selection": "nnU-Net's final validation Dice (foreground mean) on the fold's validation cases",
             "baseline": {"trainer": BASELINE, "validation": baseline}, "rows": list(merged.values()),
             "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": environment_info(spec.device)}
    write_json(path, sweep)
    (spec.out / SWEEP_REPORT).write_text(sweep_report(sweep))
    return sweep


def chosen(sweep: dict) -> dict[str, dict]:
    """Per trainer, the finished row with the highest validation Dice."""
    best: dict[str, dict] = {}
    for r in sweep["rows"]:
        if r["validation"] is not None and (r["trainer"] not in best or
                                            r["validation"]["mean"] > best[r["trainer"]]["validation"]["mean"]):
            best[r["trainer"]] = r
    return best


def sweep_report(sweep: dict) -> str:
    base = sweep["baseline"]["validation"]
    classes = sorted(base["per_class"], key=int)
    lines = [f"# Validation-only sweep: {sweep['dataset']}, fold {sweep['fold']}, {sweep['budget']} labeled cases, "
             f"seed {sweep['seed']}", "",
             f"Selected by {sweep['selection']}; the test cases are never predicted. Schedule: {sweep['epochs']} "
             f"epochs x {sweep['iterations_per_epoch']} iterations. Workspace: the benchmark `{sweep['benchmark']}`.",
             "", "| trainer | settings | validation Dice | Δ vs baseline | "
             + " | ".join(f"class {c}" for c in classes) + " |",
             "|---|---|---|---|" + "---|" * len(classes),
             f"| {BASELINE} | — | {base['mean']:.4f} | | "
             + " | ".join(f"{base['per_class'][c]:.4f}" for c in classes) + " |"]
    best = chosen(sweep)
    order = sorted(sweep["rows"], key=lambda r: (r["trainer"], -(r["validation"] or {"mean": -math.inf})["mean"]))
    for r in order:
        text = ", ".join(f"{k}={v}" for k, v in r["settings"].items()) or "defaults"
        mark = ""
        if best.get(r["trainer"]) is r:
            # the best point is chosen only if it beats the baseline; otherwise the sweep says so
            mark = " **(chosen)**" if r["delta"] > 0 else " **(best, not above the baseline)**"
        if r["validation"] is None:
            lines.append(f"| {r['trainer']} | {text} | not finished | | " + " | " * len(classes))
            continue
        v = r["validation"]
        lines.append(f"| {r['trainer']} | {text}{mark} | {v['mean']:.4f} | {r['delta']:+.4f} | "
                     + " | ".join(f"{v['per_class'].get(c, float('nan')):.4f}" for c in classes) + " |")
    return "\n".join(lines) + "\n"
