"""Voxel-wise uncertainty at inference: ``nnUNetv2_ssl_predict_uncertainty`` (see :mod:`.predict_uncertainty`)."""
