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
#: training cases of the group that the budget cut: neither labeled nor unlabeled, so no group is on both sides
EXCLUDED_KEY = "excluded_same_group"


def load_groups(path: str | os.PathLike) -> dict[str, str]:
    """A JSON object case id -> group (e.g. PSFHS's ``frame_runs.json``: frames of one sweep share a group)."""
    try:
        with open(path) as f:
            groups = json.load(f)
    except (OSError, ValueError) as e:
        raise SSLInputError(f"cannot read the groups file {path} ({e}); give a JSON object case id -> group") from None
    if not isinstance(groups, dict) or not groups:
        raise SSLInputError(f"the groups file {path} must be a non-empty JSON object case id -> group")
    return {str(k): str(v) for k, v in groups.items()}


def group_of(case_ids: Sequence[str], groups: dict[str, str]) -> dict[str, str]:
    """Each case's group; a case the file does not name is a group of its own. Refuses a file that names none of
    the cases (probably another dataset's)."""
    if not any(c in groups for c in case_ids):
        raise SSLInputError(f"the groups file names none of the {len(case_ids)} training cases (e.g. "
                            f"{case_ids[0] if case_ids else '-'}); give the file of this dataset")
    return {c: groups.get(c, f"case:{c}") for c in case_ids}


def grouped_crossval_split(case_ids: Sequence[str], groups: dict[str, str], n_splits: int = 5,
                           seed: int = 12345) -> list[dict]:
    """nnU-Net's 5-fold split, with whole groups per fold (scikit-learn's ``GroupKFold``, shuffled with nnU-Net's
    seed 12345): no group has cases on both sides of any fold's train/val."""
    from sklearn.model_selection import GroupKFold

    ids = sorted(map(str, case_ids))
    of = group_of(ids, groups)
    if len(set(of.values())) < n_splits:
        raise SSLInputError(f"only {len(set(of.values()))} groups; a grouped {n_splits}-fold split needs at least "
                            f"{n_splits}")
    folds = GroupKFold(n_splits=n_splits, shuffle=True, random_state=seed).split(ids, groups=[of[i] for i in ids])
    return [{"train": sorted(ids[j] for j in tr), "val": sorted(ids[j] for j in va)} for tr, va in folds]


def groups_split_across(splits: Sequence[dict], groups: dict[str, str]) -> list[tuple[int, str]]:
    """(fold, group) pairs whose cases sit on both sides of a fold's train (+ unlabeled) and val."""
    out = []
    for i, fold in enumerate(splits):
        train = set(fold["train"]) | set(fold.get(SPLITS_UNLABELED_KEY, [])) | set(fold.get(EXCLUDED_KEY, []))
        train_groups = {groups.get(c, f"case:{c}") for c in train}
        out += [(i, g) for g in sorted({groups.get(c, f"case:{c}") for c in fold["val"]} & train_groups)]
    return out


def grouped_base(base: Sequence[dict], groups: dict[str, str]) -> tuple[list[dict], str | None]:
    """``base`` if no group straddles a fold's train and val, else a grouped 5-fold split of the same cases (and a
    note saying so)."""
    if not groups_split_across(base, groups):
        return [dict(f) for f in base], None
    ids = sorted({c for f in base for c in [*f["train"], *f.get(SPLITS_UNLABELED_KEY, []), *f["val"]]})
    split = grouped_crossval_split(ids, groups, n_splits=len(base))
    return split, (f"the original folds put cases of one group on both sides of train and val; using a grouped "
                   f"{len(base)}-fold split of the same {len(ids)} cases instead")


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
    groups: dict[str, str] | None = None,
) -> list[dict]:
    """Applies a label budget to every fold of ``base_splits`` (pure; nothing is read or written).

    Per fold ``i``: the candidates are the fold's ``train`` plus any ``unlabeled`` already in the entry (so a
    budgeted split can be re-budgeted without losing cases), sorted; they are shuffled with
    ``np.random.default_rng([seed, i]).permutation`` and the first N stay in ``train`` (sorted), the rest go to
    ``unlabeled`` (sorted). Because the order depends only on (seed, fold), a smaller budget is a subset of a larger
    one for the same seed. ``val`` and any other keys are kept. ``fraction`` F gives N = max(1, round(F * #train))
    per fold, rounding halves up.

    With ``groups`` (case -> group), the order is by group instead: the fold's groups are shuffled with the same
    generator, their cases sorted within each group, and the first N labeled. The group that the budget cuts gives
    its remaining cases to ``excluded_same_group`` (neither labeled nor unlabeled), so no group has cases both
    labeled and unlabeled; a smaller budget is still a subset of a larger one.
    """
    _check_budget_args(num_labeled, fraction, seed)
    if not base_splits:
        raise SSLInputError("the base splits have no folds; delete splits_final.json so it is regenerated")
    out = []
    for i, fold in enumerate(base_splits):
        candidates = sorted(set(map(str, fold["train"])) | set(map(str, fold.get(SPLITS_UNLABELED_KEY, [])))
                            | set(map(str, fold.get(EXCLUDED_KEY, []))))
        n = _labeled_count(len(candidates), num_labeled, fraction)
        if n > len(candidates):
            most = min(len(set(f["train"]) | set(f.get(SPLITS_UNLABELED_KEY, []))) for f in base_splits)
            raise SSLInputError(
                f"--num-labeled {n} is more than the {len(candidates)} training cases of fold {i}; "
                f"the maximum is {most}"
            )
        excluded: set[str] = set()
        if groups is None:
            order = np.random.default_rng([int(seed), i]).permutation(len(candidates))
            keep = {candidates[j] for j in order[:n]}
        else:
            of = group_of(candidates, groups)
            names = sorted(set(of.values()))
            ordered = [c for j in np.random.default_rng([int(seed), i]).permutation(len(names))
                       for c in candidates if of[c] == names[j]]
            keep = set(ordered[:n])
            cut = {of[c] for c in keep}
            excluded = {c for c in ordered[n:] if of[c] in cut}
        entry = dict(fold)
        entry["train"] = [c for c in candidates if c in keep]
        entry["val"] = list(fold["val"])
        entry[SPLITS_UNLABELED_KEY] = [c for c in candidates if c not in keep and c not in excluded]
        entry[BUDGET_KEY] = {"num_labeled": n, "seed": int(seed), "fraction": fraction}
        if groups is not None:
            entry[BUDGET_KEY]["grouped"] = True
            entry[EXCLUDED_KEY] = sorted(excluded)
        out.append(entry)
    return out


def written_by_us(splits: Sequence[dict]) -> bool:
    return any(BUDGET_KEY in fold for fold in splits)


def _strip_budget(splits: Sequence[dict]) -> list[dict]:
    """Undoes a budget when the backup is gone: train = train + unlabeled, our keys dropped."""
    out = []
    for fold in splits:
        entry = {k: v for k, v in fold.items() if k not in (BUDGET_KEY, SPLITS_UNLABELED_KEY, EXCLUDED_KEY)}
        entry["train"] = sorted(set(fold["train"]) | set(fold.get(SPLITS_UNLABELED_KEY, []))
                                | set(fold.get(EXCLUDED_KEY, [])))
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
    groups_file: str | os.PathLike | None = None,
) -> list[dict]:
    """Writes a label-budget ``splits_final.json`` for ``dataset`` (see ``budget_splits``) and returns it. With a
    groups file, folds whose train and val share a group are replaced by a grouped split first
    (:func:`grouped_base`), and the budget takes whole groups."""
    _check_budget_args(num_labeled, fraction, seed)
    pp_base, raw = _dataset_folders(dataset)
    base, backup_note = original_splits(pp_base, raw)
    groups = load_groups(groups_file) if groups_file is not None else None
    regrouped_note = None
    budget_base = base
    if groups is not None:
        budget_base, regrouped_note = grouped_base(base, groups)
    # budget first: a budget that does not fit raises before anything is written
    splits = budget_splits(budget_base, num_labeled=num_labeled, fraction=fraction, seed=seed, groups=groups)
    if backup_note is not None:
        _write_json(os.path.join(pp_base, ORIGINAL_SPLITS_FILE), base)
        if verbose:
            print(backup_note)
    if verbose and regrouped_note is not None:
        print(regrouped_note)
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
    grouped = any(EXCLUDED_KEY in fold for fold in splits)
    print(f"{'fold':>4}  {'labeled':>8}  {'unlabeled':>9}  {'val':>5}" + ("  excluded (cut group)" if grouped else ""))
    for i, fold in enumerate(splits):
        print(f"{i:>4}  {len(fold['train']):>8}  {len(fold.get(SPLITS_UNLABELED_KEY, [])):>9}  {len(fold['val']):>5}"
              + (f"  {len(fold.get(EXCLUDED_KEY, [])):>8}" if grouped else ""))
