"""Fault injection on real nnUNetv2_train runs: kill -9 at an arbitrary instant (mid-epoch or during a checkpoint
write), then --c: the run resumes exactly the last complete checkpoint (weights, teacher, MetaSSL thresholds, step
counter and so lambda). Run alone with ``pytest -m faults``."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
import torch
from conftest import BIN, nnunet_env, run_cli
from helpers import budget_split

pytestmark = [pytest.mark.slow, pytest.mark.faults]

TRAINER = "nnUNetTrainerMeanTeacherMetaSSL"


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a.cpu(), b.cpu())
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


def test_kill_9_then_continue_resumes_the_last_complete_checkpoint(copy_planned):
    root, ds = copy_planned["root"], copy_planned["dataset"]
    budget_split(copy_planned)
    env = nnunet_env(root, training=True)
    env.update(nnUNet_ssl_epochs="6", nnUNet_ssl_iterations_per_epoch="3", nnUNet_ssl_val_iterations="1",
               nnUNet_ssl_seed="0")
    train = [str(BIN / "nnUNetv2_train"), str(copy_planned["id"]), "3d_fullres", "0", "-tr", TRAINER, "-device", "cpu"]
    out = root / "results" / ds / f"{TRAINER}__nnUNetPlans__3d_fullres" / "fold_0"
    latest = out / "checkpoint_latest.pth"
    proc = subprocess.Popen(train, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        # wait for the second checkpoint (epoch 2 done), then kill in the middle of the third epoch
        while time.monotonic() < deadline and proc.poll() is None:
            if latest.is_file() and sum(1 for _ in out.glob("training_log_*.txt")) and \
                    "Epoch 2" in next(out.glob("training_log_*.txt")).read_text():
                break
            time.sleep(0.05)
        time.sleep(1.0)
        assert proc.poll() is None, "the run ended before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    saved = torch.load(latest, map_location="cpu", weights_only=False)  # complete whatever the instant of the kill
    assert saved["ssl_state"]["ssl_step"] == 3 * (saved["current_epoch"])
    assert not (out / "checkpoint_final.pth").exists()

    # --c with the schedule ending at the saved epoch: no step is taken, the final checkpoint is the restored state
    run_cli([*train, "--c"], env={**env, "nnUNet_ssl_epochs": str(saved["current_epoch"])})
    final = torch.load(out / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert _equal(final["network_weights"], saved["network_weights"])
    assert _equal(final["ssl_state"], saved["ssl_state"])  # teacher, MetaSSL thresholds, step counter
    assert _equal(final["optimizer_state"]["state"], saved["optimizer_state"]["state"])
