"""``nnUNetv2_ssl_train_quality``: Phase 1 of quality-guided SSL, training the quality predictor g_phi.

Paper: Abhishek & Hamarneh, QG-SSL (arXiv 2606.01753); official code sfu-mial/QG-SSL (``train_quality.py``).

    L_phi = SmoothL1(g_phi(x, m_tilde), Dice(m_tilde, m_GT))        (per foreground class, averaged)

over patches of the fold's labeled training cases (nnU-Net's data loader and training augmentation), with masks
m_tilde from ``corruptions.MaskQualitySampler`` and from weak models (partially trained nnU-Nets). The held-out
report (MAE and Pearson r per class, scatter plot) uses the fold's validation cases with the same generator and a
fixed seed.

Deviations from the official code, and why:

- Iterations instead of epochs over images (``--iterations``, default 1000; official: 150 epochs x 50 masks per
  image, batch 32, early stopping): nnU-Net datasets are volumes sampled as patches; there is no early stopping on
  the validation cases because they are the held-out report. Optimiser as official (AdamW, lr 3e-4, weight decay
  5e-4, cosine schedule, SmoothL1).
- Weak models: the official code trains a ResNet-18 U-Net for 20 epochs and keeps epochs 1, 3, 5, 10, 15, 20. Here
  a narrow nnU-Net network of the configuration (widths capped at ``--weak-max-features``, default 32) is trained
  with nnU-Net's Dice + CE loss and SGD (lr 1e-2, momentum 0.99, Nesterov) on the same patches for
  ``--weak-epochs`` (default 1 3 5 10) epochs of ``--weak-iterations-per-epoch`` (default 10) iterations, and
  snapshotted after each; ``--weak-checkpoints`` adds (or, with ``--weak-epochs`` empty, replaces) existing
  nnU-Net checkpoints (``checkpoint_*.pth`` of ``nnUNetv2_train``). The defaults keep this to about a minute on a
  CPU. Weak predictions are given as softmax probabilities half of the time (soft Dice target) and as one-hot
  argmax otherwise (official: binarised only); their share is 0.15 (official script 0.05, class default 0.20).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from nnunet_ssl.errors import SSLInputError, exit_code_of
from nnunet_ssl.quality.corruptions import MaskQualitySampler, dice_per_class, one_hot, valid_voxels
from nnunet_ssl.quality.predictor import (
    DEFAULT_MAX_FEATURES,
    QualityPredictor,
    build_quality_predictor,
    check_supported_labels,
    quality_checkpoint_path,
    save_quality_checkpoint,
)

DEFAULT_WEAK_EPOCHS = (1, 3, 5, 10)


# ----------------------------------------------------------------------------------------------------- set-up


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _fold_cases(pp_base: str, fold: int | str, dataset_name: str,
                available: Sequence[str]) -> tuple[list[str], list[str]]:
    """(train, val) case ids of the fold, like nnU-Net's do_split (budget splits: train = the labeled cases)."""
    from nnunet_ssl.data.datasets import read_splits

    if fold == "all":
        return sorted(available), sorted(available)
    splits = read_splits(pp_base)
    if splits is None:
        # nnU-Net would write the same 5-fold split on its first training; do it now so both agree
        from nnunetv2.utilities.crossval_split import generate_crossval_split

        splits = generate_crossval_split(sorted(available), seed=12345, n_splits=5)
        with open(os.path.join(pp_base, "splits_final.json"), "w") as f:
            json.dump(splits, f, indent=2)
        print(f"wrote nnU-Net's default 5-fold {os.path.join(pp_base, 'splits_final.json')}")
    if not 0 <= int(fold) < len(splits):
        raise SSLInputError(f"fold {fold} does not exist in splits_final.json of {dataset_name} ({len(splits)} "
                            f"folds); use -f 0..{len(splits) - 1} or -f all")
    train, val = list(splits[int(fold)]["train"]), list(splits[int(fold)]["val"])
    missing = sorted(set(train + val) - set(available))
    if missing:
        raise SSLInputError(f"{len(missing)} cases of fold {fold} are not preprocessed (e.g. {missing[0]}); run "
                            f"nnUNetv2_plan_and_preprocess -d {dataset_name} for this configuration")
    if not train or not val:
        raise SSLInputError(f"fold {fold} of {dataset_name} has an empty train or val list; fix splits_final.json")
    return train, val


def _transforms(cm) -> tuple[Any, Any, Any]:
    """nnU-Net's training and validation transforms and the initial (pre-augmentation) patch size, without deep
    supervision (the target stays one tensor)."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    # the method only reads configuration_manager; a namespace avoids building a trainer (which creates folders)
    fake = SimpleNamespace(configuration_manager=cm, print_to_log_file=lambda *a, **k: None)
    rot, dummy_2d, initial_patch_size, mirror_axes = \
        nnUNetTrainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size(fake)
    return rot, dummy_2d, initial_patch_size, mirror_axes


class _Setup:
    """Everything the command derives from -d/-c/-f/-p."""

    def __init__(self, dataset: str, configuration: str, fold: int | str, plans: str) -> None:
        from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

        from nnunet_ssl.data import datasets as ds

        self.dataset_name = ds.resolve_dataset_name(dataset)
        self.pp_base = ds.preprocessed_dataset_folder(self.dataset_name)
        self.plans_identifier = plans
        self.pm = ds.load_plans(self.pp_base, plans)
        self.configuration = configuration
        self.cm = ds.load_configuration(self.pm, configuration)
        self.dataset_json = ds.load_preprocessed_dataset_json(self.pp_base)
        self.lm = self.pm.get_label_manager(self.dataset_json)
        check_supported_labels(self.lm)
        self.num_classes = int(self.lm.num_segmentation_heads)
        channels = self.dataset_json.get("channel_names", self.dataset_json.get("modality", {}))
        self.num_input_channels = len(channels)
        self.data_folder = os.path.join(self.pp_base, self.cm.data_identifier)
        if not os.path.isdir(self.data_folder):
            raise SSLInputError(f"{self.data_folder} is missing; run nnUNetv2_plan_and_preprocess -d "
                                f"{self.dataset_name} -c {configuration}" + ("" if plans == "nnUNetPlans"
                                                                             else f" -p {plans}"))
        self.dataset_class = infer_dataset_class(self.data_folder)
        available = self.dataset_class(self.data_folder).identifiers
        self.fold = fold
        self.train_cases, self.val_cases = _fold_cases(self.pp_base, fold, self.dataset_name, available)

    def loader(self, cases: Sequence[str], batch_size: int, train: bool):
        """nnU-Net's data loader over ``cases``: training augmentation and foreground oversampling 0.5 for
        training, no augmentation for the held-out report. Yields {'data', 'target' (B,1,*patch), 'keys'}."""
        from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
        from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

        patch = tuple(self.cm.patch_size)
        common = dict(is_cascaded=False, foreground_labels=self.lm.foreground_labels, regions=None,
                      ignore_label=self.lm.ignore_label)
        if train:
            rot, dummy_2d, initial, mirror = _transforms(self.cm)
            tr = nnUNetTrainer.get_training_transforms(patch, rot, None, mirror, dummy_2d,
                                                       use_mask_for_norm=self.cm.use_mask_for_norm, **common)
        else:
            initial, tr = patch, nnUNetTrainer.get_validation_transforms(None, **common)
        data = self.dataset_class(self.data_folder, list(cases))
        return nnUNetDataLoader(data, batch_size, initial, patch, self.lm, oversample_foreground_percent=0.5,
                                transforms=tr)


# ------------------------------------------------------------------------------------------------ weak models


def _strip_prefixes(state: dict) -> dict:
    out = {}
    for k, v in state.items():
        for prefix in ("module.", "_orig_mod."):
            while k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def load_weak_checkpoint(path: str, setup: _Setup) -> nn.Module:
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
        net.load_state_dict(_strip_prefixes(ckpt["network_weights"]))
    except RuntimeError as e:
        raise SSLInputError(f"--weak-checkpoints: {path} does not fit {setup.dataset_name} ({setup.num_input_channels}"
                            f" channels, {setup.num_classes} classes): {str(e).splitlines()[0]}") from None
    return net.eval()


def train_weak_models(setup: _Setup, epochs: Sequence[int], iterations_per_epoch: int, batch_size: int,
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


# ------------------------------------------------------------------------------------------------- samples


def make_samples(data: torch.Tensor, target: torch.Tensor, keys: Sequence[str], sampler: MaskQualitySampler,
                 weak_models: Sequence[tuple[str, nn.Module]], ignore_label: int | None,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Masks (B, K, *patch) and their true Dice (B, K-1) for one loader batch; categories drawn per sample."""
    num_classes = sampler.num_classes
    segs = target[:, 0].numpy()
    categories = [sampler.draw_category() for _ in range(len(segs))]
    masks = np.empty((len(segs), num_classes, *segs.shape[1:]), dtype=np.float32)
    descriptions = [""] * len(segs)
    weak_idx = [i for i, c in enumerate(categories) if c == "weak"]
    if weak_idx:
        name, net = weak_models[int(sampler.rng.integers(len(weak_models)))]
        with torch.no_grad():
            probs = torch.softmax(net(data[weak_idx].to(device)).float(), 1).cpu().numpy()
        for j, i in enumerate(weak_idx):
            if sampler.rng.random() < 0.5:
                masks[i], descriptions[i] = probs[j], f"weak:{name}+soft"
            else:
                masks[i], descriptions[i] = one_hot(probs[j].argmax(0), num_classes), f"weak:{name}"
    for i, category in enumerate(categories):
        if category != "weak":
            others = [segs[j] for j in range(len(segs)) if keys[j] != keys[i]]
            masks[i], descriptions[i] = sampler.sample(segs[i], category, others)
    dice = np.stack([dice_per_class(masks[i], segs[i], num_classes, valid_voxels(segs[i], ignore_label))
                     for i in range(len(segs))])
    return torch.from_numpy(masks), torch.from_numpy(dice), descriptions


def _pearson(a: np.ndarray, b: np.ndarray) -> float | None:
    if len(a) < 2 or np.std(a) == 0 or np.std(b) == 0:
        return None
    return float(np.corrcoef(a, b)[0, 1])


def evaluate(predictor: QualityPredictor, setup: _Setup, weak_models, num_samples: int, batch_size: int,
             seed: int, device: torch.device) -> tuple[dict, np.ndarray, np.ndarray, list[str]]:
    """Held-out report on the fold's val cases: same generator, fixed seed. Returns (report, true, predicted,
    descriptions)."""
    _seed_everything(seed)
    sampler = MaskQualitySampler(setup.num_classes, seed=seed, weak_available=bool(weak_models))
    loader = setup.loader(setup.val_cases, batch_size, train=False)
    true, pred, desc = [], [], []
    predictor.eval()
    with torch.no_grad(), tqdm(total=num_samples, desc="held-out", unit="mask", dynamic_ncols=True) as bar:
        while sum(len(t) for t in true) < num_samples:
            batch = next(loader)
            masks, dice, d = make_samples(batch["data"], batch["target"], batch["keys"], sampler, weak_models,
                                          setup.lm.ignore_label, device)
            out = predictor(batch["data"].to(device), masks.to(device)).float().cpu()
            true.append(dice.numpy())
            pred.append(out.numpy())
            desc += d
            bar.update(len(d))
    t, p = np.concatenate(true)[:num_samples], np.concatenate(pred)[:num_samples]
    desc = desc[:num_samples]
    names = _class_names(setup)
    per_class = {}
    for c, name in enumerate(names):
        per_class[name] = {"mae": float(np.abs(t[:, c] - p[:, c]).mean()), "pearson_r": _pearson(t[:, c], p[:, c]),
                           "true_mean": float(t[:, c].mean()), "pred_mean": float(p[:, c].mean())}
    categories = sorted({d.split(":")[0] for d in desc})
    per_category = {}
    for cat in categories:
        sel = np.array([d.split(":")[0] == cat for d in desc])
        per_category[cat] = {"n": int(sel.sum()), "mae": float(np.abs(t[sel] - p[sel]).mean())}
    report = {
        "num_samples": int(len(t)),
        "val_cases": list(setup.val_cases),
        "mae": float(np.abs(t - p).mean()),
        "pearson_r": _pearson(t.ravel(), p.ravel()),
        "per_class": per_class,
        "per_category": per_category,
        "seed": seed,
    }
    return report, t, p, desc


def _class_names(setup: _Setup) -> list[str]:
    by_value = {}
    for name, value in setup.dataset_json["labels"].items():
        if isinstance(value, int) and value > 0 and value != setup.lm.ignore_label:
            by_value[value] = name
    return [by_value.get(c, f"class{c}") for c in range(1, setup.num_classes)]


def plot_scatter(true: np.ndarray, pred: np.ndarray, names: Sequence[str], report: dict, filename: str) -> None:
    """One panel per foreground class: predicted vs true Dice, with the identity line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with plt.style.context("default"):
        fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 4), squeeze=False)
        for c, (ax, name) in enumerate(zip(axes[0], names)):
            ax.scatter(true[:, c], pred[:, c], s=6, alpha=0.5)
            ax.plot([0, 1], [0, 1], "k--", lw=1)
            ax.set_xlim(-0.02, 1.02)
            ax.set_ylim(-0.02, 1.02)
            stats = report["per_class"][name]
            r = "n/a" if stats["pearson_r"] is None else f"{stats['pearson_r']:.3f}"
            ax.set_title(f"{name}: MAE {stats['mae']:.3f}, r {r}")
            ax.set_xlabel("true Dice")
            ax.set_ylabel("predicted Dice")
        fig.tight_layout()
        fig.savefig(filename, dpi=100)
        plt.close(fig)


# ---------------------------------------------------------------------------------------------------- command


def train_quality(dataset: str, configuration: str, fold: int | str, plans: str = "nnUNetPlans",
                  iterations: int = 1000, batch_size: int | None = None, lr: float = 3e-4,
                  weak_checkpoints: Sequence[str] = (), weak_epochs: Sequence[int] = DEFAULT_WEAK_EPOCHS,
                  weak_iterations_per_epoch: int = 10, weak_max_features: int = 32,
                  max_features: int = DEFAULT_MAX_FEATURES, val_samples: int = 200, seed: int = 0,
                  device: str | None = None, overwrite: bool = False) -> Path:
    """Trains the quality predictor of a dataset/configuration/fold and writes checkpoint_quality.pth,
    quality_report.json and quality_scatter.png; returns the checkpoint path."""
    if iterations < 1 or val_samples < 2 or weak_iterations_per_epoch < 1:
        raise SSLInputError("--iterations and --weak-iterations-per-epoch must be >= 1 and --val-samples >= 2")
    if any(int(e) < 1 for e in weak_epochs):
        raise SSLInputError("--weak-epochs takes positive epoch counts, e.g. --weak-epochs 1 3 5 10")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda") or (device == "cuda" and not torch.cuda.is_available()):
        raise SSLInputError(f"-device {device} is not available here; use -device cpu")
    dev = torch.device(device)
    setup = _Setup(dataset, configuration, fold, plans)
    out_path = quality_checkpoint_path(setup.dataset_name, plans, configuration, fold)
    if out_path.exists() and not overwrite:
        raise SSLInputError(f"{out_path} exists already; pass --overwrite to retrain it (the old one is replaced)")
    bs = int(batch_size or setup.cm.batch_size)
    print(f"quality predictor for {setup.dataset_name} {configuration} fold {fold}: {len(setup.train_cases)} train "
          f"cases, {len(setup.val_cases)} held-out val cases, {setup.num_input_channels} input channels, "
          f"{setup.num_classes} classes, patch {list(setup.cm.patch_size)}, batch {bs}, device {device}")
    _seed_everything(seed)
    t0 = time.time()

    weak_models = [(Path(p).name, load_weak_checkpoint(p, setup).to(dev)) for p in weak_checkpoints]
    weak_models += train_weak_models(setup, weak_epochs, weak_iterations_per_epoch, bs, weak_max_features, dev)

    predictor = build_quality_predictor(setup.pm, setup.cm, setup.num_input_channels, setup.num_classes,
                                        max_features=max_features).to(dev)
    opt = torch.optim.AdamW(predictor.parameters(), lr=lr, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=iterations)
    loss_fn = nn.SmoothL1Loss()
    sampler = MaskQualitySampler(setup.num_classes, seed=seed, weak_available=bool(weak_models))
    loader = setup.loader(setup.train_cases, bs, train=True)
    use_amp = dev.type == "cuda"
    predictor.train()
    running_mae = None
    with tqdm(total=iterations, desc="quality predictor", unit="it", dynamic_ncols=True) as bar:
        for _ in range(iterations):
            batch = next(loader)
            masks, dice, _ = make_samples(batch["data"], batch["target"], batch["keys"], sampler, weak_models,
                                          setup.lm.ignore_label, dev)
            x, masks, dice = batch["data"].to(dev), masks.to(dev), dice.to(dev)
            with torch.autocast(dev.type, enabled=use_amp):
                pred = predictor(x, masks)
            loss = loss_fn(pred.float(), dice)  # float32 outside autocast
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            mae = (pred.detach().float() - dice).abs().mean().item()
            running_mae = mae if running_mae is None else 0.95 * running_mae + 0.05 * mae
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}", mae=f"{running_mae:.3f}")
    train_seconds = time.time() - t0

    report, true, pred, _ = evaluate(predictor, setup, weak_models, val_samples, bs, seed + 1, dev)
    report.update(dataset=setup.dataset_name, plans=plans, configuration=configuration, fold=str(fold),
                  train_cases=list(setup.train_cases), iterations=iterations, batch_size=bs,
                  weak_models=[n for n, _ in weak_models], train_seconds=round(train_seconds, 1))
    folder = out_path.parent
    folder.mkdir(parents=True, exist_ok=True)
    meta = {k: report[k] for k in ("dataset", "plans", "configuration", "fold", "train_cases", "val_cases",
                                   "iterations", "batch_size", "weak_models", "seed")}
    meta["heldout"] = {k: report[k] for k in ("num_samples", "mae", "pearson_r", "per_class")}
    meta["class_names"] = _class_names(setup)
    save_quality_checkpoint(out_path, predictor.cpu(), meta)
    with open(folder / "quality_report.json", "w") as f:
        json.dump(report, f, indent=2)
    plot_scatter(true, pred, _class_names(setup), report, str(folder / "quality_scatter.png"))
    _print_report(report, out_path)
    return out_path


def _print_report(report: dict, out_path: Path) -> None:
    r = "n/a" if report["pearson_r"] is None else f"{report['pearson_r']:.3f}"
    print(f"held-out ({report['num_samples']} masks from {len(report['val_cases'])} val cases): "
          f"MAE {report['mae']:.4f}, Pearson r {r}")
    for name, s in report["per_class"].items():
        rc = "n/a" if s["pearson_r"] is None else f"{s['pearson_r']:.3f}"
        print(f"  {name:>20}: MAE {s['mae']:.4f}, Pearson r {rc} (mean true Dice {s['true_mean']:.3f})")
    print(f"checkpoint: {out_path}")
    print(f"report:     {out_path.parent / 'quality_report.json'}, {out_path.parent / 'quality_scatter.png'}")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nnUNetv2_ssl_train_quality",
        description="Train the quality predictor of quality-guided SSL (Phase 1) for one dataset, configuration and "
                    "fold: it predicts the Dice of a segmentation mask per foreground class. Trains on the fold's "
                    "labeled train cases, reports MAE and Pearson r on its val cases.",
    )
    p.add_argument("-d", required=True, help="dataset name or id")
    p.add_argument("-c", required=True, help="configuration, e.g. 3d_fullres or 2d")
    p.add_argument("-f", required=True, help="fold (0-4 or 'all')")
    p.add_argument("-p", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    p.add_argument("--iterations", type=int, default=1000, help="training iterations (default 1000)")
    p.add_argument("--batch-size", type=int, default=None, help="patches per iteration (default: the plans')")
    p.add_argument("--lr", type=float, default=3e-4, help="AdamW learning rate (default 3e-4)")
    p.add_argument("--weak-checkpoints", nargs="*", default=[], metavar="PATH",
                   help="nnU-Net checkpoints (checkpoint_*.pth) whose predictions serve as weak-model masks")
    p.add_argument("--weak-epochs", nargs="*", type=int, default=list(DEFAULT_WEAK_EPOCHS), metavar="E",
                   help="snapshot the internally trained weak model after these epochs (default 1 3 5 10); "
                        "give no value to train none")
    p.add_argument("--weak-iterations-per-epoch", type=int, default=10, help="weak-model iterations per epoch (10)")
    p.add_argument("--weak-max-features", type=int, default=32, help="width cap of the weak model (32)")
    p.add_argument("--max-features", type=int, default=DEFAULT_MAX_FEATURES,
                   help=f"width cap of the predictor's encoder ({DEFAULT_MAX_FEATURES})")
    p.add_argument("--val-samples", type=int, default=200, help="held-out masks in the report (200)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-device", choices=["cpu", "cuda"], default=None, help="default: cuda if available, else cpu")
    p.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint_quality.pth")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)

    def command() -> None:
        fold: int | str = args.f if args.f == "all" else _int_fold(args.f)
        train_quality(args.d, args.c, fold, plans=args.p, iterations=args.iterations, batch_size=args.batch_size,
                      lr=args.lr, weak_checkpoints=args.weak_checkpoints, weak_epochs=args.weak_epochs,
                      weak_iterations_per_epoch=args.weak_iterations_per_epoch,
                      weak_max_features=args.weak_max_features, max_features=args.max_features,
                      val_samples=args.val_samples, seed=args.seed, device=args.device, overwrite=args.overwrite)

    return exit_code_of(command)


def _int_fold(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise SSLInputError(f"-f {text}: the fold is a number (0-4) or 'all'") from None


if __name__ == "__main__":
    sys.exit(main())
