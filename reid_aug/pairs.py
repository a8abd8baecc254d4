"""Training pairs for the PCDMs stages from a re-ID dataset (DESIGN §7).

Every stage learns from ordered same-identity pairs (source, target) with usable
poses (Shen et al., ICLR 2024, Sec. 3). The pairs come from training identities
only, and only from the chosen subset when one is given: an image outside the
subset never enters training, so the subset-only generator is leakage-free.

Usable pose rule (default): both shoulders and both hips visible, as in the
community ``market-pairs-*.csv`` files (Pose-Transfer, Zhu et al., CVPR 2019).
:func:`build_training_pairs` makes every pair (or ``per_source`` seeded ones per
source); :func:`read_training_pairs` reads a community ``from,to`` file and
checks every pair against the allowed images and their poses.
"""

from __future__ import annotations

import dataclasses

from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from pcdms.pose import KEYPOINT_NAMES, NUM_KEYPOINTS, is_missing, read_pairs_csv
from pcdms.training.pairs import TrainingPair
from reid_aug.data.market import DatasetError, ImageRecord
from reid_aug.posebank import item_rng

TORSO_JOINTS = (2, 5, 8, 11)  # r_shoulder, l_shoulder, r_hip, l_hip
STREAM_TRAIN_PAIRS = 4  # item_rng stream of the per-source target draw (posebank uses 0..3)
MAX_PROBLEMS = 10  # problems listed in one error; the rest are counted


def has_torso(keypoints: np.ndarray) -> bool:
    """(18, 2) keypoints: both shoulders (2, 5) and both hips (8, 11) visible.

    The default usable-pose rule, as in the community market-pairs files.
    """
    return not is_missing(np.asarray(keypoints))[list(TORSO_JOINTS)].any()


def _pose_problem(name: str, poses: Mapping[str, np.ndarray], require_torso: bool, min_visible: int) -> str | None:
    """None if ``name`` has a usable pose, else why not: "no pose" or "unusable pose ..."."""
    kp = poses.get(name)
    if kp is None:
        return f"{name} has no row in the pose annotations"
    missing = is_missing(np.asarray(kp))
    if missing.shape != (NUM_KEYPOINTS,):
        return f"{name}: pose has shape {np.shape(kp)}, expected ({NUM_KEYPOINTS}, 2)"
    if require_torso and missing[list(TORSO_JOINTS)].any():
        lost = ", ".join(KEYPOINT_NAMES[j] for j in TORSO_JOINTS if missing[j])
        return f"{name}: unusable pose (torso joint(s) {lost} missing; both shoulders and both hips are required)"
    if int((~missing).sum()) < min_visible:
        return f"{name}: unusable pose ({int((~missing).sum())} visible joints, {min_visible} required)"
    return None


def _index_records(records: Sequence[ImageRecord]) -> dict[str, ImageRecord]:
    """name -> record; junk (pid < 0) or a repeated name is an error (pid 0 is an MSMT17 person)."""
    index: dict[str, ImageRecord] = {}
    for r in records:
        if r.pid < 0:
            raise DatasetError(f"{r.path}: person id {r.pid} (junk) is not a training identity")
        if r.name in index:
            raise DatasetError(f"image name {r.name} appears twice ({index[r.name].path}, {r.path})")
        index[r.name] = r
    return index


def build_training_pairs(
    records: Sequence[ImageRecord],
    poses: Mapping[str, np.ndarray],
    *,
    per_source: int | None = None,
    seed: int = 0,
    require_torso: bool = True,
    min_visible_joints: int = 0,
) -> tuple[list[TrainingPair], dict[str, int]]:
    """Ordered same-pid pairs (source != target) among ``records`` whose poses are usable.

    ``per_source`` limits each source to that many targets, drawn from
    ``item_rng(seed, STREAM_TRAIN_PAIRS, source name, 0)``: the result depends on
    (records as a set, poses, seed), not on record order. Returns the pairs sorted by
    (source name, target name) and counts: images, images_without_pose,
    images_unusable_pose, pids, pids_without_pair (fewer than 2 usable images), pairs.
    """
    if per_source is not None and per_source < 1:
        raise ValueError(f"per_source must be >= 1 or None, got {per_source}")
    if not 0 <= min_visible_joints <= NUM_KEYPOINTS:
        raise ValueError(f"min_visible_joints must be in 0..{NUM_KEYPOINTS}, got {min_visible_joints}")
    index = _index_records(records)
    counts = dict.fromkeys(("images", "images_without_pose", "images_unusable_pose", "pids", "pids_without_pair",
                            "pairs"), 0)
    by_pid: dict[int, list[ImageRecord]] = {}
    for name in sorted(index):
        rec = index[name]
        counts["images"] += 1
        by_pid.setdefault(rec.pid, [])
        problem = _pose_problem(name, poses, require_torso, min_visible_joints)
        if problem is None:
            by_pid[rec.pid].append(rec)
        else:
            counts["images_without_pose" if name not in poses else "images_unusable_pose"] += 1
    pairs: list[TrainingPair] = []
    for pid in sorted(by_pid):
        group = by_pid[pid]
        counts["pids_without_pair"] += len(group) < 2
        for src in group:
            targets = [t for t in group if t.name != src.name]
            if per_source is not None and len(targets) > per_source:
                pick = item_rng(seed, STREAM_TRAIN_PAIRS, src.name, 0).choice(len(targets), per_source, replace=False)
                targets = [targets[i] for i in sorted(pick)]
            pairs += [TrainingPair.make(src.path, poses[src.name], t.path, poses[t.name]) for t in targets]
    counts["pids"], counts["pairs"] = len(by_pid), len(pairs)
    return pairs, counts


def weight_cross_camera_background(pairs: Sequence[TrainingPair], records: Sequence[ImageRecord],
                                   weight: float) -> list[TrainingPair]:
    """``pairs`` with ``background_weight = weight`` where source and target have different camids
    (``records`` give each image's camid; a pair image not among them raises ``ValueError``).

    Beyond the paper: the background of another camera cannot be predicted from the source, so
    a generator trained to draw it learns to guess one of the training cameras (on the toy data it
    painted the training cameras' walls into every image); with weight 0 the person is still
    learned from every pair and the background only from same-camera pairs, where it is the
    source's (README, "Training PCDMs")."""
    camid = {r.path: r.camid for r in records}
    out = []
    for p in pairs:
        missing = [str(x) for x in (p.source, p.target) if x not in camid]
        if missing:
            raise ValueError(f"{missing[0]}: not among the training records (no camid)")
        out.append(p if camid[p.source] == camid[p.target] else dataclasses.replace(p, background_weight=weight))
    return out


def read_training_pairs(
    pairs_csv: str | Path,
    records: Sequence[ImageRecord],
    poses: Mapping[str, np.ndarray],
    *,
    train_names: Iterable[str] | None = None,
    require_torso: bool = True,
) -> list[TrainingPair]:
    """The pairs of a community ``from,to`` file, in file order, every one checked.

    Both images must be in ``records`` (``train_names``, the whole train split, tells an
    image outside the subset from one that is no training image at all), of one pid,
    distinct, with usable poses. All problems are collected and raised together as one
    :class:`DatasetError` (the first ``MAX_PROBLEMS`` listed, the rest counted).
    """
    index = _index_records(records)
    train = set(train_names) if train_names is not None else None
    rows = read_pairs_csv(pairs_csv)
    if not rows:
        raise DatasetError(f"{pairs_csv}: lists no pairs")
    problems: list[str] = []
    pairs: list[TrainingPair] = []
    for i, (a, b) in enumerate(rows, 1):
        where = f"{pairs_csv}, pair {i} ({a} -> {b})"
        found = []
        for name in dict.fromkeys((a, b)):
            if name in index:
                found.append(name)
            elif train is not None and name in train:
                problems.append(f"{where}: {name} is not in the training subset "
                                "(an image outside the subset never enters training)")
            elif train is not None:
                problems.append(f"{where}: {name} is not a training image (not in the train split)")
            else:
                problems.append(f"{where}: {name} is not one of the given training images")
        if a == b:
            problems.append(f"{where}: source and target are the same image")
        if len(found) == 2 and index[a].pid != index[b].pid:
            problems.append(f"{where}: {a} (pid {index[a].pid}) and {b} (pid {index[b].pid}) are different people")
        pose_problems = [p for n in found if (p := _pose_problem(n, poses, require_torso, 0)) is not None]
        problems += [f"{where}: {p}" for p in pose_problems]
        if len(found) == 2 and a != b and index[a].pid == index[b].pid and not pose_problems:
            pairs.append(TrainingPair.make(index[a].path, poses[a], index[b].path, poses[b]))
    if problems:
        more = len(problems) - MAX_PROBLEMS
        listed = "\n  ".join(problems[:MAX_PROBLEMS]) + (f"\n  ... and {more} more problem(s)" if more > 0 else "")
        raise DatasetError(f"{pairs_csv}: {len(problems)} problem(s) in {len(rows)} pairs:\n  {listed}")
    return pairs
