"""Refuse benchmarks whose test cases leak into training: by case id and by identical image files."""

from __future__ import annotations

import hashlib
import os
from collections import defaultdict
from collections.abc import Iterable, Sequence

from nnunet_ssl.data.layout import RAW_UNLABELED_SUBFOLDER, SPLITS_UNLABELED_KEY
from nnunet_ssl.errors import SSLInputError


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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
        digest = _sha256(other)
        for t in candidates:
            if t not in test_hash:
                test_hash[t] = _sha256(t)
            if test_hash[t] == digest and os.path.realpath(t) != os.path.realpath(other):
                pairs.append((t, other))
    return pairs


def check_no_leakage(test_ids: Sequence[str], test_image_files: Sequence[str], fold_entry: dict,
                     raw_dataset_folder: str, unlabeled_preprocessed_ids: Sequence[str], file_ending: str,
                     compare_files: bool = True) -> None:
    """Raises SSLInputError if a test case is a labeled, unlabeled or validation case of the fold, an image of
    imagesTr/imagesUnlabeled, or a byte-identical copy of one of their image files."""
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
