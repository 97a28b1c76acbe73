"""Segmentation metrics in millimetres: Dice, IoU, HD95, ASD and NSD per case and class.

``evaluate_folders`` compares a folder of reference label images with a folder of predicted label images (matched
by file name, read with nnU-Net's reader/writer classes so the spacing comes from the image header) and writes
``per_case.csv`` and ``summary.json``. ``compute_case_metrics`` is the pure core on arrays.

Definitions (R: reference mask of one class, P: predicted mask, ∂X: boundary voxels of X, d(x, Y): Euclidean
distance in mm from voxel centre x to the nearest voxel centre of Y, voxel coordinates scaled by the spacing)

- Dice = 2|P∩R| / (|P| + |R|), IoU = |P∩R| / |P∪R| (voxel counts, plain numpy).
- Boundary voxels: MONAI ``get_mask_edges`` without sub-voxel areas: the foreground voxels removed by one binary
  erosion with the face-connected cross (6-neighbourhood in 3D, 4 in 2D); the image border counts as background.
- HD95 = max(P95{d(p, ∂R) : p ∈ ∂P}, P95{d(r, ∂P) : r ∈ ∂R}), ``monai.metrics.compute_hausdorff_distance`` with
  ``percentile=95, directed=False``: the larger of the two directed 95th percentiles (not the percentile of the
  pooled distances); percentiles by ``torch.quantile`` (linear interpolation between order statistics).
- ASD = (Σ_{p∈∂P} d(p, ∂R) + Σ_{r∈∂R} d(r, ∂P)) / (|∂P| + |∂R|),
  ``monai.metrics.compute_average_surface_distance`` with ``symmetric=True``: MONAI concatenates both directed
  distance sets and takes one mean, i.e. the mean over the boundary voxels of both masks, not the average of the
  two directed means (the two differ when |∂P| ≠ |∂R|).
- NSD at tolerance τ (Nikolov et al., "Clinically applicable segmentation of head and neck anatomy for
  radiotherapy", JMIR 2021, arXiv:1809.04430) = (|{p ∈ ∂P : d(p, ∂R) ≤ τ}| + |{r ∈ ∂R : d(r, ∂P) ≤ τ}|) /
  (|∂P| + |∂R|), ``monai.metrics.compute_surface_dice`` with ``use_subvoxels=False``.

Deviations from DeepMind's ``surface-distance`` package (the reference code of the NSD paper): boundary elements
are voxels counted with equal weight, not surface elements weighted by their area, for all three surface metrics
(one consistent boundary definition; MONAI's Hausdorff and ASD have no area-weighted mode), and HD95 interpolates
percentiles instead of taking the area-weighted order statistic. Values can therefore differ from DeepMind's by a
fraction of a voxel, most on anisotropic images.

Units: distances use the image spacing, in mm. ``voxel_units=True`` uses spacing 1 on every axis (voxel units,
as in papers that ignore spacing); the tolerance τ is then in voxels. Column names carry the unit: ``hd95_mm``,
``asd_mm``, ``nsd_1.0mm`` or ``hd95_vox``, ``asd_vox``, ``nsd_1.0vox``.

Empty-mask convention (per case and class; ``EMPTY_CONVENTION`` holds the text written to summary.json):

- reference and prediction both empty: Dice = IoU = NSD = 1, HD95 = ASD = 0 (a correct "absent");
- exactly one of them empty: Dice = IoU = NSD = 0, HD95 = ASD = NaN (no surface to measure a distance to).
  Summary statistics are over the non-NaN values and report ``n_nan``, the number of such cases, for every metric;
  read a HD95 mean together with its ``n_nan``, as it ignores missed and hallucinated structures.

This differs from nnU-Net's ``nnUNetv2_evaluate_folder``, which sets Dice to NaN when both masks are empty.

Summary statistics: per class over cases; ``foreground_mean`` first averages each case over its classes (non-NaN
values only; NaN if all are NaN) and then gives the statistics over cases. ``std`` is the sample standard
deviation (ddof = 1; null for fewer than two values). NaN is written as ``nan`` in per_case.csv and as ``null`` in
summary.json (strict JSON).

Singleton spatial axes (2D images stored as one slice, nnU-Net's 2D readers) are dropped before computing, so a 2D
image is evaluated in 2D.
"""

from __future__ import annotations

import csv
import json
import math
import os
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nnunet_ssl.errors import SSLInputError

PER_CASE_FILE = "per_case.csv"
SUMMARY_FILE = "summary.json"
#: keys of ``compute_case_metrics``' per-class dicts, in column order (unit-free; columns add the unit)
METRIC_KEYS = ("dice", "iou", "hd95", "asd", "nsd")
STAT_KEYS = ("mean", "std", "median", "n", "n_nan")
EMPTY_CONVENTION = (
    "both reference and prediction empty: Dice = IoU = NSD = 1, HD95 = ASD = 0; exactly one empty: "
    "Dice = IoU = NSD = 0, HD95 = ASD = NaN (excluded from means, counted in n_nan)"
)
_BOTH_EMPTY = {"dice": 1.0, "iou": 1.0, "hd95": 0.0, "asd": 0.0, "nsd": 1.0}
_ONE_EMPTY = {"dice": 0.0, "iou": 0.0, "hd95": math.nan, "asd": math.nan, "nsd": 0.0}
_SPACING_RTOL = 1e-3


@dataclass
class EvaluationResult:
    """``rows``: the rows of per_case.csv (numeric values as float); ``summary``: the content of summary.json."""

    rows: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)


def unit_name(voxel_units: bool) -> str:
    return "vox" if voxel_units else "mm"


def metric_columns(nsd_tolerance_mm: float = 1.0, voxel_units: bool = False) -> dict[str, str]:
    """Maps each key of ``METRIC_KEYS`` to its column name, e.g. ``{"hd95": "hd95_mm", "nsd": "nsd_1.0mm"}``."""
    u = unit_name(voxel_units)
    return {"dice": "dice", "iou": "iou", "hd95": f"hd95_{u}", "asd": f"asd_{u}",
            "nsd": f"nsd_{float(nsd_tolerance_mm)!r}{u}"}


def _bbox_crop(*masks: np.ndarray) -> tuple[slice, ...]:
    """Bounding box of the union of ``masks`` plus a margin of one voxel (clipped to the image). MONAI crops the
    same way after converting to float; cropping first saves memory on large images and changes no value."""
    union = np.logical_or.reduce(masks)
    slices = []
    for axis in range(union.ndim):
        other = tuple(a for a in range(union.ndim) if a != axis)
        idx = np.flatnonzero(union.any(axis=other))
        slices.append(slice(max(int(idx[0]) - 1, 0), min(int(idx[-1]) + 2, union.shape[axis])))
    return tuple(slices)


def _surface_metrics(ref: np.ndarray, pred: np.ndarray, spacing: Sequence[float], tolerance: float
                     ) -> tuple[float, float, float]:
    """HD95, ASD, NSD of two non-empty boolean masks with MONAI (see the module docstring for the definitions)."""
    import torch
    from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance, compute_surface_dice

    crop = _bbox_crop(ref, pred)
    # MONAI wants one-hot, batch-first tensors: [B=1, C=1, *spatial]
    y = torch.from_numpy(np.ascontiguousarray(ref[crop]))[None, None]
    y_pred = torch.from_numpy(np.ascontiguousarray(pred[crop]))[None, None]
    sp = [float(s) for s in spacing]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hd95 = compute_hausdorff_distance(y_pred, y, include_background=True, percentile=95, directed=False,
                                          spacing=sp)
        asd = compute_average_surface_distance(y_pred, y, include_background=True, symmetric=True, spacing=sp)
        nsd = compute_surface_dice(y_pred, y, class_thresholds=[float(tolerance)], include_background=True,
                                   spacing=sp, use_subvoxels=False)
    return float(hd95.item()), float(asd.item()), float(nsd.item())


def _squeeze_singleton_axes(reference: np.ndarray, prediction: np.ndarray, spacing: Sequence[float]
                            ) -> tuple[np.ndarray, np.ndarray, list[float]]:
    keep = [a for a, n in enumerate(reference.shape) if n != 1]
    if len(keep) == reference.ndim or len(keep) < 2:
        return reference, prediction, [float(s) for s in spacing]
    shape = tuple(reference.shape[a] for a in keep)
    return reference.reshape(shape), prediction.reshape(shape), [float(spacing[a]) for a in keep]


def compute_case_metrics(
    reference: np.ndarray,
    prediction: np.ndarray,
    spacing: Sequence[float],
    labels: Sequence[int],
    nsd_tolerance_mm: float = 1.0,
) -> dict[int, dict[str, float]]:
    """Dice, IoU, HD95, ASD and NSD of each label in ``labels`` for one case.

    ``reference`` and ``prediction`` are integer label maps of the same shape (2D or 3D, spatial axes only);
    ``spacing`` has one entry per axis, in mm (pass ones for voxel units); ``nsd_tolerance_mm`` is τ in the unit of
    ``spacing``. Returns ``{label: {"dice", "iou", "hd95", "asd", "nsd"}}`` with distances in the unit of
    ``spacing``. Definitions and the empty-mask convention are in the module docstring.
    """
    reference = np.asarray(reference)
    prediction = np.asarray(prediction)
    if reference.shape != prediction.shape:
        raise ValueError(f"reference shape {reference.shape} differs from prediction shape {prediction.shape}")
    if len(spacing) != reference.ndim:
        raise ValueError(f"spacing {tuple(spacing)} has {len(spacing)} entries for a {reference.ndim}D image")
    if not (np.isfinite(nsd_tolerance_mm) and nsd_tolerance_mm >= 0):
        raise ValueError(f"nsd_tolerance_mm must be finite and >= 0, got {nsd_tolerance_mm}")
    reference, prediction, spacing = _squeeze_singleton_axes(reference, prediction, spacing)
    out: dict[int, dict[str, float]] = {}
    for label in labels:
        r = reference == label
        p = prediction == label
        n_r, n_p = int(r.sum()), int(p.sum())
        if n_r == 0 and n_p == 0:
            out[int(label)] = dict(_BOTH_EMPTY)
            continue
        if n_r == 0 or n_p == 0:
            out[int(label)] = dict(_ONE_EMPTY)
            continue
        tp = int(np.logical_and(r, p).sum())
        hd95, asd, nsd = _surface_metrics(r, p, spacing, nsd_tolerance_mm)
        out[int(label)] = {"dice": 2.0 * tp / (n_r + n_p), "iou": tp / (n_r + n_p - tp),
                           "hd95": hd95, "asd": asd, "nsd": nsd}
    return out


# ----------------------------------------------------------------------------------------------------------------
# folders


def _label_set(seg: np.ndarray) -> set[int]:
    if seg.size == 0:
        return set()
    if np.issubdtype(seg.dtype, np.integer) and seg.min() >= 0 and seg.max() < 65536:
        return {int(i) for i in np.flatnonzero(np.bincount(seg.ravel()))}
    values = np.unique(seg)
    if not np.all(values == np.round(values)):
        raise ValueError("not an integer label map")
    return {int(v) for v in values}


def _supported_endings() -> list[str]:
    from nnunetv2.imageio.reader_writer_registry import LIST_OF_IO_CLASSES

    endings = {e.lower() for rw in LIST_OF_IO_CLASSES for e in rw.supported_file_endings}
    return sorted(endings, key=len, reverse=True)


def _infer_file_ending(folder: Path) -> str:
    endings = _supported_endings()
    found: dict[str, int] = {}
    for f in os.listdir(folder):
        if not os.path.isfile(folder / f):
            continue
        for e in endings:
            if f.lower().endswith(e) and len(f) > len(e):
                found[e] = found.get(e, 0) + 1
                break
    if not found:
        raise SSLInputError(f"no label images in {folder} (looked for {', '.join(sorted(endings))}): "
                            "pass the folder holding the reference segmentations")
    if len(found) > 1:
        raise SSLInputError(f"{folder} mixes label files with endings {', '.join(sorted(found))}: pass "
                            "--dataset-json with the dataset's file_ending or keep one kind of file")
    return next(iter(found))


def _cases_in(folder: Path, file_ending: str) -> dict[str, str]:
    fe = file_ending.lower()
    return {f[: -len(fe)]: f for f in sorted(os.listdir(folder))
            if f.lower().endswith(fe) and len(f) > len(fe) and os.path.isfile(folder / f)}


def _classes_from_dataset_json(dj: dict, path: Path) -> tuple[dict[int, str], int | None]:
    labels = dj.get("labels")
    if not isinstance(labels, dict) or not labels:
        raise SSLInputError(f"{path} has no 'labels' dict: pass the dataset.json of the nnU-Net dataset")
    classes: dict[int, str] = {}
    ignore = None
    for name, value in labels.items():
        if isinstance(value, (list, tuple)):
            raise SSLInputError(f"{path} is region-based (label '{name}': {value}), which this evaluation does not "
                                "support: use nnUNetv2_evaluate_folder for region-based datasets")
        if name == "ignore":
            ignore = int(value)
            continue
        if int(value) == 0:
            continue
        classes[int(value)] = str(name)
    if not classes:
        raise SSLInputError(f"{path} defines no foreground label: pass the dataset.json of the nnU-Net dataset")
    return dict(sorted(classes.items())), ignore


def _reader_class(dataset_json: dict | None, file_ending: str, example_file: str):
    from nnunetv2.imageio.reader_writer_registry import (
        determine_reader_writer_from_dataset_json,
        determine_reader_writer_from_file_ending,
    )

    try:
        if dataset_json is not None:
            return determine_reader_writer_from_dataset_json(dataset_json, example_file, verbose=False)
        return determine_reader_writer_from_file_ending(file_ending, example_file, verbose=False)
    except RuntimeError as e:
        raise SSLInputError(f"nnU-Net cannot read {example_file} ({e}): convert the labels to an nnU-Net readable "
                            "format such as .nii.gz") from None


def _read_label(reader, path: str) -> tuple[np.ndarray, list[float]]:
    try:
        seg, props = reader.read_seg(path)
    except Exception as e:  # any reader failure means a bad input file
        raise SSLInputError(f"cannot read {path} ({type(e).__name__}: {e}): replace the damaged file") from None
    seg = np.asarray(seg)
    if seg.ndim >= 1 and seg.shape[0] == 1:
        seg = seg[0]
    return seg, [float(s) for s in props["spacing"]]


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
    ref, sp_ref = _read_label(reader, ref_path)
    pred, sp_pred = _read_label(reader, pred_path)
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


def _stats(values: Sequence[float]) -> dict:
    arr = np.asarray(values, dtype=float)
    ok = arr[~np.isnan(arr)]
    n = int(ok.size)
    return {
        "mean": float(ok.mean()) if n else None,
        "std": float(ok.std(ddof=1)) if n > 1 else None,
        "median": float(np.median(ok)) if n else None,
        "n": n,
        "n_nan": int(arr.size - n),
    }


def summarise(rows: Sequence[dict], columns: dict[str, str]) -> dict:
    """Per-class and foreground-mean statistics of per-case rows (see the module docstring)."""
    per_class: dict[str, dict] = {}
    class_ids = sorted({int(r["class_id"]) for r in rows})
    for c in class_ids:
        rc = [r for r in rows if int(r["class_id"]) == c]
        per_class[str(c)] = {"name": rc[0]["class_name"], **{col: _stats([r[col] for r in rc])
                                                              for col in columns.values()}}
    cases = list(dict.fromkeys(r["case"] for r in rows))
    by_case: dict[str, list[dict]] = {c: [] for c in cases}
    for r in rows:
        by_case[r["case"]].append(r)
    fg: dict[str, dict] = {}
    for col in columns.values():
        per_case_means = []
        for c in cases:
            vals = np.asarray([r[col] for r in by_case[c]], dtype=float)
            vals = vals[~np.isnan(vals)]
            per_case_means.append(float(vals.mean()) if vals.size else math.nan)
        fg[col] = _stats(per_case_means)
    return {"per_class": per_class, "foreground_mean": fg}


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _format_value(v) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else repr(v)
    return str(v)


def write_per_case_csv(path: Path | str, rows: Sequence[dict], columns: Sequence[str]) -> None:
    import io

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for r in rows:
        w.writerow([_format_value(r[c]) for c in columns])
    _atomic_write_text(Path(path), buf.getvalue())


def read_per_case_csv(path: Path | str) -> list[dict]:
    """Rows of a per_case.csv: ``case`` and ``class_name`` as str, ``class_id`` as int, metrics as float (NaN
    for ``nan``)."""
    with open(path, newline="") as f:
        rows = []
        for r in csv.DictReader(f):
            row: dict = {}
            for k, v in r.items():
                if k in ("case", "class_name"):
                    row[k] = v
                elif k == "class_id":
                    row[k] = int(v)
                else:
                    row[k] = float(v)
            rows.append(row)
    return rows


def _json_safe(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


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
        classes, ignore_label = _classes_from_dataset_json(dj, dj_path)
        file_ending = str(dj["file_ending"])
    else:
        file_ending = _infer_file_ending(ref_dir)

    refs = _cases_in(ref_dir, file_ending)
    preds = _cases_in(pred_dir, file_ending)
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

    reader_cls = _reader_class(dj, file_ending, str(ref_dir / refs[cases[0]]))
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
            m = res["metrics"].get(lab, _BOTH_EMPTY)
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
    summary = _json_safe(summary)

    if output_folder is not None:
        out = Path(output_folder)
        write_per_case_csv(out / PER_CASE_FILE, rows, ["case", "class_id", "class_name", *columns.values()])
        _atomic_write_text(out / SUMMARY_FILE, json.dumps(summary, indent=2, allow_nan=False) + "\n")
    return EvaluationResult(rows=rows, summary=summary)
