"""Checkpoints that survive a kill at any instant and load with one clear line when they are damaged."""

from __future__ import annotations

import os
import pickle
import zipfile

import torch

from nnunet_ssl.compat.trainer import atomic_save, nnunet_checkpoint
from nnunet_ssl.errors import SSLInputError

#: the order in which ``nnUNetv2_train --c`` looks for a checkpoint (nnunetv2/run/run_training.py)
RESUME_ORDER = ("checkpoint_final.pth", "checkpoint_latest.pth", "checkpoint_best.pth")


def unreadable_checkpoint_error(filename: str, error: BaseException) -> SSLInputError:
    """One line for a checkpoint torch cannot read: what failed and which checkpoint ``--c`` resumes from instead."""
    folder, name = os.path.split(os.path.abspath(filename))
    later = RESUME_ORDER[RESUME_ORDER.index(name) + 1:] if name in RESUME_ORDER else ()
    others = [n for n in later if os.path.isfile(os.path.join(folder, n))]
    fix = f"move it out of {folder} and run again: --c then resumes from {others[0]}" if others else \
        "train again without --c (or from another checkpoint with -pretrained_weights)"
    detail = str(error).splitlines()[0] if str(error) else "damaged file"
    return SSLInputError(f"checkpoint {filename} cannot be read ({type(error).__name__}: {detail}); it is "
                         f"truncated or not a checkpoint; {fix}")


def read_checkpoint(filename: str, map_location: str | torch.device = "cpu") -> dict:
    """``torch.load`` of a trainer checkpoint (a file of our own runs: full unpickling, as nnU-Net does), with
    :func:`unreadable_checkpoint_error` instead of a traceback."""
    try:
        checkpoint = torch.load(filename, map_location=map_location, weights_only=False)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, KeyError) as e:
        raise unreadable_checkpoint_error(filename, e) from None
    if not isinstance(checkpoint, dict) or "network_weights" not in checkpoint:
        raise unreadable_checkpoint_error(filename, ValueError("no network_weights"))
    return checkpoint


class AtomicCheckpoints:
    """Mixin for every trainer of the package: ``save_checkpoint`` writes nnU-Net's checkpoint dict plus
    :meth:`extra_checkpoint_entries` once, to a temporary file that is flushed and renamed over the target
    (:func:`~nnunet_ssl.compat.trainer.atomic_save`). nnU-Net writes in place, so a kill during the write used to
    leave a truncated ``checkpoint_latest.pth`` and no way to ``--c``. ``load_checkpoint`` refuses an unreadable
    file with one line naming a checkpoint that resumes instead."""

    def extra_checkpoint_entries(self) -> dict:
        """Keys written beside nnU-Net's (the SSL state of SSL trainers)."""
        return {}

    def save_checkpoint(self, filename: str) -> None:
        if self.local_rank != 0 or self.disable_checkpointing:
            super().save_checkpoint(filename)  # nnU-Net's message when checkpointing is disabled
            return
        atomic_save({**nnunet_checkpoint(self), **self.extra_checkpoint_entries()}, filename)

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        if not isinstance(filename_or_checkpoint, str):
            raise TypeError("nnunet-ssl trainers load checkpoints from a path")  # nnU-Net 2.8.1 breaks on dicts
        checkpoint = read_checkpoint(filename_or_checkpoint, self.device)
        super().load_checkpoint(filename_or_checkpoint)
        self.after_checkpoint_loaded(filename_or_checkpoint, checkpoint)

    def after_checkpoint_loaded(self, filename: str, checkpoint: dict) -> None:
        """Restores what :meth:`extra_checkpoint_entries` wrote (nnU-Net has restored its own keys)."""
