"""The files of the evaluation: label images read with nnU-Net's reader/writer classes, the dataset.json's classes,
and ``per_case.csv``/``summary.json`` written atomically (NaN as ``nan`` in the CSV, ``null`` in the JSON)."""

from __future__ import annotations

import csv
import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from nnunet_ssl.errors import SSLInputError

PER_CASE_FILE = "per_case.csv"
SUMMARY_FILE = "summary.json"


def _supported_endings() -> list[str]:
    from nnunetv2.imageio.reader_writer_registry import LIST_OF_IO_CLASSES

    endings = {e.lower() for rw in LIST_OF_IO_CLASSES for e in rw.supported_file_endings}
    return sorted(endings, key=len, reverse=True)


def infer_file_ending(folder: Path) -> str:
    """The one image file ending (of those nnU-Net can read) that the files of ``folder`` have."""
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


def cases_in(folder: Path, file_ending: str) -> dict[str, str]:
    """Case id -> file name of the files of ``folder`` that end in ``file_ending`` (case-insensitive)."""
    fe = file_ending.lower()
    return {f[: -len(fe)]: f for f in sorted(os.listdir(folder))
            if f.lower().endswith(fe) and len(f) > len(fe) and os.path.isfile(folder / f)}


def classes_from_dataset_json(dj: dict, path: Path) -> tuple[dict[int, str], int | None]:
    """({foreground label: name}, ignore label or None) of a dataset.json; region-based datasets are refused."""
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


def reader_class(dataset_json: dict | None, file_ending: str, example_file: str) -> type:
    """nnU-Net's reader/writer class for the dataset (from its dataset.json, else from the file ending)."""
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


def read_label(reader: Any, path: str) -> tuple[np.ndarray, list[float]]:
    """(label map without its channel axis, spacing) of one file, read with an nnU-Net reader/writer instance."""
    try:
        seg, props = reader.read_seg(path)
    except Exception as e:  # any reader failure means a bad input file
        raise SSLInputError(f"cannot read {path} ({type(e).__name__}: {e}): replace the damaged file") from None
    seg = np.asarray(seg)
    if seg.ndim >= 1 and seg.shape[0] == 1:
        seg = seg[0]
    return seg, [float(s) for s in props["spacing"]]


def atomic_write_text(path: Path, text: str) -> None:
    """Writes ``text`` through a temporary file, so a reader never sees half a file."""
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


def _format_value(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else repr(v)
    return str(v)


def write_per_case_csv(path: Path | str, rows: Sequence[dict], columns: Sequence[str]) -> None:
    """per_case.csv with ``columns`` in order; floats exactly (``repr``), NaN as ``nan``."""
    import io

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for r in rows:
        w.writerow([_format_value(r[c]) for c in columns])
    atomic_write_text(Path(path), buf.getvalue())


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


def json_safe(obj: Any) -> Any:
    """``obj`` with non-finite floats as None, for strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj
