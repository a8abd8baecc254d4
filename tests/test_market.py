"""Market-1501 / DukeMTMC / MSMT17 readers on tiny fake dataset folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from reid_aug.cli import main
from reid_aug.data import (
    DatasetError,
    check_images_readable,
    parse_market_name,
    read_image_folder,
    read_market,
    read_reid_dataset,
    records_summary,
)

# (pid, camera 1-based) per image; pids deliberately not contiguous so relabelling shows.
TRAIN = [(40, 1), (40, 2), (7, 3), (7, 1), (7, 6), (11, 2), (2, 5), (2, 5), (2, 4)]
QUERY = [(5, 1), (9, 2), (9, 3)]
GALLERY = [(5, 2), (5, 4), (9, 1), (0, 3), (0, 6)]
JUNK = [(-1, 1), (-1, 4)]


def _write_image(path: Path, color: tuple[int, int, int] = (120, 60, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 8), color).save(path)


def write_market(root: Path, train=TRAIN, query=QUERY, gallery=GALLERY, junk=JUNK) -> Path:
    """A fake Market-1501 root with Market names, junk boxes, distractors and a Thumbs.db."""
    for folder, items in (("bounding_box_train", train), ("query", query), ("bounding_box_test", gallery)):
        d = root / folder
        d.mkdir(parents=True, exist_ok=True)
        for i, (pid, cam) in enumerate(list(items) + list(junk)):
            pid_s = f"{pid:04d}" if pid >= 0 else "-1"
            _write_image(d / f"{pid_s}_c{cam}s1_{i:06d}_0{i % 3}.jpg", (10 * i % 255, 40, 200))
        (d / "Thumbs.db").write_bytes(b"\x00\x01 not an image")
    return root


@pytest.fixture
def market(tmp_path: Path) -> Path:
    return write_market(tmp_path / "market")


def test_read_market_splits_labels_and_order(market: Path) -> None:
    ds = read_market(market)
    assert ds.root == market.absolute()
    assert ds.layout == "market1501"
    assert (len(ds.train), len(ds.query), len(ds.gallery)) == (len(TRAIN), len(QUERY), len(GALLERY))
    assert ds.num_train_pids == 4
    assert ds.num_cams == 6
    # Junk never survives; distractors only in the gallery.
    assert all(r.pid != -1 for r in ds.train + ds.query + ds.gallery)
    assert sum(r.pid == 0 for r in ds.gallery) == 2
    # Train labels are 0..N-1 in sorted pid order; query/gallery keep the pid.
    assert {r.pid: r.label for r in ds.train} == {2: 0, 7: 1, 11: 2, 40: 3}
    assert all(r.label == r.pid for r in ds.query + ds.gallery)
    for split in (ds.train, ds.query, ds.gallery):
        names = [r.name for r in split]
        assert names == sorted(names)
        assert all(r.path.is_absolute() and r.path.name == r.name for r in split)
    first = ds.train[0]
    assert (first.name, first.pid, first.camid) == ("0002_c4s1_000008_02.jpg", 2, 3)  # c4 -> camid 3


@pytest.mark.parametrize("layout", ["Market-1501-v15.09.15", "market1501/Market-1501-v15.09.15"])
def test_read_market_parent_with_official_folder(tmp_path: Path, layout: str) -> None:
    """The archive's folder under the given root (fast-reid's datasets/), or inside torchreid's market1501/."""
    inner = write_market(tmp_path / layout)
    for ds in (read_market(tmp_path), read_reid_dataset(tmp_path)):
        assert ds.root == inner.absolute()
        assert len(ds.train) == len(TRAIN)


@pytest.mark.parametrize(
    "name, expected",
    [
        ("0002_c1s1_000451_03.jpg", (2, 0)),
        ("-1_c3s2_000101_01.jpg", (-1, 2)),
        ("0000_c6s4_002202_07.jpg", (0, 5)),
        ("0005_c2_f0046985.jpg", (5, 1)),  # DukeMTMC-reID
        ("1501_c4s6_000810_00_syn03.png", (1501, 3)),  # synthetic names add a suffix
    ],
)
def test_parse_market_name(name: str, expected: tuple[int, int]) -> None:
    assert parse_market_name(name) == expected


@pytest.mark.parametrize("name", ["person.jpg", "0002_s1_000451.jpg", "0002_c0s1_000451_03.jpg", "-2_c1s1_0_0.jpg"])
def test_parse_market_name_rejects(name: str) -> None:
    with pytest.raises(DatasetError, match=name.split(".")[0]):
        parse_market_name(name)


@pytest.mark.parametrize("folder", ["bounding_box_train", "bounding_box_test", "query"])
def test_missing_folder_is_named(market: Path, folder: str) -> None:
    for p in (market / folder).iterdir():
        p.unlink()
    (market / folder).rmdir()
    with pytest.raises(DatasetError) as info:
        read_market(market)
    msg = str(info.value)
    assert str(market) in msg
    assert msg.split("missing folder(s) ")[1].split(";")[0] == f"{folder}/"


def test_missing_root_and_non_dataset(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="not found"):
        read_reid_dataset(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="not a re-ID dataset root"):
        read_reid_dataset(tmp_path / "empty")


def test_unparsable_name_names_the_file(market: Path) -> None:
    _write_image(market / "bounding_box_train" / "holiday_photo.jpg")
    with pytest.raises(DatasetError, match="holiday_photo.jpg"):
        read_market(market)


def test_distractor_in_train_is_an_error(market: Path) -> None:
    _write_image(market / "bounding_box_train" / "0000_c1s1_000001_01.jpg")
    with pytest.raises(DatasetError, match=r"distractor.*") as info:
        read_market(market)
    assert "0000_c1s1_000001_01.jpg" in str(info.value)


def test_split_with_only_junk_is_empty(tmp_path: Path) -> None:
    root = write_market(tmp_path / "m", query=[])
    with pytest.raises(DatasetError, match="no usable images") as info:
        read_market(root)
    assert str(root / "query") in str(info.value)


def test_non_images_and_hidden_files_ignored(tmp_path: Path) -> None:
    folder = tmp_path / "synthetic"
    _write_image(folder / "0002_c1s1_000451_03_syn00.jpg")
    _write_image(folder / "0002_c1s1_000451_03_syn01.png")
    _write_image(folder / "._0002_c1s1_000451_03.jpg")  # macOS fork
    (folder / ".0003_c1s1_000451_03.jpg.tmp.abc.jpg").write_bytes(b"partial")  # interrupted atomic write
    (folder / "notes.txt").write_text("hello")
    (folder / "sub").mkdir()
    recs = read_image_folder(folder, relabel=False, keep_distractors=False)
    assert [r.name for r in recs] == ["0002_c1s1_000451_03_syn00.jpg", "0002_c1s1_000451_03_syn01.png"]
    assert all(r.label == 2 for r in recs)


def test_check_images_readable(market: Path) -> None:
    ds = read_market(market)
    check_images_readable(ds.train + ds.query + ds.gallery, progress=False)
    bad = ds.gallery[1].path
    bad.write_bytes(b"\xff\xd8 truncated jpeg")
    with pytest.raises(DatasetError, match="unreadable image") as info:
        check_images_readable(ds.gallery, progress=False)
    assert str(bad) in str(info.value)


def test_dukemtmc_layout(tmp_path: Path) -> None:
    root = tmp_path / "DukeMTMC-reID"
    for folder, names in (
        ("bounding_box_train", ["0005_c2_f0046985.jpg", "0005_c5_f0051781.jpg", "0008_c8_f0000001.jpg"]),
        ("query", ["0003_c1_f0044158.jpg"]),
        ("bounding_box_test", ["0003_c4_f0049181.jpg", "4127_c7_f0111111.jpg"]),
    ):
        for n in names:
            _write_image(root / folder / n)
    ds = read_reid_dataset(tmp_path)
    assert ds.layout == "dukemtmc"
    assert [(r.pid, r.camid, r.label) for r in ds.train] == [(5, 1, 0), (5, 4, 0), (8, 7, 1)]
    assert ds.num_cams == 8


def test_msmt17_layout(tmp_path: Path) -> None:
    base = tmp_path / "MSMT17_V1"
    lists = {
        ("train", "list_train.txt"): [("0000/0000_000_01_0303morning_0015_0.jpg", 0),
                                      ("0000/0000_001_05_0303noon_0601_1.jpg", 0),
                                      ("0001/0001_000_15_0303afternoon_0101_0.jpg", 1)],
        ("test", "list_query.txt"): [("0000/0000_000_02_0303morning_0016_0.jpg", 0)],
        ("test", "list_gallery.txt"): [("0000/0000_001_03_0303noon_0700_0.jpg", 0),
                                       ("0004/0004_000_07_0303noon_0800_1.jpg", 4)],
    }
    for (folder, list_name), items in lists.items():
        for rel, _ in items:
            _write_image(base / folder / rel)
        (base / list_name).write_text("".join(f"{rel} {pid}\n" for rel, pid in items))
    ds = read_reid_dataset(tmp_path)
    assert ds.layout == "msmt17" and ds.root == base.absolute()
    assert [(r.pid, r.camid, r.label) for r in ds.train] == [(0, 0, 0), (0, 4, 0), (1, 14, 1)]
    assert ds.num_train_pids == 2 and ds.num_cams == 15
    (base / "list_gallery.txt").write_text("0009/0009_000_01_x_0_0.jpg 9\n")
    with pytest.raises(DatasetError, match=r"list_gallery.txt:1: image not found"):
        read_reid_dataset(tmp_path)


def test_records_summary(market: Path) -> None:
    ds = read_market(market)
    assert records_summary(ds.train) == {"num_images": 9, "num_pids": 4, "num_cams": 6}
    # The distractor pid 0 counts as one pid, as torchreid reports it.
    assert records_summary(ds.gallery) == {"num_images": 5, "num_pids": 3, "num_cams": 5}


def test_cli_dataset_info(market: Path) -> None:
    result = CliRunner().invoke(main, ["dataset-info", str(market), "--check-images"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["layout"] == "market1501"
    assert info["train"] == {"num_images": 9, "num_pids": 4, "num_cams": 6}
    assert info["query"]["num_images"] == 3 and info["gallery"]["num_images"] == 5


def test_cli_dataset_info_reports_errors(market: Path) -> None:
    (market / "query" / "0005_c1s1_000000_00.jpg").write_bytes(b"not a jpeg")
    result = CliRunner().invoke(main, ["dataset-info", str(market), "--check-images"])
    assert result.exit_code != 0
    assert "unreadable image" in result.output and "0005_c1s1_000000_00.jpg" in result.output
