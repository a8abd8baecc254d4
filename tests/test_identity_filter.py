"""The identity filter: a BoT model trained on the real subset scores synthetic images against their identity."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from reid_aug.bot.train import BotConfig, train_bot
from reid_aug.cli import main
from reid_aug.data.market import read_image_folder, read_reid_dataset
from reid_aug.data.subset import make_subset
from reid_aug.data.toy import make_toy_market
from reid_aug.synthesis import SynthesisConfig, synthesize, synthetic_name


@pytest.fixture(scope="module")
def filtered_setup(tmp_path_factory):
    """Toy Market, a BoT trained on its 50 % subset, and toy-oracle images of that subset."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("idf")
    market = make_toy_market(root / "toy", num_ids=16, seed=0)
    dataset = read_reid_dataset(market)
    subset = make_subset(dataset.train, 0.5, seed=0)
    cfg = BotConfig(backbone="resnet18", pretrained=None, image_size=(64, 32), epochs=6, batch_size=16,
                    num_instances=4, warmup_epochs=1, milestones=(5,), padding=2, keep_checkpoint=False)
    model = train_bot(cfg, subset, root / "bot", device="cpu", progress=False)
    syn = synthesize(SynthesisConfig(generator="toy-oracle"), dataset, subset, root / "syn", progress=False)
    return dataset, subset, model, syn


def test_a_wrong_identity_image_scores_below_the_right_ones(filtered_setup, tmp_path):
    dataset, subset, model, syn = filtered_setup
    work = tmp_path / "syn"
    shutil.copytree(syn, work)
    # A deliberate mistake: a real image of one person filed as a synthetic image of another.
    victim = subset[0]
    intruder = next(r for r in subset if r.pid != victim.pid)
    wrong = work / synthetic_name(victim, 0)
    shutil.copyfile(intruder.path, wrong)
    out = tmp_path / "kept"
    res = CliRunner().invoke(main, ["filter-identity", str(work), "--model", str(model), "--out", str(out),
                                    "--rank1"])
    assert res.exit_code == 0, res.output
    scores = pd.read_csv(out / "scores.csv")
    bad = scores.set_index("name").loc[wrong.name]
    right = scores[scores["name"] != wrong.name]
    assert bad["score"] < right["score"].quantile(0.1) and not bad["rank1"] and not bad["kept"]
    assert right["rank1"].mean() > 0.5  # a weak model (6 epochs, 64x32) still recognises most (chance: 1/8)
    kept = read_image_folder(out, relabel=False, keep_distractors=False)
    assert {r.name for r in kept} == set(scores.loc[scores["kept"], "name"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kept"] == len(kept) and manifest["kept_fraction"] == pytest.approx(len(kept) / len(scores),
                                                                                        abs=1e-6)


def test_filter_refuses_what_it_cannot_judge(filtered_setup, tmp_path):
    dataset, subset, model, syn = filtered_setup
    runner = CliRunner()
    res = runner.invoke(main, ["filter-identity", str(syn), "--model", str(model), "--out", str(tmp_path / "a")])
    assert res.exit_code == 2 and "--min-score X and/or --rank1" in res.output
    incomplete = tmp_path / "inc"
    shutil.copytree(syn, incomplete)
    manifest = json.loads((incomplete / "manifest.json").read_text())
    (incomplete / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    res = runner.invoke(main, ["filter-identity", str(incomplete), "--model", str(model), "--out",
                               str(tmp_path / "b"), "--min-score", "0.5"])
    assert res.exit_code == 1 and "not a complete synthesize folder" in res.output


def test_filter_refuses_a_model_trained_on_other_images(filtered_setup, tmp_path):
    dataset, subset, model, syn = filtered_setup
    other = train_bot(BotConfig(backbone="resnet18", pretrained=None, image_size=(32, 16), epochs=1, batch_size=8,
                                num_instances=4, warmup_epochs=1, milestones=(1,), padding=2, keep_checkpoint=False),
                      list(dataset.train), tmp_path / "whole", device="cpu", progress=False)
    res = CliRunner().invoke(main, ["filter-identity", str(syn), "--model", str(other), "--out", str(tmp_path / "k"),
                                    "--min-score", "0.5"])
    assert res.exit_code == 1 and "score with the standard model of the same subset" in res.output
