"""The benchmark report: tables and paired per-case tests against the supervised baseline (plots:
:mod:`.report_plots`).

Per run, a test case's score is the mean over foreground classes (Dice, NSD) or the NaN-aware mean (HD95, whose
one-sided empty cases are NaN under the evaluation's convention). For the paired comparison of trainer T with the
baseline at one budget, each test case's difference is averaged over the seeds both have finished, so each case
counts once: n = number of test cases. The test is the two-sided Wilcoxon signed-rank test on those differences;
the 95 % interval of the mean difference is a percentile bootstrap over cases (10,000 resamples, seed 0). Each
seed's own differences get the same test as well (``wilcoxon_p_per_seed``). With several foreground classes the
report adds each class's Dice and the same pairing per class (a small structure's gain hides in the mean), each
against the training-noise control's floor on that class.

A composite trainer (a host with a loss or weighting added, e.g. FixMatch + MetaSSL) is also paired the same way
against its host, the nearest class it inherits from that is in the matrix, so the report shows what the loss adds
to its host and not only to the baseline.
"""

from __future__ import annotations

import csv
import json
import math
import os
import tempfile
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from nnunet_ssl.evaluation.benchmark_layout import (
    BASELINE,
    FULL,
    OFFLINE,
    PROVENANCE,
    RESEEDED,
    BenchmarkSettings,
    Paths,
    Run,
    load_settings,
    run_matrix,
)
from nnunet_ssl.evaluation.report_plots import plots


def _float(x: str) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


CLASS_DICE = "dice:"  # prefix of the per-class Dice keys in case_scores


def case_scores(per_case_csv: Path) -> dict[str, dict[str, float]]:
    """case -> {'dice', 'hd95', 'nsd'} averaged over foreground classes (NaN-aware) from ``per_case.csv``, plus
    ``'dice:<class name>'`` per class."""
    by_case: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    with open(per_case_csv, newline="") as f:
        for row in csv.DictReader(f):
            for key, value in row.items():
                for metric in ("dice", "hd95", "nsd"):
                    if key == metric or key.startswith(metric + "_"):
                        by_case[row["case"]][metric].append(_float(value))
            by_case[row["case"]][CLASS_DICE + (row.get("class_name") or row["class_id"])].append(_float(row["dice"]))
    out = {}
    for case, metrics in by_case.items():
        out[case] = {}
        for m, values in metrics.items():
            finite = [v for v in values if not math.isnan(v)]
            out[case][m] = float(np.mean(finite)) if finite else math.nan
    return out


def _nanmean(values) -> float:
    v = [x for x in values if not math.isnan(x)]
    return float(np.mean(v)) if v else math.nan


def bootstrap_ci(diffs: np.ndarray, resamples: int = 10000, seed: int = 0) -> tuple[float, float]:
    if len(diffs) < 2:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = diffs[rng.integers(0, len(diffs), size=(resamples, len(diffs)))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def wilcoxon_p(diffs: np.ndarray) -> float:
    from scipy.stats import wilcoxon

    if len(diffs) < 2 or np.allclose(diffs, 0):
        return math.nan
    return float(wilcoxon(diffs).pvalue)


def collect(out: Path) -> tuple[BenchmarkSettings, dict[tuple[str, str, int], dict[str, dict[str, float]]]]:
    """Settings and the per-case scores of every finished run, keyed by (trainer, budget, seed)."""
    s = load_settings(out)
    scores = {}
    for run in run_matrix(s):
        paths = Paths(out, run, s)
        if paths.done:
            scores[(run.trainer, run.budget, run.seed)] = case_scores(paths.evaluation / "per_case.csv")
    return s, scores


def class_names(scores) -> list[str]:
    """The foreground classes of the per-case scores, in the order of ``per_case.csv``."""
    names: dict[str, None] = {}
    for cases in scores.values():
        for metrics in cases.values():
            names.update((k[len(CLASS_DICE):], None) for k in metrics if k.startswith(CLASS_DICE))
    return list(names)


def paired(scores, trainer: str, budget: str, reference: str = BASELINE, metric: str = "dice") -> dict | None:
    """Per-case ``metric`` (Dice, or one class's ``dice:<class>``) of ``trainer`` minus ``reference`` at one
    budget, over the seeds both finished."""
    seeds = sorted({k[2] for k in scores if k[0] == trainer and k[1] == budget}
                   & {k[2] for k in scores if k[0] == reference and k[1] == budget})
    if not seeds:
        return None
    cases = sorted(set.intersection(*[set(scores[(trainer, budget, sd)]) & set(scores[(reference, budget, sd)])
                                      for sd in seeds]))
    # a class absent from a case's label and both predictions has no Dice there
    cases = [c for c in cases if all(not math.isnan(scores[(t, budget, sd)][c].get(metric, math.nan))
                                     for t in (trainer, reference) for sd in seeds)]
    per_seed = np.array([[scores[(trainer, budget, sd)][c][metric] - scores[(reference, budget, sd)][c][metric]
                          for c in cases] for sd in seeds]).reshape(len(seeds), len(cases))
    diffs = per_seed.mean(0)
    low, high = bootstrap_ci(diffs)
    # the seeds' own mean differences show whether the sign holds across draws of the labeled cases
    seed_means = [float(np.nanmean(row)) if len(row) else math.nan for row in per_seed]
    return {"trainer": trainer, "reference": reference, "budget": budget, "metric": metric, "seeds": seeds,
            "n_cases": len(cases),
            "mean_diff": float(diffs.mean()) if len(diffs) else math.nan, "mean_diff_per_seed": seed_means,
            "wilcoxon_p_per_seed": [wilcoxon_p(row) for row in per_seed],
            "ci_low": low, "ci_high": high,
            "wilcoxon_p": wilcoxon_p(diffs), "better": int((diffs > 0).sum()), "worse": int((diffs < 0).sum())}


def _composition(cls: type) -> set[type]:
    """The hosts and plug-ins a catalogue trainer is made of (``nnunet_ssl/trainers/{hosts,plugins}/``)."""
    return {c for c in cls.__mro__ if c.__module__.startswith(("nnunet_ssl.trainers.hosts.",
                                                               "nnunet_ssl.trainers.plugins."))}


def host_of(trainer: str, candidates: Sequence[str]) -> str | None:
    """The candidate (other than ``trainer`` and the baseline) made of the largest proper part of ``trainer``'s
    hosts and plug-ins, e.g. the Mean Teacher for Mean Teacher + MetaSSL; None for trainers nnunet-ssl does not
    define or that share no host with a candidate."""
    from nnunet_ssl import trainers

    if trainer not in trainers.__all__:
        return None
    parts = _composition(getattr(trainers, trainer))
    best, size = None, 0
    for name in candidates:
        if name in (trainer, BASELINE) or name not in trainers.__all__:
            continue
        other = _composition(getattr(trainers, name))
        if other and other < parts and len(other) > size:
            best, size = name, len(other)
    return best


def add_noise_floor(pairs: list[dict]) -> None:
    """Adds ``noise_floor`` (the training-noise control's largest |mean difference per seed| at the pair's budget,
    NaN without a control) and ``beyond_noise`` (|mean difference| above it) to every pair. The floor measures two
    trainings that differ only in their seed, so it applies to a composite against its host as well."""
    floors = {(p["budget"], p["metric"]): max(abs(d) for d in p["mean_diff_per_seed"]) for p in pairs
              if p["trainer"] == RESEEDED and p["reference"] == BASELINE}
    for p in pairs:
        floor = floors.get((p["budget"], p["metric"]), math.nan) if p["trainer"] != RESEEDED else math.nan
        p["noise_floor"] = floor
        p["beyond_noise"] = bool(abs(p["mean_diff"]) > floor) if not math.isnan(floor) else None


def _fmt(mean: float, std: float, n: int) -> str:
    if math.isnan(mean):
        return "–"
    return f"{mean:.4f} ± {std:.4f} (n={n})" if n > 1 else f"{mean:.4f} (n=1)"


def write_report(out: Path) -> Path:
    """Rewrites report.md, results.csv, paired.csv and the plots from the finished runs."""
    s, scores = collect(out)
    budgets = [str(b) for b in s.budgets] + ([FULL] if s.full else [])
    trainers = [BASELINE] + [t for t in s.trainers if t != BASELINE]
    classes = class_names(scores)
    metrics = ["dice", "hd95", "nsd"] + [CLASS_DICE + c for c in classes]
    per_run = {k: {m: _nanmean(v.get(m, math.nan) for v in cases.values()) for m in metrics}
               for k, cases in scores.items()}
    rows = [{"trainer": t, "budget": b, "seed": sd, "n_cases": len(scores[(t, b, sd)]),
             **{m.replace(CLASS_DICE, "dice_"): v for m, v in per_run[(t, b, sd)].items()}}
            for (t, b, sd) in sorted(per_run, key=lambda k: (trainers.index(k[0]) if k[0] in trainers else 99,
                                                            budgets.index(k[1]) if k[1] in budgets else 99, k[2]))]
    _write_csv(out / "results.csv", rows, ["trainer", "budget", "seed", "n_cases", "dice", "hd95", "nsd"]
               + [f"dice_{c}" for c in classes])

    def cell(t: str, b: str, metric: str) -> str:
        values = [per_run[k][metric] for k in per_run if k[0] == t and k[1] == b]
        if not values:
            return "–"
        return _fmt(float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0, len(values))

    head = ["budget →"] + [("all labeled" if b == FULL else f"{b} labeled") for b in budgets]
    lines = [
        f"# Semi-supervised benchmark: {s.dataset}, {s.configuration}, fold {s.fold}, plans {s.plans}",
        "",
        f"Training budget {s.epochs} epochs × {s.iterations_per_epoch} iterations; final checkpoint; "
        f"{len(s.test_cases)} held-out test cases; seeds {s.seeds}. Runs finished: {len(scores)} of "
        f"{len(run_matrix(s))}. Metrics from `nnUNetv2_ssl_evaluate` (mm; NSD tolerance {s.nsd_tolerance_mm} mm).",
        "",
        "Cells: mean over seeds of the run's mean test value ± standard deviation over seeds (n = seeds finished).",
        "",
    ]
    for metric, title in (("dice", "Dice (mean of foreground classes)"), ("hd95", "HD95 (mm)"), ("nsd", "NSD")):
        lines += [f"## Test {title}", "", "| trainer | " + " | ".join(head[1:]) + " |",
                  "|---" * len(head) + "|"]
        for t in trainers:
            lines.append(f"| {t} | " + " | ".join(cell(t, b, metric) for b in budgets) + " |")
        lines.append("")
    per_class = len(classes) > 1
    if per_class:
        lines += ["## Test Dice per class", "", "| trainer | " + " | ".join(f"{h} · {c}" for h in head[1:]
                                                                            for c in classes) + " |",
                  "|---" * (1 + len(classes) * len(budgets)) + "|"]
        for t in trainers:
            lines.append(f"| {t} | " + " | ".join(cell(t, b, CLASS_DICE + c) for b in budgets for c in classes)
                         + " |")
        lines.append("")
    pairs = [p for b in budgets if b != FULL for t in trainers if t != BASELINE
             if (p := paired(scores, t, b)) is not None]
    class_pairs = [p for b in budgets if b != FULL for c in (classes if per_class else []) for t in trainers
                   if t != BASELINE if (p := paired(scores, t, b, metric=CLASS_DICE + c)) is not None]
    hosts = {t: h for t in trainers if (h := host_of(t, trainers)) is not None}
    host_pairs = [p for b in budgets if b != FULL for t, h in hosts.items()
                  if (p := paired(scores, t, b, reference=h)) is not None]
    add_noise_floor(pairs + host_pairs + class_pairs)
    lines += ["## Paired per-case difference to the supervised baseline (test Dice)", "",
              "Per test case, trainer minus baseline, averaged over the seeds both finished; two-sided Wilcoxon "
              "signed-rank test over cases; 95 % bootstrap interval of the mean difference. With several seeds, "
              "\"Δ per seed\" also gives each seed's own Wilcoxon p.", ""]
    lines += _pair_table(pairs, "trainer", "(no budget has both the baseline and an SSL trainer finished yet)")
    if any(p["trainer"] == RESEEDED for p in pairs):
        lines += ["", f"`{RESEEDED}` is the baseline trained again on the same labeled cases with another training "
                  "seed: its row is the difference that training randomness alone produces, and its p-value shows "
                  "how often the per-case test calls such noise significant. \"Training noise\" is the largest "
                  "|Δ per seed| of that control at the budget; a trainer whose |mean Δ| is within it has not been "
                  "shown to differ from the baseline, whatever its p-value."]
    if any(p["trainer"] == OFFLINE for p in pairs):
        r = s.offline_rounds
        lines += ["", f"`{OFFLINE}` is offline pseudo-labelling (`nnUNetv2_ssl_pseudolabel`): the baseline of the "
                  f"same budget and seed is the teacher; the ensemble of its final checkpoint and its snapshots at "
                  f"1/3 and 2/3 of training labels every unlabeled case; the baseline trainer is trained again on "
                  f"labeled + pseudo-labeled cases with the same schedule ({r} round{'s' if r > 1 else ''}). Its "
                  f"training compute is {1 + r}× the baseline's, plus one prediction of the pool per round."]
    if class_pairs:
        lines += ["", "## Paired per-case difference to the supervised baseline, per class (test Dice)", "",
                  "The same pairing on one class's Dice; cases where the class is in neither the label nor the "
                  "predictions are left out. The training-noise floor is the control's on the same class.", ""]
        lines += _pair_table(class_pairs, "trainer", "(no class has both the baseline and a trainer finished yet)",
                             show_class=True)
    if hosts:
        lines += ["", "## Paired per-case difference of each composite to its host (test Dice)", "",
                  "A composite adds a loss or weighting to a host trainer; here it is paired with that host (the "
                  "nearest class it inherits from in the matrix) the same way, so Δ is what the addition itself "
                  "changes. The training-noise floor is the same control's.", ""]
        lines += _pair_table(host_pairs, "composite − host", "(no composite and its host finished yet)")
    _write_csv(out / "paired.csv", [{**p, "seeds": " ".join(map(str, p["seeds"])),
                                     "mean_diff_per_seed": " ".join(f"{d:.6f}" for d in p["mean_diff_per_seed"]),
                                     "wilcoxon_p_per_seed": " ".join(f"{q:.6g}" for q in p["wilcoxon_p_per_seed"])}
                                    for p in pairs + host_pairs + class_pairs],
               ["trainer", "reference", "budget", "metric", "seeds", "n_cases", "mean_diff", "mean_diff_per_seed",
                "ci_low", "ci_high", "better", "worse", "wilcoxon_p", "wilcoxon_p_per_seed", "noise_floor",
                "beyond_noise"])
    lines += ["", "## Where the runs were made", "",
              "Training stages (a resumed training has several) by machine and software; numbers of the same run "
              "differ slightly between machines.", "", "| device | torch | nnunetv2 | runs |", "|---|---|---|---|"]
    lines += [f"| {device} | {torch} | {nnunet} | {n} |" for (device, torch, nnunet), n in _provenance(out, s, scores)]
    made = plots(out, s, per_run, budgets, trainers)
    lines += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in made]
    lines += ["", "Files: `results.csv` (one row per finished run), `paired.csv`, and per run "
              "`runs/<budget>/seed_<s>/test_evaluation/<trainer>/per_case.csv`.", ""]
    report = out / "report.md"
    _atomic_text(report, "\n".join(lines))
    return report


def _pair_table(pairs: list[dict], first: str, empty: str, show_class: bool = False) -> list[str]:
    lines = [f"| {first} | budget | " + ("class | " if show_class else "") + "seeds | cases | mean Δ Dice | "
             "Δ per seed | 95 % CI | better / worse | Wilcoxon p | training noise |",
             "|---" * (10 + show_class) + "|"]
    for p in pairs:
        # a seed's own p only when the pooled one is over several seeds
        per_seed = ", ".join(f"s{sd} {d:+.4f}" + (f" (p {q:.2g})" if len(p["seeds"]) > 1 else "")
                             for sd, d, q in zip(p["seeds"], p["mean_diff_per_seed"], p["wilcoxon_p_per_seed"]))
        noise = "–" if math.isnan(p["noise_floor"]) else \
            f"{p['noise_floor']:.4f}: {'beyond' if p['beyond_noise'] else 'within'}"
        name = p["trainer"] if p["reference"] == BASELINE else f"{p['trainer']} − {p['reference']}"
        klass = f"{p['metric'][len(CLASS_DICE):]} | " if show_class else ""
        lines.append(f"| {name} | {p['budget']} | {klass}{len(p['seeds'])} | {p['n_cases']} | "
                     f"{p['mean_diff']:+.4f} | {per_seed} | [{p['ci_low']:+.4f}, {p['ci_high']:+.4f}] | "
                     f"{p['better']} / {p['worse']} | {p['wilcoxon_p']:.3g} | {noise} |")
    if not pairs:
        lines.append(f"| {empty} |" + " |" * (9 + show_class))
    return lines


def _provenance(out: Path, s: BenchmarkSettings, scores) -> list[tuple[tuple[str, str, str], int]]:
    """((device, torch, nnunetv2), number of finished runs trained there), most runs first."""
    counts: dict[tuple[str, str, str], int] = defaultdict(int)
    for trainer, budget, seed in scores:
        path = Paths(out, Run(trainer, budget, seed), s).evaluation / PROVENANCE
        stages = json.loads(path.read_text()).get("training", []) if path.is_file() else []
        kinds = {(f"{e.get('device')}: {e.get('gpu') or e.get('cpu')}", str(e.get("torch")), str(e.get("nnunetv2")))
                 for e in stages} or {("not recorded", "?", "?")}
        for kind in kinds:
            counts[kind] += 1
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))


def _atomic_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    with os.fdopen(fd, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)
