"""Image files of any mode PIL opens, as 8-bit RGB: the one conversion every loader uses."""

from __future__ import annotations

import numpy as np
from PIL import Image

# Modes PIL's own convert("RGB") maps correctly (8 bits per channel, palettes, alpha dropped, CMYK ...).
_DIRECT = {"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"}


def to_rgb8(im: Image.Image, where: str = "image") -> Image.Image:
    """``im`` as an 8-bit RGB image; ``where`` (the file) names it in errors.

    16-bit and 32-bit integer grey images (``I;16*``, ``I``) are scaled from their range
    (0-65535 -> 0-255, ``round(v / 257)``); PIL's plain ``convert("RGB")`` clips them instead,
    which turns a 16-bit PNG white. Float images (``F``) in [0, 1] are scaled by 255, those in
    [0, 255] kept. Raises ValueError for values outside those ranges or a mode PIL cannot convert.
    """
    if im.mode in _DIRECT:
        return im.convert("RGB")
    if im.mode.startswith("I") or im.mode == "F":
        arr = np.asarray(im).astype(np.float64)
        top = float(arr.max()) if arr.size else 0.0
        if float(arr.min(initial=0.0)) < 0:
            raise ValueError(f"{where}: {im.mode} image with negative values; cannot map it to 8-bit RGB")
        if im.mode == "F":
            scale = 255.0 if top <= 1.0 else 1.0 if top <= 255.0 else None
        else:
            scale = 1.0 if top <= 255 else 1 / 257 if top <= 65535 else None
        if scale is None:
            raise ValueError(f"{where}: {im.mode} image with values up to {top:g}; expected 8-bit, 16-bit or [0, 1]")
        grey = np.clip(np.round(arr * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    try:
        return im.convert("RGB")
    except ValueError as exc:
        raise ValueError(f"{where}: cannot convert a {im.mode} image to RGB ({exc})") from None
