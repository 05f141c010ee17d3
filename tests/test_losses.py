"""Losses against reference formulas written out with loops and einsum on seeded random tensors."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from stylemodule.losses import content_loss, gram_matrix, style_layer_loss, total_variation


def _features(seed: int, shape: tuple[int, ...] = (1, 5, 4, 6)) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=torch.float64)


def _reference_gram(features: torch.Tensor) -> torch.Tensor:
    """G[i, j] = sum over positions k of F[i, k] F[j, k], written as a loop over positions."""
    _, channels, height, width = features.shape
    gram = torch.zeros(channels, channels, dtype=features.dtype)
    for y in range(height):
        for x in range(width):
            column = features[0, :, y, x]
            gram += torch.outer(column, column)
    return gram


# ---------------------------------------------------------------------- content loss


def test_content_loss_sum_is_half_squared_sum() -> None:
    features, target = _features(0), _features(1)
    expected = 0.5 * sum(float(a - b) ** 2 for a, b in zip(features.flatten(), target.flatten()))

    assert content_loss(features, target, "sum").item() == pytest.approx(expected, rel=1e-12)


def test_content_loss_sum_is_default() -> None:
    features, target = _features(0), _features(1)

    assert content_loss(features, target).item() == pytest.approx(
        content_loss(features, target, "sum").item(), rel=1e-12
    )


def test_content_loss_mean_is_mean_squared_error() -> None:
    features, target = _features(2), _features(3)
    squares = [float(a - b) ** 2 for a, b in zip(features.flatten(), target.flatten())]
    expected = sum(squares) / len(squares)

    assert content_loss(features, target, "mean").item() == pytest.approx(expected, rel=1e-12)


def test_content_loss_zero_for_equal_features() -> None:
    features = _features(4)

    assert content_loss(features, features.clone(), "sum").item() == 0.0
    assert content_loss(features, features.clone(), "mean").item() == 0.0


def test_content_loss_invalid_reduction() -> None:
    features = _features(0)

    with pytest.raises(ValueError, match="'median'") as raised:
        content_loss(features, features, "median")
    assert "sum or mean" in str(raised.value)


# ---------------------------------------------------------------------- Gram matrix


def test_gram_matrix_matches_sum_over_positions() -> None:
    features = _features(5)

    gram = gram_matrix(features)

    assert gram.shape == (5, 5)
    torch.testing.assert_close(gram, _reference_gram(features), rtol=1e-12, atol=1e-12)


def test_gram_matrix_matches_einsum() -> None:
    features = _features(6, (1, 3, 7, 2))

    expected = torch.einsum("chw,dhw->cd", features[0], features[0])

    torch.testing.assert_close(gram_matrix(features), expected, rtol=1e-12, atol=1e-12)


def test_gram_matrix_is_raw_sum() -> None:
    # Placing the same map twice side by side doubles a raw Gram matrix. A Gram matrix
    # divided by the position count would stay the same.
    features = _features(7, (1, 4, 3, 3))
    doubled = torch.cat([features, features], dim=-1)

    torch.testing.assert_close(gram_matrix(doubled), 2 * gram_matrix(features), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------- style loss


def _style_inputs() -> tuple[torch.Tensor, torch.Tensor, int, int]:
    generated, style = _features(8, (1, 6, 5, 4)), _features(9, (1, 6, 5, 4))
    channels, positions = 6, 5 * 4
    return _reference_gram(generated), _reference_gram(style), channels, positions


def test_style_loss_gatys_formula() -> None:
    gram, target, channels, positions = _style_inputs()
    squared_sum = 0.0
    for i in range(channels):
        for j in range(channels):
            squared_sum += float(gram[i, j] - target[i, j]) ** 2
    expected = squared_sum / (4 * channels**2 * positions**2)

    loss = style_layer_loss(gram, target, positions, "gatys")

    assert loss.item() == pytest.approx(expected, rel=1e-12)


def test_style_loss_gatys_is_default() -> None:
    gram, target, _, positions = _style_inputs()

    assert style_layer_loss(gram, target, positions).item() == pytest.approx(
        style_layer_loss(gram, target, positions, "gatys").item(), rel=1e-12
    )


def test_style_loss_mean_formula() -> None:
    gram, target, channels, positions = _style_inputs()
    squared_sum = 0.0
    for i in range(channels):
        for j in range(channels):
            squared_sum += float(gram[i, j] - target[i, j]) ** 2
    # mean((G - A)^2) / (C * H * W), the tutorial's scaling.
    expected = squared_sum / channels**2 / (channels * positions)

    loss = style_layer_loss(gram, target, positions, "mean")

    assert loss.item() == pytest.approx(expected, rel=1e-12)


def test_style_loss_variants_differ() -> None:
    gram, target, _, positions = _style_inputs()

    gatys = style_layer_loss(gram, target, positions, "gatys").item()
    mean = style_layer_loss(gram, target, positions, "mean").item()

    assert gatys != pytest.approx(mean, rel=1e-3)


def test_style_loss_invalid_variant() -> None:
    gram, target, _, positions = _style_inputs()

    with pytest.raises(ValueError, match="'sum'") as raised:
        style_layer_loss(gram, target, positions, "sum")
    assert "gatys or mean" in str(raised.value)


# ---------------------------------------------------------------------- total variation


def test_total_variation_matches_differences() -> None:
    image = _features(10, (1, 3, 5, 7))
    _, channels, height, width = image.shape
    expected = 0.0
    for c in range(channels):
        for y in range(height):
            for x in range(width):
                if y + 1 < height:
                    expected += abs(float(image[0, c, y + 1, x] - image[0, c, y, x]))
                if x + 1 < width:
                    expected += abs(float(image[0, c, y, x + 1] - image[0, c, y, x]))
    expected /= height * width

    assert total_variation(image).item() == pytest.approx(expected, rel=1e-12)


def test_total_variation_zero_for_constant_image() -> None:
    image = torch.full((1, 3, 4, 4), 0.25)

    assert total_variation(image).item() == 0.0


# ---------------------------------------------------------------------- gradients


def _check_gradient(loss_of: Callable[[torch.Tensor], torch.Tensor], *shape: int) -> torch.Tensor:
    """Check the gradient of `loss_of` at a seeded random x numerically, and return it."""
    x = _features(11, shape).requires_grad_(True)
    loss = loss_of(x)
    (gradient,) = torch.autograd.grad(loss, x)
    assert torch.autograd.gradcheck(loss_of, (x,))
    return gradient


def test_content_loss_sum_gradient() -> None:
    target = _features(12)

    gradient = _check_gradient(lambda x: content_loss(x, target, "sum"), 1, 5, 4, 6)

    # d/dF of 1/2 sum((F - P)^2) is F - P.
    x = _features(11, (1, 5, 4, 6))
    torch.testing.assert_close(gradient, x - target)


def test_content_loss_mean_gradient() -> None:
    target = _features(12)

    gradient = _check_gradient(lambda x: content_loss(x, target, "mean"), 1, 5, 4, 6)

    x = _features(11, (1, 5, 4, 6))
    torch.testing.assert_close(gradient, 2 * (x - target) / x.numel())


@pytest.mark.parametrize("variant", ["gatys", "mean"])
def test_style_loss_gradient(variant: str) -> None:
    target = gram_matrix(_features(13, (1, 3, 3, 2)))

    gradient = _check_gradient(
        lambda x: style_layer_loss(gram_matrix(x), target, 6, variant), 1, 3, 3, 2
    )

    assert gradient.abs().sum().item() > 0


def test_total_variation_gradient() -> None:
    gradient = _check_gradient(total_variation, 1, 3, 4, 5)

    assert gradient.abs().sum().item() > 0
