"""The quality predictor's samples and held-out report: masks of varying quality with their true Dice for a batch,
and MAE and Pearson r on the fold's validation cases (with a scatter plot)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from nnunet_ssl.quality.corruptions import MaskQualitySampler, dice_per_class, one_hot, valid_voxels
from nnunet_ssl.quality.predictor import QualityPredictor
from nnunet_ssl.quality.training_setup import TrainingSetup, class_names, seed_everything


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


def evaluate(predictor: QualityPredictor, setup: TrainingSetup,
             weak_models: Sequence[tuple[str, nn.Module]], num_samples: int, batch_size: int,
             seed: int, device: torch.device) -> tuple[dict, np.ndarray, np.ndarray, list[str]]:
    """Held-out report on the fold's val cases: same generator, fixed seed. Returns (report, true, predicted,
    descriptions)."""
    seed_everything(seed)
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
    names = class_names(setup)
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
