"""Phase 1 of quality-guided SSL: training the quality predictor g_phi (``nnUNetv2_ssl_train_quality``).

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

Parts: :mod:`.training_setup` (cases, loader and augmentation), :mod:`.weak_models`, :mod:`.samples` (masks, true
Dice and the held-out report); the command line is :mod:`nnunet_ssl.cli.train_quality`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from nnunet_ssl.errors import SSLInputError
from nnunet_ssl.quality.corruptions import MaskQualitySampler
from nnunet_ssl.quality.predictor import (
    DEFAULT_MAX_FEATURES,
    build_quality_predictor,
    quality_checkpoint_path,
    save_quality_checkpoint,
)
from nnunet_ssl.quality.samples import evaluate, make_samples, plot_scatter
from nnunet_ssl.quality.training_setup import TrainingSetup, class_names, seed_everything
from nnunet_ssl.quality.weak_models import load_weak_checkpoint, train_weak_models

DEFAULT_WEAK_EPOCHS = (1, 3, 5, 10)


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
    setup = TrainingSetup(dataset, configuration, fold, plans)
    out_path = quality_checkpoint_path(setup.dataset_name, plans, configuration, fold)
    if out_path.exists() and not overwrite:
        raise SSLInputError(f"{out_path} exists already; pass --overwrite to retrain it (the old one is replaced)")
    bs = int(batch_size or setup.cm.batch_size)
    print(f"quality predictor for {setup.dataset_name} {configuration} fold {fold}: {len(setup.train_cases)} train "
          f"cases, {len(setup.val_cases)} held-out val cases, {setup.num_input_channels} input channels, "
          f"{setup.num_classes} classes, patch {list(setup.cm.patch_size)}, batch {bs}, device {device}")
    seed_everything(seed)
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
    meta["class_names"] = class_names(setup)
    save_quality_checkpoint(out_path, predictor.cpu(), meta)
    with open(folder / "quality_report.json", "w") as f:
        json.dump(report, f, indent=2)
    plot_scatter(true, pred, class_names(setup), report, str(folder / "quality_scatter.png"))
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
