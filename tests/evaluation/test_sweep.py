"""The validation-only sweep: grid parsing, the environment each point trains with, the choice, and refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nnunet_ssl.cli import sweep as cli
from nnunet_ssl.errors import SSLInputError
from nnunet_ssl.evaluation import sweep
from nnunet_ssl.evaluation.benchmark_layout import BASELINE, BenchmarkSettings, Paths, Run, write_json

DATASET = "Dataset990_SSLSynthetic"


def test_grid_is_the_cartesian_product_and_keeps_bracketed_values_whole():
    points = sweep.parse_grid(["unsupervised_share=0.1,0.5", "view_intensity=(False, 'strong'),(False, True)"])
    assert points == [
        {"unsupervised_share": "0.1", "view_intensity": "(False, 'strong')"},
        {"unsupervised_share": "0.1", "view_intensity": "(False, True)"},
        {"unsupervised_share": "0.5", "view_intensity": "(False, 'strong')"},
        {"unsupervised_share": "0.5", "view_intensity": "(False, True)"}]
    assert sweep.parse_grid([]) == [{}]
    assert sweep.point_tag({}) == sweep.point_tag({"preset": "default"}) == "defaults"
    assert sweep.point_tag({"preset": "paper", "unsupervised_share": "0.5"}) == "preset=paper__unsupervised_share=0.5"
    assert sweep.point_tag(points[0]) == "unsupervised_share=0.1__view_intensity=_False___strong__"
    with pytest.raises(SSLInputError, match="not name=value1,value2"):
        sweep.parse_grid(["unsupervised_share"])
    with pytest.raises(SSLInputError, match="twice"):
        sweep.parse_grid(["a=1", "a=2"])


def _summary(folder: Path, dice: dict[str, float]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "summary.json").write_text(json.dumps({
        "foreground_mean": {"Dice": sum(dice.values()) / len(dice)},
        "mean": {k: {"Dice": v} for k, v in dice.items()}}))


def _benchmark(tmp_path: Path) -> Path:
    bench = tmp_path / "bench"
    s = BenchmarkSettings(DATASET, "3d_fullres", 0, "nnUNetPlans", [], [2], [0], False, 3, 4, 1)
    bench.mkdir()
    write_json(bench / "benchmark.json", s.__dict__)
    ws = Paths(bench, Run(BASELINE, "2", 0), s)
    (ws.preprocessed / DATASET).mkdir(parents=True)
    (ws.preprocessed / DATASET / "splits_final.json").write_text("[]")
    _summary(ws.model / "validation", {"1": 0.70, "2": 0.60})
    return bench


def test_each_point_trains_with_its_settings_on_the_benchmark_workspace_and_the_best_is_chosen(tmp_path, monkeypatch,
                                                                                                 capsys):
    bench = _benchmark(tmp_path)
    calls = []
    scores = {"0.1": {"1": 0.72, "2": 0.58}, "0.5": {"1": 0.75, "2": 0.66}}

    def fake_training(argv, env, log_path, cwd, on_line=None):
        calls.append((argv, env))
        share = env["nnUNet_ssl_settings"].split("=")[1]
        model = Path(env["nnUNet_results"]) / DATASET / f"{argv[5]}__nnUNetPlans__3d_fullres" / "fold_0"
        _summary(model / "validation", scores[share])

    monkeypatch.setattr(sweep, "run_stage", fake_training)
    out = tmp_path / "sweep"
    assert cli.main(["-b", str(bench), "--budget", "2", "-tr", "nnUNetTrainerFixMatch", "-o", str(out),
                     "--grid", "unsupervised_share=0.1,0.5", "-device", "cpu"]) == 0
    assert len(calls) == 2
    argv, env = calls[0]
    assert argv[:6] == ["nnUNetv2_train", DATASET, "3d_fullres", "0", "-tr", "nnUNetTrainerFixMatch"]
    workspace = bench / "runs" / "labeled_2" / "seed_0"
    assert env["nnUNet_preprocessed"] == str(workspace / "nnUNet_preprocessed")  # the benchmark's split
    assert env["nnUNet_ssl_settings"] == "unsupervised_share=0.1" and env["nnUNet_ssl_preset"] == "default"
    assert (env["nnUNet_ssl_epochs"], env["nnUNet_ssl_iterations_per_epoch"], env["nnUNet_ssl_seed"]) == ("3", "4", "0")
    assert str(out) in env["nnUNet_results"]  # never the benchmark's own results
    result = json.loads((out / "sweep.json").read_text())
    assert result["baseline"]["validation"]["mean"] == pytest.approx(0.65)
    best = sweep.chosen(result)["nnUNetTrainerFixMatch"]
    assert best["settings"] == {"unsupervised_share": "0.5"} and best["delta"] == pytest.approx(0.705 - 0.65)
    report = (out / "sweep.md").read_text()
    assert "unsupervised_share=0.5 **(chosen)** | 0.7050 | +0.0550 | 0.7500 | 0.6600" in report
    assert "chosen on validation: nnUNetTrainerFixMatch unsupervised_share=0.5" in capsys.readouterr().out
    # a rerun trains nothing that has finished, and adds a new point beside the old ones
    assert cli.main(["-b", str(bench), "--budget", "2", "-tr", "nnUNetTrainerFixMatch", "-o", str(out),
                     "--grid", "unsupervised_share=0.5", "preset=paper", "-device", "cpu"]) == 0
    assert len(calls) == 3 and calls[-1][1]["nnUNet_ssl_preset"] == "paper"
    assert len(json.loads((out / "sweep.json").read_text())["rows"]) == 3
    assert cli.main(["-b", str(bench), "--budget", "2", "-tr", "nnUNetTrainerFixMatch", "-o", str(out),
                     "--grid", "unsupervised_share=0.1,0.5", "-device", "cpu"]) == 0
    assert len(calls) == 3


def test_sweep_refusals_name_the_fix(tmp_path, capsys):
    bench = _benchmark(tmp_path)
    base = ["-b", str(bench), "-o", str(tmp_path / "s"), "-device", "cpu"]
    cases = [(["--budget", "3", "-tr", "nnUNetTrainerFixMatch"], "run nnUNetv2_ssl_benchmark"),
             (["--budget", "2", "-tr", "nnUNetTrainerFixMatch", "--grid", "unsupervised_shar=1"],
              "has no setting 'unsupervised_shar'"),
             (["--budget", "2", "-tr", "nnUNetTrainerFixMatch", "--grid", "preset=papers"], "preset=papers is unknown"),
             (["--budget", "2", "-tr", BASELINE], "name one of the SSL trainers")]
    for args, message in cases:
        assert cli.main([*base, *args]) == 2
        assert message in capsys.readouterr().err
    assert cli.main(["-b", str(tmp_path), "--budget", "2", "-tr", "nnUNetTrainerFixMatch", "-o",
                     str(tmp_path / "s")]) == 2
    assert "is not a benchmark folder" in capsys.readouterr().err
    with pytest.raises(SSLInputError):
        sweep.check_points("nnUNetTrainerFixMatch", [{"cutmix_probability": "half"}])


def test_a_best_point_below_the_baseline_is_not_called_chosen():
    def row(share: str, mean: float) -> dict:
        return {"trainer": "nnUNetTrainerMeanTeacher", "settings": {"unsupervised_share": share},
                "tag": f"unsupervised_share={share}", "validation": {"mean": mean, "per_class": {"1": mean}},
                "delta": mean - 0.83}

    result = {"dataset": DATASET, "fold": 0, "budget": 3, "seed": 0, "selection": "validation Dice", "epochs": 2,
              "iterations_per_epoch": 2, "benchmark": "b", "rows": [row("0.2", 0.24), row("0.1", 0.80)],
              "baseline": {"trainer": BASELINE, "validation": {"mean": 0.83, "per_class": {"1": 0.83}}}}
    report = sweep.sweep_report(result)
    assert "unsupervised_share=0.1 **(best, not above the baseline)** | 0.8000 | -0.0300" in report
    assert "(chosen)" not in report
    result["rows"].append(row("0.05", 0.85))
    assert "unsupervised_share=0.05 **(chosen)** | 0.8500 | +0.0200" in sweep.sweep_report(result)
