"""Training length and seed from environment variables, for every trainer of the package (SSL and baselines)."""

from __future__ import annotations

import os
import random

import numpy as np
import torch

from nnunet_ssl.errors import SSLInputError

ENV_EPOCHS = "nnUNet_ssl_epochs"
ENV_ITERATIONS = "nnUNet_ssl_iterations_per_epoch"
ENV_VAL_ITERATIONS = "nnUNet_ssl_val_iterations"
ENV_SEED = "nnUNet_ssl_seed"
ENV_SNAPSHOTS = "nnUNet_ssl_snapshots"


def snapshot_name(k: int, n: int) -> str:
    """File name of the snapshot after ``k`` n-ths of training."""
    return f"checkpoint_snapshot_{k}of{n}.pth"


def snapshot_epochs(num_epochs: int, n: int) -> dict[int, str]:
    """Epochs (counted from 1) after which snapshot ``k`` of ``n`` is saved, k = 1..n-1 (the last is
    ``checkpoint_final.pth``), with their file names."""
    out: dict[int, str] = {}
    for k in range(1, n):
        out.setdefault(max(1, round(k * num_epochs / n)), snapshot_name(k, n))
    return out


def env_int(name: str, minimum: int) -> int | None:
    """The integer value of environment variable ``name``, None if unset or empty; one clear error otherwise."""
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return None
    try:
        number = int(value)
    except ValueError:
        number = None
    if number is None or number < minimum:
        raise SSLInputError(f"{name}={value!r} must be an integer >= {minimum}; fix or unset the variable")
    return number


class ScheduleFromEnvironment:
    """Mixin: training length and seed from the environment, for smoke runs, the demo and benchmarks.

    ``nnUNet_ssl_epochs``, ``nnUNet_ssl_iterations_per_epoch``, ``nnUNet_ssl_val_iterations`` override
    ``num_epochs``, ``num_iterations_per_epoch`` and ``num_val_iterations_per_epoch``; ``nnUNet_ssl_seed`` seeds
    python, numpy and torch (offset by the DDP rank, so ranks draw different batches). A shortened schedule also
    saves ``checkpoint_latest.pth`` about every tenth of it (nnU-Net: every 50 epochs), so that ``--c`` after an
    interruption loses little. ``nnUNet_ssl_snapshots=N`` (N >= 2) also keeps the network after each N-th of
    training as ``checkpoint_snapshot_<k>of<N>.pth`` (k < N; the last is ``checkpoint_final.pth``): the snapshots
    whose agreement ``nnUNetv2_ssl_pseudolabel`` scores as stability."""

    #: added to ``nnUNet_ssl_seed``: another training seed for the same run settings (see the Reseeded baseline)
    training_seed_offset: int = 0

    def apply_environment(self) -> None:
        epochs = env_int(ENV_EPOCHS, 1)
        iterations = env_int(ENV_ITERATIONS, 1)
        val_iterations = env_int(ENV_VAL_ITERATIONS, 0)
        if epochs is not None:
            self.num_epochs = epochs
            self.save_every = max(1, min(self.save_every, epochs // 10))
        if iterations is not None:
            self.num_iterations_per_epoch = iterations
        if val_iterations is not None:
            self.num_val_iterations_per_epoch = val_iterations
        seed = env_int(ENV_SEED, 0)
        if seed is not None:
            seed += self.training_seed_offset
        rank = self.local_rank if self.is_ddp else 0
        if seed is not None:
            random.seed(seed + rank)
            np.random.seed(seed + rank)
            torch.manual_seed(seed + rank)
        elif self.is_ddp:
            # torch's default seed is the same in every spawned rank; augmentation draws must differ per rank
            torch.manual_seed(int(np.random.randint(0, 2**31 - 1)))
        self.ssl_seed = seed
        snapshots = env_int(ENV_SNAPSHOTS, 2)
        self.snapshot_epochs = snapshot_epochs(self.num_epochs, snapshots) if snapshots else {}

    def on_epoch_end(self) -> None:
        super().on_epoch_end()
        # nnU-Net has counted the finished epoch: current_epoch is now the number of epochs done
        name = getattr(self, "snapshot_epochs", {}).get(self.current_epoch)
        if name is not None and self.current_epoch < self.num_epochs:
            self.save_checkpoint(os.path.join(self.output_folder, name))
