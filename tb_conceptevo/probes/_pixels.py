"""Any image a probe source gives (a PIL image in any mode, a tensor, an ndarray) as
the adapters' pixel arrays: uint8 ``[H, W, 3]`` for 8-bit sources, float32
``[3, H, W]`` otherwise; and from those the model input (RGB or grayscale) and the
uint8 thumbnails."""

from __future__ import annotations

from typing import Any, Tuple

import numpy as np
import torch

#: default colour transparent pixels are composited on (``background=``)
DEFAULT_BACKGROUND: Tuple[int, int, int] = (255, 255, 255)


def _check_background(background) -> Tuple[int, int, int]:
    values = tuple(background) if isinstance(background, (tuple, list)) else None
    if values is None or len(values) != 3 or not all(
            isinstance(v, (int, np.integer)) and not isinstance(v, bool) and 0 <= v <= 255 for v in values):
        raise ValueError(f"background must be an (r, g, b) tuple of ints in 0..255, got {background!r}")
    return tuple(int(v) for v in values)


def pil_to_rgb(image, background: Tuple[int, int, int] = DEFAULT_BACKGROUND):
    """An 8-bit RGB PIL image from any PIL mode, as a viewer shows it.

    * 16-bit and 32-bit integer grayscale (``I;16*``, ``I``: PNG/TIFF 16-bit) are scaled
      from 0..65535 to 0..255 (PIL's own ``convert`` clips them, so they turn white);
      float (``F``) images are taken as 0..1.
    * Transparency (alpha, ``LA``/``RGBA``/``PA``, or a palette's transparent index) is
      composited on ``background`` (default white), not dropped.
    * Palette, bilevel, CMYK, YCbCr, LAB and HSV images are converted to RGB.
    * The EXIF orientation tag is applied (photos appear upright, as in a viewer).
    """
    from PIL import Image, ImageOps

    if image.getexif().get(0x0112, 1) != 1:
        image = ImageOps.exif_transpose(image)
    mode = image.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        array = np.asarray(image)
        if mode == "F":
            gray = np.round(np.clip(np.nan_to_num(array.astype(np.float64)), 0.0, 1.0) * 255.0)
        else:  # 65535 -> 255 exactly, rounding to nearest
            gray = (np.clip(array.astype(np.int64), 0, 65535) * 255 + 32767) // 65535
        return Image.fromarray(gray.astype(np.uint8), "L").convert("RGB")
    if mode == "P" and "transparency" in image.info:
        image, mode = image.convert("RGBA"), "RGBA"
    if mode in ("LA", "La", "PA", "RGBa"):
        image, mode = image.convert("RGBA"), "RGBA"
    if mode == "RGBA":
        canvas = Image.new("RGBA", image.size, tuple(background) + (255,))
        return Image.alpha_composite(canvas, image).convert("RGB")
    return image if mode == "RGB" else image.convert("RGB")


def _to_array(image: Any, index: int, background: Tuple[int, int, int] = DEFAULT_BACKGROUND) -> np.ndarray:
    """Untransformed image as uint8 ``[H, W, 3]`` (8-bit sources) or float32 ``[3, H, W]``."""
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow ships with torchvision
        Image = None
    if Image is not None and isinstance(image, Image.Image):
        return np.array(pil_to_rgb(image, background), dtype=np.uint8)  # writable copy
    if isinstance(image, torch.Tensor):
        # torchvision convention: channels first
        array = image.detach().cpu().numpy()
        channels_last = False
    elif isinstance(image, np.ndarray):
        # numpy/PIL convention: channels last when the last axis looks like channels
        array = image
        channels_last = array.ndim == 3 and array.shape[-1] in (1, 3, 4) and array.shape[0] not in (1, 3, 4)
    else:
        raise TypeError(
            f"probe item {index}: expected a PIL image, tensor or ndarray image, got "
            f"{type(image).__name__}; pass image_key= for dict items"
        )
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3:
        raise ValueError(f"probe item {index}: image must be [C, H, W] or [H, W], got shape {array.shape}")
    if channels_last:
        array = np.moveaxis(array, -1, 0)
    channels = array.shape[0]
    if channels == 1:
        array = np.repeat(array, 3, axis=0)
    elif channels == 4:  # RGBA: drop alpha
        array = array[:3]
    elif channels != 3:
        raise ValueError(
            f"probe item {index}: image must have 1, 3 or 4 channels, got shape {tuple(image.shape)}"
        )
    if array.dtype == np.uint8:
        return np.ascontiguousarray(np.moveaxis(array, 0, -1))
    if array.dtype == np.uint16:  # 16-bit images: 0..65535 -> [0, 1]
        return np.ascontiguousarray(array, dtype=np.float32) / np.float32(65535.0)
    if np.issubdtype(array.dtype, np.integer) or array.dtype == bool:
        raise TypeError(
            f"probe item {index}: integer images must be uint8 or uint16, got {array.dtype}; convert "
            "to uint8 or to float in [0, 1]"
        )
    return np.ascontiguousarray(array, dtype=np.float32)


def _to_tensor(array: np.ndarray) -> torch.Tensor:
    """float32 ``[3, H, W]`` in [0, 1] (for 8-bit sources) from :func:`_to_array` output."""
    if array.dtype == np.uint8:
        return torch.from_numpy(array).permute(2, 0, 1).float().div_(255.0)
    return torch.from_numpy(array.copy())


def _to_uint8(array: np.ndarray) -> np.ndarray:
    """uint8 ``[H, W, 3]`` from :func:`_to_array` output (floats are clipped to [0, 1])."""
    if array.dtype == np.uint8:
        return array
    return np.round(np.clip(np.moveaxis(array, 0, -1), 0.0, 1.0) * 255.0).astype(np.uint8)


def _check_channels(channels) -> int:
    if channels not in (1, 3) or isinstance(channels, bool):
        raise ValueError(f"channels must be 1 (grayscale model input) or 3 (RGB), got {channels!r}")
    return int(channels)


def _as_channels(image: torch.Tensor, channels: int) -> torch.Tensor:
    """``[3, H, W]`` -> ``[channels, H, W]``: 1 channel is the gray value where the three
    are equal (grayscale sources come back exactly), else ITU-R 601 luma as PIL's ``L``."""
    if channels == 3:
        return image
    red, green, blue = image[0:1], image[1:2], image[2:3]
    luma = 0.299 * red + 0.587 * green + 0.114 * blue
    return torch.where((red == green) & (green == blue), red, luma)


def _size_of(array: np.ndarray) -> Tuple[int, int]:
    return tuple(array.shape[:2]) if array.dtype == np.uint8 else tuple(array.shape[1:])

