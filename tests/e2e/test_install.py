"""A non-editable install ships the trainers and the nnUNet_extTrainer shim, and nnU-Net finds them there."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from conftest import REPO


def test_non_editable_install_is_found_by_nnunet(tmp_path):
    wheel_dir, site = tmp_path / "wheel", tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheel_dir), str(REPO)], check=True,
                   capture_output=True)
    wheels = list(wheel_dir.glob("nnunet_ssl-*.whl"))
    assert len(wheels) == 1
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheels[0])], check=True,
                   capture_output=True)
    probe = textwrap.dedent("""
        import os, pickle, sys
        import nnunet_ssl
        from nnunet_ssl.cli.trainers import ext_trainer_path, available_trainers
        os.environ["nnUNet_extTrainer"] = ext_trainer_path()
        from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
        cls = recursive_find_trainer_class_by_name("nnUNetTrainerMeanTeacher")
        pickle.loads(pickle.dumps(cls))  # background augmenter workers must be able to unpickle it
        print(nnunet_ssl.__file__)
        print(ext_trainer_path())
        print(cls.__module__)
        print(sorted(available_trainers()))
    """)
    env = {**os.environ, "PYTHONPATH": str(site)}
    proc = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()[-4:]
    assert lines[0].startswith(str(site)), lines
    assert lines[1].startswith(str(site)) and os.path.isfile(os.path.join(lines[1], "nnunet_ssl_trainers.py"))
    assert lines[2] == "nnunet_ssl.trainers.catalogue"
    assert "nnUNetTrainerMeanTeacher" in lines[3]
