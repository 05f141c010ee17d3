"""Content, style and total variation losses on VGG feature maps of shape (1, C, H, W)."""

from __future__ import annotations

import torch
from torchmetrics.functional import image as tm_image


def content_loss(features: torch.Tensor, target: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """`sum`: 1/2 sum((F - P)^2) as in Gatys et al.; `mean`: mean((F - P)^2) as in the tutorial."""
    squared = (features - target).pow(2)
    if reduction == "sum":
        return squared.sum() / 2
    if reduction == "mean":
        return squared.mean()
    raise ValueError(f"invalid content loss reduction '{reduction}'; choose sum or mean")


def gram_matrix(features: torch.Tensor) -> torch.Tensor:
    """Raw Gram matrix F F^T of (1, C, H, W) features: (C, C), not divided by anything."""
    flat = features.flatten(start_dim=2).squeeze(0)  # (C, H*W)
    return flat @ flat.T


def style_layer_loss(gram: torch.Tensor, target_gram: torch.Tensor, positions: int, variant: str = "gatys") -> torch.Tensor:
    """Style loss of one layer from raw Gram matrices; `positions` is M = H*W.

    `gatys`: E = sum((G - A)^2) / (4 N^2 M^2) with N channels (Gatys et al., eq. 4).
    `mean`: mean((G - A)^2) / (N * M), the tutorial's scaling.
    """
    channels = gram.shape[0]
    squared = (gram - target_gram).pow(2)
    if variant == "gatys":
        return squared.sum() / (4 * channels**2 * positions**2)
    if variant == "mean":
        return squared.mean() / (channels * positions)
    raise ValueError(f"invalid style loss variant '{variant}'; choose gatys or mean")


def total_variation(image: torch.Tensor) -> torch.Tensor:
    """Anisotropic total variation sum(|dx|) + sum(|dy|) of a (1, 3, H, W) image, per pixel."""
    return tm_image.total_variation(image, reduction="sum") / image[0, 0].numel()
