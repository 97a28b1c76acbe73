"""Segmentation metrics in millimetres: Dice, IoU, HD95, ASD and NSD per case and class, on arrays.

``compute_case_metrics`` is the pure core on arrays and ``summarise`` the statistics of per-case rows.
``metrics_folders.evaluate_folders`` applies them to a folder of reference label images and a folder of predicted
label images (matched by file name, read with nnU-Net's reader/writer classes so the spacing comes from the image
header) and writes ``per_case.csv`` and ``summary.json`` (``metrics_files``).

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

import math
import warnings
from collections.abc import Sequence

import numpy as np

#: keys of ``compute_case_metrics``' per-class dicts, in column order (unit-free; columns add the unit)
METRIC_KEYS = ("dice", "iou", "hd95", "asd", "nsd")
STAT_KEYS = ("mean", "std", "median", "n", "n_nan")
EMPTY_CONVENTION = (
    "both reference and prediction empty: Dice = IoU = NSD = 1, HD95 = ASD = 0; exactly one empty: "
    "Dice = IoU = NSD = 0, HD95 = ASD = NaN (excluded from means, counted in n_nan)"
)
#: metric values when both masks are empty, and when exactly one is
BOTH_EMPTY = {"dice": 1.0, "iou": 1.0, "hd95": 0.0, "asd": 0.0, "nsd": 1.0}
ONE_EMPTY = {"dice": 0.0, "iou": 0.0, "hd95": math.nan, "asd": math.nan, "nsd": 0.0}


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
            out[int(label)] = dict(BOTH_EMPTY)
            continue
        if n_r == 0 or n_p == 0:
            out[int(label)] = dict(ONE_EMPTY)
            continue
        tp = int(np.logical_and(r, p).sum())
        hd95, asd, nsd = _surface_metrics(r, p, spacing, nsd_tolerance_mm)
        out[int(label)] = {"dice": 2.0 * tp / (n_r + n_p), "iou": tp / (n_r + n_p - tp),
                           "hd95": hd95, "asd": asd, "nsd": nsd}
    return out


# ----------------------------------------------------------------------------------------------------------------
# statistics


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
