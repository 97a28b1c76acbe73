"""Running commands as logged stages (``nnunet_ssl.evaluation.stages``), as the demo and the benchmark do."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from nnunet_ssl.evaluation.stages import (
    Clock,
    CommandNotFound,
    EchoFilter,
    StageFailed,
    console_script,
    parse_floats,
    run_stage,
)


def test_console_script_prefers_the_running_environment(monkeypatch):
    assert console_script("nnUNetv2_ssl_trainers") == str(Path(sys.executable).parent / "nnUNetv2_ssl_trainers")
    monkeypatch.setenv("PATH", "")
    with pytest.raises(CommandNotFound, match="cannot find the command no_such_command_here next to"):
        console_script("no_such_command_here")


def test_run_stage_logs_the_command_and_its_output(tmp_path):
    seen: list[str] = []
    log = tmp_path / "stage.log"
    run_stage(["nnUNetv2_ssl_trainers", "--path"], dict(os.environ), log, tmp_path, seen.append)
    text = log.read_text().splitlines()
    assert text[0] == f"$ {console_script('nnUNetv2_ssl_trainers')} --path"
    assert text[1:] == seen and Path(seen[0], "nnunet_ssl_trainers.py").is_file()


def test_a_failing_stage_names_its_exit_status_log_and_last_lines(tmp_path):
    log = tmp_path / "stage.log"
    with pytest.raises(StageFailed) as failed:
        run_stage(["nnUNetv2_ssl_make_splits"], dict(os.environ), log, tmp_path)
    e = failed.value
    assert (e.stage, e.returncode, e.log) == ("nnUNetv2_ssl_make_splits", 2, log)
    assert str(e) == "nnUNetv2_ssl_make_splits failed with exit status 2"
    assert e.tail[-1].endswith("error: the following arguments are required: -d")
    assert e.tail[-1] in log.read_text()


def test_echo_filter_clock_and_log_numbers(capsys):
    echo = EchoFilter(r"^\s*(fold|0)\s")
    for line in ["fold  labeled", "   0         4", "10 other", "noise"]:
        echo(line)
    assert capsys.readouterr().out.splitlines() == ["          fold  labeled", "          0         4"]
    assert Clock().stamp() == "[00:00]"
    assert parse_floats("[np.float32(0.87), np.float64(1e-3), nan]")[:2] == [0.87, 0.001]
