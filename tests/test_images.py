"""Tests of stylemodule.images on small files that Pillow writes into tmp_path."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as F
from PIL import Image, ImageFile

from stylemodule.errors import ImageError
from stylemodule.images import (
    load_image,
    resize_exact,
    resize_long_edge,
    save_png,
    style_shape,
    to_pil,
    to_uint8,
)

WIDTH, HEIGHT = 40, 30
EXIF_ORIENTATION_TAG = 0x0112
STARRY_NIGHT = "Van_Gogh_Starry_Night_gatys_paper_004.jpg"


def data_dir() -> Path:
    """Return the reference data folder: $STYLEMODULE_DATA, else shared/data beside the checkout."""
    if os.environ.get("STYLEMODULE_DATA"):
        return Path(os.environ["STYLEMODULE_DATA"])
    return Path(__file__).resolve().parents[2] / "shared" / "data"


def pixel(image: torch.Tensor, x: int, y: int) -> list[float]:
    return image[:, y, x].tolist()


def message_pattern(*parts: object) -> str:
    """Return a regex that matches a message containing every part, in order."""
    return ".*".join(re.escape(str(part)) for part in parts)


@pytest.fixture
def rgb_png(tmp_path: Path) -> Path:
    path = tmp_path / "rgb.png"
    Image.new("RGB", (WIDTH, HEIGHT), (10, 128, 255)).save(path)
    return path


@pytest.fixture
def jpeg_bytes(tmp_path: Path) -> bytes:
    path = tmp_path / "whole.jpg"
    noise = np.random.default_rng(0).integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    Image.fromarray(noise).save(path, quality=95)
    return path.read_bytes()


# Formats


@pytest.mark.parametrize(
    ("suffix", "options", "tolerance"),
    [
        ("jpg", {"quality": 95}, 3 / 255),
        ("png", {}, 1e-6),
        ("webp", {"quality": 95}, 3 / 255),
        ("webp", {"lossless": True}, 1e-6),
        ("tif", {}, 1e-6),
        ("bmp", {}, 1e-6),
    ],
)
def test_load_each_format(tmp_path: Path, suffix: str, options: dict, tolerance: float) -> None:
    path = tmp_path / f"image.{suffix}"
    Image.new("RGB", (WIDTH, HEIGHT), (200, 100, 50)).save(path, **options)

    image = load_image(path)

    assert image.shape == (3, HEIGHT, WIDTH)
    assert image.dtype == torch.float32
    expected = torch.tensor([200, 100, 50]).view(3, 1, 1) / 255
    assert torch.allclose(image, expected.expand_as(image), atol=tolerance)


# Modes


def test_load_rgb_exact_values(rgb_png: Path) -> None:
    image = load_image(rgb_png)
    assert pixel(image, 0, 0) == pytest.approx([10 / 255, 128 / 255, 1.0])


def test_load_greyscale_replicated(tmp_path: Path) -> None:
    path = tmp_path / "grey.png"
    Image.new("L", (WIDTH, HEIGHT), 77).save(path)

    image = load_image(path)

    assert image.shape == (3, HEIGHT, WIDTH)
    assert torch.allclose(image, torch.full_like(image, 77 / 255))


def test_load_palette(tmp_path: Path) -> None:
    path = tmp_path / "palette.png"
    palette = Image.new("P", (WIDTH, HEIGHT), 0)
    palette.putpalette([255, 0, 0, 0, 0, 255])
    palette.putpixel((5, 5), 1)
    palette.save(path)

    image = load_image(path)

    assert pixel(image, 0, 0) == [1.0, 0.0, 0.0]
    assert pixel(image, 5, 5) == [0.0, 0.0, 1.0]


@pytest.mark.parametrize("suffix", ["png", "gif"])
def test_load_palette_transparency_white(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"palette.{suffix}"
    palette = Image.new("P", (WIDTH, HEIGHT), 0)
    palette.putpalette([255, 0, 0, 0, 0, 255])
    palette.putpixel((5, 5), 1)
    palette.save(path, transparency=1)

    image = load_image(path)

    assert pixel(image, 0, 0) == [1.0, 0.0, 0.0]
    assert pixel(image, 5, 5) == [1.0, 1.0, 1.0]


def test_load_rgba_composited_on_white(tmp_path: Path) -> None:
    path = tmp_path / "rgba.png"
    rgba = Image.new("RGBA", (WIDTH, HEIGHT), (0, 0, 0, 0))
    rgba.putpixel((1, 0), (20, 40, 60, 255))
    rgba.putpixel((2, 0), (0, 0, 0, 128))
    rgba.save(path)

    image = load_image(path)

    assert pixel(image, 0, 0) == [1.0, 1.0, 1.0]
    assert pixel(image, 1, 0) == pytest.approx([20 / 255, 40 / 255, 60 / 255])
    assert pixel(image, 2, 0) == pytest.approx([127 / 255] * 3, abs=1 / 255)


def test_load_la_composited_on_white(tmp_path: Path) -> None:
    path = tmp_path / "la.png"
    la = Image.new("LA", (WIDTH, HEIGHT), (0, 0))
    la.putpixel((1, 0), (50, 255))
    la.save(path)

    image = load_image(path)

    assert pixel(image, 0, 0) == [1.0, 1.0, 1.0]
    assert pixel(image, 1, 0) == pytest.approx([50 / 255] * 3)


@pytest.mark.parametrize(("suffix", "tolerance"), [("jpg", 3 / 255), ("tif", 1e-6)])
def test_load_cmyk(tmp_path: Path, suffix: str, tolerance: float) -> None:
    path = tmp_path / f"cmyk.{suffix}"
    cmyk = Image.new("CMYK", (WIDTH, HEIGHT), (0, 0, 0, 0))
    cmyk.paste((255, 0, 0, 0), (WIDTH // 2, 0, WIDTH, HEIGHT))
    cmyk.save(path)

    image = load_image(path)

    assert pixel(image, 0, 0) == pytest.approx([1.0, 1.0, 1.0], abs=tolerance)
    assert pixel(image, WIDTH - 1, 0) == pytest.approx([0.0, 1.0, 1.0], abs=tolerance)


@pytest.mark.parametrize("suffix", ["png", "tif"])
def test_load_16_bit_scaled_by_65535(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"deep.{suffix}"
    values = np.zeros((HEIGHT, WIDTH), dtype=np.uint16)
    values[0, 0] = 65535
    values[0, 1] = 32768
    values[0, 2] = 255
    Image.fromarray(values).save(path)
    with Image.open(path) as written:
        assert written.mode == "I;16"

    image = load_image(path)

    assert image.shape == (3, HEIGHT, WIDTH)
    assert image.dtype == torch.float32
    assert pixel(image, 0, 0) == [1.0, 1.0, 1.0]
    assert pixel(image, 1, 0) == pytest.approx([32768 / 65535] * 3)
    assert pixel(image, 2, 0) == pytest.approx([255 / 65535] * 3)
    assert pixel(image, 3, 0) == [0.0, 0.0, 0.0]


def test_load_32_bit_integer(tmp_path: Path) -> None:
    sixteen_bit = tmp_path / "sixteen.tif"
    Image.new("I", (WIDTH, HEIGHT), 65535).save(sixteen_bit)
    wide = tmp_path / "wide.tif"
    Image.new("I", (WIDTH, HEIGHT), 2**30).save(wide)

    assert load_image(sixteen_bit).min().item() == 1.0
    assert load_image(wide)[:, 0, 0].tolist() == pytest.approx([2**30 / (2**31 - 1)] * 3)


@pytest.mark.parametrize(("value", "expected"), [(0.25, 0.25), (51.0, 0.2), (32767.5, 0.5)])
def test_load_float_range(tmp_path: Path, value: float, expected: float) -> None:
    path = tmp_path / "float.tif"
    Image.new("F", (WIDTH, HEIGHT), value).save(path)

    image = load_image(path)

    assert image.shape == (3, HEIGHT, WIDTH)
    assert pixel(image, 0, 0) == pytest.approx([expected] * 3)


def test_load_one_bit(tmp_path: Path) -> None:
    path = tmp_path / "bits.png"
    bits = Image.new("1", (WIDTH, HEIGHT), 0)
    bits.putpixel((3, 2), 1)
    bits.save(path)

    image = load_image(path)

    assert pixel(image, 3, 2) == [1.0, 1.0, 1.0]
    assert pixel(image, 0, 0) == [0.0, 0.0, 0.0]


# EXIF orientation


def test_load_applies_exif_orientation(tmp_path: Path) -> None:
    path = tmp_path / "rotated.jpg"
    stored = Image.new("RGB", (WIDTH, HEIGHT), (0, 0, 0))
    stored.paste((255, 255, 255), (0, 0, 10, 10))
    exif = Image.Exif()
    exif[EXIF_ORIENTATION_TAG] = 6  # viewers rotate the stored pixels 90 degrees clockwise
    stored.save(path, exif=exif, quality=95)

    image = load_image(path)

    assert image.shape == (3, WIDTH, HEIGHT)
    # The stored top-left block moves to the top-right corner.
    assert pixel(image, HEIGHT - 1, 0) == pytest.approx([1.0] * 3, abs=0.05)
    assert pixel(image, 0, 0) == pytest.approx([0.0] * 3, abs=0.05)


def test_load_too_small_after_rotation(tmp_path: Path) -> None:
    path = tmp_path / "narrow.jpg"
    exif = Image.Exif()
    exif[EXIF_ORIENTATION_TAG] = 6
    Image.new("RGB", (40, 12), (0, 0, 0)).save(path, exif=exif)

    with pytest.raises(ImageError, match=message_pattern(path, "is 12x40 pixels", "at least 16 pixels")):
        load_image(path, min_side=16)


# Bad input


def test_load_missing(tmp_path: Path) -> None:
    path = tmp_path / "absent.jpg"
    with pytest.raises(ImageError, match=message_pattern("content image not found: ", path, "; check the path")) as raised:
        load_image(path, role="content")
    assert "data fetch" not in str(raised.value)


def test_load_nan_pixels_rejected(tmp_path: Path) -> None:
    path = tmp_path / "nan.tif"
    pixels = np.full((HEIGHT, WIDTH), 0.5, dtype=np.float32)
    pixels[3, 4] = np.nan
    Image.fromarray(pixels, mode="F").save(path)

    with pytest.raises(ImageError, match=message_pattern(path, "contains NaN or infinite pixel values")):
        load_image(path)


def test_load_missing_reference_image_suggests_fetch(tmp_path: Path) -> None:
    path = tmp_path / "my data" / STARRY_NIGHT
    fetch = f"`stylemodule data fetch --data-dir '{path.parent}'`"
    with pytest.raises(ImageError, match=message_pattern("content image not found: ", path, fetch)):
        load_image(path, role="content")


def test_load_relative_path_named_in_full(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    pattern = "^" + re.escape(f"image not found: {tmp_path / 'absent.jpg'};")
    with pytest.raises(ImageError, match=pattern):
        load_image("absent.jpg")


def test_load_folder(tmp_path: Path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    pattern = message_pattern("style image ", folder, "is a folder", "give the path of an image file")
    with pytest.raises(ImageError, match=pattern):
        load_image(folder, role="style")


def test_load_text_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("not pixels\n")
    pattern = message_pattern(
        "style image ", path, "is not an image Pillow can read", "give a JPEG, PNG, WebP, TIFF or BMP file"
    )
    with pytest.raises(ImageError, match=pattern):
        load_image(path, role="style")


def test_load_truncated_jpeg(tmp_path: Path, jpeg_bytes: bytes) -> None:
    path = tmp_path / "cut.jpg"
    path.write_bytes(jpeg_bytes[: len(jpeg_bytes) // 2])
    pattern = message_pattern(path, "is truncated or corrupt", "download or export the file again")
    with pytest.raises(ImageError, match=pattern):
        load_image(path)


def test_load_truncated_png(tmp_path: Path, rgb_png: Path) -> None:
    path = tmp_path / "cut.png"
    data = rgb_png.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    pattern = message_pattern(path, "is truncated or corrupt", "download or export the file again")
    with pytest.raises(ImageError, match=pattern):
        load_image(path)


def test_load_corrupt_png_data(tmp_path: Path, rgb_png: Path) -> None:
    path = tmp_path / "corrupt.png"
    data = bytearray(rgb_png.read_bytes())
    data[data.index(b"IDAT") + 6] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ImageError, match=message_pattern(path, "is truncated or corrupt")):
        load_image(path)


def test_load_too_small(tmp_path: Path) -> None:
    path = tmp_path / "tiny.png"
    Image.new("RGB", (12, 9)).save(path)
    pattern = message_pattern(
        "content image ",
        path,
        "is 12x9 pixels; the deepest layer in use needs at least 16 pixels on each side; use a larger image",
    )
    with pytest.raises(ImageError, match=pattern):
        load_image(path, min_side=16, role="content")


def test_load_min_side_boundary(tmp_path: Path) -> None:
    fits = tmp_path / "fits.png"
    Image.new("RGB", (17, 16)).save(fits)
    short = tmp_path / "short.png"
    Image.new("RGB", (17, 15)).save(short)

    assert load_image(fits, min_side=16).shape == (3, 16, 17)
    with pytest.raises(ImageError, match="is 17x15 pixels"):
        load_image(short, min_side=16)


def test_load_over_max_pixels(rgb_png: Path) -> None:
    pattern = "^" + message_pattern(
        f"image {rgb_png} is 40x30 = 1200 pixels",
        "limit of 1199 pixels",
        "downscale the file or raise max_pixels",
    )
    with pytest.raises(ImageError, match=pattern):
        load_image(rgb_png, max_pixels=1199)
    assert load_image(rgb_png, max_pixels=1200).shape == (3, HEIGHT, WIDTH)


def test_load_checks_pixels_before_decoding(tmp_path: Path, jpeg_bytes: bytes) -> None:
    path = tmp_path / "cut.jpg"
    path.write_bytes(jpeg_bytes[: len(jpeg_bytes) // 2])
    # A truncated file fails with the size message, so the size came from the header alone.
    with pytest.raises(ImageError, match="raise max_pixels"):
        load_image(path, max_pixels=100)


def test_load_pillow_decompression_bomb(rgb_png: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)
    pattern = message_pattern(rgb_png, "decompression bomb", "downscale the file")
    with pytest.raises(ImageError, match=pattern):
        load_image(rgb_png)


def test_load_pillow_bomb_warning_suppressed(rgb_png: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # 1200 pixels lies between Pillow's warning limit (1000) and error limit (2000). The warnings
    # filter of setup.cfg turns an escaping DecompressionBombWarning into a test failure.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    assert load_image(rgb_png).shape == (3, HEIGHT, WIDTH)


def test_load_rejects_load_truncated_images(rgb_png: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES"):
        load_image(rgb_png)


# Real files


def test_load_starry_night() -> None:
    path = data_dir() / STARRY_NIGHT
    if not path.is_file():
        pytest.skip(f"{path} not found; run `stylemodule data fetch` or set STYLEMODULE_DATA")

    image = load_image(path, role="style")

    assert image.shape == (3, 308, 389)
    assert image.dtype == torch.float32
    assert 0.0 <= image.min().item() < image.max().item() <= 1.0


# Resizing


@pytest.mark.parametrize(
    ("shape", "size", "expected"),
    [
        ((30, 40), 20, (15, 20)),
        ((40, 30), 20, (20, 15)),
        ((30, 41), 20, (15, 20)),  # 30 * 20 / 41 = 14.63 rounds up
        ((30, 40), 80, (60, 80)),
        ((1, 400), 100, (1, 100)),  # 0.25 would round to 0
    ],
)
def test_resize_long_edge_shape(shape: tuple[int, int], size: int, expected: tuple[int, int]) -> None:
    image = torch.rand(3, *shape)
    assert resize_long_edge(image, size).shape == (3, *expected)


def test_resize_exact_shape() -> None:
    assert resize_exact(torch.rand(3, 30, 40), (17, 23)).shape == (3, 17, 23)


def test_resize_rejects_empty_size() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        resize_long_edge(torch.rand(3, 30, 40), 0)
    with pytest.raises(ValueError, match="at least 1x1"):
        resize_exact(torch.rand(3, 30, 40), (0, 5))


def test_resize_stays_in_unit_range() -> None:
    edge = torch.zeros(3, 8, 8)
    edge[:, :, 4:] = 1.0
    unclamped = F.resize(edge, [32, 32], interpolation=F.InterpolationMode.BICUBIC, antialias=True)
    # Bicubic interpolation overshoots on both sides of the edge, so the clamp is needed.
    assert unclamped.min() < 0
    assert unclamped.max() > 1

    for resized in (resize_exact(edge, (32, 32)), resize_long_edge(edge, 32)):
        assert resized.min().item() == 0.0
        assert resized.max().item() == 1.0


def test_resize_antialiases_checkerboard() -> None:
    # Scaling by 1/7 puts every sample centre on one input pixel, so a resize without
    # antialiasing returns only 0s and 1s.
    rows = torch.arange(63).view(-1, 1)
    columns = torch.arange(63).view(1, -1)
    checkerboard = ((rows + columns) % 2).float().expand(3, -1, -1)

    for resized in (resize_exact(checkerboard, (9, 9)), resize_long_edge(checkerboard, 9)):
        assert resized.shape == (3, 9, 9)
        assert torch.allclose(resized, torch.full_like(resized, 0.5), atol=0.02)


def test_style_shape_content_mode() -> None:
    assert style_shape((300, 400), (512, 384), "content") == (512, 384)


def test_style_shape_area_mode() -> None:
    # 600 * 600 pixels at aspect 4:3 gives 519.6 x 692.8.
    assert style_shape((300, 400), (600, 600), "area") == (520, 693)
    assert style_shape((308, 389), (308, 389), "area") == (308, 389)


def test_style_shape_unknown_mode() -> None:
    with pytest.raises(ValueError, match=message_pattern("'stretch'", "content, area")):
        style_shape((300, 400), (600, 600), "stretch")


# uint8 conversion and PNG output


def test_to_uint8_rounds() -> None:
    values = torch.tensor([0.0, 0.49 / 255, 0.51 / 255, 127.6 / 255, 254.4 / 255, 1.0, -0.5, 1.5, float("nan")])
    image = values.view(1, 1, -1).expand(3, 1, -1)

    pixels = to_uint8(image)

    assert pixels.dtype == torch.uint8
    assert pixels.shape == image.shape
    assert pixels[0, 0].tolist() == [0, 0, 1, 128, 254, 255, 0, 255, 0]


def test_to_uint8_bfloat16_matches_float32() -> None:
    image = torch.linspace(0, 1, 1000).view(1, 1, -1).expand(3, 1, -1)
    bf16 = image.to(torch.bfloat16)
    assert torch.equal(to_uint8(bf16), to_uint8(bf16.float()))


def test_save_png_round_trip(tmp_path: Path) -> None:
    image = torch.rand(3, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(0))
    path = tmp_path / "run" / "images" / "generated.png"

    save_png(image, path)

    with Image.open(path) as saved:
        assert saved.format == "PNG"
        assert saved.mode == "RGB"
        pixels = F.pil_to_tensor(saved)
    assert torch.equal(pixels, to_uint8(image))
    assert sorted(p.name for p in path.parent.iterdir()) == ["generated.png"]
    assert torch.equal(to_uint8(load_image(path)), to_uint8(image))


def test_save_png_replaces_file(tmp_path: Path) -> None:
    path = tmp_path / "generated.png"
    save_png(torch.zeros(3, 4, 5), path)
    save_png(torch.ones(3, 4, 5), path)
    assert load_image(path).min().item() == 1.0


def test_to_pil_rejects_batch() -> None:
    with pytest.raises(ValueError, match=re.escape("(1, 3, 4, 5)")):
        to_pil(torch.zeros(1, 3, 4, 5))
