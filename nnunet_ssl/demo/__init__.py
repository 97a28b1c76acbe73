"""The end-to-end CPU demo ``nnUNetv2_ssl_demo``: a synthetic dataset and the workflow that runs on it."""
