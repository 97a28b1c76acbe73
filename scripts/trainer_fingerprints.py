"""Fixed-seed fingerprints of every trainer: a few training steps on the synthetic dataset, in-process.

Records, per trainer, each step's total loss, the logged SSL statistics of the epoch, and a checksum of every
network's weights and of the SSL checkpoint state after the steps. Run it before and after a refactor that must not
change behaviour, then compare the two files::

    python scripts/trainer_fingerprints.py --out before.json            # on the old code
    python scripts/trainer_fingerprints.py --out after.json --compare before.json

Progress goes to stderr, one line per trainer. CPU only, ``nnUNet_n_proc_DA=0``: deterministic on one machine.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

STEPS = 3


def _checksum(obj) -> str:
    """SHA-256 over the bytes of every tensor (and repr of every other leaf) of a nested structure, in key order."""
    digest = hashlib.sha256()

    def visit(x):
        if isinstance(x, torch.Tensor):
            digest.update(x.detach().cpu().contiguous().numpy().tobytes())
        elif isinstance(x, dict):
            for k in sorted(x, key=str):
                digest.update(str(k).encode())
                visit(x[k])
        elif isinstance(x, (list, tuple)):
            for v in x:
                visit(v)
        else:
            digest.update(repr(x).encode())

    visit(obj)
    return digest.hexdigest()[:16]


def _plain(module: torch.nn.Module) -> torch.nn.Module:
    for attr in ("module", "_orig_mod"):
        module = getattr(module, attr, module)
    return module


def prepare_dataset(root: Path) -> None:
    from batchgenerators.utilities.file_and_folder_operations import load_json

    from nnunet_ssl.demo.synthetic import make_synthetic_dataset

    make_synthetic_dataset(root / "raw", dataset_id=991, num_train=8, num_unlabeled=4, num_test=2,
                           shape=(16, 32, 32))
    env = {**os.environ, "nnUNet_raw": str(root / "raw"), "nnUNet_preprocessed": str(root / "preprocessed"),
           "nnUNet_results": str(root / "results"), "nnUNet_def_n_proc": "2"}
    env.pop("nnUNet_n_proc_DA", None)
    bin_dir = Path(sys.executable).parent
    subprocess.run([str(bin_dir / "nnUNetv2_plan_and_preprocess"), "-d", "991", "-c", "3d_fullres", "-np", "2",
                    "-npfp", "2"], env=env, check=True, capture_output=True)
    pp = root / "preprocessed" / "Dataset991_SSLSynthetic"
    ids = sorted(p.name[:-5] for p in (pp / "nnUNetPlans_3d_fullres").glob("*.b2nd")
                 if not p.name.endswith("_seg.b2nd"))
    (pp / "splits_final.json").write_text(json.dumps([{"train": ids[:2], "val": ids[2:4], "unlabeled": ids[4:]}]))
    # an untrained quality predictor where the quality-guided trainers look for one
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_ssl.quality.predictor import build_quality_predictor, quality_checkpoint_path, save_quality_checkpoint

    torch.manual_seed(0)
    plans = PlansManager(str(pp / "nnUNetPlans.json"))
    dataset_json = load_json(str(pp / "dataset.json"))
    predictor = build_quality_predictor(plans, plans.get_configuration("3d_fullres"), 1,
                                        plans.get_label_manager(dataset_json).num_segmentation_heads, max_features=8)
    save_quality_checkpoint(quality_checkpoint_path(plans.dataset_name, plans.plans_name, "3d_fullres", 0,
                                                    root / "results"), predictor, {"untrained": True})


def fingerprint(cls, root: Path) -> dict:
    from batchgenerators.utilities.file_and_folder_operations import load_json

    os.environ.update(nnUNet_raw=str(root / "raw"), nnUNet_preprocessed=str(root / "preprocessed"),
                      nnUNet_results=str(root / "results"), nnUNet_n_proc_DA="0", nnUNet_ssl_epochs="2",
                      nnUNet_ssl_iterations_per_epoch=str(STEPS), nnUNet_ssl_val_iterations="1", nnUNet_ssl_seed="0",
                      nnUNet_compile="f")
    pp = root / "preprocessed" / "Dataset991_SSLSynthetic"
    plans = load_json(str(pp / "nnUNetPlans.json"))
    plans["continue_training"] = False
    trainer = cls(plans, "3d_fullres", 0, load_json(str(pp / "dataset.json")), torch.device("cpu"))
    with contextlib.redirect_stdout(io.StringIO()):
        trainer.on_train_start()
        try:
            trainer.on_train_epoch_start()
            losses = [float(trainer.train_step(next(trainer.dataloader_train))["loss"]) for _ in range(STEPS)]
            trainer.on_train_epoch_end([{"loss": np.array(v)} for v in losses])
            logged = {k: v[-1] for k, v in trainer.logger.get_checkpoint().items()
                      if k.startswith("ssl_") and k != "ssl_reference_dice" and v}
            networks = {"network": _plain(trainer.network).state_dict()}
            ref = trainer.reference_network() if hasattr(trainer, "reference_network") else None
            if ref is not None:
                networks["reference"] = _plain(ref).state_dict()
            state = trainer.ssl_state_dict() if hasattr(trainer, "ssl_state_dict") else {}
        finally:
            trainer.on_train_end()
    return {"losses": losses, "logged": {k: float(v) for k, v in sorted(logged.items())},
            "weights": {k: _checksum(v) for k, v in networks.items()},
            "ssl_state": {k: _checksum(v) for k, v in sorted(state.items()) if k != "quality_predictor"}}


def compare(before: dict, after: dict) -> list[str]:
    """Differences between two fingerprint files (exact for checksums, 1e-6 relative for numbers)."""
    problems = []
    for name in sorted(set(before) | set(after)):
        a, b = before.get(name), after.get(name)
        if a is None or b is None:
            problems.append(f"{name}: only in {'after' if a is None else 'before'}")
            continue
        if not np.allclose(a["losses"], b["losses"], rtol=1e-6, atol=0):
            problems.append(f"{name}: losses {a['losses']} != {b['losses']}")
        for key in sorted(set(a["logged"]) | set(b["logged"])):
            x, y = a["logged"].get(key), b["logged"].get(key)
            if x is None or y is None or not np.isclose(x, y, rtol=1e-6, atol=1e-12, equal_nan=True):
                problems.append(f"{name}: logged {key} {x} != {y}")
        for part in ("weights", "ssl_state"):
            if a[part] != b[part]:
                problems.append(f"{name}: {part} {a[part]} != {b[part]}")
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--compare", help="fingerprints of the old code; exit 1 on any difference")
    parser.add_argument("--trainers", nargs="*", help="names (default: every trainer the package exports)")
    args = parser.parse_args()
    from nnunet_ssl import trainers

    names = args.trainers or [n for n in trainers.__all__ if not getattr(getattr(trainers, n), "inference_only", False)]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        prepare_dataset(root)
        for i, name in enumerate(names, 1):
            start = time.time()
            results[name] = fingerprint(getattr(trainers, name), root)
            print(f"[{i}/{len(names)}] {name}: {time.time() - start:.0f} s", file=sys.stderr, flush=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    if args.compare:
        problems = compare(json.loads(Path(args.compare).read_text()), results)
        print("\n".join(problems) if problems else f"identical: {len(results)} trainers")
        sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
