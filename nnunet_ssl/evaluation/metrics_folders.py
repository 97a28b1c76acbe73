"""``evaluate_folders``: the metrics of every case of a reference folder against the prediction of the same file
name, in worker processes if asked; the per-case rows, their summary and the settings that made them.

Definitions, units and the empty-mask convention: :mod:`nnunet_ssl.evaluation.metrics`; the files:
:mod:`nnunet_ssl.evaluation.metrics_files`. The command line is :mod:`nnunet_ssl.cli.evaluate`
(``nnUNetv2_ssl_evaluate``).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nnunet_ssl.errors import SSLInputError
from nnunet_ssl.evaluation.metrics import (
    BOTH_EMPTY,
    EMPTY_CONVENTION,
    METRIC_KEYS,
    compute_case_metrics,
    metric_columns,
    summarise,
    unit_name,
)
from nnunet_ssl.evaluation.metrics_files import (
    PER_CASE_FILE,
    SUMMARY_FILE,
    atomic_write_text,
    cases_in,
    classes_from_dataset_json,
    infer_file_ending,
    json_safe,
    read_label,
    reader_class,
    write_per_case_csv,
)

_SPACING_RTOL = 1e-3


@dataclass
class EvaluationResult:
    """``rows``: the rows of per_case.csv (numeric values as float); ``summary``: the content of summary.json."""

    rows: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)


def _label_set(seg: np.ndarray) -> set[int]:
    if seg.size == 0:
        return set()
    if np.issubdtype(seg.dtype, np.integer) and seg.min() >= 0 and seg.max() < 65536:
        return {int(i) for i in np.flatnonzero(np.bincount(seg.ravel()))}
    values = np.unique(seg)
    if not np.all(values == np.round(values)):
        raise ValueError("not an integer label map")
    return {int(v) for v in values}


def _evaluate_case(task: tuple) -> dict:
    """Worker: reads one reference/prediction pair and computes the metrics of the labels present in either
    (``labels=None``) or of the given labels. Input errors come back as ``{"error": message}``: an SSLInputError
    (a SystemExit) raised inside a pool worker would kill the worker and hang the pool."""
    try:
        return _evaluate_case_unsafe(task)
    except SSLInputError as e:
        return {"error": e.message}


def _evaluate_case_unsafe(task: tuple) -> dict:
    case, ref_path, pred_path, reader_cls, labels, tolerance, voxel_units, ignore_label = task
    reader = reader_cls()
    ref, sp_ref = read_label(reader, ref_path)
    pred, sp_pred = read_label(reader, pred_path)
    if ref.shape != pred.shape:
        raise SSLInputError(f"case {case}: reference shape {ref.shape} differs from prediction shape {pred.shape}: "
                            "predictions must be in the geometry of the reference (nnUNetv2_predict writes them so)")
    if len(sp_ref) != len(sp_pred) or not np.allclose(sp_ref, sp_pred, rtol=_SPACING_RTOL, atol=0):
        raise SSLInputError(f"case {case}: reference spacing {tuple(sp_ref)} differs from prediction spacing "
                            f"{tuple(sp_pred)}: predictions must be in the geometry of the reference")
    try:
        ref_labels = _label_set(ref)
        pred_labels = _label_set(pred)
    except ValueError:
        raise SSLInputError(f"case {case}: reference or prediction is not an integer label map: pass segmentations, "
                            "not probabilities or images") from None
    if ignore_label is not None and ignore_label in ref_labels:
        raise SSLInputError(f"case {case}: the reference contains the ignore label {ignore_label}; partially "
                            "annotated references are not supported, evaluate on fully annotated references")
    todo = sorted((ref_labels | pred_labels) - {0}) if labels is None else list(labels)
    spacing = [1.0] * ref.ndim if voxel_units else sp_ref
    metrics = compute_case_metrics(ref, pred, spacing, todo, nsd_tolerance_mm=tolerance)
    return {"case": case, "metrics": metrics, "ref_labels": sorted(ref_labels - {0}),
            "pred_labels": sorted(pred_labels - {0})}


def evaluate_folders(
    reference_folder: Path | str,
    prediction_folder: Path | str,
    output_folder: Path | str | None = None,
    *,
    dataset_json: Path | str | None = None,
    nsd_tolerance_mm: float = 1.0,
    voxel_units: bool = False,
    case_ids: list[str] | None = None,
    num_processes: int = 1,
) -> EvaluationResult:
    """Evaluates every reference case (or ``case_ids``) against the prediction of the same file name.

    Classes: the foreground labels of ``dataset_json`` (with their names) if given, else the union of the labels
    found in the references, named ``label_<i>``. Prediction files without a reference are ignored (their count is
    in the summary). When ``output_folder`` is given, writes ``per_case.csv`` and ``summary.json`` there
    atomically. Raises ``SSLInputError`` (one line) for empty folders, missing predictions, unknown ``case_ids``
    and mismatching shapes or spacings.
    """
    from tqdm import tqdm

    ref_dir = Path(reference_folder).resolve()
    pred_dir = Path(prediction_folder).resolve()
    for name, d in (("reference", ref_dir), ("prediction", pred_dir)):
        if not d.is_dir():
            raise SSLInputError(f"{name} folder {d} does not exist: pass an existing folder of label images")
    if not (np.isfinite(nsd_tolerance_mm) and nsd_tolerance_mm >= 0):
        raise SSLInputError(f"--nsd-tolerance must be a finite number >= 0, got {nsd_tolerance_mm}")
    if int(num_processes) < 1:
        raise SSLInputError(f"-np must be at least 1, got {num_processes}")

    dj = None
    classes: dict[int, str] | None = None
    ignore_label = None
    if dataset_json is not None:
        dj_path = Path(dataset_json)
        try:
            dj = json.loads(dj_path.read_text())
        except (OSError, ValueError) as e:
            raise SSLInputError(f"cannot read dataset.json {dj_path} ({e}): pass the dataset's dataset.json") from None
        if "file_ending" not in dj:
            raise SSLInputError(f"{dj_path} has no 'file_ending': pass the dataset.json of the nnU-Net dataset")
        classes, ignore_label = classes_from_dataset_json(dj, dj_path)
        file_ending = str(dj["file_ending"])
    else:
        file_ending = infer_file_ending(ref_dir)

    refs = cases_in(ref_dir, file_ending)
    preds = cases_in(pred_dir, file_ending)
    if not refs:
        raise SSLInputError(f"no {file_ending} files in reference folder {ref_dir}: pass the folder holding the "
                            "reference segmentations")
    if not preds:
        raise SSLInputError(f"no {file_ending} files in prediction folder {pred_dir}: pass the folder holding the "
                            "predicted segmentations")
    if case_ids is not None:
        wanted = list(dict.fromkeys(str(c) for c in case_ids))
        if not wanted:
            raise SSLInputError("the list of case ids is empty: pass at least one case id or none at all")
        unknown = [c for c in wanted if c not in refs]
        if unknown:
            raise SSLInputError(f"{len(unknown)} requested case(s) have no reference {file_ending} file in {ref_dir} "
                                f"(first: {', '.join(unknown[:5])}): check the case ids")
        cases = wanted
    else:
        cases = sorted(refs)
    missing = [c for c in cases if c not in preds]
    if missing:
        raise SSLInputError(f"{len(missing)} of {len(cases)} reference cases have no prediction in {pred_dir} "
                            f"(first: {', '.join(missing[:5])}): predict them (same file names, {file_ending}) or "
                            "restrict the evaluation to the predicted cases")
    extra = sorted(set(preds) - set(refs))

    reader_cls = reader_class(dj, file_ending, str(ref_dir / refs[cases[0]]))
    unit = unit_name(voxel_units)
    labels = list(classes) if classes is not None else None
    tasks = [(c, str(ref_dir / refs[c]), str(pred_dir / preds[c]), reader_cls, labels, float(nsd_tolerance_mm),
              bool(voxel_units), ignore_label) for c in cases]

    bar = dict(total=len(tasks), desc="evaluating", unit="case")
    if int(num_processes) == 1:
        # the context manager ends the bar's line before an input error is printed
        with tqdm(tasks, **bar) as progress:
            results = [_evaluate_case_unsafe(t) for t in progress]
    else:
        import multiprocessing

        # spawn like nnU-Net: no fork of a process that may hold torch threads
        with multiprocessing.get_context("spawn").Pool(min(int(num_processes), len(tasks))) as pool:
            results = []
            with tqdm(pool.imap(_evaluate_case, tasks), **bar) as progress:
                for res in progress:
                    if "error" in res:
                        pool.terminate()
                        raise SSLInputError(res["error"])
                    results.append(res)

    ref_union = sorted({lab for res in results for lab in res["ref_labels"]})
    if classes is None:
        classes = {lab: f"label_{lab}" for lab in ref_union}
    pred_only = sorted({lab for res in results for lab in res["pred_labels"]} - set(classes))
    if pred_only:
        affected = [res["case"] for res in results if set(res["pred_labels"]) & set(pred_only)]
        print(f"nnunet-ssl: warning: predictions of {len(affected)} case(s) (first: {affected[0]}) contain labels "
              f"{pred_only} that {'the dataset.json' if dataset_json is not None else 'no reference'} does not "
              "define; no score counts them (check that the predictions belong to this dataset)",
              file=sys.stderr, flush=True)
    not_in_classes = sorted(set(ref_union) - set(classes))
    if not_in_classes:
        raise SSLInputError(f"references contain labels {not_in_classes} that the dataset.json does not define: pass "
                            "the dataset.json of this dataset")
    if not classes:
        raise SSLInputError(f"the references in {ref_dir} contain no foreground label: nothing to evaluate; pass "
                            "--dataset-json to name the classes that should be scored")

    columns = metric_columns(nsd_tolerance_mm, voxel_units)
    rows: list[dict] = []
    for res in results:
        for lab, name in classes.items():
            # a label absent from both masks of this case was not computed (labels=None): both-empty convention
            m = res["metrics"].get(lab, BOTH_EMPTY)
            rows.append({"case": res["case"], "class_id": int(lab), "class_name": name,
                         **{columns[k]: float(m[k]) for k in METRIC_KEYS}})

    summary = summarise(rows, columns)
    summary["settings"] = {
        "reference_folder": str(ref_dir),
        "prediction_folder": str(pred_dir),
        "dataset_json": str(Path(dataset_json).resolve()) if dataset_json is not None else None,
        "file_ending": file_ending,
        "unit": unit,
        "voxel_units": bool(voxel_units),
        "nsd_tolerance": float(nsd_tolerance_mm),
        "nsd_tolerance_unit": unit,
        "metric_columns": list(columns.values()),
        "empty_convention": EMPTY_CONVENTION,
        "surface_metrics": "MONAI compute_hausdorff_distance (percentile=95, symmetric), "
                           "compute_average_surface_distance (symmetric=True: mean over both boundaries' voxels), "
                           "compute_surface_dice (use_subvoxels=False)",
        "num_cases": len(cases),
        "classes": {str(k): v for k, v in classes.items()},
        "num_predictions_without_reference": len(extra),
        "labels_only_in_predictions": pred_only,
    }
    summary["num_cases"] = len(cases)
    summary = json_safe(summary)

    if output_folder is not None:
        out = Path(output_folder)
        write_per_case_csv(out / PER_CASE_FILE, rows, ["case", "class_id", "class_name", *columns.values()])
        atomic_write_text(out / SUMMARY_FILE, json.dumps(summary, indent=2, allow_nan=False) + "\n")
    return EvaluationResult(rows=rows, summary=summary)
