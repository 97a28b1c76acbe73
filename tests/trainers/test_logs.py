"""progress_ssl.png and the per-epoch SSL logs."""

from __future__ import annotations

import numpy as np


def test_log_panels_fall_back_to_symlog_for_non_positive_values(tmp_path):
    from nnunet_ssl.utils.plotting import log_axis_scale, plot_ssl_progress

    assert log_axis_scale(np.array([0.5, 1e-3, np.nan])) == ("log", {})
    assert log_axis_scale(np.array([0.2, 0.0, -0.05, 0.01])) == ("symlog", {"linthresh": 0.01})
    assert log_axis_scale(np.array([0.0, 0.0])) == ("symlog", {"linthresh": 1e-3})
    # nnU-Net's supervised loss is negative; every panel is drawn and the file is a PNG
    log = {"ssl_sup_loss": [0.2, -0.4, -0.8], "ssl_unsup_loss": [0.01, 0.0, 0.002], "ssl_lambda": [0.0, 0.05, 0.1]}
    out = tmp_path / "progress_ssl.png"
    plot_ssl_progress(log, [("supervised loss", {"sup": "ssl_sup_loss"}), ("unsupervised loss (log)",
                                                                          {"unsup": "ssl_unsup_loss"})], str(out))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_epoch_means_skip_missing_values_without_a_warning():
    import math
    import warnings

    from nnunet_ssl.trainers.logs import finite_mean

    assert finite_mean([1.0, float("nan"), 3.0]) == 2.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's nanmean would warn "Mean of empty slice"
        assert math.isnan(finite_mean([float("nan"), float("nan")])) and math.isnan(finite_mean([]))
