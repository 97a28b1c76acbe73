"""Losses and weightings: how each voxel of the two predictions is used. Pure functions on tensors."""
