"""The only place where nnunet-ssl touches private or fragile nnU-Net internals.

``trainer``: the trainer's internals used by the SSL trainers (logger lists, compile decision, network swaps,
CPU/gloo DDP, checkpoint additions, augmenter shutdown). ``tooling``: the predictor and planning internals used by
the command-line tools. Everything else in the package uses nnU-Net's public classes and functions only.
"""
