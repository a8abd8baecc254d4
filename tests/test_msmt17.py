"""MSMT17's identity rules: train and test persons numbered apart from 0, pid 0 a real person (issue: datasets
as they are really laid out). A tiny MSMT17-layout copy of the toy Market, with list files, goes through
synthesize and train-bot."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from pcdms.pose import read_annotation_csv, write_annotation_csv
from reid_aug.bot.train import label_map
from reid_aug.cli import main
from reid_aug.data import toy
from reid_aug.data.market import read_reid_dataset, read_synthetic_folder
from reid_aug.synthesis import SynthesisError, _check_identities


@pytest.fixture(scope="module")
def msmt(tmp_path_factory) -> Path:
    """MSMT17_V1 layout: list_{train,query,gallery}.txt, train/ and test/ folders, ids from 0 in each split."""
    market = toy.make_toy_market(tmp_path_factory.mktemp("toy") / "market", num_ids=6, seed=0)
    ds = read_reid_dataset(market)
    base = tmp_path_factory.mktemp("msmt") / "MSMT17_V1"
    poses = read_annotation_csv(market / "market-annotation-train.csv")
    renamed = {}
    for split, folder, records in (("train", "train", ds.train), ("query", "test", ds.query),
                                   ("gallery", "test", ds.gallery)):
        records = [r for r in records if r.pid > 0]  # MSMT17 has no distractors
        # Per-split numbering from 0, as the list files have it: train pid 0 and test pid 0 are different people.
        ids = {pid: i for i, pid in enumerate(sorted({r.pid for r in records}))} if split != "gallery" else test_ids
        if split == "query":
            test_ids = ids
        lines = []
        for n, r in enumerate(records):
            pid = ids[r.pid]
            name = f"{pid:04d}_{n:03d}_{r.camid + 1:02d}_0303morning_{n:04d}_0.jpg"
            (base / folder / f"{pid:04d}").mkdir(parents=True, exist_ok=True)
            shutil.copy(r.path, base / folder / f"{pid:04d}" / name)
            lines.append(f"{pid:04d}/{name} {pid}\n")
            if r.name in poses:
                renamed[name] = poses[r.name]
        (base / f"list_{split}.txt").write_text("".join(lines))
    write_annotation_csv(base / "market-annotation-train.csv", renamed)
    return base


def test_msmt17_ids_are_per_split_and_pid_zero_is_a_person(msmt):
    ds = read_reid_dataset(msmt)
    assert ds.layout == "msmt17" and not ds.ids_shared_across_splits
    assert min(r.pid for r in ds.train) == 0 and min(r.pid for r in ds.query) == 0
    assert label_map(ds.train)[0] == 0  # pid 0 trains like any other person
    _check_identities(ds, ds.train)  # train pid 0..N are not the test persons 0..M


def test_market_still_refuses_a_training_pid_that_is_a_test_person(tmp_path):
    market = toy.make_toy_market(tmp_path / "market", num_ids=4, images_per_id=(2, 3), seed=0)
    ds = read_reid_dataset(market)
    assert ds.ids_shared_across_splits
    test_person = ds.query[0]
    with pytest.raises(Exception, match="not a training image"):
        _check_identities(ds, [test_person])


def test_synthesize_and_train_bot_run_on_msmt17(msmt, tmp_path, tiny_pipeline, one_thread):
    syn = tmp_path / "syn"
    res = CliRunner().invoke(main, ["synthesize", "--data", str(msmt), "--subset", "1", "--out", str(syn),
                                    "--pipeline", str(tiny_pipeline), "--allow-random-weights", "--steps", "1",
                                    "--batch-size", "8", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    made = read_synthetic_folder(syn)
    assert 0 in {r.pid for r in made}  # the synthetic images of train person 0 are named 0000_c...
    res = CliRunner().invoke(main, ["train-bot", "--data", str(msmt), "--synthetic", str(syn), "--out",
                                    str(tmp_path / "bot"), "--epochs", "1", "--batch-size", "8", "--image-size",
                                    "32x16", "--pretrained", "none", "--backbone", "resnet18", "--device", "cpu",
                                    "--no-tensorboard"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "bot" / "model" / "model.safetensors").is_file()
