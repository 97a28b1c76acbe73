"""The nnUNetTrainer subclasses users select with ``nnUNetv2_train ... -tr NAME``: one catalogue line each
(:mod:`nnunet_ssl.trainers.catalogue`), composing a host (``hosts/``) with plug-ins (``plugins/``)."""

from nnunet_ssl.trainers.catalogue import *  # noqa: F403
from nnunet_ssl.trainers.catalogue import __all__  # noqa: F401
