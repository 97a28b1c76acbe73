"""What an SSL training logs each epoch beside nnU-Net's own values, and its progress_ssl.png."""

from __future__ import annotations

import numpy as np
from batchgenerators.utilities.file_and_folder_operations import join
from torch import distributed as dist

from nnunet_ssl.compat.trainer import ensure_log_keys, log_history, network_swapped
from nnunet_ssl.utils.plotting import plot_ssl_progress

#: a lambda-weighted term below this share of the supervised loss (L_sup + n) is reported as negligible
NEGLIGIBLE_SHARE = 0.01
#: a term above this share is reported as dominant
DOMINANT_SHARE = 1.0
#: a confidence gate that keeps less than this fraction of voxels is reported as dropping nearly everything
GATE_MINIMUM = 0.01


def finite_mean(values: list[float]) -> float:
    """The mean of the non-NaN values; NaN, without numpy's empty-slice warning, when there are none (a statistic
    a step did not produce, e.g. the teacher's confidence during BCP's labeled-only pre-training)."""
    kept = [float(v) for v in values if not np.isnan(v)]
    return float(np.mean(kept)) if kept else float("nan")


class SSLLogs:
    """Mixin of the SSL trainer: per-step statistics averaged per epoch (over DDP ranks too), the reference model's
    validation pseudo-Dice, one line per epoch in nnU-Net's log file, and ``progress_ssl.png``.

    Every key of :meth:`ssl_log_keys` gets exactly one value per epoch (nnU-Net's logger requires it); statistics a
    step did not produce are NaN for that epoch."""

    def init_ssl_logs(self) -> None:
        self._epoch_stats: list[dict[str, float]] = []
        ensure_log_keys(self, self.ssl_log_keys())

    def ssl_log_keys(self) -> list[str]:
        keys = ["ssl_sup_loss", "ssl_unsup_loss", "ssl_lambda", "ssl_ramp", "ssl_unsup_share", "ssl_other_share",
                "ssl_confidence", "ssl_coverage", *self.validation_log_keys()]
        return [*keys, "ssl_labeled_branch_loss"] if self.uses_labeled_reference else keys

    def validation_log_keys(self) -> list[str]:
        """Keys logged once per epoch by the validation hooks, not averaged from the training steps."""
        return ["ssl_reference_dice", *self.calibration_log_keys()]

    def ssl_plot_panels(self) -> list[tuple[str, dict[str, str]]]:
        """(title, {legend label: log key}) for each panel of progress_ssl.png."""
        unsup = {"unsupervised loss": "ssl_unsup_loss"}
        if self.uses_labeled_reference:  # a labeled branch (MetaSSL) is part of the lambda-weighted term
            unsup = {"unlabeled + labeled branch": "ssl_unsup_loss", "labeled branch alone": "ssl_labeled_branch_loss"}
        return [
            # nnU-Net's Dice + CE turns negative, so it gets a linear axis of its own
            ("supervised loss (nnU-Net's Dice + CE)", {"supervised loss": "ssl_sup_loss"}),
            ("unsupervised loss, before lambda (log)", unsup),
            ("unsupervised weight", {"lambda": "ssl_lambda"}),
            ("terms as a share of the supervised loss (L_sup + n)", {"lambda L_unsup": "ssl_unsup_share",
                                                                      "other SSL terms": "ssl_other_share"}),
            ("pseudo-labels", {"mean confidence": "ssl_confidence",
                               f"coverage (conf >= {self.confidence_threshold})": "ssl_coverage"}),
            ("validation pseudo-Dice", {self.student_name: "mean_fg_dice", self.reference_name: "ssl_reference_dice"}),
            *self.calibration_plot_panel(),
        ]

    def record_step_stats(self, stats: dict[str, float]) -> None:
        self._epoch_stats.append(stats)

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        ref = self.reference_network()
        if ref is not None:
            ref.train()
        self._epoch_stats = []

    def on_train_epoch_end(self, train_outputs: list[dict]) -> None:
        super().on_train_epoch_end(train_outputs)
        keys = [k for k in self.ssl_log_keys() if k not in self.validation_log_keys()]
        means = {k: finite_mean([s.get(k, np.nan) for s in self._epoch_stats]) for k in keys}
        if self.is_ddp:
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, means)
            means = {k: finite_mean([g[k] for g in gathered]) for k in keys}
        for k in keys:
            self.logger.log(k, means[k], self.current_epoch)
        branch = f" (labeled branch {means['ssl_labeled_branch_loss']:.4f})" if self.uses_labeled_reference else ""
        self.print_to_log_file(
            "ssl: sup {:.4f} unsup {:.4f}{} lambda {:.4g} share {:.3f} (other terms {:.3f}) confidence {:.3f} "
            "coverage {:.3f}".format(means["ssl_sup_loss"], means["ssl_unsup_loss"], branch, means["ssl_lambda"],
                                     means["ssl_unsup_share"], means["ssl_other_share"], means["ssl_confidence"],
                                     means["ssl_coverage"]))
        for warning in self.mechanism_warnings(means):
            self.print_to_log_file(f"WARNING: {warning}")

    def mechanism_warnings(self, means: dict[str, float]) -> list[str]:
        """Lines for the log when a term is negligible or dominant against the supervised loss, or a gate drops
        nearly every voxel, over this epoch. Plug-ins with their own gates or terms extend the list."""
        out = []
        if means.get("ssl_ramp", 0.0) >= 0.5:  # during the early ramp a small term is intended
            share = means.get("ssl_unsup_share", float("nan"))
            if share < NEGLIGIBLE_SHARE:
                out.append(f"lambda L_unsup is {share:.2g} of the supervised loss this epoch: the unsupervised term "
                           "is negligible")
            elif share > DOMINANT_SHARE:
                out.append(f"lambda L_unsup is {share:.2g} times the supervised loss this epoch: the unsupervised "
                           "term dominates")
            other = means.get("ssl_other_share", float("nan"))
            if other > DOMINANT_SHARE:
                out.append(f"the other SSL terms are {other:.2g} times the supervised loss this epoch: they dominate")
        if self.uses_confidence_gate and means.get("ssl_coverage", 1.0) < GATE_MINIMUM:
            out.append(f"only {means['ssl_coverage']:.1%} of the unlabeled voxels pass the confidence threshold "
                       f"{self.confidence_threshold}: the gate drops nearly everything")
        return out

    def on_validation_epoch_start(self) -> None:
        super().on_validation_epoch_start()
        ref = self.reference_network()
        if ref is not None:
            ref.eval()

    def validation_step(self, batch: dict) -> dict:
        ref = self.reference_network()
        # nnU-Net's validation_step edits the target in place (ignore label), so the reference gets its own copy
        target = batch["target"]
        ref_batch = {**batch, "target": [t.clone() for t in target] if isinstance(target, list) else target.clone()}
        result = super().validation_step(batch)
        if ref is not None:
            with network_swapped(self, ref):
                ref_result = super().validation_step(ref_batch)
            result.update({f"ref_{k}": ref_result[k] for k in ("tp_hard", "fp_hard", "fn_hard")})
        return result

    def on_validation_epoch_end(self, val_outputs: list[dict]) -> None:
        super().on_validation_epoch_end(val_outputs)
        dice = float("nan")
        if val_outputs and "ref_tp_hard" in val_outputs[0]:
            sums = [np.sum([o[f"ref_{k}"] for o in val_outputs], 0) for k in ("tp_hard", "fp_hard", "fn_hard")]
            if self.is_ddp:
                gathered = [None] * dist.get_world_size()
                dist.all_gather_object(gathered, sums)
                sums = [np.sum([g[i] for g in gathered], 0) for i in range(3)]
            tp, fp, fn = sums
            with np.errstate(invalid="ignore", divide="ignore"):
                dice = float(np.nanmean(2 * tp / (2 * tp + fp + fn)))
        self.logger.log("ssl_reference_dice", dice, self.current_epoch)

    def on_epoch_end(self) -> None:
        super().on_epoch_end()  # increments current_epoch
        if self.local_rank == 0:
            try:
                plot_ssl_progress(log_history(self), self.ssl_plot_panels(), join(self.output_folder,
                                                                                   "progress_ssl.png"))
            except Exception as e:  # a plotting failure must never stop a training
                self.print_to_log_file(f"could not draw progress_ssl.png: {e}")
