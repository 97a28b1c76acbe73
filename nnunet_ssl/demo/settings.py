"""The demo's fixed choices: dataset, configuration, fold, trainers, sizes and defaults."""

from __future__ import annotations

import re

#: file that marks a work folder as made by the demo; only such folders are ever cleaned
MARKER = ".nnunet_ssl_demo"
#: the only entries the demo creates (and therefore may delete) inside its work folder
WORK_SUBFOLDERS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "logs")
DEFAULT_WORKDIR = "nnunet_ssl_demo"
SYNTHETIC_ID = 990
CONFIGURATION = "3d_fullres"
PLANS = "nnUNetPlans"
FOLD = 0
TRAINERS = ("nnUNetTrainerSupervised", "nnUNetTrainerMeanTeacher")
UNLABELED_SUBFOLDER = "imagesUnlabeled"
# Sizes measured on 2 shared CPU cores: (16, 24, 24) patches cost ~0.13 s per supervised and ~0.28 s per Mean
# Teacher iteration, 2x less than (16, 32, 32). The smaller class needs ~200 iterations before its Dice leaves 0,
# so 300 iterations give a supervised foreground Dice of ~0.55 in ~1 minute (Mean Teacher ~2 minutes).
SYNTHETIC_CASES = {"num_train": 20, "num_unlabeled": 10, "num_test": 4, "shape": (16, 24, 24)}
DEFAULT_EPOCHS = 10
DEFAULT_ITERATIONS = 30
# per-epoch validation only feeds the pseudo Dice in the log; the real number comes from the final validation
VAL_ITERATIONS = 2
DEFAULT_NUM_LABELED = 4
NUM_PROCESSES = 2
DATASET_NAME = re.compile(r"^Dataset(\d{3})_[A-Za-z0-9_.-]+$")
