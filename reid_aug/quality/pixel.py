"""Pixel metrics of pose-guided generation, computed as the community scripts do (DESIGN.md §9).

- SSIM: scikit-image ``structural_similarity`` with Gaussian weights, sigma 1.5,
  ``use_sample_covariance=False``, per channel, ``data_range`` from the
  prediction, on 0-255 arrays (the Pose-Transfer / GFLA / DPTN evaluation
  scripts); ``sigma=1.2`` gives the PIDM / PCDMs variant.
- L1: mean absolute difference on 0-255 arrays, over the whole image or over a
  boolean mask (e.g. the person: background the generator cannot know is then
  left out).
- :func:`pose_mask`: the person mask the Market "masked" metrics use, drawn from
  the target keypoints as the Pose-Transfer scripts (Zhu et al., CVPR 2019) build it.

Images are ``(H, W, 3)`` uint8 arrays (or PIL images) of the same size.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from pcdms.pose import NUM_KEYPOINTS, is_missing

#: Joint pairs (OpenPose-18 order, 0-based) whose rectangles make the mask: the skeleton's limbs
#: plus the links that close the torso (hips to shoulders, hip to hip) and the head (neck to ears,
#: ear to ear), the set of the Pose-Transfer mask script.
MASK_LIMBS: tuple[tuple[int, int], ...] = (
    (1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10), (1, 11), (11, 12), (12, 13),
    (1, 0), (0, 14), (14, 16), (0, 15), (15, 17), (1, 16), (1, 17), (8, 11), (11, 5), (8, 2), (16, 17),
)
MASK_RADIUS = 4  # half-width of a limb rectangle and radius of a joint disc, pixels at 128x64
MASK_CLOSING = 5  # side of the square that dilates then erodes the drawn shapes


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


def pose_mask(keypoints: np.ndarray, size: tuple[int, int], radius: int = MASK_RADIUS) -> np.ndarray:
    """(H, W) bool person mask from 18 ``(x, y)`` keypoints (-1 missing) on an image of ``size`` = (H, W).

    Every :data:`MASK_LIMBS` pair with both joints visible is a rectangle of half-width
    ``radius`` along the segment, every visible joint a disc of ``radius``; the union is dilated,
    then eroded, by a ``MASK_CLOSING`` square (a closing that fills the gaps between shapes).
    This is the mask of the Market "mask-SSIM"/masked-LPIPS scripts (Pose-Transfer, Zhu et al.
    2019; reused by GFLA, DPTN, PIDM). All keypoints missing gives an all-False mask.
    """
    from skimage.draw import disk, polygon
    from skimage.morphology import dilation, erosion

    kp = np.asarray(keypoints, dtype=np.float64)
    if kp.shape != (NUM_KEYPOINTS, 2):
        raise ValueError(f"pose_mask: expected ({NUM_KEYPOINTS}, 2) keypoints, got shape {kp.shape}")
    missing = is_missing(kp.astype(np.int64))
    mask = np.zeros(size, dtype=bool)
    for a, b in MASK_LIMBS:
        if missing[a] or missing[b] or np.array_equal(kp[a], kp[b]):
            continue
        d = kp[b] - kp[a]
        normal = radius * np.array([-d[1], d[0]]) / np.linalg.norm(d)
        corners = np.stack([kp[a] + normal, kp[a] - normal, kp[b] - normal, kp[b] + normal])
        rr, cc = polygon(corners[:, 1], corners[:, 0], shape=size)
        mask[rr, cc] = True
    for j in np.flatnonzero(~missing):
        rr, cc = disk((kp[j, 1], kp[j, 0]), radius, shape=size)
        mask[rr, cc] = True
    square = np.ones((MASK_CLOSING, MASK_CLOSING), dtype=bool)
    return erosion(dilation(mask, square), square)


def apply_mask(image, mask: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 copy of ``image`` with the pixels outside ``mask`` set to 0 (black), as the
    masked metrics of the community scripts compare them."""
    arr = _array(image)
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != arr.shape[:2]:
        raise ValueError(f"apply_mask: mask {mask.shape} does not match the image {arr.shape[:2]}")
    return np.where(mask[..., None], arr, 0).astype(np.uint8)
