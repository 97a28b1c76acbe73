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
    interruption loses little."""

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
