"""Quality predictor for quality-guided SSL (QG-SSL, Abhishek & Hamarneh, arXiv 2606.01753), Phase 1.

``predictor``: the network g_phi(image, mask) -> predicted Dice per foreground class, its checkpoint helpers.
``corruptions``: the variable-quality mask generator (targets: true Dice per class).
``train_quality``: the ``nnUNetv2_ssl_train_quality`` command.

Kept free of heavy imports; import the submodules you need.
"""
