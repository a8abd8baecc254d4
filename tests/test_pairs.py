"""PCDMs training pairs from a re-ID dataset: same pid, inside the subset, usable poses, seeded, checked files."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from pcdms.pose import MISSING, read_annotation_csv, read_pairs_csv, write_pairs_csv
from reid_aug.data import DatasetError, ImageRecord, ReidDataset, make_subset, parse_market_name, read_market
from reid_aug.data.toy import ANNOTATION_FILES, PAIRS_FILES, make_toy_market
from reid_aug.pairs import build_training_pairs, has_torso, read_training_pairs


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> tuple[Path, ReidDataset, dict[str, np.ndarray]]:
    root = make_toy_market(tmp_path_factory.mktemp("pairs") / "market", num_ids=10, seed=0)
    return root, read_market(root), read_annotation_csv(root / ANNOTATION_FILES["train"])


def _pid(path: Path) -> int:
    return parse_market_name(path.name)[0]


def test_has_torso() -> None:
    kp = np.full((18, 2), 10)
    assert has_torso(kp)
    for joint in (2, 5, 8, 11):
        bad = kp.copy()
        bad[joint] = MISSING
        assert not has_torso(bad)
    kp[[0, 4, 7, 10, 13]] = MISSING  # head, wrists, ankles do not matter
    assert has_torso(kp)


def test_pairs_are_all_ordered_same_pid_pairs(toy) -> None:
    _, ds, poses = toy
    pairs, counts = build_training_pairs(ds.train, poses)
    sizes = Counter(r.pid for r in ds.train)
    assert counts == {"images": len(ds.train), "images_without_pose": 0, "images_unusable_pose": 0,
                      "pids": len(sizes), "pids_without_pair": 0, "pairs": sum(n * (n - 1) for n in sizes.values())}
    assert len(pairs) == counts["pairs"] == len({(p.source, p.target) for p in pairs})
    assert all(_pid(p.source) == _pid(p.target) and p.source != p.target for p in pairs)
    assert [(p.source.name, p.target.name) for p in pairs] == sorted((p.source.name, p.target.name) for p in pairs)
    src_kp, tgt_kp = pairs[0].keypoints()
    np.testing.assert_array_equal(src_kp, poses[pairs[0].source.name])
    np.testing.assert_array_equal(tgt_kp, poses[pairs[0].target.name])


@pytest.mark.parametrize("per_source", [None, 2])
def test_pairs_never_leave_the_subset(toy, per_source) -> None:
    _, ds, poses = toy
    subset = make_subset(ds.train, 0.4, seed=0)
    allowed = {r.path for r in subset}
    pairs, counts = build_training_pairs(subset, poses, per_source=per_source)
    assert pairs and counts["images"] == len(subset) < len(ds.train)
    assert all(p.source in allowed and p.target in allowed for p in pairs)
    assert all(_pid(p.source) == _pid(p.target) for p in pairs)


def test_torso_rule_and_missing_poses_are_skipped_and_counted(toy) -> None:
    _, ds, poses = toy
    names = [r.name for r in ds.train]
    no_shoulder, no_hip, no_row = names[0], names[1], names[2]
    edited = dict(poses)
    edited[no_shoulder] = poses[no_shoulder].copy()
    edited[no_shoulder][5] = MISSING
    edited[no_hip] = poses[no_hip].copy()
    edited[no_hip][8] = MISSING
    del edited[no_row]
    pairs, counts = build_training_pairs(ds.train, edited)
    used = {n.name for p in pairs for n in (p.source, p.target)}
    assert used == set(names) - {no_shoulder, no_hip, no_row}
    assert all(has_torso(kp) for p in pairs for kp in p.keypoints())
    assert (counts["images_unusable_pose"], counts["images_without_pose"]) == (2, 1)
    loose, counts = build_training_pairs(ds.train, edited, require_torso=False)
    assert {n.name for p in loose for n in (p.source, p.target)} == set(names) - {no_row}
    assert counts["images_unusable_pose"] == 0
    strict, counts = build_training_pairs(ds.train, {n: np.full((18, 2), MISSING) for n in names}, require_torso=False,
                                          min_visible_joints=1)
    assert strict == [] and counts["images_unusable_pose"] == len(names)
    assert counts["pids_without_pair"] == counts["pids"]


def test_per_source_limit_is_seeded_and_independent_of_record_order(toy) -> None:
    _, ds, poses = toy
    pairs, counts = build_training_pairs(ds.train, poses, per_source=3, seed=7)
    per_src = Counter(p.source for p in pairs)
    assert set(per_src.values()) == {3} and len(per_src) == len(ds.train) == counts["pairs"] // 3
    shuffled = list(ds.train)
    random.Random(1).shuffle(shuffled)
    assert build_training_pairs(shuffled, poses, per_source=3, seed=7)[0] == pairs
    assert build_training_pairs(ds.train, poses, per_source=3, seed=8)[0] != pairs
    everything, _ = build_training_pairs(ds.train, poses)
    assert build_training_pairs(ds.train, poses, per_source=10_000)[0] == everything
    assert set(pairs) <= set(everything)
    with pytest.raises(ValueError, match="per_source"):
        build_training_pairs(ds.train, poses, per_source=0)


def test_non_training_identity_is_an_error(toy) -> None:
    _, ds, poses = toy
    # Junk only: pid 0 is a distractor that Market's reader keeps out of training, but an MSMT17 person.
    junk = ImageRecord(Path("/x/-1_c1s1_000001_00.jpg"), "-1_c1s1_000001_00.jpg", -1, 0, -1)
    with pytest.raises(DatasetError, match="-1_c1s1_000001_00.jpg: person id -1 \\(junk\\) is not a training identity"):
        build_training_pairs([*ds.train, junk], poses)


def test_read_training_pairs_accepts_the_toy_file(toy) -> None:
    root, ds, poses = toy
    rows = read_pairs_csv(root / PAIRS_FILES["train"])
    pairs = read_training_pairs(root / PAIRS_FILES["train"], ds.train, poses)
    assert [(p.source.name, p.target.name) for p in pairs] == rows
    paths = {r.name: r.path for r in ds.train}
    assert all(p.source == paths[p.source.name] and p.target == paths[p.target.name] for p in pairs)


def _bad(tmp_path: Path, rows, *args, **kwargs) -> str:
    path = tmp_path / "pairs.csv"
    write_pairs_csv(path, rows)
    with pytest.raises(DatasetError) as err:
        read_training_pairs(path, *args, **kwargs)
    return str(err.value)


def test_read_training_pairs_rejects_bad_pairs(toy, tmp_path) -> None:
    _, ds, poses = toy
    subset = make_subset(ds.train, 0.4, seed=0)
    inside = {r.name for r in subset}
    by_pid: dict[int, list[str]] = {}
    for r in subset:
        by_pid.setdefault(r.pid, []).append(r.name)
    pid_a, pid_b = sorted(by_pid)[:2]
    a = by_pid[pid_a][0]
    outside = next(r.name for r in ds.train if r.pid == pid_a and r.name not in inside)
    names = [r.name for r in ds.train]

    msg = _bad(tmp_path, [(a, outside)], subset, poses, train_names=names)
    assert f"pair 1 ({a} -> {outside}): {outside} is not in the training subset" in msg
    assert "never enters training" in msg
    msg = _bad(tmp_path, [(a, outside)], subset, poses)  # without train_names: cannot tell which
    assert f"{outside} is not one of the given training images" in msg
    b = by_pid[pid_b][0]
    msg = _bad(tmp_path, [(a, b)], subset, poses, train_names=names)
    assert f"{a} (pid {pid_a}) and {b} (pid {pid_b}) are different people" in msg
    msg = _bad(tmp_path, [(a, "9999_c1s1_000001_00.jpg")], subset, poses, train_names=names)
    assert "9999_c1s1_000001_00.jpg is not a training image" in msg
    assert "same image" in _bad(tmp_path, [(a, a)], subset, poses)


def test_read_training_pairs_checks_poses_and_lists_all_problems(toy, tmp_path) -> None:
    _, ds, poses = toy
    group = [r.name for r in ds.train if r.pid == ds.train[0].pid]
    edited = dict(poses)
    edited[group[1]] = poses[group[1]].copy()
    edited[group[1]][11] = MISSING
    del edited[group[2]]
    msg = _bad(tmp_path, [(group[0], group[1]), (group[0], group[2])], ds.train, edited)
    assert f"pair 1 ({group[0]} -> {group[1]}): {group[1]}: unusable pose (torso joint(s) l_hip missing" in msg
    assert f"pair 2 ({group[0]} -> {group[2]}): {group[2]} has no row in the pose annotations" in msg
    assert read_training_pairs(tmp_path / "pairs.csv", ds.train, {**edited, group[2]: poses[group[2]]},
                               require_torso=False)
    msg = _bad(tmp_path, [(group[0], f"missing_{i}.jpg") for i in range(25)], ds.train, poses)
    assert "25 problem(s) in 25 pairs" in msg and "... and 15 more problem(s)" in msg
    assert msg.count("is not one of the given training images") == 10
