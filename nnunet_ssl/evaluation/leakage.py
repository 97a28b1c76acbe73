"""Refuse benchmarks whose test cases leak into training: by case id, by identical image files and by identical
decoded voxels (a re-compressed or re-saved copy has other bytes but the same image)."""

from __future__ import annotations

import hashlib
import os
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from nnunet_ssl.data.layout import RAW_UNLABELED_SUBFOLDER, SPLITS_UNLABELED_KEY
from nnunet_ssl.errors import SSLInputError
from nnunet_ssl.utils.files import file_sha256


def _image_files(folder: str, file_ending: str) -> list[str]:
    if not os.path.isdir(folder):
        return []
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(file_ending))


def _case_of(filename: str, file_ending: str) -> str:
    # nnU-Net images are <case>_<4-digit channel><ending>
    return os.path.basename(filename)[: -len(file_ending) - 5]


def identical_files(test_files: Sequence[str], other_files: Iterable[str]) -> list[tuple[str, str]]:
    """(test file, other file) pairs with byte-identical content. Only files whose sizes match a test file's size
    are hashed, so a large training set costs little."""
    sizes: dict[int, list[str]] = defaultdict(list)
    for f in test_files:
        sizes[os.path.getsize(f)].append(f)
    test_hash: dict[str, str] = {}
    pairs = []
    for other in other_files:
        candidates = sizes.get(os.path.getsize(other))
        if not candidates:
            continue
        digest = file_sha256(other)
        for t in candidates:
            if t not in test_hash:
                test_hash[t] = file_sha256(t)
            if test_hash[t] == digest and os.path.realpath(t) != os.path.realpath(other):
                pairs.append((t, other))
    return pairs


def header_shape(path: str) -> tuple[int, ...] | None:
    """The image size from the file's header alone (SimpleITK reads only the header), None if it cannot tell."""
    try:
        import SimpleITK as sitk

        reader = sitk.ImageFileReader()
        reader.SetFileName(path)
        reader.ReadImageInformation()
        return tuple(int(x) for x in reader.GetSize())
    except Exception:  # noqa: BLE001 - a format SimpleITK does not know: decode the image instead
        return None


def voxel_digest(path: str, read: Callable[[str], np.ndarray]) -> str | None:
    """SHA-256 of the decoded voxels (shape, then float32 values): equal for copies whatever their bytes; None for
    a file that cannot be decoded (other checks name it)."""
    try:
        data = np.ascontiguousarray(np.asarray(read(path), dtype=np.float32))
    except Exception:  # noqa: BLE001 - unreadable files are reported by the command that reads them
        return None
    h = hashlib.sha256(repr(data.shape).encode())
    h.update(data.tobytes())
    return h.hexdigest()


def identical_voxels(test_files: Sequence[str], other_files: Iterable[str],
                     read: Callable[[str], np.ndarray]) -> list[tuple[str, str]]:
    """(test file, other file) pairs whose decoded images are equal. Only images whose header size matches a test
    image's (or whose size the header does not tell) are decoded, so a large training set costs little."""
    test_shapes = {f: header_shape(f) for f in test_files}
    known = {s for s in test_shapes.values() if s is not None}
    unknown = any(s is None for s in test_shapes.values())
    test_digest: dict[str, str | None] = {}
    pairs = []
    for other in other_files:
        shape = header_shape(other)
        if shape is not None and shape not in known and not unknown:
            continue
        digest: str | None = None
        decoded = False  # an unreadable file is tried once, not once per test image
        for t, t_shape in test_shapes.items():
            if shape is not None and t_shape is not None and shape != t_shape:
                continue
            if os.path.realpath(t) == os.path.realpath(other):
                continue
            if t not in test_digest:
                test_digest[t] = voxel_digest(t, read)
            if not decoded:
                digest, decoded = voxel_digest(other, read), True
            if digest is not None and test_digest[t] == digest:
                pairs.append((t, other))
    return pairs


def nnunet_image_reader(dataset_json: dict, example_file: str) -> Callable[[str], np.ndarray]:
    """Decodes one single-channel file with the reader nnU-Net uses for this dataset."""
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json

    reader = determine_reader_writer_from_dataset_json(dataset_json, example_file)()
    return lambda path: reader.read_images([path])[0]


def check_no_leakage(test_ids: Sequence[str], test_image_files: Sequence[str], fold_entry: dict,
                     raw_dataset_folder: str, unlabeled_preprocessed_ids: Sequence[str], file_ending: str,
                     compare_files: bool = True, read: Callable[[str], np.ndarray] | None = None) -> None:
    """Raises SSLInputError if a test case is a labeled, unlabeled or validation case of the fold, an image of
    imagesTr/imagesUnlabeled, a byte-identical copy of one of their image files or, with ``read`` (a decoder of one
    file), an image with the same decoded voxels."""
    test = set(test_ids)
    used = {
        "labeled (train)": set(map(str, fold_entry.get("train", []))),
        "validation": set(map(str, fold_entry.get("val", []))),
        "unlabeled": set(map(str, fold_entry.get(SPLITS_UNLABELED_KEY, []))),
        "preprocessed unlabeled": set(unlabeled_preprocessed_ids),
    }
    other_files = []
    for sub in ("imagesTr", RAW_UNLABELED_SUBFOLDER):
        files = _image_files(os.path.join(raw_dataset_folder, sub), file_ending)
        used[sub] = {_case_of(f, file_ending) for f in files}
        other_files += files
    for what, ids in used.items():
        clash = sorted(test & ids)
        if clash:
            raise SSLInputError(
                f"refusing to benchmark: test case(s) {clash[:5]} ({len(clash)} in all) are also {what} data of this "
                "fold; hold test cases out of imagesTr, imagesUnlabeled and the splits (never train on test data)")
    if compare_files:
        pairs = identical_files(test_image_files, other_files)
        if pairs:
            t, o = pairs[0]
            raise SSLInputError(
                f"refusing to benchmark: test image {os.path.basename(t)} is byte-identical to training image {o} "
                f"({len(pairs)} such pair(s)); remove the duplicate from the training or the test data")
        pairs = identical_voxels(test_image_files, other_files, read) if read is not None else []
        if pairs:
            t, o = pairs[0]
            raise SSLInputError(
                f"refusing to benchmark: test image {os.path.basename(t)} has the same voxels as training image {o} "
                f"(another file of the same image; {len(pairs)} such pair(s)); remove the duplicate from the "
                "training or the test data")
