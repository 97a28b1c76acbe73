# Shim for nnU-Net's trainer lookup: export nnUNet_extTrainer="$(nnUNetv2_ssl_trainers --path)".
# nnU-Net imports modules in that folder as top-level modules and drops them from sys.modules afterwards, so the
# classes themselves live in the installed package (picklable for data-augmentation worker processes).
from nnunet_ssl.trainers import *  # noqa: F401,F403
