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

from pcdms.io import atomic_path


@dataclass(frozen=True)
class TrainingPair:
    """One ordered pair. Keypoints: 18 pixel ``(x, y)`` pairs in their image, -1 for a missing joint."""

    source: Path
    source_keypoints: tuple[tuple[int, int], ...]
    target: Path
    target_keypoints: tuple[tuple[int, int], ...]

    @staticmethod
    def make(source: str | os.PathLike, source_keypoints, target: str | os.PathLike, target_keypoints) -> "TrainingPair":
        """Build from paths and ``(18, 2)`` array-likes; raises ``ValueError`` on a bad keypoint shape."""
        kps = []
        for what, kp in (("source", source_keypoints), ("target", target_keypoints)):
            arr = np.asarray(kp)
            if arr.shape != (18, 2):
                raise ValueError(f"{what} keypoints of {source if what == 'source' else target} must be (18, 2), "
                                 f"got {arr.shape}")
            kps.append(tuple((int(x), int(y)) for x, y in arr.astype(np.int64)))
        return TrainingPair(Path(source), kps[0], Path(target), kps[1])

    def keypoints(self) -> tuple[np.ndarray, np.ndarray]:
        """(source, target) keypoints as ``(18, 2)`` int64 arrays."""
        return (np.asarray(self.source_keypoints, dtype=np.int64), np.asarray(self.target_keypoints, dtype=np.int64))


def pair_images(pairs: Iterable[TrainingPair]) -> list[Path]:
    """Every distinct image path of ``pairs`` (sources and targets), sorted."""
    return sorted({p for pair in pairs for p in (pair.source, pair.target)})


def write_pairs_table(path: str | os.PathLike, pairs: Sequence[TrainingPair]) -> None:
    """The pairs a run trained on, one CSV row each (``source,target``, absolute paths), atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["source", "target"])
            writer.writerows([str(p.source), str(p.target)] for p in pairs)
