"""nnunet-ssl: semi-supervised learning trainers for nnU-Net v2."""

__version__ = "0.1.0"


def ext_trainer_path() -> str:
    """The folder holding the shim module that nnU-Net's ``nnUNet_extTrainer`` lookup imports (it re-exports
    :mod:`nnunet_ssl.trainers`); printed by ``nnUNetv2_ssl_trainers --path``."""
    import os

    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "_ext")
