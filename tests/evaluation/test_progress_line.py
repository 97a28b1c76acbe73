"""The progress line of the demo and the benchmark (evaluation.stages), read from nnU-Net's log lines."""

from __future__ import annotations

import pytest

from nnunet_ssl.evaluation.stages import Clock, TrainingReporter


@pytest.mark.parametrize("branch", ["", " (labeled branch 0.3000)"])
def test_training_progress_line_reads_nnunet_log_lines(branch, capsys):
    reporter = TrainingReporter("MT", epochs=20, clock=Clock())
    for line in ["2026-01-01 12:00:00.000000: Epoch 2", "2026-01-01 12:00:01.000000: train_loss -0.1234",
                 "2026-01-01 12:00:01.000000: val_loss -0.5",
                 "2026-01-01 12:00:01.000000: Pseudo dice [np.float32(0.8123), np.float32(0.7)]",
                 f"2026-01-01 12:00:01.000000: ssl: sup -0.4 unsup 1.2500{branch} lambda 0.0500 confidence 0.9 "
                 "coverage 0.8", "2026-01-01 12:00:02.000000: Epoch time: 12.34 s"]:
        reporter(line)
    out = capsys.readouterr().out.strip()
    assert out.endswith(f"MT epoch   3/20  loss -0.123 (val -0.500)  pseudo Dice 0.81 0.70  unsup 1.2500{branch} "
                        "lambda 0.050  12.3 s")
