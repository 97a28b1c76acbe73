"""A CPU-sized plans variant that reuses the dataset's preprocessed data (``nnUNetv2_ssl_cpu_plans``).

nnU-Net's plans size the network and batch for a GPU; on a 2-core CPU one iteration of Hippocampus' own plans
takes about 10 s. This writes ``nnUNet_preprocessed/<Dataset>/<name>.json`` (default ``nnUNetPlans_CPU``), a copy
of the source plans where every non-cascade configuration gets a smaller batch and narrower features per stage.
The number of stages, strides, kernels and patch size are unchanged, and each configuration keeps the source's
``data_identifier``, so nnU-Net reads the data it already preprocessed (the way nnU-Net's own plans variants
share data). Train with ``-p nnUNetPlans_CPU``. The command line is :mod:`nnunet_ssl.cli.cpu_plans`.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from copy import deepcopy

from nnunet_ssl.data import datasets
from nnunet_ssl.errors import SSLInputError

DEFAULT_NAME = "nnUNetPlans_CPU"
DEFAULT_BATCH = 2
DEFAULT_MAX_FEATURES = (16, 32, 64, 128)


def cpu_features(source: Sequence[int], base: int, maximum: int) -> list[int]:
    """Features per stage: ``base * 2**stage`` capped at ``maximum`` (Hippocampus' 4 stages: 16-32-64-128)."""
    return [min(base * 2**i, maximum) for i in range(len(source))]


def make_cpu_plans(plans: dict, batch_size: int = DEFAULT_BATCH, base_features: int = 16,
                   max_features: int = 128, name: str = DEFAULT_NAME,
                   configurations: Sequence[str] | None = None) -> dict:
    """A copy of ``plans`` (a plans dict) with smaller batch and features (pure; nothing is read or written)."""
    if batch_size < 1 or base_features < 1 or max_features < base_features:
        raise SSLInputError("need --batch-size >= 1 and 1 <= --base-features <= --max-features")
    out = deepcopy(plans)
    source_name = plans.get("plans_name", "nnUNetPlans")
    out["plans_name"] = name
    changed = []
    for cname, config in out["configurations"].items():
        if configurations is not None and cname not in configurations:
            continue
        if "inherits_from" in config and "data_identifier" not in config:
            # resolve what the variant inherits so the data identifier stays the source's
            parent = plans["configurations"][config["inherits_from"]]
            config.setdefault("data_identifier", parent.get("data_identifier"))
        arch = config.get("architecture")
        if config.get("previous_stage") is not None or arch is None:
            continue
        kwargs = arch["arch_kwargs"]
        kwargs["features_per_stage"] = cpu_features(kwargs["features_per_stage"], base_features, max_features)
        config["batch_size"] = batch_size
        config.setdefault("data_identifier", f"{source_name}_{cname}")
        changed.append(cname)
    if configurations is not None:
        missing = sorted(set(configurations) - set(changed))
        if missing:
            raise SSLInputError(f"configuration(s) {missing} are not non-cascade configurations of plans "
                                f"{source_name!r}; available: {sorted(plans['configurations'])}")
    return out


def write_cpu_plans(dataset: str | int, source_plans: str = "nnUNetPlans", name: str = DEFAULT_NAME,
                    batch_size: int = DEFAULT_BATCH, base_features: int = 16, max_features: int = 128,
                    configurations: Sequence[str] | None = None, overwrite: bool = False) -> str:
    """Writes the CPU plans next to the source plans and returns the file's path. An existing file with different
    content is kept unless ``overwrite``: trainings made with it would no longer match their plans."""
    if name == source_plans:
        raise SSLInputError(f"--name {name!r} would overwrite the source plans; choose another name")
    dataset_name = datasets.resolve_dataset_name(dataset)
    pp_base = datasets.preprocessed_dataset_folder(dataset_name)
    plans = datasets.load_plans(pp_base, source_plans).plans
    cpu = make_cpu_plans(plans, batch_size, base_features, max_features, name, configurations)
    path = os.path.join(pp_base, name + ".json")
    if os.path.isfile(path) and not overwrite:
        if datasets.load_json_file(path) == json.loads(json.dumps(cpu)):
            print(f"{path} is already up to date")
            return path
        raise SSLInputError(f"{path} exists with other settings; pass --overwrite to replace it (models trained "
                            f"with -p {name} would then no longer match their plans) or choose another --name")
    fd, tmp = tempfile.mkstemp(prefix=".plans-", suffix=".tmp", dir=pp_base)
    with os.fdopen(fd, "w") as f:
        json.dump(cpu, f, indent=4, sort_keys=False)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    print(f"wrote {path}")
    for cname, config in cpu["configurations"].items():
        if config != plans["configurations"].get(cname):
            print(f"  {cname}: batch {config['batch_size']}, features "
                  f"{config['architecture']['arch_kwargs']['features_per_stage']}, data {config['data_identifier']}")
    print(f"train with: nnUNetv2_train {dataset_name} CONFIGURATION FOLD -p {name} -tr TRAINER")
    return path
