"""Checkpoints: one atomic write (a kill at any instant leaves the old or the new complete file), one-line errors
for damaged files and for --c without SSL state."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import budget_split, make_trainer

from nnunet_ssl.compat.trainer import nnunet_checkpoint, unwrap
from nnunet_ssl.errors import SSLInputError
from nnunet_ssl.trainers import nnUNetTrainerMeanTeacher, nnUNetTrainerSupervised

pytestmark = pytest.mark.faults

# a child process that overwrites CKPT with atomic_save and is killed (SIGKILL) at the given phase
KILLER = textwrap.dedent("""
    import os, signal, sys, torch
    from nnunet_ssl.compat import trainer as compat
    path, phase = sys.argv[1], sys.argv[2]
    die = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
    if phase == "rename":
        compat.os.replace = die
    elif phase == "fsync":
        compat.os.fsync = die
    elif phase == "write":
        real_save = torch.save
        def partial(obj, f, *a, **k):
            f.write(b"PK" + os.urandom(4096))  # part of a zip stream, then the kill
            f.flush()
            die()
        compat.torch.save = partial
    compat.atomic_save({"network_weights": {"w": torch.ones(1000)}, "new": True}, path)
""")


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("phase", ["write", "fsync", "rename"])
def test_a_kill_during_a_checkpoint_write_leaves_the_old_file(tmp_path, phase):
    ckpt = tmp_path / "checkpoint_latest.pth"
    torch.save({"network_weights": {"w": torch.zeros(3)}, "old": True}, ckpt)
    before = _sha(ckpt)
    done = subprocess.run([sys.executable, "-c", KILLER, str(ckpt), phase], capture_output=True, text=True)
    assert done.returncode == -9, done.stderr
    assert _sha(ckpt) == before
    assert torch.load(ckpt, weights_only=False)["old"] is True
    if phase != "rename":
        return
    # without a kill the new file replaces it whole
    done = subprocess.run([sys.executable, "-c", KILLER, str(ckpt), "none"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert torch.load(ckpt, weights_only=False)["new"] is True


def test_ssl_checkpoint_is_written_once_with_its_state(copy_planned, monkeypatch, tmp_path):
    """save_checkpoint writes nnU-Net's keys and the SSL state in one torch.save to a temporary file, then a
    rename; nothing is written to the target path directly."""
    from nnunet_ssl.compat import trainer as compat

    budget_split(copy_planned)
    trainer = make_trainer(nnUNetTrainerMeanTeacher, copy_planned["root"], copy_planned["dataset"], monkeypatch)
    trainer.initialize()
    trainer.ssl_step = 11
    saves, replaces = [], []
    real_save, real_replace = compat.torch.save, compat.os.replace
    monkeypatch.setattr(compat.torch, "save", lambda obj, f, *a, **k: (saves.append(obj), real_save(obj, f))[1])
    monkeypatch.setattr(compat.os, "replace", lambda a, b: (replaces.append((a, b)), real_replace(a, b))[1])
    target = tmp_path / "checkpoint_latest.pth"
    trainer.save_checkpoint(str(target))
    assert len(saves) == 1 and len(replaces) == 1 and replaces[0][1] == str(target)
    assert set(saves[0]) == {*nnunet_checkpoint(trainer), "ssl_state"}
    assert saves[0]["ssl_state"]["ssl_step"] == 11


def _saved_pair(copy_planned, monkeypatch, cls):
    trainer = make_trainer(cls, copy_planned["root"], copy_planned["dataset"], monkeypatch)
    trainer.initialize()
    folder = copy_planned["root"] / "run"
    folder.mkdir()
    trainer.save_checkpoint(str(folder / "checkpoint_latest.pth"))
    trainer.save_checkpoint(str(folder / "checkpoint_best.pth"))
    return trainer, folder


@pytest.mark.parametrize("cls", [nnUNetTrainerMeanTeacher, nnUNetTrainerSupervised])
def test_a_truncated_checkpoint_is_one_line_naming_the_one_that_resumes(cls, copy_planned, monkeypatch):
    budget_split(copy_planned)
    trainer, folder = _saved_pair(copy_planned, monkeypatch, cls)
    latest = folder / "checkpoint_latest.pth"
    latest.write_bytes(latest.read_bytes()[:3000])
    with pytest.raises(SSLInputError, match="cannot be read .*--c then resumes from checkpoint_best.pth") as e:
        trainer.load_checkpoint(str(latest))
    assert "weights_only" not in str(e.value) and "\n" not in str(e.value)
    (folder / "checkpoint_best.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(SSLInputError, match="cannot be read .*train again without --c"):
        trainer.load_checkpoint(str(folder / "checkpoint_best.pth"))


def test_continue_without_ssl_state_needs_an_explicit_restart(copy_planned, monkeypatch):
    budget_split(copy_planned)
    trainer, folder = _saved_pair(copy_planned, monkeypatch, nnUNetTrainerMeanTeacher)
    plain = folder / "checkpoint_latest.pth"
    checkpoint = torch.load(plain, weights_only=False)
    del checkpoint["ssl_state"]
    torch.save(checkpoint, plain)
    with pytest.raises(SSLInputError, match="no SSL state .*nnUNet_ssl_restart_reference=1"):
        trainer.load_checkpoint(str(plain))
    monkeypatch.setenv("nnUNet_ssl_restart_reference", "1")
    with torch.no_grad():
        for p in trainer.teacher.parameters():
            p.add_(1.0)
    trainer.current_epoch = 3
    trainer.save_checkpoint(str(plain))  # written at the end of epoch 4 (nnU-Net stores current_epoch + 1)
    checkpoint = torch.load(plain, weights_only=False)
    del checkpoint["ssl_state"]
    torch.save(checkpoint, plain)
    trainer.load_checkpoint(str(plain))
    assert trainer.ssl_step == 4 * trainer.num_iterations_per_epoch and not trainer._ssl_state_restored
    # on_train_start then copies the student into the teacher, as a fresh training does
    trainer.sync_reference_from_student()
    student = unwrap(trainer.network).state_dict()
    assert all(torch.equal(v, student[k]) for k, v in trainer.teacher.state_dict().items())


def test_a_non_finite_step_stops_the_run_before_the_weights_change(copy_planned, monkeypatch):
    """NaN in an unlabeled image: the step is refused with one line naming the step and the loss term; neither the
    student nor the teacher changes; nnUNet_ssl_skip_nonfinite=1 skips one such step, the next one stops."""
    import itertools

    from helpers import state_copy

    budget_split(copy_planned)
    monkeypatch.setenv("nnUNet_ssl_skip_nonfinite", "1")
    trainer = make_trainer(nnUNetTrainerMeanTeacher, copy_planned["root"], copy_planned["dataset"], monkeypatch)
    trainer.on_train_start()
    loader = trainer.dataloader_unlabeled
    try:
        batch = next(loader)
        for key in ("view0", "view1"):
            batch[key][0, 0, 0, 0, 0] = float("nan")
        trainer.dataloader_unlabeled = itertools.repeat(batch)
        trainer.on_train_epoch_start()
        student, teacher = state_copy(unwrap(trainer.network)), state_copy(trainer.teacher)
        trainer.train_step(next(trainer.dataloader_train))  # skipped
        assert trainer.ssl_step == 1
        with pytest.raises(SSLInputError, match=r"non-finite .* at step 1 .*unsupervised nan.*last good checkpoint"):
            trainer.train_step(next(trainer.dataloader_train))
        for before, module in ((student, unwrap(trainer.network)), (teacher, trainer.teacher)):
            assert all(torch.equal(v, module.state_dict()[k]) for k, v in before.items())
    finally:
        trainer.dataloader_unlabeled = loader
        trainer.on_train_end()


def test_a_step_of_two_turns_counts_once_against_the_non_finite_limit(tmp_path, monkeypatch):
    """M&N steps its two networks in turns and checks each: with nnUNet_ssl_skip_nonfinite=1, a step whose two turns
    both fail is one skipped step (counting turns would stop the run at its second turn); the next failing step
    stops it."""
    from types import SimpleNamespace

    from nnunet_ssl.trainers.base import nnUNetTrainerSSL

    monkeypatch.setenv("nnUNet_ssl_skip_nonfinite", "1")
    host = SimpleNamespace(ssl_step=0, _nonfinite_steps=0, _nonfinite_in_a_row=0, _nonfinite_last_step=-1,
                           grad_scaler=None, print_to_log_file=lambda *a, **k: None, output_folder=str(tmp_path),
                           current_epoch=0)
    step = SimpleNamespace(constant_losses=[], scheduled_losses=[])
    nan, one, zero = torch.tensor(float("nan")), torch.tensor(1.0), torch.tensor(0.0)
    check = nnUNetTrainerSSL.check_finite
    assert not check(host, [nan], step, one, zero)
    assert not check(host, [nan], step, one, zero)  # the same step's second turn
    assert host._nonfinite_steps == 1
    host.ssl_step = 1
    assert check(host, [one], step, one, zero)
    with pytest.raises(SSLInputError, match=r"at step 1 "):
        check(host, [nan], step, one, zero)
