"""The pose bank: target poses a synthesis job may draw from, and the seeded draw itself.

PCDMs' re-ID experiment (Shen et al., ICLR 2024, Sec. 4.3, Table 2, after
PIDM's protocol) synthesizes, from a real training subset, the same people
under other poses and adds them to the subset. Which poses? Here: the
annotated poses of real training images. With ``pose_pool="subset"`` only
poses of the subset itself are used, so a 20 % run sees nothing of the other
80 % of the real data (not even its poses); ``"train"`` uses the whole
training set's poses.

Usable pose rule (:func:`is_usable_pose`): at least ``min_visible_joints``
visible joints (default 8 of 18), the neck visible, and at least one hip
visible. Neck and a hip anchor the torso (position, scale, lean); a skeleton
without them gives a pose-guided generator no body to place. Unusable poses
are left out of the bank (their images can still be *sources*).

The draw (:func:`draw_target`) is a pure function of ``(seed, source name, k)``
(names hashed with SHA-256, not Python's per-process ``hash()``), so a plan is
the same whatever the batch, order or resume point. The source's own pose is
never drawn; with ``identity="other"`` no pose of the source's own identity is
drawn either; the ``k`` draws of one source are distinct while the bank has
enough candidates.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np

from pcdms.pose import is_missing
from reid_aug.data.market import ImageRecord

NECK, R_HIP, L_HIP = 1, 8, 11
POSE_POOLS = ("subset", "train")
POSE_IDENTITIES = ("other", "any")
# Independent random streams of one synthesis seed.
STREAM_POSE, STREAM_NOISE, STREAM_TOY_POSE, STREAM_TOY_IMAGE = range(4)


def name_key(name: str) -> int:
    """A stable 64-bit integer for an image name (SHA-256; Python's ``hash()`` changes per process)."""
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "little")


def item_rng(seed: int, stream: int, name: str, k: int) -> np.random.Generator:
    """NumPy generator of ``(seed, stream, source name, k)``: one per synthetic image and purpose."""
    return np.random.default_rng([seed, stream, name_key(name), k])


def item_seed(seed: int, stream: int, name: str, k: int) -> int:
    """A 63-bit integer seed of ``(seed, stream, source name, k)`` (for ``torch.Generator.manual_seed``)."""
    state = np.random.SeedSequence([seed, stream, name_key(name), k]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def is_usable_pose(keypoints: np.ndarray, min_visible_joints: int) -> bool:
    """``(18, 2)`` keypoints: >= ``min_visible_joints`` visible, neck visible, at least one hip visible."""
    missing = is_missing(np.asarray(keypoints))
    if missing.shape != (18,):
        raise ValueError(f"a pose has shape (18, 2), got {np.shape(keypoints)}")
    visible = int((~missing).sum())
    return visible >= min_visible_joints and not missing[NECK] and not (missing[R_HIP] and missing[L_HIP])


@dataclass(frozen=True, eq=False)
class PoseBank:
    """Usable target poses, sorted by image name.

    ``keypoints`` (P, 18, 2) int64 pixel (x, y), -1 missing; ``names[i]``/``pids[i]``
    the image the pose was annotated on. ``num_unusable``: pool images whose pose failed
    :func:`is_usable_pose`; ``num_unannotated``: pool images without an annotation row.
    """

    names: tuple[str, ...]
    pids: tuple[int, ...]
    keypoints: np.ndarray
    num_unusable: int
    num_unannotated: int
    index: Mapping[str, int]  # name -> position

    def __len__(self) -> int:
        return len(self.names)

    def pid_counts(self) -> dict[int, int]:
        counts: dict[int, int] = {}
        for pid in self.pids:
            counts[pid] = counts.get(pid, 0) + 1
        return counts


def build_pose_bank(
    poses: Mapping[str, np.ndarray], pool: Iterable[ImageRecord], min_visible_joints: int
) -> PoseBank:
    """The usable poses of the images in ``pool`` (the subset, or the whole train split).

    ``poses``: ``{image name: (18, 2)}`` as :func:`pcdms.pose.read_annotation_csv` returns;
    rows of images outside ``pool`` are ignored.
    """
    names, pids, kps = [], [], []
    unusable = unannotated = 0
    for rec in sorted(pool, key=lambda r: r.name):
        kp = poses.get(rec.name)
        if kp is None:
            unannotated += 1
        elif not is_usable_pose(kp, min_visible_joints):
            unusable += 1
        else:
            names.append(rec.name)
            pids.append(rec.pid)
            kps.append(np.asarray(kp, dtype=np.int64))
    keypoints = np.stack(kps) if kps else np.zeros((0, 18, 2), np.int64)
    return PoseBank(tuple(names), tuple(pids), keypoints, unusable, unannotated, {n: i for i, n in enumerate(names)})


def num_candidates(bank: PoseBank, source: ImageRecord, identity: str, pid_counts: Mapping[int, int]) -> int:
    """How many bank poses the source may draw: all but its own (``"any"``) or its identity's (``"other"``)."""
    if identity == "other":
        return len(bank) - pid_counts.get(source.pid, 0)
    return len(bank) - (1 if source.name in bank.index else 0)


def draw_targets(
    bank: PoseBank, source: ImageRecord, count: int, seed: int, identity: str,
    pid_counts: Mapping[int, int] | None = None,
) -> list[int]:
    """Bank indices of the ``count`` target poses of ``source``; index ``k`` depends on ``(seed, name, k)``.

    Draw ``k`` takes uniform draws from its own generator until it hits an allowed pose not
    taken by draws ``0..k-1`` (once all allowed poses are taken, repeats are allowed), so the
    first ``n`` targets do not change when ``count`` grows. Raises ``ValueError`` if the bank
    has no allowed pose for this source.
    """
    if identity not in POSE_IDENTITIES:
        raise ValueError(f"identity must be one of {POSE_IDENTITIES}, got {identity!r}")
    pid_counts = bank.pid_counts() if pid_counts is None else pid_counts
    allowed = num_candidates(bank, source, identity, pid_counts)
    if allowed <= 0:
        what = "of another identity" if identity == "other" else "other than its own"
        raise ValueError(
            f"{source.name}: the pose bank ({len(bank)} usable poses) holds no pose {what}; "
            "use a larger pose pool (pose_pool: train), pose_identity: any, or a lower min_visible_joints"
        )
    taken: list[int] = []
    for k in range(count):
        rng = item_rng(seed, STREAM_POSE, source.name, k)
        while True:
            j = int(rng.integers(len(bank)))
            if bank.names[j] == source.name or (identity == "other" and bank.pids[j] == source.pid):
                continue
            if j in taken and len(set(taken)) < allowed:
                continue
            break
        taken.append(j)
    return taken


def pool_records(pose_pool: str, subset: Sequence[ImageRecord], train: Sequence[ImageRecord]) -> Sequence[ImageRecord]:
    """The images whose poses may be drawn: the subset itself or the whole training split."""
    if pose_pool not in POSE_POOLS:
        raise ValueError(f"pose_pool must be one of {POSE_POOLS}, got {pose_pool!r}")
    return subset if pose_pool == "subset" else train
