"""Image files in and out, resizing, and the uint8 conversion shared by PNG files and TensorBoard.

Inside the project an image is a float32 tensor of shape (3, H, W), RGB, with values in [0, 1].
`load_image` composites transparency (RGBA, LA, PA and palette or greyscale images with a
transparent colour) on a white background.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.v2.functional as F
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError
from torchvision.transforms import InterpolationMode

from stylemodule.errors import ConfigError, ImageError
from stylemodule.files import atomic_path

STYLE_SIZE_MODES = ("content", "area")

READABLE_FORMATS = "JPEG, PNG, WebP, TIFF or BMP"

_UINT16_MAX = 65535
_INT32_MAX = 2**31 - 1

# Pillow's exception types for a file that ends early or contains invalid data.
_DECODE_ERRORS = (OSError, SyntaxError, EOFError, ValueError)


def load_image(
    path: str | os.PathLike[str],
    *,
    max_pixels: int = 4096 * 4096,
    min_side: int = 1,
    role: str = "image",
) -> torch.Tensor:
    """Read an image file as a float32 (3, H, W) RGB tensor in [0, 1], after its EXIF orientation.

    Transparency is composited on white. `role` ("content", "style", ...) names the image in the
    ImageError raised for a missing, unreadable, corrupt, too small or too large file.
    """
    path = Path(os.path.abspath(path))
    noun = "image" if role == "image" else f"{role} image"
    label = f"{noun} {path}"
    if not path.exists():
        raise ImageError(f"{noun} not found: {path}; {_missing_image_hint(path)}")
    if path.is_dir():
        raise ImageError(f"{label} is a folder, not a file; give the path of an image file")

    upright = _decode(path, label, max_pixels)
    _check_min_side(upright, label, min_side)
    return _to_tensor(upright, label)


def _missing_image_hint(path: Path) -> str:
    """Return what to do about a missing image: fetch it if the manifest lists its name."""
    from stylemodule.data import data_command, read_manifest

    if path.name in {entry.name for entry in read_manifest()}:
        fetch = data_command("fetch", path.parent)
        return f"download the reference images into its folder with `{fetch}`, or give another data folder"
    return "check the path"


def _decode(path: Path, label: str, max_pixels: int) -> Image.Image:
    """Check the pixel count in the file's header, then decode the pixels and apply the EXIF orientation."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # With this Pillow setting a truncated file loads with grey pixels instead of raising.
        raise RuntimeError(
            f"cannot check {label} for truncation because PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True; "
            "the code that sets it must set it back to False"
        )
    with warnings.catch_warnings():
        # max_pixels replaces Pillow's warning limit. Pillow's error limit, twice as high, still applies.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with _open(path, label) as image:
                _check_pixel_count(image, label, max_pixels)
                image.load()
                return ImageOps.exif_transpose(image)
        except ImageError:
            # ImageError is a ValueError, which the decode handler below would otherwise catch.
            raise
        except Image.DecompressionBombError as error:
            raise ImageError(
                f"{label} is over Pillow's decompression bomb limit ({error}); downscale the file, "
                "or raise both max_pixels and PIL.Image.MAX_IMAGE_PIXELS"
            ) from error
        except _DECODE_ERRORS as error:
            raise ImageError(
                f"{label} is truncated or corrupt ({error}); download or export the file again"
            ) from error


def _open(path: Path, label: str) -> Image.Image:
    """Open `path` with Pillow, which reads only the header."""
    try:
        return Image.open(path)
    except UnidentifiedImageError as error:
        raise ImageError(
            f"{label} is not an image Pillow can read (unknown or invalid format); "
            f"give a {READABLE_FORMATS} file"
        ) from error
    except PermissionError as error:
        raise ImageError(f"{label} could not be read ({error}); check the file's permissions") from error


def _check_pixel_count(image: Image.Image, label: str, max_pixels: int) -> None:
    """Raise ImageError when the size in the file's header is over `max_pixels`."""
    width, height = image.size
    if width * height > max_pixels:
        raise ImageError(
            f"{label} is {width}x{height} = {width * height} pixels, over the limit of {max_pixels} pixels; "
            "downscale the file or raise max_pixels"
        )


def _check_min_side(image: Image.Image, label: str, min_side: int) -> None:
    width, height = image.size
    if min(width, height) < min_side:
        raise ImageError(
            f"{label} is {width}x{height} pixels; the deepest layer in use needs at least "
            f"{min_side} pixels on each side; use a larger image"
        )


def _to_tensor(image: Image.Image, label: str) -> torch.Tensor:
    """Convert any Pillow mode to a float32 (3, H, W) RGB tensor in [0, 1]."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        if not np.isfinite(values).all():
            raise ImageError(f"{label} contains NaN or infinite pixel values; save it with finite values")
        grey = _scale_high_depth(values, image.mode)
        return torch.from_numpy(grey).to(torch.float32).expand(3, -1, -1).contiguous()

    try:
        if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            rgb = Image.alpha_composite(white, rgba).convert("RGB")
        else:
            rgb = image.convert("RGB")
    except ValueError as error:
        raise ImageError(
            f"{label} has Pillow mode {image.mode}, which cannot be converted to RGB ({error}); "
            "save the file as 8-bit RGB"
        ) from error
    return F.to_dtype(F.pil_to_tensor(rgb), torch.float32, scale=True).contiguous()


def _scale_high_depth(values: np.ndarray, mode: str) -> np.ndarray:
    """Scale 16-bit, 32-bit integer or float pixels to [0, 1]."""
    if mode.startswith("I;16"):
        scale = _UINT16_MAX
    elif mode == "I":
        # Older Pillow versions open 16-bit greyscale PNGs in mode I, so values that fit in
        # 16 bits are scaled as 16-bit.
        scale = _UINT16_MAX if values.max(initial=0) <= _UINT16_MAX else _INT32_MAX
    else:
        # NOTE: mode F stores no range, so the maximum value decides between [0, 1], [0, 255]
        # and [0, 65535]. An 8-bit float image whose maximum is under 1 is read as [0, 1].
        maximum = values.max(initial=0)
        if maximum <= 1:
            scale = 1
        elif maximum <= 255:
            scale = 255
        else:
            scale = _UINT16_MAX
    return np.clip(values / scale, 0, 1)


def resize_long_edge(image: torch.Tensor, size: int) -> torch.Tensor:
    """Resize so that the longer side is `size` pixels, keeping the aspect ratio (rounded)."""
    if size < 1:
        raise ValueError(f"size must be at least 1 pixel, got {size}")
    height, width = image.shape[-2:]
    scale = size / max(height, width)
    shape = (max(1, round(height * scale)), max(1, round(width * scale)))
    return resize_exact(image, shape)


def resize_exact(image: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Resize to `shape` = (height, width) with antialiased bicubic interpolation, clamped to [0, 1]."""
    height, width = shape
    if height < 1 or width < 1:
        raise ValueError(f"shape must be at least 1x1 pixels, got (height, width) = {tuple(shape)}")
    resized = F.resize(image, [height, width], interpolation=InterpolationMode.BICUBIC, antialias=True)
    # Bicubic interpolation overshoots near sharp edges.
    return resized.clamp(0, 1).contiguous()


def style_shape(style_hw: tuple[int, int], content_hw: tuple[int, int], mode: str) -> tuple[int, int]:
    """Return the (height, width) to resize the style image to before its Gram matrices are taken.

    "content" uses the content image's shape, as Gatys et al. (CVPR 2016) do. "area" keeps the
    style image's aspect ratio at the content image's pixel count.
    """
    if mode == "content":
        return (int(content_hw[0]), int(content_hw[1]))
    if mode == "area":
        style_height, style_width = style_hw
        content_pixels = content_hw[0] * content_hw[1]
        height = math.sqrt(content_pixels * style_height / style_width)
        width = height * style_width / style_height
        return (max(1, round(height)), max(1, round(width)))
    raise ConfigError(f"unknown style size mode {mode!r}; use one of: {', '.join(STYLE_SIZE_MODES)}")


def to_uint8(image: torch.Tensor) -> torch.Tensor:
    """Convert a [0, 1] float image to uint8 by clamping and rounding.

    PNG files and TensorBoard both use this conversion, so they show identical pixels.
    """
    # Scaling by 255 in bf16 or fp16 could round to the wrong integer. Casting NaN to uint8 is
    # undefined, so NaN becomes 0.
    pixels = torch.nan_to_num(image.detach().float(), nan=0.0)
    return pixels.clamp(0, 1).mul(255).round().to(torch.uint8)


def to_pil(image: torch.Tensor) -> Image.Image:
    """Convert a (3, H, W) float image to an RGB Pillow image through `to_uint8`."""
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"expected an image tensor of shape (3, H, W), got {tuple(image.shape)}")
    return F.to_pil_image(to_uint8(image).cpu(), mode="RGB")


def save_png(image: torch.Tensor, path: str | os.PathLike[str]) -> None:
    """Write `to_uint8(image)` to `path` as an RGB PNG, atomically, creating parent folders."""
    picture = to_pil(image)
    with atomic_path(path) as temporary:
        picture.save(temporary, format="PNG")
