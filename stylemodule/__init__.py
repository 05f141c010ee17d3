"""Reproduce Gatys et al. (CVPR 2016) neural style transfer with PyTorch Lightning and
search its hyperparameters with Ray Tune."""

__version__ = "0.1.0"
