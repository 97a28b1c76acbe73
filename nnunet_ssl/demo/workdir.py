"""The demo's work folder and the user's raw dataset: what may be created, reused or deleted, and what is refused."""

from __future__ import annotations

import shutil
from pathlib import Path

from nnunet_ssl.demo.settings import DATASET_NAME, MARKER, WORK_SUBFOLDERS


class DemoError(Exception):
    """Bad input or a work folder we must not touch: one line, exit status 2."""


def prepare_workdir(workdir: Path, keep: bool) -> None:
    """Creates or reuses ``workdir``. A non-empty folder without our marker is refused, and inside a marked folder
    only the entries the demo creates are removed (unless ``keep``): user data is never deleted."""
    if workdir.exists() and not workdir.is_dir():
        raise DemoError(f"--workdir {workdir} exists and is not a folder; choose another --workdir")
    marker = workdir / MARKER
    if workdir.is_dir() and any(workdir.iterdir()) and not marker.is_file():
        raise DemoError(f"--workdir {workdir} is not empty and was not made by nnUNetv2_ssl_demo (it has no {MARKER} "
                        "file); choose a new or empty folder")
    workdir.mkdir(parents=True, exist_ok=True)
    marker.write_text("made by nnUNetv2_ssl_demo; the demo may delete nnUNet_raw, nnUNet_preprocessed, "
                      "nnUNet_results and logs in this folder\n")
    for sub in WORK_SUBFOLDERS:
        path = workdir / sub
        if not keep:
            if path.is_symlink() or path.is_file():
                path.unlink()  # a link is removed, never what it points to
            elif path.is_dir():
                shutil.rmtree(path)
        path.mkdir(exist_ok=True)


def check_raw_dataset(raw: Path, workdir: Path) -> tuple[int, str]:
    """Validates a user's raw dataset folder and returns (dataset id, folder name)."""
    if not raw.is_dir():
        raise DemoError(f"--raw {raw} is not a folder; give a raw nnU-Net dataset folder such as .../Dataset004_Name")
    match = DATASET_NAME.match(raw.name)
    if match is None:
        raise DemoError(f"--raw {raw}: the folder name must look like DatasetXXX_Name (three digits), as in nnU-Net")
    missing = [p for p in ("dataset.json", "imagesTr", "labelsTr") if not (raw / p).exists()]
    if missing:
        raise DemoError(f"--raw {raw} has no {', '.join(missing)}; it must be a raw nnU-Net dataset folder")
    raw_resolved, work_resolved = raw.resolve(), workdir.resolve()
    if raw_resolved == work_resolved or work_resolved in raw_resolved.parents:
        raise DemoError(f"--raw {raw} lies inside the work folder {workdir}, which the demo cleans; copy it elsewhere")
    return int(match.group(1)), raw.name
