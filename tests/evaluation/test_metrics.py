"""Segmentation metrics in mm (``nnunet_ssl.evaluation.metrics``) and ``nnUNetv2_ssl_evaluate``.

Expected values are computed by hand on shapes whose boundary distances can be enumerated. Boundary voxels are the
foreground voxels with a face neighbour in the background; a 6×6×6 cube has 6³ − 4³ = 152 of them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli

from nnunet_ssl.errors import SSLInputError
from nnunet_ssl.evaluation.metrics import compute_case_metrics
from nnunet_ssl.evaluation.metrics_files import read_per_case_csv
from nnunet_ssl.evaluation.metrics_folders import evaluate_folders

N = 6  # cube side
CUBE_BOUNDARY = N**3 - (N - 2) ** 3  # 152


def cube(shift: int = 0, axis: int = 0, shape=(20, 18, 18), n: int = N, label: int = 1) -> np.ndarray:
    a = np.zeros(shape, np.uint8)
    lo = [3, 4, 4]
    lo[axis] += shift
    a[lo[0]:lo[0] + n, lo[1]:lo[1] + n, lo[2]:lo[2] + n] = label
    return a


# ---------------------------------------------------------------------------------------------- pure core


def test_cubes_offset_by_two_voxels():
    # cube B = cube A shifted by k = 2 voxels along axis 0; spacing 1 mm
    m = compute_case_metrics(cube(0), cube(2), (1.0, 1.0, 1.0), [1], nsd_tolerance_mm=1.0)[1]
    assert m["dice"] == pytest.approx((N - 2) / N)  # overlap 4·6·6 of 6·6·6 each
    assert m["iou"] == pytest.approx((N - 2) / (N + 2))  # 144 / 288
    # distances from A's boundary to B's (B's to A's is the mirror image):
    #   back face 36 voxels at 2; ring of 20 at axis-0 offset 1 at 1; front face interior 4×4: 12 at 1, 4 at 2
    #   (min of 2 and the in-plane distance to B's sides); all other boundary voxels lie on B's boundary: 0.
    assert m["hd95"] == pytest.approx(2.0)  # 40 of 152 distances are 2 (>5 %), the rest smaller
    assert m["asd"] == pytest.approx((36 * 2 + 20 + 12 + 4 * 2) / CUBE_BOUNDARY, rel=1e-6)  # 112 / 152
    assert m["nsd"] == pytest.approx((CUBE_BOUNDARY - 36 - 4) / CUBE_BOUNDARY, rel=1e-6)  # those at 2 fail τ=1


@pytest.mark.parametrize("axis, spacing, expected_hd", [
    (0, (2.0, 1.0, 1.0), 4.0),  # shift along the coarse axis: 2 voxels × 2 mm
    (2, (2.0, 1.0, 1.0), 2.0),  # same spacing, shift along a 1 mm axis
    (1, (1.0, 0.5, 3.0), 1.0),
    (2, (1.0, 0.5, 3.0), 6.0),
])
def test_anisotropic_spacing_scales_the_shift_axis(axis, spacing, expected_hd):
    m = compute_case_metrics(cube(0, axis), cube(2, axis), spacing, [1])[1]
    assert m["hd95"] == pytest.approx(expected_hd)
    assert m["dice"] == pytest.approx((N - 2) / N)  # overlap does not depend on the spacing


def test_anisotropic_asd_by_hand():
    # shift 2 along axis 0 with 2 mm there: back face 36 at 4 mm, ring 20 at 2 mm, front face 12 at 1 mm, 4 at 2 mm
    m = compute_case_metrics(cube(0), cube(2), (2.0, 1.0, 1.0), [1], nsd_tolerance_mm=1.0)[1]
    assert m["asd"] == pytest.approx((36 * 4 + 20 * 2 + 12 + 4 * 2) / CUBE_BOUNDARY, rel=1e-6)
    assert m["nsd"] == pytest.approx((CUBE_BOUNDARY - 36 - 20 - 4) / CUBE_BOUNDARY, rel=1e-6)


def test_thin_plates_every_distance_equals_the_shift_and_nsd_jumps_at_the_tolerance():
    # 1-voxel plates: every voxel is a boundary voxel, and its nearest voxel in the other plate is 2 × 1.5 mm away
    a = np.zeros((12, 10, 10), np.uint8)
    b = np.zeros_like(a)
    a[3, 2:8, 2:8] = 1
    b[5, 2:8, 2:8] = 1
    sp = (1.5, 1.0, 1.0)
    below = compute_case_metrics(a, b, sp, [1], nsd_tolerance_mm=2.9)[1]
    at = compute_case_metrics(a, b, sp, [1], nsd_tolerance_mm=3.0)[1]
    assert below["dice"] == 0.0 and below["iou"] == 0.0
    assert below["hd95"] == pytest.approx(3.0) and below["asd"] == pytest.approx(3.0)
    assert below["nsd"] == 0.0
    assert at["nsd"] == 1.0  # d ≤ τ counts


def test_nsd_below_and_above_the_shift_of_a_cube():
    small = compute_case_metrics(cube(0), cube(2), (1.0, 1.0, 1.0), [1], nsd_tolerance_mm=0.5)[1]
    large = compute_case_metrics(cube(0), cube(2), (1.0, 1.0, 1.0), [1], nsd_tolerance_mm=2.5)[1]
    # τ = 0.5: only the 152 − 36 − 20 − 16 = 80 boundary voxels lying on the other boundary count
    assert small["nsd"] == pytest.approx(80 / CUBE_BOUNDARY, rel=1e-6)
    assert large["nsd"] == pytest.approx(1.0)


def test_sphere_in_a_larger_sphere_hd_is_the_radius_difference_within_a_voxel():
    z, y, x = np.mgrid[:40, :40, :40]
    r = np.sqrt((z - 19.5) ** 2 + (y - 20) ** 2 + (x - 20.3) ** 2)
    sp = 0.5  # mm: radii 4 mm and 5 mm
    m = compute_case_metrics((r <= 8).astype(np.uint8), (r <= 10).astype(np.uint8), (sp, sp, sp), [1],
                             nsd_tolerance_mm=2.0)[1]
    assert abs(m["hd95"] - 1.0) <= sp
    assert abs(m["asd"] - 1.0) <= sp
    assert m["nsd"] == 1.0  # every distance ≤ 1 mm + a voxel < 2 mm
    assert m["dice"] == pytest.approx(2 * (r <= 8).sum() / ((r <= 8).sum() + (r <= 10).sum()))


def test_surface_metric_definitions_against_brute_force():
    """HD95 = max of the two directed 95th percentiles, ASD = mean over both boundaries' voxels pooled (not the
    mean of the two directed means), NSD = pooled fraction ≤ τ: checked by brute force on boundaries of
    different sizes and an anisotropic spacing."""
    from scipy.ndimage import binary_erosion
    from scipy.spatial.distance import cdist

    ref = np.zeros((14, 16, 16), bool)
    pred = np.zeros_like(ref)
    ref[3:9, 3:12, 4:10] = True
    pred[4:12, 5:11, 2:13] = True
    pred[4, 5, 2] = False
    sp = np.array([2.0, 0.7, 1.1])

    def boundary(m):
        return np.argwhere(m & ~binary_erosion(m)) * sp

    d = cdist(boundary(pred), boundary(ref))
    d_pr, d_rp = d.min(axis=1), d.min(axis=0)
    assert len(d_pr) != len(d_rp)  # the two definitions of ASD differ here
    tau = 1.5
    m = compute_case_metrics(ref.astype(np.uint8), pred.astype(np.uint8), sp, [1], nsd_tolerance_mm=tau)[1]
    assert m["hd95"] == pytest.approx(max(np.percentile(d_pr, 95), np.percentile(d_rp, 95)), rel=1e-5)
    pooled = np.concatenate([d_pr, d_rp])
    assert m["asd"] == pytest.approx(pooled.mean(), rel=1e-5)
    assert abs(pooled.mean() - (d_pr.mean() + d_rp.mean()) / 2) > 1e-3
    assert m["nsd"] == pytest.approx((pooled <= tau).mean(), rel=1e-6)


def test_empty_mask_conventions_and_absent_class():
    ref = cube(0)  # label 1 only
    pred = cube(0)
    pred[pred == 1] = 2  # predicts the cube as label 2
    out = compute_case_metrics(ref, pred, (1.0, 1.0, 1.0), [1, 2, 3])
    for lab in (1, 2):  # 1: prediction empty; 2: reference empty
        assert out[lab]["dice"] == 0.0 and out[lab]["iou"] == 0.0 and out[lab]["nsd"] == 0.0
        assert math.isnan(out[lab]["hd95"]) and math.isnan(out[lab]["asd"])
    assert out[3] == {"dice": 1.0, "iou": 1.0, "hd95": 0.0, "asd": 0.0, "nsd": 1.0}  # both empty


def test_2d_image_stored_with_a_singleton_axis_is_evaluated_in_2d():
    # nnU-Net's readers give 2D images as (1, y, x) with a dummy spacing of 999 on the first axis
    a = np.zeros((1, 16, 16), np.uint8)
    b = np.zeros_like(a)
    a[0, 4:10, 4:10] = 1
    b[0, 5:11, 4:10] = 1
    m = compute_case_metrics(a, b, (999.0, 0.5, 0.5), [1])[1]
    # 6×6 squares shifted by one 0.5 mm pixel: 20 boundary pixels each, 10 of them 0.5 mm away, 10 on the other
    assert m["dice"] == pytest.approx(5 / 6)
    assert m["hd95"] == pytest.approx(0.5)
    assert m["asd"] == pytest.approx(0.25)


# ---------------------------------------------------------------------------------------------- folders


def write_nifti(path: Path, arr: np.ndarray, spacing_zyx) -> None:
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(arr.astype(np.uint8))
    img.SetSpacing(tuple(float(s) for s in spacing_zyx[::-1]))  # SimpleITK spacing is x, y, z
    sitk.WriteImage(img, str(path))


SPACING = (2.0, 1.0, 1.0)  # z, y, x; 2 mm along the array's first axis


@pytest.fixture
def folders(tmp_path) -> dict:
    """case_a: label 1 shifted by 2 slices (4 mm); case_b: label 1 exact, label 2 missed by the prediction."""
    ref, pred = tmp_path / "ref", tmp_path / "pred"
    ref.mkdir()
    pred.mkdir()
    write_nifti(ref / "case_a.nii.gz", cube(0), SPACING)
    write_nifti(pred / "case_a.nii.gz", cube(2), SPACING)
    b_ref = cube(0, shape=(20, 18, 30))
    b_ref[2:6, 2:6, 20:26] = 2
    b_pred = cube(0, shape=(20, 18, 30))
    write_nifti(ref / "case_b.nii.gz", b_ref, SPACING)
    write_nifti(pred / "case_b.nii.gz", b_pred, SPACING)
    (pred / "dataset.json").write_text("{}")  # nnUNetv2_predict leaves such files beside the predictions
    return {"ref": ref, "pred": pred, "root": tmp_path}


def test_evaluate_folders_rows_summary_and_files(folders, tmp_path):
    out = tmp_path / "out"
    res = evaluate_folders(folders["ref"], folders["pred"], out)
    header = (out / "per_case.csv").read_text().splitlines()[0]
    assert header == "case,class_id,class_name,dice,iou,hd95_mm,asd_mm,nsd_1.0mm"
    rows = {(r["case"], r["class_id"]): r for r in res.rows}
    assert set(rows) == {("case_a", 1), ("case_a", 2), ("case_b", 1), ("case_b", 2)}
    a1 = rows[("case_a", 1)]
    assert a1["class_name"] == "label_1"
    assert a1["dice"] == pytest.approx(4 / 6)
    assert a1["hd95_mm"] == pytest.approx(4.0)  # spacing read from the file, in array axis order
    assert a1["asd_mm"] == pytest.approx((36 * 4 + 20 * 2 + 12 + 4 * 2) / CUBE_BOUNDARY, rel=1e-6)
    assert rows[("case_a", 2)]["dice"] == 1.0 and rows[("case_a", 2)]["hd95_mm"] == 0.0  # absent in both
    assert rows[("case_b", 1)]["dice"] == 1.0 and rows[("case_b", 1)]["hd95_mm"] == 0.0
    assert rows[("case_b", 2)]["dice"] == 0.0 and math.isnan(rows[("case_b", 2)]["hd95_mm"])  # missed

    # the CSV round-trips, NaN included
    back = read_per_case_csv(out / "per_case.csv")
    assert len(back) == 4
    for r, s in zip(res.rows, back):
        assert r.keys() == s.keys()
        for k in r:
            if isinstance(r[k], float) and math.isnan(r[k]):
                assert math.isnan(s[k])
            else:
                assert r[k] == s[k]

    summary = json.loads((out / "summary.json").read_text())
    assert summary == res.summary
    c1, c2 = summary["per_class"]["1"], summary["per_class"]["2"]
    assert c1["dice"]["mean"] == pytest.approx((4 / 6 + 1) / 2)
    assert c1["dice"]["median"] == pytest.approx((4 / 6 + 1) / 2)
    assert c1["dice"]["std"] == pytest.approx(np.std([4 / 6, 1.0], ddof=1))
    assert c1["hd95_mm"]["mean"] == pytest.approx(2.0) and c1["hd95_mm"]["n_nan"] == 0
    assert c2["hd95_mm"] == {"mean": 0.0, "std": None, "median": 0.0, "n": 1, "n_nan": 1}
    assert c2["dice"]["mean"] == pytest.approx(0.5) and c2["dice"]["n"] == 2
    fg = summary["foreground_mean"]
    # per case first: case_a (4/6 + 1)/2, case_b (1 + 0)/2
    assert fg["dice"]["mean"] == pytest.approx(((4 / 6 + 1) / 2 + 0.5) / 2)
    # hd95: case_a (4 + 0)/2 = 2, case_b: 0 (the NaN of label 2 is skipped)
    assert fg["hd95_mm"]["mean"] == pytest.approx(1.0) and fg["hd95_mm"]["n_nan"] == 0
    s = summary["settings"]
    assert s["unit"] == "mm" and s["nsd_tolerance"] == 1.0 and s["num_cases"] == 2
    assert "exactly one empty" in s["empty_convention"]
    assert s["reference_folder"] == str(folders["ref"].resolve())
    assert not [p.name for p in out.iterdir() if p.name not in ("per_case.csv", "summary.json")]  # no temp files


def test_dataset_json_names_voxel_units_and_case_ids(folders):
    dj = folders["root"] / "dataset.json"
    dj.write_text(json.dumps({"labels": {"background": 0, "hippo": 1, "tail": 2, "never": 3},
                              "file_ending": ".nii.gz"}))
    res = evaluate_folders(folders["ref"], folders["pred"], None, dataset_json=dj, nsd_tolerance_mm=2.0,
                           voxel_units=True, case_ids=["case_a"])
    assert [(r["case"], r["class_id"], r["class_name"]) for r in res.rows] == [
        ("case_a", 1, "hippo"), ("case_a", 2, "tail"), ("case_a", 3, "never")]
    a1 = res.rows[0]
    assert set(a1) == {"case", "class_id", "class_name", "dice", "iou", "hd95_vox", "asd_vox", "nsd_2.0vox"}
    assert a1["hd95_vox"] == pytest.approx(2.0)  # 2 voxels, whatever the spacing
    assert a1["nsd_2.0vox"] == pytest.approx(1.0)
    assert res.rows[2]["dice"] == 1.0  # a class absent from reference and prediction
    assert res.summary["settings"]["unit"] == "vox" and res.summary["num_cases"] == 1


def test_prediction_labels_the_dataset_does_not_define_are_warned_about(folders, capsys):
    dj = folders["root"] / "dataset.json"
    dj.write_text(json.dumps({"labels": {"background": 0, "hippo": 1, "tail": 2}, "file_ending": ".nii.gz"}))
    pred = cube(2)
    pred[0, 0, :2] = 7
    write_nifti(folders["pred"] / "case_a.nii.gz", pred, SPACING)
    res = evaluate_folders(folders["ref"], folders["pred"], None, dataset_json=dj)
    err = [ln for ln in capsys.readouterr().err.splitlines() if "nnunet-ssl" in ln]  # beside the progress bar
    assert len(err) == 1 and "warning" in err[0] and "[7]" in err[0] and "case_a" in err[0]
    assert res.summary["settings"]["labels_only_in_predictions"] == [7] and res.summary["num_cases"] == 2
    assert {r["class_id"] for r in res.rows} == {1, 2}

    with pytest.raises(SSLInputError, match="no reference"):
        evaluate_folders(folders["ref"], folders["pred"], case_ids=["case_zz"])


def test_input_errors(folders, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SSLInputError, match="no label images"):
        evaluate_folders(empty, folders["pred"])
    with pytest.raises(SSLInputError, match="no .nii.gz files in prediction folder"):
        evaluate_folders(folders["ref"], empty)
    other = tmp_path / "other"
    other.mkdir()
    write_nifti(other / "case_a.nii.gz", cube(0), (1.0, 1.0, 1.0))
    with pytest.raises(SSLInputError, match="spacing"):
        evaluate_folders(folders["ref"], other, case_ids=["case_a"])
    write_nifti(other / "case_a.nii.gz", cube(0, shape=(20, 18, 17)), SPACING)
    with pytest.raises(SSLInputError, match="shape"):
        evaluate_folders(folders["ref"], other, case_ids=["case_a"])


@pytest.mark.slow
def test_cli_end_to_end(folders, tmp_path):
    out = tmp_path / "cli_out"
    proc = run_cli(["nnUNetv2_ssl_evaluate", str(folders["ref"]), str(folders["pred"]), "-o", str(out),
                    "--nsd-tolerance", "0.5"], timeout=300)
    assert "foreground mean" in proc.stdout
    lines = (out / "per_case.csv").read_text().splitlines()
    assert lines[0] == "case,class_id,class_name,dice,iou,hd95_mm,asd_mm,nsd_0.5mm"
    assert len(lines) == 5
    summary = json.loads((out / "summary.json").read_text())
    assert summary["per_class"]["1"]["hd95_mm"]["mean"] == pytest.approx(2.0)
    assert summary["per_class"]["2"]["asd_mm"]["n_nan"] == 1
    assert summary["settings"]["metric_columns"][-1] == "nsd_0.5mm"


def test_cli_missing_prediction_is_one_line_exit_2(folders, tmp_path):
    (folders["pred"] / "case_b.nii.gz").unlink()
    proc = run_cli(["nnUNetv2_ssl_evaluate", str(folders["ref"]), str(folders["pred"]), "-o",
                    str(tmp_path / "o")], check=False, timeout=300)
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1, proc.stderr
    assert err[0].startswith("nnunet-ssl: error: 1 of 2 reference cases have no prediction")
    assert "case_b" in err[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()
