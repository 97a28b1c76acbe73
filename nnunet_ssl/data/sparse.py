"""Simulated sparse annotation: a copy of a fully labeled dataset where each training case keeps k annotated slices
and every other voxel carries nnU-Net's ignore label (``nnUNetv2_ssl_make_splits --sparse-slices K -t ID``).

Users often annotate a few slices per volume (nnU-Net issues #1926, #2124, #2138); nnU-Net trains on such labels
with an ``ignore`` label in ``dataset.json``. This makes the situation measurable on a fully labeled dataset: the
kept slices are spread evenly over the slices that hold foreground (as an annotator would pick them), along the
axis of the largest spacing (the through-plane axis; the first axis when spacings are equal) unless one is given.
The derived raw dataset has the source's images (linked), sparse ``labelsTr``, the source's test folders (linked,
full labels: the test stays complete), its splits and ``sparse_labels.json`` (per case the kept slice indices).
The source is only read.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np

from nnunet_ssl.data import datasets
from nnunet_ssl.errors import SSLInputError

PROVENANCE = "sparse_labels.json"


def kept_slices(label: np.ndarray, k: int, axis: int) -> list[int]:
    """Indices of ``k`` slices along ``axis``, evenly spread over the slices that contain foreground (over all
    slices when none does); all of them when there are at most ``k``."""
    others = tuple(i for i in range(label.ndim) if i != axis)
    with_foreground = np.flatnonzero((label > 0).any(axis=others))
    candidates = with_foreground if with_foreground.size else np.arange(label.shape[axis])
    if candidates.size <= k:
        return [int(i) for i in candidates]
    # the centres of k equal parts of the candidate range
    positions = (np.arange(k) + 0.5) * candidates.size / k
    return sorted({int(candidates[int(p)]) for p in positions})


def sparsify(label: np.ndarray, slices: list[int], axis: int, ignore: int) -> np.ndarray:
    """``label`` with every slice along ``axis`` except ``slices`` set to ``ignore``."""
    out = np.full_like(label, ignore)
    index = [slice(None)] * label.ndim
    index[axis] = slices
    out[tuple(index)] = label[tuple(index)]
    return out


def make_sparse_dataset(dataset: str | int, target_id: int, slices: int, axis: int | None = None,
                        name: str | None = None, overwrite: bool = False) -> Path:
    """Writes the sparse copy of ``dataset`` as ``nnUNet_raw/Dataset<target_id>_<name>``; returns its folder."""
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json

    from nnunet_ssl.data.preprocess_unlabeled import num_channels
    from nnunet_ssl.data.splits import original_splits
    from nnunet_ssl.pseudolabel import derived

    if slices < 1:
        raise SSLInputError(f"--sparse-slices must be at least 1, got {slices}")
    source = datasets.resolve_dataset_name(dataset)
    raw = Path(datasets.raw_dataset_folder(source))
    dataset_json = json.loads((raw / "dataset.json").read_text())
    if "regions_class_order" in dataset_json:
        raise SSLInputError("region-based datasets are not supported by --sparse-slices")
    target = f"Dataset{target_id:03d}_{name or source[11:] + f'Sparse{slices}'}"
    derived.check_target(raw.parent, None, source, target, overwrite, provenance=PROVENANCE)
    ending = dataset_json["file_ending"]
    ids = datasets.labeled_case_ids(str(raw), dataset_json)
    n_channels = num_channels(dataset_json)
    ignore = derived.ignore_label_value(dataset_json)
    reader = determine_reader_writer_from_dataset_json(dataset_json, str(raw / "labelsTr" / f"{ids[0]}{ending}"))()
    record: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(dir=raw.parent) as tmp:
        labeled = {}
        for case in ids:
            seg, properties = reader.read_seg(str(raw / "labelsTr" / f"{case}{ending}"))
            seg = seg[0]
            spacing = list(properties["spacing"])
            along = axis if axis is not None else int(np.argmax(spacing)) if len(set(spacing)) > 1 else 0
            if not 0 <= along < seg.ndim:
                raise SSLInputError(f"--sparse-axis {axis} does not exist for {seg.ndim}D images")
            keep = kept_slices(seg, slices, along)
            sparse = sparsify(seg, keep, along, ignore).astype(np.uint8 if ignore < 255 else np.uint16)
            reader.write_seg(sparse, os.path.join(tmp, f"{case}{ending}"), properties)
            labeled[case] = ([str(raw / "imagesTr" / f"{case}_{c:04d}{ending}") for c in range(n_channels)],
                             os.path.join(tmp, f"{case}{ending}"))
            record[case] = {"axis": along, "slices": keep, "of": int(seg.shape[along]),
                            "annotated_fraction": float(np.mean(sparse != ignore))}
        # an unplanned source has no splits yet: nnU-Net's default 5-fold split of the cases, as it would make
        preprocessed = Path(datasets.require_env("nnUNet_preprocessed")) / source
        splits, _ = original_splits(str(preprocessed), str(raw)) if preprocessed.is_dir() else (None, None)
        origin = "the source's folds"
        if splits is None:
            from nnunetv2.utilities.crossval_split import generate_crossval_split

            splits = generate_crossval_split(ids, seed=12345, n_splits=5)
            origin = "nnU-Net's default 5 folds"
        provenance = {"source_dataset": source, "slices_per_case": slices, "ignore_label": ignore, "cases": record}
        folder = derived.write_derived_dataset(raw.parent, target, dataset_json, labeled, {}, ignore, splits,
                                               provenance, link_images=True, provenance_name=PROVENANCE,
                                               link_folders=("imagesTs", "labelsTs", "imagesUnlabeled"),
                                               source_folder=raw)
    derived.install_splits(Path(datasets.require_env("nnUNet_preprocessed")), target, splits)
    kept = np.mean([r["annotated_fraction"] for r in record.values()])
    print(f"wrote {folder}: {len(ids)} cases with {slices} annotated slice(s) each (mean annotated share of voxels "
          f"{kept:.3f}), {origin} as its splits_final.json. Next: nnUNetv2_plan_and_preprocess -d "
          f"{target_id}", flush=True)
    return folder
