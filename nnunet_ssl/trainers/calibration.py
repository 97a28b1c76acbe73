"""The reference model's temperature, fitted on the fold's validation cases during nnU-Net's validation."""

from __future__ import annotations

import numpy as np
import torch
from torch import distributed as dist
from torch import nn

from nnunet_ssl.parts.calibration import expected_calibration_error, fit_temperature, sample_voxels


class ReferenceCalibration:
    """Mixin of the SSL trainer: temperature scaling of the reference prediction, so that a confidence threshold
    means what it says (Guo et al., ICML 2017; :mod:`nnunet_ssl.parts.calibration`).

    nnU-Net's softmax is over-confident (Dice loss; nnU-Net issue #2763), so a fixed 0.95 threshold on it keeps far
    more than 95 %-correct voxels. With ``calibrate_reference``, every ``calibration_every`` epochs the reference
    network (``calibration_network``: the EMA teacher, or the student itself for FixMatch) predicts nnU-Net's
    validation patches of the fold's validation cases, which no network trains on; ``calibration_voxels`` random
    voxels per batch (ignore label left out; gathered over DDP ranks, so every rank fits the same ``T``) fit ``T``
    by NLL, and the hosts divide the reference logits by ``T`` before any confidence threshold (FixMatch's gate,
    MetaSSL's regions, the logged coverage). The argmax, hence every hard pseudo-label, is unchanged. ``T`` is part
    of the checkpoint; the top-label ECE before and after scaling (on the same voxels) is logged and drawn.

    Two-network hosts (``calibration_networks``: both) fit one temperature per network: each network's logits are
    divided by its own ``T`` where they are the other network's reference.
    """

    #: fit T and divide the reference logits by it before confidence thresholds
    calibrate_reference: bool = False
    #: refit every N epochs
    calibration_every: int = 2
    #: voxels sampled per validation batch
    calibration_voxels: int = 4096
    #: how many networks ``calibration_networks`` returns (fixed per host; their temperatures are checkpointed)
    calibrated_count: int = 1

    def init_calibration(self) -> None:
        #: one temperature per calibrated network (``calibration_networks``); 1 until the first fit
        self.temperatures = [1.0] * self.calibrated_count
        self._calibration_samples: list[list[tuple[torch.Tensor, torch.Tensor]]] | None = None

    @property
    def temperature(self) -> float:
        """The (first) reference's temperature."""
        return self.temperatures[0] if self.temperatures else 1.0

    @temperature.setter
    def temperature(self, value: float) -> None:
        self.temperatures[0] = float(value)

    def calibration_network(self) -> nn.Module | None:
        """The network whose confidence the thresholds read; None: not calibrated."""
        return None

    def calibration_networks(self) -> list[nn.Module]:
        network = self.calibration_network()
        return [] if network is None else [network]

    def calibrated(self, reference_logits: torch.Tensor, index: int = 0) -> torch.Tensor:
        """``z / T`` of calibrated network ``index`` (unchanged without ``calibrate_reference``)."""
        return reference_logits / self.temperatures[index] if self.calibrate_reference else reference_logits

    def _suffix(self, index: int) -> str:
        return "" if index == 0 else f"_{index + 1}"

    def _collecting(self) -> bool:
        return (self.calibrate_reference and bool(self.calibration_networks())
                and self.current_epoch % max(self.calibration_every, 1) == 0)

    def on_validation_epoch_start(self) -> None:
        super().on_validation_epoch_start()
        self._calibration_samples = [[] for _ in self.calibration_networks()] if self._collecting() else None

    def validation_step(self, batch: dict) -> dict:
        if self._calibration_samples is not None and not self.label_manager.has_regions:
            target = batch["target"]
            target = target[0] if isinstance(target, list) else target
            data = batch["data"].to(self.device, non_blocking=True)
            for network, samples in zip(self.calibration_networks(), self._calibration_samples):
                with torch.no_grad(), self._autocast():
                    output = network(data)
                logits = output[0] if isinstance(output, (list, tuple)) else output
                samples.append(sample_voxels(logits, target[:, 0].to(logits.device), self.calibration_voxels,
                                             self.label_manager.ignore_label))
        return super().validation_step(batch)

    def on_validation_epoch_end(self, val_outputs: list[dict]) -> None:
        super().on_validation_epoch_end(val_outputs)
        collected, self._calibration_samples = self._calibration_samples, None
        if not self.calibrate_reference:
            return
        for index in range(self.calibrated_count):
            samples = collected[index] if collected is not None and index < len(collected) else None
            values = {"ssl_temperature": self.temperatures[index], "ssl_ece_raw": float("nan"),
                      "ssl_ece_calibrated": float("nan")}
            if samples is not None:
                if self.is_ddp:
                    gathered = [None] * dist.get_world_size()
                    dist.all_gather_object(gathered, samples)
                    samples = [s for part in gathered for s in part]
                if samples:
                    logits = torch.cat([s[0] for s in samples])
                    labels = torch.cat([s[1] for s in samples])
                    self.temperatures[index] = t = fit_temperature(logits, labels)
                    values = {"ssl_temperature": t, "ssl_ece_raw": expected_calibration_error(logits, labels),
                              "ssl_ece_calibrated": expected_calibration_error(logits, labels, t)}
                    name = self.reference_name if self.calibrated_count == 1 else f"network {index + 1}"
                    self.print_to_log_file(
                        "ssl: {} temperature {:.3f} (ECE {:.4f} -> {:.4f} on {} validation voxels)".format(
                            name, t, values["ssl_ece_raw"], values["ssl_ece_calibrated"], labels.numel()))
            for key, value in values.items():
                self.logger.log(key + self._suffix(index), value if np.isfinite(value) else float("nan"),
                                self.current_epoch)

    def calibration_log_keys(self) -> list[str]:
        if not self.calibrate_reference:
            return []
        return [k + self._suffix(i) for i in range(self.calibrated_count)
                for k in ("ssl_temperature", "ssl_ece_raw", "ssl_ece_calibrated")]

    def calibration_plot_panel(self) -> list[tuple[str, dict[str, str]]]:
        if not self.calibrate_reference:
            return []
        names = [""] if self.calibrated_count == 1 else [f", network {i + 1}" for i in range(self.calibrated_count)]
        curves = {}
        for i, name in enumerate(names):
            s = self._suffix(i)
            curves.update({f"ECE, softmax{name}": f"ssl_ece_raw{s}",
                           f"ECE, softmax / T{name}": f"ssl_ece_calibrated{s}",
                           f"temperature T{name}": f"ssl_temperature{s}"})
        return [("calibration on validation voxels", curves)]
