"""Temperature scaling and the expected calibration error of a softmax segmentation output, on sampled voxels.

Guo et al., "On Calibration of Modern Neural Networks", ICML 2017: one temperature ``T > 0`` divides the logits,
fitted by minimising the negative log-likelihood on held-out labeled data; the argmax is unchanged, the confidence
``max_c softmax(z / T)_c`` is not. The top-label expected calibration error over ``M`` equal-width confidence bins is
``ECE = sum_m |B_m| / N * |acc(B_m) - conf(B_m)|``; here it is MONAI's ``CalibrationErrorMetric`` applied to the
top-label confidence against its correctness.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from monai.metrics import CalibrationErrorMetric
from scipy.optimize import minimize_scalar

#: the search interval of T (an nnU-Net softmax is over-confident, so T is usually above 1)
TEMPERATURE_BOUNDS = (0.05, 50.0)


def sample_voxels(logits: torch.Tensor, target: torch.Tensor, count: int, ignore_label: int | None = None,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to ``count`` random voxels of (B, C, *spatial) logits and their (B, *spatial) labels, as ((N, C) float32
    logits, (N,) long labels) on the CPU; voxels with the ignore label are left out."""
    flat = logits.detach().float().movedim(1, -1).reshape(-1, logits.shape[1])
    labels = target.reshape(-1).long()
    keep = torch.ones_like(labels, dtype=torch.bool) if ignore_label is None else labels != ignore_label
    index = torch.nonzero(keep).flatten()
    if index.numel() > count:
        pick = torch.randperm(index.numel(), generator=generator, device="cpu")[:count].to(index.device)
        index = index[pick]
    return flat[index].cpu(), labels[index].cpu()


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The ``T`` in :data:`TEMPERATURE_BOUNDS` minimising ``mean CE(logits / T, labels)`` (a bounded 1-D search over
    ``log T``; deterministic). 1.0 without voxels."""
    if labels.numel() == 0:
        return 1.0
    logits, labels = logits.double(), labels.long()

    def nll(log_t: float) -> float:
        return float(F.cross_entropy(logits / math.exp(log_t), labels))

    lo, hi = (math.log(b) for b in TEMPERATURE_BOUNDS)
    result = minimize_scalar(nll, bounds=(lo, hi), method="bounded", options={"xatol": 1e-4})
    return float(math.exp(result.x))


def expected_calibration_error(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0,
                               num_bins: int = 15) -> float:
    """Top-label ECE of ``softmax(logits / T)`` on (N, C) logits and (N,) labels; NaN without voxels."""
    if labels.numel() == 0:
        return float("nan")
    confidence, prediction = torch.softmax(logits.float() / temperature, 1).max(1)
    correct = (prediction == labels.long()).float()
    metric = CalibrationErrorMetric(num_bins=num_bins, include_background=True)
    metric(y_pred=confidence.reshape(1, 1, -1), y=correct.reshape(1, 1, -1))
    return float(metric.aggregate())
