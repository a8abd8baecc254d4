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
POSE_IDENTITIES = ("other", "any", "same")
STRATEGIES = ("random", "same-id", "canonical", "file")
BODY_JOINTS = 14  # OpenPose-18 joints 0-13 (nose to left ankle); 14-17 are eyes and ears
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
    """How many bank poses the source may draw: all but its own (``"any"``), none of its identity's
    (``"other"``), or only its identity's other images (``"same"``)."""
    own = 1 if source.name in bank.index else 0
    if identity == "other":
        return len(bank) - pid_counts.get(source.pid, 0)
    if identity == "same":
        return pid_counts.get(source.pid, 0) - own
    return len(bank) - own


def _allowed(bank: PoseBank, j: int, source: ImageRecord, identity: str) -> bool:
    if bank.names[j] == source.name:
        return False
    if identity == "other":
        return bank.pids[j] != source.pid
    if identity == "same":
        return bank.pids[j] == source.pid
    return True


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
        what = {"other": "of another identity", "any": "other than its own",
                "same": "of another image of the same person"}[identity]
        raise ValueError(
            f"{source.name}: the pose bank ({len(bank)} usable poses) holds no pose {what}; "
            "use a larger pose pool (pose_pool: train), pose_identity: any, or a lower min_visible_joints"
        )
    # "same": few candidates, so draw among them directly (rejection from the whole bank would crawl).
    candidates = [j for j in range(len(bank)) if _allowed(bank, j, source, identity)] if identity == "same" else None
    taken: list[int] = []
    for k in range(count):
        rng = item_rng(seed, STREAM_POSE, source.name, k)
        while True:
            j = candidates[int(rng.integers(len(candidates)))] if candidates else int(rng.integers(len(bank)))
            if not _allowed(bank, j, source, identity):
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


def normalize_poses(keypoints: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centred, scale-normalised poses: ``(P, 18, 2)`` pixels -> (normalised (P, 18, 2) float, neck (P, 2),
    torso length (P,)).

    Each pose is moved so its neck is at the origin and divided by its torso length (neck to the
    mid-point of the visible hips), so poses of people at different positions and sizes compare.
    Missing joints stay NaN. Needs :func:`is_usable_pose` poses (neck and a hip visible).
    """
    kp = np.asarray(keypoints, dtype=np.float64).copy()
    kp[is_missing(np.asarray(keypoints))] = np.nan
    neck = kp[:, NECK]
    hips = np.nanmean(kp[:, [R_HIP, L_HIP]], axis=1)
    torso = np.maximum(np.linalg.norm(hips - neck, axis=1), 1.0)
    return (kp - neck[:, None]) / torso[:, None, None], neck, torso


def canonical_poses(bank: PoseBank, k: int, seed: int) -> np.ndarray:
    """``k`` canonical poses of the bank: k-means centres of its normalised poses, back in pixels ``(k, 18, 2)``.

    Clustering (scikit-learn ``KMeans``, ``n_init=10``, ``random_state=seed``) runs over the 14
    body joints of the bank poses that have all of them visible; a centre's eyes and ears are
    the mean of its members' visible ones (missing when none has them). Centres are placed
    at the bank's median neck position and scaled to its median torso length, then rounded.
    Raises ValueError when fewer than ``k`` poses have every body joint visible.
    """
    from sklearn.cluster import KMeans

    norm, neck, torso = normalize_poses(bank.keypoints)
    complete = ~np.isnan(norm[:, :BODY_JOINTS]).any(axis=(1, 2))
    if complete.sum() < k:
        raise ValueError(f"canonical poses: only {int(complete.sum())} of the {len(bank)} usable poses show all "
                         f"{BODY_JOINTS} body joints, fewer than k = {k}; use a smaller k or a larger pose pool")
    members = norm[complete]
    km = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(members[:, :BODY_JOINTS].reshape(len(members), -1))
    centres = np.full((k, 18, 2), np.nan)
    centres[:, :BODY_JOINTS] = km.cluster_centers_.reshape(k, BODY_JOINTS, 2)
    for c in range(k):
        face = members[km.labels_ == c, BODY_JOINTS:]
        seen = ~np.isnan(face).any(axis=2)
        for j in range(18 - BODY_JOINTS):
            if seen[:, j].any():
                centres[c, BODY_JOINTS + j] = face[seen[:, j], j].mean(axis=0)
    # Order the centres by their horizontal spread (a stable order whatever k-means' labels are).
    order = np.argsort(np.nanmax(centres[:, :, 0], axis=1) - np.nanmin(centres[:, :, 0], axis=1), kind="stable")
    pixels = centres[order] * np.median(torso) + np.median(neck, axis=0)
    out = np.where(np.isnan(pixels), -1, np.round(pixels)).astype(np.int64)
    return np.where((out < 0).any(axis=2, keepdims=True), -1, out)


def draw_canonical(num_poses: int, source: ImageRecord, count: int, seed: int) -> list[int]:
    """Indices into ``num_poses`` canonical poses for ``source``: ``k``-th from ``(seed, name, k)``, distinct
    while there are enough."""
    taken: list[int] = []
    for k in range(count):
        rng = item_rng(seed, STREAM_POSE, source.name, k)
        j = int(rng.integers(num_poses))
        while j in taken and len(taken) < num_poses:
            j = int(rng.integers(num_poses))
        taken.append(j)
    return taken
