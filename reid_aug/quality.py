"""Image-quality metrics of pose-guided generation, computed as the community scripts do (DESIGN.md §9).

- SSIM: scikit-image ``structural_similarity`` with Gaussian weights, sigma 1.5,
  ``use_sample_covariance=False``, per channel, ``data_range`` from the
  prediction, on 0-255 arrays (the Pose-Transfer / GFLA / DPTN evaluation
  scripts); ``sigma=1.2`` gives the PIDM / PCDMs variant.
- L1: mean absolute difference on 0-255 arrays, over the whole image or over a
  boolean mask (e.g. the person: background the generator cannot know is then
  left out).

Images are ``(H, W, 3)`` uint8 arrays (or PIL images) of the same size.
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def _array(image) -> np.ndarray:
    arr = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) image, got shape {arr.shape}")
    return arr


def ssim(pred, target, sigma: float = 1.5) -> float:
    """SSIM of ``pred`` against ``target`` (Wang et al. 2004) with the community's settings (see module doc).

    Raises ``ValueError`` when the shapes differ.
    """
    from skimage.metrics import structural_similarity

    p, t = _array(pred).astype(np.float64), _array(target).astype(np.float64)
    if p.shape != t.shape:
        raise ValueError(f"ssim: prediction {p.shape} and target {t.shape} differ in shape")
    data_range = float(p.max() - p.min()) or 1.0
    return float(structural_similarity(p, t, gaussian_weights=True, sigma=sigma, use_sample_covariance=False,
                                       channel_axis=-1, data_range=data_range))


def l1(pred, target, mask: np.ndarray | None = None) -> float:
    """Mean |pred - target| in 0-255 units, over every pixel or over ``mask`` ((H, W) bool) only."""
    p, t = _array(pred).astype(np.float64), _array(target).astype(np.float64)
    if p.shape != t.shape:
        raise ValueError(f"l1: prediction {p.shape} and target {t.shape} differ in shape")
    diff = np.abs(p - t).mean(axis=2)
    if mask is None:
        return float(diff.mean())
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != diff.shape:
        raise ValueError(f"l1: mask {mask.shape} does not match the image {diff.shape}")
    if not mask.any():
        raise ValueError("l1: empty mask")
    return float(diff[mask].mean())
