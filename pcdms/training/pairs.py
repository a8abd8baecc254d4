"""Training pairs for the three PCDMs stages (Shen et al., ICLR 2024, Sec. 3, App. B).

Every stage learns from ordered pairs (source image, source pose, target image,
target pose) of one person: the prior maps the source's CLIP embedding to the
target's, the inpainting model draws the target half of a [source | target]
canvas, the refining model restores the target from its coarse image. This
module knows nothing of identities; whoever builds the pairs (``reid_aug.pairs``
for re-ID datasets) guarantees they are same-person pairs.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from pcdms.io import atomic_path


@dataclass(frozen=True)
class TrainingPair:
    """One ordered pair. Keypoints: 18 pixel ``(x, y)`` pairs in their image, -1 for a missing joint.

    ``background_weight``: loss weight of the target outside the box around its visible joints
    (:func:`person_box_weights`); 1 = the plain loss of the paper. Whoever builds the pairs sets it,
    e.g. 0 where the target's background cannot be known from the source (another camera)."""

    source: Path
    source_keypoints: tuple[tuple[int, int], ...]
    target: Path
    target_keypoints: tuple[tuple[int, int], ...]
    background_weight: float = 1.0

    @staticmethod
    def make(source: str | os.PathLike, source_keypoints, target: str | os.PathLike, target_keypoints,
             background_weight: float = 1.0) -> "TrainingPair":
        """Build from paths and ``(18, 2)`` array-likes; raises ``ValueError`` on a bad keypoint shape
        or a ``background_weight`` outside [0, 1]."""
        if not 0.0 <= background_weight <= 1.0:
            raise ValueError(f"background_weight must be in [0, 1], got {background_weight}")
        kps = []
        for what, kp in (("source", source_keypoints), ("target", target_keypoints)):
            arr = np.asarray(kp)
            if arr.shape != (18, 2):
                raise ValueError(f"{what} keypoints of {source if what == 'source' else target} must be (18, 2), "
                                 f"got {arr.shape}")
            kps.append(tuple((int(x), int(y)) for x, y in arr.astype(np.int64)))
        return TrainingPair(Path(source), kps[0], Path(target), kps[1], float(background_weight))

    def keypoints(self) -> tuple[np.ndarray, np.ndarray]:
        """(source, target) keypoints as ``(18, 2)`` int64 arrays."""
        return (np.asarray(self.source_keypoints, dtype=np.int64), np.asarray(self.target_keypoints, dtype=np.int64))


def person_box_weights(keypoints, background_weights, image_size: tuple[int, int], scale: int) -> torch.Tensor:
    """(B, 1, H/scale, W/scale) float loss weights of B target images: 1 on the box around each
    image's visible joints (``keypoints`` (B, 18, 2) pixels, -1 missing), widened by ``scale``
    pixels on every side (the head and hands reach past their joints), and
    ``background_weights[i]`` (B,) elsewhere. A cell counts as person when it overlaps the box.
    An image without visible joints is weighted 1 everywhere. Beyond the paper (README, "Training PCDMs")."""
    kps = np.asarray(keypoints)
    h, w = image_size[0] // scale, image_size[1] // scale
    out = torch.ones(len(kps), 1, h, w)
    for i, (kp, bg) in enumerate(zip(kps, np.asarray(background_weights, dtype=np.float64))):
        seen = (kp >= 0).all(axis=1)
        if bg == 1.0 or not seen.any():
            continue
        x0, y0 = kp[seen].min(axis=0) - scale
        x1, y1 = kp[seen].max(axis=0) + scale
        out[i].fill_(float(bg))
        out[i, :, max(0, y0 // scale):max(0, y1 // scale + 1), max(0, x0 // scale):max(0, x1 // scale + 1)] = 1.0
    return out


def pair_images(pairs: Iterable[TrainingPair]) -> list[Path]:
    """Every distinct image path of ``pairs`` (sources and targets), sorted."""
    return sorted({p for pair in pairs for p in (pair.source, pair.target)})


def write_pairs_table(path: str | os.PathLike, pairs: Sequence[TrainingPair]) -> None:
    """The pairs a run trained on, one CSV row each (``source,target``, absolute paths; a third
    column ``background_weight`` when any pair's is not 1), atomically."""
    weighted = any(p.background_weight != 1.0 for p in pairs)
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["source", "target"] + (["background_weight"] if weighted else []))
            writer.writerows([str(p.source), str(p.target)] + ([f"{p.background_weight:g}"] if weighted else [])
                             for p in pairs)
