"""Plug-ins: how each voxel of the student's and the reference's predictions is used (MetaSSL regions, quality
weights, evidence). Mixins placed before a host in a trainer's bases; they replace or weight the host's loss."""
