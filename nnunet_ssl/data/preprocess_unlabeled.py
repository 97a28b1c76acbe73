"""Preprocessing of ``imagesUnlabeled`` with a dataset's existing plans (``nnUNetv2_ssl_preprocess_unlabeled``, whose
command line is :mod:`nnunet_ssl.cli.preprocess_unlabeled`).

Each unlabeled case goes through the configuration's own preprocessor exactly as nnU-Net's inference does
(``run_case`` without a segmentation), so its data is byte-identical to what nnU-Net's preprocessing would make of
the same image. The nonzero-mask placeholder segmentation (0 inside, -1 outside) is saved as the case's seg,
which keeps ``use_mask_for_norm`` augmentation behaving as for labeled cases, and ``class_locations`` holds an
empty list per class so nnU-Net's data loader can read it.

Output: ``nnUNet_preprocessed/<Dataset>/<data_identifier>_unlabeled/`` with the same files as nnU-Net's folder
(``<id>.b2nd``, ``<id>_seg.b2nd``, ``<id>.pkl``). Bookkeeping lives in its subfolder ``.nnunet_ssl/``: a manifest
JSON that makes re-runs incremental, and temporary folders for atomic writes. It is a subfolder, not a file next
to the cases, because nnU-Net's ``infer_dataset_class`` asserts a single file ending among the folder's files.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import multiprocessing
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from nnunet_ssl.data import datasets
from nnunet_ssl.data.layout import RAW_UNLABELED_SUBFOLDER, unlabeled_preprocessed_folder
from nnunet_ssl.errors import SSLInputError

#: bookkeeping subfolder of each ``_unlabeled`` folder
META_SUBFOLDER = ".nnunet_ssl"
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = 1
#: files of one preprocessed case, in the order they are moved into place: the data file last, because
#: nnU-Net finds cases by their ``<id>.b2nd`` and should only see complete ones
CASE_FILE_SUFFIXES = (".pkl", "_seg.b2nd", ".b2nd")
#: dataset.json keys that change what preprocessing reads or writes
_DATASET_JSON_KEYS = ("channel_names", "modality", "labels", "regions_class_order", "file_ending",
                      "overwrite_image_reader_writer")
_MANIFEST_SAVE_INTERVAL_S = 2.0


# ----------------------------------------------------------------------------------------------------------------
# input discovery and validation (nothing here writes)


def num_channels(dataset_json: dict) -> int:
    channels = dataset_json.get("channel_names", dataset_json.get("modality"))
    if not isinstance(channels, dict) or not channels:
        raise SSLInputError("dataset.json has no 'channel_names'; re-plan the dataset with a valid dataset.json")
    return len(channels)


def scan_unlabeled_folder(folder: str, file_ending: str, n_channels: int) -> dict[str, list[str]]:
    """Maps case id -> its image files (absolute, ordered by channel) and checks names and channel sets."""
    if not os.path.isdir(folder):
        raise SSLInputError(
            f"{folder} does not exist; put the unlabeled images there named <case>_0000{file_ending} "
            "(same channels and file ending as imagesTr)"
        )
    pattern = re.compile(r"(?P<case>.+)_(?P<channel>\d{4})" + re.escape(file_ending))
    example = f"<case>_0000{file_ending}"
    channels_by_case: dict[str, dict[int, str]] = {}
    # hidden files (.DS_Store, editor swap files) and subfolders are not images; skip them
    names = sorted(n for n in os.listdir(folder) if not n.startswith(".") and os.path.isfile(os.path.join(folder, n)))
    if not names:
        raise SSLInputError(f"{folder} is empty; put the unlabeled images there named {example}")
    for name in names:
        if not name.endswith(file_ending):
            raise SSLInputError(
                f"{RAW_UNLABELED_SUBFOLDER}/{name} does not end in the dataset's file_ending {file_ending!r}; "
                f"convert or remove it (expected names like {example})"
            )
        match = pattern.fullmatch(name)
        if match is None:
            raise SSLInputError(
                f"{RAW_UNLABELED_SUBFOLDER}/{name} does not match <case>_XXXX{file_ending} (XXXX = 4-digit channel); "
                f"rename it, e.g. to {example}"
            )
        channels_by_case.setdefault(match["case"], {})[int(match["channel"])] = os.path.join(folder, name)

    expected = list(range(n_channels))
    for case_id, channels in sorted(channels_by_case.items()):
        found = sorted(channels)
        if found != expected:
            raise SSLInputError(
                f"unlabeled case {case_id!r} has channel(s) {_channel_list(found)} but dataset.json has "
                f"{n_channels} channel(s) {_channel_list(expected)}; add or remove its files in "
                f"{RAW_UNLABELED_SUBFOLDER}"
            )
    return {case_id: [channels[c] for c in expected] for case_id, channels in sorted(channels_by_case.items())}


def _check_test_copies(raw_folder: str, file_ending: str, dataset_json: dict, cases: dict[str, list[str]]) -> None:
    """Refuses an unlabeled image whose decoded voxels equal a test image's (a renamed or re-saved copy)."""
    from nnunet_ssl.evaluation.leakage import identical_voxels, nnunet_image_reader

    test_folder = os.path.join(raw_folder, "imagesTs")
    tests = sorted(os.path.join(test_folder, f) for f in os.listdir(test_folder) if f.endswith(file_ending)) \
        if os.path.isdir(test_folder) else []
    if not tests:
        return
    pairs = identical_voxels(tests, [f for files in cases.values() for f in files],
                             nnunet_image_reader(dataset_json, tests[0]))
    if pairs:
        t, o = pairs[0]
        raise SSLInputError(f"{RAW_UNLABELED_SUBFOLDER}/{os.path.basename(o)} has the same voxels as test image "
                            f"imagesTs/{os.path.basename(t)} ({len(pairs)} such pair(s)); remove it from "
                            f"{RAW_UNLABELED_SUBFOLDER} (never train on test images) and rerun")


def _channel_list(channels: Iterable[int]) -> str:
    return ", ".join(f"{c:04d}" for c in channels)


def check_collisions(unlabeled_ids: Iterable[str], labeled_ids: Iterable[str], split_ids: Iterable[str],
                     test_ids: Iterable[str]) -> None:
    """Unlabeled case ids must differ from every labeled, split and test id: trainers and evaluation look cases
    up by id, and a shared id would mix an unlabeled image into labeled data or leak a test image."""
    kinds = {"labeled": set(labeled_ids), "in splits_final.json": set(split_ids), "test (imagesTs)": set(test_ids)}
    clashes = []
    for case_id in sorted(set(unlabeled_ids)):
        hit = [kind for kind, ids in kinds.items() if case_id in ids]
        if hit:
            clashes.append(f"{case_id} ({', '.join(hit)})")
    if clashes:
        shown = ", ".join(clashes[:5]) + (f" and {len(clashes) - 5} more" if len(clashes) > 5 else "")
        raise SSLInputError(
            f"unlabeled case id(s) already used by other cases: {shown}; rename these files in "
            f"{RAW_UNLABELED_SUBFOLDER} to unused case ids"
        )


def configuration_fingerprint(plans: dict, configuration: dict, dataset_json: dict) -> str:
    """Hash of everything in the plans and dataset.json that preprocessing depends on; a change re-runs all cases."""
    relevant = {
        "configuration": configuration,
        "transpose_forward": plans.get("transpose_forward"),
        "foreground_intensity_properties_per_channel": plans.get(
            "foreground_intensity_properties_per_channel", plans.get("foreground_intensity_properties_by_modality")
        ),
        "image_reader_writer": plans.get("image_reader_writer"),
        "dataset_json": {k: dataset_json.get(k) for k in _DATASET_JSON_KEYS},
    }
    text = json.dumps(relevant, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _file_stats(files: Sequence[str]) -> list[list]:
    stats = []
    for f in files:
        st = os.stat(f)
        stats.append([os.path.basename(f), st.st_size, st.st_mtime_ns])
    return stats


# ----------------------------------------------------------------------------------------------------------------
# manifest and output folder


def _load_manifest(meta_folder: str, name: str = MANIFEST_FILE) -> dict[str, Any]:
    path = os.path.join(meta_folder, name)
    try:
        with open(path) as f:
            manifest = json.load(f)
        if manifest.get("format") == MANIFEST_FORMAT and isinstance(manifest.get("cases"), dict):
            return manifest
    except (OSError, ValueError, AttributeError):
        pass
    # missing or unreadable: every case counts as new and is processed again, which is always safe
    return {"format": MANIFEST_FORMAT, "cases": {}}


def recorded_cases(out_folder: str) -> set[str] | None:
    """The cases whose preprocessing finished and matches their images, as the manifests (the unsharded one and any
    parts) record them; None for a folder without manifest (made by an older version)."""
    meta_folder = os.path.join(out_folder, META_SUBFOLDER)
    if not os.path.isdir(meta_folder):
        return None
    names = [n for n in os.listdir(meta_folder) if n == MANIFEST_FILE or (n.startswith("manifest.part")
                                                                           and n.endswith(".json"))]
    if not names:
        return None
    return {c for n in names for c in _load_manifest(meta_folder, n)["cases"]}


def _merge_part_manifests(meta_folder: str, manifest: dict) -> list[str]:
    """Adds the cases recorded by sharded runs (``manifest.part<k>of<n>.json``) to ``manifest``; returns their
    files."""
    found = []
    for name in sorted(os.listdir(meta_folder)):
        if re.fullmatch(r"manifest\.part\d+of\d+\.json", name):
            part = _load_manifest(meta_folder, name)
            manifest["cases"].update(part["cases"])
            found.append(os.path.join(meta_folder, name))
    return found


def _save_manifest(meta_folder: str, manifest: dict, name: str = MANIFEST_FILE) -> None:
    fd, tmp = tempfile.mkstemp(prefix="manifest-", suffix=".tmp", dir=meta_folder)
    with os.fdopen(fd, "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
    os.chmod(tmp, 0o644)  # mkstemp makes it private; the manifest is as readable as the cases
    os.replace(tmp, os.path.join(meta_folder, name))


def _output_case_ids(out_folder: str) -> set[str]:
    """Cases present in the output folder, found as nnU-Net finds them (by ``<id>.b2nd``)."""
    return {n[: -len(".b2nd")] for n in os.listdir(out_folder) if n.endswith(".b2nd") and not n.endswith("_seg.b2nd")}


def _case_complete(out_folder: str, case_id: str) -> bool:
    return all(os.path.isfile(os.path.join(out_folder, case_id + s)) for s in CASE_FILE_SUFFIXES)


def _remove_case(out_folder: str, case_id: str) -> None:
    # data first, so that nnU-Net no longer lists the case while its other files go
    for suffix in reversed(CASE_FILE_SUFFIXES):
        path = os.path.join(out_folder, case_id + suffix)
        if os.path.isfile(path):
            os.remove(path)


# ----------------------------------------------------------------------------------------------------------------
# one case (runs in a worker process)


def _empty_class_locations(plans_manager, dataset_json: dict) -> dict:
    """``class_locations`` with the keys nnU-Net's preprocessor would write, all empty (no labels to sample)."""
    lm = plans_manager.get_label_manager(dataset_json)
    classes = lm.foreground_regions if lm.has_regions else lm.foreground_labels
    keys: list = [tuple(int(x) for x in c) if isinstance(c, (tuple, list)) else int(c) for c in classes]
    if lm.has_ignore_label:
        # the loader reads this key for every non-oversampled patch when an ignore label exists
        keys.append(tuple([-1] + [int(x) for x in lm.all_labels]))
    return {k: [] for k in keys}


def _short(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = lines[-1] if lines else type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _describe_failure(case_id: str, files: Sequence[str], plans_manager, exc: BaseException) -> str:
    """Names the file that cannot be read, if one file alone fails; otherwise the case."""
    reader = plans_manager.image_reader_writer_class()
    for f in files:
        try:
            reader.read_images([f])
        except Exception as e:  # noqa: BLE001 - any reader failure means this file is the culprit
            return f"cannot read {RAW_UNLABELED_SUBFOLDER}/{os.path.basename(f)} ({_short(e)}); fix or remove the file"
    names = ", ".join(os.path.basename(f) for f in files)
    return f"cannot preprocess unlabeled case {case_id!r} ({names}): {_short(exc)}; fix or remove its files"


def _damaged_stream(files: Sequence[str]) -> str | None:
    """A one-line error for a compressed image whose stream ends early (readers may return part of such a file
    without complaint), else None."""
    for f in files:
        if not f.endswith(".gz"):
            continue
        try:
            with gzip.open(f, "rb") as stream:
                while stream.read(1 << 24):
                    pass
        except (OSError, EOFError) as e:
            return (f"cannot read {RAW_UNLABELED_SUBFOLDER}/{os.path.basename(f)} (truncated or damaged gzip stream: "
                    f"{_short(e)}); fix or remove the file")
    return None


def _malformed(case_id: str, files: Sequence[str], data, props: dict, plans: dict) -> str | None:
    """A one-line error for a 2D image in a dataset of 3D images, or for NaN / infinite voxels, else None."""
    import numpy as np

    names = ", ".join(os.path.basename(f) for f in files)
    median = plans.get("original_median_shape_after_transp")
    shape = list(props["shape_before_cropping"])
    if median is not None and min(median) > 1 and min(shape) == 1:
        return (f"unlabeled case {case_id!r} ({names}) is 2D (shape {shape}) but the dataset's images are 3D "
                f"(median shape {[int(x) for x in median]}); remove it from {RAW_UNLABELED_SUBFOLDER}")
    bad = int(np.size(data) - np.count_nonzero(np.isfinite(data)))
    if bad:
        return (f"unlabeled case {case_id!r} ({names}) holds NaN or infinite values ({bad} voxels after "
                "preprocessing); fix or remove its files")
    return None


def _preprocess_case(task: tuple) -> tuple[str, str | None]:
    """Preprocesses one case into the output folder. Returns (case_id, None) or (case_id, one-line error).

    The case is written into a private temporary folder inside the output folder's bookkeeping subfolder and then
    moved into place with ``os.replace`` (atomic on one file system), so a failure or an interrupted run never
    leaves half a case where nnU-Net looks for cases."""
    case_id, files, plans, configuration, dataset_json, out_folder, tmp_root = task
    import numpy as np
    from nnunetv2.training.dataloading.nnunet_dataset import comp_blosc2_params, nnUNetDatasetBlosc2
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    pm = PlansManager(plans)
    cm = pm.get_configuration(configuration)
    tmp_dir = tempfile.mkdtemp(prefix="tmp-", dir=tmp_root)
    try:
        damaged = _damaged_stream(files)
        if damaged:
            return case_id, damaged
        try:
            data, seg, props = cm.preprocessor_class(verbose=False).run_case(files, None, pm, cm, dataset_json)
        except Exception as e:  # noqa: BLE001 - reported as a one-line input error naming the file
            return case_id, _describe_failure(case_id, files, pm, e)
        malformed = _malformed(case_id, files, data, props, plans)
        if malformed:
            return case_id, malformed
        props["class_locations"] = _empty_class_locations(pm, dataset_json)
        # same dtypes as nnU-Net's run_case_save
        data = data.astype(np.float32, copy=False)
        seg = seg.astype(np.int16, copy=False)
        patch_size = tuple(cm.patch_size)
        blocks_data, chunks_data = comp_blosc2_params(data.shape, patch_size, data.itemsize)
        blocks_seg, chunks_seg = comp_blosc2_params(seg.shape, patch_size, seg.itemsize)
        nnUNetDatasetBlosc2.save_case(data, seg, props, os.path.join(tmp_dir, case_id), chunks=chunks_data,
                                      blocks=blocks_data, chunks_seg=chunks_seg, blocks_seg=blocks_seg)
        for suffix in CASE_FILE_SUFFIXES:
            os.replace(os.path.join(tmp_dir, case_id + suffix), os.path.join(out_folder, case_id + suffix))
        return case_id, None
    except OSError as e:
        return case_id, f"cannot write unlabeled case {case_id!r} to {out_folder} ({_short(e)}); check disk space"
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def _run_tasks(tasks: list[tuple], num_processes: int) -> Iterator[tuple[str, str | None]]:
    if num_processes <= 1:
        for task in tasks:
            yield _preprocess_case(task)
        return
    # spawn, like nnU-Net's own preprocessing: forking a process that imported torch can deadlock
    with multiprocessing.get_context("spawn").Pool(num_processes) as pool:
        # a killed worker (e.g. out of memory) is silently replaced and its task never returns; watch the
        # original workers as nnU-Net does instead of waiting forever
        workers = list(pool._pool)  # noqa: SLF001
        results = pool.imap_unordered(_preprocess_case, tasks)
        for _ in range(len(tasks)):
            while True:
                try:
                    yield results.next(timeout=1.0)
                    break
                except multiprocessing.TimeoutError:
                    if not all(w.is_alive() for w in workers):
                        raise SSLInputError(
                            "a preprocessing worker died (probably out of memory); re-run with a smaller -np"
                        ) from None


# ----------------------------------------------------------------------------------------------------------------
# library entry point


def preprocess_unlabeled(
    dataset: str | int,
    configurations: Sequence[str],
    plans_identifier: str = "nnUNetPlans",
    num_processes: int | None = None,
    verbose: bool = True,
    part_id: int = 0,
    num_parts: int = 1,
) -> dict[str, dict[str, Any]]:
    """Preprocesses ``nnUNet_raw/<Dataset>/imagesUnlabeled`` for each configuration; only new or changed cases.

    With ``num_parts > 1`` only the sorted cases ``[part_id::num_parts]`` are processed (as ``nnUNetv2_predict``'s
    ``-part_id``/``-num_parts``), so parts can run at the same time on several machines sharing the folder: each
    part records its cases in its own manifest file and removes nothing; the next run without parts merges those
    manifests and removes cases whose images are gone.

    Returns ``{configuration: {'folder': path, 'processed': [...], 'up_to_date': [...], 'removed': [...]}}``.
    Raises ``SSLInputError`` for bad input; all checks that need no image reading run before anything is written.
    """
    from nnunetv2.configuration import default_num_processes
    from tqdm import tqdm

    if isinstance(configurations, str):
        configurations = [configurations]
    if not configurations:
        raise SSLInputError("no configuration given; pass one or more with -c, e.g. -c 3d_fullres")
    if num_processes is not None and num_processes < 1:
        raise SSLInputError(f"-np must be at least 1, got {num_processes}")
    if num_parts < 1 or not 0 <= part_id < num_parts:
        raise SSLInputError(f"--part-id must be in 0..{num_parts - 1} for --num-parts {num_parts}, got {part_id}")
    sharded = num_parts > 1

    # ---- validate everything before writing
    name = datasets.resolve_dataset_name(dataset)
    raw_folder = datasets.raw_dataset_folder(name)
    pp_base = datasets.preprocessed_dataset_folder(name)
    dataset_json = datasets.load_preprocessed_dataset_json(pp_base)
    if "file_ending" not in dataset_json:
        raise SSLInputError(
            f"{pp_base}/dataset.json has no 'file_ending'; re-plan the dataset with a valid dataset.json"
        )
    file_ending = dataset_json["file_ending"]
    pm = datasets.load_plans(pp_base, plans_identifier)
    configs = {c: datasets.load_configuration(pm, c) for c in dict.fromkeys(configurations)}

    cases = scan_unlabeled_folder(os.path.join(raw_folder, RAW_UNLABELED_SUBFOLDER), file_ending,
                                  num_channels(dataset_json))
    splits = datasets.read_splits(pp_base) or []
    split_ids = [i for fold in splits for key in ("train", "val") for i in fold[key]]
    check_collisions(cases, datasets.labeled_case_ids(raw_folder, dataset_json), split_ids,
                     datasets.test_case_ids(raw_folder, file_ending))
    _check_test_copies(raw_folder, file_ending, dataset_json, cases)
    stats = {case_id: _file_stats(files) for case_id, files in cases.items()}

    # ---- process each configuration
    summary: dict[str, dict[str, Any]] = {}
    done_identifiers: dict[str, str] = {}
    failures: list[str] = []
    for configuration, cm in configs.items():
        if cm.data_identifier in done_identifiers:
            # configurations that differ only in training settings share their preprocessed data
            summary[configuration] = summary[done_identifiers[cm.data_identifier]]
            if verbose:
                print(f"{configuration}: same data as {done_identifiers[cm.data_identifier]}, nothing to do")
            continue
        done_identifiers[cm.data_identifier] = configuration
        out_folder = unlabeled_preprocessed_folder(pp_base, cm.data_identifier)
        meta_folder = os.path.join(out_folder, META_SUBFOLDER)
        os.makedirs(meta_folder, exist_ok=True)
        if not sharded:  # other parts may be writing theirs
            for leftover in os.listdir(meta_folder):  # temporary folders of an interrupted run
                if leftover.startswith("tmp-"):
                    shutil.rmtree(os.path.join(meta_folder, leftover), ignore_errors=True)
        manifest = _load_manifest(meta_folder)
        parts = _merge_part_manifests(meta_folder, manifest)
        if parts and not sharded:
            _save_manifest(meta_folder, manifest)
            for part_file in parts:
                os.remove(part_file)
        manifest_name = f"manifest.part{part_id}of{num_parts}.json" if sharded else MANIFEST_FILE
        if sharded:
            # this part's own record, so parts never overwrite each other's
            manifest = {"format": MANIFEST_FORMAT, "cases": {**manifest["cases"]}}
        fingerprint = configuration_fingerprint(pm.plans, cm.configuration, dataset_json)

        removed = [] if sharded else sorted((set(manifest["cases"]) | _output_case_ids(out_folder)) - set(cases))
        for case_id in removed:
            _remove_case(out_folder, case_id)
            manifest["cases"].pop(case_id, None)
            if verbose:
                print(f"{configuration}: removed {case_id} (its images are no longer in {RAW_UNLABELED_SUBFOLDER})")
        if removed:
            _save_manifest(meta_folder, manifest)

        todo, up_to_date = [], []
        for case_id in (sorted(cases)[part_id::num_parts] if sharded else cases):
            entry = manifest["cases"].get(case_id)
            current = (entry is not None and entry.get("config") == fingerprint and entry.get("files") == stats[case_id]
                       and _case_complete(out_folder, case_id))
            (up_to_date if current else todo).append(case_id)

        processed: list[str] = []
        n_proc = max(1, min(num_processes or default_num_processes, len(todo)))
        tasks = [(c, cases[c], pm.plans, configuration, dataset_json, out_folder, meta_folder) for c in todo]
        last_save = time.monotonic()
        try:
            with tqdm(total=len(tasks), desc=f"{configuration} unlabeled", unit="case", file=sys.stdout,
                      disable=not verbose or not tasks) as bar:
                for case_id, error in _run_tasks(tasks, n_proc):
                    bar.update()
                    if error is not None:
                        failures.append(error)
                        # an older output of this case no longer matches its images: never train on it
                        _remove_case(out_folder, case_id)
                        manifest["cases"].pop(case_id, None)
                        continue
                    processed.append(case_id)
                    manifest["cases"][case_id] = {"config": fingerprint, "files": stats[case_id]}
                    if time.monotonic() - last_save > _MANIFEST_SAVE_INTERVAL_S:
                        _save_manifest(meta_folder, manifest, manifest_name)
                        last_save = time.monotonic()
        finally:
            # also on Ctrl-C: finished cases stay recorded and are not redone
            _save_manifest(meta_folder, manifest, manifest_name)

        summary[configuration] = {"folder": out_folder, "processed": sorted(processed),
                                  "up_to_date": up_to_date, "removed": removed}
        if verbose:
            print(f"{configuration}: {len(processed)} processed, {len(up_to_date)} up to date, {len(removed)} removed "
                  f"-> {out_folder}")

    if failures:
        unique = list(dict.fromkeys(failures))
        more = f" ({len(unique) - 1} more case(s) failed too)" if len(unique) > 1 else ""
        raise SSLInputError(unique[0] + more)
    return summary
