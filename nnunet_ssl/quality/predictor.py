"""The quality predictor g_phi of quality-guided SSL, for nnU-Net's preprocessed data.

Paper: Abhishek & Hamarneh, "Quality-guided semi-supervised segmentation" (QG-SSL, MICCAI 2026, arXiv 2606.01753),
Phase 1; official code sfu-mial/QG-SSL (2D RGB images, binary masks, a timm backbone).

g_phi takes an image and a (soft or one-hot) segmentation mask and predicts the Dice that mask would score
against the unknown ground truth:

    q_hat = sigmoid(MLP([avgpool(E([x, m])), maxpool(E([x, m])), mean_voxels(m)])) in [0, 1]^(K-1)

where E is an nnU-Net encoder (dynamic_network_architectures building blocks) sized from the plans, x has C_in
image channels, m has K channels (background first) and q_hat holds one predicted Dice per foreground class. It is
trained in Phase 1 with the SmoothL1 loss against the true Dice of generated masks (``corruptions.py``,
``train_quality.py``), and frozen in Phase 2 where QAR backpropagates 1 - q_hat through it into the segmentation
network (so ``forward`` is differentiable with respect to ``mask``).

Deviations from the paper / official code, and why:

- Input: any number of image channels and K mask channels (one per class, background included) instead of RGB + one
  binary mask; output: one Dice per foreground class instead of one scalar. nnU-Net datasets are multi-class,
  multi-modal, 2D or 3D.
- Encoder: nnU-Net's own ``PlainConvEncoder`` (or ``ResidualEncoder`` for ResEnc plans) with the plans' conv op,
  norm, nonlinearity, kernel sizes, strides and convolutions per stage, widths capped at ``max_features``
  (default 128, to keep Phase 1 and the extra forward/backward of Phase 2 cheap), randomly initialised; the official
  code uses an ImageNet-pretrained 2D timm ResNet-18 / EfficientNetV2, which does not exist for 3D or for arbitrary
  channel counts.
- Head: average- and max-pooled bottleneck features plus the mean of each mask channel (the soft volume fraction).
  The official head sees only average-pooled features. nnU-Net's encoders use instance normalisation, which removes
  the constant offset an empty or full mask adds to the first convolution; the volume fractions give that
  information back. Head widths follow the official code (hidden 256, dropout p then p/2, p = 0.15).
- Region-based (BraTS-style) datasets are refused (``check_supported_labels``): the mask generator and the true
  Dice targets are defined on label maps with one class per voxel.
"""

from __future__ import annotations

import os
import pydoc
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from nnunet_ssl.errors import SSLInputError

if TYPE_CHECKING:
    from nnunetv2.utilities.label_handling.label_handling import LabelManager
    from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager

CHECKPOINT_NAME = "checkpoint_quality.pth"
CHECKPOINT_FORMAT = "nnunet_ssl.quality_predictor/1"
DEFAULT_MAX_FEATURES = 128


def _locate(op: str | type | None) -> type | None:
    if op is None or isinstance(op, type):
        return op
    found = pydoc.locate(op)
    if found is None:
        raise ValueError(f"cannot import {op!r} for the quality predictor")
    return found  # type: ignore[return-value]


def _dotted(op: str | type | None) -> str | None:
    if op is None or isinstance(op, str):
        return op
    return f"{op.__module__}.{op.__qualname__}"


class QualityPredictor(nn.Module):
    """g_phi(image, mask) -> predicted Dice per foreground class (QG-SSL Phase 1; see the module docstring for the
    equation and the deviations from the paper).

    All constructor arguments are plain Python values (ops as dotted import paths or classes), so they can be stored
    in a ``weights_only`` checkpoint and the network rebuilt from them (``init_kwargs``)."""

    def __init__(
        self,
        num_input_channels: int,
        num_classes: int,
        conv_op: str | type,
        features_per_stage: Sequence[int],
        kernel_sizes: Sequence[Sequence[int]],
        strides: Sequence[Sequence[int]],
        n_conv_per_stage: Sequence[int],
        conv_bias: bool = True,
        norm_op: str | type | None = "torch.nn.modules.instancenorm.InstanceNorm3d",
        norm_op_kwargs: dict | None = None,
        nonlin: str | type | None = "torch.nn.LeakyReLU",
        nonlin_kwargs: dict | None = None,
        encoder: str = "plain",
        head_hidden: int = 256,
        dropout: float = 0.15,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must count the background too (>= 2), got {num_classes}")
        conv = _locate(conv_op)
        self.dim = 3 if conv is nn.Conv3d else 2 if conv is nn.Conv2d else None
        if self.dim is None:
            raise ValueError(f"conv_op must be Conv2d or Conv3d, got {conv_op!r}")
        self.num_input_channels = int(num_input_channels)
        self.num_classes = int(num_classes)
        self.init_kwargs: dict[str, Any] = {
            "num_input_channels": int(num_input_channels),
            "num_classes": int(num_classes),
            "conv_op": _dotted(conv_op),
            "features_per_stage": [int(f) for f in features_per_stage],
            "kernel_sizes": [[int(k) for k in ks] for ks in kernel_sizes],
            "strides": [[int(s) for s in st] for st in strides],
            "n_conv_per_stage": [int(n) for n in n_conv_per_stage],
            "conv_bias": bool(conv_bias),
            "norm_op": _dotted(norm_op),
            "norm_op_kwargs": dict(norm_op_kwargs or {}),
            "nonlin": _dotted(nonlin),
            "nonlin_kwargs": dict(nonlin_kwargs or {}),
            "encoder": str(encoder),
            "head_hidden": int(head_hidden),
            "dropout": float(dropout),
        }
        kw = self.init_kwargs
        common = dict(
            input_channels=self.num_input_channels + self.num_classes,
            n_stages=len(kw["features_per_stage"]),
            features_per_stage=kw["features_per_stage"],
            conv_op=conv,
            kernel_sizes=kw["kernel_sizes"],
            strides=kw["strides"],
            conv_bias=kw["conv_bias"],
            norm_op=_locate(norm_op),
            norm_op_kwargs=kw["norm_op_kwargs"],
            nonlin=_locate(nonlin),
            nonlin_kwargs=kw["nonlin_kwargs"],
            return_skips=False,
        )
        if encoder == "plain":
            from dynamic_network_architectures.building_blocks.plain_conv_encoder import PlainConvEncoder

            self.encoder = PlainConvEncoder(n_conv_per_stage=kw["n_conv_per_stage"], **common)
        elif encoder == "residual":
            from dynamic_network_architectures.building_blocks.residual_encoders import ResidualEncoder

            self.encoder = ResidualEncoder(n_blocks_per_stage=kw["n_conv_per_stage"], **common)
        else:
            raise ValueError(f"encoder must be 'plain' or 'residual', got {encoder!r}")
        width = kw["features_per_stage"][-1]
        self.head = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(2 * width + self.num_classes, head_hidden),
            nn.ReLU(),
            nn.Dropout(dropout / 2),
            nn.Linear(head_hidden, self.num_classes - 1),
        )
        # nnU-Net's He initialisation for the encoder, as get_network_from_plans does
        from dynamic_network_architectures.initialization.weight_init import InitWeights_He

        self.encoder.apply(InitWeights_He(1e-2))

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """image (B, C_in, *spatial), mask (B, K, *spatial) probabilities or one-hot, background first ->
        predicted Dice (B, K-1) in [0, 1]. Differentiable with respect to ``mask``."""
        if image.ndim != self.dim + 2 or mask.ndim != self.dim + 2:
            raise ValueError(f"expected {self.dim}D inputs (B, C, *spatial), got image {tuple(image.shape)} and "
                             f"mask {tuple(mask.shape)}")
        if image.shape[1] != self.num_input_channels or mask.shape[1] != self.num_classes:
            raise ValueError(f"expected {self.num_input_channels} image and {self.num_classes} mask channels, got "
                             f"{image.shape[1]} and {mask.shape[1]}")
        if image.shape[0] != mask.shape[0] or image.shape[2:] != mask.shape[2:]:
            raise ValueError(f"image {tuple(image.shape)} and mask {tuple(mask.shape)} differ in batch or spatial size")
        mask = mask.to(image.dtype)
        features = self.encoder(torch.cat((image, mask), dim=1)).flatten(2)
        pooled = torch.cat((features.mean(-1), features.amax(-1), mask.flatten(2).mean(-1)), dim=1)
        return torch.sigmoid(self.head(pooled))


def check_supported_labels(label_manager: LabelManager) -> None:
    """Refuses region-based datasets (the mask generator and the Dice targets need one class per voxel)."""
    if label_manager.has_regions:
        raise SSLInputError(
            "the quality predictor does not support region-based datasets (regions_class_order in dataset.json); "
            "use a dataset with one label per voxel"
        )


def build_quality_predictor(
    plans_manager: PlansManager,
    configuration_manager: ConfigurationManager,
    num_input_channels: int,
    num_classes: int,
    max_features: int = DEFAULT_MAX_FEATURES,
    **overrides: Any,
) -> QualityPredictor:
    """QualityPredictor with the encoder of the configuration's network (conv op, norm, nonlinearity, stages,
    kernel sizes, strides, convolutions per stage), widths capped at ``max_features``. ``overrides`` replace any
    constructor argument (e.g. ``head_hidden``)."""
    arch = configuration_manager.network_arch_init_kwargs
    residual = "n_blocks_per_stage" in arch
    kwargs: dict[str, Any] = dict(
        num_input_channels=num_input_channels,
        num_classes=num_classes,
        conv_op=arch["conv_op"],
        features_per_stage=[min(int(f), max_features) for f in arch["features_per_stage"]],
        kernel_sizes=arch["kernel_sizes"],
        strides=arch["strides"],
        n_conv_per_stage=arch["n_blocks_per_stage"] if residual else arch["n_conv_per_stage"],
        conv_bias=arch.get("conv_bias", True),
        norm_op=arch.get("norm_op"),
        norm_op_kwargs=arch.get("norm_op_kwargs"),
        nonlin=arch.get("nonlin"),
        nonlin_kwargs=arch.get("nonlin_kwargs"),
        encoder="residual" if residual else "plain",
    )
    kwargs.update(overrides)
    return QualityPredictor(**kwargs)


def quality_checkpoint_path(dataset_name: str, plans_identifier: str, configuration: str, fold: int | str,
                            results_folder: str | Path | None = None) -> Path:
    """$nnUNet_results/<dataset>/nnUNetSSLQuality__<plans>__<configuration>/fold_<fold>/checkpoint_quality.pth
    (``results_folder`` instead of $nnUNet_results if given)."""
    from nnunet_ssl.data.datasets import require_env

    results = results_folder if results_folder is not None else require_env("nnUNet_results")
    return (Path(results) / dataset_name / f"nnUNetSSLQuality__{plans_identifier}__{configuration}"
            / f"fold_{fold}" / CHECKPOINT_NAME)


def _plain(value: Any) -> Any:
    """meta made of plain Python types only (numpy scalars/arrays and paths converted), for weights_only."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if hasattr(value, "tolist"):  # numpy scalars (np.float64 is a float subclass, but not allowed) and arrays
        return _plain(value.tolist())
    if isinstance(value, bool) or value is None:
        return value
    for kind in (int, float, str):  # exact built-in types only (subclasses such as np.str_ are not allowed)
        if isinstance(value, kind):
            return kind(value)
    return str(value)


def save_quality_checkpoint(path: str | os.PathLike, predictor: QualityPredictor, meta: dict) -> None:
    """Writes {format, init_kwargs, state_dict, meta} atomically (temporary file + rename); loadable with
    ``torch.load(path, weights_only=True)``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "init_kwargs": _plain(predictor.init_kwargs),
        "state_dict": {k: v.detach().cpu().clone() for k, v in predictor.state_dict().items()},
        "meta": _plain(meta),
    }
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=".pth", dir=path.parent)
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_quality_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """The raw checkpoint dict (``weights_only=True``); SSLInputError if missing or not a quality checkpoint."""
    path = Path(path)
    if not path.is_file():
        hint = _train_command_hint(path)
        raise SSLInputError(f"no quality predictor at {path}; train it first with {hint}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to unpickle means a damaged or foreign file
        # never relay torch's advice to retry with weights_only=False: that would execute the file's pickle code
        hint = _train_command_hint(path)
        raise SSLInputError(f"{path} cannot be read as a quality predictor ({type(e).__name__}; truncated or not a "
                            f"checkpoint); retrain it with {hint}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        hint = _train_command_hint(path)
        raise SSLInputError(f"{path} is not a quality predictor checkpoint; retrain it with {hint}")
    return ckpt


def load_quality_predictor(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> QualityPredictor:
    """Rebuilds the predictor from its checkpoint, frozen: ``eval()`` and ``requires_grad_(False)`` (gradients
    still flow through it to its inputs)."""
    ckpt = load_quality_checkpoint(path, map_location)
    predictor = QualityPredictor(**ckpt["init_kwargs"])
    predictor.load_state_dict(ckpt["state_dict"])
    predictor.to(map_location)
    predictor.eval()
    predictor.requires_grad_(False)
    return predictor


def _train_command_hint(path: Path) -> str:
    """'nnUNetv2_ssl_train_quality -d D -c C -f F [-p P]' guessed from a standard checkpoint path."""
    try:
        fold = path.parent.name.removeprefix("fold_")
        _, plans, configuration = path.parent.parent.name.split("__")
        dataset = path.parent.parent.parent.name
        if not dataset.startswith("Dataset"):
            raise ValueError
    except ValueError:
        return "nnUNetv2_ssl_train_quality -d DATASET -c CONFIGURATION -f FOLD"
    plans_part = "" if plans == "nnUNetPlans" else f" -p {plans}"
    return f"nnUNetv2_ssl_train_quality -d {dataset} -c {configuration} -f {fold}{plans_part}"
