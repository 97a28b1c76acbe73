"""Label-budget splits: simulate a label budget on a fully labeled dataset (``nnUNetv2_ssl_make_splits``, whose command
line is :mod:`nnunet_ssl.cli.make_splits`).

Each fold of ``splits_final.json`` keeps N labeled training cases and moves the others to the key ``unlabeled``
(their labels must not be used); ``val`` is unchanged. nnU-Net's ``do_split`` reads only ``splits[fold]['train']``
and ``['val']``, so a plain nnUNetTrainer on these splits trains on the N labeled cases alone: that is the
supervised-on-budget baseline. Semi-supervised trainers also read ``unlabeled``.

The first time we overwrite a ``splits_final.json`` not written by us, it is saved to
``splits_final.original.json``, and every budget is drawn from that original, so budgets never shrink
cumulatively and the same (budget, seed) always gives the same split.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Sequence

import numpy as np

from nnunet_ssl.data import datasets
from nnunet_ssl.data.layout import SPLITS_UNLABELED_KEY
from nnunet_ssl.errors import SSLInputError

SPLITS_FILE = datasets.SPLITS_FILE
ORIGINAL_SPLITS_FILE = "splits_final.original.json"
#: key of each fold entry recording the budget we applied; also marks a splits file as written by us
BUDGET_KEY = "ssl_budget"


def _labeled_count(n_train: int, num_labeled: int | None, fraction: float | None) -> int:
    if num_labeled is not None:
        return num_labeled
    # round half up (not Python's half-to-even): 0.5 of 5 cases keeps 3
    return max(1, int(math.floor(fraction * n_train + 0.5)))


def _check_budget_args(num_labeled: int | None, fraction: float | None, seed: int) -> None:
    if (num_labeled is None) == (fraction is None):
        raise SSLInputError("give exactly one of --num-labeled N or --fraction F to set the label budget")
    bad_count = isinstance(num_labeled, bool) or int(num_labeled or 0) != num_labeled or (num_labeled or 0) < 1
    if num_labeled is not None and bad_count:
        raise SSLInputError(f"--num-labeled must be a whole number of at least 1, got {num_labeled}")
    if fraction is not None and not (0.0 < fraction <= 1.0):
        raise SSLInputError(f"--fraction must be in (0, 1], got {fraction}")
    if int(seed) != seed or seed < 0:
        raise SSLInputError(f"--seed must be a whole number >= 0, got {seed}")


def budget_splits(
    base_splits: Sequence[dict],
    num_labeled: int | None = None,
    fraction: float | None = None,
    seed: int = 0,
) -> list[dict]:
    """Applies a label budget to every fold of ``base_splits`` (pure; nothing is read or written).

    Per fold ``i``: the candidates are the fold's ``train`` plus any ``unlabeled`` already in the entry (so a
    budgeted split can be re-budgeted without losing cases), sorted; they are shuffled with
    ``np.random.default_rng([seed, i]).permutation`` and the first N stay in ``train`` (sorted), the rest go to
    ``unlabeled`` (sorted). Because the order depends only on (seed, fold), a smaller budget is a subset of a larger
    one for the same seed. ``val`` and any other keys are kept. ``fraction`` F gives N = max(1, round(F * #train))
    per fold, rounding halves up.
    """
    _check_budget_args(num_labeled, fraction, seed)
    if not base_splits:
        raise SSLInputError("the base splits have no folds; delete splits_final.json so it is regenerated")
    out = []
    for i, fold in enumerate(base_splits):
        candidates = sorted(set(map(str, fold["train"])) | set(map(str, fold.get(SPLITS_UNLABELED_KEY, []))))
        n = _labeled_count(len(candidates), num_labeled, fraction)
        if n > len(candidates):
            most = min(len(set(f["train"]) | set(f.get(SPLITS_UNLABELED_KEY, []))) for f in base_splits)
            raise SSLInputError(
                f"--num-labeled {n} is more than the {len(candidates)} training cases of fold {i}; "
                f"the maximum is {most}"
            )
        order = np.random.default_rng([int(seed), i]).permutation(len(candidates))
        keep = {candidates[j] for j in order[:n]}
        entry = dict(fold)
        entry["train"] = [c for c in candidates if c in keep]
        entry["val"] = list(fold["val"])
        entry[SPLITS_UNLABELED_KEY] = [c for c in candidates if c not in keep]
        entry[BUDGET_KEY] = {"num_labeled": n, "seed": int(seed), "fraction": fraction}
        out.append(entry)
    return out


def written_by_us(splits: Sequence[dict]) -> bool:
    return any(BUDGET_KEY in fold for fold in splits)


def _strip_budget(splits: Sequence[dict]) -> list[dict]:
    """Undoes a budget when the backup is gone: train = train + unlabeled, our keys dropped."""
    out = []
    for fold in splits:
        entry = {k: v for k, v in fold.items() if k not in (BUDGET_KEY, SPLITS_UNLABELED_KEY)}
        entry["train"] = sorted(set(fold["train"]) | set(fold.get(SPLITS_UNLABELED_KEY, [])))
        out.append(entry)
    return out


def _write_json(path: str, obj) -> None:
    """Atomic: a crash never leaves a half-written splits file that nnU-Net would fail to parse."""
    fd, tmp = tempfile.mkstemp(prefix=".splits-", suffix=".tmp", dir=os.path.dirname(path))
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=4)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def original_splits(preprocessed_base: str, raw_folder_for_default: str | None = None) -> tuple[list[dict], str | None]:
    """The splits to draw budgets from, and a note if they must still be saved as the backup (None if they come
    from the backup ``splits_final.original.json``). Reads only.

    Order: the backup; else the current splits_final.json if it is not ours; else (ours, backup lost) ours with the
    budget undone; else what nnU-Net would create: ``generate_crossval_split(sorted labeled ids, 12345, 5)``."""
    backup = os.path.join(preprocessed_base, ORIGINAL_SPLITS_FILE)
    if os.path.isfile(backup):
        splits = datasets.load_json_file(backup)
        if not isinstance(splits, list) or not all(isinstance(f, dict) and "train" in f and "val" in f for f in splits):
            raise SSLInputError(f"{backup} is not a list of train/val folds; fix it or delete it")
        return splits, None
    current = datasets.read_splits(preprocessed_base)
    if current is not None and not written_by_us(current):
        return current, f"saved nnU-Net's {SPLITS_FILE} to {backup}"
    if current is not None:
        return _strip_budget(current), (
            f"{ORIGINAL_SPLITS_FILE} was missing; rebuilt it from {SPLITS_FILE} by moving '{SPLITS_UNLABELED_KEY}' "
            f"back into 'train' and saved it to {backup}"
        )
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    if raw_folder_for_default is None:
        raise SSLInputError(f"{preprocessed_base} has no {SPLITS_FILE}; set nnUNet_raw so the default can be made")
    dataset_json = datasets.load_preprocessed_dataset_json(preprocessed_base)
    ids = datasets.labeled_case_ids(raw_folder_for_default, dataset_json)
    if len(ids) < 5:
        raise SSLInputError(
            f"only {len(ids)} labeled case(s) in {raw_folder_for_default}; nnU-Net's 5-fold split needs at least 5"
        )
    splits = [{"train": [str(i) for i in f["train"]], "val": [str(i) for i in f["val"]]}
              for f in generate_crossval_split(ids, seed=12345, n_splits=5)]
    return splits, f"no {SPLITS_FILE} yet: saved nnU-Net's default 5-fold split of {len(ids)} cases to {backup}"


def _dataset_folders(dataset: str | int) -> tuple[str, str | None]:
    name = datasets.resolve_dataset_name(dataset)
    pp_base = datasets.preprocessed_dataset_folder(name)
    raw = None
    if not os.path.isfile(os.path.join(pp_base, SPLITS_FILE)) and not os.path.isfile(
        os.path.join(pp_base, ORIGINAL_SPLITS_FILE)
    ):
        raw = datasets.raw_dataset_folder(name)  # only needed to make nnU-Net's default split
    return pp_base, raw


def make_label_budget_splits(
    dataset: str | int,
    num_labeled: int | None = None,
    fraction: float | None = None,
    seed: int = 0,
    verbose: bool = True,
) -> list[dict]:
    """Writes a label-budget ``splits_final.json`` for ``dataset`` (see ``budget_splits``) and returns it."""
    _check_budget_args(num_labeled, fraction, seed)
    pp_base, raw = _dataset_folders(dataset)
    base, backup_note = original_splits(pp_base, raw)
    # budget first: a budget that does not fit raises before anything is written
    splits = budget_splits(base, num_labeled=num_labeled, fraction=fraction, seed=seed)
    if backup_note is not None:
        _write_json(os.path.join(pp_base, ORIGINAL_SPLITS_FILE), base)
        if verbose:
            print(backup_note)
    path = os.path.join(pp_base, SPLITS_FILE)
    _write_json(path, splits)
    if verbose:
        print(f"wrote {path}")
        print_table(splits)
        print("A plain nnUNetTrainer on these splits trains on the labeled cases only: the supervised-on-budget "
              "baseline.")
    return splits


def restore_original_splits(dataset: str | int, verbose: bool = True) -> list[dict]:
    """Writes ``splits_final.original.json`` back to ``splits_final.json``; the backup stays."""
    name = datasets.resolve_dataset_name(dataset)
    pp_base = datasets.preprocessed_dataset_folder(name)
    backup = os.path.join(pp_base, ORIGINAL_SPLITS_FILE)
    if not os.path.isfile(backup):
        current = datasets.read_splits(pp_base)
        if current is not None and written_by_us(current):
            # the backup was deleted by hand: the budget can still be undone from the current splits
            splits = _strip_budget(current)
            _write_json(backup, splits)
            _write_json(os.path.join(pp_base, SPLITS_FILE), splits)
            if verbose:
                print(f"{backup} was missing; restored {SPLITS_FILE} by moving '{SPLITS_UNLABELED_KEY}' back into "
                      "'train' (and saved that as the backup)")
                print_table(splits)
            return splits
        raise SSLInputError(f"{backup} does not exist, so there is nothing to restore; {SPLITS_FILE} was not "
                            "changed by nnUNetv2_ssl_make_splits")
    splits = datasets.load_json_file(backup)
    _write_json(os.path.join(pp_base, SPLITS_FILE), splits)
    if verbose:
        print(f"restored {os.path.join(pp_base, SPLITS_FILE)} from {backup} (backup kept)")
        print_table(splits)
    return splits


def print_table(splits: Sequence[dict]) -> None:
    print(f"{'fold':>4}  {'labeled':>8}  {'unlabeled':>9}  {'val':>5}")
    for i, fold in enumerate(splits):
        print(f"{i:>4}  {len(fold['train']):>8}  {len(fold.get(SPLITS_UNLABELED_KEY, [])):>9}  {len(fold['val']):>5}")
