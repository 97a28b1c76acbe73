"""Label-budget splits: the pure ``budget_splits`` and the ``nnUNetv2_ssl_make_splits`` command line."""

from __future__ import annotations

import json
import types

import pytest
from conftest import nnunet_env, run_cli

from nnunet_ssl.data.layout import SPLITS_UNLABELED_KEY
from nnunet_ssl.data.splits import (
    BUDGET_KEY,
    EXCLUDED_KEY,
    ORIGINAL_SPLITS_FILE,
    budget_splits,
    grouped_base,
    grouped_crossval_split,
    groups_split_across,
    load_groups,
)
from nnunet_ssl.errors import SSLInputError

UNL = SPLITS_UNLABELED_KEY


def _hand_splits() -> list[dict]:
    ids = [f"c{i:02d}" for i in range(20)]
    folds = []
    for k in range(4):
        val = ids[k * 5:(k + 1) * 5]
        folds.append({"train": [i for i in ids if i not in val][::-1], "val": val})  # unsorted on purpose
    return folds


# ------------------------------------------------------------------ pure function


def test_budget_sizes_disjoint_union_and_val():
    base = _hand_splits()
    out = budget_splits(base, num_labeled=4, seed=3)
    assert len(out) == len(base)
    for fold, orig in zip(out, base):
        assert len(fold["train"]) == 4
        assert len(fold[UNL]) == len(orig["train"]) - 4
        assert not set(fold["train"]) & set(fold[UNL])
        assert set(fold["train"]) | set(fold[UNL]) == set(orig["train"])
        assert fold["val"] == orig["val"]
        assert fold["train"] == sorted(fold["train"]) and fold[UNL] == sorted(fold[UNL])
        assert fold[BUDGET_KEY] == {"num_labeled": 4, "seed": 3, "fraction": None}
    assert base == _hand_splits(), "the input must not be modified"


def test_budget_deterministic_per_seed_and_differs_across_seeds():
    base = _hand_splits()
    a = budget_splits(base, num_labeled=3, seed=7)
    assert a == budget_splits(base, num_labeled=3, seed=7)
    b = budget_splits(base, num_labeled=3, seed=8)
    assert [f["train"] for f in a] != [f["train"] for f in b]
    # different folds are drawn independently, not with the same positions
    assert len({tuple(f["train"]) for f in a}) > 1


def test_budget_nested_and_rebudget_starts_from_union():
    base = _hand_splits()
    small = budget_splits(base, num_labeled=2, seed=1)
    large = budget_splits(base, num_labeled=6, seed=1)
    for s, big in zip(small, large):
        assert set(s["train"]) <= set(big["train"])
    # budgeting a budgeted split uses train + unlabeled, so it equals budgeting the original
    assert budget_splits(small, num_labeled=6, seed=1) == large


@pytest.mark.parametrize(("fraction", "n_train", "expected"), [
    (0.5, 15, 8),    # 7.5 rounds half up
    (0.5, 5, 3),     # 2.5 rounds half up (Python's round would give 2)
    (0.1, 15, 2),    # 1.5 -> 2
    (0.01, 15, 1),   # never below one labeled case
    (1.0, 15, 15),
    (0.2, 15, 3),
])
def test_budget_fraction_rounding(fraction, n_train, expected):
    base = [{"train": [f"x{i}" for i in range(n_train)], "val": ["v"]}]
    out = budget_splits(base, fraction=fraction)
    assert len(out[0]["train"]) == expected
    assert out[0][BUDGET_KEY]["fraction"] == fraction


@pytest.mark.parametrize("kwargs", [
    {},                                       # neither
    {"num_labeled": 2, "fraction": 0.5},      # both
    {"num_labeled": 0},
    {"num_labeled": -1},
    {"fraction": 0.0},
    {"fraction": 1.5},
    {"num_labeled": 2, "seed": -1},
])
def test_budget_argument_errors(kwargs):
    with pytest.raises(SSLInputError):
        budget_splits(_hand_splits(), **kwargs)


def test_budget_too_large_names_maximum():
    base = _hand_splits()
    base[2]["train"] = base[2]["train"][:9]
    with pytest.raises(SSLInputError, match="maximum is 9"):
        budget_splits(base, num_labeled=12)


def test_nnunet_do_split_reads_only_train_and_val(copy_planned):
    """nnU-Net's own do_split on a budgeted splits file: train = our labeled cases, extra keys ignored."""
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    base_dir = copy_planned["root"] / "preprocessed" / copy_planned["dataset"]
    ids = sorted(p.name[:-5] for p in (base_dir / "nnUNetPlans_3d_fullres").glob("*.b2nd")
                 if not p.name.endswith("_seg.b2nd"))
    splits = budget_splits([{"train": ids[:6], "val": ids[6:]}, {"train": ids[2:], "val": ids[:2]}], num_labeled=2)
    (base_dir / "splits_final.json").write_text(json.dumps(splits))
    for fold in (0, 1):
        fake_trainer = types.SimpleNamespace(
            dataset_class=nnUNetDatasetBlosc2, fold=fold, preprocessed_dataset_folder_base=str(base_dir),
            preprocessed_dataset_folder=str(base_dir / "nnUNetPlans_3d_fullres"),
            folder_with_segs_from_previous_stage=None, print_to_log_file=lambda *a, **k: None,
        )
        tr, val = nnUNetTrainer.do_split(fake_trainer)
        assert list(tr) == splits[fold]["train"] and list(val) == splits[fold]["val"]


# ------------------------------------------------------------------ command line


def _read(path):
    return json.loads(path.read_text())


def _assert_one_line_error(proc):
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nnunet-ssl: error:"), proc.stderr


def test_cli_default_splits_budget_rebudget_restore(copy_planned):
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    env = nnunet_env(copy_planned["root"], training=False)
    base_dir = copy_planned["root"] / "preprocessed" / copy_planned["dataset"]
    splits_file, backup = base_dir / "splits_final.json", base_dir / ORIGINAL_SPLITS_FILE
    assert not splits_file.exists()

    proc = run_cli(["nnUNetv2_ssl_make_splits", "-d", str(copy_planned["id"]), "--num-labeled", "2", "--seed", "5"],
                   env=env)
    assert "supervised-on-budget baseline" in proc.stdout and "unlabeled" in proc.stdout
    labeled = sorted(p.name[:-len("_0000.nii.gz")] for p in
                     (copy_planned["root"] / "raw" / copy_planned["dataset"] / "imagesTr").iterdir())
    expected_original = [{"train": [str(i) for i in f["train"]], "val": [str(i) for i in f["val"]]}
                         for f in generate_crossval_split(labeled, seed=12345, n_splits=5)]
    assert _read(backup) == expected_original
    first = _read(splits_file)
    assert first == budget_splits(expected_original, num_labeled=2, seed=5)
    assert all(len(f["train"]) == 2 for f in first)

    # another budget starts from the original, not from the 2-case split
    run_cli(["nnUNetv2_ssl_make_splits", "-d", copy_planned["dataset"], "--fraction", "0.5"], env=env)
    second = _read(splits_file)
    for fold, orig in zip(second, expected_original):
        assert set(fold["train"]) | set(fold[UNL]) == set(orig["train"])
        assert len(fold["train"]) == int(len(orig["train"]) * 0.5 + 0.5)
    assert _read(backup) == expected_original

    proc = run_cli(["nnUNetv2_ssl_make_splits", "-d", str(copy_planned["id"]), "--restore"], env=env)
    assert _read(splits_file) == expected_original
    assert backup.exists()


def test_cli_keeps_backup_of_existing_splits(copy_planned):
    env = nnunet_env(copy_planned["root"], training=False)
    base_dir = copy_planned["root"] / "preprocessed" / copy_planned["dataset"]
    ids = [f"case_{i:03d}" for i in range(8)]
    custom = [{"train": ids[:5], "val": ids[5:]}, {"train": ids[3:], "val": ids[:3]}]
    (base_dir / "splits_final.json").write_text(json.dumps(custom))

    run_cli(["nnUNetv2_ssl_make_splits", "-d", "990", "--num-labeled", "3"], env=env)
    backup = base_dir / ORIGINAL_SPLITS_FILE
    assert _read(backup) == custom
    backup_bytes = backup.read_bytes()
    run_cli(["nnUNetv2_ssl_make_splits", "-d", "990", "--num-labeled", "1", "--seed", "2"], env=env)
    assert backup.read_bytes() == backup_bytes, "the backup must never be overwritten"
    out = _read(base_dir / "splits_final.json")
    assert [len(f["train"]) for f in out] == [1, 1]
    assert [set(f["train"]) | set(f[UNL]) for f in out] == [set(f["train"]) for f in custom]

    # the backup went missing: the original is rebuilt from our splits (train + unlabeled) and saved again
    backup.unlink()
    run_cli(["nnUNetv2_ssl_make_splits", "-d", "990", "--num-labeled", "4"], env=env)
    assert [set(f["train"]) for f in _read(backup)] == [set(f["train"]) for f in custom]
    assert [len(f["train"]) for f in _read(base_dir / "splits_final.json")] == [4, 4]
    # --restore without the backup undoes the budget from our own splits instead of claiming nothing changed
    backup.unlink()
    proc = run_cli(["nnUNetv2_ssl_make_splits", "-d", "990", "--restore"], env=env)
    assert "was missing" in proc.stdout
    assert [set(f["train"]) for f in _read(base_dir / "splits_final.json")] == [set(f["train"]) for f in custom]
    assert all(UNL not in f or not f[UNL] for f in _read(base_dir / "splits_final.json"))


@pytest.mark.parametrize("args", [
    ["--num-labeled", "100"],
    ["--num-labeled", "0"],
    ["--fraction", "0"],
    ["--fraction", "1.5"],
    [],
    ["--num-labeled", "2", "--fraction", "0.5"],
    ["--restore"],
    ["--restore", "--num-labeled", "2"],
], ids=["too-many", "zero", "fraction-0", "fraction-1.5", "no-budget", "both", "restore-no-backup",
        "restore-with-budget"])
def test_cli_errors_write_nothing(copy_planned, args):
    env = nnunet_env(copy_planned["root"], training=False)
    base_dir = copy_planned["root"] / "preprocessed" / copy_planned["dataset"]
    before = sorted(p.name for p in base_dir.iterdir())
    proc = run_cli(["nnUNetv2_ssl_make_splits", "-d", "990", *args], env=env, check=False)
    _assert_one_line_error(proc)
    assert sorted(p.name for p in base_dir.iterdir()) == before


def test_cli_unknown_dataset(copy_planned):
    env = nnunet_env(copy_planned["root"], training=False)
    proc = run_cli(["nnUNetv2_ssl_make_splits", "-d", "991", "--num-labeled", "2"], env=env, check=False)
    _assert_one_line_error(proc)
    assert "Dataset990_SSLSynthetic" in proc.stderr  # lists what is available


# ---------------------------------------------------------------- groups (frames of one sweep stay together)
GROUPS = {f"c{i:02d}": f"run{i // 4}" for i in range(24)}  # six runs of four frames


def _sides(fold: dict) -> dict[str, set[str]]:
    return {k: {GROUPS[c] for c in fold.get(k, [])} for k in ("train", UNL, "val", EXCLUDED_KEY)}


def test_grouped_crossval_keeps_each_group_in_one_fold():
    folds = grouped_crossval_split(sorted(GROUPS), GROUPS, n_splits=3)
    assert sorted(c for f in folds for c in f["val"]) == sorted(GROUPS)  # each case validated exactly once
    for fold in folds:
        sides = _sides(fold)
        assert not sides["train"] & sides["val"] and len(fold["val"]) == 8
    with pytest.raises(SSLInputError, match="needs at least 7"):
        grouped_crossval_split(sorted(GROUPS), GROUPS, n_splits=7)


def test_grouped_budget_takes_whole_groups_and_leaves_the_cut_groups_rest_out():
    base = [{"train": [f"c{i:02d}" for i in range(16)], "val": [f"c{i:02d}" for i in range(16, 24)]}]
    for n in (1, 4, 6, 9):
        fold = budget_splits(base, num_labeled=n, seed=3, groups=GROUPS)[0]
        sides = _sides(fold)
        assert len(fold["train"]) == n
        assert not sides["train"] & sides[UNL] and not sides[UNL] & sides[EXCLUDED_KEY]
        # the excluded cases are exactly the rest of the one group the budget cut
        assert len(fold[EXCLUDED_KEY]) == (-n) % 4 and sides[EXCLUDED_KEY] <= sides["train"]
        assert len(fold["train"]) + len(fold[UNL]) + len(fold[EXCLUDED_KEY]) == 16
    small, large = (budget_splits(base, num_labeled=n, seed=3, groups=GROUPS)[0]["train"] for n in (5, 9))
    assert set(small) < set(large)
    # the cut group gives its first frames (sorted ids) to the labeled side
    fold = budget_splits(base, num_labeled=6, seed=3, groups=GROUPS)[0]
    cut = sorted(c for c in fold["train"] if GROUPS[c] in _sides(fold)[EXCLUDED_KEY])
    assert cut == sorted(c for c in GROUPS if GROUPS[c] == GROUPS[cut[0]])[:2]


def test_grouped_base_replaces_folds_that_split_a_group():
    clean = grouped_crossval_split(sorted(GROUPS), GROUPS, n_splits=3)
    assert grouped_base(clean, GROUPS) == (clean, None)
    leaky = [{"train": sorted(GROUPS)[1:], "val": sorted(GROUPS)[:1]}] * 3
    assert groups_split_across(leaky, GROUPS) == [(0, "run0"), (1, "run0"), (2, "run0")]
    regrouped, note = grouped_base(leaky, GROUPS)
    assert "grouped 3-fold split" in note and not groups_split_across(regrouped, GROUPS)


def test_groups_file_errors(tmp_path):
    bad = tmp_path / "g.json"
    bad.write_text("[1, 2]")
    with pytest.raises(SSLInputError, match="JSON object case id -> group"):
        load_groups(bad)
    with pytest.raises(SSLInputError, match="cannot read the groups file"):
        load_groups(tmp_path / "missing.json")
    with pytest.raises(SSLInputError, match="names none of the"):
        budget_splits([{"train": ["a", "b"], "val": ["c"]}], num_labeled=1, groups=GROUPS)


def test_cli_grouped_budget(copy_planned, tmp_path):
    env = nnunet_env(copy_planned["root"], training=False)
    cases = sorted(p.name[:-len("_0000.nii.gz")] for p in
                   (copy_planned["root"] / "raw" / copy_planned["dataset"] / "imagesTr").iterdir())
    groups = {c: f"g{max(i - 1, 0)}" for i, c in enumerate(cases)}  # the first two cases are one group
    path = tmp_path / "groups.json"
    path.write_text(json.dumps(groups))
    proc = run_cli(["nnUNetv2_ssl_make_splits", "-d", str(copy_planned["id"]), "--num-labeled", "1", "--groups",
                    str(path)], env=env)
    splits = _read(copy_planned["root"] / "preprocessed" / copy_planned["dataset"] / "splits_final.json")
    assert "excluded (cut group)" in proc.stdout
    for fold in splits:
        train, unl, val = ({groups[c] for c in fold.get(k, [])} for k in ("train", UNL, "val"))
        assert len(fold["train"]) == 1 and not train & unl and not (train | unl) & val
        assert fold[BUDGET_KEY]["grouped"] is True
