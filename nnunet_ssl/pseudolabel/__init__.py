"""Offline pseudo-labelling with nnU-Net (``nnUNetv2_ssl_pseudolabel``): the recipe that won FLARE22/23 and
ToothFairy 2023. Train nnU-Net on the labeled cases, predict the unlabeled pool, keep the reliable predictions,
train on everything, repeat.

:mod:`.scores` and :mod:`.selection` are pure functions (case scores, voxels to ignore, which cases are kept);
:mod:`.predict` predicts and scores the pool with nnU-Net's predictor, one shard at a time; :mod:`.derived`
writes the derived raw dataset; :mod:`.pipeline` is one round, :mod:`.rounds` several, with the student's
preprocessing and training.
"""
