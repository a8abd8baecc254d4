"""The toy Market-1501: layout, protocol properties, exact keypoints, determinism, CLI."""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from PIL import Image

from pcdms.io import sha256_file
from pcdms.pose import read_annotation_csv, read_pairs_csv
from reid_aug.cli import main
from reid_aug.data import toy
from reid_aug.data.market import read_market
from reid_aug.data.toy import ToyConfig, make_toy_market
from reid_aug.data.toy_render import (
    L_ANK, L_EAR, L_EYE, NOSE, R_ANK, R_EAR, R_EYE, VIEWS, Body, PoseParams, figure_mask, project_pose, sample_body,
    sample_identity, sample_pose, sample_pose_params,
)

NAME_RE = re.compile(r"^(-1|\d{4})_c([1-6])s([1-6])_(\d{6})_(\d{2})\.jpg$")
FOLDERS = ("bounding_box_train", "query", "bounding_box_test")
NUM_IDS = 8


@pytest.fixture(scope="module")
def market(tmp_path_factory) -> Path:
    return make_toy_market(tmp_path_factory.mktemp("toy") / "market", num_ids=NUM_IDS, seed=0)


def _names(root: Path, folder: str) -> list[str]:
    return sorted(p.name for p in (root / folder).iterdir())


def _pid_cam(name: str) -> tuple[int, int]:
    m = NAME_RE.match(name)
    assert m, name
    return int(m.group(1)), int(m.group(2))


def _file_hashes(root: Path) -> dict[str, str]:
    files = [p for p in root.rglob("*") if p.is_file() and p.name != "manifest.json"]
    return {str(p.relative_to(root)): sha256_file(p) for p in files}


def test_layout_names_and_sizes(market):
    top = sorted(p.name for p in market.iterdir())
    assert top == sorted([*FOLDERS, "manifest.json", "market-annotation-test.csv", "market-annotation-train.csv",
                          "market-pairs-test.csv", "market-pairs-train.csv"])
    for folder in FOLDERS:
        names = _names(market, folder)
        assert names, folder
        for name in names:
            assert NAME_RE.match(name), f"{folder}/{name}"
    for path in list((market / "query").iterdir())[:20] + list((market / "bounding_box_test").iterdir())[:20]:
        with Image.open(path) as im:
            assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (64, 128))


def test_identity_split_and_cameras(market):
    pids_cams = {f: defaultdict(set) for f in FOLDERS}
    for folder in FOLDERS:
        for name in _names(market, folder):
            pid, cam = _pid_cam(name)
            pids_cams[folder][pid].add(cam)
    train, query, gallery = (pids_cams[f] for f in FOLDERS)
    assert len(train) == NUM_IDS // 2 and 0 not in train and -1 not in train
    assert 0 not in query and -1 not in query
    assert 0 in gallery and -1 in gallery  # distractors and junk, only in the test gallery
    test_ids = set(query)
    assert len(test_ids) == NUM_IDS // 2
    assert not test_ids & set(train)
    assert set(gallery) - {0, -1} == test_ids
    for pid, cams in train.items():
        assert len(cams) >= 2, pid
    for pid in test_ids:
        assert len(query[pid] | gallery[pid]) >= 2, pid
        # one query per camera, and the query's own camera is in the gallery too (removal matters)
        assert query[pid] <= gallery[pid]
    for name in _names(market, "query"):
        pid, cam = _pid_cam(name)
        assert gallery[pid] - {cam}, f"{name} has no cross-camera gallery match"
    n_query = defaultdict(int)
    for name in _names(market, "query"):
        n_query[_pid_cam(name)] += 1
    assert max(n_query.values()) == 1


def test_read_market_parses_it(market):
    ds = read_market(market)
    assert ds.num_train_pids == NUM_IDS // 2
    assert {r.pid for r in ds.query} == {r.pid for r in ds.gallery} - {0}
    assert any(r.pid == 0 for r in ds.gallery) and not any(r.pid < 0 for r in ds.gallery)
    assert len(ds.gallery) == len(_names(market, "bounding_box_test")) - sum(
        n.startswith("-1_") for n in _names(market, "bounding_box_test"))
    assert 2 <= ds.num_cams <= 6


def test_annotations_cover_every_image_and_lie_inside(market):
    train = read_annotation_csv(market / "market-annotation-train.csv")
    test = read_annotation_csv(market / "market-annotation-test.csv")
    assert set(train) == set(_names(market, "bounding_box_train"))
    assert set(test) == set(_names(market, "query")) | set(_names(market, "bounding_box_test"))
    people = [kp for name, kp in {**train, **test}.items() if not name.startswith(("0000_", "-1_"))]
    for kp in [*train.values(), *test.values()]:
        assert kp.shape == (18, 2)
        vis = (kp >= 0).all(axis=1)
        assert ((kp[~vis] == -1).all())
        assert (kp[vis, 0] < 64).all() and (kp[vis, 1] < 128).all()
    visible = np.mean([(kp >= 0).all(axis=1) for kp in people], axis=0)
    assert visible[1] > 0.9  # the neck is almost always in the box
    assert 0.2 < visible[NOSE] < 0.95  # ... the nose not from behind


def test_pairs_are_same_identity_existing_files(market):
    train_names = set(_names(market, "bounding_box_train"))
    test_names = set(_names(market, "query")) | set(_names(market, "bounding_box_test"))
    for fname, names in (("market-pairs-train.csv", train_names), ("market-pairs-test.csv", test_names)):
        pairs = read_pairs_csv(market / fname)
        assert len(pairs) >= len(names) // 2
        for src, dst in pairs:
            assert src in names and dst in names and src != dst
            assert _pid_cam(src)[0] == _pid_cam(dst)[0] > 0
        assert len(set(pairs)) == len(pairs)


def test_deterministic_and_stable_when_ids_grow(market, tmp_path):
    again = make_toy_market(tmp_path / "again", num_ids=NUM_IDS, seed=0)
    assert _file_hashes(again) == _file_hashes(market)
    parallel = make_toy_market(tmp_path / "parallel", num_ids=NUM_IDS, seed=0, workers=2)
    assert _file_hashes(parallel) == _file_hashes(market)  # images, annotations and pairs
    other = _file_hashes(make_toy_market(tmp_path / "seed1", num_ids=NUM_IDS, seed=1))
    assert other != _file_hashes(market)
    grown = _file_hashes(make_toy_market(tmp_path / "grown", num_ids=NUM_IDS + 2, seed=0))
    old = _file_hashes(market)
    kept = {k: v for k, v in old.items() if re.search(r"/\d{4}_", k) and not re.search(r"/0000_", k)}
    assert kept and all(grown.get(k) == v for k, v in kept.items())


def test_keypoints_sit_on_the_drawn_figure():
    rng = np.random.default_rng(5)
    for _ in range(40):
        ident, pose = sample_identity(rng), sample_pose_params(rng)
        mask, kp = figure_mask(ident, pose)
        padded = np.pad(mask, 1)
        for j, (x, y) in enumerate(kp):
            if x >= 0:  # a 3x3 neighbourhood: ears sit on the head's outline
                assert padded[y:y + 3, x:x + 3].any(), (j, x, y, pose)
        assert mask.mean() > 0.1


def test_face_joints_hidden_by_view():
    body = sample_body(np.random.default_rng(0))
    back = project_pose(body, PoseParams(yaw=VIEWS["back"]))[0]
    assert (back[[NOSE, R_EYE, L_EYE]] == -1).all() and (back[[R_EAR, L_EAR]] >= 0).all()
    front = project_pose(body, PoseParams(yaw=VIEWS["front"]))[0]
    assert (front >= 0).all()
    assert front[2, 0] < front[5, 0]  # the right shoulder is on the image left when facing us
    left = project_pose(body, PoseParams(yaw=VIEWS["left"]))[0]  # the left side faces us
    assert (left[[R_EYE, R_EAR]] == -1).all() and (left[[NOSE, L_EYE, L_EAR]] >= 0).all()
    cut = project_pose(Body(), PoseParams(scale=1.2, top=-0.2))[0]  # the box cuts the head off
    assert (cut[[NOSE, R_EYE, L_EYE]] == -1).all() and (cut[[R_ANK, L_ANK]] >= 0).all()


def test_sample_pose_api():
    kp = sample_pose(np.random.default_rng(0), view="right", height=256, width=128)
    assert kp.shape == (18, 2) and kp.dtype.kind == "i"
    vis = (kp >= 0).all(axis=1)
    assert (kp[vis, 0] < 128).all() and (kp[vis, 1] < 256).all() and vis[1]
    with pytest.raises(ValueError, match="unknown view"):
        sample_pose(np.random.default_rng(0), view="up")


def test_config_validation():
    with pytest.raises(ValueError, match="images_per_id"):
        ToyConfig(images_per_id=(5, 3))
    with pytest.raises(ValueError, match="num_ids"):
        ToyConfig(num_ids=1)
    with pytest.raises(ValueError, match="num_cameras"):
        ToyConfig(num_cameras=7)


def test_refuses_existing_and_recovers_from_a_kill(tmp_path, monkeypatch):
    out = tmp_path / "m"
    real_render = toy.render_shot
    calls = {"n": 0}

    def dying_render(shot, seed):
        calls["n"] += 1
        if calls["n"] > 10:
            raise KeyboardInterrupt
        return real_render(shot, seed)

    monkeypatch.setattr(toy, "render_shot", dying_render)
    with pytest.raises(KeyboardInterrupt):
        make_toy_market(out, num_ids=2, images_per_id=(2, 3), seed=0)
    assert not out.exists() and (tmp_path / "m.tmp").is_dir()  # nothing looks complete
    monkeypatch.setattr(toy, "render_shot", real_render)
    make_toy_market(out, num_ids=2, images_per_id=(2, 3), seed=0)
    assert (out / "manifest.json").is_file() and not (tmp_path / "m.tmp").exists()
    with pytest.raises(FileExistsError, match="already holds"):
        make_toy_market(out, num_ids=2, images_per_id=(2, 3), seed=0)
    make_toy_market(out, num_ids=2, images_per_id=(2, 3), seed=1, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="left alone"):
        make_toy_market(foreign, num_ids=2, images_per_id=(2, 3), overwrite=True)
    assert (foreign / "keep.txt").read_text() == "user data"


def test_cli(tmp_path):
    runner = CliRunner()
    out = tmp_path / "cli"
    cfg = tmp_path / "toy.yaml"
    cfg.write_text(yaml.safe_dump({"images_per_id": [2, 3], "distractors_per_id": 0.5}))
    res = runner.invoke(main, ["make-toy-market", str(out), "--ids", "4", "--seed", "3", "--config", str(cfg)])
    assert res.exit_code == 0, res.output
    assert "train" in res.output and "query" in res.output
    manifest = yaml.safe_load((out / "manifest.json").read_text())
    assert manifest["seed"] == 3 and manifest["config"]["num_ids"] == 4 and manifest["counts"]["distractors"] == 2
    res = runner.invoke(main, ["make-toy-market", str(out), "--ids", "4", "--seed", "3", "--config", str(cfg)])
    assert res.exit_code == 0 and "nothing to do" in res.output
    res = runner.invoke(main, ["make-toy-market", str(out), "--ids", "4", "--seed", "4", "--config", str(cfg)])
    assert res.exit_code != 0 and "different" in res.output
    cfg.write_text("imagez_per_id: [2, 3]\n")
    res = runner.invoke(main, ["make-toy-market", str(tmp_path / "x"), "--config", str(cfg)])
    assert res.exit_code != 0 and "imagez_per_id" in res.output
