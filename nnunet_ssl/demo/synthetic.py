"""A small synthetic 3D dataset in nnU-Net raw format, for the demo and the tests.

Each case is a noisy volume with a smooth intensity bias holding two touching ellipsoids (labels 1 and 2),
a layout loosely modelled on the anterior/posterior hippocampus. Intensities of the two structures overlap
with the background, so the task needs shape context and is not solved by thresholding.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk


def _ellipsoid(shape: tuple[int, int, int], center: np.ndarray, radii: np.ndarray) -> np.ndarray:
    zz, yy, xx = np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij")
    d = ((zz - center[0]) / radii[0]) ** 2 + ((yy - center[1]) / radii[1]) ** 2 + ((xx - center[2]) / radii[2]) ** 2
    return d <= 1.0


def make_case(rng: np.random.Generator, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Returns (image float32, label uint8), both in (z, y, x) order."""
    s = np.array(shape, dtype=np.float32)
    center = s / 2 + rng.uniform(-0.12, 0.12, 3) * s
    radii = s * rng.uniform(0.16, 0.24, 3)
    axis = rng.integers(1, 3)  # the two parts sit side by side along y or x
    offset = np.zeros(3, dtype=np.float32)
    offset[axis] = radii[axis] * rng.uniform(0.9, 1.3)
    part1 = _ellipsoid(shape, center - offset / 2, radii)
    part2 = _ellipsoid(shape, center + offset / 2, radii * rng.uniform(0.6, 0.85, 3)) & ~part1
    label = np.zeros(shape, dtype=np.uint8)
    label[part1] = 1
    label[part2] = 2

    zz, yy, xx = np.meshgrid(*[np.linspace(-1, 1, n, dtype=np.float32) for n in shape], indexing="ij")
    bias = 1.0 + 0.25 * (rng.uniform(-1, 1) * zz + rng.uniform(-1, 1) * yy + rng.uniform(-1, 1) * xx)
    image = np.full(shape, 100.0, dtype=np.float32)
    image[part1] = 140.0 + rng.normal(0, 5)
    image[part2] = 120.0 + rng.normal(0, 5)
    image = image * bias + rng.normal(0, 18.0, shape).astype(np.float32)
    return image.astype(np.float32), label


def _write(array: np.ndarray, path: Path, spacing_zyx: tuple[float, float, float]) -> None:
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(tuple(float(x) for x in spacing_zyx[::-1]))
    sitk.WriteImage(img, str(path))


def make_synthetic_dataset(
    raw_root: str | os.PathLike,
    dataset_id: int = 990,
    name: str = "SSLSynthetic",
    num_train: int = 12,
    num_unlabeled: int = 6,
    num_test: int = 4,
    shape: tuple[int, int, int] = (24, 40, 40),
    spacing: tuple[float, float, float] = (1.5, 1.0, 1.0),
    seed: int = 0,
) -> Path:
    """Writes ``Dataset{id:03d}_{name}`` under ``raw_root`` with imagesTr/labelsTr, imagesUnlabeled and
    imagesTs/labelsTs, and returns its folder. An existing folder is replaced only if it was made by this
    function (it carries a marker file); anything else raises FileExistsError."""
    folder = Path(raw_root) / f"Dataset{dataset_id:03d}_{name}"
    marker = folder / ".nnunet_ssl_synthetic"
    if folder.exists():
        if not marker.exists():
            raise FileExistsError(f"{folder} exists and was not made by make_synthetic_dataset; not overwriting it")
        import shutil

        shutil.rmtree(folder)
    for sub in ("imagesTr", "labelsTr", "imagesUnlabeled", "imagesTs", "labelsTs"):
        (folder / sub).mkdir(parents=True)
    marker.touch()
    rng = np.random.default_rng(seed)
    for i in range(num_train):
        img, lab = make_case(rng, shape)
        _write(img, folder / "imagesTr" / f"case_{i:03d}_0000.nii.gz", spacing)
        _write(lab, folder / "labelsTr" / f"case_{i:03d}.nii.gz", spacing)
    for i in range(num_unlabeled):
        img, _ = make_case(rng, shape)
        _write(img, folder / "imagesUnlabeled" / f"unl_{i:03d}_0000.nii.gz", spacing)
    for i in range(num_test):
        img, lab = make_case(rng, shape)
        _write(img, folder / "imagesTs" / f"test_{i:03d}_0000.nii.gz", spacing)
        _write(lab, folder / "labelsTs" / f"test_{i:03d}.nii.gz", spacing)
    dataset_json = {
        "channel_names": {"0": "MRI"},
        "labels": {"background": 0, "part1": 1, "part2": 2},
        "numTraining": num_train,
        "file_ending": ".nii.gz",
        "name": name,
        "description": "synthetic two-part ellipsoids made by nnunet_ssl.demo.synthetic",
    }
    (folder / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
    return folder


def save_random_model_folder(pp_dataset: Path, results: Path, folds: tuple = (0,),
                             checkpoints: tuple = ("checkpoint_final.pth",), trainer: str = "nnUNetTrainer",
                             configuration: str = "3d_fullres", seed: int = 0, foreground_bias: float = 0.0,
                             plans_name: str = "nnUNetPlans") -> Path:
    """A model folder as nnUNetv2_train leaves it (plans.json, dataset.json, fold_<f>/<checkpoint>), with untrained
    networks (another seed per fold and checkpoint), for tests and measurements of prediction tools: nnU-Net's
    predictor loads it like a trained one. ``foreground_bias`` is added to the foreground logits' bias, so
    the untrained networks predict some foreground."""
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans = json.loads((pp_dataset / f"{plans_name}.json").read_text())
    dataset_json = json.loads((pp_dataset / "dataset.json").read_text())
    pm = PlansManager(plans)
    cm = pm.get_configuration(configuration)
    heads = pm.get_label_manager(dataset_json).num_segmentation_heads
    folder = results / pm.dataset_name / f"{trainer}__{pm.plans_name}__{configuration}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "plans.json").write_text(json.dumps(plans, indent=1))
    (folder / "dataset.json").write_text(json.dumps(dataset_json, indent=1))
    for i, fold in enumerate(folds):
        (folder / f"fold_{fold}").mkdir(exist_ok=True)
        for j, checkpoint in enumerate(checkpoints):
            torch.manual_seed(seed + 100 * i + j)
            net = nnUNetTrainer.build_network_architecture(pm, cm, len(dataset_json["channel_names"]), heads,
                                                           enable_deep_supervision=False)
            state = net.state_dict()
            bias = [k for k in state if k.startswith("decoder.seg_layers") and k.endswith(".bias")][-1]
            state[bias][1:] += foreground_bias
            torch.save({"network_weights": state, "trainer_name": trainer,
                        "init_args": {"configuration": configuration},
                        "inference_allowed_mirroring_axes": (0, 1, 2)}, folder / f"fold_{fold}" / checkpoint)
    return folder
