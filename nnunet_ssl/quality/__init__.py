"""Quality predictor for quality-guided SSL (QG-SSL, Abhishek & Hamarneh, arXiv 2606.01753), Phase 1.

``predictor``: the network g_phi(image, mask) -> predicted Dice per foreground class, its checkpoint helpers.
``corruptions``: the variable-quality mask generator (targets: true Dice per class).
``train_quality``: the training loop of ``nnUNetv2_ssl_train_quality`` (command line:
:mod:`nnunet_ssl.cli.train_quality`), with ``training_setup`` (data, augmentation, loaders), ``weak_models`` (the
weak segmenters that make masks) and ``samples`` (masks with their true Dice, the held-out report).

Kept free of heavy imports; import the submodules you need.
"""
