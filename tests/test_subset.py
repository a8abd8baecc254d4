"""Seeded training subsets: coverage, size, nesting, determinism, CSV round trip, CLI."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from reid_aug.cli import main
from reid_aug.cli.config import ConfigError, load_config
from reid_aug.data import (
    DatasetError,
    ImageRecord,
    SubsetConfig,
    make_subset,
    read_market,
    read_subset_csv,
    read_subset_meta,
    subset_size,
    write_subset_csv,
)
from reid_aug.cli.data_cmds import subset_manifest_path
from tests.test_market import write_market

FRACTIONS = (0.2, 0.4, 0.6, 0.8, 1.0)


def _records(num_pids: int = 40, seed: int = 0) -> list[ImageRecord]:
    """In-memory train records: identities with 1..25 images each (Market's spread is 2..72)."""
    rng = np.random.default_rng(seed)
    out = []
    for label, pid in enumerate(sorted(rng.choice(1500, size=num_pids, replace=False) + 1)):
        for k in range(int(rng.integers(1, 26))):
            name = f"{pid:04d}_c{k % 6 + 1}s1_{k:06d}_00.jpg"
            out.append(ImageRecord(Path("/data") / name, name, int(pid), k % 6, label))
    return out


RECORDS = _records()
NUM_PIDS = len({r.pid for r in RECORDS})


def test_subset_size_rule() -> None:
    assert subset_size(12936, 751, 0.2) == 2587  # round(2587.2)
    assert subset_size(12936, 751, 1.0) == 12936
    assert subset_size(12936, 751, 0.05) == 751  # every identity keeps one image
    assert subset_size(10, 2, 0.25) == 3  # 2.5 rounds half up
    assert subset_size(10, 2, 0.35) == 4  # 3.5 rounds half up (not to even)
    for bad in (0.0, -0.1, 1.01, float("nan")):
        with pytest.raises(DatasetError, match=r"fraction must be in \(0, 1\]"):
            subset_size(10, 2, bad)


@pytest.mark.parametrize("fraction", FRACTIONS + (0.01,))
def test_subset_covers_every_identity_with_rule_size(fraction: float) -> None:
    sub = make_subset(RECORDS, fraction, seed=3)
    assert len(sub) == subset_size(len(RECORDS), NUM_PIDS, fraction)
    assert {r.pid for r in sub} == {r.pid for r in RECORDS}
    assert [r.name for r in sub] == sorted(r.name for r in sub)
    assert len({r.name for r in sub}) == len(sub)
    assert set(sub) <= set(RECORDS)  # records (and labels) come through unchanged


def test_full_fraction_is_whole_set() -> None:
    assert make_subset(RECORDS, 1.0, seed=0) == sorted(RECORDS, key=lambda r: r.name)


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_subsets_nest_across_fractions(seed: int) -> None:
    subs = [set(make_subset(RECORDS, f, seed)) for f in FRACTIONS]
    for small, big in zip(subs, subs[1:]):
        assert small < big


def test_same_seed_same_subset_whatever_the_input_order() -> None:
    shuffled = list(RECORDS)
    random.Random(5).shuffle(shuffled)
    assert make_subset(RECORDS, 0.4, seed=11) == make_subset(shuffled, 0.4, seed=11)


def test_different_seed_differs() -> None:
    a = make_subset(RECORDS, 0.4, seed=0)
    b = make_subset(RECORDS, 0.4, seed=1)
    assert len(a) == len(b) and a != b


def test_subset_draws_spread_over_identities() -> None:
    # Not just the first images of each identity: across seeds, every image of a big
    # identity is picked as its anchor at least once.
    pid = max({r.pid for r in RECORDS}, key=lambda p: sum(r.pid == p for r in RECORDS))
    images = {r.name for r in RECORDS if r.pid == pid}
    anchors = set()
    for seed in range(200):
        picked = [r.name for r in make_subset(RECORDS, 0.01, seed) if r.pid == pid]
        assert len(picked) == 1
        anchors.add(picked[0])
    assert anchors == images


def test_make_subset_rejects_bad_input() -> None:
    with pytest.raises(DatasetError, match="fraction"):
        make_subset(RECORDS, 0.0, seed=0)
    with pytest.raises(DatasetError, match="seed"):
        make_subset(RECORDS, 0.5, seed=-1)
    with pytest.raises(DatasetError, match="empty"):
        make_subset([], 0.5, seed=0)
    with pytest.raises(DatasetError, match="appears twice"):
        make_subset(RECORDS + [RECORDS[0]], 0.5, seed=0)


def test_subset_config() -> None:
    assert SubsetConfig(0.2) == SubsetConfig(fraction=0.2, seed=0)
    with pytest.raises(ValueError, match="fraction"):
        SubsetConfig(1.5)
    with pytest.raises(ConfigError, match="fraction"):
        load_config(SubsetConfig, None, {"fraction": 0.0})
    with pytest.raises(ConfigError, match="fraction"):  # fraction is required
        load_config(SubsetConfig, None, {"seed": 3})


@pytest.fixture
def market(tmp_path: Path) -> Path:
    train = [(pid, cam) for pid in (3, 8, 21, 30, 44) for cam in (1, 2, 3, 4, 5, 6)]
    return write_market(tmp_path / "market", train=train)


def test_csv_round_trip(market: Path, tmp_path: Path) -> None:
    ds = read_market(market)
    sub = make_subset(ds.train, 0.4, seed=2)
    path = tmp_path / "lists" / "f0.4.csv"
    write_subset_csv(path, sub, {"fraction": 0.4, "seed": 2, "root": str(market)})
    assert read_subset_csv(path, ds) == sub
    assert read_subset_meta(path) == {"fraction": 0.4, "seed": 2, "root": str(market)}
    lines = path.read_text().splitlines()
    assert lines[3] == "name,pid,camid,label"
    assert not list(path.parent.glob(".*"))  # no temp file left behind
    # The label column is optional.
    bare = tmp_path / "bare.csv"
    bare.write_text("name,pid,camid\n" + "".join(f"{r.name},{r.pid},{r.camid}\n" for r in sub))
    assert read_subset_csv(bare, ds) == sub


def _corrupt(path: Path, lineno: int, new_line: str) -> None:
    lines = path.read_text().splitlines()
    lines[lineno - 1] = new_line
    path.write_text("\n".join(lines) + "\n")


def test_read_subset_csv_errors_name_file_and_line(market: Path, tmp_path: Path) -> None:
    ds = read_market(market)
    path = tmp_path / "s.csv"
    write_subset_csv(path, ds.train[:4], {"seed": 0})  # line 1 meta, 2 header, 3.. rows
    r = ds.train[1]
    cases = [
        ("0099_c1s1_000000_00.jpg,99,0,0", "is not a training image"),
        (f"{ds.query[0].name},{ds.query[0].pid},{ds.query[0].camid},{ds.query[0].label}", "is not a training image"),
        (f"{r.name},{r.pid + 1},{r.camid},{r.label}", "has pid"),
        (f"{r.name},{r.pid},{r.camid},{r.label + 1}", "has label"),
        (f"{r.name},{r.pid},x,{r.label}", "camid must be an integer"),
        (f"{r.name},{r.pid}", "expected 4 fields"),
        (f"{ds.train[0].name},{ds.train[0].pid},{ds.train[0].camid},{ds.train[0].label}", "listed twice"),
    ]
    for new_line, message in cases:
        write_subset_csv(path, ds.train[:4], {"seed": 0})
        _corrupt(path, 4, new_line)
        with pytest.raises(DatasetError, match=message) as info:
            read_subset_csv(path, ds)
        assert f"{path}:4:" in str(info.value)
    path.write_text("file,person\na,1\n")
    with pytest.raises(DatasetError, match="expected a header"):
        read_subset_csv(path, ds)
    with pytest.raises(DatasetError, match="not found"):
        read_subset_csv(tmp_path / "missing.csv", ds)


def test_cli_subset_writes_csv_manifest_and_nests(market: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    outs = {}
    for f in (0.4, 0.8):
        out = tmp_path / f"sub_{f}.csv"
        result = runner.invoke(main, ["subset", str(market), "--fraction", str(f), "--seed", "4", "--out", str(out)])
        assert result.exit_code == 0, result.output
        assert result.stdout.count("\n") == 1 and "5 ids" in result.stdout and f"fraction {f:g}" in result.stdout
        outs[f] = out
    ds = read_market(market)
    small, big = (read_subset_csv(outs[f], ds) for f in (0.4, 0.8))
    assert small == make_subset(ds.train, 0.4, seed=4)
    assert set(small) < set(big)
    manifest = json.loads((tmp_path / "sub_0.4.manifest.json").read_text())
    assert manifest["step"] == "subset"
    assert manifest["config"] == {"fraction": 0.4, "seed": 4}
    assert manifest["summary"]["subset"]["num_images"] == len(small) == 12
    assert manifest["outputs"]["sub_0.4.csv"]


def test_cli_subset_config_file_and_override(market: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "subset.yaml"
    cfg.write_text("fraction: 0.6\nseed: 9\n")
    out = tmp_path / "s.csv"
    result = CliRunner().invoke(main, ["subset", str(market), "--config", str(cfg), "--seed", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    manifest = json.loads(subset_manifest_path(out).read_text())
    assert manifest["config"] == {"fraction": 0.6, "seed": 1}
    assert out.read_text().splitlines()[0] == "name,pid,camid,label"
    ds = read_market(market)
    assert read_subset_csv(out, ds) == make_subset(ds.train, 0.6, seed=1)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--fraction", "1.5"], "fraction must be in (0, 1]"),
        ([], "fraction"),
        (["--fraction", "0.5", "--seed", "-2"], "seed must be >= 0"),
    ],
)
def test_cli_subset_bad_options(market: Path, tmp_path: Path, args: list[str], message: str) -> None:
    out = tmp_path / "s.csv"
    result = CliRunner().invoke(main, ["subset", str(market), "--out", str(out), *args])
    assert result.exit_code != 0
    assert message in result.output
    assert not out.exists()


def test_cli_subset_missing_folder(market: Path, tmp_path: Path) -> None:
    for p in (market / "bounding_box_test").iterdir():
        p.unlink()
    (market / "bounding_box_test").rmdir()
    result = CliRunner().invoke(main, ["subset", str(market), "--fraction", "0.5", "--out", str(tmp_path / "s.csv")])
    assert result.exit_code != 0
    assert "bounding_box_test/" in result.output and str(market) in result.output
