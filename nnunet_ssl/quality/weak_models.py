"""Weak models for the quality predictor's masks: existing nnU-Net checkpoints, or a narrow nnU-Net network of the
configuration trained briefly and snapshotted after a few epochs."""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence

import torch
from torch import nn
from tqdm import tqdm

from nnunet_ssl.compat.tooling import strip_wrapper_prefixes
from nnunet_ssl.errors import SSLInputError
from nnunet_ssl.quality.training_setup import TrainingSetup


def load_weak_checkpoint(path: str, setup: TrainingSetup) -> nn.Module:
    """An nnU-Net checkpoint (``checkpoint_*.pth`` of nnUNetv2_train) as a network with deep supervision off."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    if not os.path.isfile(path):
        raise SSLInputError(f"--weak-checkpoints: {path} does not exist; pass checkpoint_*.pth files of "
                            "nnUNetv2_train")
    # nnU-Net's own checkpoints hold numpy values and are loaded with weights_only=False by nnU-Net too; this is
    # the user's own file, named on the command line
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(ckpt, dict) or "network_weights" not in ckpt or "init_args" not in ckpt:
        raise SSLInputError(f"--weak-checkpoints: {path} is not an nnU-Net training checkpoint (no network_weights "
                            "or init_args)")
    init = ckpt["init_args"]
    cm = PlansManager(init["plans"]).get_configuration(init["configuration"])
    if len(cm.patch_size) != len(setup.cm.patch_size):
        raise SSLInputError(f"--weak-checkpoints: {path} is a {len(cm.patch_size)}D model but configuration "
                            f"{setup.configuration} is {len(setup.cm.patch_size)}D; use checkpoints of the same "
                            "configuration")
    net = get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                 cm.network_arch_init_kwargs_req_import, setup.num_input_channels,
                                 setup.num_classes, allow_init=False, deep_supervision=False)
    try:
        net.load_state_dict(strip_wrapper_prefixes(ckpt["network_weights"]))
    except RuntimeError as e:
        raise SSLInputError(f"--weak-checkpoints: {path} does not fit {setup.dataset_name} ({setup.num_input_channels}"
                            f" channels, {setup.num_classes} classes): {str(e).splitlines()[0]}") from None
    return net.eval()


def train_weak_models(setup: TrainingSetup, epochs: Sequence[int], iterations_per_epoch: int, batch_size: int,
                      max_features: int, device: torch.device) -> list[tuple[str, nn.Module]]:
    """A narrow nnU-Net of the configuration trained on the fold's train patches; a snapshot after each of
    ``epochs`` (cumulative epoch counts). Returns [(name, network in eval mode on ``device``)]."""
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    if not epochs:
        return []
    cm = setup.cm
    arch = dict(cm.network_arch_init_kwargs)
    arch["features_per_stage"] = [min(int(f), max_features) for f in arch["features_per_stage"]]
    net = get_network_from_plans(cm.network_arch_class_name, arch, cm.network_arch_init_kwargs_req_import,
                                 setup.num_input_channels, setup.num_classes, deep_supervision=False).to(device)
    loss_fn = DC_and_CE_loss({"batch_dice": cm.batch_dice, "smooth": 1e-5, "do_bg": False, "ddp": False}, {},
                             weight_ce=1, weight_dice=1, ignore_label=setup.lm.ignore_label,
                             dice_class=MemoryEfficientSoftDiceLoss)
    opt = torch.optim.SGD(net.parameters(), lr=1e-2, momentum=0.99, nesterov=True, weight_decay=3e-5)
    loader = setup.loader(setup.train_cases, batch_size, train=True)
    snapshots: list[tuple[str, nn.Module]] = []
    targets = sorted(set(int(e) for e in epochs))
    total = targets[-1] * iterations_per_epoch
    net.train()
    with tqdm(total=total, desc="weak models", unit="it", dynamic_ncols=True) as bar:
        for it in range(1, total + 1):
            batch = next(loader)
            x, y = batch["data"].to(device), batch["target"].to(device)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(net(x), y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 12)
            opt.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if it % iterations_per_epoch == 0 and it // iterations_per_epoch in targets:
                snapshots.append((f"weak_epoch{it // iterations_per_epoch}", copy.deepcopy(net).eval()))
    return snapshots
