"""nnUNetv2_ssl_cpu_plans and nnUNetv2_ssl_benchmark: plans variant, leakage refusal, report statistics, and a
tiny end-to-end benchmark on the synthetic dataset that resumes without retraining."""

from __future__ import annotations

import csv
import json
import math
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from conftest import nnunet_env, run_cli

from nnunet_ssl.cli import benchmark as benchmark_cli
from nnunet_ssl.cli import cpu_plans as cpu_plans_cli
from nnunet_ssl.evaluation import benchmark_layout as layout
from nnunet_ssl.evaluation import benchmark_records, report, report_plots
from nnunet_ssl.evaluation.benchmark import check_trainers


def _use(root: Path, monkeypatch) -> None:
    for k, sub in (("nnUNet_raw", "raw"), ("nnUNet_preprocessed", "preprocessed"), ("nnUNet_results", "results")):
        monkeypatch.setenv(k, str(root / sub))


# ---------------------------------------------------------------------------------------------------------------
# CPU plans


def test_cpu_plans_shrink_batch_and_features_and_keep_the_data(copy_planned, monkeypatch, capsys):
    root, ds = copy_planned["root"], copy_planned["dataset"]
    _use(root, monkeypatch)
    pp = root / "preprocessed" / ds
    source = json.loads((pp / "nnUNetPlans.json").read_text())
    assert cpu_plans_cli.main(["-d", "990"]) == 0
    cpu = json.loads((pp / "nnUNetPlans_CPU.json").read_text())
    assert cpu["plans_name"] == "nnUNetPlans_CPU"
    src_cfg, cfg = source["configurations"]["3d_fullres"], cpu["configurations"]["3d_fullres"]
    n = len(src_cfg["architecture"]["arch_kwargs"]["features_per_stage"])
    assert cfg["architecture"]["arch_kwargs"]["features_per_stage"] == [min(16 * 2**i, 128) for i in range(n)]
    assert cfg["batch_size"] == 2
    for key in ("patch_size", "data_identifier", "spacing"):
        assert cfg[key] == src_cfg[key]
    assert cfg["architecture"]["arch_kwargs"]["strides"] == src_cfg["architecture"]["arch_kwargs"]["strides"]

    # nnU-Net builds the narrower network from it
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    cm = PlansManager(cpu).get_configuration("3d_fullres")
    net = get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                 cm.network_arch_init_kwargs_req_import, 1, 3, deep_supervision=False)
    assert net.encoder.stages[0][0].convs[0].conv.out_channels == 16

    # rerun: no change; other settings: refused without --overwrite, file kept
    before = (pp / "nnUNetPlans_CPU.json").read_bytes()
    assert cpu_plans_cli.main(["-d", "990"]) == 0
    assert cpu_plans_cli.main(["-d", "990", "--batch-size", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--overwrite" in err[0]
    assert (pp / "nnUNetPlans_CPU.json").read_bytes() == before
    assert cpu_plans_cli.main(["-d", "990", "--batch-size", "3", "--overwrite"]) == 0
    assert json.loads((pp / "nnUNetPlans_CPU.json").read_text())["configurations"]["3d_fullres"]["batch_size"] == 3
    assert cpu_plans_cli.main(["-d", "990", "--name", "nnUNetPlans"]) == 2


# ---------------------------------------------------------------------------------------------------------------
# leakage refusal


def _bench_args(out: Path, *extra: str) -> list[str]:
    return ["-d", "990", "-c", "3d_fullres", "-o", str(out), "--budgets", "2", "--seeds", "0", "--epochs", "1",
            "--iterations-per-epoch", "2", "--val-iterations", "1", "-device", "cpu", *extra]


@pytest.mark.parametrize("leak", ["copy_in_imagesTr", "recompressed_in_imagesTr", "id_in_imagesUnlabeled",
                                  "id_in_splits"])
def test_benchmark_refuses_test_cases_in_training_data(leak, copy_planned, monkeypatch, capsys, tmp_path):
    root, ds = copy_planned["root"], copy_planned["dataset"]
    _use(root, monkeypatch)
    raw = root / "raw" / ds
    if leak == "copy_in_imagesTr":
        shutil.copy(raw / "imagesTs" / "test_001_0000.nii.gz", raw / "imagesTr" / "renamed_900_0000.nii.gz")
        expected = "byte-identical"
    elif leak == "recompressed_in_imagesTr":
        import gzip

        test = (raw / "imagesTs" / "test_001_0000.nii.gz").read_bytes()
        copy = gzip.compress(gzip.decompress(test), compresslevel=1, mtime=12345)
        assert copy != test
        (raw / "imagesTr" / "renamed_900_0000.nii.gz").write_bytes(copy)
        expected = "same voxels"
    elif leak == "id_in_imagesUnlabeled":
        shutil.copy(raw / "imagesTr" / "case_000_0000.nii.gz", raw / "imagesUnlabeled" / "test_000_0000.nii.gz")
        expected = "imagesUnlabeled"
    else:
        pp = root / "preprocessed" / ds
        splits = json.loads((pp / "splits_final.json").read_text()) if (pp / "splits_final.json").is_file() else None
        if splits is None:
            from nnunet_ssl.data.splits import original_splits

            splits, _ = original_splits(str(pp), str(raw))
        splits[0]["val"].append("test_000")
        (pp / "splits_final.json").write_text(json.dumps(splits))
        expected = "validation"
    out = tmp_path / "bench"
    assert benchmark_cli.main(_bench_args(out)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "refusing to benchmark" in err[0] and expected in err[0], err
    assert not (out / "runs").exists()


def test_budget_larger_than_the_fold_is_refused_even_in_a_dry_run(copy_planned, monkeypatch, capsys, tmp_path):
    _use(copy_planned["root"], monkeypatch)
    out = tmp_path / "bench"
    args = _bench_args(out, "--dry-run")
    args[args.index("--budgets") + 1] = "40"
    assert benchmark_cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--budgets 40 exceed the" in err[0] and "fold 0" in err[0], err
    assert not out.exists()


@pytest.mark.parametrize("where", ["work_folder", "records"])
def test_benchmark_refuses_a_folder_of_other_settings(where, copy_planned, monkeypatch, capsys, tmp_path):
    _use(copy_planned["root"], monkeypatch)
    made = tmp_path / where
    made.mkdir()
    other = layout.BenchmarkSettings("Dataset990_SSLSynthetic", "3d_fullres", 0, "nnUNetPlans", [], [2], [0],
                                        False, 5, 2, 1, ["test_000", "test_001"])
    (made / layout.SETTINGS_FILE).write_text(json.dumps(asdict(other)))
    out = made if where == "work_folder" else tmp_path / "bench"
    extra = ["--dry-run"] if where == "work_folder" else ["--records", str(made)]
    assert benchmark_cli.main(_bench_args(out, *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "other settings" in err[0] and "epochs" in err[0], err
    assert not (out / "runs").exists()
    if where == "records":  # refused before the work folder is made
        assert not out.exists()
        assert benchmark_cli.main(_bench_args(made, "--records", str(made))) == 2
        assert "another folder" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# report statistics on hand-made results


def _fake_run(out: Path, s: layout.BenchmarkSettings, trainer: str, budget: str, seed: int,
              dice: dict[str, tuple[float, float]]) -> None:
    folder = layout.Paths(out, layout.Run(trainer, budget, seed), s).evaluation
    folder.mkdir(parents=True)
    with open(folder / "per_case.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["case", "class_id", "class_name", "dice", "iou", "hd95_mm", "asd_mm", "nsd_1.0mm"])
        for case, (d1, d2) in dice.items():
            w.writerow([case, 1, "a", d1, 0, 2.0, 1.0, 0.5])
            w.writerow([case, 2, "b", d2, 0, "nan", 1.0, 0.7])
    (folder / "summary.json").write_text("{}")


def test_report_pairs_cases_over_seeds_against_the_baseline(tmp_path):
    s = layout.BenchmarkSettings("Dataset990_SSLSynthetic", "3d_fullres", 0, "nnUNetPlans",
                                    ["nnUNetTrainerMeanTeacher"], [2], [0, 1], False, 1, 2, 1, ["c1", "c2", "c3"])
    out = tmp_path / "bench"
    out.mkdir()
    (out / layout.SETTINGS_FILE).write_text(json.dumps(asdict(s)))
    base = {"c1": (0.8, 0.6), "c2": (0.5, 0.5), "c3": (0.9, 0.7)}
    mt0 = {"c1": (0.9, 0.7), "c2": (0.5, 0.5), "c3": (0.8, 0.6)}
    mt1 = {"c1": (0.9, 0.9), "c2": (0.6, 0.6), "c3": (0.9, 0.7)}
    _fake_run(out, s, "nnUNetTrainerSupervised", "2", 0, base)
    _fake_run(out, s, "nnUNetTrainerSupervised", "2", 1, base)
    _fake_run(out, s, "nnUNetTrainerMeanTeacher", "2", 0, mt0)
    _fake_run(out, s, "nnUNetTrainerMeanTeacher", "2", 1, mt1)
    report.write_report(out)

    # case means: base c1 .7 c2 .5 c3 .8; mt seed0 .8 .5 .7; seed1 .9 .6 .8 -> per-case diffs averaged over seeds:
    # c1 (.1+.2)/2=.15, c2 (0+.1)/2=.05, c3 (-.1+0)/2=-.05
    rows = {r["metric"]: r for r in csv.DictReader(open(out / "paired.csv"))}
    assert sorted(rows) == ["dice", "dice:a", "dice:b"]
    # per class, the same pairing: class a .1 .05 -.05, class b (.1+.3)/2 .05 -.05
    assert float(rows["dice:a"]["mean_diff"]) == pytest.approx(0.1 / 3)
    assert float(rows["dice:b"]["mean_diff"]) == pytest.approx(0.2 / 3)
    assert [float(x) for x in rows["dice:b"]["mean_diff_per_seed"].split()] == pytest.approx([0.0, 0.4 / 3], abs=1e-6)
    p = rows["dice"]
    assert p["trainer"] == "nnUNetTrainerMeanTeacher" and p["seeds"] == "0 1" and int(p["n_cases"]) == 3
    assert float(p["mean_diff"]) == pytest.approx((0.15 + 0.05 - 0.05) / 3)
    # seed 0: (.1 + 0 - .1) / 3 = 0; seed 1: (.2 + .1 + 0) / 3 = .1
    assert [float(x) for x in p["mean_diff_per_seed"].split()] == pytest.approx([0.0, 0.1])
    assert (int(p["better"]), int(p["worse"])) == (2, 1)
    from scipy.stats import wilcoxon

    assert float(p["wilcoxon_p"]) == pytest.approx(wilcoxon([0.15, 0.05, -0.05]).pvalue)
    # each seed's own test on its per-case differences (seed 1: .2 .1 0)
    seed_p = [wilcoxon([np.mean(mt[c]) - np.mean(base[c]) for c in base]).pvalue for mt in (mt0, mt1)]
    assert [float(x) for x in p["wilcoxon_p_per_seed"].split()] == pytest.approx(seed_p, rel=1e-5)
    results = {(r["trainer"], r["seed"]): r for r in csv.DictReader(open(out / "results.csv"))}
    assert float(results[("nnUNetTrainerMeanTeacher", "1")]["dice"]) == pytest.approx((0.9 + 0.6 + 0.8) / 3)
    assert float(results[("nnUNetTrainerSupervised", "0")]["hd95"]) == pytest.approx(2.0)  # NaN class skipped
    assert float(results[("nnUNetTrainerMeanTeacher", "1")]["dice_b"]) == pytest.approx((0.9 + 0.6 + 0.7) / 3)
    text = (out / "report.md").read_text()
    assert "## Test Dice per class" in text and "| 2 labeled · a | 2 labeled · b |" in text
    assert f"| nnUNetTrainerMeanTeacher | 2 | b | 2 | 3 | {0.2 / 3:+.4f} |" in text
    mt_mean = np.mean([(0.8 + 0.5 + 0.7) / 3, (0.9 + 0.6 + 0.8) / 3])
    assert f"{mt_mean:.4f} ± " in text
    assert f"| s0 +0.0000 (p {seed_p[0]:.2g}), s1 +0.1000 (p {seed_p[1]:.2g}) |" in text
    assert (out / "dice_vs_budget.png").stat().st_size > 0 and (out / "training_curves.png").stat().st_size > 0


def test_report_explains_the_training_noise_control(tmp_path):
    s = layout.BenchmarkSettings("Dataset990_SSLSynthetic", "3d_fullres", 0, "nnUNetPlans",
                                    [layout.RESEEDED], [2], [0], False, 1, 2, 1, ["c1", "c2"])
    out = tmp_path / "bench"
    out.mkdir()
    (out / layout.SETTINGS_FILE).write_text(json.dumps(asdict(s)))
    _fake_run(out, s, layout.BASELINE, "2", 0, {"c1": (0.8, 0.6), "c2": (0.5, 0.5)})
    _fake_run(out, s, layout.RESEEDED, "2", 0, {"c1": (0.7, 0.6), "c2": (0.5, 0.7)})
    report.write_report(out)
    (row,) = [r for r in csv.DictReader(open(out / "paired.csv")) if r["metric"] == "dice"]
    # case means: baseline .7 .5, reseeded .65 .6 -> differences -.05 and +.1
    assert row["trainer"] == layout.RESEEDED and float(row["mean_diff"]) == pytest.approx(0.025)
    assert "training randomness alone" in (out / "report.md").read_text()

    # SSL trainers are judged against the control's largest |difference per seed| at their budget
    s.trainers = ["nnUNetTrainerMeanTeacher", "nnUNetTrainerFixMatch", layout.RESEEDED]
    s.seeds = [0, 1]
    (out / layout.SETTINGS_FILE).write_text(json.dumps(asdict(s)))
    _fake_run(out, s, layout.BASELINE, "2", 1, {"c1": (0.8, 0.6), "c2": (0.5, 0.5)})
    _fake_run(out, s, layout.RESEEDED, "2", 1, {"c1": (0.6, 0.6), "c2": (0.5, 0.5)})  # -.1 and 0: -.05
    _fake_run(out, s, "nnUNetTrainerMeanTeacher", "2", 0, {"c1": (0.8, 0.6), "c2": (0.5, 0.6)})  # +.025
    _fake_run(out, s, "nnUNetTrainerFixMatch", "2", 0, {"c1": (0.9, 0.7), "c2": (0.6, 0.6)})  # +.1 and +.1
    report.write_report(out)
    every = list(csv.DictReader(open(out / "paired.csv")))
    rows = {r["trainer"]: r for r in every if r["metric"] == "dice"}
    # per class, the floor is the control's on that class, not the mean's .05: a .1 (seed 1: -.2 and 0), b .1
    # (seed 0: 0 and +.2); FixMatch's +.1 on each class is not beyond it
    by_class = {(r["trainer"], r["metric"]): r for r in every}
    for trainer, klass, diff in (("nnUNetTrainerFixMatch", "a", 0.1), ("nnUNetTrainerFixMatch", "b", 0.1),
                                 ("nnUNetTrainerMeanTeacher", "b", 0.05)):
        r = by_class[(trainer, "dice:" + klass)]
        assert float(r["mean_diff"]) == pytest.approx(diff)
        assert float(r["noise_floor"]) == pytest.approx(0.1) and r["beyond_noise"] == "False"
    assert float(rows[layout.RESEEDED]["mean_diff"]) == pytest.approx((0.025 - 0.05) / 2)
    for trainer, beyond in (("nnUNetTrainerMeanTeacher", "False"), ("nnUNetTrainerFixMatch", "True")):
        assert float(rows[trainer]["noise_floor"]) == pytest.approx(0.05) and rows[trainer]["beyond_noise"] == beyond
    assert rows[layout.RESEEDED]["noise_floor"] == "nan"
    text = (out / "report.md").read_text()
    assert "| 0.0500: within |" in text and "| 0.0500: beyond |" in text
    # the trainer exists, trains, and only its training seed differs from the baseline's
    from nnunet_ssl import trainers

    check_trainers([layout.RESEEDED])
    cls = getattr(trainers, layout.RESEEDED)
    assert issubclass(cls, trainers.nnUNetTrainerSupervised) and cls.training_seed_offset == 1000


def test_report_pairs_each_composite_with_its_host(tmp_path):
    trainers = ["nnUNetTrainerFixMatch", "nnUNetTrainerFixMatchMetaSSL", "nnUNetTrainerMeanTeacherMetaSSL",
                "nnUNetTrainerMeanTeacherQualityGuidedMetaSSL", "nnUNetTrainerMEDL", layout.RESEEDED]
    # hosts come from the classes' inheritance, limited to what the matrix runs
    assert report.host_of("nnUNetTrainerFixMatchMetaSSL", trainers) == "nnUNetTrainerFixMatch"
    assert report.host_of("nnUNetTrainerMeanTeacherQualityGuidedMetaSSL", trainers) == \
        "nnUNetTrainerMeanTeacherMetaSSL"
    assert report.host_of("nnUNetTrainerMeanTeacherMetaSSL", trainers) is None  # its host is not in the matrix
    assert report.host_of("nnUNetTrainerMeanTeacherMetaSSL", ["nnUNetTrainerMeanTeacher"]) == \
        "nnUNetTrainerMeanTeacher"
    for alone in ("nnUNetTrainerMEDL", layout.RESEEDED, "nnUNetTrainerNotOurs"):
        assert report.host_of(alone, trainers + [layout.BASELINE]) is None

    s = layout.BenchmarkSettings("Dataset990_SSLSynthetic", "3d_fullres", 0, "nnUNetPlans", trainers[:2], [2],
                                    [0, 1], False, 1, 2, 1, ["c1", "c2"])
    out = tmp_path / "bench"
    out.mkdir()
    (out / layout.SETTINGS_FILE).write_text(json.dumps(asdict(s)))
    for seed in (0, 1):
        _fake_run(out, s, layout.BASELINE, "2", seed, {"c1": (0.8, 0.6), "c2": (0.5, 0.5)})
    _fake_run(out, s, "nnUNetTrainerFixMatch", "2", 0, {"c1": (0.8, 0.8), "c2": (0.6, 0.6)})  # .8 .6
    _fake_run(out, s, "nnUNetTrainerFixMatch", "2", 1, {"c1": (0.8, 0.6), "c2": (0.6, 0.6)})  # .7 .6
    _fake_run(out, s, "nnUNetTrainerFixMatchMetaSSL", "2", 0, {"c1": (0.9, 0.9), "c2": (0.6, 0.6)})  # .9 .6
    report.write_report(out)
    rows = {(r["trainer"], r["reference"]): r for r in csv.DictReader(open(out / "paired.csv"))
            if r["metric"] == "dice"}
    assert set(rows) == {("nnUNetTrainerFixMatch", layout.BASELINE),
                         ("nnUNetTrainerFixMatchMetaSSL", layout.BASELINE),
                         ("nnUNetTrainerFixMatchMetaSSL", "nnUNetTrainerFixMatch")}
    # against the host only seed 0 is shared: differences +.1 and 0
    host = rows[("nnUNetTrainerFixMatchMetaSSL", "nnUNetTrainerFixMatch")]
    assert host["seeds"] == "0" and float(host["mean_diff"]) == pytest.approx(0.05)
    assert (int(host["better"]), int(host["worse"])) == (1, 0)
    # against the baseline: .9 - .7 and .6 - .5
    assert float(rows[("nnUNetTrainerFixMatchMetaSSL", layout.BASELINE)]["mean_diff"]) == pytest.approx(0.15)
    text = (out / "report.md").read_text()
    assert "## Paired per-case difference of each composite to its host" in text
    assert "| nnUNetTrainerFixMatchMetaSSL − nnUNetTrainerFixMatch | 2 | 1 | 2 | +0.0500 |" in text


@pytest.mark.parametrize("n", [3, 13, 24])
def test_plot_colours_are_distinct_for_every_trainer(n):
    # matplotlib's C0..C9 repeat after ten trainers, which drew the eleventh in the baseline's colour
    import matplotlib

    names = [f"nnUNetTrainer{i}" for i in range(n)]
    colours = report_plots.trainer_colors(names)
    assert list(colours) == names
    assert len(set(colours.values())) == n
    if 10 < n <= 20:
        # tab20's ten strong colours first: the second trainer is strong orange, not the baseline's light twin
        assert colours[names[1]] == matplotlib.colormaps["tab20"](2)
        assert colours[names[10]] == matplotlib.colormaps["tab20"](1)


# ---------------------------------------------------------------------------------------------------------------
# records


def test_records_carry_finished_runs_to_a_new_work_folder(tmp_path):
    import torch

    s = layout.BenchmarkSettings("Dataset990_SSLSynthetic", "3d_fullres", 0, "nnUNetPlans",
                                    ["nnUNetTrainerMeanTeacher"], [2], [0], False, 1, 2, 1, ["c1", "c2"])
    out, records, fresh = tmp_path / "bench", tmp_path / "records", tmp_path / "new_machine"
    for folder in (out, records, fresh):
        folder.mkdir()
        (folder / layout.SETTINGS_FILE).write_text(json.dumps(asdict(s)))
    _fake_run(out, s, layout.BASELINE, "2", 0, {"c1": (0.8, 0.6), "c2": (0.5, 0.5)})
    _fake_run(out, s, "nnUNetTrainerMeanTeacher", "2", 0, {"c1": (0.9, 0.6), "c2": (0.5, 0.7)})
    # a run finished before logs were kept with the evaluation: its log comes from the checkpoint, numpy and NaN
    # included
    mt = layout.Paths(out, layout.Run("nnUNetTrainerMeanTeacher", "2", 0), s)
    mt.model.mkdir(parents=True)
    torch.save({"logging": {"train_losses": [np.float64(-0.5), np.float32(-0.25)],
                            "mean_fg_dice": [0.1, float("nan")]}}, mt.model / "checkpoint_final.pth")
    stage = {"stage": "train", "device": "cpu", "cpu": "Test CPU", "torch": "9.9", "nnunetv2": "2.8.1"}
    (mt.evaluation / layout.PROVENANCE).write_text(json.dumps({"training": [stage, {**stage, "stage": "resume"}],
                                                                  "evaluation": stage}))
    runs = layout.run_matrix(s)
    # an unfinished run (no summary.json) is neither exported nor restored
    unfinished = layout.Paths(out, layout.Run("nnUNetTrainerMeanTeacher", "2", 1), s).evaluation
    unfinished.mkdir(parents=True)
    assert benchmark_records.sync_records(out, records, s, runs) == (0, 2)
    assert benchmark_records.sync_records(out, records, s, runs) == (0, 0)
    kept = benchmark_records.record_folder(records, runs[1], s)
    assert sorted(p.name for p in kept.iterdir()) == sorted(layout.RECORD_FILES)
    assert sorted(p.name for p in benchmark_records.record_folder(records, runs[0], s).iterdir()) == \
        sorted(set(layout.RECORD_FILES) - {layout.TRAINING_LOG, layout.PROVENANCE})
    assert json.loads((kept / layout.TRAINING_LOG).read_text()) == {"train_losses": [-0.5, -0.25],
                                                                        "mean_fg_dice": [0.1, None]}

    assert benchmark_records.sync_records(fresh, records, s, runs) == (2, 0)
    assert all(layout.Paths(fresh, r, s).done for r in runs)
    for folder in (out, records, fresh):
        report.write_report(folder)
    assert (fresh / "paired.csv").read_text() == (out / "paired.csv").read_text()
    (row,) = [r for r in csv.DictReader(open(records / "paired.csv")) if r["metric"] == "dice"]
    # case means: baseline .7 .5, Mean Teacher .75 .6 -> differences .05 and .1
    assert float(row["mean_diff"]) == pytest.approx(0.075)
    # one run trained (and resumed) on the same machine, one without provenance
    text = (fresh / "report.md").read_text()
    assert "| cpu: Test CPU | 9.9 | 2.8.1 | 1 |" in text and "| not recorded | ? | ? | 1 |" in text
    # a records folder's report is rewritten with no other option; a run needs the schedule
    (records / "report.md").unlink()
    assert benchmark_cli.main(["-o", str(records), "--report-only"]) == 0
    assert (records / "report.md").read_text() == (fresh / "report.md").read_text()
    with pytest.raises(SystemExit) as e:
        benchmark_cli.main(["-o", str(records), "-d", "990", "--budgets", "2"])
    assert e.value.code == 2
    # the curves come from the kept log when the checkpoint is gone
    assert report_plots.training_log(layout.Paths(fresh, runs[1], s))["train_losses"] == [-0.5, -0.25]


# ---------------------------------------------------------------------------------------------------------------
# end to end


@pytest.mark.slow
def test_tiny_benchmark_runs_reports_and_resumes(copy_planned, tmp_path):
    root, ds = copy_planned["root"], copy_planned["dataset"]
    env = nnunet_env(root, training=True)
    out = tmp_path / "bench"
    records = tmp_path / "records"
    args = ["nnUNetv2_ssl_benchmark", *_bench_args(out, "-tr", "nnUNetTrainerMeanTeacher", "--full", "--records",
                                                   str(records))]
    first = run_cli(args, env=env)
    assert "3 runs (0 done, 3 to do)" in first.stdout
    for budget, trainer in (("labeled_2", "nnUNetTrainerSupervised"), ("labeled_2", "nnUNetTrainerMeanTeacher"),
                            ("all", "nnUNetTrainerSupervised")):
        ws = out / "runs" / budget / "seed_0"
        assert (ws / "test_evaluation" / trainer / "summary.json").is_file()
        assert sorted(p.name for p in (ws / "test_predictions" / trainer).glob("*.nii.gz")) == \
            ["test_000.nii.gz", "test_001.nii.gz"]
        splits = json.loads((ws / "nnUNet_preprocessed" / ds / "splits_final.json").read_text())
        assert len(splits[0]["train"]) == (2 if budget == "labeled_2" else 6)
    # the user's own preprocessed folder got no budget split
    user_splits = root / "preprocessed" / ds / "splits_final.json"
    assert not user_splits.exists() or "ssl_budget" not in user_splits.read_text()
    text = (out / "report.md").read_text()
    assert "nnUNetTrainerMeanTeacher" in text and "Wilcoxon" in text
    assert len(list(csv.DictReader(open(out / "results.csv")))) == 3
    # every run is recorded with its per-epoch training log, and the records have the same report
    mt = Path("runs", "labeled_2", "seed_0", "test_evaluation", "nnUNetTrainerMeanTeacher")
    log = json.loads((out / mt / layout.TRAINING_LOG).read_text())
    assert len(log["train_losses"]) == 1 and len(log["mean_fg_dice"]) == 1
    import torch

    made = json.loads((out / mt / layout.PROVENANCE).read_text())
    assert [e["stage"] for e in made["training"]] == ["train"] and made["evaluation"]["device"] == "cpu"
    assert made["training"][0]["torch"] == torch.__version__ and made["training"][0]["cpu_count"] >= 1
    for name in layout.RECORD_FILES:
        assert (records / mt / name).read_bytes() == (out / mt / name).read_bytes()
    assert (records / "results.csv").read_text() == (out / "results.csv").read_text()

    # resume: nothing is retrained; a lost evaluation is redone from the saved model
    model = out / "runs" / "labeled_2" / "seed_0" / "nnUNet_results" / ds / \
        "nnUNetTrainerMeanTeacher__nnUNetPlans__3d_fullres" / "fold_0" / "checkpoint_final.pth"
    stamp = model.stat().st_mtime_ns
    shutil.rmtree(out / mt)
    shutil.rmtree(records / mt)
    second = run_cli(args, env=env)
    assert "3 runs (2 done, 1 to do)" in second.stdout
    assert "training" not in second.stdout.split("[1/1]")[1].splitlines()[1]
    assert model.stat().st_mtime_ns == stamp
    assert (records / mt / "summary.json").is_file()
    third = run_cli(args, env=env)
    assert "3 runs (3 done, 0 to do)" in third.stdout

    # a start stopped before its first checkpoint leaves a stage entry; the start from scratch that replaces its
    # model does not keep it
    model.unlink()
    shutil.rmtree(out / mt)
    shutil.rmtree(records / mt)
    retrained = run_cli(args, env=env)
    assert "training (from scratch)" in retrained.stdout
    stages = json.loads((records / mt / layout.PROVENANCE).read_text())["training"]
    assert [e["stage"] for e in stages] == ["train"]

    # a lost work folder: a new one continues from the records alone, without training anything
    fresh = tmp_path / "bench_new_machine"
    args[args.index(str(out))] = str(fresh)
    fourth = run_cli(args, env=env)
    assert "3 finished run(s) restored" in fourth.stdout and "3 runs (3 done, 0 to do)" in fourth.stdout
    assert not (fresh / "runs" / "labeled_2" / "seed_0" / "nnUNet_results" / ds).exists()
    assert (fresh / "results.csv").read_text() == (out / "results.csv").read_text()


@pytest.mark.slow
def test_offline_pseudolabel_row_uses_the_baseline_as_teacher(copy_planned, tmp_path):
    """The offline row: the baseline of the same budget and seed is the teacher, with its snapshots; its student
    (the baseline trainer, same schedule) is trained in the workspace's own nnUNet_raw and tested like any row."""
    root, ds = copy_planned["root"], copy_planned["dataset"]
    env = nnunet_env(root, training=True)
    out = tmp_path / "bench"
    args = ["nnUNetv2_ssl_benchmark", *_bench_args(out, "-tr", layout.OFFLINE)]
    args[args.index("--epochs") + 1] = "3"  # snapshots after epochs 1 and 2
    first = run_cli(args, env=env)
    assert "2 runs (0 done, 2 to do)" in first.stdout and "offline pseudo-labelling, 1 round(s)" in first.stdout
    ws = out / "runs" / "labeled_2" / "seed_0"
    teacher = ws / "nnUNet_results" / ds / "nnUNetTrainerSupervised__nnUNetPlans__3d_fullres" / "fold_0"
    assert sorted(p.name for p in teacher.glob("checkpoint_snapshot_*")) == ["checkpoint_snapshot_1of3.pth",
                                                                             "checkpoint_snapshot_2of3.pth"]
    derived = ws / "nnUNet_raw" / "Dataset900_SSLSyntheticPLRound1"
    provenance = json.loads((derived / "pseudolabel.json").read_text())
    assert [s["checkpoint"] for s in provenance["sources"]] == ["checkpoint_snapshot_1of3.pth",
                                                               "checkpoint_snapshot_2of3.pth", "checkpoint_final.pth"]
    # pool: the budget's 4 unlabeled training cases and the 4 of imagesUnlabeled, all kept (the plain recipe)
    assert len(provenance["pseudo_labeled_cases"]) == 8 and all(
        math.isfinite(c["stability"]) for c in provenance["cases"].values())
    splits = json.loads((ws / "nnUNet_preprocessed" / "Dataset900_SSLSyntheticPLRound1" / "splits_final.json")
                        .read_text())
    budget = json.loads((ws / "nnUNet_preprocessed" / ds / "splits_final.json").read_text())[0]
    assert splits == [{"train": sorted(budget["train"] + provenance["pseudo_labeled_cases"]),
                       "val": sorted(budget["val"])}]
    student = layout.Paths(out, layout.Run(layout.OFFLINE, "2", 0), layout.load_settings(out))
    assert (student.model / "checkpoint_final.pth").is_file() and student.done
    made = json.loads((student.evaluation / layout.PROVENANCE).read_text())
    assert [e["stage"] for e in made["training"]] == ["pseudolabel"] and made["training"][0]["training_runs"] == 2
    assert len(json.loads((student.evaluation / layout.TRAINING_LOG).read_text())["train_losses"]) == 3
    assert f"`{layout.OFFLINE}` is offline pseudo-labelling" in (out / "report.md").read_text()
    # nothing of it in the user's folders
    assert not any(p.name.startswith("Dataset900") for p in (root / "raw").iterdir())
    assert "2 runs (2 done, 0 to do)" in run_cli(args, env=env).stdout
