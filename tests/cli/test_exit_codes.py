"""What the command modules print and return for each outcome of their engine: the lines and exit statuses that
the commands had before their command lines moved to ``nnunet_ssl/cli``."""

from __future__ import annotations

from pathlib import Path

import pytest

from nnunet_ssl.cli import benchmark as benchmark_cli
from nnunet_ssl.cli import demo as demo_cli
from nnunet_ssl.cli import throughput as throughput_cli
from nnunet_ssl.demo.workdir import DemoError
from nnunet_ssl.errors import SSLInputError
from nnunet_ssl.evaluation import throughput
from nnunet_ssl.evaluation.stages import CommandNotFound, StageFailed


@pytest.mark.parametrize("error, code, lines", [
    (DemoError("--workdir w is not empty"), 2, ["nnUNetv2_ssl_demo: error: --workdir w is not empty"]),
    (CommandNotFound("cannot find the command x"), 2, ["nnUNetv2_ssl_demo: error: cannot find the command x"]),
    (StageFailed("nnUNetv2_train", 3, Path("logs/t.log"), ["a", "b"]), 1,
     ["", "nnUNetv2_ssl_demo: nnUNetv2_train failed with exit status 3 (log: logs/t.log)", "last lines of the log:",
      "  | a", "  | b"]),
    (KeyboardInterrupt(), 130, ["", "nnUNetv2_ssl_demo: interrupted"]),
])
def test_demo_errors(error, code, lines, monkeypatch, capsys):
    def fail(*args):
        raise error

    monkeypatch.setattr(demo_cli, "run_demo", fail)
    assert demo_cli.main(["--epochs", "1"]) == code
    assert capsys.readouterr().err.splitlines() == lines


def test_demo_refuses_a_foreign_work_folder_in_one_line(tmp_path, capsys):
    (tmp_path / "mine.txt").write_text("x")
    assert demo_cli.main(["--workdir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"nnUNetv2_ssl_demo: error: --workdir {tmp_path} is not empty")


def _report(failed: list[str]) -> throughput.ThroughputReport:
    return throughput.ThroughputReport("# doc\n", "| table |", failed)


def test_throughput_prints_the_table_and_fails_with_the_failed_trainers(monkeypatch, capsys, tmp_path):
    calls = []
    monkeypatch.setattr(throughput, "run_throughput", lambda *a: calls.append(a) or _report([]))
    for name in throughput.TIMING_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # shown in front of the command, as it changes the timing
    out = str(tmp_path / "t.md")
    assert throughput_cli.main(["-d", "4", "-c", "3d_fullres", "-o", out, "--note", "a b", "--at", "0.25"]) == 0
    assert capsys.readouterr().out.splitlines() == ["| table |", f"written to {out}"]
    (args,) = calls
    assert args[:10] == ("4", "3d_fullres", "nnUNetPlans", "0", None, 10, 3, 1, None, out)
    assert args[10:] == ("a b", f"OMP_NUM_THREADS=1 nnUNetv2_ssl_throughput -d 4 -c 3d_fullres -o {out} --note 'a b' "
                                "--at 0.25", 0.25)

    monkeypatch.setattr(throughput, "run_throughput", lambda *a: _report(["nnUNetTrainerCPS"]))
    with pytest.raises(SystemExit) as exit_info:
        throughput_cli.main(["-d", "4", "-c", "3d_fullres"])
    assert exit_info.value.code == 1
    captured = capsys.readouterr()
    assert captured.out.splitlines() == ["| table |"]
    assert captured.err.splitlines() == ["nnunet-ssl: trainers failed: nnUNetTrainerCPS (see the log tails above)"]


@pytest.mark.parametrize("error, code, line", [(RuntimeError("boom"), 1, "nnunet-ssl: boom"),
                                               (SSLInputError("bad fold"), 2, "nnunet-ssl: error: bad fold")])
def test_throughput_engine_errors(error, code, line, monkeypatch, capsys):
    def fail(*args):
        raise error

    monkeypatch.setattr(throughput, "run_throughput", fail)
    if code == 1:  # a RuntimeError leaves as SystemExit(1), as before
        with pytest.raises(SystemExit) as exit_info:
            throughput_cli.main(["-d", "4", "-c", "2d"])
        assert exit_info.value.code == 1
    else:
        assert throughput_cli.main(["-d", "4", "-c", "2d"]) == 2
    assert capsys.readouterr().err.splitlines() == [line]


def test_benchmark_checks_its_options_before_the_engine_runs(monkeypatch, capsys, tmp_path):
    def never(*args):
        raise AssertionError("the engine ran")

    monkeypatch.setattr("nnunet_ssl.evaluation.benchmark.run_benchmark", never)
    base = ["-o", str(tmp_path / "b"), "-d", "4", "--iterations-per-epoch", "2"]
    for extra, message in ((["--budgets", "3", "--epochs", "0"], "--epochs must be at least 1, got 0"),
                           (["--budgets", "3", "0", "--epochs", "1"], "--budgets must be positive numbers of labeled "
                                                                      "cases, got [3, 0]"),
                           (["--budgets", "3", "--epochs", "1", "--val-iterations", "0"],
                            "--val-iterations must be at least 1, got 0")):
        assert benchmark_cli.main(base + extra) == 2
        assert capsys.readouterr().err.splitlines() == [f"nnunet-ssl: error: {message}"]
    with pytest.raises(SystemExit) as exit_info:  # argparse: usage and exit status 2
        benchmark_cli.main(["-o", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "the following arguments are required: -d, --budgets, --epochs, --iterations-per-epoch" in \
        capsys.readouterr().err
    assert benchmark_cli.main(["-o", str(tmp_path), "--report-only"]) == 2
    assert capsys.readouterr().err.splitlines() == [f"nnunet-ssl: error: {tmp_path} has no benchmark.json; it is "
                                                    "not a benchmark folder"]
