"""The 2D network of cross-dimension co-training (M&N): built, loaded and applied slice-wise to 3D patches.

Two sources:

- ``"plans"``: nnU-Net's own network of a 2D configuration of the plans (``2d`` by default), built as nnU-Net builds
  it (``nnUNetTrainer.build_network_architecture``, without deep supervision), its starting weights from an nnU-Net
  checkpoint of that configuration (``checkpoint_final.pth`` of ``nnUNetv2_train DATASET 2d FOLD``), checked against
  the plans' architecture.
- ``"torchvision:<name>"`` (a segmentation model of ``torchvision.models.get_model``) or ``"timm:<name>"`` (a timm
  encoder, ``features_only``, with a SegFormer-style all-MLP head): natural-image architectures whose weights come
  from a file the user gives (nothing is downloaded); grey-value inputs are repeated to three channels as the
  official M&N code does (``'in': 'repeat'``). LoRA adapters (``peft``, an optional dependency) can be added to the
  encoder.

nnU-Net internals used here: the checkpoint keys ``network_weights`` and ``init_args``
(``nnUNetTrainer.save_checkpoint``), the architecture entry of the plans (``ConfigurationManager.network_arch_*``),
nnU-Net's results layout (``<results>/<dataset>/<trainer>__<plans>__<configuration>/fold_<f>``) and
dynamic_network_architectures' decoder heads ``decoder.seg_layers``. ``tests/trainers/hosts/test_cross_dimension.py``
checks them against the installed nnU-Net.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import nn

from nnunet_ssl.errors import SSLInputError
from nnunet_ssl.utils.files import file_sha256

#: an nnU-Net checkpoint (or a weights file for a torchvision/timm architecture) for the 2D network
ENV_WEIGHTS_2D = "nnUNet_ssl_2d_weights"
#: the supervised trainers whose run of the same fold and 2D configuration is used when no weights are given
SUPERVISED_2D_TRAINERS = ("nnUNetTrainer", "nnUNetTrainerSupervised")
LIBRARIES = ("torchvision", "timm")


# ---------------------------------------------------------------------------------------------------- nnU-Net's 2D
def configuration_2d(plans_manager: PlansManager, name: str) -> ConfigurationManager:
    """The plans' configuration ``name``, which must be 2D (one clear error otherwise)."""
    available = list(plans_manager.available_configurations)
    if name not in available:
        raise SSLInputError(f"the plans {plans_manager.plans_name} have no configuration '{name}' for the 2D network "
                            f"(they have {', '.join(available)}); plan it with nnUNetv2_plan_experiment, or set "
                            "network_2d_configuration to a 2D configuration of the plans")
    configuration = plans_manager.get_configuration(name)
    if len(configuration.patch_size) != 2:
        raise SSLInputError(f"configuration '{name}' of the plans is {len(configuration.patch_size)}D; the 2D network "
                            "needs a 2D configuration (network_2d_configuration)")
    return configuration


def build_plans_network(plans_manager: PlansManager, configuration: ConfigurationManager, num_input_channels: int,
                        num_outputs: int) -> nn.Module:
    """nnU-Net's network of a 2D configuration, built and initialised as nnU-Net builds it, without deep
    supervision; the heads that only deep supervision reads are frozen (:func:`freeze_unused_heads`)."""
    network = nnUNetTrainer.build_network_architecture(plans_manager, configuration, num_input_channels, num_outputs,
                                                       enable_deep_supervision=False)
    freeze_unused_heads(network)
    return network


def freeze_unused_heads(network: nn.Module) -> None:
    """Without deep supervision a dynamic_network_architectures U-Net applies only its last head
    (``decoder.seg_layers[-1]``); the others get no gradient, which DDP (``find_unused_parameters=False``, as
    nnU-Net wraps) refuses, so they are frozen. They stay in the state dict, so nnU-Net checkpoints still load."""
    heads = getattr(getattr(network, "decoder", None), "seg_layers", None)
    if isinstance(heads, nn.ModuleList):
        for head in list(heads)[:-1]:
            head.requires_grad_(False)


def plans_divisor(configuration: ConfigurationManager) -> tuple[int, ...]:
    """The in-plane size a plans network needs a multiple of: the product of its stages' strides per axis."""
    strides = configuration.network_arch_init_kwargs.get("strides")
    if not strides:
        return (1,) * len(configuration.patch_size)
    out = [1] * len(configuration.patch_size)
    for stride in strides:
        stride = [stride] * len(out) if isinstance(stride, int) else list(stride)
        out = [o * int(s) for o, s in zip(out, stride)]
    return tuple(out)


def find_2d_checkpoint(results: str | None, dataset_name: str, plans_name: str, configuration: str,
                       fold: int | str) -> str | None:
    """``checkpoint_final.pth`` of a supervised run (:data:`SUPERVISED_2D_TRAINERS`) of the same dataset, plans,
    2D configuration and fold under ``results`` (nnU-Net's ``nnUNet_results``), or None."""
    if not results:
        return None
    for trainer in SUPERVISED_2D_TRAINERS:
        path = os.path.join(results, dataset_name, f"{trainer}__{plans_name}__{configuration}", f"fold_{fold}",
                            "checkpoint_final.pth")
        if os.path.isfile(path):
            return path
    return None




def _read(path: str, what: str) -> object:
    if not os.path.isfile(path):
        raise SSLInputError(f"the {what} {path} does not exist; give an existing file ({ENV_WEIGHTS_2D} or the "
                            "setting weights_2d)")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a damaged or foreign file: one line, not a pickle traceback
        raise SSLInputError(f"the {what} {path} cannot be read by torch.load ({type(e).__name__}: {e})") from None


def load_nnunet_checkpoint(network: nn.Module, path: str, plans_manager: PlansManager, configuration: str) -> dict:
    """Loads the weights of an nnU-Net checkpoint of the 2D configuration into ``network`` (nnU-Net's network of
    that configuration); one clear error if the file is no such checkpoint, was trained with another configuration
    or architecture, or its weights do not fit. Returns what the log and the SSL state record."""
    checkpoint = _read(path, "2D checkpoint")
    if not isinstance(checkpoint, dict) or "network_weights" not in checkpoint:
        raise SSLInputError(f"{path} is not an nnU-Net checkpoint (no 'network_weights'); give the "
                            f"checkpoint_final.pth of nnUNetv2_train DATASET {configuration} FOLD")
    init_args = checkpoint.get("init_args") or {}
    trained = init_args.get("configuration")
    if trained is not None and trained != configuration:
        raise SSLInputError(f"{path} was trained with configuration '{trained}', the 2D network is the plans' "
                            f"'{configuration}'; give a checkpoint of nnUNetv2_train DATASET {configuration} FOLD")
    theirs = (init_args.get("plans") or {}).get("configurations", {}).get(trained or configuration, {})
    ours = plans_manager.get_configuration(configuration).configuration.get("architecture")
    if theirs.get("architecture") is not None and theirs["architecture"] != ours:
        raise SSLInputError(f"the architecture of {path} ({configuration} of its plans) differs from this dataset's "
                            f"plans {plans_manager.plans_name}; train the 2D run with the same plans")
    try:
        network.load_state_dict(checkpoint["network_weights"])
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise SSLInputError(f"the weights of {path} do not fit the plans' '{configuration}' network ({first}); "
                            "train the 2D run with the same plans and dataset") from None
    return {"path": os.path.abspath(path), "sha256": file_sha256(path), "epoch": checkpoint.get("current_epoch"),
            "trainer": checkpoint.get("trainer_name"), "fold": init_args.get("fold")}


# ---------------------------------------------------------------------------------------------------- libraries
def _import(library: str):
    try:
        if library == "timm":
            import timm
            return timm
        import torchvision.models
        return torchvision.models
    except ImportError:
        raise SSLInputError(f"network_2d='{library}:...' needs {library}, which is not installed: pip install "
                            f"{library}") from None


def parse_library_spec(spec: str) -> tuple[str, str]:
    """``"timm:<name>"`` or ``"torchvision:<name>"`` -> (library, name); one clear error otherwise."""
    library, _, name = spec.partition(":")
    if library not in LIBRARIES or not name:
        raise SSLInputError(f"network_2d={spec!r} is unknown; use 'plans' (nnU-Net's 2d network), "
                            "'torchvision:<segmentation model>' (e.g. torchvision:lraspp_mobilenet_v3_large) or "
                            "'timm:<encoder>' (any timm model that supports features_only, e.g. timm:resnet50)")
    return library, name


class RepeatToRGB(nn.Module):
    """Grey values repeated to the three channels a natural-image network expects (the official ``'in':
    'repeat'``); other channel counts are mapped to three by a 1x1 convolution (the official ``'linear'``)."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.map = None if in_channels in (1, 3) else nn.Conv2d(in_channels, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.map is not None:
            return self.map(x)
        return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


class AllMLPHead(nn.Module):
    """SegFormer's decoder shape on any multi-scale encoder: each feature map projected to ``width`` channels (1x1),
    upsampled to the finest scale, concatenated, fused (1x1, BN, ReLU) and classified (1x1)."""

    def __init__(self, channels: Sequence[int], num_outputs: int, width: int = 256):
        super().__init__()
        self.project = nn.ModuleList(nn.Conv2d(c, width, 1) for c in channels)
        self.fuse = nn.Sequential(nn.Conv2d(width * len(channels), width, 1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU(inplace=True))
        self.classify = nn.Conv2d(width, num_outputs, 1)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        size = features[0].shape[2:]
        maps = [F.interpolate(p(f), size=size, mode="bilinear", align_corners=False) if f.shape[2:] != size else p(f)
                for p, f in zip(self.project, features)]
        return self.classify(self.fuse(torch.cat(maps, 1)))


class LibraryNetwork(nn.Module):
    """A torchvision segmentation model or a timm encoder + :class:`AllMLPHead`, with :class:`RepeatToRGB` in front;
    logits at the input size. ``encoder`` is what LoRA adapts (the whole torchvision model, whose head then stays
    trainable only through LoRA; the timm encoder without the head)."""

    def __init__(self, library: str, name: str, in_channels: int, num_outputs: int):
        super().__init__()
        self.library, self.name = library, name
        self.adapt = RepeatToRGB(in_channels)
        module = _import(library)
        if library == "torchvision":
            try:
                self.encoder = module.get_model(name, weights=None, weights_backbone=None, num_classes=num_outputs)
            except (ValueError, TypeError) as e:
                raise SSLInputError(f"torchvision cannot build segmentation model '{name}' ({e}); use one of "
                                    "torchvision.models.list_models(torchvision.models.segmentation)") from None
            self.head = None
        else:
            try:
                self.encoder = module.create_model(name, pretrained=False, features_only=True)
            except Exception as e:  # timm raises RuntimeError or its own errors for unknown names
                raise SSLInputError(f"timm cannot build a features_only encoder '{name}' ({e})") from None
            self.head = AllMLPHead(self.encoder.feature_info.channels(), num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[2:]
        x = self.adapt(x)
        if self.head is None:
            out = self.encoder(x)
            return out["out"] if isinstance(out, dict) else out
        logits = self.head(self.encoder(x))
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def build_library_network(spec: str, in_channels: int, num_outputs: int) -> LibraryNetwork:
    library, name = parse_library_spec(spec)
    return LibraryNetwork(library, name, in_channels, num_outputs)


def _state_dict_of(obj: object) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        for key in ("network_weights", "state_dict", "model"):
            if isinstance(obj.get(key), dict):
                return obj[key]
        if all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
    raise SSLInputError("the 2D weights file holds no state dict (a dict of tensors, or one under 'state_dict', "
                        "'model' or 'network_weights')")


def load_library_weights(network: LibraryNetwork, path: str) -> dict:
    """Loads a weights file into a library network: into the whole network when its keys are the network's own
    (a file this trainer wrote), else into the encoder (natural-image pretrained weights, e.g. a timm or torchvision
    checkpoint); tensors whose name or shape do not match (a classifier for another number of classes) are
    skipped. One clear error when nothing matches."""
    weights = _state_dict_of(_read(path, "2D weights file"))
    for target in (network, network.encoder):
        own = target.state_dict()
        matching = {k: v for k, v in weights.items() if k in own and own[k].shape == v.shape}
        if matching:
            target.load_state_dict(matching, strict=False)
            return {"path": os.path.abspath(path), "sha256": file_sha256(path), "loaded": len(matching),
                    "skipped": len(weights) - len(matching), "of": len(own)}
    raise SSLInputError(f"no tensor of {path} matches {network.library}:{network.name} (by name and shape); give "
                        "the weights of that architecture")


def add_lora(network: LibraryNetwork, rank: int, alpha: float, targets: Sequence[str], dropout: float) -> None:
    """LoRA adapters (``peft``) on the encoder's ``targets`` modules; the encoder's other weights are frozen, the
    input map and the head stay trainable (the official M&N code: SegFormer with LoRA rank 64, alpha 64, dropout
    0.1, biases trainable)."""
    try:
        import peft
    except ImportError:
        raise SSLInputError("lora_rank > 0 needs the optional package peft, which is not installed: pip install "
                            "peft (or set lora_rank=0)") from None
    config = peft.LoraConfig(r=int(rank), lora_alpha=float(alpha), target_modules=list(targets),
                             lora_dropout=float(dropout), bias="all")
    try:
        network.encoder = peft.get_peft_model(network.encoder, config)
    except ValueError as e:
        raise SSLInputError(f"LoRA found no module named {list(targets)} in {network.library}:{network.name} ({e}); "
                            "set lora_targets to module names of that architecture") from None


# ---------------------------------------------------------------------------------------------------- slice-wise
class SliceWise(nn.Module):
    """A 2D network applied to every slice of a 3D patch along the first spatial axis (the axis nnU-Net's 2d
    configuration slices): (B, C, Z, Y, X) -> (B*Z, C, Y, X), padded in-plane with zeros to a multiple of
    ``divisor`` (as nnU-Net pads for inference), the network, cropped back, (B, K, Z, Y, X). 2D input (B, C, Y, X)
    goes to the network directly (with the same padding). Deep-supervision lists keep their full-resolution entry.

    ``output_shapes`` (set only around nnU-Net's validation step) makes the output a list with one entry per
    deep-supervision target shape (the full-resolution logits resized), so nnU-Net's deep-supervised validation
    loss accepts it; the pseudo-Dice reads the first entry only."""

    def __init__(self, network: nn.Module, divisor: Sequence[int] = (1, 1)):
        super().__init__()
        self.network = network
        self.divisor = tuple(int(d) for d in divisor)
        self.output_shapes: list[tuple[int, ...]] | None = None

    def planar(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[2:]
        pad = [(-s) % d for s, d in zip(size, self.divisor)]
        if any(pad):
            x = F.pad(x, [0, pad[1], 0, pad[0]])
        out = self.network(x)
        if isinstance(out, (list, tuple)):
            out = out[0]
        elif isinstance(out, dict):
            out = out["out"]
        return out[..., : size[0], : size[1]] if any(pad) else out

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        if x.ndim == 4:
            out = self.planar(x)
        elif x.ndim == 5:
            b, c, z, y, w = x.shape
            slices = x.transpose(1, 2).reshape(b * z, c, y, w)
            out = self.planar(slices)
            out = out.reshape(b, z, out.shape[1], y, w).transpose(1, 2)
        else:
            raise SSLInputError(f"the 2D network takes 2D or 3D patches (B, C, ...), got shape {tuple(x.shape)}")
        if self.output_shapes is None:
            return out
        return [out if tuple(s) == tuple(out.shape[2:]) else F.interpolate(out, size=tuple(s), mode="nearest")
                for s in self.output_shapes]
