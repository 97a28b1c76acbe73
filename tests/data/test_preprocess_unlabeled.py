"""``nnUNetv2_ssl_preprocess_unlabeled``: nnU-Net-identical data, incremental re-runs, one-line input errors."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import nnunet_env, run_cli

from nnunet_ssl.data import datasets
from nnunet_ssl.data.layout import RAW_UNLABELED_SUBFOLDER
from nnunet_ssl.data.preprocess_unlabeled import check_collisions, preprocess_unlabeled
from nnunet_ssl.errors import SSLInputError

CLI = "nnUNetv2_ssl_preprocess_unlabeled"


def _dirs(planned: dict) -> tuple[Path, Path]:
    root, name = planned["root"], planned["dataset"]
    return root / "raw" / name, root / "preprocessed" / name


def _snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    """relative path -> (content hash, mtime_ns) of every file below folder."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            out[str(p.relative_to(folder))] = (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
    return out


def _case_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_file())


def _load_data(folder: Path, case_id: str):
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

    data, seg, _, props = nnUNetDatasetBlosc2(str(folder), identifiers=[case_id]).load_case(case_id)
    return np.asarray(data[:]), np.asarray(seg[:]), props


@pytest.fixture()
def planned_env(copy_planned, monkeypatch) -> dict:
    """copy_planned with the nnU-Net variables set in this process, for calls of the library function."""
    for key, value in nnunet_env(copy_planned["root"], training=False).items():
        if key.startswith("nnUNet_"):
            monkeypatch.setenv(key, value)
    return copy_planned


def _assert_one_line_error(proc, *fragments: str) -> None:
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nnunet-ssl: error:"), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# ------------------------------------------------------------------ output


def test_cli_data_byte_identical_to_nnunet(copy_planned):
    raw, pp = _dirs(copy_planned)
    config_before = _snapshot(pp / "nnUNetPlans_3d_fullres")
    # a labeled image under a new id: its data must match nnU-Net's own preprocessing of it
    shutil.copy2(raw / "imagesTr" / "case_000_0000.nii.gz", raw / RAW_UNLABELED_SUBFOLDER / "copyof000_0000.nii.gz")

    proc = run_cli([CLI, "-d", "990", "-c", "3d_fullres", "-np", "2"], env=nnunet_env(copy_planned["root"], False))
    assert "5 processed, 0 up to date, 0 removed" in proc.stdout

    out = pp / "nnUNetPlans_3d_fullres_unlabeled"
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class, nnUNetDatasetBlosc2

    ds = nnUNetDatasetBlosc2(str(out))
    assert ds.identifiers == ["copyof000", "unl_000", "unl_001", "unl_002", "unl_003"]
    assert infer_dataset_class(str(out)) is nnUNetDatasetBlosc2  # our bookkeeping does not confuse nnU-Net

    ours, seg, props = _load_data(out, "copyof000")
    theirs, _, their_props = _load_data(pp / "nnUNetPlans_3d_fullres", "case_000")
    assert ours.dtype == np.float32 and seg.dtype == np.int16
    assert ours.shape == theirs.shape
    assert float(np.max(np.abs(ours - theirs))) == 0.0
    assert ours.tobytes() == theirs.tobytes()
    assert set(np.unique(seg)) <= {0, -1}  # nonzero-mask placeholder, no labels
    assert set(props["class_locations"]) == set(their_props["class_locations"])
    assert all(len(v) == 0 for v in props["class_locations"].values())
    for key in ("spacing", "shape_before_cropping", "bbox_used_for_cropping"):
        assert np.array_equal(np.asarray(props[key]), np.asarray(their_props[key]))
    for case_id in ds.identifiers:  # every case loads as nnU-Net's loader would load it
        data, seg, _ = _load_data(out, case_id)
        assert data.shape[1:] == seg.shape[1:] and data.shape[0] == 1

    assert _snapshot(pp / "nnUNetPlans_3d_fullres") == config_before


def test_2d_data_identical_to_nnunet(planned_env, tmp_path):
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    raw, pp = _dirs(planned_env)
    shutil.copy2(raw / "imagesTr" / "case_003_0000.nii.gz", raw / RAW_UNLABELED_SUBFOLDER / "copyof003_0000.nii.gz")
    summary = preprocess_unlabeled("990", ["2d"], num_processes=1, verbose=False)
    assert summary["2d"]["processed"] == ["copyof003", "unl_000", "unl_001", "unl_002", "unl_003"]
    out = Path(summary["2d"]["folder"])
    assert out == pp / "nnUNetPlans_2d_unlabeled"

    # nnU-Net's own per-case preprocessing of the labeled case (what nnUNetv2_preprocess -c 2d runs)
    pm = PlansManager(str(pp / "nnUNetPlans.json"))
    cm = pm.get_configuration("2d")
    dataset_json = json.loads((pp / "dataset.json").read_text())
    cm.preprocessor_class(verbose=False).run_case_save(
        str(tmp_path / "case_003"), [str(raw / "imagesTr" / "case_003_0000.nii.gz")],
        str(raw / "labelsTr" / "case_003.nii.gz"), pm, cm, dataset_json)
    ours, _, _ = _load_data(out, "copyof003")
    theirs, _, _ = _load_data(tmp_path, "case_003")
    assert ours.tobytes() == theirs.tobytes() and ours.shape == theirs.shape


def test_incremental_reruns(planned_env):
    raw, pp = _dirs(planned_env)
    images = raw / RAW_UNLABELED_SUBFOLDER
    config_before = _snapshot(pp / "nnUNetPlans_3d_fullres")

    first = preprocess_unlabeled(990, ["3d_fullres"], num_processes=1, verbose=False)["3d_fullres"]
    out = Path(first["folder"])
    assert first["processed"] == ["unl_000", "unl_001", "unl_002", "unl_003"] and first["up_to_date"] == []

    again = preprocess_unlabeled(990, ["3d_fullres"], num_processes=1, verbose=False)["3d_fullres"]
    assert again["processed"] == [] and len(again["up_to_date"]) == 4 and again["removed"] == []

    # touch one image, add another: only those two are processed, the others' files are not rewritten
    before = _snapshot(out)
    st = os.stat(images / "unl_001_0000.nii.gz")
    os.utime(images / "unl_001_0000.nii.gz", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    shutil.copy2(images / "unl_002_0000.nii.gz", images / "extra_0000.nii.gz")
    third = preprocess_unlabeled("Dataset990_SSLSynthetic", ["3d_fullres"], num_processes=1, verbose=False)
    third = third["3d_fullres"]
    assert third["processed"] == ["extra", "unl_001"] and len(third["up_to_date"]) == 3
    after = _snapshot(out)
    for case_id in ("unl_000", "unl_002", "unl_003"):
        for suffix in (".b2nd", "_seg.b2nd", ".pkl"):
            assert after[case_id + suffix] == before[case_id + suffix]

    # a removed raw image removes its preprocessed case, and nothing else
    (images / "unl_003_0000.nii.gz").unlink()
    fourth = preprocess_unlabeled(990, ["3d_fullres"], num_processes=1, verbose=False)["3d_fullres"]
    assert fourth["removed"] == ["unl_003"] and fourth["processed"] == []
    assert not any(n.startswith("unl_003") for n in _case_files(out))
    assert len([n for n in _case_files(out) if n.endswith(".pkl")]) == 4

    # a changed configuration in the plans re-runs every case
    plans_file = pp / "nnUNetPlans.json"
    plans = json.loads(plans_file.read_text())
    plans["configurations"]["3d_fullres"]["use_mask_for_norm"] = [True]
    plans_file.write_text(json.dumps(plans))
    fifth = preprocess_unlabeled(990, ["3d_fullres"], num_processes=1, verbose=False)["3d_fullres"]
    assert len(fifth["processed"]) == 4 and fifth["up_to_date"] == []

    assert _snapshot(pp / "nnUNetPlans_3d_fullres") == config_before
    assert [p.name for p in (out / ".nnunet_ssl").iterdir()] == ["manifest.json"]  # no temporary leftovers


def test_parts_split_the_cases_and_a_run_without_parts_merges_their_records(planned_env):
    """Two parts process disjoint halves (nnUNetv2_predict's [part::n] of the sorted cases), each with its own
    manifest; the next run without parts finds everything up to date, merges the records and removes stale cases."""
    first = preprocess_unlabeled(990, ["3d_fullres"], num_processes=1, verbose=False, part_id=0, num_parts=2)
    second = preprocess_unlabeled(990, ["3d_fullres"], num_processes=1, verbose=False, part_id=1, num_parts=2)
    assert first["3d_fullres"]["processed"] == ["unl_000", "unl_002"]
    assert second["3d_fullres"]["processed"] == ["unl_001", "unl_003"]
    meta = Path(first["3d_fullres"]["folder"]) / ".nnunet_ssl"
    assert sorted(p.name for p in meta.iterdir()) == ["manifest.part0of2.json", "manifest.part1of2.json"]
    # a part run again has nothing to do
    assert preprocess_unlabeled(990, ["3d_fullres"], verbose=False, part_id=0, num_parts=2)["3d_fullres"][
        "up_to_date"] == ["unl_000", "unl_002"]
    merged = preprocess_unlabeled(990, ["3d_fullres"], num_processes=1, verbose=False)["3d_fullres"]
    assert merged["processed"] == [] and sorted(merged["up_to_date"]) == ["unl_000", "unl_001", "unl_002", "unl_003"]
    assert sorted(p.name for p in meta.iterdir()) == ["manifest.json"]
    with pytest.raises(SSLInputError, match="--part-id must be in 0..1"):
        preprocess_unlabeled(990, ["3d_fullres"], verbose=False, part_id=2, num_parts=2)


def test_cli_summary_and_rerun(copy_planned):
    env = nnunet_env(copy_planned["root"], training=False)
    run_cli([CLI, "-d", "990", "-c", "3d_fullres", "-np", "1"], env=env)
    proc = run_cli([CLI, "-d", "Dataset990_SSLSynthetic", "-c", "3d_fullres"], env=env)
    assert "0 processed, 4 up to date, 0 removed" in proc.stdout


# ------------------------------------------------------------------ bad input


def _garbage(images: Path) -> None:
    (images / "garbage_0000.nii.gz").write_bytes(b"this is not a nifti file" * 40)


def _wrong_ending(images: Path) -> None:
    (images / "unl_009_0000.png").write_bytes(b"png")


def _no_channel_suffix(images: Path) -> None:
    shutil.copy2(images / "unl_000_0000.nii.gz", images / "unl_009.nii.gz")


def _extra_channel(images: Path) -> None:
    shutil.copy2(images / "unl_000_0000.nii.gz", images / "unl_000_0001.nii.gz")


def _labeled_id(images: Path) -> None:
    shutil.copy2(images / "unl_000_0000.nii.gz", images / "case_002_0000.nii.gz")


def _test_id(images: Path) -> None:
    shutil.copy2(images / "unl_000_0000.nii.gz", images / "test_001_0000.nii.gz")


def _no_folder(images: Path) -> None:
    shutil.move(images, images.parent / "imagesElsewhere")


def _empty_folder(images: Path) -> None:
    shutil.move(images, images.parent / "imagesElsewhere")
    images.mkdir()


def _truncated_image(images: Path) -> None:
    data = (images / "unl_000_0000.nii.gz").read_bytes()
    (images / "unl_009_0000.nii.gz").write_bytes(data[: len(data) // 3])


def _image_2d(images: Path) -> None:
    import SimpleITK as sitk

    img = sitk.ReadImage(str(images / "unl_000_0000.nii.gz"))
    sitk.WriteImage(img[:, :, 0], str(images / "unl_009_0000.nii.gz"))


def _recompressed_test_image(images: Path) -> None:
    import gzip

    test = (images.parent / "imagesTs" / "test_001_0000.nii.gz").read_bytes()
    copy = gzip.compress(gzip.decompress(test), compresslevel=1, mtime=12345)
    assert copy != test
    (images / "unl_009_0000.nii.gz").write_bytes(copy)


BAD_INPUTS = {
    "recompressed test image": (_recompressed_test_image, [], ["unl_009_0000.nii.gz", "same voxels",
                                                               "test_001_0000.nii.gz"]),
    "truncated gzip": (_truncated_image, [], ["unl_009_0000.nii.gz", "truncated"]),
    "2D image in a 3D dataset": (_image_2d, [], ["unl_009", "is 2D", "3D"]),
    "garbage image": (_garbage, [], ["garbage_0000.nii.gz", "cannot read"]),
    "wrong ending": (_wrong_ending, [], ["unl_009_0000.png", ".nii.gz"]),
    "no channel suffix": (_no_channel_suffix, [], ["unl_009.nii.gz", "_XXXX"]),
    "extra channel": (_extra_channel, [], ["unl_000", "0000, 0001"]),
    "labeled id": (_labeled_id, [], ["case_002", "labeled", "rename"]),
    "test id": (_test_id, [], ["test_001", "imagesTs", "rename"]),
    "no imagesUnlabeled": (_no_folder, [], ["imagesUnlabeled", "does not exist"]),
    "empty imagesUnlabeled": (_empty_folder, [], ["is empty"]),
    "unknown dataset": (None, ["-d", "991"], ["unknown dataset", "Dataset990_SSLSynthetic"]),
    "unknown configuration": (None, ["-c", "5d"], ["unknown configuration '5d'", "3d_fullres"]),
    "unknown plans": (None, ["-p", "NoSuchPlans"], ["unknown plans 'NoSuchPlans'", "nnUNetPlans"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_cli_bad_input(planned_env, case):
    change_raw, extra_args, fragments = BAD_INPUTS[case]
    raw, pp = _dirs(planned_env)
    preprocess_unlabeled(990, ["3d_fullres"], num_processes=1, verbose=False)
    out = pp / "nnUNetPlans_3d_fullres_unlabeled"
    before_out, before_cfg = _snapshot(out), _snapshot(pp / "nnUNetPlans_3d_fullres")
    if change_raw is not None:
        change_raw(raw / RAW_UNLABELED_SUBFOLDER)

    args = {"-d": "990", "-c": "3d_fullres", "-np": "1"}
    args.update(dict(zip(extra_args[::2], extra_args[1::2])))
    proc = run_cli([CLI, *[x for kv in args.items() for x in kv]], env=nnunet_env(planned_env["root"], False),
                   check=False)
    _assert_one_line_error(proc, *fragments)
    after_out = _snapshot(out)
    # the manifest may be rewritten (same content); every preprocessed case is untouched
    before_out.pop(".nnunet_ssl/manifest.json")
    assert json.loads((out / ".nnunet_ssl" / "manifest.json").read_text())["cases"].keys() >= {"unl_000", "unl_003"}
    after_out.pop(".nnunet_ssl/manifest.json", None)
    assert after_out == before_out
    assert _snapshot(pp / "nnUNetPlans_3d_fullres") == before_cfg


def test_unreadable_image_does_not_block_other_new_cases(planned_env):
    raw, pp = _dirs(planned_env)
    images = raw / RAW_UNLABELED_SUBFOLDER
    _garbage(images)
    with pytest.raises(SSLInputError, match="garbage_0000.nii.gz"):
        preprocess_unlabeled(990, ["3d_fullres"], num_processes=1, verbose=False)
    out = pp / "nnUNetPlans_3d_fullres_unlabeled"
    names = _case_files(out)
    assert not any(n.startswith("garbage") for n in names)
    assert len([n for n in names if n.endswith(".pkl")]) == 4  # the good cases were written
    assert [p.name for p in (out / ".nnunet_ssl").iterdir()] == ["manifest.json"]
    (images / "garbage_0000.nii.gz").unlink()
    rerun = preprocess_unlabeled(990, ["3d_fullres"], num_processes=1, verbose=False)["3d_fullres"]
    assert rerun["processed"] == [] and len(rerun["up_to_date"]) == 4


def test_cascade_configuration_refused(planned_env):
    _, pp = _dirs(planned_env)
    plans = json.loads((pp / "nnUNetPlans.json").read_text())
    plans["configurations"]["3d_cascade_fullres"] = {"inherits_from": "3d_fullres", "previous_stage": "3d_lowres"}
    (pp / "CascadePlans.json").write_text(json.dumps(plans))
    with pytest.raises(SSLInputError, match="cascade"):
        preprocess_unlabeled(990, ["3d_cascade_fullres"], plans_identifier="CascadePlans", verbose=False)
    assert not (pp / "nnUNetPlans_3d_fullres_unlabeled").exists()


def test_unplanned_dataset_names_plan_command(planned_env):
    raw, _ = _dirs(planned_env)
    shutil.copytree(raw, raw.parent / "Dataset991_Unplanned")
    with pytest.raises(SSLInputError, match="nnUNetv2_plan_and_preprocess -d 991"):
        preprocess_unlabeled(991, ["3d_fullres"], verbose=False)


def test_missing_env_variable_named(monkeypatch):
    monkeypatch.delenv("nnUNet_raw", raising=False)
    monkeypatch.delenv("nnUNet_preprocessed", raising=False)
    with pytest.raises(SSLInputError, match="nnUNet_preprocessed"):
        datasets.resolve_dataset_name(990)


def test_check_collisions_names_each_kind():
    check_collisions(["a", "b"], ["c"], ["d"], ["e"])  # no clash, no error
    with pytest.raises(SSLInputError) as err:
        check_collisions(["a", "c", "d", "e"], ["c"], ["c", "d"], ["e"])
    message = str(err.value)
    assert "c (labeled, in splits_final.json)" in message and "d (in splits_final.json)" in message
    assert "e (test (imagesTs))" in message and "a " not in message


def test_failed_reprocessing_removes_the_stale_case(planned_env):
    """An image replaced by a damaged one: the error names it, and its old output is removed (and unrecorded), so
    no trainer keeps training on an image that no longer exists."""
    raw, pp = _dirs(planned_env)
    preprocess_unlabeled(990, ["3d_fullres"], num_processes=1, verbose=False)
    out = pp / "nnUNetPlans_3d_fullres_unlabeled"
    images = raw / RAW_UNLABELED_SUBFOLDER
    assert (out / "unl_000.b2nd").is_file()
    other = {k: v for k, v in _snapshot(out).items() if "unl_000" not in k and "manifest" not in k}
    _truncated_image(images)
    shutil.move(images / "unl_009_0000.nii.gz", images / "unl_000_0000.nii.gz")
    with pytest.raises(SSLInputError, match="unl_000_0000.nii.gz .*truncated"):
        preprocess_unlabeled(990, ["3d_fullres"], num_processes=1, verbose=False)
    assert not any(p.name.startswith("unl_000") for p in out.iterdir())
    assert "unl_000" not in json.loads((out / ".nnunet_ssl" / "manifest.json").read_text())["cases"]
    assert {k: v for k, v in _snapshot(out).items() if "manifest" not in k} == other


def test_nan_voxels_are_refused_with_the_case_named(planned_env, monkeypatch):
    """SimpleITK reads NaN in NIfTI files as 0, but other formats (.mha, .nrrd) keep it, and z-scoring then turns
    the whole image into NaN: the reader is made to return a few NaN voxels for one case."""
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    raw, pp = _dirs(planned_env)
    images = raw / RAW_UNLABELED_SUBFOLDER
    shutil.copy2(images / "unl_000_0000.nii.gz", images / "unl_009_0000.nii.gz")
    real = SimpleITKIO.read_images

    def with_nan(self, files):
        data, props = real(self, files)
        if "unl_009" in files[0]:
            data = data.copy()
            data[0, 0, 0, :3] = np.nan
        return data, props

    monkeypatch.setattr(SimpleITKIO, "read_images", with_nan)
    with pytest.raises(SSLInputError, match="'unl_009' .*NaN or infinite values"):
        preprocess_unlabeled(990, ["3d_fullres"], num_processes=1, verbose=False)
    out = pp / "nnUNetPlans_3d_fullres_unlabeled"
    assert (out / "unl_000.b2nd").is_file() and not (out / "unl_009.b2nd").exists()
