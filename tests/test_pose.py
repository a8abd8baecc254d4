"""Tests for pcdms.pose: Market annotation/pair files, pose vectors, skeleton images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pcdms.pose import (
    COLORS,
    KEYPOINT_NAMES,
    LIMBS,
    MISSING,
    MISSING_VECTOR_VALUE,
    NUM_KEYPOINTS,
    PoseFormatError,
    draw_skeleton,
    draw_skeleton_batch,
    flip_pose,
    is_missing,
    pose_to_vector,
    read_annotation_csv,
    read_pairs_csv,
    side_by_side,
    stick_width,
    vector_to_pose,
    write_annotation_csv,
    write_pairs_csv,
)

# A real row of market-annotation-train.csv (l-ankle missing).
NAME = "0002_c1s1_000451_03.jpg"
YS = [18, 30, 29, 52, 72, 31, 54, 75, 70, 99, 124, 72, 100, -1, 14, 14, 15, 15]
XS = [33, 40, 30, 26, 26, 49, 52, 48, 33, 33, 33, 46, 45, -1, 30, 36, 28, 41]
ROW_SPACED = f"{NAME}: {YS}: {XS}"
ROW_TIGHT = f"0002_c1s1_000551_01.jpg:{YS}:{XS}".replace(", ", ",")
HEADER = "name:keypoints_y:keypoints_x"
POSE = np.stack([np.array(XS), np.array(YS)], axis=-1)


def _write(tmp_path, lines, name="ann.csv"):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


# ----------------------------------------------------------------- constants


def test_constants_follow_openpose_coco18():
    assert NUM_KEYPOINTS == 18 == len(KEYPOINT_NAMES) == len(COLORS)
    assert KEYPOINT_NAMES[0] == "nose" and KEYPOINT_NAMES[1] == "neck" and KEYPOINT_NAMES[17] == "l_ear"
    assert len(LIMBS) == 17
    one_based = [(2, 3), (2, 6), (3, 4), (4, 5), (6, 7), (7, 8), (2, 9), (9, 10), (10, 11), (2, 12),
                 (12, 13), (13, 14), (2, 1), (1, 15), (15, 17), (1, 16), (16, 18)]
    assert list(LIMBS) == [(a - 1, b - 1) for a, b in one_based]
    assert COLORS[0] == (255, 0, 0) and COLORS[1] == (255, 85, 0) and COLORS[-1] == (255, 0, 85)
    assert len(set(COLORS)) == 18
    assert MISSING == -1


# ----------------------------------------------------------------- annotation files


def test_read_annotation_real_rows_with_and_without_spaces(tmp_path):
    path = _write(tmp_path, [HEADER, ROW_SPACED, "", ROW_TIGHT, ""])
    poses = read_annotation_csv(path)
    assert list(poses) == [NAME, "0002_c1s1_000551_01.jpg"]
    kp = poses[NAME]
    assert kp.shape == (18, 2) and np.issubdtype(kp.dtype, np.integer)
    # x first in our arrays although the file stores y first
    assert tuple(kp[0]) == (33, 18)
    assert tuple(kp[10]) == (33, 124)
    assert tuple(kp[13]) == (-1, -1)
    np.testing.assert_array_equal(poses["0002_c1s1_000551_01.jpg"], kp)


def test_read_annotation_half_missing_joint_becomes_fully_missing(tmp_path):
    ys = list(YS)
    ys[4] = -1  # y missing, x present
    path = _write(tmp_path, [HEADER, f"{NAME}: {ys}: {XS}"])
    kp = read_annotation_csv(path)[NAME]
    assert tuple(kp[4]) == (-1, -1)
    assert is_missing(kp).tolist() == [j in (4, 13) for j in range(18)]


def test_annotation_round_trip_is_sorted_and_deterministic(tmp_path):
    rng = np.random.default_rng(0)
    poses = {}
    for name in ["0003_c2s1_000001_01.jpg", "0001_c1s1_000001_00.jpg", "0002_c1s1_000451_03.jpg"]:
        kp = np.stack([rng.integers(0, 64, 18), rng.integers(0, 128, 18)], axis=-1)
        kp[rng.integers(0, 18)] = MISSING
        poses[name] = kp
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    write_annotation_csv(a, poses)
    write_annotation_csv(b, dict(reversed(list(poses.items()))))
    assert a.read_bytes() == b.read_bytes()
    lines = a.read_text().splitlines()
    assert lines[0] == HEADER
    assert [ln.split(":")[0] for ln in lines[1:]] == sorted(poses)
    back = read_annotation_csv(a)
    assert set(back) == set(poses)
    for name in poses:
        np.testing.assert_array_equal(back[name], poses[name])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.csv", "b.csv"]  # no temp files left


def test_write_annotation_reproduces_community_row(tmp_path):
    path = tmp_path / "out.csv"
    write_annotation_csv(path, {NAME: POSE})
    assert path.read_text().splitlines() == [HEADER, ROW_SPACED]


def test_write_annotation_rejects_fractional_coordinates(tmp_path):
    with pytest.raises(ValueError, match="non-integer"):
        write_annotation_csv(tmp_path / "x.csv", {NAME: POSE + 0.5})
    with pytest.raises(ValueError, match="shape"):
        write_annotation_csv(tmp_path / "x.csv", {NAME: POSE[:17]})


BAD_ROWS = {
    "field count": f"{NAME}: {YS}",
    "extra field": f"{NAME}: {YS}: {XS}: {XS}",
    "bad json": f"{NAME}: [1, 2,: {XS}",
    "short list": f"{NAME}: {YS[:17]}: {XS}",
    "not a list": f"{NAME}: 5: {XS}",
    "float": f"{NAME}: {YS[:17] + [3.5]}: {XS}",
    "string": f'{NAME}: {YS[:17] + ["a"]}: {XS}'.replace("'", '"'),
    "below -1": f"{NAME}: {YS[:17] + [-2]}: {XS}",
    "empty name": f" : {YS}: {XS}",
}


@pytest.mark.parametrize("kind", sorted(BAD_ROWS))
def test_malformed_row_names_file_and_line(tmp_path, kind):
    # the bad row sits on line 4 (1-based) after a good row and an empty line
    path = _write(tmp_path, [HEADER, ROW_SPACED, "", BAD_ROWS[kind]], name="market-annotation-bad.csv")
    with pytest.raises(PoseFormatError) as err:
        read_annotation_csv(path)
    msg = str(err.value)
    assert "market-annotation-bad.csv" in msg and "line 4" in msg
    assert isinstance(err.value, ValueError)


def test_duplicate_name_and_bad_header(tmp_path):
    path = _write(tmp_path, [HEADER, ROW_SPACED, ROW_SPACED])
    with pytest.raises(PoseFormatError, match=r"ann\.csv, line 3.*duplicate"):
        read_annotation_csv(path)
    path = _write(tmp_path, ["name,keypoints_y,keypoints_x", ROW_SPACED])
    with pytest.raises(PoseFormatError, match=r"ann\.csv, line 1.*header"):
        read_annotation_csv(path)
    path = _write(tmp_path, ["", ""])
    with pytest.raises(PoseFormatError, match="empty file"):
        read_annotation_csv(path)


# ----------------------------------------------------------------- pair files


def test_pairs_round_trip(tmp_path):
    pairs = [("0002_c1s1_000451_03.jpg", "0002_c1s1_000551_01.jpg"), ("b.jpg", "a.jpg"), ("b.jpg", "a.jpg")]
    path = tmp_path / "pairs.csv"
    write_pairs_csv(path, pairs)
    assert path.read_text().splitlines()[0] == "from,to"
    assert read_pairs_csv(path) == pairs


def test_pairs_accepts_pandas_index_column(tmp_path):
    path = _write(tmp_path, [",from,to", "0,a.jpg,b.jpg", "1,c.jpg,d.jpg"], name="pairs.csv")
    assert read_pairs_csv(path) == [("a.jpg", "b.jpg"), ("c.jpg", "d.jpg")]


@pytest.mark.parametrize(
    "lines, line_no",
    [
        (["src,dst", "a.jpg,b.jpg"], 1),
        (["from,to", "a.jpg,b.jpg", "", "c.jpg"], 4),
        (["from,to", "a.jpg,b.jpg,c.jpg"], 2),
        (["from,to", "a.jpg,"], 2),
    ],
)
def test_pairs_errors_name_file_and_line(tmp_path, lines, line_no):
    path = _write(tmp_path, lines, name="market-pairs-bad.csv")
    with pytest.raises(PoseFormatError) as err:
        read_pairs_csv(path)
    assert "market-pairs-bad.csv" in str(err.value) and f"line {line_no}" in str(err.value)


# ----------------------------------------------------------------- pose vectors


def test_pose_to_vector_layout_and_sentinel():
    vec = pose_to_vector(POSE, 128, 64)
    assert vec.shape == (36,) and vec.dtype == np.float32
    assert vec[0] == pytest.approx(33 / 64) and vec[1] == pytest.approx(18 / 128)
    assert vec[2 * 10] == pytest.approx(33 / 64) and vec[2 * 10 + 1] == pytest.approx(124 / 128)
    assert vec[26] == vec[27] == MISSING_VECTOR_VALUE
    present = np.delete(vec, [26, 27])
    assert present.min() >= 0.0 and present.max() <= 1.0
    # a joint on the border (x = 0) stays distinguishable from a missing one
    border = POSE.copy()
    border[0] = (0, 0)
    assert pose_to_vector(border, 128, 64)[0] == 0.0 != MISSING_VECTOR_VALUE


def test_pose_vector_batched_and_inverse():
    rng = np.random.default_rng(1)
    kp = np.stack([rng.integers(0, 64, (2, 3, 18)), rng.integers(0, 128, (2, 3, 18))], axis=-1)
    kp[0, 1, 5] = MISSING
    vec = pose_to_vector(kp, 128, 64)
    assert vec.shape == (2, 3, 36)
    np.testing.assert_array_equal(vector_to_pose(vec, 128, 64), kp)
    # noisy network output near the sentinel still decodes as missing; out-of-range is clipped
    noisy = vec.copy()
    noisy[0, 1, 10:12] = (-0.8, -0.9)
    noisy[1, 2, 0] = 1.3
    dec = vector_to_pose(noisy, 128, 64)
    assert tuple(dec[0, 1, 5]) == (-1, -1)
    assert dec[1, 2, 0, 0] == 63
    with pytest.raises(ValueError, match="shape"):
        pose_to_vector(np.zeros((17, 2)), 128, 64)
    with pytest.raises(ValueError, match="shape"):
        vector_to_pose(np.zeros(35), 128, 64)


# ----------------------------------------------------------------- flipping


def test_flip_pose_mirrors_and_swaps_sides():
    flipped = flip_pose(POSE, 64)
    assert tuple(flipped[0]) == (63 - 33, 18)  # nose stays nose
    assert tuple(flipped[2]) == (63 - 49, 31)  # new right shoulder = old left shoulder
    assert tuple(flipped[5]) == (63 - 30, 29)
    assert tuple(flipped[10]) == (-1, -1)  # old l-ankle was missing, becomes r-ankle
    assert tuple(flipped[13]) == (63 - 33, 124)
    np.testing.assert_array_equal(flip_pose(flipped, 64), POSE)
    batch = np.stack([POSE, flipped])
    np.testing.assert_array_equal(flip_pose(batch, 64), np.stack([flipped, POSE]))


# ----------------------------------------------------------------- skeleton images


def _only(joints: dict[int, tuple[int, int]]) -> np.ndarray:
    kp = np.full((18, 2), MISSING)
    for j, xy in joints.items():
        kp[j] = xy
    return kp


@pytest.mark.parametrize("limb", range(17))
def test_each_limb_midpoint_and_joint_centres_have_their_colours(limb):
    a, b = LIMBS[limb]
    img = draw_skeleton(_only({a: (10, 20), b: (50, 100)}), (128, 64))
    assert img.shape == (128, 64, 3) and img.dtype == np.uint8
    assert tuple(img[60, 30]) == COLORS[limb]
    assert tuple(img[20, 10]) == COLORS[a]
    assert tuple(img[100, 50]) == COLORS[b]
    # nothing else is drawn: pixels far from the limb segment are black
    assert img[:, :5].max() == 0 and img[110:].max() == 0 and img[:15].max() == 0


def test_missing_joint_removes_its_limbs():
    full = draw_skeleton(POSE, (128, 64))
    # r-elbow (26, 52) -> r-wrist (26, 72): limb 3, midpoint (26, 62)
    assert tuple(full[62, 26]) == COLORS[3]
    no_wrist = POSE.copy()
    no_wrist[4] = MISSING
    img = draw_skeleton(no_wrist, (128, 64))
    assert img[58:75, 22:31].max() == 0  # limb and wrist disc both gone
    # l-ankle (13) is missing in the real row: below the l-knee (45, 100) stays black
    assert tuple(full[100, 45]) == COLORS[12]
    assert full[106:, 40:51].max() == 0
    # a lone joint next to a missing partner: only its disc is drawn
    lone = draw_skeleton(_only({3: (30, 60)}), (128, 64))
    ys, xs = np.nonzero(lone.any(axis=-1))
    r = stick_width(128)
    assert tuple(lone[60, 30]) == COLORS[3]
    assert np.all(np.hypot(xs - 30, ys - 60) <= r + 1)


def test_all_missing_is_black_and_drawing_is_deterministic():
    assert draw_skeleton(np.full((18, 2), MISSING), (64, 32)).max() == 0
    np.testing.assert_array_equal(draw_skeleton(POSE, (256, 128)), draw_skeleton(POSE, (256, 128)))


def test_skeleton_scales_to_output_size():
    kp = _only({8: (20, 30), 9: (20, 90)})  # vertical r-hip -> r-knee, limb 7
    small = draw_skeleton(kp, (128, 64))
    big = draw_skeleton(kp, (256, 128))
    assert big.shape == (256, 128, 3)
    # pixel-centre scaling: x' = 2x + 0.5, y' = 2y + 0.5
    assert tuple(big[60, 40]) == COLORS[8] and tuple(big[180, 40]) == COLORS[9]
    assert tuple(big[120, 40]) == COLORS[7]
    # limb thickness follows stick_width(H): 2 px half-width at 128, 4 px at 256
    assert stick_width(128) == 2 and stick_width(256) == 4 and stick_width(16) == 1

    def thickness(img, row):
        return int(img[row].any(axis=-1).sum())

    assert abs(thickness(small, 60) - (2 * 2 + 1)) <= 1
    assert abs(thickness(big, 120) - (2 * 4 + 1)) <= 1
    # an anisotropic rescale also maps keypoints independently per axis
    wide = draw_skeleton(kp, (128, 128))
    assert tuple(wide[60, 40]) == COLORS[7]


def test_draw_skeleton_batch_matches_single():
    batch = np.stack([POSE, flip_pose(POSE, 64)])
    out = draw_skeleton_batch(torch.from_numpy(batch), (128, 64))
    assert out.shape == (2, 3, 128, 64) and out.dtype == torch.float32
    assert 0.0 <= out.min() and out.max() <= 1.0
    ref = torch.from_numpy(draw_skeleton(batch[1], (128, 64))).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(out[1], ref)
    with pytest.raises(ValueError, match="shape"):
        draw_skeleton(batch, (128, 64))


# ----------------------------------------------------------------- canvases


def test_side_by_side_numpy_torch_pil():
    a = np.zeros((128, 64, 3), np.uint8)
    b = np.full((128, 64, 3), 7, np.uint8)
    cat = side_by_side(a, b)
    assert isinstance(cat, np.ndarray) and cat.shape == (128, 128, 3)
    assert cat[:, :64].max() == 0 and cat[:, 64:].min() == 7
    assert side_by_side(a[..., 0], b[..., 0]).shape == (128, 128)

    t = side_by_side(torch.zeros(2, 3, 128, 64), torch.ones(2, 3, 128, 64))
    assert t.shape == (2, 3, 128, 128) and t[..., 64:].min() == 1 and t[..., :64].max() == 0
    assert side_by_side(torch.zeros(4, 16, 8), torch.zeros(4, 16, 8)).shape == (4, 16, 16)

    pa, pb = Image.fromarray(a), Image.fromarray(b)
    p = side_by_side(pa, pb)
    assert isinstance(p, Image.Image) and p.size == (128, 128) and p.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(p), cat)

    with pytest.raises(ValueError):
        side_by_side(a, np.zeros((64, 64, 3), np.uint8))
    with pytest.raises(ValueError):
        side_by_side(torch.zeros(3, 128, 64), torch.zeros(1, 128, 64))
    with pytest.raises(TypeError):
        side_by_side(a, torch.zeros(3, 128, 64))
