"""Shared helpers for tests that build trainers in-process."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from batchgenerators.utilities.file_and_folder_operations import load_json


def write_budget_splits(pp_dataset: Path, labeled: list[str], val: list[str], unlabeled: list[str]) -> None:
    (pp_dataset / "splits_final.json").write_text(
        json.dumps([{"train": labeled, "val": val, "unlabeled": unlabeled}], indent=1))


def make_trainer(cls, root: Path, dataset: str, monkeypatch, fold: int = 0, configuration: str = "3d_fullres",
                 seed: int | None = 0, epochs: int | str = 2, iterations: int = 2, continue_training: bool = False,
                 device: str = "cpu"):
    """A trainer built as nnUNetv2_train builds it, with the nnU-Net folders of ``root``."""
    monkeypatch.setenv("nnUNet_raw", str(root / "raw"))
    monkeypatch.setenv("nnUNet_preprocessed", str(root / "preprocessed"))
    monkeypatch.setenv("nnUNet_results", str(root / "results"))
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    monkeypatch.setenv("nnUNet_ssl_epochs", str(epochs))
    monkeypatch.setenv("nnUNet_ssl_iterations_per_epoch", str(iterations))
    monkeypatch.setenv("nnUNet_ssl_val_iterations", "1")
    if seed is None:
        monkeypatch.delenv("nnUNet_ssl_seed", raising=False)
    else:
        monkeypatch.setenv("nnUNet_ssl_seed", str(seed))
    pp = root / "preprocessed" / dataset
    plans = load_json(str(pp / "nnUNetPlans.json"))
    plans["continue_training"] = continue_training
    return cls(plans, configuration, fold, load_json(str(pp / "dataset.json")), torch.device(device))


def save_untrained_quality_predictor(pp_dataset: Path, results: Path | None = None, seed: int = 0,
                                     configuration: str = "3d_fullres", fold: int = 0) -> tuple[Path, dict]:
    """An untrained quality predictor saved where the quality-guided trainers look for one ($nnUNet_results unless
    ``results`` is given). Returns its path and a copy of its weights."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_ssl.quality.predictor import build_quality_predictor, quality_checkpoint_path, save_quality_checkpoint

    torch.manual_seed(seed)
    plans = PlansManager(str(pp_dataset / "nnUNetPlans.json"))
    dataset_json = load_json(str(pp_dataset / "dataset.json"))
    predictor = build_quality_predictor(plans, plans.get_configuration(configuration),
                                        len(dataset_json["channel_names"]),
                                        plans.get_label_manager(dataset_json).num_segmentation_heads, max_features=8)
    path = quality_checkpoint_path(plans.dataset_name, plans.plans_name, configuration, fold, results)
    save_quality_checkpoint(path, predictor, {"untrained": True})
    return path, {k: v.detach().clone() for k, v in predictor.state_dict().items()}


def case_ids(pp_dataset: Path) -> list[str]:
    return sorted(p.name[: -len(".b2nd")] for p in (pp_dataset / "nnUNetPlans_3d_fullres").glob("*.b2nd")
                  if not p.name.endswith("_seg.b2nd"))


def train_resume_predict(root: Path, dataset_id: int, dataset: str, trainer: str, predict_input: Path,
                         configuration: str = "3d_fullres", iterations: int = 2) -> dict:
    """nnUNetv2_train for 1 epoch, --c to 2 epochs, nnUNetv2_predict with the final checkpoint and, where the
    trainer writes one, with checkpoint_final_teacher.pth. Returns paths and the two training logs. Predictions skip
    nnU-Net's mirroring (its own code, 8 passes per patch): 23 s instead of 69 s for 3 Hippocampus images."""
    from conftest import nnunet_env, run_cli

    env = nnunet_env(root, training=True)
    env.update(nnUNet_ssl_iterations_per_epoch=str(iterations), nnUNet_ssl_val_iterations="1", nnUNet_ssl_seed="0")
    train = ["nnUNetv2_train", str(dataset_id), configuration, "0", "-tr", trainer, "-device", "cpu"]
    first = run_cli(train, env={**env, "nnUNet_ssl_epochs": "1"})
    second = run_cli([*train, "--c"], env={**env, "nnUNet_ssl_epochs": "2"})
    out = root / "results" / dataset / f"{trainer}__nnUNetPlans__{configuration}" / "fold_0"
    predictions = {}
    checkpoints = ["checkpoint_final.pth"] + sorted(p.name for p in out.glob("checkpoint_final_*.pth"))
    for chk in checkpoints:
        target = root / f"pred_{trainer}_{chk.removesuffix('.pth')}"
        run_cli(["nnUNetv2_predict", "-i", str(predict_input), "-o", str(target), "-d", str(dataset_id), "-c",
                 configuration, "-f", "0", "-tr", trainer, "-chk", chk, "-device", "cpu", "-npp", "1", "-nps", "1",
                 "--disable_tta"],
                env=env)
        predictions[chk] = target
    return {"output": out, "first": first, "second": second, "predictions": predictions, "iterations": iterations}


# one trainer per host for the pipeline runs (train, --c, predict with every checkpoint), about 1-2 min each on 2
# cores; a loss variant takes its host's command-line path, and test_hosts.py plugs each loss into every host and
# resumes it in-process
HOST_TRAINERS = ["nnUNetTrainerMeanTeacher", "nnUNetTrainerFixMatch", "nnUNetTrainerCPS", "nnUNetTrainerMEDL",
                 "nnUNetTrainerUAMT", "nnUNetTrainerADMT", "nnUNetTrainerBCP"]
EXTRA_CHECKPOINTS = {"MeanTeacher": ["checkpoint_final_teacher.pth"], "CPS": ["checkpoint_final_net2.pth"],
                     "FixMatch": [], "MEDL": ["checkpoint_final_net2.pth"], "UAMT": ["checkpoint_final_teacher.pth"],
                     "ADMT": ["checkpoint_final_teacher.pth", "checkpoint_final_teacher2.pth"],
                     "BCP": ["checkpoint_final_teacher.pth"]}


def assert_trained_resumed_predicted(result: dict, images: Path, trainer: str, file_ending: str = ".nii.gz") -> None:
    import SimpleITK as sitk

    out = result["output"]
    host = next(h for h in EXTRA_CHECKPOINTS if trainer.startswith(f"nnUNetTrainer{h}"))
    for f in ("checkpoint_final.pth", "progress.png", "progress_ssl.png", "validation/summary.json",
              *EXTRA_CHECKPOINTS[host]):
        assert (out / f).is_file(), f
    assert set(result["predictions"]) == {"checkpoint_final.pth", *EXTRA_CHECKPOINTS[host]}
    final = torch.load(out / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert final["current_epoch"] == 2
    # SSL counters continued across --c: two epochs of iterations, one logged value per epoch
    assert final["ssl_state"]["ssl_step"] == 2 * result["iterations"]
    assert len(final["logging"]["ssl_lambda"]) == 2 and len(final["logging"]["ssl_reference_dice"]) == 2
    # the resumed run continued at epoch 1 and did not redo epoch 0
    assert "Epoch 1" in result["second"].stdout and "Epoch 0\n" not in result["second"].stdout
    for target in result["predictions"].values():
        for img in sorted(images.glob(f"*_0000{file_ending}")):
            case = img.name[: -len(f"_0000{file_ending}")]
            pred_file = target / f"{case}{file_ending}"
            assert pred_file.is_file(), pred_file
            pred, ref = sitk.ReadImage(str(pred_file)), sitk.ReadImage(str(img))
            assert pred.GetSize() == ref.GetSize()
            assert np.allclose(pred.GetSpacing(), ref.GetSpacing()) and np.allclose(pred.GetOrigin(), ref.GetOrigin())

# MEDL writes network 2 as checkpoint_final_net2.pth, like CPS


def budget_split(ds: dict) -> tuple[list[str], list[str], list[str]]:
    """A label budget on the synthetic dataset: 2 labeled, 2 validation, the rest unlabeled."""
    pp = ds["root"] / "preprocessed" / ds["dataset"]
    ids = case_ids(pp)
    labeled, val, unlabeled = ids[:2], ids[2:4], ids[4:]
    write_budget_splits(pp, labeled, val, unlabeled)
    return labeled, val, unlabeled


def budgeted_trainer(cls, ds: dict, monkeypatch, **kwargs):
    """``cls`` on the synthetic dataset with :func:`budget_split`'s budget, initialised (kwargs: make_trainer's)."""
    budget_split(ds)
    trainer = make_trainer(cls, ds["root"], ds["dataset"], monkeypatch, **kwargs)
    trainer.initialize()
    return trainer


def record_unsupervised_calls(monkeypatch, cls) -> list[tuple[int, int]]:
    """Patches ``cls.unsupervised_loss`` to record (step.direction, batch size) of every call, in order."""
    calls: list[tuple[int, int]] = []
    original = cls.unsupervised_loss

    def recording(self, student, reference, step, voxel_weights=None):
        calls.append((step.direction, student.shape[0]))
        return original(self, student, reference, step, voxel_weights)

    monkeypatch.setattr(cls, "unsupervised_loss", recording)
    return calls


def random_batch(trainer, patch: tuple[int, ...], seed: int = 0, labeled: int = 2, unlabeled: int = 2,
                 views: int = 2) -> tuple[torch.Tensor, list[torch.Tensor], dict[str, torch.Tensor]]:
    """Seeded labeled images, nnU-Net's deep-supervision targets for ``trainer``'s network (3 classes) and
    ``views`` unlabeled views: (data, target, {"view0": ..., ...})."""
    g = torch.Generator().manual_seed(seed)
    data = torch.randn(labeled, 1, *patch, generator=g)
    full = torch.randint(0, 3, (labeled, 1, *patch), generator=g).float()
    with torch.no_grad():
        out = trainer.network(torch.zeros(1, 1, *patch))
    shapes = [tuple(o.shape[2:]) for o in (out if isinstance(out, (list, tuple)) else [out])]
    target = [torch.nn.functional.interpolate(full, size=s, mode="nearest") for s in shapes]
    return data, target, {f"view{k}": torch.randn(unlabeled, 1, *patch, generator=g) for k in range(views)}


def state_copy(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of a module's state dict, to compare before and after training steps."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def copy_hippocampus(raw: Path, source: Path, labeled: list[str], unlabeled: list[str]) -> None:
    """Hippocampus training cases into an nnU-Net raw folder: ``labeled`` with their labels, ``unlabeled`` as images
    only (their labels are never copied), and a dataset.json counting the labeled cases."""
    import shutil

    for sub in ("imagesTr", "labelsTr", "imagesUnlabeled"):
        (raw / sub).mkdir(parents=True)
    for case in labeled:
        shutil.copy(source / "imagesTr" / f"{case}_0000.nii.gz", raw / "imagesTr")
        shutil.copy(source / "labelsTr" / f"{case}.nii.gz", raw / "labelsTr")
    for case in unlabeled:
        shutil.copy(source / "imagesTr" / f"{case}_0000.nii.gz", raw / "imagesUnlabeled")
    meta = json.loads((source / "dataset.json").read_text())
    meta["numTraining"] = len(labeled)
    (raw / "dataset.json").write_text(json.dumps(meta))


def planned_plans(ds: dict) -> dict:
    """nnU-Net's plans of a planned dataset fixture, as a dict."""
    return json.loads((ds["root"] / "preprocessed" / ds["dataset"] / "nnUNetPlans.json").read_text())


def read_image(path):
    """(array, SimpleITK image) of an image file."""
    import SimpleITK as sitk

    img = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(img), img



def predict_in_process(ds: dict, out: Path, checkpoint: str, monkeypatch):
    """nnUNetv2_predict -chk ``checkpoint`` of the run folder ``out`` (fold_0) on the dataset's imagesTs, in-process
    (the CLI's start-up alone takes 25 s on 2 cores), without mirroring; the predictor resolves the checkpoint's
    trainer among ours. Asserts one prediction per image and returns the predictor."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from nnunet_ssl import ext_trainer_path

    monkeypatch.setenv("nnUNet_extTrainer", ext_trainer_path())
    predictor = nnUNetPredictor(use_mirroring=False, device=torch.device("cpu"), allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(out.parent), (0,), checkpoint_name=checkpoint)
    images = ds["root"] / "raw" / ds["dataset"] / "imagesTs"
    target = ds["root"] / f"pred_{checkpoint.removesuffix('.pth')}"
    target.mkdir()
    predictor.predict_from_files_sequential(str(images), str(target))
    assert len(list(target.glob("*.nii.gz"))) == len(list(images.glob("*_0000.nii.gz"))) > 0
    return predictor
