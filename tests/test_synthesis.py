"""Synthesis job (reid_aug.synthesis, reid_aug.posebank): pose bank, naming, toy-oracle and PCDMs paths, resume, CLI."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from pcdms.encoders import WeightsNotFoundError
from pcdms.io import sha256_file
from pcdms.pose import read_annotation_csv, write_annotation_csv
from reid_aug.cli import main
from reid_aug.cli import synth_cmds  # noqa: F401  registers `synthesize`
from reid_aug.cli.config import ConfigError, load_config
from reid_aug.data import toy
from reid_aug.data.market import DatasetError, ImageRecord, parse_market_name, read_image_folder, read_reid_dataset
from reid_aug.data.subset import make_subset, write_subset_csv
from reid_aug.posebank import build_pose_bank, draw_targets, is_usable_pose, item_seed, name_key
from reid_aug.synthesis import (
    ANNOTATION_CSV, SYNTHESIS_CSV, SynthesisConfig, SynthesisError, guidance_text, parse_guidance, plan_synthesis,
    synthesize, synthetic_name, toy_oracle_image,
)

TOY = SynthesisConfig(generator="toy-oracle", per_image=2)


@pytest.fixture(scope="module")
def market(tmp_path_factory) -> Path:
    return toy.make_toy_market(tmp_path_factory.mktemp("toy") / "market", num_ids=6, seed=0)


@pytest.fixture(scope="module")
def dataset(market):
    return read_reid_dataset(market)


@pytest.fixture(scope="module")
def subset(dataset):
    return make_subset(dataset.train, 0.2, seed=0)


@pytest.fixture(scope="module")
def poses(market):
    return read_annotation_csv(market / "market-annotation-train.csv")


def _hashes(folder: Path) -> dict[str, str]:
    # Not the hidden ".<name>.tmp.<random>.jpg" of a write that a kill interrupted: not an image yet.
    return {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.suffix == ".jpg" and p.name[0] != "."}


# --------------------------------------------------------------------------- pose bank


def _pose(visible: int = 18, neck: bool = True, hips: int = 2) -> np.ndarray:
    kp = np.tile(np.array([[10, 20]], np.int64), (18, 1)) + np.arange(18)[:, None]
    kp[visible:] = -1
    if not neck:
        kp[1] = -1
    if hips < 2:
        kp[8] = -1
    if hips < 1:
        kp[11] = -1
    return kp


def _rec(name: str) -> ImageRecord:
    pid, camid = parse_market_name(name)
    return ImageRecord(Path(name), name, pid, camid, pid)


def test_usable_pose_rule():
    assert is_usable_pose(_pose(), 8)
    assert is_usable_pose(_pose(hips=1), 8)  # one hip is enough
    assert not is_usable_pose(_pose(neck=False), 8)
    assert not is_usable_pose(_pose(hips=0), 8)
    assert is_usable_pose(_pose(visible=12), 12) and not is_usable_pose(_pose(visible=12), 13)


def _bank_records(num_pids: int = 4, per_pid: int = 5) -> list[ImageRecord]:
    return [_rec(f"{pid:04d}_c{1 + i % 3}s1_{100 * pid + i:06d}_01.jpg")
            for pid in range(1, num_pids + 1) for i in range(per_pid)]


def test_draws_are_seeded_distinct_and_never_the_source_pose():
    records = _bank_records()
    poses = {r.name: _pose() for r in records}
    bank = build_pose_bank(poses, records, 8)
    for src in records:
        other = draw_targets(bank, src, 3, seed=0, identity="other")
        assert other == draw_targets(bank, src, 3, seed=0, identity="other")
        assert draw_targets(bank, src, 2, seed=0, identity="other") == other[:2]  # more k keep the first ones
        assert len(set(other)) == 3
        assert all(bank.pids[j] != src.pid for j in other)
        anyid = draw_targets(bank, src, 19, seed=0, identity="any")
        assert src.name not in {bank.names[j] for j in anyid} and len(set(anyid)) == 19  # all 19 others
    draws = [tuple(draw_targets(bank, r, 3, seed, "other")) for r in records for seed in (0, 1)]
    assert len(set(draws)) > len(records)  # the seed changes the draws
    # Stable across processes and versions: names are hashed with SHA-256, not hash().
    assert name_key("0002_c1s1_000451_03.jpg") == 0x02A46551C2ADF1EB
    assert item_seed(0, 1, "0002_c1s1_000451_03.jpg", 1) == 5738950807107810233


def test_bank_skips_unusable_and_unannotated_and_reports_them():
    records = _bank_records(3, 4)
    poses = {r.name: _pose() for r in records}
    poses[records[0].name] = _pose(neck=False)
    poses[records[1].name] = _pose(visible=5)
    del poses[records[2].name]
    bank = build_pose_bank(poses, records, 8)
    assert len(bank) == len(records) - 3 and (bank.num_unusable, bank.num_unannotated) == (2, 1)
    assert not {r.name for r in records[:3]} & set(bank.names)
    lonely = build_pose_bank(poses, records[4:8], 8)  # one identity only
    with pytest.raises(ValueError, match="no pose of another identity.*pose_pool: train"):
        draw_targets(lonely, records[4], 1, 0, "other")


def test_plan_uses_only_the_subset_pool(dataset, subset, poses):
    cfg = SynthesisConfig(per_image=3, pipeline=Path("unused"))
    items = plan_synthesis(cfg, subset, poses)
    names = {r.name for r in subset}
    assert len(items) == 3 * len(subset)
    assert all(it.target in names and it.target != it.source.name for it in items)
    assert all(parse_market_name(it.target)[0] != it.source.pid for it in items)
    assert all(np.array_equal(np.array(it.target_keypoints), poses[it.target]) for it in items)
    assert all(np.array_equal(np.array(it.source_keypoints), poses[it.source.name]) for it in items)
    assert plan_synthesis(cfg, list(reversed(subset)), poses) == items  # order-free, deterministic
    whole = plan_synthesis(dataclasses.replace(cfg, pose_pool="train"), subset, poses, pool=dataset.train)
    assert {it.target for it in whole} - names  # the train pool reaches poses outside the subset
    with pytest.raises(SynthesisError, match="pool=dataset.train"):
        plan_synthesis(dataclasses.replace(cfg, pose_pool="train"), subset, poses)


def test_missing_source_pose_is_an_error_or_skipped(subset, poses):
    cfg = SynthesisConfig(pipeline=Path("unused"))
    holey = {k: v for k, v in poses.items() if k != subset[1].name}
    with pytest.raises(DatasetError, match=f"poses.csv: no pose row for 1 subset image.*{subset[1].name}"):
        plan_synthesis(cfg, subset, holey, poses_file="poses.csv")
    items = plan_synthesis(dataclasses.replace(cfg, missing_source_pose="skip"), subset, holey)
    assert len(items) == len(subset) - 1 and subset[1].name not in {it.source.name for it in items}


# --------------------------------------------------------------------------- naming, config


def test_synthetic_names_parse_back_to_the_source_labels():
    src = _rec("0002_c1s1_000451_03.jpg")
    assert synthetic_name(src, 1) == "0002_c1s1_000451_03_syn01.jpg"
    assert parse_market_name(synthetic_name(src, 1)) == (2, 0)
    duke = _rec("0005_c2_f0046182.jpg")
    assert parse_market_name(synthetic_name(duke, 0)) == (5, 1)
    msmt = ImageRecord(Path("x"), "0012_017_04_0303morning_0015_0.jpg", 12, 3, 12)  # MSMT17: camera in field 3
    assert synthetic_name(msmt, 0) == "0012_c4_0012_017_04_0303morning_0015_0_syn00.jpg"
    assert parse_market_name(synthetic_name(msmt, 0)) == (12, 3)


def test_config_validation(tmp_path):
    for bad in (dict(per_image=0), dict(generator="gan"), dict(pose_pool="all"), dict(scheduler="pndm"),
                dict(dtype="int8"), dict(guidance_scale=float("nan")), dict(guidance_scale=(2.0, 1.0)),
                dict(guidance_scale=(2.0, -1.0, 1.0)), dict(device="gpu0"), dict(refine_strength=0.0),
                dict(refine_strength=1.5), dict(num_inference_steps=4, refine_strength=0.2)):
        with pytest.raises(ValueError):
            SynthesisConfig(**bad)
    # Nothing refined (B1, B2, toy-oracle): the strength is recorded as 1.0, so it splits no job.
    assert SynthesisConfig(stages="B2", refine_strength=0.1).refine_strength == 1.0
    assert SynthesisConfig(generator="toy-oracle", refine_strength=0.5).refine_strength == 1.0
    assert SynthesisConfig(stages="B3", refine_strength=0.5).refine_strength == 0.5
    path = tmp_path / "s.yaml"
    path.write_text("generator: toy-oracle\nper_image: 3\nsteps: 4\n")
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(SynthesisConfig, path)
    path.write_text("generator: pcdms\npipeline: some/dir\nper_image: 3\n")
    cfg = load_config(SynthesisConfig, path, {"per_image": None, "seed": 4})
    assert cfg.pipeline == Path("some/dir") and cfg.per_image == 3 and cfg.seed == 4
    # Guidance per stage (prior, inpaint, refine): a YAML list, or --guidance "2,2,1" on the command line.
    path.write_text("generator: pcdms\npipeline: some/dir\nguidance_scale: [2, 2, 1]\n")
    cfg = load_config(SynthesisConfig, path)
    assert cfg.guidance_scale == (2.0, 2.0, 1.0) and guidance_text(cfg.guidance_scale) == "2.0,2.0,1.0"
    assert parse_guidance(guidance_text(cfg.guidance_scale)) == cfg.guidance_scale and parse_guidance("1.5") == 1.5
    path.write_text("generator: pcdms\npipeline: some/dir\nguidance_scale: [2, 1]\n")
    with pytest.raises(ConfigError, match=r"guidance_scale: expected 3 items, got 2: \[2, 1\] \(or a number\)"):
        load_config(SynthesisConfig, path)
    path.write_text("generator: pcdms\npipeline: some/dir\nguidance_scale: '2,2,1'\n")
    with pytest.raises(ConfigError, match=r"guidance_scale: expected a number or a list of 3 items, got '2,2,1'"):
        load_config(SynthesisConfig, path)
    for bad in ("2,1", "x", "2,2,-1", "nan"):
        with pytest.raises(ValueError, match="three comma-separated"):
            parse_guidance(bad)


# --------------------------------------------------------------------------- toy oracle


def test_toy_oracle_reproduces_a_real_toy_image(market):
    meta = toy.read_toy_manifest(market)
    cfg = toy.ToyConfig(**{**meta["config"], "images_per_id": tuple(meta["config"]["images_per_id"])})
    shot = toy.plan_identity(cfg, meta["seed"], 3)[2]
    img, kp = toy_oracle_image(meta["seed"], shot.pid, shot.camid - 1, shot.pose,
                               toy._rng(meta["seed"], toy._S_IMAGE, shot.pid + 1, shot.index))
    ref_img, ref_kp = toy.render_shot(shot, meta["seed"])
    assert np.array_equal(np.asarray(img), np.asarray(ref_img)) and np.array_equal(kp, ref_kp)


def test_toy_oracle_end_to_end(tmp_path, dataset, subset):
    out = synthesize(TOY, dataset, subset, tmp_path / "syn", subset_file="f0.2.csv", progress=False)
    records = read_image_folder(out, relabel=False, keep_distractors=False)
    assert len(records) == 2 * len(subset)
    sources = {r.name: r for r in subset}
    rows = list(csv.DictReader((out / SYNTHESIS_CSV).open()))
    assert [r["name"] for r in rows] == [r.name for r in records]
    for rec, row in zip(records, rows):
        src = sources[row["source"]]
        assert (rec.pid, rec.camid) == (src.pid, src.camid) == (int(row["pid"]), int(row["camid"]))
        assert rec.name == synthetic_name(src, int(row["k"]))
        with Image.open(rec.path) as im:
            assert im.size == (64, 128) and im.format == "JPEG"
    annotation = read_annotation_csv(out / ANNOTATION_CSV)
    assert set(annotation) == {r.name for r in records}
    for row in rows:
        assert annotation[row["name"]].tolist() == json.loads(row["target_keypoints"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["step"] == "synthesize" and manifest["complete"] and manifest["generator"] == "toy-oracle"
    assert "NOT a generative model" in manifest["note"] and manifest["config"]["per_image"] == 2
    assert manifest["sources"]["subset_file"] == "f0.2.csv" and manifest["counts"]["images"] == len(records)
    assert {r.pid for r in records} <= {r.pid for r in subset}
    assert not {r.pid for r in records} & {r.pid for r in dataset.query + dataset.gallery}


def test_resume_after_a_kill_makes_exactly_the_missing_images(tmp_path, dataset, subset, monkeypatch):
    reference = _hashes(synthesize(TOY, dataset, subset, tmp_path / "ref", progress=False))
    import reid_aug.synthesis as synthesis

    real_save, calls = synthesis.save_image, []

    def killed_after_five(img, path):
        if len(calls) == 5:
            raise KeyboardInterrupt
        calls.append(path.name)
        real_save(img, path)

    monkeypatch.setattr(synthesis, "save_image", killed_after_five)
    with pytest.raises(KeyboardInterrupt):
        synthesize(TOY, dataset, subset, tmp_path / "run", progress=False)
    monkeypatch.setattr(synthesis, "save_image", real_save)
    assert len(_hashes(tmp_path / "run")) == 5
    assert not json.loads((tmp_path / "run" / "manifest.json").read_text())["complete"]
    (tmp_path / "run" / ".x.jpg.tmp.abc.jpg").write_bytes(b"half")  # what a kill inside atomic_path leaves
    synthesize(dataclasses.replace(TOY, batch_size=3), dataset, subset, tmp_path / "run", progress=False)
    assert _hashes(tmp_path / "run") == reference
    assert not list((tmp_path / "run").glob(".*"))

    out = tmp_path / "run"
    victim = sorted(reference)[3]
    (out / victim).unlink()
    stamps = {n: os.stat(out / n).st_mtime_ns for n in reference if n != victim}
    logs: list[str] = []
    synthesize(TOY, dataset, subset, out, progress=False, log=logs.append)
    assert "1 of" in logs[0] and _hashes(out) == reference
    assert stamps == {n: os.stat(out / n).st_mtime_ns for n in stamps}  # nothing else rewritten
    logs.clear()
    synthesize(TOY, dataset, subset, out, progress=False, log=logs.append)
    assert logs == [f"{out}: complete ({len(reference)} images, same config); nothing to do"]


def test_config_changes_against_an_existing_folder(tmp_path, dataset, subset, market):
    out = synthesize(TOY, dataset, subset, tmp_path / "syn", progress=False)
    with pytest.raises(SynthesisError, match=r"per_image: 2 -> 3.*--overwrite"):
        synthesize(dataclasses.replace(TOY, per_image=3), dataset, subset, out, progress=False)
    with pytest.raises(SynthesisError, match="plan"):
        synthesize(TOY, dataset, make_subset(dataset.train, 0.4, seed=0), out, progress=False)
    synthesize(dataclasses.replace(TOY, per_image=3), dataset, subset, out, overwrite=True, progress=False)
    assert len(read_image_folder(out, relabel=False, keep_distractors=False)) == 3 * len(subset)
    (out / "0001_c1s1_000001_01_syn00.jpg").write_bytes(b"")
    with pytest.raises(SynthesisError, match="1 image.*this job does not make"):
        synthesize(dataclasses.replace(TOY, per_image=3), dataset, subset, out, progress=False)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(SynthesisError, match="not empty and has no synthesize manifest"):
        synthesize(TOY, dataset, subset, tmp_path / "other", progress=False, overwrite=True)
    # toy-oracle needs the toy manifest; a real (or copied) dataset has none.
    plain = tmp_path / "plain"
    shutil.copytree(market, plain)
    (plain / "manifest.json").unlink()
    with pytest.raises(SynthesisError, match="only works on a toy Market made by make-toy-market"):
        synthesize(TOY, read_reid_dataset(plain), subset, tmp_path / "x", progress=False)


def test_sources_must_be_training_images_of_training_identities(tmp_path, dataset, subset):
    with pytest.raises(DatasetError, match="not a training image"):
        synthesize(TOY, dataset, [*subset, dataset.query[0]], tmp_path / "a", progress=False)
    leaky = dataclasses.replace(dataset, gallery=dataset.gallery + (dataclasses.replace(dataset.gallery[0],
                                                                                         pid=subset[0].pid),))
    with pytest.raises(DatasetError, match="query/gallery identity"):
        synthesize(TOY, leaky, subset, tmp_path / "b", progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# --------------------------------------------------------------------------- PCDMs path


def _pcdms_cfg(pipeline: Path, **kw) -> SynthesisConfig:
    return SynthesisConfig(generator="pcdms", pipeline=pipeline, allow_random_weights=True, num_inference_steps=2,
                           device="cpu", **kw)


def test_pcdms_path_writes_reproducible_images(tmp_path, dataset, subset, tiny_pipeline, monkeypatch):
    torch.set_num_threads(1)
    sources = [next(r for r in subset if r.pid == pid) for pid in sorted({r.pid for r in subset})][:3]
    cfg = _pcdms_cfg(tiny_pipeline, batch_size=3)
    a = synthesize(cfg, dataset, sources, tmp_path / "a", progress=False)
    b = synthesize(cfg, dataset, sources, tmp_path / "b", progress=False)
    assert _hashes(a) == _hashes(b) and len(_hashes(a)) == 3
    for rec in read_image_folder(a, relabel=False, keep_distractors=False):
        with Image.open(rec.path) as im:
            assert im.size == (64, 128)
    manifest = json.loads((a / "manifest.json").read_text())
    assert manifest["allow_random_weights"] and "RANDOM weights" in manifest["WARNING"]
    assert len(manifest["checkpoints"]["pipeline"]) == 64
    assert manifest["sources"]["poses_csv"].endswith("market-annotation-train.csv")
    rows = list(csv.DictReader((a / SYNTHESIS_CSV).open()))
    assert all(r["target"] in {s.name for s in sources} for r in rows)  # the pose pool is the subset given
    # Per-image noise generators: batches of one give the batch-of-three images up to float rounding
    # (a rounding flip of one 8-bit level moves a few JPEG pixels by a few levels).
    c = synthesize(dataclasses.replace(cfg, batch_size=1), dataset, sources, tmp_path / "c", progress=False)
    for name in _hashes(a):
        with Image.open(a / name) as x, Image.open(c / name) as y:
            diff = np.abs(np.asarray(x, np.int16) - np.asarray(y, np.int16))
            assert diff.max() <= 8 and diff.mean() < 0.1
    # Killed after the first image of a batch: the resumed run redoes that batch, bit-identical.
    import reid_aug.synthesis as synthesis

    real_save = synthesis.save_image
    saved: list[str] = []

    def killed_after_one(img, path):
        if saved:
            raise KeyboardInterrupt
        saved.append(path.name)
        real_save(img, path)

    monkeypatch.setattr(synthesis, "save_image", killed_after_one)
    with pytest.raises(KeyboardInterrupt):
        synthesize(cfg, dataset, sources, tmp_path / "e", progress=False)
    monkeypatch.setattr(synthesis, "save_image", real_save)
    assert len(_hashes(tmp_path / "e")) == 1
    synthesize(cfg, dataset, sources, tmp_path / "e", progress=False)
    assert _hashes(tmp_path / "e") == _hashes(a)
    d = synthesize(dataclasses.replace(cfg, seed=1), dataset, sources, tmp_path / "d", progress=False)
    for name in _hashes(a):
        with Image.open(a / name) as x, Image.open(d / name) as y:
            assert np.abs(np.asarray(x, np.int16) - np.asarray(y, np.int16)).mean() > 5  # another seed: other noise


def test_pcdms_missing_source_pose_names_image_and_file(tmp_path, dataset, subset, poses, tiny_pipeline):
    sources = [subset[0], next(r for r in subset if r.pid != subset[0].pid)]
    holey = tmp_path / "poses.csv"
    write_annotation_csv(holey, {k: v for k, v in poses.items() if k != sources[0].name})
    with pytest.raises(DatasetError, match=f"poses.csv: no pose row.*{sources[0].name}.*missing_source_pose: skip"):
        synthesize(_pcdms_cfg(tiny_pipeline), dataset, sources, tmp_path / "a", poses_csv=holey, progress=False)
    # The skipped image's pose is missing from the bank too, so the other source draws from the train pool.
    out = synthesize(_pcdms_cfg(tiny_pipeline, missing_source_pose="skip", pose_pool="train"), dataset, sources,
                     tmp_path / "b", poses_csv=holey, progress=False)
    counts = json.loads((out / "manifest.json").read_text())["counts"]
    assert counts["skipped_missing_source_pose"] == 1 and counts["images"] == 1


def test_pcdms_refuses_missing_weights(tmp_path, dataset, subset, tiny_pipeline):
    cfg = SynthesisConfig(generator="pcdms")
    with pytest.raises(WeightsNotFoundError, match=r"pipeline: DIR \(--pipeline DIR\)"):
        synthesize(cfg, dataset, subset, tmp_path / "a", progress=False)
    with pytest.raises(WeightsNotFoundError, match=f"{tmp_path / 'nope'} not found"):
        synthesize(dataclasses.replace(cfg, pipeline=tmp_path / "nope"), dataset, subset, tmp_path / "a")
    no_encoders = dataclasses.replace(cfg, pipeline=tiny_pipeline, dino_path=tmp_path / "dino")
    with pytest.raises(WeightsNotFoundError, match=r"clip_checkpoint \(--clip-checkpoint\).*ViT-H-14.*vae_path") as err:
        synthesize(no_encoders, dataset, subset, tmp_path / "a", progress=False)
    assert "dino_path" not in str(err.value)
    assert not (tmp_path / "a").exists()


# --------------------------------------------------------------------------- CLI


def test_cli_fraction_subset_file_and_errors(tmp_path, market, dataset):
    runner = CliRunner()
    args = ["synthesize", "--data", str(market), "--generator", "toy-oracle", "--per-image", "1"]
    res = runner.invoke(main, [*args, "--subset", "0.4", "--out", str(tmp_path / "f")])
    assert res.exit_code == 0, res.output
    expected = make_subset(dataset.train, 0.4, seed=0)
    assert len(read_image_folder(tmp_path / "f", relabel=False, keep_distractors=False)) == len(expected)
    manifest = json.loads((tmp_path / "f" / "manifest.json").read_text())
    assert manifest["sources"]["subset_fraction"] == "0.4" and manifest["config"]["generator"] == "toy-oracle"
    res = runner.invoke(main, [*args, "--subset", "0.4", "--out", str(tmp_path / "f")])
    assert res.exit_code == 0 and "nothing to do" in res.output

    subset_csv = tmp_path / "sub.csv"
    write_subset_csv(subset_csv, expected[:4])
    res = runner.invoke(main, [*args, "--subset", str(subset_csv), "--out", str(tmp_path / "s")])
    assert res.exit_code == 0, res.output
    assert len(read_image_folder(tmp_path / "s", relabel=False, keep_distractors=False)) == 4
    res = runner.invoke(main, [*args, "--per-image", "2", "--subset", str(subset_csv), "--out", str(tmp_path / "s")])
    assert res.exit_code == 1 and "per_image: 1 -> 2" in res.output

    res = runner.invoke(main, [*args, "--subset", "most", "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "neither an existing subset CSV nor a fraction" in res.output
    res = runner.invoke(main, [*args, "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "--subset FILE|FRACTION or --fraction" in res.output
    res = runner.invoke(main, ["synthesize", "--data", str(market), "--fraction", "0.2", "--out", str(tmp_path / "p"),
                               "--allow-random-weights"])
    assert res.exit_code == 1 and "WARNING" in res.stderr and "--pipeline DIR" in res.output


def test_nested_fractions_reuse_images_instead_of_generating_them(tmp_path, dataset, tiny_pipeline, monkeypatch):
    """With target poses from the train pool, a source's image is the same at every fraction: reuse it."""
    torch.set_num_threads(1)
    import reid_aug.synthesis as synthesis

    small, large = make_subset(dataset.train, 0.2, seed=0), make_subset(dataset.train, 0.4, seed=0)
    assert {r.name for r in small} < {r.name for r in large}
    cfg = _pcdms_cfg(tiny_pipeline, batch_size=8, pose_pool="train")
    a = synthesize(cfg, dataset, small, tmp_path / "a", progress=False)
    made: list[str] = []
    real = synthesis._pcdms_generate
    monkeypatch.setattr(synthesis, "_pcdms_generate",
                        lambda todo, *args, **kw: (made.extend(it.name for it in todo), real(todo, *args, **kw))[1])
    b = synthesize(cfg, dataset, large, tmp_path / "b", progress=False, reuse_from=[a, tmp_path / "missing"])
    assert sorted(made) == sorted(set(_hashes(b)) - set(_hashes(a)))  # only the new sources were generated
    assert all(_hashes(b)[name] == digest for name, digest in _hashes(a).items())  # the very same files
    reference = synthesize(cfg, dataset, large, tmp_path / "c", progress=False)
    assert _hashes(b) == _hashes(reference)  # reused or made in other batches: the same bytes
    assert json.loads((b / "manifest.json").read_text())["counts"]["reused"] == len(_hashes(a))
    # Another config (here: steps) never reuses.
    made.clear()
    other = dataclasses.replace(cfg, num_inference_steps=1)
    synthesize(other, dataset, small, tmp_path / "d", progress=False, reuse_from=[a])
    assert len(made) == len(small)


def test_builtin_generator_names():
    from reid_aug.generators import BUILTIN, resolve_pipeline

    assert resolve_pipeline("builtin:toy") == BUILTIN["toy"]
    assert SynthesisConfig(pipeline="builtin:toy").pipeline == BUILTIN["toy"]
    assert resolve_pipeline("some/dir") == Path("some/dir") and resolve_pipeline(None) is None
    with pytest.raises(ValueError, match="unknown builtin generator 'builtin:nope'"):
        resolve_pipeline("builtin:nope")


def test_pcdms_job_writes_manifest_csv_preview_and_coarse_images(tmp_path, dataset, subset, tiny_pipeline):
    torch.set_num_threads(1)
    sources = [next(r for r in subset if r.pid == pid) for pid in sorted({r.pid for r in subset})][:3]
    cfg = _pcdms_cfg(tiny_pipeline, batch_size=2, keep_coarse=True, stages="B1")
    out = synthesize(cfg, dataset, sources, tmp_path / "a", progress=False)
    table = pd.read_csv(out / SYNTHESIS_CSV, dtype=str)
    assert list(table.columns[:8]) == ["name", "source", "pid", "camid", "k", "seed", "target", "target_keypoints"]
    assert set(table["source"]) == {s.name for s in sources} and len(table) == 3
    row = table.iloc[0]
    assert (row["scheduler"], row["num_inference_steps"], row["stages"], row["generator"]) == ("ddim", "2", "B1",
                                                                                                 "pcdms")
    assert row["strategy"].startswith("random") and row["pipeline_sha256"] == json.loads(
        (out / "manifest.json").read_text())["checkpoints"]["pipeline"]
    # B1: the coarse image is the result; both are written, under the same name.
    assert sorted(p.name for p in (out / "coarse").iterdir()) == sorted(table["name"])
    for name in table["name"]:
        with Image.open(out / name) as x, Image.open(out / "coarse" / name) as y:
            assert np.array_equal(np.asarray(x), np.asarray(y))
    # The preview: the first batch (2 images), 4 columns of 64x128 tiles; not a training image.
    with Image.open(out / "preview.png") as im:
        assert im.size == (2 + 4 * (64 + 2), 14 + 2 + 2 * (128 + 2))
    assert len(read_image_folder(out, relabel=False, keep_distractors=False)) == 3


def test_pipeline_identity_ignores_notes_and_training_records(tmp_path, tiny_pipeline):
    from pcdms.pipeline import pipeline_sha256

    folder = tmp_path / "gen"
    shutil.copytree(tiny_pipeline, folder)
    before = pipeline_sha256(folder)
    (folder / "TRAINING.md").write_text("how it was made\n")
    (folder / "training").mkdir()
    (folder / "training" / "inpaint-log.csv").write_text("step,loss\n1,0.5\n")
    (folder / "export.json").write_text("{}")
    assert pipeline_sha256(folder) == before
    config = next(folder.rglob("config.json"))
    config.write_text(config.read_text() + " ")
    assert pipeline_sha256(folder) != before


def test_dry_run_estimates_time_from_the_speed_earlier_runs_recorded(tmp_path, market, tiny_pipeline, monkeypatch):
    torch.set_num_threads(1)
    monkeypatch.setenv("REID_AUG_CACHE", str(tmp_path / "cache"))
    args = ["synthesize", "--data", str(market), "--subset", "0.3", "--pipeline", str(tiny_pipeline),
            "--allow-random-weights", "--steps", "2", "--batch-size", "2", "--device", "cpu"]

    def plan(*extra: str) -> str:
        res = CliRunner().invoke(main, args + ["--out", str(tmp_path / "planned"), "--dry-run", *extra])
        assert res.exit_code == 0, res.output
        return res.output

    assert "time: unknown: this pipeline has not been timed" in plan()
    res = CliRunner().invoke(main, args + ["--out", str(tmp_path / "ran")])
    assert res.exit_code == 0, res.output
    timings = json.loads((tmp_path / "cache" / "synthesis-timings.json").read_text())
    (entry,) = timings.values()
    assert entry["num_inference_steps"] == 2 and entry["batch_size"] == 2 and entry["seconds_per_image"] > 0
    made = json.loads((tmp_path / "ran" / "manifest.json").read_text())["counts"]["images"]
    line = next(x for x in plan().splitlines() if "time:" in x)
    assert "measured" in line and f"{entry['seconds_per_image']:.3g} s/image" in line
    # Twice the steps: the same pipeline's timing, scaled.
    assert f"{2 * entry['seconds_per_image']:.3g} s/image (scaled from 2 steps" in plan("--steps", "4")
    assert "time: unknown" in plan("--dtype", "bfloat16")
    # Refining without guidance skips its unconditional branch: another speed, not this run's timing.
    per_stage = plan("--guidance", "2,2,1")
    assert "guidance 2.0,2.0,1.0" in per_stage and "time: unknown" in per_stage
    res = CliRunner().invoke(main, args + ["--out", str(tmp_path / "planned"), "--dry-run", "--guidance", "2,1"])
    assert res.exit_code == 2 and "three comma-separated (prior,inpaint,refine)" in res.output
    # A refining stage started from the coarse image runs fewer steps: another speed too.
    partial = plan("--refine-strength", "0.5")
    assert "guidance 2.0, refine strength 0.5, stages full" in partial and "time: unknown" in partial
    res = CliRunner().invoke(main, args + ["--out", str(tmp_path / "planned"), "--dry-run",
                                           "--refine-strength", "0.4"])
    assert res.exit_code == 2 and "refine_strength 0.4 of 2 steps runs no step; use at least 0.5" in res.output
    # A per-stage job resumes: its manifest reads the guidance back as a list, the config holds a tuple.
    per_stage_args = args + ["--out", str(tmp_path / "per_stage"), "--guidance", "2,2,1", "--refine-strength", "0.5"]
    assert CliRunner().invoke(main, per_stage_args).exit_code == 0
    res = CliRunner().invoke(main, per_stage_args)
    assert res.exit_code == 0 and "same config); nothing to do" in res.output, res.output
    rows = list(csv.DictReader(open(tmp_path / "per_stage" / SYNTHESIS_CSV)))
    assert {(r["guidance_scale"], r["refine_strength"]) for r in rows} == {("2.0,2.0,1.0", "0.5")}
    # dtype auto: float32 on a CPU without native bf16 (so this run's timing applies), bf16 with it.
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    auto = plan("--dtype", "auto")
    assert "stages full, float32" in auto and "measured" in auto
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    auto = plan("--dtype", "auto")
    assert "stages full, bfloat16" in auto and "time: unknown" in auto
    assert made > 2


# --------------------------------------------------------------------------- target-pose strategies


def test_same_id_draws_other_images_of_the_same_person_and_counts_the_skipped(dataset, subset, poses):
    cfg = SynthesisConfig(per_image=2, pipeline=Path("unused"), strategy="same-id")
    # One person keeps a single image in the pool: no target for it.
    alone = subset[0]
    pool = [r for r in subset if r.pid != alone.pid or r.name == alone.name]
    stats: dict = {}
    items = plan_synthesis(cfg, pool, poses, stats=stats)
    assert items and all(parse_market_name(it.target)[0] == it.source.pid and it.target != it.source.name
                         for it in items)
    assert alone.name not in {it.source.name for it in items} and stats["skipped_no_target_pose"] >= 1
    assert {it.target for it in items} <= {r.name for r in pool}


def test_unusable_poses_are_never_targets_and_are_counted(subset, poses):
    bad = subset[2].name
    holey = dict(poses)
    holey[bad] = np.full((18, 2), -1, np.int64)
    holey[bad][:3] = 5  # three joints, no neck: unusable
    stats: dict = {}
    for strategy in ("random", "same-id"):
        items = plan_synthesis(SynthesisConfig(per_image=3, pipeline=Path("unused"), strategy=strategy,
                                               missing_source_pose="skip"), subset, holey, stats=stats)
        assert bad not in {it.target for it in items} and stats["pose_bank_unusable"] == 1


def test_canonical_poses_are_kmeans_centres_of_the_bank(dataset, subset, poses):
    cfg = SynthesisConfig(per_image=2, pipeline=Path("unused"), strategy="canonical", canonical_k=3, pose_pool="train")
    stats: dict = {}
    items = plan_synthesis(cfg, subset, poses, pool=dataset.train, stats=stats)
    centres = stats["canonical_poses"]
    assert centres.shape == (3, 18, 2) and len(items) == 2 * len(subset)
    for it in items:
        j = int(it.target.removeprefix("canonical_"))
        assert np.array_equal(np.array(it.target_keypoints), centres[j])
    assert all(a.target != b.target for a, b in zip(items[::2], items[1::2]))  # a source's 2 draws differ
    # The centres are the bank's: the normalised mean of each cluster lies among the bank's poses.
    from reid_aug.posebank import build_pose_bank, normalize_poses

    bank = build_pose_bank(poses, dataset.train, cfg.min_visible_joints)
    norm_bank = normalize_poses(bank.keypoints)[0][:, :14]
    norm_centres = normalize_poses(centres)[0][:, :14]
    lo, hi = np.nanmin(norm_bank, axis=0), np.nanmax(norm_bank, axis=0)
    assert ((norm_centres >= lo - 0.1) & (norm_centres <= hi + 0.1)).all()
    # Nested subsets: the pose pool does not depend on the fraction, so neither do a source's targets.
    smaller = make_subset(dataset.train, 0.1, seed=0)
    again = {it.name: it for it in plan_synthesis(cfg, smaller, poses, pool=dataset.train)}
    assert all(again[it.name] == it for it in items if it.name in again) and again


def test_file_strategy_takes_targets_from_pairs_or_annotations(tmp_path, subset, poses):
    from pcdms.pose import write_annotation_csv, write_pairs_csv

    others = [r.name for r in subset[3:6]]
    write_pairs_csv(tmp_path / "pairs.csv", [(subset[0].name, others[0]), (subset[0].name, others[1]),
                                             (subset[1].name, others[2])])
    cfg = SynthesisConfig(per_image=5, pipeline=Path("unused"), strategy="file", target_poses=tmp_path / "pairs.csv")
    stats: dict = {}
    items = plan_synthesis(cfg, subset, poses, stats=stats)
    assert [(it.source.name, it.target) for it in items] == sorted(
        [(subset[0].name, others[0]), (subset[0].name, others[1]), (subset[1].name, others[2])])
    assert stats["skipped_no_target_pose"] == len(subset) - 2
    bom = tmp_path / "pairs-bom.csv"  # written by Excel: a byte-order mark before the header
    bom.write_bytes(b"\xef\xbb\xbf" + (tmp_path / "pairs.csv").read_bytes())
    assert plan_synthesis(dataclasses.replace(cfg, target_poses=bom), subset, poses) == items

    write_annotation_csv(tmp_path / "targets.csv", {"walk_a.jpg": poses[others[0]], "walk_b.jpg": poses[others[1]]})
    cfg = dataclasses.replace(cfg, per_image=1, target_poses=tmp_path / "targets.csv")
    items = plan_synthesis(cfg, subset, poses)
    assert len(items) == len(subset) and {it.target for it in items} <= {"walk_a.jpg", "walk_b.jpg"}
    with pytest.raises(ValueError, match="needs target_poses"):
        SynthesisConfig(strategy="file")


def test_canonical_job_writes_the_centres_and_their_sheet(tmp_path, dataset, subset, tiny_pipeline):
    torch.set_num_threads(1)
    sources = subset[:2]
    cfg = _pcdms_cfg(tiny_pipeline, strategy="canonical", canonical_k=4, pose_pool="train", stages="B1")
    out = synthesize(cfg, dataset, sources, tmp_path / "c", progress=False)
    centres = read_annotation_csv(out / "canonical-poses.csv")
    assert sorted(centres) == [f"canonical_{j:02d}" for j in range(4)]
    table = pd.read_csv(out / SYNTHESIS_CSV, dtype=str)
    assert set(table["target"]) <= set(centres) and table["strategy"][0] == "canonical (k=4, train pool)"
    with Image.open(out / "canonical-poses.png") as im:
        assert im.size[0] == 2 + 4 * (64 + 2)
    counts = json.loads((out / "manifest.json").read_text())["counts"]
    assert counts["pose_bank_usable"] > 0 and "pose_bank_unusable" in counts


def test_steps_the_sampler_cannot_take_are_refused_before_anything_loads(tmp_path, dataset, subset, tiny_pipeline,
                                                                          monkeypatch):
    import reid_aug.synthesis as synthesis
    from pcdms.pipeline import check_sampler_steps

    schedule = json.loads((tiny_pipeline / "latent_scheduler" / "scheduler_config.json").read_text())
    check_sampler_steps("ddim", schedule, 50)
    with pytest.raises(ValueError, match="cannot take 1001 steps"):
        check_sampler_steps("ddim", schedule, 1001)
    monkeypatch.setattr(synthesis, "load_pcdms", lambda cfg: pytest.fail("loaded the models"))
    for scheduler in ("ddim", "euler"):
        with pytest.raises(SynthesisError, match=f"--steps 1001: the {scheduler} sampler cannot take 1001 steps"):
            cfg = dataclasses.replace(_pcdms_cfg(tiny_pipeline, scheduler=scheduler), num_inference_steps=1001)
            synthesize(cfg, dataset, subset[:2], tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_an_image_does_not_depend_on_the_other_images_of_the_job(tmp_path, dataset, subset, tiny_pipeline):
    """Same batch size, other company (a job over fewer sources, so other batches and a padded last one):
    the same bytes. Another batch size may round differently, so it is part of the job's identity."""
    torch.set_num_threads(1)
    sources = subset[:4]
    cfg = _pcdms_cfg(tiny_pipeline, batch_size=3, stages="B1", pose_pool="train")  # targets independent of the job
    whole = _hashes(synthesize(cfg, dataset, sources, tmp_path / "all", progress=False))
    part = _hashes(synthesize(cfg, dataset, sources[1:3], tmp_path / "part", progress=False))
    assert len(whole) == 4 and part == {name: whole[name] for name in part}
    with pytest.raises(SynthesisError, match="batch_size: 3 -> 2"):
        synthesize(dataclasses.replace(cfg, batch_size=2), dataset, sources, tmp_path / "all", progress=False)


@pytest.mark.parametrize("signum", ["SIGKILL", "SIGTERM"])
def test_kill_mid_run_then_resume_gives_the_uninterrupted_bytes(tmp_path, market, tiny_pipeline, signum):
    """A real kill while images are being written (SIGKILL: no cleanup at all; SIGTERM: the command stops
    as on Ctrl-C and says so); the re-run makes exactly the missing images and the folder equals an
    uninterrupted run's, byte for byte."""
    import signal
    import subprocess
    import sys
    import time

    def command(out: Path) -> list[str]:
        return [sys.executable, "-m", "reid_aug.cli", "synthesize", "--data", str(market), "--subset", "0.6",
                "--out", str(out), "--pipeline", str(tiny_pipeline), "--allow-random-weights", "--steps", "2",
                "--batch-size", "2", "--device", "cpu", "--stages", "B1"]

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(command(tmp_path / "straight"), env=env, check=True, capture_output=True)
    total = len(_hashes(tmp_path / "straight"))
    proc = subprocess.Popen(command(tmp_path / "killed"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if (tmp_path / "killed").is_dir() and len(_hashes(tmp_path / "killed")) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(getattr(signal, signum))
    stderr = proc.communicate()[1]
    if signum == "SIGTERM":
        assert proc.returncode == 143 and "terminated (SIGTERM): what was finished is kept" in stderr, stderr
        assert "Traceback" not in stderr and not list((tmp_path / "killed").rglob("*.tmp*"))
    done = len(_hashes(tmp_path / "killed"))
    assert 3 <= done < total, "the kill did not land mid-run"
    assert json.loads((tmp_path / "killed" / "manifest.json").read_text())["complete"] is False
    res = subprocess.run(command(tmp_path / "killed"), env=env, check=True, capture_output=True, text=True)
    assert f"{total - done} of {total} images to make" in res.stdout
    assert _hashes(tmp_path / "killed") == _hashes(tmp_path / "straight")
    for name in ("manifest.csv", "annotation.csv", "subset.csv"):
        assert sha256_file(tmp_path / "killed" / name) == sha256_file(tmp_path / "straight" / name)


def _synthesize_worker(rank: int, world: int, port: int, cfg, root: str, names: list, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch.distributed as dist

    dataset = read_reid_dataset(Path(root))
    sources = [r for r in dataset.train if r.name in set(names)]
    try:
        synthesize(cfg, dataset, sources, Path(out), progress=False)
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_make_the_one_process_folder(tmp_path, market, dataset, subset, tiny_pipeline):
    import socket

    torch.set_num_threads(1)
    cfg = _pcdms_cfg(tiny_pipeline, batch_size=2, stages="B1", pose_pool="train")
    sources = subset[:5]
    one = synthesize(cfg, dataset, sources, tmp_path / "one", progress=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_synthesize_worker, nprocs=2, join=True,
                                args=(2, port, cfg, str(market), [r.name for r in sources], str(tmp_path / "two")))
    two = tmp_path / "two"
    assert _hashes(two) == _hashes(one) and len(_hashes(one)) == 5
    for name in ("manifest.csv", "annotation.csv", "subset.csv"):
        assert sha256_file(two / name) == sha256_file(one / name)
    manifest = json.loads((two / "manifest.json").read_text())
    assert manifest["complete"] and manifest["world_size"] == 2


def test_canonical_k_only_with_the_canonical_strategy():
    with pytest.raises(ValueError, match="applies to strategy 'canonical' only"):
        SynthesisConfig(canonical_k=4)
    assert SynthesisConfig(strategy="canonical", canonical_k=4).canonical_k == 4


def test_a_truncated_weights_file_is_named_and_nothing_is_written(tmp_path, dataset, subset, tiny_pipeline):
    broken = tmp_path / "pipeline"
    shutil.copytree(tiny_pipeline, broken)
    weights = next(broken.glob("inpaint/*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(SynthesisError, match=f"{weights}: unreadable weights"):
        synthesize(_pcdms_cfg(broken), dataset, subset[:2], tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
