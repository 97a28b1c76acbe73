"""nnUNetv2_ssl_throughput: analytic compute per trainer, the table, a skipped trainer, the command end to end."""

from __future__ import annotations

import os
import re

import pytest
from helpers import case_ids, write_budget_splits

from nnunet_ssl import trainers
from nnunet_ssl.errors import SSLInputError
from nnunet_ssl.evaluation.throughput import run_throughput
from nnunet_ssl.evaluation.throughput_measure import TrainerTiming, count_flops, measure_trainer
from nnunet_ssl.evaluation.throughput_table import (
    REFERENCE_TRAINER,
    TABLE_COLUMNS,
    analytic_units,
    default_trainers,
    markdown_table,
    merge_rounds,
    table_rows,
    unlabeled_batch_of,
)

# hand counts for B = 2 labeled and U = 3 unlabeled samples; forward = 1, backward = 2 per sample
HAND_COUNTS = {
    # nnU-Net: forward + backward of the labeled batch
    "nnUNetTrainerSupervised": 3 * 2,
    # student forward + backward on 2 + 3, teacher forward on the 3 unlabeled
    "nnUNetTrainerMeanTeacher": 3 * 5 + 3,
    # ... and the teacher also on the 2 labeled images (MetaSSL's labeled branch)
    "nnUNetTrainerMeanTeacherMetaSSL": 3 * 5 + 3 + 2,
    # forward + backward on labeled + strong view, forward without gradient on the weak view
    "nnUNetTrainerFixMatch": 3 * 5 + 3,
    # MetaSSL's labeled reference is the student's own labeled output: no extra forward
    "nnUNetTrainerFixMatchMetaSSL": 3 * 5 + 3,
    # two networks, forward + backward each on 2 + 3; the cross pseudo-labels reuse these outputs
    "nnUNetTrainerCPS": 2 * 3 * 5,
    "nnUNetTrainerCPSMetaSSL": 2 * 3 * 5,
    # MEDL: two networks as CPS; the fusion reuses their outputs
    "nnUNetTrainerMEDL": 2 * 3 * 5,
    # Mean Teacher plus the quality predictor: forward on the teacher's pseudo-label (3) and on the student's
    # prediction, forward + backward with QAR (3 * 3) or forward only for the log (3)
    "nnUNetTrainerMeanTeacherQAR": 3 * 5 + 3 + 3 + 3 * 3,
    "nnUNetTrainerMeanTeacherQW": 3 * 5 + 3 + 3 + 3,
    "nnUNetTrainerMeanTeacherQualityGuided": 3 * 5 + 3 + 3 + 3 * 3,
    "nnUNetTrainerMeanTeacherQualityGuidedMetaSSL": 3 * 5 + 3 + 2 + 3 + 3 * 3,
}


@pytest.mark.parametrize("name", sorted(HAND_COUNTS))
def test_analytic_units_match_hand_counts(name):
    units, source = analytic_units(getattr(trainers, name), 2, 3)
    assert units == HAND_COUNTS[name]
    if name == REFERENCE_TRAINER:
        assert source == "nnU-Net step"
    else:
        # the count comes from the part of the composition that changes it: a quality plug-in, the two-network
        # host, or the base (one student pass plus one reference pass)
        owner = "QualityGuidance" if "Quality" in name or name.endswith(("QAR", "QW")) \
            else "TwoNetworks" if name.startswith(("nnUNetTrainerCPS", "nnUNetTrainerMEDL")) else "nnUNetTrainerSSL"
        assert source == f"declared by {owner}"


def test_unlabeled_batch_defaults_to_the_labeled_batch():
    assert unlabeled_batch_of(trainers.nnUNetTrainerSupervised, 2) is None
    assert unlabeled_batch_of(trainers.nnUNetTrainerMeanTeacher, 5) == 5

    class Larger(trainers.nnUNetTrainerMeanTeacher):
        unlabeled_batch_size = 4

    assert unlabeled_batch_of(Larger, 2) == 4
    assert analytic_units(Larger, 2, unlabeled_batch_of(Larger, 2))[0] == 3 * 6 + 4


def test_default_trainers_start_with_the_reference_and_cover_every_ssl_trainer():
    names = default_trainers()
    assert names[0] == REFERENCE_TRAINER
    assert set(HAND_COUNTS) <= set(names)


def _parse(markdown: str) -> list[dict[str, str]]:
    lines = [ln for ln in markdown.splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == TABLE_COLUMNS
    assert set(lines[1].replace("|", "")) == {"-"}
    return [dict(zip(header, (c.strip() for c in ln.strip("|").split("|")), strict=True)) for ln in lines[2:]]


def test_table_rows_ratios_and_skipped_row():
    results = [
        TrainerTiming(REFERENCE_TRAINER, step_seconds=[1.0, 2.0, 3.0], wait_seconds=[0.5, 0.5, 0.5],
                      peak_memory_mb=100.0, labeled_batch=2),
        TrainerTiming("nnUNetTrainerCPS", step_seconds=[4.0, 4.0, 10.0], wait_seconds=[0.0, 0.0, 1.8],
                      peak_memory_mb=250.0, labeled_batch=2, unlabeled_batch=2),
        TrainerTiming("nnUNetTrainerMeanTeacher", status="skipped", reason="no unlabeled data for X"),
    ]
    classes = {r.trainer: getattr(trainers, r.trainer) for r in results}
    rows = _parse(markdown_table(table_rows(results, classes, plans_batch=2)))
    assert [r["trainer"] for r in rows] == [f"`{r.trainer}`" for r in results]
    ref, cps, mt = rows
    assert (ref["s/it median"], ref["s/it mean"], ref["time × supervised"]) == ("2.000", "2.000", "1.00")
    assert ref["data wait"] == "25 %" and ref["compute units"] == "6" and ref["B / U"] == "2 / –"
    assert (cps["s/it median"], cps["s/it mean"], cps["time × supervised"]) == ("4.000", "6.000", "2.00")
    assert cps["data wait"] == "10 %" and cps["peak memory (MB)"] == "250"
    assert (cps["compute units"], cps["units × supervised"]) == ("24", "4.00")
    assert mt["s/it median"] == "–" and mt["notes"] == "skipped: no unlabeled data for X"
    # units of a skipped trainer still come from its class and the plans' batch
    assert (mt["compute units"], mt["units × supervised"], mt["B / U"]) == ("14", "2.33", "2 / 2")


def test_table_flops_columns_against_the_reference():
    results = [
        TrainerTiming(REFERENCE_TRAINER, step_seconds=[2.0], wait_seconds=[0.0], peak_memory_mb=1.0,
                      labeled_batch=2, step_flops=4e9),
        # 3x the time for 2.5x the FLOPs: 1.2x of its time is not network compute
        TrainerTiming("nnUNetTrainerCPS", step_seconds=[6.0], wait_seconds=[0.0], peak_memory_mb=1.0,
                      labeled_batch=2, unlabeled_batch=2, step_flops=10e9),
        TrainerTiming("nnUNetTrainerMeanTeacher", step_seconds=[5.0], wait_seconds=[0.0], peak_memory_mb=1.0,
                      labeled_batch=2, unlabeled_batch=2, flops_note="FLOPs not counted: RuntimeError"),
    ]
    classes = {r.trainer: getattr(trainers, r.trainer) for r in results}
    ref, cps, mt = _parse(markdown_table(table_rows(results, classes, plans_batch=2)))
    assert (ref["GFLOP / it"], ref["FLOPs × supervised"], ref["time ÷ FLOPs"]) == ("4", "1.00", "1.00")
    assert (cps["GFLOP / it"], cps["FLOPs × supervised"], cps["time ÷ FLOPs"]) == ("10", "2.50", "1.20")
    assert (mt["GFLOP / it"], mt["FLOPs × supervised"], mt["time ÷ FLOPs"]) == ("–", "–", "–")
    assert mt["notes"] == "FLOPs not counted: RuntimeError" and mt["time × supervised"] == "2.50"
    # without a counted reference the ratios are unknown, the count itself is still shown
    rows = _parse(markdown_table(table_rows(results[1:], classes, plans_batch=2)))
    assert (rows[0]["GFLOP / it"], rows[0]["FLOPs × supervised"], rows[0]["time ÷ FLOPs"]) == ("10", "n/a", "n/a")


def test_count_flops_matches_a_hand_count_with_backward():
    import torch

    first, second = torch.nn.Linear(4, 3, bias=False), torch.nn.Linear(3, 2, bias=False)
    x = torch.randn(5, 4)
    # forward 2*5*4*3 + 2*5*3*2 = 180; backward: the second layer's weight and input gradients (60 + 60) and the
    # first layer's weight gradient (120); x needs no gradient, so its input gradient is not computed
    assert count_flops(lambda: second(first(x)).sum().backward()) == 420
    with torch.no_grad():
        assert count_flops(lambda: second(first(x))) == 180


def test_merge_rounds_pools_iterations_and_keeps_refusals():
    a = TrainerTiming("T", step_seconds=[1.0], wait_seconds=[0.1], peak_memory_mb=10.0, start_memory_mb=5.0)
    b = TrainerTiming("T", step_seconds=[3.0], wait_seconds=[0.2], peak_memory_mb=30.0, start_memory_mb=6.0)
    b.step_flops = 7.0
    merged = merge_rounds([a, b])
    assert merged.step_seconds == [1.0, 3.0] and merged.wait_seconds == [0.1, 0.2]
    assert merged.step_flops == 7.0  # the round that counted them
    assert merged.peak_memory_mb == 30.0 and merged.start_memory_mb == 5.0
    skipped = TrainerTiming("T", status="skipped", reason="r")
    assert merge_rounds([a, skipped]).status == "skipped"


@pytest.mark.parametrize("kwargs, message", [({"iterations": 0}, "need --iterations >= 1"),
                                             ({"warmup": -1}, "need --iterations >= 1"),
                                             ({"rounds": 0}, "need --iterations >= 1"),
                                             ({"fold": "x"}, "fold 'x' is not a number or 'all'"),
                                             ({"at_fraction": 1.0}, r"--at 1.0 is not in \[0, 1\)")])
def test_run_throughput_refuses_bad_counts_and_folds_before_reading_anything(kwargs, message, monkeypatch):
    monkeypatch.delenv("nnUNet_preprocessed", raising=False)
    with pytest.raises(SSLInputError, match=message):
        run_throughput("990", "3d_fullres", **kwargs)


def test_run_throughput_refuses_a_folder_as_output_before_timing(synthetic_planned, monkeypatch, tmp_path):
    _env(monkeypatch, synthetic_planned["root"])
    with pytest.raises(SSLInputError, match="is a folder; give a file name"):
        run_throughput("990", "3d_fullres", trainers=[REFERENCE_TRAINER], device="cpu", output=str(tmp_path))
    assert list(tmp_path.iterdir()) == []


def _env(monkeypatch, root) -> None:
    monkeypatch.setenv("nnUNet_raw", str(root / "raw"))
    monkeypatch.setenv("nnUNet_preprocessed", str(root / "preprocessed"))
    monkeypatch.setenv("nnUNet_results", str(root / "results"))
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    monkeypatch.setenv("nnUNet_ssl_seed", "0")


def test_trainer_without_unlabeled_data_is_skipped_and_supervised_is_timed(copy_planned, monkeypatch, tmp_path):
    root, dataset = copy_planned["root"], copy_planned["dataset"]
    pp = root / "preprocessed" / dataset
    ids = case_ids(pp)
    write_budget_splits(pp, ids[:6], ids[6:], [])
    _env(monkeypatch, root)
    scratch = tmp_path / "scratch"
    skipped = measure_trainer("nnUNetTrainerMeanTeacher", dataset, "3d_fullres", "nnUNetPlans", 0, "cpu", 0, 1,
                              progress=False, scratch_results=str(scratch))
    assert skipped.status == "skipped" and skipped.reason.startswith("no unlabeled data")
    assert skipped.step_seconds == []
    timed = measure_trainer(REFERENCE_TRAINER, dataset, "3d_fullres", "nnUNetPlans", 0, "cpu", 0, 2,
                            progress=False, scratch_results=str(scratch))
    # nnU-Net's output files went to the scratch folder; the user's nnUNet_results is back and untouched
    assert os.environ["nnUNet_results"] == str(root / "results") and not any((root / "results").iterdir())
    assert (scratch / dataset / f"{REFERENCE_TRAINER}__nnUNetPlans__3d_fullres" / "fold_0" / "debug.json").is_file()
    assert timed.status == "ok" and len(timed.step_seconds) == 2
    assert all(0 <= w <= s for w, s in zip(timed.wait_seconds, timed.step_seconds, strict=True))
    assert timed.loaders == ["dataloader_train"] and timed.labeled_batch >= 1 and timed.unlabeled_batch is None
    assert timed.peak_memory_mb >= timed.start_memory_mb > 0
    assert timed.step_flops > 0 and timed.flops_note == ""


def test_steps_are_timed_and_counted_where_the_run_is_placed(copy_planned, monkeypatch, tmp_path):
    import math

    from nnunet_ssl.parts.copy_paste import number_of_pairs

    root, dataset = copy_planned["root"], copy_planned["dataset"]
    pp = root / "preprocessed" / dataset
    ids = case_ids(pp)
    write_budget_splits(pp, ids[:4], ids[4:6], ids[6:])
    _env(monkeypatch, root)
    scratch = str(tmp_path / "scratch")
    first, middle = (measure_trainer("nnUNetTrainerBCP", dataset, "3d_fullres", "nnUNetPlans", 0, "cpu", 0, 1,
                                     progress=False, scratch_results=scratch, at_fraction=f) for f in (0.0, 0.5))
    assert first.epoch == 0 and middle.epoch > 0
    b, u = middle.labeled_batch, middle.unlabeled_batch
    # epoch 0 is BCP's pre-training: one pass pair on ceil(B / 2) mixed images; the middle is self-training: the
    # 2n mixed images and the plain labeled batch with gradient, the teacher on U (BCP.compute_units' counts)
    stage0 = 3 * math.ceil(b / 2)
    stage1 = 3 * 2 * number_of_pairs(b, u) + 3 * b + u
    assert middle.step_flops / first.step_flops == pytest.approx(stage1 / stage0, rel=0.03)


@pytest.mark.slow
def test_command_writes_a_parsable_table(copy_planned, tmp_path):
    from conftest import nnunet_env, run_cli

    root = copy_planned["root"]
    pp = root / "preprocessed" / copy_planned["dataset"]
    ids = case_ids(pp)
    write_budget_splits(pp, ids[:4], ids[4:6], ids[6:])
    out = tmp_path / "docs" / "throughput.md"
    args = ["nnUNetv2_ssl_throughput", "-d", str(copy_planned["id"]), "-c", "3d_fullres", "-f", "0", "-tr",
            "nnUNetTrainerMeanTeacher", "--warmup", "1", "--iterations", "1", "-device", "cpu", "-o", str(out)]
    proc = run_cli(args, env=nnunet_env(root, training=True))
    doc = out.read_text()
    assert "nnUNetv2_ssl_throughput -d 990 -c 3d_fullres" in doc and "device: cpu" in doc
    rows = _parse(doc)
    assert [r["trainer"] for r in rows] == [f"`{REFERENCE_TRAINER}`", "`nnUNetTrainerMeanTeacher`"]
    for row in rows:
        assert float(row["s/it median"]) > 0 and float(row["s/it mean"]) > 0 and float(row["time × supervised"]) > 0
        assert float(row["peak memory (MB)"]) > 0
        assert 0 <= float(row["data wait"].rstrip(" %")) <= 100
        assert row["notes"] == ""
    assert rows[0]["time × supervised"] == "1.00" and rows[0]["units × supervised"] == "1.00"
    assert float(rows[1]["units × supervised"]) == pytest.approx(7 / 3, abs=0.01)  # (3 (B + B) + B) / 3 B
    # the counted FLOPs agree with the passes: the student on B + U and the teacher on U of the same network
    assert float(rows[1]["FLOPs × supervised"]) == pytest.approx(7 / 3, abs=0.05)
    assert rows[0]["FLOPs × supervised"] == "1.00" and float(rows[0]["GFLOP / it"]) > 0
    assert re.search(r"\| `nnUNetTrainerMeanTeacher` \|", proc.stdout)
    # nothing was written to the user's results folder
    assert not any((root / "results").iterdir())
